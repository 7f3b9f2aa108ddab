# Markdown tables from bench_router JSON results (for benchmarks/README.md).
#
# Usage: python -m benchmarks.report benchmarks/results/cpu_small.json [more.json ...]
# Prints, per shape: the target ratios for every timed part (median [q1, q3] of paired
# per-round ratios), the layer ratios derived from the router delta, and op / host-sync counts.

import json
import sys
from typing import List

KEY_RATIOS = (
    ("predict_record / stock", 1.05),
    ("replay+ploss / stock", 1.05),
    ("replay+ploss+tel / stock", None),
    ("pr2 replay / megatron replay", 1.0),
    ("pr2 replay+tel / megatron replay", None),
)
PART_LABELS = {
    "layer": "layer fwd+bwd",
    "layer_fwd": "layer fwd (no_grad)",
    "router": "router fwd+bwd",
    "router_fwd": "router fwd (no_grad)",
}


def cell(ratio: dict) -> str:
    return f"{ratio['median']:.3f} [{ratio['q1']:.2f}, {ratio['q3']:.2f}]"


def render(path: str) -> str:
    with open(path) as f:
        results = json.load(f)
    machine = results["machine"]
    lines: List[str] = [
        f"#### {path}",
        "",
        f"machine: {machine.get('gpu') or machine['cpu']} ({machine['device']}, "
        f"{machine['threads']} thread(s)), torch {machine['torch']}, megatron-core "
        f"{machine['megatron_core']}, megatron-pr2 {machine.get('megatron_pr2_commit', '?')}; "
        f"argv: `{' '.join(results['argv'])}`",
        "",
    ]
    for name, entry in results["shapes"].items():
        parts = [p for p in ("layer", "layer_fwd", "router", "router_fwd") if p in entry["parts"]]
        derived = [d for d in ("layer", "layer_fwd") if f"derived_{d}_ratios" in entry]
        header = (
            ["ratio (target)"]
            + [PART_LABELS[p] for p in parts]
            + [f"{PART_LABELS[d]}, derived" for d in derived]
        )
        lines += [
            f"**{name}** (stock: "
            + ", ".join(
                f"{PART_LABELS[p]} {entry['parts'][p]['times_ms']['stock']['median']:.1f} ms"
                for p in parts
            )
            + ")",
            "",
        ]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for label, target in KEY_RATIOS:
            row = [f"{label} ({'<= %.2f' % target if target else '-'})"]
            for p in parts:
                ratio = entry["parts"][p]["ratios"].get(label)
                row.append(cell(ratio) if ratio else "n/a")
            for d in derived:
                value = entry[f"derived_{d}_ratios"].get(label)
                row.append(f"{value:.4f}" if value is not None else "n/a")
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        counts = entry.get("op_counts")
        if counts:
            lines.append("| variant | compute ops / router fwd+bwd | host syncs |")
            lines.append("|---|---|---|")
            for variant, c in counts.items():
                lines.append(f"| {variant} | {c['compute_ops']} | {c['host_syncs']} |")
            lines.append("")
    return "\n".join(lines)


def main(argv: List[str]) -> None:
    if not argv:
        raise SystemExit("usage: python -m benchmarks.report RESULTS.json [...]")
    print("\n\n".join(render(path) for path in argv))


if __name__ == "__main__":
    main(sys.argv[1:])
