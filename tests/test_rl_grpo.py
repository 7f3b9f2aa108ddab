# RL demo: GRPO advantages and the PPO / GSPO clipped loss against independent hand computations
# (plain Python loops over floats, no torch vector ops).

import math
import random

import pytest
import torch

from megatron_pr2.rl.grpo import (
    PolicyLossConfig,
    grpo_advantages,
    policy_loss,
    token_entropy,
    token_logprobs,
)


def _hand_advantages(rewards, group, eps=1e-6):
    out = []
    for g in range(0, len(rewards), group):
        xs = rewards[g : g + group]
        mean = sum(xs) / len(xs)
        std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
        out += [(x - mean) / (std + eps) for x in xs]
    return out


def test_grpo_advantages_match_hand_computation():
    rewards = [1.0, 0.0, 0.5, 0.5, 0.0, 0.0, 0.0, 1.0, 0.2, 0.2, 0.2, 0.2]
    got = grpo_advantages(torch.tensor(rewards), group_size=4).tolist()
    want = _hand_advantages(rewards, 4)
    assert got == pytest.approx(want, rel=1e-6, abs=1e-6)
    # A group with equal rewards carries no signal.
    assert got[8:] == [0.0] * 4


def test_grpo_advantages_validation():
    with pytest.raises(ValueError, match="group_size"):
        grpo_advantages(torch.zeros(6), group_size=4)


def _hand_token_loss(lp, old, adv, mask, lo, hi):
    total, n, clipped = 0.0, 0, 0
    for b in range(len(lp)):
        for t in range(len(lp[b])):
            if not mask[b][t]:
                continue
            r = math.exp(lp[b][t] - old[b][t])
            a = adv[b]
            unclipped, clip = r * a, min(max(r, 1 - lo), 1 + hi) * a
            total += -min(unclipped, clip)
            clipped += unclipped != clip
            n += 1
    return total / n, clipped / n


def _hand_sequence_loss(lp, old, adv, mask, lo, hi):
    total, n, clipped = 0.0, 0, 0
    for b in range(len(lp)):
        toks = [t for t in range(len(lp[b])) if mask[b][t]]
        if not toks:
            continue
        s = math.exp(sum(lp[b][t] - old[b][t] for t in toks) / len(toks))
        a = adv[b]
        unclipped, clip = s * a, min(max(s, 1 - lo), 1 + hi) * a
        total += -min(unclipped, clip)
        clipped += unclipped != clip
        n += 1
    return total / n, clipped / n


def _random_case(seed, b=5, s=7):
    rng = random.Random(seed)
    old = [[rng.uniform(-3, -0.1) for _ in range(s)] for _ in range(b)]
    lp = [[o + rng.gauss(0, 0.3) for o in row] for row in old]
    adv = [rng.gauss(0, 1) for _ in range(b)]
    mask = [[1 if 2 <= t < 2 + rng.randint(1, s - 2) else 0 for t in range(s)] for _ in range(b)]
    mask[-1] = [0] * s  # a sequence without response tokens
    return lp, old, adv, mask


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("lo,hi", [(0.2, 0.2), (0.2, 0.28)])
def test_token_level_ppo_loss_matches_hand_computation(seed, lo, hi):
    lp, old, adv, mask = _random_case(seed)
    cfg = PolicyLossConfig(clip_eps_low=lo, clip_eps_high=hi, ratio_level="token")
    T = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    loss, stats = policy_loss(T(lp), T(old), T(adv), T(mask), cfg)
    want_loss, want_clip = _hand_token_loss(lp, old, adv, mask, lo, hi)
    assert float(loss) == pytest.approx(want_loss, rel=1e-10)
    assert float(stats["clipped"] / stats["units"]) == pytest.approx(want_clip, abs=1e-12)
    assert want_clip > 0  # the case exercises clipping
    ratios = [
        math.exp(lp[b][t] - old[b][t]) for b in range(len(lp)) for t in range(7) if mask[b][t]
    ]
    assert float(stats["max_ratio"]) == pytest.approx(max(ratios), rel=1e-12)
    assert float(stats["outside_0.5_2"]) == sum(r < 0.5 or r > 2 for r in ratios)
    assert float(stats["abs_log_ratio_sum"]) == pytest.approx(
        sum(abs(math.log(r)) for r in ratios), rel=1e-10
    )


@pytest.mark.parametrize("seed", [0, 3])
def test_sequence_level_gspo_loss_matches_hand_computation(seed):
    lp, old, adv, mask = _random_case(seed)
    # GSPO uses a much smaller clip range on its sequence-level ratio.
    cfg = PolicyLossConfig(clip_eps_low=0.01, clip_eps_high=0.01, ratio_level="sequence")
    T = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    loss, stats = policy_loss(T(lp), T(old), T(adv), T(mask), cfg)
    want_loss, want_clip = _hand_sequence_loss(lp, old, adv, mask, 0.01, 0.01)
    assert float(loss) == pytest.approx(want_loss, rel=1e-10)
    assert float(stats["clipped"] / stats["units"]) == pytest.approx(want_clip, abs=1e-12)


def test_ppo_gradient_is_policy_gradient_on_policy():
    # At ratio 1 (on-policy) d loss / d logprob_t = -A_b / num_tokens for every response token.
    lp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, -1.1]], requires_grad=True)
    old = lp.detach().clone()
    adv = torch.tensor([1.5, -0.5])
    mask = torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    loss, _ = policy_loss(lp, old, adv, mask, PolicyLossConfig())
    loss.backward()
    want = torch.tensor([[0.0, -1.5, -1.5], [0.5, 0.5, 0.0]]) / 4
    assert torch.allclose(lp.grad, want, atol=1e-7)


@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_kl_to_reference_adds_k3_and_its_gradient(ratio_level):
    lp, old, adv, mask = _random_case(4)
    ref = [[x + 0.2 * math.sin(3 * i + t) for t, x in enumerate(row)] for i, row in enumerate(lp)]
    T = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    base_cfg = PolicyLossConfig(ratio_level=ratio_level)
    kl_cfg = PolicyLossConfig(ratio_level=ratio_level, kl_coeff=0.3)
    logprobs = T(lp).requires_grad_(True)
    loss, stats = policy_loss(logprobs, T(old), T(adv), T(mask), kl_cfg, T(ref))
    base, _ = policy_loss(T(lp), T(old), T(adv), T(mask), base_cfg)
    # Hand k3 (exp(ref - lp) - (ref - lp) - 1) over response tokens, and d/dlp = 1 - exp(ref - lp).
    tokens = [(b, t) for b in range(len(lp)) for t in range(len(lp[b])) if mask[b][t]]
    k3 = [math.exp(ref[b][t] - lp[b][t]) - (ref[b][t] - lp[b][t]) - 1 for b, t in tokens]
    assert float(stats["kl_ref_sum"]) == pytest.approx(sum(k3), rel=1e-10)
    assert float(loss) == pytest.approx(float(base) + 0.3 * sum(k3) / len(tokens), rel=1e-10)
    logprobs_plain = T(lp).requires_grad_(True)
    policy_loss(logprobs_plain, T(old), T(adv), T(mask), base_cfg)[0].backward()
    loss.backward()
    grad_kl = logprobs.grad - logprobs_plain.grad
    for b in range(len(lp)):
        for t in range(len(lp[b])):
            want = 0.3 * (1 - math.exp(ref[b][t] - lp[b][t])) / len(tokens) if mask[b][t] else 0
            assert float(grad_kl[b, t]) == pytest.approx(want, abs=1e-12)
    # Without a reference the KL term is absent whatever kl_coeff says.
    assert "kl_ref_sum" not in policy_loss(T(lp), T(old), T(adv), T(mask), kl_cfg)[1]


def test_logprobs_and_entropy_against_reference():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5)
    targets = torch.randint(0, 5, (2, 3))
    lp = token_logprobs(logits, targets)
    for b in range(2):
        for s in range(3):
            row = logits[b, s].tolist()
            z = math.log(sum(math.exp(x) for x in row))
            assert float(lp[b, s]) == pytest.approx(row[targets[b, s]] - z, abs=1e-6)
            p = [math.exp(x - z) for x in row]
            ent = -sum(q * math.log(q) for q in p)
            assert float(token_entropy(logits)[b, s]) == pytest.approx(ent, abs=1e-6)
    # Masked (-inf) vocabulary entries contribute nothing, and give no NaN.
    masked = logits.clone()
    masked[..., 3:] = float("-inf")
    ent = token_entropy(masked)
    assert torch.isfinite(ent).all()
    assert torch.allclose(ent, token_entropy(logits[..., :3]), atol=1e-6)


def test_policy_loss_config_validation():
    with pytest.raises(ValueError, match="ratio_level"):
        PolicyLossConfig(ratio_level="tokens")
    with pytest.raises(ValueError, match="clip_eps_low"):
        PolicyLossConfig(clip_eps_low=1.5)
    with pytest.raises(ValueError, match="kl_coeff"):
        PolicyLossConfig(kl_coeff=-0.1)
