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
    mean, std, seeds = summary["r2"]["rl/reward"]
    assert mean == pytest.approx(1.0) and std == pytest.approx(0.1414213562, rel=1e-6)
    assert seeds == {0: pytest.approx(0.9), 1: pytest.approx(1.1)}
    assert summary["r2"]["eval/exact_match"].mean == pytest.approx(0.6)
    assert summary["pr2"]["eval/exact_match"] == report.EMPTY
    assert summary["pr2"]["rl/train_inference_kl"] == report.EMPTY
    # Unmeasured metrics are left out of the tables instead of printed as zeros.
    table = report.markdown_table(summary, ["r2", "pr2"])
    assert "train-inf KL" not in table and "| reward |" in table
    text = report.text_table(summary, ["r2", "pr2"])
    assert text.splitlines()[0].split()[:3] == ["metric", "r2", "pr2"]


def _summary(labels, **cells):
    """summary with every metric unmeasured except cells[label][key] = {seed: value}."""
    out = {m: {k: report.EMPTY for k, _, _ in report.TABLE_METRICS} for m in labels}
    for label, row in cells.items():
        for key, per_seed in row.items():
            out[label][key] = report.cell(per_seed)
    return out


def test_verdicts_need_the_seed_spread_or_a_paired_test():
    summary = _summary(
        ["a", "b"],
        a={
            "rl/reward": {0: 0.81, 1: 0.79},
            "rl/clip_fraction": {0: 0.05, 1: 0.05},
            "rl/max_ratio": {0: 1.5, 1: 1.1},
            # Inside the seed spread, but above b on every seed by the same margin.
            "rl/mean_abs_log_ratio": {0: 0.011, 1: 0.021, 2: 0.031},
        },
        b={
            "rl/reward": {0: 0.72, 1: 0.68},
            "rl/clip_fraction": {0: 0.01, 1: 0.01},
            "rl/max_ratio": {0: 1.2, 1: 1.3},
            "rl/mean_abs_log_ratio": {0: 0.01, 1: 0.02, 2: 0.03},
        },
    )
    lines = "\n".join(report.verdicts(summary, [("a", "b")]))
    assert "reward: a 0.8 vs b 0.7" in lines and "a better" in lines
    assert "clip frac" in lines and "a WORSE" in lines
    assert "max r: " in lines and "no clear difference" in lines
    assert "mean abs log r" in lines and "paired t-test over 3 seeds" in lines
    (head,) = report.headline(summary, [("a", "b")])
    assert "better on 1 (reward)" in head
    assert "worse on 2 (clip frac, mean abs log r)" in head
    assert "no clear difference on 1 metrics" in head
    # One seed each: no spread, no test, never a win.
    one = _summary(["a", "b"], a={"rl/reward": {0: 0.9}}, b={"rl/reward": {0: 0.1}})
    assert report.gap(one["a"]["rl/reward"], one["b"]["rl/reward"], +1, True).kind == "unclear"


def test_bar_check_states_met_not_met_and_no_clear_difference():
    acc, stale = (
        "drift/replayed_topk_accuracy/ministep_ge2",
        "drift/stale_topk_accuracy/ministep_ge2",
    )
    change, clip = "drift/expert_change_per_update/mean", "rl/clip_fraction"
    summary = _summary(
        ["none", "r2", "pr2-x", "pr2-y"],
        none={
            clip: {0: 0.050, 1: 0.052},
            change: {0: 0.08, 1: 0.1},
            "eval/exact_match": {0: 0.7, 1: 0.3},
        },
        r2={clip: {0: 0.030, 1: 0.031}, change: {0: 0.08, 1: 0.1}},
        **{
            "pr2-x": {acc: {0: 0.95, 1: 0.96}, stale: {0: 0.90, 1: 0.91}, clip: {0: 0.02, 1: 0.03}},
            # Within the spread and not consistent over seeds.
            "pr2-y": {acc: {0: 0.95, 1: 0.90}, stale: {0: 0.93, 1: 0.92}, clip: {0: 0.04, 1: 0.05}},
        },
    )
    lines = report.bar_check(summary, ["pr2-x", "pr2-y"], {"eval/exact_match": 0.5})
    text = "\n".join(lines)
    assert lines[0] == (
        "- expert change per update without replay (none): 0.0900 ± 0.0141; bar 5%-15%: met"
    )
    assert lines[1] == "- expert change per update with replay (other modes): 0.0900 to 0.0900"
    assert "clip fraction r2 < none" in lines[3] and lines[3].endswith(": met")
    x = lines[lines.index("**pr2-x**") + 2 :][:2]
    assert x[0].endswith(": met") and "beyond the seed spread" in x[0]
    assert x[1].endswith(
        ": no clear difference (the bar is <=: not exceeded beyond the seed spread)"
    )
    y = lines[lines.index("**pr2-y**") + 2 :][:2]
    assert y[0].endswith(": no clear difference") and y[1].endswith(": NOT met")
    assert "- none: 0.5000 ± 0.2828 (1 of 2 seeds above): NOT met" in text


def test_plots_are_written(tmp_path):
    runs = {"r2": {0: _history(0.5, 0.1)}, "pr2": {0: _history(0.4, 0.1), 1: _history(0.6, 0)}}
    paths = report.plot_curves(runs, str(tmp_path))
    names = sorted(os.path.basename(p) for p in paths)
    assert names == ["clip_fraction.png", "reward.png"]
    for row in runs["pr2"][0] + runs["pr2"][1] + runs["r2"][0]:
        for i in (1, 2):
            row[f"drift/replayed_topk_accuracy/ministep_{i}"] = 1.0 - 0.01 * i
            row[f"drift/stale_topk_accuracy/ministep_{i}"] = 1.0 - 0.02 * i
    path = report.plot_ministep_accuracy(runs, 2, str(tmp_path / "by_ministep.png"))
    for p in paths + [path]:
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


def test_compare_defaults_to_the_modes_of_the_bar():
    """--compare runs none, r2 and pr2 unless --modes asks for the rollout-route modes too."""
    from megatron_pr2.rl.demo import build_parser

    assert build_parser().parse_args(["--compare"]).modes == ["none", "r2", "pr2"]
    args = build_parser().parse_args(["--compare", "--modes", "r3", "pr2-r3"])
    assert args.modes == ["r3", "pr2-r3"]


def test_compare_end_to_end_micro(tmp_path, capsys):
    """`--compare` on a micro budget: SFT, two modes, N=1 check, table, plots, report."""
    from single_rank import single_rank

    with single_rank():
        from megatron_pr2.rl.demo import main

        argv = ["--compare", "--quick", "--run-dir", str(tmp_path), "--workers", "1"]
        argv += ["--modes", "r2", "pr2", "--seeds", "0", "--steps", "2", "--sft-steps", "3"]
        argv += ["--prompts-per-step", "2", "--group-size", "2", "--ministeps", "2"]
        argv += ["--eval-problems", "8", "--no-checkpoints", "--predictor-weight-decay", "1.5"]
        assert main(argv) == 0
    out = capsys.readouterr().out
    assert "N=1 check (R2 vs PR2, 2 steps): IDENTICAL" in out
    text = (tmp_path / "report.md").read_text()
    # Each PR2 mode runs once per predictor (--predictors, default lookahead and linear).
    assert "| metric | r2 | pr2-lookahead | pr2-linear |" in text and "IDENTICAL" in text
    assert "## Acceptance bar" in text and "**pr2-lookahead**" in text
    assert text.index("| expert change per update (drift) |") < text.index("## Settings")
    assert "SMOKE TEST" in text and "SMOKE TEST" in out
    assert "(sgd update, weight decay 1.5)" in text
    for name in ("reward.png", "clip_fraction.png", "route_accuracy_vs_ministep.png"):
        assert (tmp_path / "plots" / name).exists()
    result = json.loads((tmp_path / "compare" / "r2" / "seed0" / "result.json").read_text())
    assert {"window_means", "eval", "per_ministep"} <= set(result)
    assert "drift/stale_topk_accuracy/ministep_2" in result["per_ministep"]
    assert not (tmp_path / "compare" / "r2" / "seed0" / "checkpoints").exists()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["n1_check"]["mismatching values"] == 0
    assert sorted(os.listdir(tmp_path / "compare")) == ["pr2-linear", "pr2-lookahead", "r2"]
    # The cached warm start is reused by a second invocation (no SFT log line).
    with single_rank():
        from megatron_pr2.rl.demo import main

        assert main(argv) == 0
    assert "SFT warm start: cached" in capsys.readouterr().out
