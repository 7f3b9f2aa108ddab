# Route replay in a tiny PR2 GPTModel under Megatron's schedules, against a single-process
# reference: TP2 + SP x EP2 (no pipelining, DP2), TP2 + SP x PP2 x EP2 with the 1F1B schedule,
# the same with full activation recompute, and TP2 + SP x PP2 x VPP2 x EP2 (interleaved).
# Plus: corrupted route shards (wrong token count, missing MoE layer; handed directly or through
# scatter_routes; TP2 + SP, PP2, TP2 x PP2) must raise a route error on every rank (never hang).
#
# Model: 4 layers, the first dense (moe_layer_freq [0, 1, 1, 1]: MoE-layer ids differ from layer
# numbers), hidden 32, 8 experts top-2, sequences of 16 tokens, micro-batch size 2, 4
# microbatches (canonical token t = b * 16 + s, routes [32, 3, 2] per microbatch).
# The reference records (forward-only schedule), drifts every router weight (a simulated policy
# update, so a replay that re-routed would pick other experts), then replays with the
# no-pipelining schedule. Each layout loads the reference weights slice by slice (par_util),
# records (gathered to canonical and compared with the reference record), drifts identically,
# receives its shards with scatter_routes (only its SP tokens and its stage's MoE layers) and
# replays through get_forward_backward_func() with Megatron DDP + finalize_model_grads.
# Checked: experts of every (token, layer) on every rank == canonical (routing_map captured by
# router hooks, including the recompute forwards); per-microbatch losses within 1e-5; gradients
# within 1e-5 x the largest reference gradient; full recompute bit-identical to no recompute.
# Routes recorded on TP2 x PP2 are replayed on the recompute and interleaved layouts and on a
# single rank (record on one layout, replay on another).

import pytest
import torch
from harness import init_megatron_parallel, run_distributed
from par_util import MOE_LAYER_FREQ, tiny_gpt_config

VOCAB, SEQ, MBS, NUM_MB = 64, 16, 2, 4
NUM_MOE_LAYERS = sum(MOE_LAYER_FREQ)
TOL = 1e-5

# name -> (parallel sizes, extra TransformerConfig fields, where its replayed routes come from)
GPT_LAYOUTS = {
    "tp2sp_ep2": (dict(tp=2, ep=2, etp=1), {}, "reference"),
    "tp2sp_pp2_ep2": (dict(tp=2, pp=2, ep=2, etp=1), {}, "reference"),
    "tp2sp_pp2_ep2_full_recompute": (
        dict(tp=2, pp=2, ep=2, etp=1),
        dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
        "tp2sp_pp2_ep2",
    ),
    # With PP = 2 the interleaved schedule's batched p2p (batch_p2p_comm, the config default)
    # sends activations and gradients to the same peer in one batch and they can cross; Megatron-LM
    # runs VPP with overlap_p2p_comm=True, batch_p2p_comm=False, which orders them per rank parity.
    "tp2sp_pp2_vpp2_ep2": (
        dict(tp=2, pp=2, vpp=2, ep=2, etp=1),
        dict(overlap_p2p_comm=True, batch_p2p_comm=False),
        "tp2sp_pp2_ep2",
    ),
}


def _data():
    from par_util import gpt_microbatches

    return gpt_microbatches(NUM_MB, MBS, SEQ, VOCAB, seed=21)


def _reference():
    """Single process: record routes, drift, replay 4 microbatches: losses and gradients."""
    from par_util import (
        build_pr2_gpt,
        capture_routes,
        check_capture,
        drift_routers,
        full_tensors,
        run_schedule,
    )

    from megatron_pr2 import routing
    from megatron_pr2.routes import TokenLayout

    data = _data()
    torch.manual_seed(3)
    model = build_pr2_gpt(tiny_gpt_config(), VOCAB, SEQ)
    weights = full_tensors(model)
    with routing(model, "record") as handle:
        run_schedule(model, data, SEQ, MBS, forward_only=True)
    routes = handle.routes_per_microbatch
    drift_routers(model)
    # The drift really moves the live routing, so a replay that re-routed would be caught.
    with routing(model, "record") as live:
        run_schedule(model, data, SEQ, MBS, forward_only=True)
    rerouted = sum(
        int((a.indices != b.indices).any(-1).sum())
        for a, b in zip(live.routes_per_microbatch, routes)
    )
    with capture_routes(model) as capture, routing(model, "replay", routes=routes):
        losses = run_schedule(model, data, SEQ, MBS, forward_only=False)
    return dict(
        # The single-rank replay itself routes every (token, layer) to the recorded experts.
        routes_check=check_capture(capture, [TokenLayout.full(SEQ, MBS)] * NUM_MB, routes),
        weights=weights,
        routes=routes,
        losses=losses,
        grads=full_tensors(model, "grad"),
        rerouted=rerouted,
    )


def _layer_ids(config, vpp):
    from megatron.core import parallel_state as ps

    from megatron_pr2.parallel import moe_layer_ids

    pp_rank, pp = ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size()
    if vpp is None:
        return moe_layer_ids(config, pp_rank, pp)
    return torch.cat([moe_layer_ids(config, pp_rank, pp, vp, vpp) for vp in range(vpp)])


def _run_layout(name, ref, sources):
    """One GPT layout: record + gather, drift, scatter + replay; returns the checks' numbers."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads
    from par_util import (
        build_pr2_gpt,
        capture_routes,
        check_capture,
        compare_to_full,
        drift_routers,
        load_full,
        run_schedule,
        wrap_ddp,
    )

    from megatron_pr2 import routing
    from megatron_pr2.parallel import gather_routes, layout_for_rank, scatter_routes

    sizes, extra, source = GPT_LAYOUTS[name]
    data = _data()
    with init_megatron_parallel(**sizes):
        vpp = sizes.get("vpp")
        config = tiny_gpt_config(virtual_pipeline_model_parallel_size=vpp, **extra)
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        group = ps.get_model_parallel_group()  # TP x PP: the ranks sharing one microbatch
        layout = layout_for_rank(
            MBS,
            SEQ,
            tp_rank=ps.get_tensor_model_parallel_rank(),
            tp_size=sizes["tp"],
            sequence_parallel=True,
        )
        layer_ids = _layer_ids(config, vpp)
        torch.manual_seed(1000 + dist.get_rank())  # weights come from the reference only
        model = wrap_ddp(config, build_pr2_gpt(config, VOCAB, SEQ, vpp=vpp))
        load_full(model, ref["weights"])
        mine = [m for m in range(NUM_MB) if m % dp == dp_rank]
        my_data = [data[m] for m in mine]

        with routing(model, "record", layout=layout) as handle:
            run_schedule(model, my_data, SEQ, MBS, forward_only=True)
        recorded = handle.routes_per_microbatch
        gathered = {m: gather_routes(r, group=group, dst=0) for m, r in zip(mine, recorded)}
        gathered = {m: r for m, r in gathered.items() if r is not None}
        record_ok = all(
            torch.equal(r.indices, ref["routes"][m].indices) for m, r in gathered.items()
        )

        drift_routers(model)
        src = ref["routes"] if source == "reference" else sources[source]
        first = dist.get_rank(group) == 0
        shards = [scatter_routes(src[m] if first else None, layout, layer_ids, group) for m in mine]
        for chunk in model:
            chunk.zero_grad_buffer()
        with capture_routes(model) as capture, routing(model, "replay", routes=shards):
            losses = run_schedule(model, my_data, SEQ, MBS, forward_only=False)
        finalize_model_grads(model)
        canonical = [src[m] for m in mine]
        forward_check = check_capture(capture, [layout] * len(mine), canonical)
        recompute_check = None
        if extra.get("recompute_granularity") == "full":
            recompute_check = check_capture(capture, [layout] * len(mine), canonical, True)
        ref_losses = [ref["losses"][m] for m in mine] if losses else []
        grad_err = compare_to_full(model, ref["grads"])

        # Share what this layout recorded / computed with every rank (test plumbing).
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, gathered)
        canonical_recorded = {}
        for part in everyone:
            canonical_recorded.update(part)
        return (
            dict(
                drift_rerouted=ref["rerouted"],
                reference_routes=ref["routes_check"],
                record_ok=record_ok,
                gathered=len(gathered),
                routes=forward_check,
                recompute_routes=recompute_check,
                loss_err=max([abs(a - b) for a, b in zip(losses, ref_losses)], default=0.0),
                num_losses=len(losses),
                grad_err=max(grad_err.values()),
                worst_grad=max(grad_err, key=grad_err.get),
                shard_shapes=[tuple(s.shape) for s in shards],
                layer_ids=layer_ids.tolist(),
                local_tokens=layout.token_index.numel(),
            ),
            canonical_recorded,
            dict(losses=losses, grads=full_tensors_of_shards(model)),
        )


def full_tensors_of_shards(model):
    """Per-parameter gradient clones of a sharded model, by parameter name (exact comparisons)."""
    from par_util import param_grad, unwrap

    out = {}
    for i, chunk in enumerate(model):
        for name, param in unwrap(chunk).named_parameters():
            out[f"{i}.{name}"] = param_grad(param).detach().clone()
    return out


def _rank_gpt_layouts():
    from par_util import cpu_patches

    cpu_patches()  # before the first megatron-core import of this rank
    from par_util import build_pr2_gpt, capture_routes, check_capture, drift_routers, load_full

    from megatron_pr2 import routing
    from megatron_pr2.routes import TokenLayout

    with init_megatron_parallel():
        ref = _reference()
    results, sources, outputs = {}, {}, {}
    for name in GPT_LAYOUTS:
        results[name], sources[name], outputs[name] = _run_layout(name, ref, sources)

    # Full recompute must be bit-identical to the same layout without recompute.
    plain, recomputed = outputs["tp2sp_pp2_ep2"], outputs["tp2sp_pp2_ep2_full_recompute"]
    results["recompute_exact"] = plain["losses"] == recomputed["losses"] and all(
        torch.equal(plain["grads"][k], recomputed["grads"][k]) for k in plain["grads"]
    )

    # Routes recorded on TP2 x PP2, replayed on a single rank: the same experts everywhere.
    with init_megatron_parallel():
        torch.manual_seed(3)
        model = build_pr2_gpt(tiny_gpt_config(), VOCAB, SEQ)
        load_full(model, ref["weights"])
        drift_routers(model)
        routes = [sources["tp2sp_pp2_ep2"][m] for m in range(NUM_MB)]
        from par_util import run_schedule

        with capture_routes(model) as capture, routing(model, "replay", routes=routes):
            run_schedule(model, _data(), SEQ, MBS, forward_only=True)
        results["single_rank_from_pp2"] = check_capture(
            capture, [TokenLayout.full(SEQ, MBS)] * NUM_MB, routes
        )
    return results


@pytest.fixture(scope="module")
def gpt_layouts():
    return run_distributed(_rank_gpt_layouts, 4)


@pytest.mark.parametrize("layout", sorted(GPT_LAYOUTS))
def test_gpt_replay_matches_single_rank(gpt_layouts, layout):
    for rank, result in enumerate(gpt_layouts):
        r = result[layout]
        assert r["drift_rerouted"] > 0  # the live router no longer picks the recorded experts
        assert r["reference_routes"] == {"calls": NUM_MOE_LAYERS * NUM_MB, "mismatched_rows": 0}
        assert r["routes"]["calls"] >= 1 and r["routes"]["mismatched_rows"] == 0, (rank, r)
        assert r["loss_err"] <= TOL, (rank, r)
        assert r["grad_err"] <= TOL, (rank, r)
        # Only this rank's SP tokens and this stage's MoE layers were sent to it.
        assert all(s[:2] == (r["local_tokens"], len(r["layer_ids"])) for s in r["shard_shapes"]), r
    assert sum(result[layout]["num_losses"] for result in gpt_layouts) > 0


@pytest.mark.parametrize("layout", sorted(GPT_LAYOUTS))
def test_gpt_routes_recorded_in_parallel_gather_to_the_single_rank_record(gpt_layouts, layout):
    assert sum(result[layout]["gathered"] for result in gpt_layouts) == NUM_MB
    for rank, result in enumerate(gpt_layouts):
        assert result[layout]["record_ok"], (rank, layout)


def test_full_recompute_replay_is_exact(gpt_layouts):
    for rank, result in enumerate(gpt_layouts):
        recompute = result["tp2sp_pp2_ep2_full_recompute"]["recompute_routes"]
        # Every MoE layer of the stage was recomputed once per microbatch, with the same route.
        assert recompute["calls"] == result["tp2sp_pp2_ep2_full_recompute"]["routes"]["calls"]
        assert recompute["mismatched_rows"] == 0, (rank, recompute)
        assert result["recompute_exact"], rank


def test_routes_recorded_on_pp2_replay_on_a_single_rank(gpt_layouts):
    for rank, result in enumerate(gpt_layouts):
        check = result["single_rank_from_pp2"]
        assert check["calls"] == NUM_MOE_LAYERS * NUM_MB and check["mismatched_rows"] == 0, rank


# ---------------------------------------------------------------------------------------------
# Corrupted route shards: every rank must raise a route error (never hang)
# ---------------------------------------------------------------------------------------------
# On NCCL a rank that raises while its peers sit in a collective (TP all-gather, EP all-to-all,
# PP send/recv) leaves them hanging until the watchdog fires. On gloo the peers see "Connection
# closed by peer" once the failing process exits, which would hide the hang: so the check is
# that EVERY rank's own error is a route error (ValueError naming the route problem), i.e. no
# rank got as far as a collective with a peer that had already given up.
CORRUPTIONS = {
    # name -> (launch, parallel sizes, how shards arrive, what is wrong, routing(group=WORLD))
    # Every case is caught by routing()'s entry agreement over the groups of the model; the
    # group= override is exercised by the PP cases.
    # One TP rank is handed a shard for 2 fewer tokens than its routers route; its TP peer
    # would wait in the dispatcher.
    "shard_wrong_token_count_tp2sp": ("stage", dict(tp=2), "direct", "tokens", False),
    # A pipeline stage is handed a shard for 2 fewer tokens / without one of its MoE layers:
    # the other stage would wait on pipeline send/recv.
    "shard_wrong_token_count_pp2": ("entry", dict(pp=2), "direct", "tokens", True),
    "shard_missing_layer_pp2": ("entry", dict(pp=2), "direct", "layers", True),
    # Canonical routes on the scatter source lack MoE layer 2 (held by stage 1 only): stage 1's
    # requests fail on the source, stage 0's TP peer of the source gets a valid shard.
    "scatter_missing_layer_tp2_pp2": ("scatter", dict(tp=2, pp=2), "scatter", "layers", False),
    # TP2 without sequence parallelism x DP2: one TP rank replays different (valid) routes than
    # its TP peer; the agreement's digest comparison catches it, and the other DP replica must
    # raise too instead of waiting in the expert-parallel dispatcher.
    "tp_peers_differ_tp2_dp2": ("digest", dict(tp=2, dp=2), "direct", "tp_differ", False),
}


def _world(name):
    sizes = CORRUPTIONS[name][1]
    return sizes.get("tp", 1) * sizes.get("pp", 1) * sizes.get("dp", 1)


def _random_routes(seed):
    """A valid canonical route [MBS * SEQ, 3, 2]: distinct experts per (token, layer)."""
    from megatron_pr2 import RouteBatch

    gen = torch.Generator().manual_seed(seed)
    rows = MBS * SEQ * NUM_MOE_LAYERS
    indices = torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(rows)])
    return RouteBatch(indices.view(MBS * SEQ, NUM_MOE_LAYERS, 2), 8)


def _run_corrupted(name):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from par_util import build_pr2_gpt, run_schedule

    from megatron_pr2 import RouteBatch, routing
    from megatron_pr2.parallel import layout_for_rank, scatter_routes, shard_routes
    from megatron_pr2.routes import TokenLayout

    _, sizes, path, kind, agree_on_entry = CORRUPTIONS[name]
    with init_megatron_parallel(**{k: v for k, v in sizes.items() if k != "dp"}):
        tp = sizes.get("tp", 1)
        sequence_parallel = tp > 1 and kind != "tp_differ"
        config = tiny_gpt_config(sequence_parallel=sequence_parallel)
        model = build_pr2_gpt(config, VOCAB, SEQ)
        layout = layout_for_rank(
            MBS,
            SEQ,
            tp_rank=ps.get_tensor_model_parallel_rank(),
            tp_size=tp,
            sequence_parallel=sequence_parallel,
        )
        layer_ids = _layer_ids(config, None)
        canonical = [_random_routes(m) for m in range(NUM_MB)]
        bad = dist.get_rank() == dist.get_world_size() - 1
        if path == "scatter":
            group = ps.get_model_parallel_group()
            first = dist.get_rank(group) == 0
            broken = [RouteBatch(c.indices[:, :2], 8) for c in canonical]  # MoE layers 0, 1 only
            shards = [
                scatter_routes(b if first else None, layout, layer_ids, group) for b in broken
            ]
        else:
            shards = [shard_routes(c, layout, layer_ids) for c in canonical]
            if bad and kind == "tokens":
                short = TokenLayout(layout.token_index[:-2], layout.num_tokens, layout.seq_length)
                shards = [shard_routes(c, short, layer_ids) for c in canonical]
            if bad and kind == "layers":
                shards = [shard_routes(c, layout, layer_ids[:-1]) for c in canonical]
            if bad and kind == "tp_differ":
                shards = [
                    shard_routes(_random_routes(100 + m), layout, layer_ids) for m in range(NUM_MB)
                ]
        # The override of the agreement's groups (without it they come from the model).
        group = {"group": dist.group.WORLD} if agree_on_entry else {}
        rollout = kind == "tp_differ"  # Megatron refuses MoE + TP without SP in training
        if rollout:
            for chunk in model:
                chunk.eval()
        with routing(model, "replay", routes=shards, layout=layout, **group):
            run_schedule(model, _data(), SEQ, MBS, forward_only=rollout)


def _rank_corrupted(names):
    """Run the corruption cases in order; a route ValueError is expected and recorded. Any other
    error ends the rank (its peers then fail with transport errors, which the test reports)."""
    from par_util import cpu_patches

    cpu_patches()  # before the first megatron-core import of this rank
    out = {}
    for name in names:
        try:
            _run_corrupted(name)
            out[name] = "no error"
        except ValueError as error:
            out[name] = f"ValueError: {error}"
            if "route" not in str(error).lower():
                raise
    return out


@pytest.fixture(scope="module")
def corrupted_runs():
    """launch -> results of its one launch (a failed launch loses the results of all its
    cases), run when a test first asks for it: each test's time limit covers one launch."""
    from harness import DistributedTestError

    runs = {}

    def get(launch):
        if launch not in runs:
            names = [name for name, c in CORRUPTIONS.items() if c[0] == launch]
            try:
                runs[launch] = run_distributed(_rank_corrupted, _world(names[0]), names)
            except DistributedTestError as error:
                runs[launch] = str(error)  # a rank died or hung: reported by each test
        return runs[launch]

    return get


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corrupted_shard_raises_a_route_error_on_every_rank(corrupted_runs, name):
    results = corrupted_runs(CORRUPTIONS[name][0])
    assert not isinstance(results, str), results
    for rank, result in enumerate(results):
        message = result[name]
        assert message.startswith("ValueError") and "route" in message.lower(), (rank, message)
