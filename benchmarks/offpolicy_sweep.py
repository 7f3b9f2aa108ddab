# Off-policy sweep of the RL demo: N mini-steps per rollout batch x routing modes x seeds, one
# command, one report.
#
#   python -m benchmarks.offpolicy_sweep                       # drift preset, N 1 2 4 8, 3 seeds
#   python -m benchmarks.offpolicy_sweep --ministeps 1 4 --seeds 0 1 --steps 10   # smaller
#
# Every cell is a demo run (megatron_pr2.rl.demo.run_job) from the same cached SFT warm start;
# runs with the same seed see the same prompts. Output (--run-dir, default runs/offpolicy_sweep):
#   N<n>/<label>/seed<k>/{tb/, result.json[, lab/]}   one run (no checkpoints)
#   plots/*.png          clip fraction, ratios outside [0.5, 2], replayed / R2 route accuracy at
#                        mini-steps >= 2 vs N; route accuracy vs mini-step at the largest N;
#                        reward curves per N (all with mean ± std over seeds)
#   sweep.md, sweep.json the tables (mean ± std over seeds; verdicts as in the demo report)
# N = 1 checks that R2 and PR2 with the learned head are bit-identical (no predictor loss).

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Dict, List, Optional

from megatron_pr2.config import PREDICTOR_KINDS

SWEEP_KEYS = (
    ("rl/clip_fraction", "clip fraction"),
    ("rl/ratio_outside_0.5_2", "ratios outside [0.5, 2]"),
    ("rl/mean_abs_log_ratio", "mean |log r|"),
    ("drift/replayed_topk_accuracy/ministep_ge2", "replayed route acc, mini-steps >= 2"),
    ("drift/stale_topk_accuracy/ministep_ge2", "R2 route acc (same tokens), mini-steps >= 2"),
    ("drift/expert_change_per_update/mean", "expert change per update"),
    ("rl/reward", "reward"),
    ("eval/exact_match", "greedy EM after RL"),
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.offpolicy_sweep", description=__doc__)
    p.add_argument("--preset", default="drift", help="demo preset (default: drift)")
    p.add_argument("--ministeps", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--modes", nargs="+", default=["none", "r2", "pr2"])
    p.add_argument(
        "--predictors", nargs="+", choices=PREDICTOR_KINDS, default=["linear", "lookahead"]
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=None, help="RL steps per run (preset's default)")
    p.add_argument("--run-dir", default="runs/offpolicy_sweep")
    p.add_argument("--workers", type=int, default=None, help="parallel runs (default 2 on CPU)")
    p.add_argument("--lab-dump-fraction", type=float, default=0.0)
    p.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="FIELD=VALUE",
        help="override preset fields (megatron_pr2.rl.demo.Preset), e.g. sft_steps=200",
    )
    return p


def _overrides(pairs: List[str], preset) -> dict:
    """FIELD=VALUE strings -> typed Preset field values (the type of the field's default)."""
    out = {}
    for pair in pairs:
        field, sep, value = pair.partition("=")
        if not sep or not hasattr(preset, field):
            raise ValueError(f"--set {pair!r}: expected FIELD=VALUE with a Preset field")
        default = getattr(preset, field)
        if isinstance(default, bool):
            out[field] = value.lower() in ("1", "true", "yes")
        elif default is None or isinstance(default, (int, float)):
            out[field] = None if value == "None" else type(default or 0.0)(value)
        else:
            out[field] = type(default)(value)
    return out


def _labels(modes: List[str], predictors: List[str]) -> List[tuple]:
    out = []
    for mode in modes:
        if mode.startswith("pr2"):
            out += [(f"{mode}-{p}", mode, p) for p in predictors]
        else:
            out.append((mode, mode, None))
    return out


def _band_plot(path: str, xs, series: Dict[str, List[List[float]]], xlabel: str, ylabel: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megatron_pr2.rl.report import _band

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, rows in series.items():
        keep = [(x, r) for x, r in zip(xs, rows) if r]
        if keep:
            _band(
                ax,
                [x for x, _ in keep],
                [r for _, r in keep],
                name,
                linestyle="--" if "R2 route" in name else "-",
            )
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"{ylabel} (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from megatron_pr2.rl import demo, report

    if not torch.cuda.is_available():
        demo.quiet_te_apex_warnings(announce=True)
        from megatron_pr2.cpu import apply_cpu_patches

        apply_cpu_patches()

    t0 = time.time()
    preset = dataclasses.replace(
        demo.PRESETS[args.preset],
        seeds=tuple(args.seeds),
        lab_dump_fraction=args.lab_dump_fraction,
        **({"steps": args.steps} if args.steps else {}),
    )
    preset = dataclasses.replace(preset, **_overrides(args.set, preset))
    root = os.path.abspath(args.run_dir)
    _, _, _, sft_eval = demo.prepare(root, preset)
    workers = args.workers or (1 if torch.cuda.is_available() else min(2, os.cpu_count() or 1))
    labels = _labels(args.modes, args.predictors)
    jobs = []
    for n in args.ministeps:
        for seed in args.seeds:
            for label, mode, predictor in labels:
                run_dir = os.path.join(root, f"N{n}", label, f"seed{seed}")
                demo._clean_run_dir(run_dir)
                job = dict(
                    root=root,
                    preset=dataclasses.asdict(preset),
                    mode=mode,
                    seed=seed,
                    label=label,
                    run_dir=run_dir,
                    num_ministeps=n,
                    save_checkpoints=False,
                    progress=True,
                    N=n,
                )
                if predictor:
                    job["predictor"] = predictor
                jobs.append(job)
    results = demo._run_jobs(jobs, workers)
    runs: Dict[int, Dict[str, Dict[int, list]]] = {}
    evals: Dict[int, Dict[str, Dict[int, dict]]] = {}
    identical = {}
    for job, res in zip(jobs, results):
        runs.setdefault(job["N"], {}).setdefault(job["label"], {})[job["seed"]] = res["history"]
        evals.setdefault(job["N"], {}).setdefault(job["label"], {})[job["seed"]] = res.get(
            "eval", {}
        )
        with open(os.path.join(job["run_dir"], "result.json"), "w") as f:
            json.dump(report.per_seed_results(res["history"], res.get("eval", {})), f, indent=1)
        if job["N"] == 1 and job["label"] in ("r2", "pr2-linear"):
            identical.setdefault(job["seed"], {})[job["label"]] = res
    n1 = {
        seed: demo.n1_identity(pair["r2"], pair["pr2-linear"])["verdict"]
        for seed, pair in identical.items()
        if len(pair) == 2
    }
    keys = [k for k, _ in SWEEP_KEYS]
    summary = {n: report.summarize(runs[n], evals[n], keys=keys) for n in runs}
    plots_dir = os.path.join(root, "plots")
    os.makedirs(plots_dir, exist_ok=True)
    xs = sorted(runs)
    names = [label for label, _, _ in labels]
    plots = []
    for key, title in SWEEP_KEYS[:3]:
        series = {m: [list(summary[n][m][key].seeds.values()) for n in xs] for m in names}
        plots.append(
            _band_plot(
                os.path.join(plots_dir, key.replace("/", "_") + "_vs_N.png"),
                xs,
                series,
                "N (mini-steps per rollout batch)",
                title,
            )
        )
    acc = {}
    for m in names:
        acc[m] = [list(summary[n][m][keys[3]].seeds.values()) for n in xs]
        if m.startswith("pr2"):
            acc[f"R2 route, same tokens as {m}"] = [
                list(summary[n][m][keys[4]].seeds.values()) for n in xs
            ]
    plots.append(
        _band_plot(
            os.path.join(plots_dir, "route_accuracy_ge2_vs_N.png"),
            xs,
            acc,
            "N (mini-steps per rollout batch)",
            "route top-k acc, mini-steps >= 2",
        )
    )
    for n in xs:
        plots += report.plot_curves(runs[n], os.path.join(plots_dir, f"N{n}"))
    by_step = report.plot_ministep_accuracy(
        runs[xs[-1]], xs[-1], os.path.join(plots_dir, f"route_accuracy_vs_ministep_N{xs[-1]}.png")
    )
    plots += [by_step] if by_step else []
    lines = [
        f"# Off-policy sweep ({args.preset} preset)",
        "",
        f"N in {xs}, seeds {args.seeds}, {preset.steps} RL steps per run; each cell is the mean "
        "over the last half of a run's steps, then mean ± std over seeds. Warm start greedy EM "
        f"{sft_eval.get('eval/exact_match', float('nan')):.3f}. Total {time.time() - t0:.0f} s.",
        "",
        f"N = 1, R2 vs PR2 (linear head) bit-identical per seed: {n1 or 'not run'}",
        "",
    ]
    for key, title in SWEEP_KEYS:
        lines += [
            f"## {title}",
            "",
            "| N | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(names),
        ]
        for n in xs:
            cells = [report._fmt(summary[n][m][key]) for m in names]
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines.append("")
    pr2_labels = [m for m in names if m.startswith("pr2-") and not m.startswith("pr2-r3")]
    for n in xs:
        if n < 2:
            continue
        lines += [f"## Bar at N = {n}", ""]
        lines += report.bar_check(summary[n], pr2_labels, sft_eval)
        lines.append("")
    lines += ["## Plots", ""] + [
        f"![{os.path.basename(p)}]({os.path.relpath(p, root)})" for p in plots
    ]
    with open(os.path.join(root, "sweep.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(root, "sweep.json"), "w") as f:
        json.dump(
            {
                str(n): {m: {k: c._asdict() for k, c in row.items()} for m, row in s.items()}
                for n, s in summary.items()
            }
            | {"n1_identical": n1, "seconds": time.time() - t0},
            f,
            indent=1,
            default=str,
        )
    print("\n".join(lines[:40]))
    print(f"\nsweep report: {os.path.join(root, 'sweep.md')}")
    return 0 if all(v == "IDENTICAL" for v in n1.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
