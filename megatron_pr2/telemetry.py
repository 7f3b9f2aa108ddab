# Replay health metrics per MoE layer (the numbers the PR2 authors log).
#
# Shapes: T router rows of one microbatch, k top-k, E experts, C cached tokens of this rank.
#
#   route_topk_accuracy       |replayed top-k ∩ live top-k| / k over router rows
#   flip_rate                 fraction of router rows whose replayed and live top-k differ
#   r2_topk_accuracy          |TopK(p_old) ∩ TopK(p_live)| / k on the cached tokens: plain R2
#   predictive_topk_accuracy  |I_hat ∩ TopK(p_live)| / k on the cached tokens, I_hat = the replayed
#                             route, TopK(p_old + h_old W_p) with W_p as it was when recorded
#   predictor_loss            the predictor objective on the cached tokens
#   bias_to_logit_ratio       mean |h_old W_p| / mean |p_old|
#
# Sums accumulate on the device (no host sync per layer or microbatch); `LayerStats.means`
# converts once when the caller asks for the metrics.

import functools
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch

METRIC_NAMES = (
    "route_topk_accuracy",
    "flip_rate",
    "r2_topk_accuracy",
    "predictive_topk_accuracy",
    "predictor_loss",
    "bias_to_logit_ratio",
)


def topk_overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[...] number of experts two [..., k] top-k index sets share."""
    return (a.unsqueeze(-1) == b.unsqueeze(-2)).any(dim=-1).sum(dim=-1)


@functools.lru_cache(maxsize=64)
def telemetry_rows(num_rows: int, stride: int, device: torch.device) -> Optional[torch.Tensor]:
    """Sorted uniform sample of ceil(num_rows / stride) router rows, fixed per (rows, stride);
    None for stride 1. Random rather than every n-th row: rows are sequence-major (s * B + b),
    so a plain stride sharing a factor with B would only ever sample some of the sequences."""
    if stride == 1:
        return None
    generator = torch.Generator().manual_seed(num_rows)
    rows = torch.randperm(num_rows, generator=generator)[: -(-num_rows // stride)]
    return rows.sort().values.to(device)


@dataclass
class LayerStats:
    """Token-weighted sums of the metrics of one MoE layer over a routing() context."""

    sums: Dict[str, torch.Tensor] = field(default_factory=dict)
    counts: Dict[str, int] = field(default_factory=dict)

    def add(self, name: str, value: torch.Tensor, count: int) -> None:
        value = value.detach().double() * count
        self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.counts[name] = self.counts.get(name, 0) + count

    def mean(self, name: str) -> float:
        """Mean over the measured tokens (one host sync), NaN where never measured."""
        count = self.counts.get(name, 0)
        return float(self.sums[name]) / count if count else float("nan")


def observe_replay(
    stats: LayerStats,
    topk: int,
    live_topk: Callable[[torch.Tensor], torch.Tensor],
    target: torch.Tensor,
    flat_logits: torch.Tensor,
    live: Optional[torch.Tensor],
    stride: int,
) -> None:
    """Replayed top-k `target` [T, k] against the live router's (`live` [T, k] when already
    computed, else top-k of `flat_logits` [T, E] on the sampled rows)."""
    with torch.no_grad():
        rows = telemetry_rows(target.shape[0], stride, target.device)
        if live is None:
            live = live_topk(flat_logits if rows is None else flat_logits[rows])
        elif rows is not None:
            live = live[rows]
        overlap = topk_overlap(target if rows is None else target[rows], live)
        tokens = len(overlap)
        stats.add("route_topk_accuracy", overlap.float().mean() / topk, tokens)
        stats.add("flip_rate", (overlap < topk).float().mean(), tokens)


def observe_predictor(
    stats: LayerStats,
    topk: int,
    live_topk: Callable[[torch.Tensor], torch.Tensor],
    live_logits: torch.Tensor,
    old_logits: torch.Tensor,
    offset: torch.Tensor,
    loss: torch.Tensor,
    replayed: torch.Tensor,
) -> None:
    """Predictor health on the C cached tokens: live_logits, old_logits (p_old), offset
    (h_old W_p with the current W_p) are [C, E]; `loss` is the predictor objective on them;
    `replayed` [C, k] is the route replayed for them (the predicted route of the record pass:
    the current W_p has since trained on earlier mini-steps, so TopK(p_old + offset) is not
    what was replayed from mini-step 2 on)."""
    with torch.no_grad():
        offset = offset.detach()
        live_top = live_topk(live_logits)
        n = len(live_top)
        r2 = topk_overlap(live_topk(old_logits), live_top).float().mean() / topk
        predicted = topk_overlap(replayed, live_top).float().mean() / topk
        ratio = offset.abs().mean() / old_logits.abs().mean().clamp(min=1e-12)
        stats.add("r2_topk_accuracy", r2, n)
        stats.add("predictive_topk_accuracy", predicted, n)
        stats.add("predictor_loss", loss, n)
        stats.add("bias_to_logit_ratio", ratio, n)
