# Comparison report of the RL demo: summary table, PNG plots, markdown with honest verdicts.
#
# Input: runs[mode][seed] = list of per-step metric dicts (metrics.jsonl rows) and
# evals[mode][seed] = final greedy-evaluation dict. Statistics: every metric is first averaged
# over the last `window` fraction of a run's steps (the regime after warm-up), then mean and
# sample std over seeds. No megatron imports here.

import math
import os
import statistics
from typing import Dict, List, Optional, Sequence, Tuple

# (metric key, column title, direction: +1 higher is better, -1 lower is better, 0 neutral)
TABLE_METRICS: Tuple[Tuple[str, str, int], ...] = (
    ("rl/reward", "reward", +1),
    ("eval/exact_match", "eval EM", +1),
    ("rl/clip_fraction", "clip frac", -1),
    ("rl/mean_abs_log_ratio", "mean abs log r", -1),
    ("rl/ratio_outside_0.5_2", "r outside [0.5,2]", -1),
    ("rl/max_ratio", "max r", -1),
    ("rl/train_inference_kl", "train-inf KL", -1),
    ("pr2/train_inference_route_accuracy/mean", "train-inf route acc", +1),
    ("pr2/route_topk_accuracy/mean", "replay/live top-k acc", +1),
    ("pr2/route_topk_accuracy/ministep_ge2", "replay/live top-k acc, mini-steps >= 2", +1),
    ("pr2/r2_topk_accuracy/mean", "R2 acc (cached)", 0),
    ("pr2/predictive_topk_accuracy/mean", "PR2 pred acc (cached)", +1),
    ("pr2/r2_topk_accuracy/ministep_ge2", "R2 acc (cached), mini-steps >= 2", 0),
    ("pr2/predictive_topk_accuracy/ministep_ge2", "PR2 pred acc (cached), mini-steps >= 2", +1),
    ("pr2/predictor_loss/mean", "predictor loss", -1),
    ("pr2/bias_to_logit_ratio/mean", "bias/logit", 0),
    ("pr2/router_drift_relative_norm/mean", "router drift per batch (rel. norm)", 0),
    ("pr2/router_drift_cosine/mean", "router drift cosine with previous batch", 0),
    ("rl/grad_norm", "grad norm", 0),
    ("pr2/predictor_grad_norm", "predictor grad norm", 0),
    ("rl/entropy", "entropy", 0),
    ("time/step_seconds", "s/step", -1),
)

PLOTS: Tuple[Tuple[str, str], ...] = (
    ("rl/reward", "reward"),
    ("rl/clip_fraction", "clip_fraction"),
    ("pr2/route_topk_accuracy/mean", "route_topk_accuracy"),
    ("rl/mean_abs_log_ratio", "mean_abs_log_ratio"),
)


def _finite(values: Sequence[float]) -> List[float]:
    return [v for v in values if v is not None and not math.isnan(v)]


def run_window_mean(history: List[dict], key: str, window: float = 0.5) -> Optional[float]:
    """Mean of `key` over the last `window` fraction of a run's steps (None if never logged)."""
    if not history:
        return None
    start = int(len(history) * (1.0 - window))
    values = _finite([row.get(key, float("nan")) for row in history[start:]])
    return sum(values) / len(values) if values else None


def mean_std(values: Sequence[Optional[float]]) -> Tuple[Optional[float], Optional[float]]:
    vals = _finite([v for v in values if v is not None])
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


def summarize(
    runs: Dict[str, Dict[int, List[dict]]],
    evals: Dict[str, Dict[int, dict]],
    window: float = 0.5,
) -> Dict[str, Dict[str, Tuple[Optional[float], Optional[float]]]]:
    """summary[mode][metric] = (mean over seeds, std over seeds) of the per-run window means."""
    out = {}
    for mode, by_seed in runs.items():
        row = {}
        for key, _, _ in TABLE_METRICS:
            if key.startswith("eval/"):
                per_seed = [evals.get(mode, {}).get(s, {}).get(key) for s in by_seed]
            else:
                per_seed = [run_window_mean(h, key, window) for h in by_seed.values()]
            row[key] = mean_std(per_seed)
        out[mode] = row
    return out


def _fmt(ms: Tuple[Optional[float], Optional[float]]) -> str:
    mean, std = ms
    if mean is None:
        return "n/a"

    def f(x: float) -> str:
        if x == 0:
            return "0"
        if abs(x) >= 100 or abs(x) < 1e-3:
            return f"{x:.2e}"
        return f"{x:.4f}"

    return f"{f(mean)} ± {f(std)}" if std is not None else f(mean)


def markdown_table(summary, modes: Sequence[str]) -> str:
    keys = [
        (k, title)
        for k, title, _ in TABLE_METRICS
        if any(summary[m][k][0] is not None for m in modes)
    ]
    lines = ["| metric | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]
    for key, title in keys:
        lines.append(f"| {title} | " + " | ".join(_fmt(summary[m][key]) for m in modes) + " |")
    return "\n".join(lines)


def text_table(summary, modes: Sequence[str]) -> str:
    """Fixed-width side-by-side table for the terminal."""
    keys = [
        (k, title)
        for k, title, _ in TABLE_METRICS
        if any(summary[m][k][0] is not None for m in modes)
    ]
    cells = [["metric"] + list(modes)]
    for key, title in keys:
        cells.append([title] + [_fmt(summary[m][key]) for m in modes])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    out = []
    for n, row in enumerate(cells):
        out.append("  ".join(c.ljust(w) for c, w in zip(row, widths)))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def ministep_tables(
    runs: Dict[str, Dict[int, List[dict]]], num_ministeps: int, window: float = 0.5
) -> str:
    """Markdown tables per mini-step i: replay/live top-k accuracy and clip fraction per mode,
    and for PR2 modes the paired comparison on the same cached tokens of TopK(p_old + h W_p)
    (PR2) and TopK(p_old) (what R2 would have replayed) against the live top-k."""

    def cell(mode: str, key: str) -> str:
        per_seed = [run_window_mean(h, key, window) for h in runs[mode].values()]
        return _fmt(mean_std(per_seed))

    modes = list(runs)
    lines = ["| mini-step | " + " | ".join(f"{m} acc / clip" for m in modes) + " |"]
    lines.append("|---|" + "---|" * len(modes))
    for i in range(1, num_ministeps + 1):
        row = [
            f"{cell(m, f'pr2/route_topk_accuracy/ministep_{i}')} / "
            f"{cell(m, f'rl/clip_fraction/ministep_{i}')}"
            for m in modes
        ]
        lines.append(f"| {i} | " + " | ".join(row) + " |")
    pr2_modes = [m for m in modes if m.startswith("pr2")]
    if pr2_modes:
        lines += [
            "",
            "| mini-step | "
            + " | ".join(f"{m}: PR2 pred acc / R2 acc (same tokens)" for m in pr2_modes)
            + " |",
        ]
        lines.append("|---|" + "---|" * len(pr2_modes))
        for i in range(1, num_ministeps + 1):
            row = [
                f"{cell(m, f'pr2/predictive_topk_accuracy/ministep_{i}')} / "
                f"{cell(m, f'pr2/r2_topk_accuracy/ministep_{i}')}"
                for m in pr2_modes
            ]
            lines.append(f"| {i} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def headline(summary, pairs: Sequence[Tuple[str, str]]) -> List[str]:
    """One line per pair: on how many directional metrics A is better / worse / unclear."""
    lines = []
    for a, b in pairs:
        if a not in summary or b not in summary:
            continue
        counts = {"better": [], "WORSE": [], "unclear": []}
        for line, (key, title, direction) in _directional(summary, a, b):
            counts[line].append(title)
        lines.append(
            f"- **{a} vs {b}**: better on {len(counts['better'])} "
            f"({', '.join(counts['better']) or '-'}), worse on {len(counts['WORSE'])} "
            f"({', '.join(counts['WORSE']) or '-'}), no clear difference on "
            f"{len(counts['unclear'])} metrics."
        )
    return lines


def _gap(a: Tuple[float, Optional[float]], b: Tuple[float, Optional[float]], direction: int):
    """(diff, seed spread, kind) of two measured (mean, std) cells: spread is the larger std;
    kind is "identical", "unclear" (gap within the spread), "better" or "WORSE" for a."""
    (ma, sa), (mb, sb) = a, b
    diff = ma - mb
    spread = max(sa or 0.0, sb or 0.0)
    if diff == 0:
        kind = "identical"
    elif abs(diff) <= spread:
        kind = "unclear"
    else:
        kind = "better" if diff * direction > 0 else "WORSE"
    return diff, spread, kind


def _directional(summary, a: str, b: str):
    """(verdict, metric) for every directional metric measured in both modes."""
    out = []
    for key, title, direction in TABLE_METRICS:
        if direction == 0 or key.startswith("time/"):
            continue
        if summary[a][key][0] is None or summary[b][key][0] is None:
            continue
        kind = _gap(summary[a][key], summary[b][key], direction)[2]
        out.append(("unclear" if kind == "identical" else kind, (key, title, direction)))
    return out


def bar_check(summary, pr2_labels: Sequence[str]) -> List[str]:
    """The demo's acceptance criteria, per PR2 variant on R2 (means over seeds):
    replay top-k accuracy at mini-steps >= 2 above R2's (across runs, and paired on the same
    cached tokens) and a clip fraction below no replay's."""

    def value(label: str, key: str) -> Tuple[Optional[float], Optional[float]]:
        return summary.get(label, {}).get(key, (None, None))

    def line(what: str, a, b, a_name: str, b_name: str, direction: int) -> str:
        if a[0] is None or b[0] is None:
            return f"- {what}: not measured"
        diff, spread, kind = _gap(a, b, direction)
        margin = "within" if kind in ("identical", "unclear") else "beyond"
        met = diff * direction > 0
        return (
            f"- {what}: {a_name} {a[0]:.5f} vs {b_name} {b[0]:.5f} (diff {diff:+.2g}, {margin} "
            f"the seed spread {spread:.2g}): {'met' if met else 'NOT met'}"
        )

    acc = "pr2/route_topk_accuracy/ministep_ge2"
    lines = []
    for label in pr2_labels:
        lines += [
            f"**{label}**",
            "",
            line(
                "replay top-k accuracy at mini-steps >= 2 above R2's",
                value(label, acc),
                value("r2", acc),
                label,
                "r2",
                +1,
            ),
            line(
                "paired on the same cached tokens: TopK(p_old + h W_p) vs TopK(p_old)",
                value(label, "pr2/predictive_topk_accuracy/ministep_ge2"),
                value(label, "pr2/r2_topk_accuracy/ministep_ge2"),
                "PR2",
                "R2",
                +1,
            ),
            line(
                "clip fraction below no replay's",
                value(label, "rl/clip_fraction"),
                value("none", "rl/clip_fraction"),
                label,
                "none",
                -1,
            ),
            "",
        ]
    return lines


def verdicts(summary, pairs: Sequence[Tuple[str, str]]) -> List[str]:
    """Plain statements 'A vs B' per directional metric, saying when a gap is within the
    seed-to-seed spread (the larger of the two stds) rather than calling it a win."""
    lines = []
    for a, b in pairs:
        if a not in summary or b not in summary:
            continue
        for key, title, direction in TABLE_METRICS:
            if direction == 0:
                continue
            (ma, _), (mb, _) = summary[a][key], summary[b][key]
            if ma is None or mb is None:
                continue
            diff, spread, kind = _gap(summary[a][key], summary[b][key], direction)
            verdict = {
                "identical": "identical",
                "unclear": "within seed spread (no clear difference)",
                "better": f"{a} better",
                "WORSE": f"{a} WORSE",
            }[kind]
            lines.append(
                f"- {title}: {a} {ma:.4g} vs {b} {mb:.4g} (diff {diff:+.3g}, seed spread "
                f"{spread:.2g}): {verdict}"
            )
    return lines


def plot_curves(runs: Dict[str, Dict[int, List[dict]]], out_dir: str) -> List[str]:
    """One PNG per plotted metric: mean over seeds per step, one line per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for key, name in PLOTS:
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        plotted = False
        for mode, by_seed in runs.items():
            steps = max((len(h) for h in by_seed.values()), default=0)
            xs, ys = [], []
            for t in range(steps):
                vals = _finite(
                    [h[t].get(key, float("nan")) for h in by_seed.values() if t < len(h)]
                )
                if vals:
                    xs.append(t + 1)
                    ys.append(sum(vals) / len(vals))
            if xs:
                ax.plot(xs, ys, label=mode, marker="." if len(xs) < 40 else None)
                plotted = True
        if not plotted:
            plt.close(fig)
            continue
        ax.set_xlabel("RL step")
        ax.set_ylabel(key)
        ax.set_title(f"{key} (mean over seeds)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = os.path.join(out_dir, f"{name}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def write_report(
    path: str,
    summary,
    modes: Sequence[str],
    seeds: Sequence[int],
    settings: Dict[str, object],
    n1_check: Optional[Dict[str, object]],
    plots: Sequence[str],
    timings: Dict[str, float],
    sft_eval: Optional[Dict[str, float]] = None,
    per_ministep: Optional[str] = None,
    pairs: Sequence[Tuple[str, str]] = (("pr2", "r2"), ("pr2-r3", "r3")),
    bar_labels: Sequence[str] = ("pr2",),
) -> str:
    """Write the markdown report; returns its text."""
    lines = ["# megatron-pr2 RL demo: routing-mode comparison", ""]
    lines += [
        "GRPO on synthetic arithmetic with a tiny Megatron-Core MoE GPT (trainer fp32, rollout "
        "engine bf16). Same SFT warm start, same prompt and sampling seeds for every mode. "
        "Each number is the mean over the last half of a run's steps, then mean ± std over "
        f"seeds {list(seeds)}.",
        "",
        "## Settings",
        "",
    ]
    lines += [f"- {k}: {v}" for k, v in settings.items()]
    if sft_eval:
        lines += [
            f"- SFT warm start (greedy, held-out): exact match {sft_eval.get('eval/exact_match', float('nan')):.3f}, "
            f"reward {sft_eval.get('eval/reward', float('nan')):.3f}"
        ]
    pairs = list(pairs) + [("r2", "none"), ("r3", "none")]
    lines += ["", "## Headline (computed; 'no clear difference' = gap within the seed spread)", ""]
    lines += headline(summary, pairs)
    lines += ["", "## Acceptance bar (computed from the table below)", ""]
    lines += bar_check(summary, bar_labels)
    lines += ["", "## Results", "", markdown_table(summary, modes), ""]
    lines += [
        "Metric notes: 'replay/live top-k acc' is |replayed route ∩ live top-k| / k over the "
        "mini-steps (R2/R3: replay accuracy, the staleness baseline; PR2: predictive accuracy of "
        "the replayed predicted route; none: no replay, the same overlap between the old-policy "
        "route and the live route, i.e. natural drift). 'R2 acc (cached)' and 'PR2 pred acc "
        "(cached)' are measured on the predictor-cache tokens in PR2 modes only: TopK(p_old) and "
        "TopK(p_old + h W_p) against the live top-k. 'train-inf route acc' compares the engine's "
        "route with the trainer's plain live top-k at theta_old (no predictor). 'train-inf KL' is "
        "KL(pi_rollout || pi_old) on the sampled tokens (k3 estimator); in pr2 / pr2-r3 pi_old "
        "routes with predicted experts, so it also contains the predicted-route shift. "
        "Ratios r = pi_theta / pi_old are over all mini-steps. At mini-step 1 r = 1 up to "
        "numerics, except in pr2: its pi_old (the predict_record pass) takes the gates from "
        "the effective logits p_old + h W_p, while training gates use the live logits only, "
        "so its ratios start off 1 (see the clip fraction at mini-step 1 below).",
        "",
        "",
        "## Per mini-step (same statistics)",
        "",
        per_ministep or "n/a",
        "",
        "## Verdicts (computed from the table)",
        "",
    ]
    lines += verdicts(summary, pairs)
    lines += [""]
    if n1_check is not None:
        lines += ["## N=1 check: R2 and PR2 identical when N = 1", ""]
        lines += [f"- {k}: {v}" for k, v in n1_check.items()]
        lines += [""]
    if plots:
        lines += ["## Plots", ""]
        lines += [
            f"![{os.path.basename(p)}]({os.path.relpath(p, os.path.dirname(path))})" for p in plots
        ]
        lines += [""]
    lines += ["## Timings", ""]
    lines += [f"- {k}: {v:.1f} s" for k, v in timings.items()]
    lines += [""]
    text = "\n".join(lines)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return text
