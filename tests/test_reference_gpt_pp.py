# Tiny MoE GPTModel under a 2-stage pipeline (1F1B, 4 microbatches) x TP2 (SP) x EP2 on CPU/gloo,
# trained through Megatron's own DDP wrapper and finalize_model_grads, vs a single-rank reference.
#
# One 4-rank launch, shared by this module's tests:
#   1. reference: every rank builds the GPTModel with tp = pp = ep = 1 from the same seed and runs
#      the same 4 microbatches with get_forward_backward_func() (no pipelining); keeps the weights,
#      per-token losses [b, s] per microbatch and the parameter grads.
#   2. each layout: pp = 2, tp = 2 with sequence parallelism, ep = 2 (etp = 1); every stage loads
#      its shards of the reference weights (its layers, experts, TP shards), runs
#      get_forward_backward_func() (1F1B), and the per-token losses (last stage) and the grads
#      after finalize_model_grads (TP-sum of SP-norm/router grads, tied-embedding all-reduce) are
#      compared with the reference.
# Tolerance: max |parallel - reference| <= 1e-5 * max |reference| per tensor (fp32).

from functools import partial
from typing import Any, Dict, List, Tuple

import pytest
import torch
from harness import (
    build_tiny_gpt,
    init_megatron_parallel,
    load_reference_weights,
    make_moe_config,
    max_rel_error,
    run_distributed,
    shard_reference,
)

WORLD_SIZE = 4
VOCAB, SEQ, MICRO_BATCH, NUM_MICROBATCHES, NUM_LAYERS = 128, 16, 2, 4, 4
RTOL = 1e-5
SEED = 4321

# (name, dispatcher, share_embeddings_and_output_weights)
LAYOUTS: List[Tuple[str, str, bool]] = [
    ("pp2_tp2_sp_ep2_alltoall", "alltoall", False),
    ("pp2_tp2_sp_ep2_allgather_tied_embeddings", "allgather", True),
]


def _microbatches() -> List[Dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(SEED + 1)
    batches = []
    for _ in range(NUM_MICROBATCHES):
        tokens = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ), generator=generator)
        labels = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ), generator=generator)
        loss_mask = (torch.rand(MICRO_BATCH, SEQ, generator=generator) > 0.2).float()
        position_ids = torch.arange(SEQ).unsqueeze(0).expand(MICRO_BATCH, SEQ).contiguous()
        batches.append(
            dict(tokens=tokens, labels=labels, loss_mask=loss_mask, position_ids=position_ids)
        )
    return batches


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor) -> Tuple[Any, Dict]:
    loss = (output_tensor.float() * loss_mask).sum() / loss_mask.sum()
    return loss, {"loss": loss.detach(), "per_token": output_tensor.detach().clone()}


def _forward_step(data_iterator: Any, model: torch.nn.Module) -> Tuple[torch.Tensor, Any]:
    batch = next(data_iterator)
    output = model(
        batch["tokens"], batch["position_ids"], attention_mask=None, labels=batch["labels"]
    )
    return output, partial(_loss_func, batch["loss_mask"])


def _train_step(model: torch.nn.Module, config: Any) -> List[Dict[str, torch.Tensor]]:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    return get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=iter(_microbatches()),
        model=[model],
        num_microbatches=NUM_MICROBATCHES,
        seq_length=SEQ,
        micro_batch_size=MICRO_BATCH,
        forward_only=False,
    )


def _config(**overrides: Any) -> Any:
    return make_moe_config(
        num_layers=NUM_LAYERS, pipeline_dtype=torch.float32, hidden_dropout=0.0, **overrides
    )


def _run_reference(tied: bool) -> Dict[str, Any]:
    with init_megatron_parallel(seed=SEED):
        config = _config()
        model = build_tiny_gpt(config, VOCAB, SEQ, share_embeddings_and_output_weights=tied)
        losses = _train_step(model, config)
        return {
            "state": {n: p.detach().clone() for n, p in model.named_parameters()},
            "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()},
            "per_token": [item["per_token"] for item in losses],
        }


def _run_layout(layout: Tuple[str, str, bool], reference: Dict[str, Any]) -> Dict[str, Any]:
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    _, dispatcher, tied = layout
    with init_megatron_parallel(tp=2, pp=2, ep=2, etp=1, seed=SEED + 7) as pg_collection:
        config = _config(moe_token_dispatcher_type=dispatcher)
        assert config.sequence_parallel and config.pipeline_model_parallel_size == 2
        gpt = build_tiny_gpt(config, VOCAB, SEQ, share_embeddings_and_output_weights=tied)
        # Tied embeddings: the last stage's output_layer.weight is the word embedding.
        full_state = dict(reference["state"])
        full_grads = dict(reference["grads"])
        if tied:
            full_state["output_layer.weight"] = full_state["embedding.word_embeddings.weight"]
            full_grads["output_layer.weight"] = full_grads["embedding.word_embeddings.weight"]
        names = load_reference_weights(gpt, full_state, pg_collection)

        model = DistributedDataParallel(
            config=config,
            ddp_config=DistributedDataParallelConfig(
                overlap_grad_reduce=False, use_distributed_optimizer=False
            ),
            module=gpt,
        )
        config.no_sync_func = model.no_sync
        config.finalize_model_grads_func = finalize_model_grads
        model.zero_grad_buffer()
        losses = _train_step(model, config)

        result: Dict[str, Any] = {
            "stage": pg_collection.pp.rank(),
            "grads": {},
            "num_expert_params": sum(".experts." in n for n in names),
        }
        for local_name, param in gpt.named_parameters():
            expected = shard_reference(
                gpt, local_name, full_grads[names[local_name]], pg_collection
            )
            result["grads"][local_name] = max_rel_error(param.main_grad, expected)
        result["layers"] = sorted({names[n].split(".")[2] for n in names if ".layers." in n})
        if losses:  # last stage: per-token losses of every microbatch
            result["per_token"] = [
                max_rel_error(item["per_token"], expected)
                for item, expected in zip(losses, reference["per_token"])
            ]
        return result


def _gpt_pp_rank(layouts: List[Tuple[str, str, bool]]) -> Dict[str, Any]:
    references = {tied: _run_reference(tied) for tied in sorted({layout[2] for layout in layouts})}
    return {layout[0]: _run_layout(layout, references[layout[2]]) for layout in layouts}


@pytest.fixture(scope="module")
def gpt_results() -> List[Dict[str, Any]]:
    return run_distributed(_gpt_pp_rank, WORLD_SIZE, LAYOUTS)


@pytest.mark.parametrize("layout", LAYOUTS, ids=[layout[0] for layout in LAYOUTS])
def test_gpt_pipeline_matches_single_rank_reference(
    gpt_results: List[Dict[str, Any]], layout: Tuple[str, str, bool]
) -> None:
    name = layout[0]
    stages = {}
    for rank, rank_results in enumerate(gpt_results):
        result = rank_results[name]
        stages.setdefault(result["stage"], []).append(rank)
        # Each stage holds its half of the layers and its EP shard of every layer's experts.
        expected_layers = ["0", "1"] if result["stage"] == 0 else ["2", "3"]
        assert result["layers"] == expected_layers, result["layers"]
        assert result["num_expert_params"] == 2 * 2 * (8 // 2)
        bad = {k: v for k, v in result["grads"].items() if not v <= RTOL}
        assert not bad, f"{name} rank {rank}: parameter-grad errors {bad}"
        if result["stage"] == 1:
            assert len(result["per_token"]) == NUM_MICROBATCHES
            assert max(result["per_token"]) <= RTOL, f"{name} rank {rank}: {result['per_token']}"
        else:
            assert "per_token" not in result
    assert sorted(stages) == [0, 1] and all(len(r) == 2 for r in stages.values()), stages
