# Upgrading a stock Megatron MoE checkpoint (no PR2 predictor weights) to a PR2 model through
# megatron_pr2.checkpointing.load_dist_checkpoint, on 2 gloo ranks (TP2 + SP, torch_dist format):
# the predictors start at zero with a warning, every other weight is loaded exactly, the PR2
# model then computes the stock model's logits; a PR2 checkpoint still loads its predictors, and
# a checkpoint missing a policy weight still fails.

import logging

import torch
from harness import init_megatron_parallel, run_distributed
from par_util import tiny_gpt_config

VOCAB, SEQ, MBS = 64, 16, 2


def _stock_gpt(config):
    from harness import build_tiny_gpt
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    spec = get_gpt_decoder_block_spec(
        config, use_transformer_engine=False, vp_stage=None, pp_rank=0
    )
    return build_tiny_gpt(config, VOCAB, SEQ, spec=spec)


def _logits(model, tokens):
    model.eval()
    with torch.no_grad():
        return model(tokens, torch.arange(SEQ).expand(MBS, SEQ), None)


def _rank_upgrade(root):
    from par_util import cpu_patches

    cpu_patches()  # before the first megatron-core import of this rank
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from par_util import build_pr2_gpt, set_predictors

    from megatron_pr2.checkpointing import load_dist_checkpoint

    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("megatron_pr2.checkpointing").addHandler(handler)
    import os

    for name in ("stock", "partial", "pr2"):
        os.makedirs(f"{root}/{name}", exist_ok=True)
    tokens = torch.randint(0, VOCAB, (MBS, SEQ), generator=torch.Generator().manual_seed(4))
    out = {}
    with init_megatron_parallel(tp=2):
        config = tiny_gpt_config()
        torch.manual_seed(3)
        stock = _stock_gpt(config)
        dist_checkpointing.save(stock.sharded_state_dict(), f"{root}/stock")
        # A stock checkpoint without one policy weight (output layer).
        partial = stock.sharded_state_dict()
        del partial["output_layer.weight"]
        dist_checkpointing.save(partial, f"{root}/partial")
        dist.barrier()

        torch.manual_seed(1000)  # other weights than the checkpoint's
        pr2 = build_pr2_gpt(config, VOCAB, SEQ)[0]
        try:
            state = dist_checkpointing.load(pr2.sharded_state_dict(), f"{root}/stock")
            pr2.load_state_dict(state)
            out["plain_load"] = "loaded"
        except BaseException as error:  # noqa: BLE001 - torch's CheckpointException is one
            out["plain_load"] = f"{type(error).__name__}: {error}"[:300]

        torch.manual_seed(1000)
        pr2 = build_pr2_gpt(config, VOCAB, SEQ)[0]
        out["absent"] = load_dist_checkpoint(pr2, f"{root}/stock")
        out["warnings"] = list(records)
        stock_state, pr2_state = stock.state_dict(), pr2.state_dict()
        predictor = [k for k in pr2_state if ".predictor." in k]
        out["predictor_entries"] = len(predictor)
        out["predictors_zero"] = all(float(pr2_state[k].abs().sum()) == 0 for k in predictor)
        out["policy_mismatch"] = [
            k
            for k, v in stock_state.items()
            if isinstance(v, torch.Tensor) and not torch.equal(v, pr2_state[k])
        ]
        out["policy_entries"] = sum(isinstance(v, torch.Tensor) for v in stock_state.values())
        out["logits_diff"] = float((_logits(pr2, tokens) - _logits(stock, tokens)).abs().max())

        # A PR2 checkpoint: predictors saved and loaded, nothing reported.
        set_predictors([pr2])
        dist_checkpointing.save(pr2.sharded_state_dict(), f"{root}/pr2")
        dist.barrier()
        records.clear()
        torch.manual_seed(2000)
        fresh = build_pr2_gpt(config, VOCAB, SEQ)[0]
        out["pr2_absent"] = load_dist_checkpoint(fresh, f"{root}/pr2")
        out["pr2_warnings"] = list(records)
        fresh_state, saved_state = fresh.state_dict(), pr2.state_dict()
        out["pr2_exact"] = all(
            torch.equal(fresh_state[k], v)
            for k, v in saved_state.items()
            if isinstance(v, torch.Tensor)
        )

        torch.manual_seed(1000)
        pr2 = build_pr2_gpt(config, VOCAB, SEQ)[0]
        try:
            load_dist_checkpoint(pr2, f"{root}/partial")
            out["partial_load"] = "loaded"
        except BaseException as error:  # noqa: BLE001
            out["partial_load"] = f"{type(error).__name__}: {error}"
    return out


def test_stock_checkpoint_loads_into_a_pr2_model_with_zero_predictors(tmp_path):
    for rank, r in enumerate(run_distributed(_rank_upgrade, 2, str(tmp_path))):
        # Megatron's plain load refuses the stock checkpoint: the upgrade path is needed.
        assert r["plain_load"] != "loaded", (rank, r["plain_load"])
        assert r["absent"] and all(".predictor." in key for key in r["absent"]), (rank, r)
        assert len(r["warnings"]) == 1, (rank, r["warnings"])
        message = r["warnings"][0]
        assert "has no PR2 predictor weights" in message and "zero" in message, message
        assert r["predictor_entries"] >= 1 and r["predictors_zero"], (rank, r)
        assert r["policy_entries"] > 10 and r["policy_mismatch"] == [], (rank, r)
        # Zero predictors: the PR2 model computes the stock model's logits.
        assert r["logits_diff"] <= 1e-6, (rank, r["logits_diff"])
        assert r["pr2_absent"] == [] and r["pr2_warnings"] == [], (rank, r)
        assert r["pr2_exact"], rank
        assert "output_layer.weight" in r["partial_load"], (rank, r["partial_load"][-3000:])
