# Rollout: batched sampling from the inference-engine copy of the policy, and scoring.
#
# Shapes: prompts [B, P] (every prompt of the task has the same token length P, so no left
# padding is needed); sequences [B, S] with S = P + max_new_tokens, padded with PAD after EOS;
# per-token arrays over targets are [B, S - 1]: position t holds the log-prob of token t + 1
# given tokens <= t; response_mask [B, S - 1] is 1 where the target is a generated token
# (EOS included), 0 on prompt targets and padding.
#
# Generation re-runs the full forward for every new token (no KV cache): at the demo's size
# (S <= 16) this costs little and keeps the engine a stock Megatron GPTModel.

from typing import Optional

import torch
import torch.distributed as dist

from megatron_pr2.rl.grpo import token_entropy, token_logprobs
from megatron_pr2.rl.model import forward_logits
from megatron_pr2.rl.tokenizer import EOS_ID, PAD_ID


def policy_logits(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Mask the padded part of the embedding table (ids >= vocab_size): the policy is a
    distribution over the tokenizer's real vocabulary, in sampling and in training alike."""
    if logits.size(-1) == vocab_size:
        return logits
    masked = logits.float().clone()
    masked[..., vocab_size:] = float("-inf")
    return masked


@torch.no_grad()
def generate(
    engine: torch.nn.Module,
    prompts: torch.Tensor,
    max_new_tokens: int,
    vocab_size: int,
    temperature: float,
    generator: torch.Generator,
    process_group: Optional[dist.ProcessGroup] = None,
) -> torch.Tensor:
    """Sample continuations for every prompt at once; returns sequences [B, P + max_new_tokens].

    temperature 0 is greedy decoding. Stops early once every sequence has emitted EOS on every rank of `process_group` (ranks
    must run the same number of forwards: the MoE all-to-all is collective).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    batch = prompts.size(0)
    seqs = prompts
    finished = torch.zeros(batch, dtype=torch.bool, device=prompts.device)
    for _ in range(max_new_tokens):
        logits = policy_logits(forward_logits(engine, seqs)[:, -1], vocab_size)
        if temperature == 0:
            nxt = logits.argmax(dim=-1)
        else:
            probs = torch.softmax(logits.float() / temperature, dim=-1)
            # Sample on CPU with an explicit generator: the stream depends only on the seed and
            # the step, never on the device or on how many draws other code made.
            nxt = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1)
            nxt = nxt.to(seqs.device)
        nxt = torch.where(finished, torch.full_like(nxt, PAD_ID), nxt)
        finished = finished | (nxt == EOS_ID)
        seqs = torch.cat([seqs, nxt.unsqueeze(1)], dim=1)
        done = finished.all().to(torch.int32)
        if process_group is not None and dist.get_world_size(process_group) > 1:
            dist.all_reduce(done, op=dist.ReduceOp.MIN, group=process_group)
        if bool(done):
            break
    pad = prompts.size(1) + max_new_tokens - seqs.size(1)
    if pad:
        seqs = torch.cat([seqs, seqs.new_full((batch, pad), PAD_ID)], dim=1)
    return seqs


def response_mask_of(sequences: torch.Tensor, prompt_length: int) -> torch.Tensor:
    """[B, S] -> [B, S - 1]: 1 on targets that are generated tokens up to and including EOS."""
    targets = sequences[:, 1:]
    positions = torch.arange(targets.size(1), device=sequences.device).unsqueeze(0)
    generated = positions >= prompt_length - 1
    # A target is live if no EOS appeared among earlier generated targets.
    is_eos = (targets == EOS_ID) & generated
    eos_before = (torch.cumsum(is_eos.int(), dim=1) - is_eos.int()) > 0
    return (generated & ~eos_before).float()


def used_token_mask(response_mask: torch.Tensor, prompt_length: int) -> torch.Tensor:
    """[B, S - 1] target mask -> [B, S] bool over input tokens: True where the policy loss
    depends on the token's routes: every prompt token (the response attends to it) and every
    input that predicts a response target (input t predicts target t). False: padding after
    EOS and the EOS input itself (nothing attends to it)."""
    batch, targets = response_mask.shape
    mask = torch.zeros(batch, targets + 1, dtype=torch.bool, device=response_mask.device)
    mask[:, :targets] = response_mask > 0
    mask[:, :prompt_length] = True
    return mask


def score(model: torch.nn.Module, sequences: torch.Tensor, vocab_size: int, with_entropy=False):
    """Forward one microbatch; returns (target log-probs [B, S-1] fp32, entropy or None)."""
    logits = policy_logits(forward_logits(model, sequences), vocab_size)[:, :-1]
    logprobs = token_logprobs(logits, sequences[:, 1:])
    entropy = token_entropy(logits) if with_entropy else None
    return logprobs, entropy
