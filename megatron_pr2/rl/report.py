# Comparison report of the RL demo: summary table, PNG plots, markdown with honest verdicts.
#
# Input: runs[label][seed] = list of per-step metric dicts (metrics.jsonl rows) and
# evals[label][seed] = final greedy-evaluation dict. Statistics: every metric is first averaged
# over the last `window` fraction of a run's steps (the regime after warm-up), then mean and
# sample std over seeds; Cell keeps the per-seed values for paired tests. A difference is called
# a win or a loss only when it exceeds the seed spread (the larger of the two stds) or passes a
# one-sided paired t-test over seeds at the 5% level; otherwise "no clear difference".
# No megatron imports here.

import math
import os
import statistics
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

# (metric key, column title, direction: +1 higher is better, -1 lower is better, 0 neutral)
TABLE_METRICS: Tuple[Tuple[str, str, int], ...] = (
    ("drift/expert_change_per_update/mean", "expert change per update (drift)", 0),
    ("rl/reward", "reward", +1),
    ("eval/exact_match", "eval EM (greedy, held-out)", +1),
    ("rl/clip_fraction", "clip frac", -1),
    ("rl/mean_abs_log_ratio", "mean abs log r", -1),
    ("rl/ratio_outside_0.5_2", "r outside [0.5,2]", -1),
    ("rl/max_ratio", "max r", -1),
    ("drift/replayed_topk_accuracy/ministep_ge2", "replayed route acc, mini-steps >= 2", +1),
    ("drift/stale_topk_accuracy/ministep_ge2", "R2 route acc (same tokens), mini-steps >= 2", 0),
    ("rl/train_inference_kl", "train-inf KL", -1),
    ("pr2/train_inference_route_accuracy/mean", "train-inf route acc", +1),
    ("pr2/route_topk_accuracy/mean", "replay/live top-k acc (all rows)", +1),
    ("pr2/predictive_topk_accuracy/ministep_ge2", "PR2 pred acc (cache), mini-steps >= 2", +1),
    ("pr2/r2_topk_accuracy/ministep_ge2", "R2 acc (cache), mini-steps >= 2", 0),
    ("pr2/predictor_loss/mean", "predictor loss", 0),
    ("pr2/bias_to_logit_ratio/mean", "bias/logit", 0),
    ("pr2/router_drift_relative_norm/mean", "router drift per batch (rel. norm)", 0),
    ("pr2/router_drift_cosine/mean", "router drift cosine with previous batch", 0),
    ("rl/grad_norm", "grad norm", 0),
    ("pr2/predictor_grad_norm", "predictor grad norm", 0),
    ("rl/entropy", "entropy", 0),
    ("time/step_seconds", "s/step", 0),
)

# Paper thresholds of the predictor health metrics (per layer): (key, title, test, threshold).
HEALTH = (
    ("pr2/predictive_topk_accuracy", "predictive top-k acc", ">", 0.85),
    ("pr2/predictor_loss", "predictor loss", "~", 1e-4),
    ("pr2/bias_to_logit_ratio", "bias/logit ratio", "<", 0.02),
)

# One-sided 5% critical values of Student's t, by degrees of freedom (1..10).
_T95 = (6.314, 2.920, 2.353, 2.132, 2.015, 1.943, 1.895, 1.860, 1.833, 1.812)


class Cell(NamedTuple):
    """A metric of one label: mean and sample std over seeds, and the per-seed values."""

    mean: Optional[float]
    std: Optional[float]
    seeds: Dict[int, float] = {}


EMPTY = Cell(None, None, {})


def _finite(values: Sequence[Optional[float]]) -> List[float]:
    return [v for v in values if v is not None and not math.isnan(v)]


def run_window_mean(history: List[dict], key: str, window: float = 0.5) -> Optional[float]:
    """Mean of `key` over the last `window` fraction of a run's steps (None if never logged)."""
    if not history:
        return None
    start = int(len(history) * (1.0 - window))
    values = _finite([row.get(key, float("nan")) for row in history[start:]])
    return sum(values) / len(values) if values else None


def cell(per_seed: Dict[int, Optional[float]]) -> Cell:
    """Mean and std over the seeds that measured the metric."""
    seeds = {s: v for s, v in per_seed.items() if v is not None and not math.isnan(v)}
    if not seeds:
        return EMPTY
    vals = list(seeds.values())
    std = statistics.stdev(vals) if len(vals) > 1 else None
    return Cell(statistics.fmean(vals), std, seeds)


def summarize(
    runs: Dict[str, Dict[int, List[dict]]],
    evals: Dict[str, Dict[int, dict]],
    window: float = 0.5,
    keys: Optional[Sequence[str]] = None,
) -> Dict[str, Dict[str, Cell]]:
    """summary[label][metric] = Cell over seeds of the per-run window means."""
    keys = list(keys) if keys is not None else [k for k, _, _ in TABLE_METRICS]
    out = {}
    for label, by_seed in runs.items():
        row = {}
        for key in keys:
            if key.startswith("eval/"):
                per_seed = {s: evals.get(label, {}).get(s, {}).get(key) for s in by_seed}
            else:
                per_seed = {s: run_window_mean(h, key, window) for s, h in by_seed.items()}
            row[key] = cell(per_seed)
        out[label] = row
    return out


def per_seed_results(history: List[dict], evaluation: dict, window: float = 0.5) -> dict:
    """What one run contributes to the comparison (written next to its metrics)."""
    keys = sorted({k for row in history for k in row if not k.startswith("time/")})
    return {
        "window_means": {k: run_window_mean(history, k, window) for k in keys},
        "eval": evaluation,
        "per_ministep": {k: run_window_mean(history, k, window) for k in keys if "/ministep_" in k},
    }


def _fmt_value(x: float) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 100 or abs(x) < 1e-3:
        return f"{x:.2e}"
    return f"{x:.4f}"


def _fmt(c: Cell) -> str:
    if c.mean is None:
        return "n/a"
    return (
        f"{_fmt_value(c.mean)} ± {_fmt_value(c.std)}" if c.std is not None else _fmt_value(c.mean)
    )


def _measured_keys(summary, labels: Sequence[str]):
    return [
        (k, title)
        for k, title, _ in TABLE_METRICS
        if any(summary[m].get(k, EMPTY).mean is not None for m in labels)
    ]


def markdown_table(summary, labels: Sequence[str]) -> str:
    lines = ["| metric | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for key, title in _measured_keys(summary, labels):
        cells = " | ".join(_fmt(summary[m].get(key, EMPTY)) for m in labels)
        lines.append(f"| {title} | {cells} |")
    return "\n".join(lines)


def text_table(summary, labels: Sequence[str]) -> str:
    """Fixed-width side-by-side table for the terminal."""
    cells = [["metric"] + list(labels)]
    for key, title in _measured_keys(summary, labels):
        cells.append([title] + [_fmt(summary[m].get(key, EMPTY)) for m in labels])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    out = []
    for n, row in enumerate(cells):
        out.append("  ".join(c.ljust(w) for c, w in zip(row, widths)))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


class Gap(NamedTuple):
    diff: float
    spread: float
    kind: str  # "identical", "unclear", "better", "WORSE"
    why: str  # what decided it


def paired_t(a: Cell, b: Cell) -> Optional[Tuple[float, float, int]]:
    """(mean paired difference a - b, its t statistic, n) over the seeds both measured."""
    common = sorted(set(a.seeds) & set(b.seeds))
    if len(common) < 2:
        return None
    diffs = [a.seeds[s] - b.seeds[s] for s in common]
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    t = math.inf * (1 if mean > 0 else -1) if sd == 0 and mean != 0 else 0.0
    if sd > 0:
        t = mean / (sd / math.sqrt(len(diffs)))
    return mean, t, len(diffs)


def gap(a: Cell, b: Cell, direction: int, paired: bool = False) -> Gap:
    """Compare two measured cells. The spread is the larger std. 'better'/'WORSE' (for a, given
    the direction) need |diff| > spread, or with paired=True (the same seeds and prompts, or the
    same tokens) a one-sided paired t-test over seeds at 5%; else 'unclear'."""
    diff = a.mean - b.mean
    spread = max(a.std or 0.0, b.std or 0.0)
    if diff == 0:
        return Gap(diff, spread, "identical", "identical")
    sign = "better" if diff * direction > 0 else "WORSE"
    if abs(diff) > spread and (a.std is not None or b.std is not None):
        return Gap(diff, spread, sign, f"beyond the seed spread {spread:.2g}")
    test = paired_t(a, b) if paired else None
    if test is not None:
        _, t, n = test
        if abs(t) > _T95[min(n - 1, len(_T95)) - 1]:
            return Gap(diff, spread, sign, f"paired t-test over {n} seeds, t = {t:.2f}")
    why = f"within the seed spread {spread:.2g}" if spread else "one seed: no spread"
    return Gap(diff, spread, "unclear", why)


def _directional(summary, a: str, b: str):
    out = []
    for key, title, direction in TABLE_METRICS:
        if direction == 0:
            continue
        ca, cb = summary[a].get(key, EMPTY), summary[b].get(key, EMPTY)
        if ca.mean is None or cb.mean is None:
            continue
        kind = gap(ca, cb, direction, paired=True).kind
        out.append(("unclear" if kind == "identical" else kind, (key, title, direction)))
    return out


def headline(summary, pairs: Sequence[Tuple[str, str]]) -> List[str]:
    """One line per pair: on how many directional metrics A is better / worse / unclear."""
    lines = []
    for a, b in pairs:
        if a not in summary or b not in summary:
            continue
        counts = {"better": [], "WORSE": [], "unclear": []}
        for verdict, (_, title, _) in _directional(summary, a, b):
            counts[verdict].append(title)
        lines.append(
            f"- **{a} vs {b}**: better on {len(counts['better'])} "
            f"({', '.join(counts['better']) or '-'}), worse on {len(counts['WORSE'])} "
            f"({', '.join(counts['WORSE']) or '-'}), no clear difference on "
            f"{len(counts['unclear'])} metrics."
        )
    return lines


def verdicts(summary, pairs: Sequence[Tuple[str, str]]) -> List[str]:
    """One statement per pair and directional metric."""
    lines = []
    for a, b in pairs:
        if a not in summary or b not in summary:
            continue
        for key, title, direction in TABLE_METRICS:
            ca, cb = summary[a].get(key, EMPTY), summary[b].get(key, EMPTY)
            if direction == 0 or ca.mean is None or cb.mean is None:
                continue
            g = gap(ca, cb, direction, paired=True)
            verdict = {
                "identical": "identical",
                "unclear": "no clear difference",
                "better": f"{a} better",
                "WORSE": f"{a} WORSE",
            }[g.kind]
            lines.append(
                f"- {title}: {a} {ca.mean:.4g} vs {b} {cb.mean:.4g} (diff {g.diff:+.3g}, "
                f"{g.why}): {verdict}"
            )
    return lines


def _bar_line(
    what: str,
    a: Cell,
    b: Cell,
    names: Tuple[str, str],
    direction: int,
    paired: bool,
    tie_ok: bool = False,
) -> str:
    if a.mean is None or b.mean is None:
        return f"- {what}: not measured"
    g = gap(a, b, direction, paired)
    if g.kind == "better":
        verdict = "met"
    elif tie_ok and g.kind in ("unclear", "identical"):
        # A "<=" bar inside the seed spread is not shown either way: never "met".
        verdict = "no clear difference (the bar is <=: not exceeded beyond the seed spread)"
    elif g.kind == "WORSE":
        verdict = "NOT met"
    else:
        verdict = "no clear difference"
    return (
        f"- {what}: {names[0]} {a.mean:.5f} vs {names[1]} {b.mean:.5f} (diff {g.diff:+.2g}, "
        f"{g.why}): {verdict}"
    )


def bar_check(
    summary,
    pr2_labels: Sequence[str],
    sft_eval: Optional[dict] = None,
    drift_range: Tuple[float, float] = (0.05, 0.15),
) -> List[str]:
    """The demo's acceptance bar, computed: drift in range; per PR2 variant on R2 its replayed
    route beats R2's on the same tokens at mini-steps >= 2; clip fraction pr2 <= r2 < none;
    greedy accuracy after RL above the warm start in every mode."""
    lines = []
    key = "drift/expert_change_per_update/mean"
    change = {m: summary[m].get(key, EMPTY) for m in summary}
    change = {m: c for m, c in change.items() if c.mean is not None}
    if change:
        # The model's own drift is the no-replay run's: replaying recorded routes changes how
        # the router trains (it gets gradients only through the replayed experts).
        natural = change.get("none")
        others = [c.mean for m, c in change.items() if m != "none"]
        if natural is not None:
            inside = drift_range[0] <= natural.mean <= drift_range[1]
            lines.append(
                f"- expert change per update without replay (none): {_fmt(natural)}; bar "
                f"{drift_range[0]:.0%}-{drift_range[1]:.0%}: {'met' if inside else 'NOT met'}"
            )
        if others:
            lines.append(
                f"- expert change per update with replay (other modes): {min(others):.4f} to "
                f"{max(others):.4f}"
            )
        lines.append("")
    clip = "rl/clip_fraction"
    get = lambda label, key: summary.get(label, {}).get(key, EMPTY)  # noqa: E731
    lines.append(
        _bar_line(
            "clip fraction r2 < none",
            get("r2", clip),
            get("none", clip),
            ("r2", "none"),
            -1,
            paired=True,
        )
    )
    for label in pr2_labels:
        lines += [
            "",
            f"**{label}**",
            "",
            _bar_line(
                "replayed route vs live top-k at mini-steps >= 2, against R2's route on the "
                "same tokens",
                get(label, "drift/replayed_topk_accuracy/ministep_ge2"),
                get(label, "drift/stale_topk_accuracy/ministep_ge2"),
                ("PR2", "R2"),
                +1,
                paired=True,
            ),
            _bar_line(
                f"clip fraction {label} <= r2",
                get(label, clip),
                get("r2", clip),
                (label, "r2"),
                -1,
                paired=True,
                tie_ok=True,
            ),
        ]
    if sft_eval and "eval/exact_match" in sft_eval:
        warm = sft_eval["eval/exact_match"]
        lines += ["", f"**greedy exact match after RL vs the warm start ({warm:.3f})**", ""]
        for label in summary:
            c = get(label, "eval/exact_match")
            if c.mean is None:
                continue
            seeds_above = sum(v > warm for v in c.seeds.values())
            ok = seeds_above == len(c.seeds)
            lines.append(
                f"- {label}: {_fmt(c)} ({seeds_above} of {len(c.seeds)} seeds above): "
                f"{'met' if ok else 'NOT met'}"
            )
    return lines


def ministep_tables(
    runs: Dict[str, Dict[int, List[dict]]], num_ministeps: int, window: float = 0.5
) -> str:
    """Per mini-step i (watched tokens: no padding, mean ± std over seeds): every mode's replayed-route
    accuracy and clip fraction; for PR2 modes the paired comparison on the same tokens of the
    replayed (predicted) route and R2's TopK(p_old) against the live top-k."""

    def c(label: str, key: str) -> str:
        return _fmt(cell({s: run_window_mean(h, key, window) for s, h in runs[label].items()}))

    labels = list(runs)
    lines = ["| mini-step | " + " | ".join(f"{m} acc / clip" for m in labels) + " |"]
    lines.append("|---|" + "---|" * len(labels))
    for i in range(1, num_ministeps + 1):
        row = [
            f"{c(m, f'drift/replayed_topk_accuracy/ministep_{i}')} / "
            f"{c(m, f'rl/clip_fraction/ministep_{i}')}"
            for m in labels
        ]
        lines.append(f"| {i} | " + " | ".join(row) + " |")
    pr2 = [m for m in labels if m.startswith("pr2")]
    if pr2:
        lines += [
            "",
            "| mini-step | " + " | ".join(f"{m}: PR2 / R2 acc (same tokens)" for m in pr2) + " |",
        ]
        lines.append("|---|" + "---|" * len(pr2))
        for i in range(1, num_ministeps + 1):
            row = [
                f"{c(m, f'drift/replayed_topk_accuracy/ministep_{i}')} / "
                f"{c(m, f'drift/stale_topk_accuracy/ministep_{i}')}"
                for m in pr2
            ]
            lines.append(f"| {i} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def health_table(runs: Dict[str, Dict[int, List[dict]]], window: float = 0.5) -> str:
    """Per PR2 label and MoE layer, the paper's predictor health metrics at mini-steps >= 2
    (window means, mean over seeds) against its thresholds."""
    labels = [m for m in runs if m.startswith("pr2")]
    if not labels:
        return "n/a (no PR2 run)"
    layers = sorted(
        {
            int(k.rsplit("_", 1)[1])
            for h in runs[labels[0]].values()
            for row in h
            for k in row
            if k.startswith("pr2/predictive_topk_accuracy/layer_")
        }
    )
    head = ["label", "layer"] + [f"{t} ({op} {thr:g})" for _, t, op, thr in HEALTH]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label in labels:
        for layer in layers:
            cells = [label, str(layer)]
            for key, _, op, thr in HEALTH:
                c = cell(
                    {
                        s: run_window_mean(h, f"{key}/layer_{layer}", window)
                        for s, h in runs[label].items()
                    }
                )
                if c.mean is None:
                    cells.append("n/a")
                    continue
                ok = {">": c.mean > thr, "<": c.mean < thr, "~": c.mean < 10 * thr}[op]
                cells.append(f"{_fmt(c)} {'ok' if ok else 'OUT'}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


PLOTS: Tuple[Tuple[str, str], ...] = (
    ("rl/reward", "reward"),
    ("rl/clip_fraction", "clip_fraction"),
    ("drift/replayed_topk_accuracy/ministep_ge2", "replayed_topk_accuracy_ministep_ge2"),
    ("drift/expert_change_per_update/mean", "expert_change_per_update"),
    ("rl/mean_abs_log_ratio", "mean_abs_log_ratio"),
)


def _band(ax, xs, per_seed_rows: List[List[float]], label: str, **kw) -> None:
    means = [statistics.fmean(v) for v in per_seed_rows]
    stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in per_seed_rows]
    line = ax.plot(xs, means, label=label, marker="." if len(xs) < 40 else None, **kw)[0]
    ax.fill_between(
        xs,
        [m - s for m, s in zip(means, stds)],
        [m + s for m, s in zip(means, stds)],
        color=line.get_color(),
        alpha=0.2,
    )


def plot_curves(runs: Dict[str, Dict[int, List[dict]]], out_dir: str) -> List[str]:
    """One PNG per plotted metric: mean over seeds per step with a ± std band, one line per
    label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for key, name in PLOTS:
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        plotted = False
        for label, by_seed in runs.items():
            steps = max((len(h) for h in by_seed.values()), default=0)
            xs, rows = [], []
            for t in range(steps):
                vals = _finite(
                    [h[t].get(key, float("nan")) for h in by_seed.values() if t < len(h)]
                )
                if vals:
                    xs.append(t + 1)
                    rows.append(vals)
            if xs:
                _band(ax, xs, rows, label)
                plotted = True
        if not plotted:
            plt.close(fig)
            continue
        ax.set_xlabel("RL step")
        ax.set_ylabel(key)
        ax.set_title(f"{key} (mean ± std over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{name}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_ministep_accuracy(
    runs: Dict[str, Dict[int, List[dict]]], num_ministeps: int, path: str, window: float = 0.5
) -> Optional[str]:
    """Route top-k accuracy against mini-step i: each PR2 label's replayed (predicted) route
    and R2's TopK(p_old) on the same tokens, and the r2 run's replay (mean ± std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = list(range(1, num_ministeps + 1))
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    plotted = False
    curves = [(m, "drift/replayed_topk_accuracy", m) for m in runs if m.startswith("pr2")]
    curves += [
        (m, "drift/stale_topk_accuracy", f"R2 route, same tokens as {m}")
        for m in runs
        if m.startswith("pr2")
    ]
    curves += [("r2", "drift/replayed_topk_accuracy", "r2 run")] if "r2" in runs else []
    for label, key, name in curves:
        rows = [
            _finite(
                [run_window_mean(h, f"{key}/ministep_{i}", window) for h in runs[label].values()]
            )
            for i in xs
        ]
        if all(rows):
            _band(ax, xs, rows, name, linestyle="--" if "R2 route" in name else "-")
            plotted = True
    if not plotted:
        plt.close(fig)
        return None
    ax.set_xlabel("mini-step i")
    ax.set_ylabel("|route ∩ live top-k| / k (tokens the loss depends on)")
    ax.set_title("route top-k accuracy vs mini-step (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(
    path: str,
    summary,
    labels: Sequence[str],
    seeds: Sequence[int],
    settings: Dict[str, object],
    n1_check: Optional[Dict[str, object]],
    plots: Sequence[str],
    timings: Dict[str, float],
    sft_eval: Optional[Dict[str, float]] = None,
    per_ministep: Optional[str] = None,
    pairs: Sequence[Tuple[str, str]] = (("pr2", "r2"), ("pr2-r3", "r3")),
    bar_labels: Sequence[str] = ("pr2",),
    smoke_test: bool = False,
    health: Optional[str] = None,
) -> str:
    """Write the markdown report; returns its text."""
    lines = ["# megatron-pr2 RL demo: routing-mode comparison", ""]
    if smoke_test:
        lines += [
            "**SMOKE TEST (`--quick`): a few steps of a tiny run. These numbers only show that "
            "the pipeline works; they measure nothing about the routing modes.**",
            "",
        ]
    lines += [
        "GRPO on synthetic arithmetic with a tiny Megatron-Core MoE GPT (trainer fp32, rollout "
        "engine bf16). Same SFT warm start, same prompt and sampling seeds for every mode. "
        "Each number is the mean over the last half of a run's steps, then mean ± std over "
        f"seeds {list(seeds)}. A difference counts only beyond the seed spread or by a paired "
        "t-test over seeds (5%); otherwise it is reported as 'no clear difference'.",
        "",
        "## Results",
        "",
        markdown_table(summary, labels),
        "",
        "'expert change per update' is the fraction of (token, MoE layer, slot) whose live top-k "
        "changed after one optimizer step, on the same tokens (mini-step 2 vs the old-policy "
        "pass, over the tokens the policy loss depends on: prompt and response, no padding). "
        "'replayed route acc' is |replayed route ∩ live top-k| / k on those tokens (none: "
        "nothing is replayed); 'R2 route acc (same tokens)' is "
        "|TopK(p_old) ∩ live top-k| / k on the same tokens of the same run: the paired baseline "
        "of PR2. 'cache' rows are the library's replay telemetry on the predictor-cache tokens.",
        "",
        "## Acceptance bar (computed)",
        "",
    ]
    lines += bar_check(summary, bar_labels, sft_eval)
    lines += ["", "## Settings", ""]
    lines += [f"- {k}: {v}" for k, v in settings.items()]
    if sft_eval:
        lines += [
            f"- SFT warm start (greedy, held-out): exact match "
            f"{sft_eval.get('eval/exact_match', float('nan')):.3f}, "
            f"reward {sft_eval.get('eval/reward', float('nan')):.3f}"
        ]
    pairs = list(pairs) + [("r2", "none"), ("r3", "none")]
    lines += ["", "## Headline", ""]
    lines += headline(summary, pairs)
    lines += ["", "## Per mini-step (tokens the loss depends on)", "", per_ministep or "n/a", ""]
    lines += [
        "## Predictor health per layer (mini-steps >= 2, paper thresholds)",
        "",
        health or "n/a",
        "",
    ]
    lines += ["## Verdicts", ""]
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
