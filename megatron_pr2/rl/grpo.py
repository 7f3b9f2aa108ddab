# GRPO advantages and the PPO / GSPO clipped policy objective.
#
# Shapes: rewards [num_prompts * group_size] with the samples of one prompt contiguous;
# logprobs, old_logprobs, loss_mask [batch, seq] (per-token log-probabilities of the sampled
# tokens, loss_mask 1 on response tokens incl. EOS, 0 on prompt and padding);
# advantages [batch] (one scalar per sequence, broadcast over its tokens).

import dataclasses
from typing import Dict, Optional, Tuple

import torch


def grpo_advantages(
    rewards: torch.Tensor, group_size: int, eps: float = 1e-6, normalize_std: bool = True
) -> torch.Tensor:
    """Group-normalised advantages: (r - mean_group) / (std_group + eps).

    std is the unbiased sample std of the group (torch.std default), as in the GRPO paper's
    reference implementation; a group whose rewards are all equal gets advantage 0.
    """
    if rewards.dim() != 1 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"rewards must be 1-D with a multiple of group_size={group_size} entries, "
            f"got shape {tuple(rewards.shape)}"
        )
    grouped = rewards.float().view(-1, group_size)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    if normalize_std and group_size > 1:
        centered = centered / (grouped.std(dim=1, keepdim=True) + eps)
    return centered.reshape(-1)


@dataclasses.dataclass
class PolicyLossConfig:
    """Clipped policy-gradient objective."""

    clip_eps_low: float = 0.2
    """Lower clip range: ratios below 1 - clip_eps_low are clipped (PPO epsilon)."""
    clip_eps_high: float = 0.2
    """Upper clip range: ratios above 1 + clip_eps_high are clipped (DAPO 'clip-higher' when
    larger than clip_eps_low)."""
    ratio_level: str = "token"
    """'token' (PPO/GRPO per-token ratio) or 'sequence' (GSPO: exp of the mean per-token log
    ratio of each sequence, one ratio per sequence)."""
    kl_coeff: float = 0.0
    """beta of the KL penalty to a frozen reference policy (the warm start), as in GRPO
    (DeepSeekMath): the unbiased, non-negative k3 estimator exp(ref - lp) - (ref - lp) - 1 per
    response token (verl's 'low_var_kl'), averaged like the policy term. 0 = off (no reference
    model is built)."""

    def __post_init__(self) -> None:
        if self.ratio_level not in ("token", "sequence"):
            raise ValueError(
                f"PolicyLossConfig.ratio_level must be 'token' or 'sequence', "
                f"got {self.ratio_level!r}"
            )
        if self.clip_eps_low <= 0 or self.clip_eps_low >= 1:
            raise ValueError(
                f"PolicyLossConfig.clip_eps_low must be in (0, 1), got {self.clip_eps_low}"
            )
        if self.kl_coeff < 0:
            raise ValueError(f"PolicyLossConfig.kl_coeff must be >= 0, got {self.kl_coeff}")
        if self.clip_eps_high <= 0:
            raise ValueError(
                f"PolicyLossConfig.clip_eps_high must be > 0, got {self.clip_eps_high}"
            )


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    config: PolicyLossConfig,
    ref_logprobs: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Clipped surrogate loss -min(r A, clip(r) A), averaged over response tokens, plus
    kl_coeff x the mean k3 KL to the reference policy when `ref_logprobs` are given.

    Token level: r_t = exp(logprobs_t - old_logprobs_t), loss = sum_t mask_t * l_t / sum mask.
    Sequence level (GSPO): s_i = exp(sum_t mask (lp - old) / |y_i|), the same clipped term per
    sequence, averaged over sequences (each sequence weighted equally, as in the GSPO paper).

    Returns (loss, stats) where stats are detached sums over this microbatch so callers can
    reduce across microbatches and ranks: 'tokens', 'clipped' (ratio-clipped units: tokens or
    sequences), 'units', 'abs_log_ratio_sum', 'outside_0.5_2' (token count with r outside
    [0.5, 2]), 'max_ratio' (token-level max), 'kl_ref_sum' (summed k3 KL, with a reference).
    """
    mask = loss_mask.to(logprobs.dtype if logprobs.is_floating_point() else torch.float32)
    log_ratio = (logprobs - old_logprobs) * mask
    lo, hi = 1.0 - config.clip_eps_low, 1.0 + config.clip_eps_high
    if config.ratio_level == "token":
        ratio = torch.exp(log_ratio)
        adv = advantages.unsqueeze(1).expand_as(ratio)
        unclipped = ratio * adv
        clipped = torch.clamp(ratio, lo, hi) * adv
        per_unit = -torch.minimum(unclipped, clipped)
        loss = (per_unit * mask).sum() / mask.sum().clamp(min=1.0)
        is_clipped = ((unclipped != clipped) & (mask > 0)).to(mask.dtype)
        n_clipped, n_units = is_clipped.sum(), mask.sum()
    else:
        lengths = mask.sum(dim=1).clamp(min=1.0)
        seq_ratio = torch.exp(log_ratio.sum(dim=1) / lengths)
        unclipped = seq_ratio * advantages
        clipped = torch.clamp(seq_ratio, lo, hi) * advantages
        per_seq = -torch.minimum(unclipped, clipped)
        valid = (mask.sum(dim=1) > 0).to(mask.dtype)
        loss = (per_seq * valid).sum() / valid.sum().clamp(min=1.0)
        n_clipped = ((unclipped != clipped).to(mask.dtype) * valid).sum()
        n_units = valid.sum()
    kl_ref = None
    if ref_logprobs is not None:
        delta = (ref_logprobs - logprobs) * mask
        kl_ref = (torch.exp(delta) - delta - 1.0) * mask
        loss = loss + config.kl_coeff * kl_ref.sum() / mask.sum().clamp(min=1.0)
    with torch.no_grad():
        token_ratio = torch.exp(log_ratio.detach())
        on = mask > 0
        stats = {
            "tokens": mask.sum(),
            "units": n_units.detach(),
            "clipped": n_clipped.detach(),
            "abs_log_ratio_sum": log_ratio.detach().abs().sum(),
            "outside_0.5_2": (((token_ratio < 0.5) | (token_ratio > 2.0)) & on)
            .sum()
            .to(mask.dtype),
            "max_ratio": (
                token_ratio[on].max() if on.any() else torch.zeros((), dtype=token_ratio.dtype)
            ),
        }
        if kl_ref is not None:
            stats["kl_ref_sum"] = kl_ref.detach().sum()
    return loss, stats


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target]; logits [b, s, v] (any float dtype, computed in fp32),
    targets [b, s] -> [b, s] fp32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per position: [b, s, v] -> [b, s] fp32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    probs = logp.exp()
    # Masked logits (-inf) have p = 0 and contribute 0, not 0 * -inf = nan.
    return -(probs * logp.masked_fill(probs == 0, 0.0)).sum(dim=-1)
