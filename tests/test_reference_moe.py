# Stock Megatron-Core MoELayer across ranks on CPU/gloo vs a single-rank reference.
#
# One 4-rank launch (shared by the tests of this module through a module-scoped fixture):
#   1. reference: every rank builds the MoE layer with tp = ep = 1 from the same seed, runs the
#      whole global batch x [S, B, H] with output-gradient dy, and keeps output, dx and the
#      parameter grads; a dense pure-torch MoE (softmax over top-k logits, gelu experts) checks
#      the reference itself.
#   2. each parallel layout: the layer is rebuilt, loaded with this rank's shards of the reference
#      weights (experts split over EP, expert linears over ETP, shared-expert linears over TP),
#      fed its [S / tp, B / dp, H] slice (sequence parallel when tp > 1), and its output, dx and
#      grads (summed like Megatron DDP) are compared with the reference slices.
# Tolerance: max |parallel - reference| <= 1e-5 * max |reference| per tensor (fp32).

from typing import Any, Dict, List, Tuple

import pytest
import torch
from harness import (
    allreduce_grads_like_ddp,
    build_moe_layer,
    init_megatron_parallel,
    load_reference_weights,
    make_moe_config,
    max_rel_error,
    run_distributed,
    shard_reference,
)

WORLD_SIZE = 4
SEQ, BATCH = 16, 4  # global tokens S x B = 64; B splits over data-parallel ranks
RTOL = 1e-5
SEED = 1234

# (name, tp, ep, etp, dispatcher, extra config); tp > 1 implies sequence parallelism (MoELayer
# refuses TP > 1 training without it).
LAYOUTS: List[Tuple[str, int, int, int, str, Dict[str, Any]]] = [
    ("ep4_alltoall", 1, 4, 1, "alltoall", {}),
    ("ep4_allgather", 1, 4, 1, "allgather", {}),
    ("tp2_sp_ep2_etp1_alltoall", 2, 2, 1, "alltoall", {}),
    ("tp2_sp_ep2_etp1_allgather", 2, 2, 1, "allgather", {}),
    ("tp2_sp_ep2_etp2_alltoall", 2, 2, 2, "alltoall", {}),
    ("tp2_sp_ep2_etp2_allgather", 2, 2, 2, "allgather", {}),
    (
        "tp2_sp_ep2_etp1_alltoall_shared_overlap",
        2,
        2,
        1,
        "alltoall",
        {"moe_shared_expert_intermediate_size": 64, "moe_shared_expert_overlap": True},
    ),
]


def _data() -> Tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(SEED + 1)
    x = torch.randn(SEQ, BATCH, 64, generator=generator)
    dy = torch.randn(SEQ, BATCH, 64, generator=generator)
    return x, dy


def _dense_moe(x: torch.Tensor, state: Dict[str, torch.Tensor], topk: int) -> torch.Tensor:
    """Plain torch MoE with the reference config: gates = softmax over the top-k logits."""
    tokens = x.reshape(-1, x.shape[-1])
    logits = tokens @ state["router.weight"].t()
    top_logits, top_indices = logits.topk(topk, dim=-1)
    gates = top_logits.softmax(dim=-1)
    out = torch.zeros_like(tokens)
    for slot in range(topk):
        for expert in top_indices[:, slot].unique().tolist():
            rows = top_indices[:, slot] == expert
            prefix = f"experts.local_experts.{expert}."
            hidden = torch.nn.functional.gelu(
                tokens[rows] @ state[prefix + "linear_fc1.weight"].t()
            )
            expert_out = hidden @ state[prefix + "linear_fc2.weight"].t()
            out[rows] += gates[rows, slot : slot + 1] * expert_out
    if "shared_experts.linear_fc1.weight" in state:
        hidden = torch.nn.functional.gelu(tokens @ state["shared_experts.linear_fc1.weight"].t())
        out += hidden @ state["shared_experts.linear_fc2.weight"].t()
    return out.view_as(x)


def _run_reference(extra: Dict[str, Any]) -> Dict[str, Any]:
    """Single-rank-layout MoE layer (tp = ep = 1) on the full batch."""
    x, dy = _data()
    with init_megatron_parallel(tp=1, ep=1, seed=SEED) as pg_collection:
        config = make_moe_config(**extra)
        layer = build_moe_layer(config, pg_collection=pg_collection)
        state = {name: p.detach().clone() for name, p in layer.named_parameters()}
        x = x.clone().requires_grad_(True)
        out, _ = layer(x)
        out.backward(dy)
        dense_error = max_rel_error(
            out.detach(), _dense_moe(x.detach(), state, config.moe_router_topk)
        )
        return {
            "state": state,
            "out": out.detach(),
            "dx": x.grad.detach(),
            "grads": {name: p.grad.detach().clone() for name, p in layer.named_parameters()},
            "dense_error": dense_error,
        }


def _run_layout(layout: Tuple, reference: Dict[str, Any]) -> Dict[str, Any]:
    _, tp, ep, etp, dispatcher, extra = layout
    x, dy = _data()
    with init_megatron_parallel(tp=tp, ep=ep, etp=etp, seed=SEED + 7) as pg_collection:
        config = make_moe_config(moe_token_dispatcher_type=dispatcher, **extra)
        assert config.sequence_parallel == (tp > 1)
        layer = build_moe_layer(config, pg_collection=pg_collection)
        names = load_reference_weights(layer, reference["state"], pg_collection)

        # This rank's tokens: batch columns of its DP rank, sequence chunk of its TP rank (SP).
        dp, dp_rank = pg_collection.dp.size(), pg_collection.dp.rank()
        tp_rank = pg_collection.tp.rank()
        s_local, b_local = SEQ // tp, BATCH // dp
        index = (
            slice(tp_rank * s_local, (tp_rank + 1) * s_local),
            slice(dp_rank * b_local, (dp_rank + 1) * b_local),
        )
        x_local = x[index].clone().requires_grad_(True)
        out, _ = layer(x_local)
        out.backward(dy[index])
        allreduce_grads_like_ddp(layer, pg_collection)

        grad_errors = {}
        for local_name, param in layer.named_parameters():
            expected = shard_reference(
                layer, local_name, reference["grads"][names[local_name]], pg_collection
            )
            assert param.grad is not None, f"{local_name} got no gradient"
            grad_errors[local_name] = max_rel_error(param.grad, expected)
        return {
            "out": max_rel_error(out.detach(), reference["out"][index]),
            "dx": max_rel_error(x_local.grad, reference["dx"][index]),
            "grads": grad_errors,
            "num_local_experts": len(layer.experts.local_experts),
        }


def _moe_reference_rank(layouts: List[Tuple]) -> Dict[str, Any]:
    references: Dict[str, Dict[str, Any]] = {}
    results = {}
    for layout in layouts:
        key = repr(sorted(layout[5].items()))
        if key not in references:
            references[key] = _run_reference(layout[5])
        results[layout[0]] = _run_layout(layout, references[key])
    results["dense_errors"] = {key: ref["dense_error"] for key, ref in references.items()}
    return results


@pytest.fixture(scope="module")
def moe_results() -> List[Dict[str, Any]]:
    return run_distributed(_moe_reference_rank, WORLD_SIZE, LAYOUTS)


def test_reference_matches_dense_torch_moe(moe_results: List[Dict[str, Any]]) -> None:
    for rank_results in moe_results:
        for key, error in rank_results["dense_errors"].items():
            assert error <= RTOL, f"reference MoELayer vs dense torch MoE ({key}): {error:.2e}"


@pytest.mark.parametrize("layout", LAYOUTS, ids=[layout[0] for layout in LAYOUTS])
def test_moe_layer_matches_single_rank_reference(
    moe_results: List[Dict[str, Any]], layout: Tuple
) -> None:
    name, tp, ep, etp = layout[:4]
    for rank, rank_results in enumerate(moe_results):
        result = rank_results[name]
        assert result["num_local_experts"] == 8 // ep
        assert result["out"] <= RTOL, f"{name} rank {rank}: output error {result['out']:.2e}"
        assert result["dx"] <= RTOL, f"{name} rank {rank}: input-grad error {result['dx']:.2e}"
        # router + 2 linears per local expert (+ 2 shared-expert linears)
        expected_params = 1 + 2 * (8 // ep) + (2 if layout[5] else 0)
        assert len(result["grads"]) == expected_params, sorted(result["grads"])
        bad = {k: v for k, v in result["grads"].items() if not v <= RTOL}
        assert not bad, f"{name} rank {rank}: parameter-grad errors {bad}"
