# routing(model, "replay", routes[, dispatch_plan=None|True|False]): the ahead-of-time alltoall
# dispatch plan (on by default in replay wherever it applies).
#
# One 4-rank gloo launch (tests/harness.py) runs, per layout (EP2 x TP2 = ETP2 with sequence
# parallelism, and EP4), a stack of NUM_LAYERS PR2 MoE layers over NUM_MB microbatches three
# times: replay without the plan (False), with it (the default), and without it again. Routes are skewed random top-k
# sets that differ per data-parallel rank (and the TP ranks route different token shards), so the
# split sizes differ per rank and per layer. Checked:
#   * outputs, input gradients and every parameter gradient are bit-identical (torch.equal) with
#     and without the plan (and the flag-off run after a plan context equals the first);
#   * count exchanges (the dispatcher's gather_from_sequence_parallel_region over tp_ep, wrapped
#     in the token_dispatcher module namespace, and the plan's int32 all_to_all_single over tp_ep):
#     NUM_LAYERS x NUM_MB per context without the plan (x2 with MoE recompute), exactly 1 with it;
#   * inside the context each dispatcher carries the hook and no sync point; after the context
#     (also after an error in the block) preprocess is the class's again and the sync points are
#     what they were;
#   * scenarios: dropless, capacity factor with recorded drops, MoE-layer activation recompute
#     (all forwards, then all backwards), FP8 routing-map padding, and a capacity factor without
#     recorded drops (live drop decisions: every (microbatch, layer) falls back to the stock
#     preprocess, still identical);
#   * unsupported configurations raise ValueError naming dispatch_plan when it is requested
#     (True) and leave nothing behind; by default they run the stock path.

import pytest
import torch
from harness import init_megatron_parallel, make_moe_config, run_distributed

HIDDEN, FFN, EXPERTS, TOPK = 32, 32, 8, 2
SEQ, MBS, NUM_MB, NUM_LAYERS = 8, 2, 3, 2
LAYOUTS = {
    "ep2_tp2sp": dict(tp=2, ep=2, etp=2),
    "ep4": dict(ep=4),
}
# scenario -> (config overrides, routes carry recorded drops, MoE recompute, config fields set
# after construction)
SCENARIOS = {
    "dropless": (dict(), False, False, {}),
    "capacity": (dict(moe_expert_capacity_factor=1.0), True, False, {}),
    "recompute": (
        dict(recompute_granularity="selective", recompute_modules=["moe"]),
        False,
        True,
        {},
    ),
    "capacity_live_drops": (dict(moe_expert_capacity_factor=1.0), False, False, {}),
    # FP8 routing-map padding (pad_routing_map to multiples of 16, fp8 "hybrid"): needs TE to
    # construct with fp8, so set afterwards (the local experts run in fp32 either way); the
    # dispatcher pads, the plan rounds its counts alike.
    "fp8_padding": (
        dict(),
        False,
        False,
        dict(fp8="hybrid", moe_router_padding_for_quantization=True),
    ),
}


def _config(**overrides):
    return make_moe_config(
        num_layers=NUM_LAYERS,
        hidden_size=HIDDEN,
        ffn_hidden_size=FFN,
        moe_ffn_hidden_size=FFN,
        num_moe_experts=EXPERTS,
        moe_router_topk=TOPK,
        **overrides,
    )


def _stack(config):
    """NUM_LAYERS PR2 MoE layers with MoE-layer ids 0..NUM_LAYERS-1."""
    from harness import build_pr2_moe_layer

    from megatron_pr2 import PR2Config

    layers = torch.nn.ModuleList()
    for number in range(1, NUM_LAYERS + 1):
        layer = build_pr2_moe_layer(config, PR2Config(telemetry=False))
        layer.set_layer_number(number)
        layers.append(layer)
    return layers


def _routes(seed, with_drops):
    """Canonical routes of NUM_MB microbatches: skewed distinct top-k, optional drop masks."""
    from megatron_pr2 import RouteBatch

    gen = torch.Generator().manual_seed(seed)
    tokens = SEQ * MBS
    weights = torch.linspace(1.0, 6.0, EXPERTS) ** 2  # uneven expert loads
    out = []
    for _ in range(NUM_MB):
        picks = torch.multinomial(weights.expand(tokens * NUM_LAYERS, EXPERTS), TOPK, generator=gen)
        indices = picks.view(tokens, NUM_LAYERS, TOPK)
        dropped = torch.rand(indices.shape, generator=gen) < 0.3 if with_drops else None
        out.append(RouteBatch(indices, EXPERTS, dropped=dropped))
    return out


def _run(layers, routes, layout, xs, gs, plan, counter, recompute):
    """Replay NUM_MB microbatches; returns outputs, input grads, param grads, context probes."""
    from par_util import to_local

    from megatron_pr2 import routing

    for p in layers.parameters():
        p.grad = None
    dispatchers = [layer.token_dispatcher for layer in layers]
    counter["n"] = 0
    outs, inputs, probe = [], [], {}
    with routing(layers, "replay", routes, layout=layout, dispatch_plan=plan):
        probe["exchanges_at_entry"] = counter["n"]
        for m in range(NUM_MB):
            x = to_local(xs[m], layout, MBS).clone().requires_grad_(True)
            h = x
            for layer in layers:
                h, _ = layer(h)
            outs.append(h)
            inputs.append(x)
            if not recompute:  # forward-backward per microbatch
                (h.reshape(-1, HIDDEN) * gs[m][layout.token_index]).sum().backward()
        if recompute:  # all forwards first: backward recomputes microbatch 0 after 2's forward
            for m in range(NUM_MB):
                (outs[m].reshape(-1, HIDDEN) * gs[m][layout.token_index]).sum().backward()
        probe["hooked"] = ["preprocess" in d.__dict__ for d in dispatchers]
        probe["sync_points"] = [(d.cuda_sync_point, d.cuda_dtoh_point) for d in dispatchers]
    probe["exchanges"] = counter["n"]
    return dict(
        outs=[o.detach().clone() for o in outs],
        input_grads=[x.grad.clone() for x in inputs],
        grads={n: p.grad.clone() for n, p in layers.named_parameters() if p.grad is not None},
        probe=probe,
    )


def _same(a, b):
    return (
        all(torch.equal(x, y) for x, y in zip(a["outs"], b["outs"]))
        and all(torch.equal(x, y) for x, y in zip(a["input_grads"], b["input_grads"]))
        and a["grads"].keys() == b["grads"].keys()
        and all(torch.equal(a["grads"][n], b["grads"][n]) for n in a["grads"])
    )


def _points(dispatcher):
    return dispatcher.cuda_sync_point, dispatcher.cuda_dtoh_point


def _is_stock(dispatcher):
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    return (
        "preprocess" not in dispatcher.__dict__
        and dispatcher.preprocess.__func__ is MoEAlltoAllTokenDispatcher.preprocess
    )


def _unsupported(layout, routes):
    """Each unsupported configuration: (raised ValueError naming dispatch_plan, nothing left)."""
    from megatron.core.transformer.moe.token_dispatcher import MoEFlexTokenDispatcher

    from megatron_pr2 import routing

    def attempt(layers, mode="replay", replay_routes=routes):
        # The default (dispatch_plan=None) falls back to the stock path without a word.
        default_is_stock = True
        if mode == "replay":
            try:  # leave by an exception: no forward runs, so the unconsumed-route check is moot
                with routing(layers, mode, replay_routes, layout=layout):
                    default_is_stock = not any(
                        "preprocess" in layer.token_dispatcher.__dict__ for layer in layers
                    )
                    raise StopIteration
            except StopIteration:
                pass
        try:
            with routing(layers, mode, replay_routes, layout=layout, dispatch_plan=True):
                pass
        except ValueError as exc:
            clean = all(
                "preprocess" not in layer.token_dispatcher.__dict__ and layer.router.session is None
                for layer in layers
            )
            return "dispatch_plan" in str(exc), clean and default_is_stock, str(exc)
        return False, False, "no error"

    out = {}
    out["allgather"] = attempt(_stack(_config(moe_token_dispatcher_type="allgather")))
    out["drop_and_pad"] = attempt(
        _stack(_config(moe_expert_capacity_factor=1.0, moe_pad_expert_input_to_capacity=True))
    )
    layers = _stack(_config())
    config = layers[0].config
    flex = layers[0].token_dispatcher
    stock_class = flex.__class__
    # DeepEP is not installed here: the refusal only looks at the dispatcher's class.
    flex.__class__ = type("FlexForTest", (MoEFlexTokenDispatcher,), {})
    out["flex"] = attempt(layers)
    flex.__class__ = stock_class
    config.cuda_graph_impl = "local"
    out["cuda_graph_preprocess"] = attempt(layers)
    config.cuda_graph_impl = "none"
    out["record_mode"] = attempt(layers, mode="record", replay_routes=None)
    return out


def _rank_main():
    from par_util import cpu_patches

    cpu_patches()  # before the first megatron-core import of this rank
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe import token_dispatcher as td_module

    from megatron_pr2 import routing
    from megatron_pr2.parallel import layout_for_rank

    results = {}
    for name, sizes in LAYOUTS.items():
        with init_megatron_parallel(**sizes):
            tp = sizes.get("tp", 1)
            layout = layout_for_rank(
                MBS,
                SEQ,
                tp_rank=ps.get_tensor_model_parallel_rank(),
                tp_size=tp,
                sequence_parallel=tp > 1,
            )
            dp_rank = ps.get_data_parallel_rank()
            gen = torch.Generator().manual_seed(100 + dp_rank)
            xs = [torch.randn(SEQ * MBS, HIDDEN, generator=gen) for _ in range(NUM_MB)]
            gs = [torch.randn(SEQ * MBS, HIDDEN, generator=gen) for _ in range(NUM_MB)]
            for scenario, (overrides, drops, recompute, post) in SCENARIOS.items():
                torch.manual_seed(7)
                layers = _stack(_config(**overrides))
                for field, value in post.items():
                    setattr(layers[0].config, field, value)  # one config object for all layers
                routes = _routes(1000 + dp_rank, drops)
                tp_ep = layers[0].token_dispatcher.tp_ep_group
                counter = {"n": 0}
                original = td_module.gather_from_sequence_parallel_region
                original_a2a = torch.distributed.all_to_all_single

                def counting(input_, *args, original=original, counter=counter, tp_ep=tp_ep, **kw):
                    if kw.get("group") is tp_ep:
                        counter["n"] += 1
                    return original(input_, *args, **kw)

                def counting_a2a(out, inp, *args, original=original_a2a, counter=counter, **kw):
                    # The plan's count exchange (int32 counts; tokens travel as floats).
                    if kw.get("group") is tp_ep and inp.dtype == torch.int32:
                        counter["n"] += 1
                    return original(out, inp, *args, **kw)

                td_module.gather_from_sequence_parallel_region = counting
                torch.distributed.all_to_all_single = counting_a2a
                try:
                    runs = {}
                    runs["off"] = _run(layers, routes, layout, xs, gs, False, counter, recompute)
                    points_before = [_points(layer.token_dispatcher) for layer in layers]
                    # The default (None) plans wherever it applies, as True does.
                    runs["plan"] = _run(layers, routes, layout, xs, gs, None, counter, recompute)
                    points_after = [_points(layer.token_dispatcher) for layer in layers]
                    runs["off_again"] = _run(
                        layers, routes, layout, xs, gs, False, counter, recompute
                    )
                finally:
                    td_module.gather_from_sequence_parallel_region = original
                    torch.distributed.all_to_all_single = original_a2a
                # An error inside the block still removes the hook.
                error_clean = False
                try:
                    with routing(layers, "replay", routes, layout=layout, dispatch_plan=True):
                        raise KeyError("boom")
                except KeyError:
                    error_clean = all(
                        _is_stock(layer.token_dispatcher) and layer.router.session is None
                        for layer in layers
                    )
                results[(name, scenario)] = dict(
                    plan_equal=_same(runs["off"], runs["plan"]),
                    off_again_equal=_same(runs["off"], runs["off_again"]),
                    probes={k: v["probe"] for k, v in runs.items()},
                    stock_after=all(_is_stock(layer.token_dispatcher) for layer in layers),
                    sync_points_restored=points_before == points_after,
                    error_clean=error_clean,
                    num_grads=len(runs["plan"]["grads"]),
                    local_tokens=int(layout.token_index.numel()),
                )
            if name == "ep4":
                results["unsupported"] = _unsupported(layout, _routes(5, False))
    return results


@pytest.fixture(scope="module")
def plan_results():
    return run_distributed(_rank_main, 4)


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_plan_is_bit_identical_to_stock_dispatch(plan_results, layout, scenario):
    for rank, results in enumerate(plan_results):
        r = results[(layout, scenario)]
        assert r["num_grads"] > 0, (rank, r)
        assert r["plan_equal"], (rank, layout, scenario)
        assert r["off_again_equal"], (rank, layout, scenario)
    if layout == "ep2_tp2sp":  # the TP ranks routed different halves of every microbatch
        assert plan_results[0][(layout, scenario)]["local_tokens"] == SEQ * MBS // 2


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_one_count_exchange_per_context(plan_results, layout, scenario):
    _, _, recompute, _ = SCENARIOS[scenario]
    per_context = NUM_LAYERS * NUM_MB * (2 if recompute else 1)
    for rank, results in enumerate(plan_results):
        probes = results[(layout, scenario)]["probes"]
        assert probes["off"]["exchanges"] == per_context, (rank, probes)
        assert probes["off_again"]["exchanges"] == per_context, (rank, probes)
        assert probes["plan"]["exchanges_at_entry"] == 1, (rank, probes)
        if scenario == "capacity_live_drops":
            # Live drop decisions cannot be planned: every layer falls back to the stock gather.
            assert probes["plan"]["exchanges"] == 1 + per_context, (rank, probes)
        else:
            assert probes["plan"]["exchanges"] == 1, (rank, probes)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_hook_only_inside_the_context(plan_results, layout):
    for rank, results in enumerate(plan_results):
        for scenario in ("dropless", "capacity", "recompute"):
            r = results[(layout, scenario)]
            plan, off = r["probes"]["plan"], r["probes"]["off"]
            assert all(plan["hooked"]) and not any(off["hooked"]), (rank, scenario, r)
            # Planned calls neither copy to the host nor synchronise.
            assert all(p == ("no_sync", "no_sync") for p in plan["sync_points"]), (rank, plan)
            assert all(p[0] != "no_sync" for p in off["sync_points"]), (rank, off)
            assert r["stock_after"] and r["sync_points_restored"], (rank, scenario, r)
            assert r["error_clean"], (rank, scenario)


@pytest.mark.parametrize(
    "case",
    [
        "allgather",
        "drop_and_pad",
        "flex",
        "cuda_graph_preprocess",
        "record_mode",
    ],
)
def test_unsupported_configs_raise_only_when_requested(plan_results, case):
    for rank, results in enumerate(plan_results):
        names_flag, clean, message = results["unsupported"][case]
        assert names_flag, (rank, case, message)
        assert clean, (rank, case, message)
        if case == "flex":
            assert "DeepEP" in message and "preprocess" in message, message
