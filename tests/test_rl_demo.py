# RL demo: report statistics / verdicts / plots on synthetic histories, SFT label noise, and a
# micro end-to-end `--compare` through the command-line entry point (in-process, one worker).

import json
import os
import random

import pytest

from megatron_pr2.rl import report


def _history(level: float, slope: float, steps: int = 6):
    return [
        {
            "step": t,
            "rl/reward": level + slope * t,
            "rl/clip_fraction": 0.01 * (t % 2),
            "pr2/route_topk_accuracy/mean": 0.99,
        }
        for t in range(steps)
    ]


def test_window_mean_and_summary_against_hand_values():
    runs = {"r2": {0: _history(0.5, 0.1), 1: _history(0.7, 0.1)}, "pr2": {0: _history(0.5, 0.0)}}
    evals = {"r2": {0: {"eval/exact_match": 0.5}, 1: {"eval/exact_match": 0.7}}, "pr2": {0: {}}}
    # Last half of 6 steps = steps 3, 4, 5 -> rewards 0.8, 0.9, 1.0 (seed 0), 1.0, 1.1, 1.2.
    assert report.run_window_mean(runs["r2"][0], "rl/reward") == pytest.approx(0.9)
    summary = report.summarize(runs, evals)
    mean, std = summary["r2"]["rl/reward"]
    assert mean == pytest.approx(1.0) and std == pytest.approx(0.1414213562, rel=1e-6)
    assert summary["r2"]["eval/exact_match"][0] == pytest.approx(0.6)
    assert summary["pr2"]["eval/exact_match"] == (None, None)
    assert summary["pr2"]["rl/train_inference_kl"] == (None, None)
    # Unmeasured metrics are left out of the tables instead of printed as zeros.
    table = report.markdown_table(summary, ["r2", "pr2"])
    assert "train-inf KL" not in table and "| reward |" in table
    text = report.text_table(summary, ["r2", "pr2"])
    assert text.splitlines()[0].split()[:3] == ["metric", "r2", "pr2"]


def test_verdicts_respect_seed_spread():
    summary = {
        "a": {k: (None, None) for k, _, _ in report.TABLE_METRICS},
        "b": {k: (None, None) for k, _, _ in report.TABLE_METRICS},
    }
    summary["a"]["rl/reward"], summary["b"]["rl/reward"] = (0.80, 0.01), (0.70, 0.02)
    summary["a"]["rl/clip_fraction"], summary["b"]["rl/clip_fraction"] = (0.05, 0.0), (0.01, 0.0)
    summary["a"]["rl/max_ratio"], summary["b"]["rl/max_ratio"] = (1.30, 0.2), (1.25, 0.2)
    lines = "\n".join(report.verdicts(summary, [("a", "b")]))
    assert "reward: a 0.8 vs b 0.7" in lines and "a better" in lines
    assert "clip frac" in lines and "a WORSE" in lines
    assert "max r" in lines and "within seed spread" in lines
    (head,) = report.headline(summary, [("a", "b")])
    assert "better on 1 (reward)" in head and "worse on 1 (clip frac)" in head
    assert "no clear difference on 1 metrics" in head


def test_bar_check_states_met_and_not_met():
    summary = {m: {k: (None, None) for k, _, _ in report.TABLE_METRICS} for m in ("r2", "none")}
    summary["pr2-x"] = {k: (None, None) for k, _, _ in report.TABLE_METRICS}
    acc = "pr2/route_topk_accuracy/ministep_ge2"
    summary["pr2-x"][acc], summary["r2"][acc] = (0.996, 0.0001), (0.995, 0.0002)
    summary["pr2-x"]["rl/clip_fraction"] = (0.009, 0.001)
    summary["none"]["rl/clip_fraction"] = (0.008, 0.002)
    lines = report.bar_check(summary, ["pr2-x"])
    assert lines[0] == "**pr2-x**"
    assert lines[2].endswith(": met") and "beyond the seed spread" in lines[2]
    assert (
        lines[3]
        == "- paired on the same cached tokens: TopK(p_old + h W_p) vs TopK(p_old): not measured"
    )
    assert lines[4].endswith("NOT met") and "within the seed spread" in lines[4]


def test_plots_are_written(tmp_path):
    runs = {"r2": {0: _history(0.5, 0.1)}, "pr2": {0: _history(0.4, 0.1), 1: _history(0.6, 0)}}
    paths = report.plot_curves(runs, str(tmp_path))
    names = sorted(os.path.basename(p) for p in paths)
    assert names == ["clip_fraction.png", "reward.png", "route_topk_accuracy.png"]
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_corrupt_answer_is_a_wrong_well_formed_integer():
    from single_rank import single_rank

    with single_rank():
        from megatron_pr2.rl.sft import SFTConfig, corrupt_answer

        rng = random.Random(0)
        for _ in range(2000):
            answer = str(rng.randint(-999, 1998))
            bad = corrupt_answer(answer, rng)
            assert bad != answer and len(bad) == len(answer)
            assert sum(a != b for a, b in zip(answer, bad)) == 1
            body = bad.lstrip("-")
            assert body.isdigit() and (body == "0" or not body.startswith("0")), (answer, bad)
        with pytest.raises(ValueError, match="label_noise"):
            SFTConfig(label_noise=1.0)


def test_compare_end_to_end_micro(tmp_path, capsys):
    """`--compare` on a micro budget: SFT, two modes, N=1 check, table, plots, report."""
    from single_rank import single_rank

    with single_rank():
        from megatron_pr2.rl.demo import main

        argv = ["--compare", "--quick", "--run-dir", str(tmp_path), "--workers", "1"]
        argv += ["--modes", "r2", "pr2", "--seeds", "0", "--steps", "2", "--sft-steps", "3"]
        argv += ["--prompts-per-step", "2", "--group-size", "2", "--ministeps", "2"]
        argv += ["--eval-problems", "8"]
        assert main(argv) == 0
    out = capsys.readouterr().out
    assert "N=1 check (R2 vs PR2, 2 steps): IDENTICAL" in out
    text = (tmp_path / "report.md").read_text()
    # Each PR2 mode runs once per predictor (--predictors, default lookahead and linear).
    assert "| metric | r2 | pr2-lookahead | pr2-linear |" in text and "IDENTICAL" in text
    assert "## Acceptance bar" in text and "**pr2-lookahead**" in text
    for name in ("reward.png", "clip_fraction.png", "route_topk_accuracy.png"):
        assert (tmp_path / "plots" / name).exists()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["n1_check"]["mismatching values"] == 0
    assert sorted(os.listdir(tmp_path / "compare")) == ["pr2-linear", "pr2-lookahead", "r2"]
    # The cached warm start is reused by a second invocation (no SFT log line).
    with single_rank():
        from megatron_pr2.rl.demo import main

        assert main(argv) == 0
    assert "SFT warm start: cached" in capsys.readouterr().out
