# Single-rank semantics of the PR2 router against Megatron-Core's own TopKRouter and RouterReplay.
#
# Every comparison against Megatron is bit-exact (torch.equal): PR2 mirrors Megatron's routing
# step for step, so any deviation is a bug. Drift is simulated by moving router weights between
# the record pass and the replay pass, so a replay that silently re-routes would be caught.

import copy
import re

import pytest
import torch
from harness import build_moe_layer, make_moe_config, moe_layer_spec
from single_rank import single_rank

ROUTER_VARIANTS = {
    "softmax": dict(),
    "pre_softmax_scaled": dict(moe_router_pre_softmax=True, moe_router_topk_scaling_factor=2.0),
    "sigmoid_expert_bias": dict(
        moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True
    ),
    "group_limited": dict(moe_router_num_groups=4, moe_router_group_topk=2),
    "aux_and_z_loss": dict(
        moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.01, moe_z_loss_coeff=1e-3
    ),
}


@pytest.fixture(scope="module")
def pg():
    with single_rank() as pg_collection:
        yield pg_collection


def _pr2_spec(config, **pr2_kwargs):
    from harness import pr2_moe_submodules

    from megatron_pr2 import PR2Config

    return pr2_moe_submodules(config, PR2Config(**pr2_kwargs))


def _stock_submodules(config):
    from megatron_pr2.compat import moe_submodules_of

    return moe_submodules_of(moe_layer_spec(config))


def _layers(pg, config, **pr2_kwargs):
    """A stock MoELayer and a PR2 MoELayer holding identical weights."""
    torch.manual_seed(0)
    stock = build_moe_layer(config, _stock_submodules(config), pg_collection=pg)
    pr2 = build_moe_layer(config, _pr2_spec(config, **pr2_kwargs), pg_collection=pg)
    missing, unexpected = pr2.load_state_dict(stock.state_dict(), strict=False)
    assert not unexpected and all("predictor" in k for k in missing), (missing, unexpected)
    return stock, pr2


def _run(layer, x, grad_seed=7):
    """Forward + backward; returns output, input grad and param grads (predictor excluded)."""
    x = x.detach().clone().requires_grad_(True)
    out, _ = layer(x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed))
    out.backward(g)
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    grads = {n: v for n, v in grads.items() if "predictor" not in n}
    layer.zero_grad(set_to_none=True)
    return out.detach(), x.grad, grads


def _assert_same(a, b):
    out_a, xg_a, g_a = a
    out_b, xg_b, g_b = b
    assert torch.equal(out_a, out_b)
    assert torch.equal(xg_a, xg_b)
    assert g_a.keys() == g_b.keys()
    for name in g_a:
        assert torch.equal(g_a[name], g_b[name]), name


def _drift(*layers, scale=0.5, seed=3):
    """Move every router weight by the same random update (simulated policy update)."""
    delta = None
    for layer in layers:
        if delta is None:
            gen = torch.Generator().manual_seed(seed)
            delta = torch.randn(layer.router.weight.shape, generator=gen) * scale
        with torch.no_grad():
            layer.router.weight.add_(delta * layer.router.weight.std())


def _tokens(config, seq=16, batch=2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(seq, batch, config.hidden_size, generator=gen)


@pytest.mark.parametrize("variant", sorted(ROUTER_VARIANTS))
def test_off_is_bit_identical_to_stock(pg, variant):
    from megatron_pr2 import routing

    config = make_moe_config(**ROUTER_VARIANTS[variant])
    stock, pr2 = _layers(pg, config)
    x = _tokens(config)
    reference = _run(stock, x)
    _assert_same(reference, _run(pr2, x))  # no context at all
    with routing(pr2, "off"):
        _assert_same(reference, _run(pr2, x))
    _run(stock, x)  # both routers have now counted two passes
    if config.moe_router_enable_expert_bias:
        assert torch.equal(stock.router.local_tokens_per_expert, pr2.router.local_tokens_per_expert)


@pytest.mark.parametrize("variant", sorted(ROUTER_VARIANTS))
def test_record_replay_is_bit_identical_to_megatron_router_replay(pg, variant):
    from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

    from megatron_pr2 import routing

    config = make_moe_config(**ROUTER_VARIANTS[variant])
    replay_config = copy.deepcopy(config)
    replay_config.moe_enable_routing_replay = True
    RouterReplay.clear_global_router_replay_instances()
    _, pr2 = _layers(pg, config)
    torch.manual_seed(0)
    megatron = build_moe_layer(replay_config, _stock_submodules(replay_config), pg_collection=pg)
    megatron.load_state_dict({k: v for k, v in pr2.state_dict().items() if "predictor" not in k})
    x = _tokens(config)
    try:
        RouterReplay.set_global_router_replay_action(RouterReplayAction.RECORD)
        megatron_record = _run(megatron, x)
        megatron_routes = RouterReplay.get_recorded_data()[0]
        with routing(pr2, "record") as handle:
            pr2_record = _run(pr2, x)
        _assert_same(megatron_record, pr2_record)
        # Canonical rows are batch-major; Megatron's router rows are [s, b] sequence-major.
        seq, batch = x.shape[:2]
        recorded = (
            handle.routes.indices[:, 0]
            .view(batch, seq, -1)
            .transpose(0, 1)
            .reshape(seq * batch, -1)
        )
        assert torch.equal(recorded, megatron_routes)

        _drift(megatron, pr2)
        RouterReplay.set_replay_data([megatron_routes])
        RouterReplay.set_global_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
        megatron_replay = _run(megatron, x)
        with routing(pr2, "replay", routes=handle.routes):
            pr2_replay = _run(pr2, x)
        _assert_same(megatron_replay, pr2_replay)
        # The drift really moved the live routing, so the replay was not a no-op.
        RouterReplay.clear_global_router_replay_action()
        assert not torch.equal(_run(megatron, x)[0], megatron_replay[0])
    finally:
        RouterReplay.clear_global_router_replay_action()
        RouterReplay.clear_global_router_replay_instances()


def test_predict_record_with_zero_predictor_equals_record_and_n1_pr2_equals_r2(pg):
    """N = 1 mini-step: the predictor never trains, so PR2 and R2 stay bit-identical."""
    from megatron_pr2 import predictor_param_groups, routing

    config = make_moe_config(moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.01)
    _, r2 = _layers(pg, config)
    _, pr2 = _layers(pg, config)
    pr2.load_state_dict(r2.state_dict())
    opt_r2 = torch.optim.SGD(predictor_param_groups(r2, 0.05, alpha=100.0), lr=0.05)
    opt_pr2 = torch.optim.SGD(predictor_param_groups(pr2, 0.05, alpha=100.0), lr=0.05)
    for step in range(3):
        x = _tokens(config, seed=10 + step)
        with torch.no_grad(), routing(r2, "record") as rec_r2:
            r2(x)
        with torch.no_grad(), routing(pr2, "predict_record") as rec_pr2:
            pr2(x)
        assert torch.equal(rec_r2.routes.indices, rec_pr2.routes.indices)
        assert rec_pr2.routes.cache is not None and rec_r2.routes.cache is None
        for model, routes, opt in ((r2, rec_r2.routes, opt_r2), (pr2, rec_pr2.routes, opt_pr2)):
            with routing(model, "replay", routes=routes, ministep=1):
                out, _ = model(x)
                out.pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    for (name, a), (_, b) in zip(r2.named_parameters(), pr2.named_parameters()):
        assert torch.equal(a, b), name
    assert torch.count_nonzero(pr2.router.predictor.weight) == 0


def test_replay_under_selective_moe_recompute_is_exact(pg):
    from megatron_pr2 import routing

    config = make_moe_config()
    recompute_config = make_moe_config(recompute_granularity="selective", recompute_modules=["moe"])
    _, plain = _layers(pg, config)
    torch.manual_seed(0)
    recomputed = build_moe_layer(recompute_config, _pr2_spec(recompute_config), pg_collection=pg)
    recomputed.load_state_dict(plain.state_dict())
    assert recomputed.moe_layer_recompute
    x = _tokens(config)
    with torch.no_grad(), routing(plain, "record") as handle:
        plain(x)
    _drift(plain, recomputed)
    with routing(plain, "replay", routes=handle.routes):
        reference = _run(plain, x)
    with routing(recomputed, "replay", routes=handle.routes) as replay:
        _assert_same(reference, _run(recomputed, x))
    state = next(iter(replay._session.states.values()))
    assert (state.forward_calls, state.recompute_calls) == (1, 1)
    # Without replay the drifted router routes differently: the check above can fail.
    assert not torch.equal(_run(plain, x)[0], reference[0])


def test_record_under_selective_moe_recompute_reapplies_the_record(pg):
    """A record pass with gradients under MoE recompute: the recompute re-applies the recorded
    top-k (brought back from the host copy), so outputs, gradients and records equal a record
    pass without recompute."""
    from megatron_pr2 import routing

    config = make_moe_config()
    recompute_config = make_moe_config(recompute_granularity="selective", recompute_modules=["moe"])
    _, plain = _layers(pg, config)
    torch.manual_seed(0)
    recomputed = build_moe_layer(recompute_config, _pr2_spec(recompute_config), pg_collection=pg)
    recomputed.load_state_dict(plain.state_dict())
    x = _tokens(config)
    results, routes = [], []
    for layer in (plain, recomputed):
        with routing(layer, "record") as handle:
            results.append(_run(layer, x))
        routes.append(handle.routes)
    _assert_same(*results)
    assert torch.equal(routes[0].indices, routes[1].indices)


def test_microbatch_binding_across_interleaved_recompute(pg):
    """Two microbatches, forwards before backwards (1F1B warm-up): each recompute gets its own route."""
    from megatron_pr2 import routing

    config = make_moe_config(recompute_granularity="selective", recompute_modules=["moe"])
    torch.manual_seed(0)
    layer = build_moe_layer(config, _pr2_spec(config), pg_collection=pg)
    xs = [_tokens(config, seed=s) for s in (21, 22)]
    with torch.no_grad(), routing(layer, "record") as handle:
        for x in xs:
            layer(x)
    routes = handle.routes_per_microbatch
    _drift(layer)
    references = []
    for x, route in zip(xs, routes):
        with routing(layer, "replay", routes=route):
            references.append(_run(layer, x))
    with routing(layer, "replay", routes=routes):
        inputs = [x.clone().requires_grad_(True) for x in xs]
        outs = [layer(x)[0] for x in inputs]
        grads_seen = []
        for i, out in enumerate(outs):
            out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(7)))
            grads_seen.append(inputs[i].grad)
    for i in range(2):
        assert torch.equal(outs[i].detach(), references[i][0])
        assert torch.equal(grads_seen[i], references[i][1])


def test_capacity_drops_of_the_record_pass_are_replayed(pg):
    from megatron_pr2 import routing

    for pad in (False, True):
        config = make_moe_config(
            moe_expert_capacity_factor=1.0,
            moe_pad_expert_input_to_capacity=pad,
            moe_token_dispatcher_type="alltoall",
        )
        _, layer = _layers(pg, config)
        maps = []
        hook = layer.router.register_forward_hook(lambda m, i, o: maps.append(o[1].clone()))
        x = _tokens(config, seq=32)
        with torch.no_grad(), routing(layer, "record") as handle:
            layer(x)
        dropped = handle.routes.dropped
        assert dropped is not None and bool(dropped.any()), "capacity 1.0 should drop tokens"
        _drift(layer, scale=2.0)
        with routing(layer, "replay", routes=handle.routes):
            _run(layer, x)
        hook.remove()
        recorded_map, replayed_map = maps
        if pad:
            # The routed-and-kept slots are identical; padding fills capacity with zero prob.
            seq, batch = x.shape[:2]
            idx = (
                handle.routes.indices[:, 0]
                .view(batch, seq, -1)
                .transpose(0, 1)
                .reshape(seq * batch, -1)
            )
            kept = (
                ~handle.routes.dropped[:, 0]
                .view(batch, seq, -1)
                .transpose(0, 1)
                .reshape(seq * batch, -1)
            )
            assert torch.equal(
                recorded_map.gather(1, idx) & kept, replayed_map.gather(1, idx) & kept
            )
            assert torch.equal(replayed_map.sum(0), recorded_map.sum(0))
        else:
            assert torch.equal(recorded_map, replayed_map)


@pytest.mark.parametrize("variant", sorted(ROUTER_VARIANTS))
def test_replayed_experts_are_the_recorded_ones_in_every_mode(pg, variant):
    from megatron_pr2 import PR2Config, routing

    config = make_moe_config(**ROUTER_VARIANTS[variant])
    _, layer = _layers(pg, config)
    with torch.no_grad():
        layer.router.predictor.weight.normal_(0, 0.5)  # a predictor that changes the route
    maps = []
    layer.router.register_forward_hook(lambda m, i, o: maps.append(o[1].clone()))
    x = _tokens(config)
    for mode in ("record", "predict_record"):
        maps.clear()
        with torch.no_grad(), routing(layer, mode) as handle:
            layer(x)
        _drift(layer, seed=11)
        with routing(layer, "replay", routes=handle.routes, ministep=2):
            _run(layer, x)
        assert torch.equal(maps[0], maps[1]), mode
    assert isinstance(layer.router.pr2_config, PR2Config)


def test_malformed_routes_raise(pg):
    from megatron_pr2 import RouteBatch, routing

    config = make_moe_config()
    _, layer = _layers(pg, config)
    x = _tokens(config)
    with torch.no_grad(), routing(layer, "record") as handle:
        layer(x)
    good = handle.routes.indices
    E = config.num_moe_experts

    def replay(routes, n_forward=1):
        with torch.no_grad(), routing(layer, "replay", routes=routes):
            for _ in range(n_forward):
                layer(x)

    with pytest.raises(ValueError, match="tokens"):
        replay(RouteBatch(good[:-2], E))
    with pytest.raises(ValueError, match="MoE layers"):
        replay(RouteBatch(good[:, :0], E))
    with pytest.raises(ValueError, match="k=1"):
        replay(RouteBatch(good[..., :1], E))
    with pytest.raises(ValueError, match="out of range"):
        RouteBatch(good + E, E)
    duplicate = good.clone()
    duplicate[3, 0, 1] = duplicate[3, 0, 0]
    with pytest.raises(ValueError, match="duplicate expert"):
        replay(RouteBatch(duplicate, E))
    with pytest.raises(RuntimeError, match="unconsumed"):
        replay([handle.routes, handle.routes], n_forward=1)
    with pytest.raises(RuntimeError, match="routes for 1 microbatches"):
        replay(handle.routes, n_forward=2)
    missing = good.clone()
    missing[5] = -1
    with pytest.raises(ValueError, match="no route"):
        replay(RouteBatch(missing, E))
    with pytest.raises(ValueError, match="mode="):
        with routing(layer, "bogus"):
            pass
    with pytest.raises(ValueError, match="needs routes"):
        with routing(layer, "replay"):
            pass


def test_missing_route_fallback_uses_live_router(pg):
    from megatron_pr2 import RouteBatch, routing

    config = make_moe_config()
    _, layer = _layers(pg, config, missing_route_policy="fallback")
    x = _tokens(config)
    with torch.no_grad(), routing(layer, "record") as handle:
        layer(x)
    _drift(layer)
    maps = []
    layer.router.register_forward_hook(lambda m, i, o: maps.append(o[1].clone()))
    with torch.no_grad():
        layer(x)  # live routing (no context)
    missing = handle.routes.indices.clone()
    missing[:4] = -1  # canonical tokens 0..3 = sequence 0, positions 0..3 = router rows 0,2,4,6
    with torch.no_grad(), routing(
        layer, "replay", routes=RouteBatch(missing, config.num_moe_experts)
    ):
        layer(x)
    live_map, replay_map = maps
    batch = x.shape[1]
    fallback_rows = torch.arange(4) * batch
    assert torch.equal(replay_map[fallback_rows], live_map[fallback_rows])


def test_fused_router_routes_unfused_in_pr2_modes_and_fused_when_off(pg, caplog):
    """moe_router_fusion=True (the DeepSeek-V3 recipe): record / predict_record / replay take
    Megatron's unfused top-k (bit-identical to an unfused router), stated in a log line; 'off'
    stays TE's fused kernel (absent on this CPU build, hence Megatron's own error)."""
    import logging

    from megatron_pr2 import router as pr2_router
    from megatron_pr2 import routing

    variant = ROUTER_VARIANTS["sigmoid_expert_bias"]
    config = make_moe_config(**variant)
    _, unfused = _layers(pg, config)
    fused_config = make_moe_config(moe_router_fusion=True, **variant)
    pr2_router._log_unfused_once.cache_clear()  # logged once per process
    with caplog.at_level(logging.INFO, logger="megatron_pr2.router"):
        torch.manual_seed(0)
        fused = build_moe_layer(fused_config, _pr2_spec(fused_config), pg_collection=pg)
    assert any("unfused top-k" in r.getMessage() for r in caplog.records), caplog.records
    fused.load_state_dict(unfused.state_dict())
    assert fused.router.config.moe_router_fusion  # the model's config is untouched
    x = _tokens(config)
    routes = {}
    for name, layer in (("unfused", unfused), ("fused", fused)):
        with torch.no_grad(), routing(layer, "record") as handle:
            layer(x)
        routes[name] = handle.routes
    assert torch.equal(routes["unfused"].indices, routes["fused"].indices)
    _drift(unfused, fused)
    results = []
    for layer in (unfused, fused):
        with routing(layer, "replay", routes=routes["unfused"], ministep=2):
            results.append(_run(layer, x))
    _assert_same(*results)
    if not getattr(
        __import__("megatron.core.transformer.moe.moe_utils", fromlist=["x"]),
        "fused_topk_with_score_function",
        None,
    ):
        with pytest.raises(ValueError, match="fused_topk_with_score_function"):
            with routing(fused, "off"):
                fused(x)


def test_force_biased_router_is_refused(pg):
    # megatron-core 0.19 adds config.moe_router_force_biased (a random logit bias applied in
    # TopKRouter.forward, which PR2's record/replay path does not run): refused, not skipped.
    config = make_moe_config()
    config.moe_router_force_biased = 0.5  # a field only from 0.19 on: set it on either version
    with pytest.raises(ValueError, match="moe_router_force_biased"):
        build_moe_layer(config, _pr2_spec(config), pg_collection=pg)


def test_kl_post_loss_matches_design_formula(pg):
    """L = mean over cached tokens of KL(softmax(p_live) || softmax(p_old + h_old W_p))."""
    from megatron_pr2 import routing

    config = make_moe_config()
    _, layer = _layers(pg, config, cache_tokens_per_sequence=4)
    x = _tokens(config)
    with torch.no_grad(), routing(layer, "predict_record") as handle:
        layer(x)
    cache = handle.routes.cache
    assert cache.token_index.numel() == 4 * x.shape[1]  # 4 per sequence, both sequences
    _drift(layer)
    with torch.no_grad():
        layer.router.predictor.weight.normal_(0, 0.1)
    with routing(layer, "replay", routes=handle.routes, ministep=2) as replay:
        out, _ = layer(x)
        out.sum().backward()
    # Independent computation in float64 from the cached tensors and a fresh live gating.
    seq, batch = x.shape[:2]
    s, b = cache.token_index % seq, cache.token_index // seq
    h_old = cache.hidden[:, 0].double()
    p_old = cache.logits[:, 0].double()
    w_p = layer.router.predictor.weight.detach().double()
    p_live = x[s, b].double() @ layer.router.weight.detach().double().t()
    log_target = torch.log_softmax(p_live, -1)
    log_pred = torch.log_softmax(p_old + h_old @ w_p.t(), -1)
    expected = (log_target.exp() * (log_target - log_pred)).sum(-1).mean()
    measured = replay.metrics["predictor_loss"][0]
    assert abs(float(measured) - float(expected)) < 1e-6
    assert layer.router.predictor.weight.grad.abs().sum() > 0


def test_predictor_learns_synthetic_drift(pg):
    """A known low-rank router drift: the trained predictor beats R2's stale top-k clearly."""
    from megatron_pr2 import routing

    config = make_moe_config(hidden_size=64, num_moe_experts=16, moe_router_topk=4)
    _, layer = _layers(pg, config, cache_tokens_per_sequence=-1)
    router = layer.router
    gen = torch.Generator().manual_seed(5)
    w0 = router.weight.detach().clone()
    # Rank-2 drift of the router weights per policy update, the same direction every rollout.
    delta = (torch.randn(16, 2, generator=gen) @ torch.randn(2, 64, generator=gen)) * 0.02
    opt = torch.optim.Adam(router.predictor.parameters(), lr=0.02)

    def rollout(seed):
        x = torch.randn(32, 4, 64, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            router.weight.copy_(w0)
        with torch.no_grad(), routing(router, "predict_record") as handle:
            router(x)
        with torch.no_grad():
            router.weight.copy_(w0 + delta)  # the router after the next policy update
        return x, handle.routes

    for step in range(60):
        x, routes = rollout(100 + step)
        with routing(router, "replay", routes=routes, ministep=2):
            probs, _ = router(x)
            probs.sum().mul(0).backward()  # only the attached predictor loss has gradient
        opt.step()
        opt.zero_grad()
    x, routes = rollout(999)
    with torch.no_grad(), routing(router, "replay", routes=routes, ministep=2) as handle:
        router(x)
    metrics = handle.metrics
    r2 = float(metrics["r2_topk_accuracy"][0])
    predictive = float(metrics["predictive_topk_accuracy"][0])
    assert predictive > r2 + 0.1, (predictive, r2)
    assert r2 < 0.95  # the drift is real


def test_lookahead_predictor_extrapolates_the_last_router_drift(pg):
    """predictor="lookahead": zero offset until the router weight changes, then W_p = scale x
    the change between predict_record passes; no parameters, no gradient, buffers resume."""
    from megatron_pr2 import routing

    config = make_moe_config(hidden_size=64, num_moe_experts=16, moe_router_topk=4)
    _, layer = _layers(pg, config, predictor="lookahead", lookahead_scale=1.0)
    router = layer.router
    assert not list(router.predictor.parameters()) and not router.predictor_trainable
    gen = torch.Generator().manual_seed(5)
    w0 = router.weight.detach().clone()
    # The same rank-2 drift every policy update (optimizer momentum makes real drift alike).
    delta = (torch.randn(16, 2, generator=gen) @ torch.randn(2, 64, generator=gen)) * 0.02
    x = torch.randn(32, 4, 64, generator=gen)

    def predict_record():
        with torch.no_grad(), routing(router, "predict_record") as handle:
            router(x)
        return handle.routes

    def plain_record():
        with torch.no_grad(), routing(router, "record") as handle:
            router(x)
        return handle.routes.indices

    # First pass: nothing observed yet, so PR2 routes exactly like R2.
    assert torch.equal(predict_record().indices, plain_record())
    assert torch.equal(router.predictor.weight, torch.zeros_like(w0))
    with torch.no_grad():
        router.weight.add_(delta)
    routes = predict_record()
    torch.testing.assert_close(router.predictor.weight, delta, rtol=0, atol=1e-6)
    # A second pass without an optimizer step in between keeps the prediction.
    assert torch.equal(predict_record().indices, routes.indices)
    torch.testing.assert_close(router.predictor.weight, delta, rtol=0, atol=1e-6)

    # The next update repeats the drift: the predicted routes are the next router's top-k.
    with torch.no_grad():
        router.weight.add_(delta)
    xr = x.detach().clone().requires_grad_(True)
    with routing(router, "replay", routes=routes, ministep=2) as handle:
        probs, _ = router(xr)
        probs.sum().backward()
    assert xr.grad is not None and router.weight.grad is not None
    metrics = handle.metrics
    assert float(metrics["predictive_topk_accuracy"][0]) > 0.99
    assert float(metrics["r2_topk_accuracy"][0]) < 0.95
    assert float(metrics["route_topk_accuracy"][0]) > 0.99
    assert abs(float(metrics["predictor_loss"][0])) < 1e-6  # KL(live || predicted) ~ 0

    # The buffers are state: a fresh router loading them predicts the same routes.
    state = {k: v.clone() for k, v in layer.state_dict().items() if isinstance(v, torch.Tensor)}
    assert {"router.predictor.weight", "router.predictor.anchor"} <= set(state)
    _, other = _layers(pg, config, predictor="lookahead", lookahead_scale=1.0)
    other.load_state_dict(state, strict=False)
    with torch.no_grad(), routing(other.router, "predict_record") as again:
        other.router(x)
    assert torch.equal(again.routes.indices, predict_record().indices)
    assert torch.equal(other.router.predictor.weight, router.predictor.weight)


def test_telemetry_stride_samples_every_sequence(pg):
    """telemetry_stride=4 estimates the replay accuracy from a quarter of the rows; with a
    micro-batch of 4 a plain every-4th-row stride would see sequence 0 only (rows s * B + b)."""
    from megatron_pr2 import RouteBatch, routing
    from megatron_pr2.telemetry import telemetry_rows

    config = make_moe_config(hidden_size=32, num_moe_experts=8, moe_router_topk=2)
    seq, batch = 64, 4
    x = torch.randn(seq, batch, 32, generator=torch.Generator().manual_seed(3))
    accuracy = {}
    for stride in (1, 4):
        _, layer = _layers(pg, config, telemetry_stride=stride)
        router = layer.router
        with torch.no_grad():
            logits = router.gating(x).reshape(seq, batch, -1)
        # Canonical order b * S + s: sequence 0 replays its live top-k, the others the two
        # lowest-scored experts (disjoint from the live top-2): true accuracy is exactly 1/4.
        live = logits.topk(2, dim=-1).indices.transpose(0, 1)  # [B, S, k]
        worst = (-logits).topk(2, dim=-1).indices.transpose(0, 1)
        indices = torch.cat([live[:1], worst[1:]]).reshape(batch * seq, 1, 2)
        with torch.no_grad(), routing(router, "replay", RouteBatch(indices, 8)) as handle:
            router(x)
        accuracy[stride] = float(handle.metrics["route_topk_accuracy"][0])
    assert accuracy[1] == 0.25
    assert abs(accuracy[4] - 0.25) < 0.15 and accuracy[4] != 1.0, accuracy
    rows = telemetry_rows(seq * batch, 4, torch.device("cpu"))
    assert rows.numel() == seq * batch // 4 and set((rows % batch).tolist()) == {0, 1, 2, 3}
    assert telemetry_rows(seq * batch, 1, torch.device("cpu")) is None
    with pytest.raises(ValueError, match="telemetry_stride"):
        _layers(pg, config, telemetry_stride=0)


def test_routing_refuses_models_without_pr2_routers(pg):
    from megatron_pr2 import routing

    config = make_moe_config()
    stock = build_moe_layer(config, _stock_submodules(config), pg_collection=pg)
    with pytest.raises(ValueError, match="apply_pr2"):
        with routing(stock, "record"):
            pass


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mode="replays"), "routing mode='replays'"),
        (dict(mode="replay", ministep=True), "routing ministep=True"),
        (dict(mode="replay", ministep=0), "routing ministep=0"),
        (dict(mode="record", dispatch_plan=True), "dispatch_plan=True needs mode='replay'"),
        (dict(mode="replay"), "needs routes"),
    ],
)
def test_routing_rejects_bad_arguments(pg, kwargs, message):
    from megatron_pr2 import routing

    _, pr2 = _layers(pg, make_moe_config())
    with pytest.raises(ValueError, match=re.escape(message)):
        with routing(pr2, **kwargs):
            pass
