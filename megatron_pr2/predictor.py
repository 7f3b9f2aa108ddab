# Evolution predictors of PR2 and their training objectives.
#
# Shapes: h [N, H] router inputs (N tokens, H hidden), logits [N, E] router logits (E experts).
# A predictor maps h to a logit offset [N, E] that anticipates how the router's logits will drift
# over the next policy updates; every kind starts at exactly zero, so PR2 starts as plain R2.

import torch
import torch.nn.functional as F

from megatron_pr2.config import PR2Config


class _LinearKeepingInputDtype(torch.autograd.Function):
    """F.linear(h.to(W.dtype), W) for an input without gradient that saves h in its own dtype
    (a bf16 predictor cache stays bf16 until the backward, not an fp32 copy per layer per
    microbatch in flight); the weight gradient is F.linear's, g^T h in W's dtype."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(hidden, weight)
        return F.linear(hidden.to(weight.dtype), weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        hidden, weight = ctx.saved_tensors
        grad = grad.reshape(-1, grad.shape[-1])
        return None, grad.t().mm(hidden.reshape(-1, hidden.shape[-1]).to(weight.dtype))


def linear(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear in the weight's dtype; a narrower input without gradient is saved as it is."""
    if hidden.dtype == weight.dtype or hidden.requires_grad or not torch.is_grad_enabled():
        return F.linear(hidden.to(weight.dtype), weight)
    return _LinearKeepingInputDtype.apply(hidden, weight)


class LinearPredictor(torch.nn.Module):
    """The paper's head: offset = h W_p, W_p stored [E, H] like the router weight, zero-init."""

    def __init__(self, hidden_size: int, num_experts: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(num_experts, hidden_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear(hidden, self.weight)


class LowRankPredictor(torch.nn.Module):
    """offset = (h A^T) B^T with A [r, H] random and B [E, r] zero, so the offset starts at zero."""

    def __init__(self, hidden_size: int, num_experts: int, rank: int) -> None:
        super().__init__()
        # A fixed generator: every rank that routes the same tokens must hold the same A.
        generator = torch.Generator().manual_seed(0x9E2)
        down = torch.randn(rank, hidden_size, generator=generator) / hidden_size**0.5
        self.down = torch.nn.Parameter(down)
        self.up = torch.nn.Parameter(torch.zeros(num_experts, rank))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(linear(hidden, self.down), self.up)


class BiasPredictor(torch.nn.Module):
    """offset = b, one learned logit shift per expert (token independent), zero-init."""

    def __init__(self, num_experts: int) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(num_experts))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(*hidden.shape[:-1], self.bias.numel())


class LookaheadPredictor(torch.nn.Module):
    """Weight-space lookahead, no learned parameters: offset = h (scale * D)^T, where D is the
    router weight's change between its last two predict_record passes (one rollout batch of
    updates). Optimiser momentum makes consecutive batches drift alike, so the last drift,
    scaled to the mini-steps ahead, anticipates the next one.

    Buffers (saved and resumed with the model): `anchor` [E, H] the router weight at the last
    refresh, `weight` [E, H] = scale * D (zero until two distinct weights were seen), `seen`.
    """

    def __init__(self, hidden_size: int, num_experts: int, scale: float) -> None:
        super().__init__()
        self.scale = scale
        self.register_buffer("weight", torch.zeros(num_experts, hidden_size))
        self.register_buffer("anchor", torch.zeros(num_experts, hidden_size))
        self.register_buffer("seen", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def refresh(self, router_weight: torch.Tensor) -> None:
        """Call at the start of a predict_record pass: a router weight different from the
        anchor means the optimiser stepped since, so that change becomes the predicted drift.
        Deterministic on every rank holding the same router weight (TP/EP/DP replicas)."""
        current = router_weight.detach().to(self.anchor.dtype)
        # Tensor-valued condition, no Python branch: no host sync per layer on GPU.
        changed = self.seen & (current != self.anchor).any()
        self.weight.copy_(torch.where(changed, (current - self.anchor) * self.scale, self.weight))
        self.anchor.copy_(current)
        self.seen.fill_(True)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden.to(self.weight.dtype), self.weight)


def build_predictor(config: PR2Config, hidden_size: int, num_experts: int) -> torch.nn.Module:
    """The predictor module selected by config.predictor; its parameters are fp32."""
    if config.predictor == "linear":
        return LinearPredictor(hidden_size, num_experts)
    if config.predictor == "lowrank":
        return LowRankPredictor(hidden_size, num_experts, config.predictor_rank)
    if config.predictor == "lookahead":
        return LookaheadPredictor(hidden_size, num_experts, config.lookahead_scale)
    assert config.predictor == "bias", config.predictor
    return BiasPredictor(num_experts)


def predictor_loss(
    kind: str, live_logits: torch.Tensor, old_logits: torch.Tensor, offset: torch.Tensor
) -> torch.Tensor:
    """Mean over tokens of the predictor objective; gradient reaches only `offset`.

    kl-post:    KL(softmax(p_live) || softmax(p_old + offset))
    delta-kl:   KL(softmax(p_live - p_old) || softmax(offset))
    l2:         mean over experts of (p_old + offset - p_live)^2
    sigmoid-kl: sum over experts of KL(Bernoulli(sigmoid(p_live)) || Bernoulli(sigmoid(p_old +
                offset))), i.e. the BCE between the sigmoid scores minus the target's entropy.
                For sigmoid routers (DeepSeek-V3): they select TopK(sigmoid(p) + expert_bias)
                (group-limited or not), which a per-token logit shift changes, while kl-post,
                a softmax over raw logits, cannot see such a shift. The expert bias is the same
                (live) on both sides of a replayed comparison, so it cancels in the score match.
    """
    live = live_logits.detach().float()
    old = old_logits.detach().float()
    offset = offset.float()
    if kind == "sigmoid-kl":
        target = torch.sigmoid(live)
        bce = F.binary_cross_entropy_with_logits(old + offset, target, reduction="none")
        entropy = F.binary_cross_entropy_with_logits(live, target, reduction="none")
        return (bce - entropy).sum(dim=-1).mean()
    if kind == "kl-post":
        target, prediction = live, old + offset
    elif kind == "delta-kl":
        target, prediction = live - old, offset
    else:
        assert kind == "l2", kind
        return (old + offset - live).pow(2).mean(dim=-1).mean()
    log_target = torch.log_softmax(target, dim=-1)
    log_prediction = torch.log_softmax(prediction, dim=-1)
    return (log_target.exp() * (log_target - log_prediction)).sum(dim=-1).mean()
