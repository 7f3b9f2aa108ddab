# Multi-rank route replay against a single-process reference: TP + SP, EP, ETP, CP (zigzag) and
# packed THD sequences, at the MoE-layer level and in a tiny GPTModel (tests/harness.py ranks).
#
# Every launch first builds the reference (TP = PP = EP = CP = 1) in each rank, records canonical
# routes [T, L, k] (token t = b * S + s), drifts the router weights (a simulated policy update, so
# a replay that silently re-routes would change the experts) and replays them for the reference
# outputs and gradients. Then each parallel layout loads the reference weights slice by slice
# (par_util, through Megatron's sharding metadata), records (checked against the reference after
# gather_routes), drifts identically, receives its route shard with scatter_routes and replays.
# Checked per layout:
#   * routes: the routing_map every router returns, mapped to canonical tokens through the rank's
#     TokenLayout, names exactly the reference experts for every (token, layer);
#   * outputs and input gradients: max abs error <= 1e-5 (fp32; observed ~1e-7);
#   * parameter gradients after Megatron DDP + finalize_model_grads: max abs error <= 1e-5 x the
#     largest reference gradient (observed ~1e-7).
# Data parallelism: microbatch m runs on the DP rank m % dp; each loss is weighted dp * cp / M so
# that DDP's average over the data-and-context-parallel group equals the reference mean over M
# microbatches (CP ranks hold partial sums of each sequence's loss).
#
# Context parallelism runs at the MoE-layer level: Megatron's GPT attention under CP needs
# Transformer Engine (DotProductAttention asserts context_parallel_size == 1), which is GPU-only.
# The MoE layer is token-wise, so feeding it the zigzag (or THD-partitioned) tokens exactly as
# get_batch_on_this_cp_rank / thd_get_partitioned_indices would is what the router sees under CP.

import pytest
import torch
from harness import init_megatron_parallel, make_moe_config, run_distributed

HIDDEN, FFN, EXPERTS, TOPK = 32, 64, 8, 2
SEQ, MBS, NUM_MB = 16, 2, 2  # sbhd microbatches: [SEQ, MBS] tokens each, NUM_MB of them
THD_LEN, THD_CU = 32, [0, 8, 20, 32]  # one packed row per microbatch, 3 sequences (len % 4 == 0)
TOL = 1e-5

# Layouts of the 4-rank MoE-layer launch: name -> (parallel sizes, packed THD?)
MOE_LAYOUTS = {
    "tp2sp_ep2": (dict(tp=2, ep=2, etp=1), False),
    "tp2sp_cp2_ep2_etp2": (dict(tp=2, cp=2, ep=2, etp=2), False),
    "thd_tp2sp_cp2_ep2": (dict(tp=2, cp=2, ep=2, etp=1), True),
}


def _moe_config(**overrides):
    return make_moe_config(
        hidden_size=HIDDEN,
        ffn_hidden_size=FFN,
        moe_ffn_hidden_size=FFN,
        num_moe_experts=EXPERTS,
        moe_router_topk=TOPK,
        **overrides,
    )


def _pr2_moe_layer(config, **pr2_kwargs):
    from harness import build_pr2_moe_layer

    from megatron_pr2 import PR2Config

    return build_pr2_moe_layer(config, PR2Config(**pr2_kwargs))


def _ddp(config, module, overlap=False):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=overlap, use_distributed_optimizer=False
    )
    return DistributedDataParallel(config, ddp_config, module)


def _data(thd):
    """Canonical inputs x [T, H] and output cotangents g [T, H] of every microbatch."""
    gen = torch.Generator().manual_seed(17 if thd else 11)
    tokens = THD_LEN if thd else SEQ * MBS
    xs = [torch.randn(tokens, HIDDEN, generator=gen) for _ in range(NUM_MB)]
    gs = [torch.randn(tokens, HIDDEN, generator=gen) for _ in range(NUM_MB)]
    return xs, gs


def _shape(thd):
    """(batch_size, seq_length) of one microbatch: packed THD is one row of THD_LEN tokens."""
    return (1, THD_LEN) if thd else (MBS, SEQ)


def _reference(thd, full_weights=None):
    """Single-process record (predict_record), drift, replay: routes, outputs, grads."""
    from par_util import (
        capture_routes,
        check_capture,
        drift_routers,
        full_tensors,
        load_full,
        set_predictors,
        to_canonical,
    )

    from megatron_pr2 import routing
    from megatron_pr2.routes import TokenLayout

    batch, seq = _shape(thd)
    xs, gs = _data(thd)
    torch.manual_seed(3)
    layer = _pr2_moe_layer(_moe_config(), cache_tokens_per_sequence=4)
    if full_weights is None:
        set_predictors(layer)
        full_weights = full_tensors(layer)
    else:
        load_full(layer, full_weights)
    routes = []
    for x in xs:
        with torch.no_grad(), routing(layer, "predict_record") as handle:
            layer(x.view(batch, seq, HIDDEN).transpose(0, 1).contiguous())
        routes.append(handle.routes)
    drift_routers(layer)
    # The drift really moves the live routing, so a replay that re-routed would be caught.
    rerouted = 0
    for x, recorded in zip(xs, routes):
        with torch.no_grad(), routing(layer, "predict_record") as handle:
            layer(x.view(batch, seq, HIDDEN).transpose(0, 1).contiguous())
        rerouted += int((handle.routes.indices != recorded.indices).any(-1).sum())
    outs, input_grads = [], []
    with capture_routes(layer) as capture, routing(layer, "replay", routes=routes):
        for x, g in zip(xs, gs):
            x_sbh = x.view(batch, seq, HIDDEN).transpose(0, 1).contiguous().requires_grad_(True)
            out, _ = layer(x_sbh)
            (to_canonical(out) * g).sum().div(NUM_MB).backward()
            outs.append(to_canonical(out).detach())
            # Gradient of this microbatch's own loss (undo the 1 / NUM_MB mean).
            input_grads.append(to_canonical(x_sbh.grad) * NUM_MB)
    return dict(
        weights=full_weights,
        routes=routes,
        outs=outs,
        input_grads=input_grads,
        grads=full_tensors(layer, "grad"),
        rerouted=rerouted,
        # The single-rank replay itself routes every (token, layer) to the recorded experts.
        routes_check=check_capture(capture, [TokenLayout.full(seq, batch)] * NUM_MB, routes),
    )


def _same_cache(a, b):
    """Same cached tokens (a set: the record pass keeps router-row order, gather_routes sorts)
    with (h_old, p_old) equal within TOL."""
    if a is None or b is None:
        return a is None and b is None
    order_a, order_b = torch.argsort(a.token_index), torch.argsort(b.token_index)
    return (
        torch.equal(a.token_index[order_a], b.token_index[order_b])
        and torch.allclose(a.hidden[order_a], b.hidden[order_b], atol=TOL, rtol=0)
        and torch.allclose(a.logits[order_a], b.logits[order_b], atol=TOL, rtol=0)
    )


def _rank_moe_layouts():
    """All MoE-layer layouts of MOE_LAYOUTS in one 4-rank launch (see the file header)."""
    from par_util import cpu_patches

    cpu_patches()  # before the first megatron-core import of this rank
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads
    from par_util import (
        capture_routes,
        check_capture,
        compare_to_full,
        drift_routers,
        gradient_scale,
        load_full,
        to_local,
    )

    from megatron_pr2 import routing
    from megatron_pr2.parallel import gather_routes, layout_for_rank, scatter_routes

    with init_megatron_parallel():
        reference = {thd: _reference(thd) for thd in (False, True)}

    results = {}
    recorded_elsewhere = None  # canonical routes gathered on the previous sbhd layout
    for name, (sizes, thd) in MOE_LAYOUTS.items():
        batch, seq = _shape(thd)
        ref = reference[thd]
        xs, gs = _data(thd)
        with init_megatron_parallel(**sizes):
            tp, cp = sizes.get("tp", 1), sizes.get("cp", 1)
            dp = ps.get_data_parallel_world_size()
            dp_rank = ps.get_data_parallel_rank()
            group = ps.get_tensor_and_context_parallel_group()  # ranks sharing one microbatch
            layout = layout_for_rank(
                batch,
                seq,
                tp_rank=ps.get_tensor_model_parallel_rank(),
                tp_size=tp,
                sequence_parallel=True,
                cp_rank=ps.get_context_parallel_rank(),
                cp_size=cp,
                cu_seqlens=THD_CU if thd else None,
            )
            config = _moe_config()
            torch.manual_seed(1000 + dist.get_rank())  # weights come from the reference only
            model = _ddp(config, _pr2_moe_layer(config, cache_tokens_per_sequence=4))
            load_full(model, ref["weights"])
            mine = [m for m in range(NUM_MB) if m % dp == dp_rank]

            # Record on this layout, gather to canonical on the group's first rank.
            gathered = {}
            for m in mine:
                with torch.no_grad(), routing(model, "predict_record", layout=layout) as handle:
                    model(to_local(xs[m], layout, batch))
                canonical = gather_routes(handle.routes, group=group, dst=0)
                if canonical is not None:
                    gathered[m] = canonical
            record_ok = all(
                torch.equal(c.indices, ref["routes"][m].indices)
                and c.token_index is None
                and c.cache is not None
                and _same_cache(c.cache, ref["routes"][m].cache)
                for m, c in gathered.items()
            )

            # Replay the reference routes (first layout) or the routes another layout recorded.
            drift_routers(model)
            src_routes = ref["routes"] if recorded_elsewhere is None or thd else recorded_elsewhere
            shards = [
                scatter_routes(
                    src_routes[m] if dist.get_rank(group) == 0 else None, layout, [0], group
                )
                for m in mine
            ]
            model.zero_grad_buffer()
            out_err = in_err = 0.0
            with capture_routes(model) as capture, routing(model, "replay", routes=shards):
                for m in mine:
                    x = to_local(xs[m], layout, batch).clone().requires_grad_(True)
                    out, _ = model(x)
                    weight = dp * cp / NUM_MB
                    rows = layout.token_index
                    (out.reshape(-1, HIDDEN) * gs[m][rows]).sum().mul(weight).backward()
                    out_err = max(
                        out_err, float((out.reshape(-1, HIDDEN) - ref["outs"][m][rows]).abs().max())
                    )
                    scaled = x.grad.reshape(-1, HIDDEN) / weight  # this microbatch's own loss
                    in_err = max(in_err, float((scaled - ref["input_grads"][m][rows]).abs().max()))
            finalize_model_grads([model])
            routes_check = check_capture(
                capture, [layout] * len(mine), [src_routes[m] for m in mine]
            )
            grad_err = compare_to_full(model, ref["grads"])
            results[name] = dict(
                drift_rerouted=ref["rerouted"],
                reference_routes=ref["routes_check"],
                record_ok=record_ok,
                gathered=len(gathered),
                routes=routes_check,
                out_err=out_err,
                in_err=in_err,
                grad_err=max(grad_err.values()),
                worst_grad=max(grad_err, key=grad_err.get),
                grad_scale=gradient_scale(ref["grads"]),
                local_tokens=layout.token_index.numel(),
                shard_tokens=[s.shape[0] for s in shards],
            )
            # Share the canonical routes this layout recorded with every rank (test plumbing).
            if not thd and recorded_elsewhere is None:
                everyone = [None] * dist.get_world_size()
                dist.all_gather_object(everyone, gathered)
                recorded_elsewhere = {}
                for part in everyone:
                    recorded_elsewhere.update(part)
    return results


@pytest.fixture(scope="module")
def moe_layouts():
    return run_distributed(_rank_moe_layouts, 4)


@pytest.mark.parametrize("layout", sorted(MOE_LAYOUTS))
def test_moe_layer_replay_matches_single_rank(moe_layouts, layout):
    for rank, result in enumerate(moe_layouts):
        r = result[layout]
        assert r["drift_rerouted"] > 0  # the live router no longer picks the recorded experts
        assert r["reference_routes"]["mismatched_rows"] == 0, r["reference_routes"]
        assert r["routes"]["calls"] >= 1 and r["routes"]["mismatched_rows"] == 0, (rank, r)
        assert r["out_err"] <= TOL, (rank, r)
        assert r["in_err"] <= TOL, (rank, r)
        assert r["grad_err"] <= TOL * r["grad_scale"], (rank, r)
        # Each rank received only its own tokens (never the whole microbatch).
        assert r["shard_tokens"] and all(t == r["local_tokens"] for t in r["shard_tokens"]), r


@pytest.mark.parametrize("layout", sorted(MOE_LAYOUTS))
def test_routes_recorded_on_a_layout_gather_to_the_single_rank_record(moe_layouts, layout):
    gathered = sum(result[layout]["gathered"] for result in moe_layouts)
    assert gathered == NUM_MB  # one canonical batch per microbatch, on the group's first rank
    for rank, result in enumerate(moe_layouts):
        assert result[layout]["record_ok"], (rank, layout)
