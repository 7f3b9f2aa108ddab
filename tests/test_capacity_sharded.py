# Capacity drops (moe_expert_capacity_factor) replayed under sharded tokens, with and without
# moe_pad_expert_input_to_capacity, against a single-process reference (4 gloo ranks).
#
# Layouts of one MoE layer (8 experts, top-2, capacity factor 1.0; sbhd microbatches of 16 x 2
# tokens): TP2 + SP x EP2 (DP2), CP2 x EP2 (DP2), TP2 + SP x CP2 x EP2. Per layout and padding:
#   1. record on the layout: every rank decides drops on its own tokens, as Megatron does; the
#      shards are gathered to canonical routes (indices + drop masks);
#   2. the reference (one process, no padding) replays those canonical routes: outputs, input
#      and parameter gradients;
#   3. the layout replays its own record: outputs within 1e-6 of the reference, the kept experts
#      of every (token, layer) exactly the recorded ones (probs != 0 where kept, 0 elsewhere;
#      with padding every expert column of routing_map is filled to the dispatcher's capacity),
#      parameter gradients within 1e-6 x the largest reference gradient;
#   4. routes recorded without sharding (the reference's own record, capacity from all 32
#      tokens) replayed on the layout: exact without padding; with padding a rank's rows keep
#      more tokens for some expert than the capacity of its own rows (checked independently
#      here), so routing() refuses on every rank naming moe_pad_expert_input_to_capacity.
# The single-process reproduction of the issue (replay on a 12-token subset) is refused too.

import pytest
import torch
from harness import init_megatron_parallel, make_moe_config, run_distributed

HIDDEN, FFN, EXPERTS, TOPK, FACTOR = 32, 64, 8, 2, 1.0
SEQ, MBS, NUM_MB = 16, 2, 2
TOL = 1e-6

LAYOUTS = {
    "tp2sp_ep2": dict(tp=2, ep=2, etp=1),
    "cp2_ep2": dict(cp=2, ep=2, etp=1),
    "tp2sp_cp2_ep2": dict(tp=2, cp=2, ep=2, etp=1),
}


def _config(pad):
    return make_moe_config(
        hidden_size=HIDDEN,
        ffn_hidden_size=FFN,
        moe_ffn_hidden_size=FFN,
        num_moe_experts=EXPERTS,
        moe_router_topk=TOPK,
        moe_expert_capacity_factor=FACTOR,
        moe_pad_expert_input_to_capacity=pad,
    )


def _layer(config):
    from harness import build_pr2_moe_layer

    from megatron_pr2 import PR2Config

    return build_pr2_moe_layer(config, PR2Config(telemetry=False))


def _data():
    gen = torch.Generator().manual_seed(29)
    xs = [torch.randn(SEQ * MBS, HIDDEN, generator=gen) for _ in range(NUM_MB)]
    gs = [torch.randn(SEQ * MBS, HIDDEN, generator=gen) for _ in range(NUM_MB)]
    return xs, gs


class _Capture:
    """(probs, routing_map) of every router call, in call order."""

    def __init__(self, module):
        from megatron_pr2 import pr2_routers

        self.calls = []
        (router,) = pr2_routers(module)
        self._handle = router.register_forward_hook(
            lambda m, i, out: self.calls.append((out[0].detach().clone(), out[1].clone()))
        )

    def remove(self):
        self._handle.remove()


def _kept_mismatches(probs, routing_map, routes, token_index, pad):
    """Rows whose kept experts (probs != 0) differ from the recorded kept set of their canonical
    token, plus a routing_map that does not hold them (or, padded, is not filled to capacity)."""
    from megatron.core.transformer.moe.moe_utils import get_capacity

    indices = routes.indices[token_index, 0]
    kept = ~routes.dropped[token_index, 0]
    expected = torch.zeros(token_index.numel(), EXPERTS, dtype=torch.bool)
    expected.scatter_(1, indices, kept)
    bad = ((probs != 0) != expected).any(dim=1) | (expected & ~routing_map).any(dim=1)
    if pad:
        capacity = get_capacity(token_index.numel() * TOPK, EXPERTS, FACTOR)
        if not bool((routing_map.sum(dim=0) == capacity).all()):
            return token_index.numel()
    return int(bad.sum())


def _over_capacity(routes, token_index):
    """Most kept tokens of one expert among `token_index`, and the capacity of those rows."""
    from megatron.core.transformer.moe.moe_utils import get_capacity

    indices = routes.indices[token_index, 0]
    kept = ~routes.dropped[token_index, 0]
    counts = torch.bincount(indices[kept], minlength=EXPERTS)
    return int(counts.max()), get_capacity(token_index.numel() * TOPK, EXPERTS, FACTOR)


def _reference(weights, routes, xs, gs):
    """One process, no padding: replay canonical `routes`; outputs, input grads, grads."""
    from par_util import full_tensors, load_full, to_canonical

    from megatron_pr2 import routing

    layer = _layer(_config(False))
    load_full(layer, weights)
    outs, input_grads = [], []
    with routing(layer, "replay", routes=routes):
        for x, g in zip(xs, gs):
            x_sbh = x.view(MBS, SEQ, HIDDEN).transpose(0, 1).contiguous().requires_grad_(True)
            out, _ = layer(x_sbh)
            (to_canonical(out) * g).sum().div(NUM_MB).backward()
            outs.append(to_canonical(out).detach())
            input_grads.append(to_canonical(x_sbh.grad) * NUM_MB)
    return dict(outs=outs, input_grads=input_grads, grads=full_tensors(layer, "grad"))


def _sharded_replay(pad, weights, routes, ref, xs, gs):
    """Replay canonical `routes` on the current layout; errors and route checks vs `ref`."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from par_util import compare_to_full, gradient_scale, load_full, to_local

    from megatron_pr2 import local_layout, routing, shard_routes

    config = _config(pad)
    torch.manual_seed(1000 + dist.get_rank())  # weights come from the reference only
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True)
    model = DistributedDataParallel(config, ddp_config, _layer(config))
    load_full(model, weights)
    layout = local_layout(model, MBS, SEQ)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    cp = ps.get_context_parallel_world_size()
    mine = [m for m in range(NUM_MB) if m % dp == dp_rank]
    shards = [shard_routes(routes[m], layout, [0]) for m in mine]
    model.zero_grad_buffer()
    capture = _Capture(model)
    out_err = in_err = 0.0
    try:
        with routing(model, "replay", routes=shards):
            for m in mine:
                x = to_local(xs[m], layout, MBS).clone().requires_grad_(True)
                out, _ = model(x)
                weight = dp * cp / NUM_MB
                rows = layout.token_index
                (out.reshape(-1, HIDDEN) * gs[m][rows]).sum().mul(weight).backward()
                out_err = max(
                    out_err,
                    float((out.detach().reshape(-1, HIDDEN) - ref["outs"][m][rows]).abs().max()),
                )
                scaled = x.grad.reshape(-1, HIDDEN) / weight
                in_err = max(in_err, float((scaled - ref["input_grads"][m][rows]).abs().max()))
    except ValueError as error:
        return dict(error=f"{type(error).__name__}: {error}")
    finally:
        capture.remove()
    finalize_model_grads([model])
    mismatched = sum(
        _kept_mismatches(probs, routing_map, routes[m], layout.token_index, pad)
        for (probs, routing_map), m in zip(capture.calls, mine)
    )
    grad_err = compare_to_full(model, ref["grads"])
    return dict(
        error=None,
        calls=len(capture.calls),
        mismatched_rows=mismatched,
        out_err=out_err,
        in_err=in_err,
        grad_err=max(grad_err.values()),
        grad_scale=gradient_scale(ref["grads"]),
        over_capacity=[_over_capacity(routes[m], layout.token_index) for m in mine],
        # the record dropped slots on these rows, and padding added zero-probability tokens
        dropped=sum(int(routes[m].dropped[layout.token_index].sum()) for m in mine),
        padded=sum(int(rmap.sum()) - int((probs != 0).sum()) for probs, rmap in capture.calls),
    )


def _record_on_layout(pad, weights, xs):
    """Record on the current layout; canonical routes of every microbatch on every rank."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from par_util import load_full, to_local

    from megatron_pr2 import gather_routes, local_layout, routing

    layer = _layer(_config(pad))
    load_full(layer, weights)
    layout = local_layout(layer, MBS, SEQ)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    group = ps.get_tensor_and_context_parallel_group()
    gathered = {}
    for m in range(NUM_MB):
        if m % dp != dp_rank:
            continue
        with torch.no_grad(), routing(layer, "record", layout=layout) as handle:
            layer(to_local(xs[m], layout, MBS))
        canonical = gather_routes(handle.routes, group=group, dst=0)
        if canonical is not None:
            gathered[m] = canonical
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, gathered)
    return [next(part[m] for part in everyone if m in part) for m in range(NUM_MB)]


def _rank_capacity():
    from par_util import cpu_patches

    cpu_patches()  # before the first megatron-core import of this rank
    from par_util import full_tensors, load_full

    from megatron_pr2 import RouteBatch, routing

    xs, gs = _data()
    with init_megatron_parallel():
        torch.manual_seed(3)
        weights = full_tensors(_layer(_config(False)))
        unsharded = {}
        for pad in (False, True):
            layer = _layer(_config(pad))
            load_full(layer, weights)
            routes = []
            for x in xs:
                with torch.no_grad(), routing(layer, "record") as handle:
                    layer(x.view(MBS, SEQ, HIDDEN).transpose(0, 1).contiguous())
                routes.append(handle.routes)
            unsharded[pad] = routes
    recorded = {}
    for name, sizes in LAYOUTS.items():
        with init_megatron_parallel(**sizes):
            for pad in (False, True):
                recorded[(name, pad)] = _record_on_layout(pad, weights, xs)
    with init_megatron_parallel():
        refs = {key: _reference(weights, routes, xs, gs) for key, routes in recorded.items()}
        for pad in (False, True):
            refs[("unsharded", pad)] = _reference(weights, unsharded[pad], xs, gs)
        # The single-process reproduction: a 12-token subset of a 32-token record.
        layer = _layer(_config(True))
        subset = torch.arange(12)
        full = unsharded[True][0]
        part = RouteBatch(
            full.indices[subset], EXPERTS, dropped=full.dropped[subset], seq_length=12
        )
        try:
            with routing(layer, "replay", routes=part):
                pass
            subset_refused = "no error"
        except ValueError as error:
            subset_refused = str(error)
        subset_over = _over_capacity(full, subset)
    results = {"subset_refused": subset_refused, "subset_over": subset_over}
    for name, sizes in LAYOUTS.items():
        with init_megatron_parallel(**sizes):
            for pad in (False, True):
                own = _sharded_replay(
                    pad, weights, recorded[(name, pad)], refs[(name, pad)], xs, gs
                )
                other = _sharded_replay(
                    pad, weights, unsharded[pad], refs[("unsharded", pad)], xs, gs
                )
                results[(name, pad)] = dict(own=own, unsharded=other)
    return results


@pytest.fixture(scope="module")
def capacity_runs():
    return run_distributed(_rank_capacity, 4)


@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_capacity_drops_recorded_on_a_layout_replay_exactly(capacity_runs, layout, pad):
    for rank, result in enumerate(capacity_runs):
        r = result[(layout, pad)]["own"]
        assert r["error"] is None, (rank, r)
        assert r["calls"] >= 1 and r["mismatched_rows"] == 0, (rank, r)
        assert r["out_err"] <= TOL and r["in_err"] <= TOL, (rank, r)
        assert r["grad_err"] <= TOL * r["grad_scale"], (rank, r)
        # Each rank's kept set fits its own capacity (the record decided drops on these rows).
        assert all(kept <= capacity for kept, capacity in r["over_capacity"]), (rank, r)
        assert (r["padded"] > 0) == pad, (rank, r)
    assert sum(result[(layout, pad)]["own"]["dropped"] for result in capacity_runs) > 0


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_unsharded_record_replays_exactly_without_padding(capacity_runs, layout):
    for rank, result in enumerate(capacity_runs):
        r = result[(layout, False)]["unsharded"]
        assert r["error"] is None, (rank, r)
        assert r["mismatched_rows"] == 0, (rank, r)
        assert r["out_err"] <= TOL and r["in_err"] <= TOL, (rank, r)
        assert r["grad_err"] <= TOL * r["grad_scale"], (rank, r)
    assert sum(result[(layout, False)]["unsharded"]["dropped"] for result in capacity_runs) > 0


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_unsharded_record_with_padding_is_refused_on_every_rank(capacity_runs, layout):
    # Independent check that exactness is impossible here: some rank's rows keep more tokens for
    # one expert than the capacity the dispatcher pads those rows to.
    unpadded = [result[(layout, False)]["unsharded"] for result in capacity_runs]
    assert any(kept > capacity for r in unpadded for kept, capacity in r["over_capacity"])
    for rank, result in enumerate(capacity_runs):
        error = result[(layout, True)]["unsharded"]["error"]
        assert error is not None and error.startswith("RouteError"), (rank, error)
        assert "moe_pad_expert_input_to_capacity" in error, (rank, error)


def test_replay_on_a_token_subset_with_padding_is_refused(capacity_runs):
    kept, capacity = capacity_runs[0]["subset_over"]
    assert kept > capacity  # the 12-token subset cannot hold the 32-token record's kept set
    assert "moe_pad_expert_input_to_capacity" in capacity_runs[0]["subset_refused"]
