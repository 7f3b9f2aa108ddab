# How the PR2 predictor is trained: which tokens feed it (the cache never holds padding or
# post-EOS tokens), that it does not move on mini-steps without a predictor loss (AdamW momentum
# and weight decay frozen), what the predictive top-k accuracy measures, and the sigmoid-router
# loss. Single rank, in-process, seconds.

import pytest
import torch
from harness import build_pr2_moe_layer, make_moe_config
from single_rank import single_rank


@pytest.fixture(scope="module")
def pg():
    with single_rank() as pg_collection:
        yield pg_collection


def _pr2_layer(pg, config, **pr2_kwargs):
    from megatron_pr2 import PR2Config

    torch.manual_seed(0)
    return build_pr2_moe_layer(config, PR2Config(**pr2_kwargs), pg_collection=pg)


def _tokens(config, seq=8, batch=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(seq, batch, config.hidden_size, generator=gen)


# -- the cache keeps only eligible tokens -------------------------------------------------------
def test_cache_rows_stride_over_eligible_tokens():
    from megatron_pr2.records import cache_rows
    from megatron_pr2.routes import TokenLayout

    layout = TokenLayout.full(6, 2)  # router row s * 2 + b holds canonical token b * 6 + s
    eligible = torch.tensor(
        [[0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 0, 0]], dtype=torch.bool
    )  # sequence 0: positions 1-4, sequence 1: positions 2-3
    rows = cache_rows(layout, -1, eligible)
    cached = layout.token_index[rows]
    assert sorted(cached.tolist()) == [1, 2, 3, 4, 8, 9]
    # 2 per sequence: sequence 0 strides 2 over its 4 eligible tokens, sequence 1 keeps both.
    cached = layout.token_index[cache_rows(layout, 2, eligible)]
    assert sorted(cached.tolist()) == [1, 3, 8, 9]
    assert cache_rows(layout, 0, eligible).numel() == 0
    # Without a mask: every sequence position at a fixed stride (padding included).
    assert cache_rows(layout, -1).numel() == 12
    with pytest.raises(ValueError, match="cache_mask of shape"):
        cache_rows(layout, -1, eligible[:, :5])


def test_predict_record_caches_only_masked_tokens(pg):
    from megatron_pr2 import routing

    config = make_moe_config()
    layer = _pr2_layer(pg, config, cache_tokens_per_sequence=-1)
    x = _tokens(config)
    seq, batch = x.shape[:2]
    mask = torch.zeros(batch, seq, dtype=torch.bool)
    mask[0, 2:5] = True
    mask[2, 6:] = True  # sequence 1 has no eligible token (all padding)
    with torch.no_grad(), routing(layer, "predict_record", cache_mask=mask) as handle:
        layer(x)
    cache = handle.routes.cache
    assert sorted(cache.token_index.tolist()) == [2, 3, 4, 2 * seq + 6, 2 * seq + 7]
    # The cached rows carry their own h_old: canonical token b * S + s is x[s, b].
    s, b = cache.token_index % seq, cache.token_index // seq
    torch.testing.assert_close(cache.hidden[:, 0], x[s, b])
    with pytest.raises(ValueError, match="cache_mask needs mode='predict_record'"):
        with routing(layer, "record", cache_mask=mask):
            pass
    with pytest.raises(ValueError, match="cache_mask has 1 microbatches"):
        with torch.no_grad(), routing(layer, "predict_record", cache_mask=[mask]):
            layer(x)
            layer(x)


# -- no predictor step without a predictor loss --------------------------------------------------
def _predictor_model():
    model = torch.nn.Linear(4, 3)
    model.predictor = torch.nn.Linear(4, 3, bias=False)
    for p in model.predictor.parameters():
        p.pr2_predictor = True
    return model


def test_predictor_step_frozen_keeps_w_p_bit_unchanged_despite_momentum():
    from megatron_pr2.optim import predictor_param_groups, predictor_step_frozen

    def run(freeze: bool):
        torch.manual_seed(0)
        model = _predictor_model()
        opt = torch.optim.AdamW(predictor_param_groups(model, 1e-2, 3.0, weight_decay=0.1))
        for p in model.parameters():  # a step with a loss: nonzero AdamW moments
            p.grad = torch.randn_like(p)
        opt.step()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        for n, p in model.named_parameters():  # mini-step 1: exact-zero predictor gradient
            p.grad = torch.zeros_like(p) if "predictor" in n else torch.randn_like(p)
        with predictor_step_frozen(opt, freeze):
            opt.step()
        moved = {n: not torch.equal(p, before[n]) for n, p in model.named_parameters()}
        return moved, opt

    moved, opt = run(freeze=True)
    assert moved == {"weight": True, "bias": True, "predictor.weight": False}
    # The group's lr and weight decay are restored after the step.
    (group,) = [g for g in opt.param_groups if g.get("pr2_predictor")]
    assert group["lr"] == pytest.approx(3e-2) and group["weight_decay"] == 0.0
    # Without the freeze, AdamW momentum moves the predictor on a zero-gradient step.
    moved, _ = run(freeze=False)
    assert moved["predictor.weight"]


def test_predictor_groups_refuses_mixed_groups():
    from megatron_pr2.optim import predictor_groups

    model = _predictor_model()
    mixed = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="mixes PR2 predictor and other parameters"):
        predictor_groups(mixed)
    own = torch.optim.SGD([{"params": [model.weight]}, {"params": [model.predictor.weight]}], lr=1)
    assert [g["params"][0] is model.predictor.weight for g in predictor_groups(own)] == [True]


# -- predictive accuracy = the replayed route's ----------------------------------------------------
def test_predictive_accuracy_scores_the_replayed_route_not_the_current_predictor(pg):
    """From mini-step 2 on W_p has trained since the record pass; the metric must score I_hat,
    the route actually replayed, not TopK(p_old + h W_p) with the current W_p."""
    from megatron_pr2 import routing

    config = make_moe_config(num_moe_experts=8, moe_router_topk=2)
    layer = _pr2_layer(pg, config, cache_tokens_per_sequence=-1)
    x = _tokens(config)
    with torch.no_grad(), routing(layer, "predict_record") as record:
        layer(x)

    def replay_metrics():
        with torch.no_grad(), routing(layer, "replay", routes=record.routes, ministep=2) as h:
            layer(x)
        return h.metrics

    before = replay_metrics()
    # Same weights as the record pass: the replayed route is the live top-k.
    assert float(before["predictive_topk_accuracy"][0]) == 1.0
    with torch.no_grad():
        layer.router.predictor.weight.normal_(0, 10.0)  # the predictor changes a lot
    after = replay_metrics()
    assert float(after["predictive_topk_accuracy"][0]) == 1.0
    assert float(after["bias_to_logit_ratio"][0]) > 1.0  # the current W_p is used elsewhere


# -- a loss for sigmoid routers with expert bias ---------------------------------------------------
def test_sigmoid_kl_learns_a_per_token_shift_that_kl_post_cannot_see(pg):
    """DeepSeek-V3-style router (sigmoid scores, expert bias, group-limited top-k). The drift adds
    the same per-token shift c(h) = h . u to every expert's logit: the softmax of kl-post is blind
    to it, but TopK(sigmoid(p) + bias) moves. sigmoid-kl learns it; kl-post stays at R2."""
    from megatron_pr2 import routing
    from megatron_pr2.predictor import predictor_loss

    config = make_moe_config(
        hidden_size=32,
        num_moe_experts=16,
        moe_router_topk=4,
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_num_groups=4,
        moe_router_group_topk=2,
    )
    gen = torch.Generator().manual_seed(3)
    u = torch.randn(32, generator=gen) * 0.4
    # A per-token shift leaves softmax unchanged exactly: kl-post has nothing to learn from it.
    p = torch.randn(5, 16, generator=gen)
    zero = torch.zeros(5, 16, requires_grad=True)
    assert float(predictor_loss("kl-post", p + 1.7, p, zero)) == pytest.approx(0.0, abs=1e-6)
    assert float(predictor_loss("sigmoid-kl", p + 1.7, p, zero)) > 0.1

    results = {}
    for loss in ("kl-post", "sigmoid-kl"):
        layer = _pr2_layer(pg, config, loss=loss, cache_tokens_per_sequence=-1)
        router = layer.router
        with torch.no_grad():
            router.expert_bias.copy_(torch.linspace(-0.4, 0.4, 16))
            router.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(4))
        w0 = router.weight.detach().clone()
        opt = torch.optim.Adam(router.predictor.parameters(), lr=0.03)

        def rollout(seed):
            x = torch.randn(16, 4, 32, generator=torch.Generator().manual_seed(seed))
            with torch.no_grad():
                router.weight.copy_(w0)
            with torch.no_grad(), routing(router, "predict_record") as handle:
                router(x)
            with torch.no_grad():
                # The next policy update: every expert's logit shifts by h . u.
                router.weight.copy_(w0 + u.unsqueeze(0))
            return x, handle.routes

        for step in range(40):
            x, routes = rollout(200 + step)
            with routing(router, "replay", routes=routes, ministep=2):
                probs, _ = router(x)
                probs.sum().mul(0).backward()
            opt.step()
            opt.zero_grad()
        x, routes = rollout(999)
        with torch.no_grad(), routing(router, "replay", routes=routes, ministep=2) as handle:
            router(x)
        results[loss] = {k: float(v[0]) for k, v in handle.metrics.items()}
    r2 = results["kl-post"]["r2_topk_accuracy"]
    assert r2 < 0.9  # the shift moves the sigmoid + bias top-k
    assert results["kl-post"]["predictive_topk_accuracy"] < r2 + 0.03
    assert results["sigmoid-kl"]["predictive_topk_accuracy"] > r2 + 0.05, results


def test_sgd_predictor_update_is_gradient_descent_inside_adamw():
    from megatron_pr2.arguments import pr2_optimizer_config_overrides
    from megatron_pr2.optim import predictor_param_groups

    torch.manual_seed(0)
    model = _predictor_model()
    groups = predictor_param_groups(model, 1e-3, 300.0, update="sgd")
    opt = torch.optim.AdamW(groups)
    w0 = model.predictor.weight.detach().clone()
    grads = []
    for step in range(3):
        g = torch.randn_like(w0) * 1e-4
        grads.append(g)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        model.predictor.weight.grad = g.clone()
        opt.step()
    # Three steps of plain gradient descent at lr 0.3 (momentum-free, not normalised).
    expected = w0 - 0.3 * sum(grads)
    torch.testing.assert_close(model.predictor.weight.detach(), expected, rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="predictor_update='momentum'"):
        predictor_param_groups(model, 1e-3, 1.0, update="momentum")

    from megatron_pr2.cpu import apply_cpu_patches

    apply_cpu_patches()
    from megatron.core.optimizer import OptimizerConfig

    overrides = pr2_optimizer_config_overrides(OptimizerConfig(lr=1e-4), 10.0, {}, "sgd")
    (override,) = overrides.values()
    assert override["betas"] == (0.0, 0.999) and override["eps"] == 1.0
    assert override["pr2_predictor"] is True and override["max_lr"] == pytest.approx(1e-3)


def test_predictor_weight_decay_shrinks_w_p_before_the_step():
    """predictor_weight_decay: each step keeps (1 - lr x wd) of W_p, then adds the gradient
    step; the model's weight decay does not reach the predictor; a shrink above 1 is refused
    (by both optimizer routes, naming the setting)."""
    from megatron_pr2.arguments import pr2_optimizer_config_overrides
    from megatron_pr2.optim import predictor_param_groups

    torch.manual_seed(0)
    model = _predictor_model()
    groups = predictor_param_groups(
        model, 1e-3, 300.0, weight_decay=0.5, update="sgd", predictor_weight_decay=3.0
    )
    (predictor_group,) = [g for g in groups if g.get("pr2_predictor")]
    assert predictor_group["weight_decay"] == 3.0
    assert all(g["weight_decay"] == 0.5 for g in groups if not g.get("pr2_predictor"))
    opt = torch.optim.AdamW(groups)
    w = torch.randn_like(model.predictor.weight) * 1e-3
    with torch.no_grad():
        model.predictor.weight.copy_(w)
    g = torch.randn_like(w) * 1e-4
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    model.predictor.weight.grad = g.clone()
    opt.step()
    # lr 0.3 x wd 3 = 0.9 of W_p decays, then a plain gradient step at lr 0.3.
    expected = w * (1 - 0.3 * 3.0) - 0.3 * g
    torch.testing.assert_close(model.predictor.weight.detach(), expected, rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="predictor_weight_decay=4: .* shrink W_p by 1.2"):
        predictor_param_groups(model, 1e-3, 300.0, update="sgd", predictor_weight_decay=4.0)
    from megatron_pr2 import PR2Config

    with pytest.raises(ValueError, match="PR2Config.predictor_weight_decay=-1"):
        PR2Config(predictor_weight_decay=-1.0)

    from megatron_pr2.cpu import apply_cpu_patches

    apply_cpu_patches()
    from megatron.core.optimizer import OptimizerConfig

    config = OptimizerConfig(lr=1e-4, weight_decay=0.1)
    (override,) = pr2_optimizer_config_overrides(config, 3000.0, {}, "sgd", 3.0).values()
    # Megatron's scheduler sets weight_decay = wd_mult x --weight-decay at every step.
    assert override["wd_mult"] * config.weight_decay == pytest.approx(3.0)
    (override,) = pr2_optimizer_config_overrides(config, 3000.0, {}, "sgd").values()
    assert override["wd_mult"] == 0.0
    with pytest.raises(ValueError, match="--pr2-predictor-weight-decay=3 needs --weight-decay"):
        pr2_optimizer_config_overrides(
            OptimizerConfig(lr=1e-4, weight_decay=0.0), 3000.0, {}, "sgd", 3.0
        )
    with pytest.raises(ValueError, match="--pr2-predictor-weight-decay=4: .* shrink"):
        pr2_optimizer_config_overrides(config, 3000.0, {}, "sgd", 4.0)


def test_megatron_lm_hook_passes_the_predictor_update_and_weight_decay(monkeypatch):
    """The Megatron-LM hook's overrides come from --pr2-alpha, --pr2-predictor-update and
    --pr2-predictor-weight-decay (it once kept only alpha)."""
    import argparse

    from megatron_pr2.cpu import apply_cpu_patches

    apply_cpu_patches()
    from megatron.core.optimizer import OptimizerConfig

    from megatron_pr2.arguments import add_pr2_args
    from megatron_pr2.megatron_lm import hooks

    argv = ["--pr2-alpha", "3000", "--pr2-predictor-update", "sgd"]
    args = add_pr2_args(argparse.ArgumentParser()).parse_args(
        argv + ["--pr2-predictor-weight-decay", "3"]
    )
    monkeypatch.setattr(hooks, "megatron_lm_args", lambda: args)
    config = OptimizerConfig(lr=1e-4, weight_decay=0.1)
    (override,) = hooks.pr2_optimizer_overrides_from_args(config, {}).values()
    assert override["max_lr"] == pytest.approx(0.3)
    assert override["betas"] == (0.0, 0.999) and override["eps"] == 1.0
    assert override["wd_mult"] * config.weight_decay == pytest.approx(3.0)
