# PR2Config: the settings of Predictive Routing Replay, passed to the router builder by apply_pr2.
#
# PR2 settings never go into Megatron-Core's TransformerConfig (MLA and other model families replace
# that class); the router reads the MoE settings from TransformerConfig and these from PR2Config.

import math
import numbers
from dataclasses import dataclass, fields
from typing import Optional

PREDICTOR_KINDS = ("linear", "lowrank", "bias", "lookahead")
LOSS_KINDS = ("kl-post", "delta-kl", "l2", "sigmoid-kl")
PREDICTOR_UPDATES = ("adam", "sgd")
MISSING_ROUTE_POLICIES = ("error", "fallback")
CACHE_DTYPES = ("fp32", "bf16")


@dataclass(frozen=True)
class PR2Config:
    """Settings of the PR2 evolution predictor, its loss and the replay policy."""

    predictor: str = "linear"
    """Evolution predictor kind. "linear": a hidden x num_experts head W_p without bias,
    zero-initialised (the paper's default, so PR2 starts exactly as R2). "lowrank": W_p = A B with
    rank `predictor_rank` (B zero-initialised). "bias": one learned logit offset per expert.
    "lookahead": weight-space lookahead without learned parameters, W_p = lookahead_scale x the
    router weight's change over the previous rollout batch (the loss is then only reported). It
    observes the router weight as the model holds it: under bf16 mixed precision that is the
    bf16 copy (the fp32 main weight lives in the optimizer), whose rounding hides drifts smaller
    than one bf16 step. The RL demo trains in fp32."""

    predictor_rank: int = 16
    """Rank of the "lowrank" predictor; ignored by the other kinds."""

    lookahead_scale: float = 0.5
    """Fraction of the previous rollout batch's router-weight change that the "lookahead"
    predictor extrapolates: with N optimizer steps per batch, mini-step i has seen i - 1 of them,
    so 0.5 aims at the middle of the next batch. Ignored by the other kinds."""

    loss: str = "kl-post"
    """Predictor objective. "kl-post" (paper): KL(softmax(p_live) || softmax(p_old + h_old W_p)).
    "delta-kl": KL(softmax(p_live - p_old) || softmax(h_old W_p)). "l2": mean squared error between
    p_old + h_old W_p and p_live. "sigmoid-kl": per-expert Bernoulli KL between sigmoid(p_live)
    and sigmoid(p_old + h_old W_p), for sigmoid routers with expert bias (DeepSeek-V3 style),
    whose top-k of sigmoid(p) + bias changes under a per-token logit shift that kl-post cannot
    see. p_live is always detached: only the predictor learns from it."""

    loss_coeff: float = 1.0
    """Multiplier of the predictor loss before it joins the policy loss's backward pass."""

    alpha: float = 100.0
    """Predictor learning-rate multiplier: the predictor trains at alpha x base lr (the paper
    sweeps 50, 1e2, 1e3, 1e4). Applied by `predictor_param_groups` / the Megatron optimizer hook."""

    predictor_update: str = "adam"
    """How the predictor's param group steps inside the model's Adam(W) optimizer. "adam": the
    optimizer's own update at alpha x lr. "sgd": the group runs Adam with beta1 = 0 and eps = 1,
    which is plain gradient descent at alpha x lr while |gradient| << 1 (predictor gradients
    are): Adam's per-element normalisation otherwise turns the noise of the KL gradient into
    steps of size lr in every element of W_p (measured: benchmarks/predictor_lab.py, README).
    At the paper's 30B scale the predictor gradients are far below Adam's eps = 1e-8, where
    Adam also reduces to (momentum) gradient descent."""

    predictor_weight_decay: float = 0.0
    """Decoupled (AdamW) weight decay of the predictor's param group: every optimizer step at
    predictor lr alpha x lr first shrinks W_p by the fraction alpha x lr x predictor_weight_decay
    (at most 1), so the head forgets the drift of earlier batches at that rate. 0 (the paper):
    W_p accumulates every batch's drift; where the router's drift does not persist from batch to
    batch (a router pulled back towards its start), the accumulated part predicts the wrong
    direction (measured: benchmarks/predictor_lab.py, README). Not applied on steps where the
    predictor is frozen (mini-steps before loss_start_ministep: lr 0)."""

    cache_tokens_per_sequence: int = 64
    """Tokens per sequence whose (h_old, p_old) the predict_record pass caches for the predictor
    loss, sub-sampled uniformly along the sequence (a fixed stride). 0 disables the cache (the
    predictor is then never trained); -1 caches every token."""

    cache_dtype: str = "fp32"
    """Storage dtype of the predictor cache (h_old and p_old) in host memory and on its way to the
    device: "fp32" (exact) or "bf16" (half the bytes and the host-to-device traffic; h_old usually
    is the bf16 router input already, p_old loses its low mantissa bits). The predictor and its
    loss compute in fp32 either way."""

    loss_start_ministep: int = 2
    """First training mini-step (1-based, within one rollout batch) that adds the predictor loss.
    The paper uses 2: at mini-step 1 the live router equals the recorded one, so there is no drift
    to learn from. With N = 1 mini-step the predictor never trains and PR2 equals R2."""

    missing_route_policy: str = "error"
    """What replay does when a token has no recorded route (routes marked missing with -1).
    "error": raise. "fallback": that token is routed by the live router (top-k of live scores)."""

    telemetry: bool = True
    """Compute per-layer health metrics (top-k accuracies, flip rate, predictor loss, bias-to-logit
    ratio) during replay. Costs one extra top-k per layer; turn off for benchmarks of the bare path."""

    telemetry_stride: int = 1
    """Measure the replay/live top-k accuracy and flip rate on every n-th router row only (an
    unbiased estimate at 1/n of the top-k cost; the predictor metrics already use only the cached
    rows). 1 = every row."""

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"PR2Config.{name}={getattr(self, name)!r}: {why}")

        # Types first: a bool is an int to isinstance, so `loss_start_ministep=True` would
        # otherwise pass as 1, and a float rank would be truncated far from the user's input.
        for f in fields(self):
            value = getattr(self, f.name)
            if not _has_type(value, f.type):
                raise bad(f.name, f"must be of type {_TYPE_NAMES[f.type]}")
        if self.predictor not in PREDICTOR_KINDS:
            raise bad("predictor", f"must be one of {PREDICTOR_KINDS}")
        if self.loss not in LOSS_KINDS:
            raise bad("loss", f"must be one of {LOSS_KINDS}")
        if self.predictor_update not in PREDICTOR_UPDATES:
            raise bad("predictor_update", f"must be one of {PREDICTOR_UPDATES}")
        if self.cache_dtype not in CACHE_DTYPES:
            raise bad("cache_dtype", f"must be one of {CACHE_DTYPES}")
        if self.missing_route_policy not in MISSING_ROUTE_POLICIES:
            raise bad("missing_route_policy", f"must be one of {MISSING_ROUTE_POLICIES}")
        if self.predictor_rank < 1:
            raise bad("predictor_rank", "must be an integer >= 1")
        for name in ("lookahead_scale", "loss_coeff", "alpha", "predictor_weight_decay"):
            if not math.isfinite(getattr(self, name)):
                raise bad(name, "must be finite")
        if not self.lookahead_scale > 0:
            raise bad("lookahead_scale", "must be > 0")
        if not self.alpha > 0:
            raise bad("alpha", "must be > 0")
        if not self.predictor_weight_decay >= 0:
            raise bad("predictor_weight_decay", "must be >= 0")
        if not self.loss_coeff >= 0:
            raise bad("loss_coeff", "must be >= 0")
        if self.cache_tokens_per_sequence < -1:
            raise bad("cache_tokens_per_sequence", "must be an integer >= -1 (-1 = all tokens)")
        if self.telemetry_stride < 1:
            raise bad("telemetry_stride", "must be an integer >= 1")
        if self.loss_start_ministep < 1:
            raise bad("loss_start_ministep", "must be an integer >= 1")

    @classmethod
    def field_docs(cls) -> dict:
        """Field name -> first sentence of its docstring (used by the --pr2-* argument help)."""
        import ast
        import inspect
        import textwrap

        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
        body = tree.body[0].body
        docs = {}
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr):
                docs[node.target.id] = " ".join(nxt.value.value.split())
        return {f.name: docs.get(f.name, "") for f in fields(cls)}


_TYPE_NAMES = {str: "str", int: "int", float: "float", bool: "bool"}


def _has_type(value: object, annotation: type) -> bool:
    """Strict field type check: bool is not an int, an int is a valid float."""
    if annotation is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if annotation is int:
        return isinstance(value, numbers.Integral)
    if annotation is float:
        return isinstance(value, numbers.Real)
    assert annotation is str, annotation
    return isinstance(value, str)


def stride_for(seq_length: int, cache_tokens_per_sequence: int) -> Optional[int]:
    """Token stride of the predictor cache for one sequence, or None when caching is off."""
    if cache_tokens_per_sequence == 0:
        return None
    if cache_tokens_per_sequence == -1 or cache_tokens_per_sequence >= seq_length:
        return 1
    return -(-seq_length // cache_tokens_per_sequence)
