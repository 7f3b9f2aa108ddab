# The question a PR2 router asks its session and the session's answer (RouteAnswer), and what a
# router records for one microbatch (Recorded). Plain data: the router (router.py) routes, the
# session (session.py) supplies and keeps.
#
# Shapes: T router rows of one microbatch on this rank, k top-k, C_local cached rows, H hidden,
# E experts.

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_pr2.telemetry import LayerStats


@dataclass
class RouteAnswer:
    """The session's answer to a router's question "how do I route this microbatch?"."""

    microbatch: int
    """Index of the microbatch in the routing() context (forward order)."""
    recompute: bool
    """True for an activation-recompute forward (inside autograd's backward)."""
    stats: LayerStats
    """Where replay telemetry of this router accumulates."""
    target: Optional[torch.Tensor] = None
    """[T, k] top_indices to force (replay, or a recompute of a recorded microbatch), in the
    narrowest integer dtype that holds them (int16 when -1 marks a missing route under
    missing_route_policy="fallback")."""
    dropped: Optional[torch.Tensor] = None
    """[T, k] recorded capacity drops to re-apply (None: no capacity factor)."""
    fill_missing: bool = False
    """Some rows of `target` are -1 and take the live top-k."""
    cache_rows: Optional[torch.Tensor] = None
    """[C_local] router rows of the predictor cache: predict_record caches them; replay computes
    the predictor loss on them."""
    cache_hidden: Optional[torch.Tensor] = None
    """Replay: [C_local, H] cached router inputs h_old of this layer."""
    cache_logits: Optional[torch.Tensor] = None
    """Replay: [C_local, E] cached logits p_old of this layer."""
    cache_share: float = 1.0
    """C_local / C: this rank's share of the microbatch's cached tokens."""
    train_predictor: bool = False
    """Attach the predictor loss to the backward pass."""
    telemetry: bool = False
    """Accumulate replay telemetry into `stats`."""
    keep_predictor_grads: bool = False
    """Attach an exact-zero predictor gradient (no predictor loss on this call): on the context's
    last microbatch, whose backward Megatron's DDP waits on to launch the predictor's bucket."""


@dataclass
class Recorded:
    """One router's record of one microbatch (router rows; the session keeps host copies)."""

    top_indices: torch.Tensor
    """[T, k] experts routed to."""
    dropped: Optional[torch.Tensor]
    """[T, k] capacity drops (None without a capacity factor)."""
    hidden: Optional[torch.Tensor] = None
    """predict_record: [C_local, H] cached router inputs h_old."""
    logits: Optional[torch.Tensor] = None
    """predict_record: [C_local, E] cached logits p_old without the predictor."""
