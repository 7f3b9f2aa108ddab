# RL demo loop on a micro configuration: every routing mode, N=1 R2 == PR2, checkpoint/resume,
# trainer -> engine predictor sync, and a 2-rank EP2 run against an EP1 run of the same data.

import dataclasses
import json
import logging
import math
import os

import pytest
import torch

from megatron_pr2 import PR2Config
from megatron_pr2.rl.task import ArithmeticTask, TaskConfig
from megatron_pr2.rl.tokenizer import TaskTokenizer, train_tokenizer

MICRO_MODEL = dict(num_layers=2, hidden_size=64, num_attention_heads=4, moe_ffn_hidden_size=64)


def micro_rl_config(mode: str, **overrides):
    from megatron_pr2.rl.loop import RLConfig

    base = dict(
        mode=mode,
        seed=3,
        steps=2,
        prompts_per_step=4,
        group_size=4,
        num_ministeps=2,
        lr=1e-3,
        pr2=PR2Config(alpha=10.0, cache_tokens_per_sequence=64),
    )
    base.update(overrides)
    return RLConfig(**base)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """gloo world of 1 + Megatron parallel state for this module, tokenizer, micro SFT state."""
    from single_rank import single_rank

    root = tmp_path_factory.mktemp("rl")
    task = ArithmeticTask(TaskConfig(num_digits=2))
    train_tokenizer(task.corpus(seed=0, n=3000), str(root / "tok"), 64)
    tokenizer = TaskTokenizer(str(root / "tok.model"))
    with single_rank():
        from megatron_pr2.rl.model import (
            ModelConfig,
            build_gpt_model,
            full_state_dict,
        )
        from megatron_pr2.rl.sft import SFTConfig, run_sft

        model_cfg = ModelConfig(**MICRO_MODEL)
        model = build_gpt_model(model_cfg, tokenizer.padded_vocab_size(), PR2Config(), seed=1)
        # A few supervised steps so sampled answers are not pure noise.
        run_sft(model, task, tokenizer, SFTConfig(steps=15, batch_size=32, lr=3e-3), 11)
        yield {
            "root": root,
            "task": task,
            "tokenizer": tokenizer,
            "model_cfg": model_cfg,
            "state": full_state_dict(model),
        }


def make_trainer(setup, cfg, run_dir):
    from megatron_pr2.rl.loop import RLTrainer

    return RLTrainer(
        cfg,
        setup["model_cfg"],
        setup["task"],
        setup["tokenizer"],
        str(run_dir),
        init_state=setup["state"],
    )


def _no_time(row):
    return {k: v for k, v in row.items() if not k.startswith("time/")}


@pytest.mark.parametrize("mode", ["none", "r2", "r3", "pr2", "pr2-r3"])
def test_loop_runs_every_mode(setup, tmp_path, mode):
    trainer = make_trainer(setup, micro_rl_config(mode), tmp_path)
    history = trainer.train(progress=False)
    assert [row["step"] for row in history] == [0, 1]
    last = history[-1]
    for key in (
        "rl/reward",
        "rl/clip_fraction",
        "rl/mean_abs_log_ratio",
        "rl/ratio_outside_0.5_2",
        "rl/max_ratio",
        "rl/train_inference_kl",
        "rl/entropy",
        "rl/grad_norm",
        "pr2/route_topk_accuracy/mean",
        "pr2/route_topk_accuracy/layer_0",
        "pr2/route_topk_accuracy/layer_1",
        "pr2/route_topk_accuracy/ministep_2",
        "pr2/train_inference_route_accuracy/mean",
        "pr2/flip_rate/mean",
    ):
        assert key in last, key
        assert math.isfinite(last[key]), (key, last[key])
    assert 0.0 <= last["rl/reward"] <= 1.0
    assert 0.0 <= last["pr2/route_topk_accuracy/mean"] <= 1.0
    assert last["rl/train_inference_kl"] >= 0.0
    has_predictor_metrics = "pr2/predictive_topk_accuracy/mean" in last
    assert has_predictor_metrics == mode.startswith("pr2")
    assert ("pr2/oldpass/route_topk_accuracy/mean" in last) == mode.endswith("r3")
    if mode.startswith("pr2"):
        # The predictor trained from mini-step 2: its head is no longer zero.
        pred = [p for n, p in trainer.model.named_parameters() if ".predictor." in n]
        assert pred and any(float(p.abs().sum()) > 0 for p in pred)
        assert last["pr2/bias_to_logit_ratio/mean"] > 0
    if mode in ("r2", "r3"):
        # Replay at mini-step 1 of the first batch uses routes of the same weights and inputs:
        # R2 replays the trainer's own top-k, so it is exact.
        if mode == "r2":
            assert history[0]["pr2/route_topk_accuracy/ministep_1"] == 1.0
    # TensorBoard event file and JSONL history were written; a checkpoint exists.
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tb"))
    with open(tmp_path / "tb" / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [0, 1]
    assert trainer.latest_checkpoint() is not None


@pytest.mark.parametrize("predictor", ["lowrank", "bias"])
def test_other_predictor_kinds_start_from_a_linear_warm_start(setup, tmp_path, predictor):
    # The warm start holds `linear` predictor weights; the other kinds start from their own
    # zero-offset init and train from mini-step 2, while every policy weight is loaded.
    pr2 = PR2Config(predictor=predictor, alpha=10.0, cache_tokens_per_sequence=64)
    trainer = make_trainer(setup, micro_rl_config("pr2", steps=1, pr2=pr2), tmp_path)
    policy = {
        n: v
        for n, v in trainer.model.state_dict().items()
        if isinstance(v, torch.Tensor) and ".predictor." not in n
    }
    assert policy and all(torch.equal(v, setup["state"][n]) for n, v in policy.items())
    row = trainer.train(progress=False)[0]
    assert math.isfinite(row["pr2/predictor_loss/ministep_2"])
    pred = [p for n, p in trainer.model.named_parameters() if ".predictor." in n]
    assert pred and any(float(p.abs().sum()) > 0 for p in pred)


def test_profiled_step_range_writes_a_trace_with_pr2_ranges(setup, tmp_path):
    # Steps 2 .. 2 of 3 (Megatron-LM's --profile-step-start 2 --profile-step-end 3), on CPU a
    # torch.profiler trace; the replay and predictor ranges of that step are in it.
    from megatron_pr2.rl.step_profiler import ProfileConfig

    trainer = make_trainer(setup, micro_rl_config("pr2", steps=3), tmp_path)
    logs = []
    trainer.log = logs.append
    trainer.train(progress=False, profile=ProfileConfig(step_start=2, step_end=3))
    with open(tmp_path / "profile" / "trace_rank000.json") as f:
        names = {event.get("name") for event in json.load(f)["traceEvents"]}
    assert {"pr2/replay", "pr2/record", "pr2/predictor"} <= names
    assert logs == [
        "profiling steps 2 .. 2",
        f"profiler trace: {tmp_path / 'profile' / 'trace_rank000.json'}",
    ]
    with pytest.raises(ValueError, match="--profile-step-end=2 must be greater"):
        ProfileConfig(step_start=2, step_end=2)


def test_n1_r2_and_pr2_are_identical(setup, tmp_path):
    """With one mini-step the predictor never trains: PR2 must reproduce R2 exactly."""
    results = {}
    for mode in ("r2", "pr2"):
        cfg = micro_rl_config(mode, steps=3, num_ministeps=1)
        trainer = make_trainer(setup, cfg, tmp_path / mode)
        history = trainer.train(progress=False)
        weights = {
            n: p.detach().clone()
            for n, p in trainer.model.state_dict().items()
            if ".predictor." not in n and isinstance(p, torch.Tensor)
        }
        results[mode] = (history, weights, trainer)
    (h_r2, w_r2, _), (h_pr2, w_pr2, t_pr2) = results["r2"], results["pr2"]
    compared = 0
    for a, b in zip(h_r2, h_pr2):
        for key in set(_no_time(a)) & set(_no_time(b)):
            assert a[key] == b[key], (a["step"], key, a[key], b[key])
            compared += 1
    assert compared > 3 * 20
    for name in w_r2:
        assert torch.equal(w_r2[name], w_pr2[name]), name
    for n, p in t_pr2.model.named_parameters():
        if ".predictor." in n:
            assert float(p.abs().sum()) == 0.0, n


def test_n2_pr2_departs_from_r2(setup, tmp_path):
    """The N=1 identity is not vacuous: with N=2 the predictor trains and PR2 departs from R2."""
    hist = {}
    for mode in ("r2", "pr2"):
        trainer = make_trainer(setup, micro_rl_config(mode, steps=2), tmp_path / mode)
        hist[mode] = trainer.train(progress=False)
    a, b = hist["r2"][-1], hist["pr2"][-1]
    assert a["rl/mean_abs_log_ratio"] != b["rl/mean_abs_log_ratio"]


def test_resume_reproduces_next_steps(setup, tmp_path):
    cfg = micro_rl_config("pr2", steps=4, checkpoint_interval=2)
    straight = make_trainer(setup, cfg, tmp_path / "straight").train(progress=False)

    killed_dir = tmp_path / "killed"
    first = make_trainer(setup, cfg, killed_dir)
    # Emulate a kill after step index 2 ran (and was logged) but before its checkpoint.
    partial = first.train(progress=False, stop_after=3)
    assert [r["step"] for r in partial] == [0, 1, 2]
    del first
    resumed_trainer = make_trainer(setup, cfg, killed_dir)
    resumed = resumed_trainer.train(progress=False)
    assert [r["step"] for r in resumed] == [2, 3]
    for a, b in zip(straight[2:], resumed):
        assert _no_time(a) == _no_time(b)
    # The JSONL history holds every step exactly once (the unsaved step 2 was dropped).
    with open(killed_dir / "tb" / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [0, 1, 2, 3]


def test_resume_survives_a_torn_metrics_line_and_a_truncated_checkpoint(setup, tmp_path):
    cfg = micro_rl_config("pr2", steps=3, checkpoint_interval=1)
    straight = make_trainer(setup, cfg, tmp_path / "straight").train(progress=False)

    run_dir = tmp_path / "crashed"
    make_trainer(setup, cfg, run_dir).train(progress=False, stop_after=2)
    # A crash while saving step 2 and while logging the next line: half a checkpoint file and
    # half a JSON line.
    newest = run_dir / "checkpoints" / "step_000002" / "rank000.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    with open(run_dir / "tb" / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "rl/rew')
    resumed_trainer = make_trainer(setup, cfg, run_dir)
    with pytest.warns(UserWarning) as caught:
        resumed = resumed_trainer.train(progress=False)
    messages = [str(w.message) for w in caught]
    previous = str(run_dir / "checkpoints" / "step_000001")
    assert any(
        "step_000002 is unreadable (" in m and m.endswith(f"falling back to {previous}")
        for m in messages
    ), messages
    assert any("dropping a torn last line 3" in m for m in messages), messages
    # Resumed from step 1, the run reproduces the uninterrupted one exactly.
    assert [r["step"] for r in resumed] == [1, 2]
    for a, b in zip(straight[1:], resumed):
        assert _no_time(a) == _no_time(b)
    with open(run_dir / "tb" / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [0, 1, 2]


def test_checkpoint_candidates_and_fallback(tmp_path):
    from megatron_pr2.rl.checkpoint import checkpoint_candidates, newest_readable

    root = tmp_path / "checkpoints"
    assert checkpoint_candidates(str(root)) == []
    assert newest_readable([], torch.load, torch.device("cpu")) is None
    for step in (1, 2, 3):
        (root / f"step_{step:06d}").mkdir(parents=True)
        torch.save({"step": step}, root / f"step_{step:06d}" / "state.pt")
    # latest.json names step 2 (step 3 was never completed): it comes first.
    (root / "latest.json").write_text(json.dumps({"step": 2, "path": str(root / "step_000002")}))
    names = [os.path.basename(p) for p in checkpoint_candidates(str(root))]
    assert names == ["step_000002", "step_000003", "step_000001"]
    (root / "latest.json").write_text('{"step": 3, "pa')  # torn
    with pytest.warns(UserWarning, match="latest.json is unreadable"):
        names = [os.path.basename(p) for p in checkpoint_candidates(str(root))]
    assert names == ["step_000003", "step_000002", "step_000001"]

    def read(path):
        return torch.load(os.path.join(path, "state.pt"))

    (root / "step_000003" / "state.pt").write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="step_000003 is unreadable .* falling back to .*_000002"):
        path, state = newest_readable(checkpoint_candidates(str(root)), read, torch.device("cpu"))
    assert state == {"step": 2} and path.endswith("step_000002")
    for step in (1, 2):
        (root / f"step_{step:06d}" / "state.pt").unlink()
    with pytest.warns(UserWarning, match="no earlier checkpoint"):
        with pytest.raises(RuntimeError, match="no readable checkpoint among"):
            newest_readable(checkpoint_candidates(str(root)), read, torch.device("cpu"))


def test_metrics_history_tolerates_only_a_torn_last_line(tmp_path):
    from megatron_pr2.rl.metrics import read_history

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "a": 1.0}\n{"step": 1, "a": 2.0}\n{"step": 2, "a"')
    with pytest.warns(UserWarning, match="dropping a torn last line 3"):
        assert [row["step"] for _, row in read_history(str(path))] == [0, 1]
    # A complete-looking last line without its newline was cut too: the writer always ends
    # a row with one.
    path.write_text('{"step": 0, "a": 1.0}\n{"step": 1}')
    with pytest.warns(UserWarning, match="torn last line 2"):
        assert [row["step"] for _, row in read_history(str(path))] == [0]
    path.write_text('{"step": 0, "a": 1.0}\n{"step": 1, "a\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 2 is not a JSON metrics row"):
        read_history(str(path))


def test_stock_initial_state_starts_the_predictor_at_zero_and_says_so(setup, tmp_path, caplog):
    stock = {k: v for k, v in setup["state"].items() if ".predictor." not in k}
    assert len(stock) < len(setup["state"])
    caplog.set_level(logging.WARNING, logger="megatron_pr2.checkpointing")
    from megatron_pr2.rl.loop import RLTrainer

    trainer = RLTrainer(
        micro_rl_config("pr2", steps=1),
        setup["model_cfg"],
        setup["task"],
        setup["tokenizer"],
        str(tmp_path),
        init_state=stock,
    )
    messages = [r.getMessage() for r in caplog.records if r.name == "megatron_pr2.checkpointing"]
    assert len(messages) == 1 and "the initial state has no PR2 predictor weights" in messages[0]
    assert "zero" in messages[0]
    state = trainer.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in stock.items() if isinstance(v, torch.Tensor))
    pred = [v for k, v in state.items() if ".predictor." in k]
    assert pred and all(float(v.abs().sum()) == 0 for v in pred)


def test_resume_refuses_a_different_config(setup, tmp_path):
    make_trainer(setup, micro_rl_config("r2", steps=1), tmp_path).train(progress=False)
    trainer = make_trainer(setup, micro_rl_config("r2", steps=2, lr=5e-4), tmp_path)
    with pytest.raises(ValueError, match="lr"):
        trainer.train(progress=False)


def test_engine_sync_carries_predictor(setup, tmp_path):
    from megatron_pr2.rl.model import copy_weights

    trainer = make_trainer(setup, micro_rl_config("pr2-r3", steps=2), tmp_path)
    trainer.train(progress=False)
    copy_weights(trainer.model, trainer.engine)
    engine_params = dict(trainer.engine.named_parameters())
    n_pred = 0
    for name, p in trainer.model.named_parameters():
        e = engine_params[name]
        assert e.dtype == torch.bfloat16
        assert torch.equal(e, p.detach().to(torch.bfloat16)), name
        n_pred += ".predictor." in name
    assert n_pred == MICRO_MODEL["num_layers"]


def test_config_validation():
    from megatron_pr2.rl.loop import RLConfig

    with pytest.raises(ValueError, match="mode"):
        RLConfig(mode="r4")
    with pytest.raises(ValueError, match="num_ministeps"):
        RLConfig(prompts_per_step=3, group_size=3, num_ministeps=2)
    with pytest.raises(ValueError, match="micro_batch_size"):
        RLConfig(prompts_per_step=4, group_size=4, num_ministeps=2, micro_batch_size=3)
    with pytest.raises(ValueError, match="lr_decay_style"):
        RLConfig(lr_decay_style="linear")
    with pytest.raises(ValueError, match="min_lr_ratio"):
        RLConfig(min_lr_ratio=1.5)
    with pytest.raises(ValueError, match="lr_warmup_iters"):
        RLConfig(lr_warmup_iters=-1)
    with pytest.raises(ValueError, match="router_anchor"):
        RLConfig(router_anchor=-1.0)
    with pytest.raises(ValueError, match="router_anchor"):
        RLConfig(lr=1e-3, router_lr_mult=10.0, router_anchor=200.0)  # pulls 2x the deviation


def test_lr_schedule_warmup_then_cosine():
    from megatron_pr2.rl.loop import RLConfig, lr_factor

    cfg = RLConfig(steps=5, prompts_per_step=4, group_size=4, num_ministeps=2, lr_warmup_iters=4)
    # Linear warmup over 4 optimizer steps, then constant.
    assert [lr_factor(cfg, i) for i in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cos = dataclasses.replace(cfg, lr_decay_style="cosine", min_lr_ratio=0.1)
    factors = [lr_factor(cos, i) for i in range(10)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    # Cosine from 1 at the first step after the warmup to min_lr_ratio at the last one.
    assert factors[9] == pytest.approx(0.1)
    assert factors[4] == 1.0 and all(a > b for a, b in zip(factors[4:], factors[5:]))
    assert factors[6] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 2 / 5)))


def test_kl_to_reference_anchors_on_the_frozen_warm_start(setup, tmp_path):
    from megatron_pr2.rl.grpo import PolicyLossConfig

    cfg = micro_rl_config("pr2", steps=2, policy=PolicyLossConfig(kl_coeff=0.1))
    trainer = make_trainer(setup, cfg, tmp_path)
    start = {k: v.clone() for k, v in trainer.reference.state_dict().items() if torch.is_tensor(v)}
    history = trainer.train(progress=False)
    # The reference is the warm start and stays it; the policy moves away from it.
    for name, value in trainer.reference.state_dict().items():
        if torch.is_tensor(value):
            assert torch.equal(value, start[name]), name
    assert all(not p.requires_grad for p in trainer.reference.parameters())
    kl = [h["rl/kl_to_reference"] for h in history]
    assert 0 < kl[0] < kl[1]  # mini-step 1 of step 1 is at the reference (k3 = 0), then grows
    assert make_trainer(setup, micro_rl_config("pr2"), tmp_path / "off").reference is None


def test_router_anchor_pulls_the_routers_towards_the_warm_start(setup, tmp_path):
    from megatron_pr2.model_index import pr2_routers

    def router_distance(anchor: float) -> float:
        # lr 1e-3, router lr x2: the pull per optimizer step is 2e-3 x anchor of the deviation.
        cfg = micro_rl_config("r2", steps=1, router_lr_mult=2.0, router_anchor=anchor)
        trainer = make_trainer(setup, cfg, tmp_path / f"anchor{anchor}")
        start = [r.weight.detach().clone() for r in pr2_routers(trainer.model)]
        embedding = trainer.model.embedding.word_embeddings.weight
        before = embedding.detach().clone()
        trainer.train(progress=False)
        assert not torch.equal(embedding, before)  # the rest of the policy moves either way
        return max(
            float((r.weight - w).abs().max()) for r, w in zip(pr2_routers(trainer.model), start)
        )

    free, pulled = router_distance(0.0), router_distance(100.0)
    assert free > 0 and pulled < 0.9 * free
    # A pull of the whole deviation puts the routers back on the warm start after every step.
    assert router_distance(500.0) < 1e-7


def test_lr_schedule_drives_the_policy_groups_not_the_predictor(setup, tmp_path):
    cfg = micro_rl_config(
        "pr2", steps=2, lr_warmup_iters=2, lr_decay_style="cosine", min_lr_ratio=0.5
    )
    trainer = make_trainer(setup, cfg, tmp_path)
    lrs = []
    step = trainer.optimizer.step

    def record_step(*args, **kwargs):
        lrs.append([group["lr"] for group in trainer.optimizer.param_groups])
        return step(*args, **kwargs)

    trainer.optimizer.step = record_step
    history = trainer.train(progress=False)
    predictor = [
        any(".predictor." in name for name, p in trainer.model.named_parameters() if p is q)
        for group in trainer.optimizer.param_groups
        for q in group["params"][:1]
    ]
    assert any(predictor) and not all(predictor)
    factors = [0.5, 1.0, 1.0, 0.5]  # warmup 2, then cosine 1 -> 0.5 over the last 2 steps
    for step_lrs, factor in zip(lrs, factors):
        for lr, is_predictor in zip(step_lrs, predictor):
            if is_predictor:  # 0 while frozen (mini-step 1), else alpha x lr, never scheduled
                assert lr in (0.0, cfg.lr * cfg.pr2.alpha)
            else:
                assert lr == pytest.approx(cfg.lr * factor)
    assert [h["rl/lr"] for h in history] == pytest.approx([cfg.lr * 0.75, cfg.lr * 0.75])


# ---------------------------------------------------------------------------------------------
# Two ranks: EP2 (experts split, alltoall over gloo) vs EP1 (experts replicated), DP2 in both,
# same full-state initialisation and data. The math is the same, so metrics and weights agree.
# ---------------------------------------------------------------------------------------------
def _two_rank_run(root: str, mode: str):
    from harness import init_megatron_parallel

    from megatron_pr2.cpu import apply_cpu_patches

    apply_cpu_patches()  # before the first megatron-core import (0.19 without triton)

    from megatron_pr2.rl.loop import RLTrainer
    from megatron_pr2.rl.model import (
        ModelConfig,
        build_gpt_model,
        full_state_dict,
        load_full_state_dict,
    )

    task = ArithmeticTask(TaskConfig(num_digits=2))
    tokenizer = TaskTokenizer(os.path.join(root, "tok.model"))
    model_cfg = ModelConfig(**MICRO_MODEL)
    out = {}
    init = None
    for ep in (1, 2):
        with init_megatron_parallel(ep=ep, seed=0):
            if init is None:
                model = build_gpt_model(model_cfg, tokenizer.padded_vocab_size(), PR2Config())
                init = full_state_dict(model)
            cfg = micro_rl_config(mode, steps=2)
            run_dir = os.path.join(root, f"ep{ep}")
            trainer = RLTrainer(cfg, model_cfg, task, tokenizer, run_dir, init_state=init)
            history = trainer.train(progress=False)
            out[ep] = {
                "history": [_no_time(r) for r in history],
                "full": full_state_dict(trainer.model),
            }
    # A full state written under EP2 loads under EP1 (and round-trips) unchanged.
    with init_megatron_parallel(ep=1, seed=0):
        model = build_gpt_model(model_cfg, tokenizer.padded_vocab_size(), PR2Config(), seed=7)
        load_full_state_dict(model, out[2]["full"])
        out["reloaded"] = full_state_dict(model)
    return out


def test_ep2_two_ranks_matches_ep1(tmp_path):
    from harness import run_distributed

    task = ArithmeticTask(TaskConfig(num_digits=2))
    train_tokenizer(task.corpus(seed=0, n=3000), str(tmp_path / "tok"), 64)
    results = run_distributed(_two_rank_run, 2, str(tmp_path), "pr2-r3")
    r0, r1 = results
    for ep in (1, 2):
        # Metrics are reduced over ranks: both ranks report the same values.
        assert r0[ep]["history"] == r1[ep]["history"]
        # Data-parallel replicas (dense weights and the gathered experts) stay identical.
        for name, value in r0[ep]["full"].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, r1[ep]["full"][name]), (ep, name)
    h1, h2 = r0[1]["history"], r0[2]["history"]
    assert len(h1) == len(h2) == 2
    for a, b in zip(h1, h2):
        assert set(a) == set(b)
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
    for name, value in r0[1]["full"].items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            torch.testing.assert_close(value, r0[2]["full"][name], rtol=1e-4, atol=1e-5)
    assert r0["reloaded"].keys() == r0[2]["full"].keys()
    for name, value in r0[2]["full"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, r0["reloaded"][name]), name
    # The predictor trained (pr2-r3, N = 2).
    assert any(float(v.abs().sum()) > 0 for k, v in r0[2]["full"].items() if ".predictor." in k)


def _two_rank_fallback(root: str):
    """EP2: only rank 1's file of the newest checkpoint is truncated; both ranks must resume
    from the previous checkpoint (rank 0 alone could read the newest)."""
    import warnings

    import torch.distributed as dist
    from harness import init_megatron_parallel

    from megatron_pr2.cpu import apply_cpu_patches

    apply_cpu_patches()
    from megatron_pr2.rl.loop import RLTrainer
    from megatron_pr2.rl.model import ModelConfig

    task = ArithmeticTask(TaskConfig(num_digits=2))
    tokenizer = TaskTokenizer(os.path.join(root, "tok.model"))
    model_cfg = ModelConfig(**MICRO_MODEL)
    run_dir = os.path.join(root, "run")
    cfg = micro_rl_config("pr2", steps=3, checkpoint_interval=1)
    with init_megatron_parallel(ep=2, seed=0):
        RLTrainer(cfg, model_cfg, task, tokenizer, run_dir).train(progress=False, stop_after=2)
        if dist.get_rank() == 1:
            file = os.path.join(run_dir, "checkpoints", "step_000002", "rank001.pt")
            with open(file, "r+b") as f:
                f.truncate(os.path.getsize(file) // 2)
        dist.barrier()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            resumed = RLTrainer(cfg, model_cfg, task, tokenizer, run_dir).train(progress=False)
    return {
        "steps": [r["step"] for r in resumed],
        "warnings": [str(w.message) for w in caught if "checkpoint" in str(w.message)],
    }


def test_ranks_agree_on_the_checkpoint_they_fall_back_to(tmp_path):
    from harness import run_distributed

    task = ArithmeticTask(TaskConfig(num_digits=2))
    train_tokenizer(task.corpus(seed=0, n=3000), str(tmp_path / "tok"), 64)
    r0, r1 = run_distributed(_two_rank_fallback, 2, str(tmp_path))
    assert r0["steps"] == r1["steps"] == [1, 2]
    assert any("step_000002 is unreadable on another rank" in m for m in r0["warnings"]), r0
    assert any("step_000002 is unreadable (" in m for m in r1["warnings"]), r1
    assert all("falling back to" in m for m in r0["warnings"] + r1["warnings"])


def test_rl_config_roundtrips_through_asdict():
    from megatron_pr2.rl.loop import RLConfig

    cfg = micro_rl_config("pr2")
    d = dataclasses.asdict(cfg)
    assert d["mode"] == "pr2" and d["pr2"]["alpha"] == 10.0
    assert isinstance(cfg, RLConfig)
