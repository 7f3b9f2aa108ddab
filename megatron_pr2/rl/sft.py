# Supervised warm start (SFT) of the demo policy, so RL starts from a non-trivial reward.
#
# Shapes: tokens [B, S] = BOS + prompt + answer + EOS, right-padded with PAD to S; loss_mask
# [B, S - 1] is 1 on targets that belong to the answer or EOS. Prompt and answer are tokenized
# separately (as at generation time, where the model continues the tokenized prompt).
# The checkpoint is cached per rank in the run dir under a key of every setting it depends on,
# so the RL comparison reuses one warm start for all modes.

import dataclasses
import hashlib
import json
import math
import os
import random
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_pr2.rl.model import (
    ModelConfig,
    clip_gradients,
    default_device,
    reduce_gradients,
)
from megatron_pr2.rl.rollout import score
from megatron_pr2.rl.task import ArithmeticTask, Problem, TaskConfig
from megatron_pr2.rl.tokenizer import BOS_ID, EOS_ID, PAD_ID, TaskTokenizer


@dataclasses.dataclass
class SFTConfig:
    """Supervised warm-start phase."""

    steps: int = 300
    """Optimizer steps."""
    batch_size: int = 64
    """Sequences per step per data-parallel rank."""
    lr: float = 3e-3
    """Peak AdamW learning rate (linear warm-up, cosine decay to 10%)."""
    warmup_steps: int = 20
    """Linear warm-up steps."""
    grad_clip: float = 1.0
    """Global gradient-norm clip."""
    seed: int = 1234
    """Seed of the SFT data stream (independent of the RL seeds)."""
    label_noise: float = 0.0
    """Fraction of SFT examples whose answer is corrupted (one character replaced by a wrong
    digit): imperfect demonstrations, so the warm start samples wrong answers that a verifier
    reward can teach it to avoid (RL then has something to fix within a short run)."""
    leading_drop: float = 0.0
    """Fraction of the demonstrations whose answer has a leading carry digit or minus sign
    (longer than the operands, or negative) that drop that character: a systematic error. Above
    0.5 the warm start's greedy answer to those problems is wrong while its samples are right
    1 - leading_drop of the time, which a verifier reward can teach within a short run."""
    freeze_router: bool = False
    """Do not train the MoE router weights (they keep their initialisation): experts adapt to
    a random router whose logit margins stay small, so RL later moves many routes."""
    router_init_scale: float = 1.0
    """Multiply the router weights by this before SFT (below 1: smaller logit margins between
    experts, so a router-weight change of a given size flips more routes)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.label_noise < 1.0:
            raise ValueError(f"SFTConfig.label_noise must be in [0, 1), got {self.label_noise}")
        if not self.router_init_scale > 0:
            raise ValueError(
                f"SFTConfig.router_init_scale must be > 0, got {self.router_init_scale}"
            )
        if not 0.0 <= self.leading_drop < 1.0:
            raise ValueError(f"SFTConfig.leading_drop must be in [0, 1), got {self.leading_drop}")


def prompt_tokens(tokenizer: TaskTokenizer, problems: Sequence[Problem]) -> torch.Tensor:
    """[B, P] BOS + prompt ids; raises if prompts do not all tokenize to the same length."""
    rows = [[BOS_ID] + tokenizer.encode(p.prompt) for p in problems]
    lengths = {len(r) for r in rows}
    if len(lengths) != 1:
        raise ValueError(f"prompts tokenize to different lengths {sorted(lengths)}")
    return torch.tensor(rows, dtype=torch.int64)


def drop_leading(problem: Problem) -> Optional[str]:
    """The answer without its leading carry digit or minus sign, or None when it has neither
    (e.g. 57+68 -> '25', 12-40 -> '28')."""
    answer = problem.answer
    if answer.startswith("-") or len(answer) > problem.num_digits:
        return answer[1:]
    return None


def demonstration(problem: Problem, cfg: "SFTConfig", rng: random.Random) -> str:
    """The answer an SFT example shows: the reference, a systematically wrong one (leading
    character dropped) or a randomly corrupted one (label noise)."""
    dropped = drop_leading(problem)
    if dropped is not None and cfg.leading_drop and rng.random() < cfg.leading_drop:
        return dropped
    if rng.random() < cfg.label_noise:
        return corrupt_answer(problem.answer, rng)
    return problem.answer


def corrupt_answer(answer: str, rng: random.Random) -> str:
    """Replace one digit of `answer` by a different digit, keeping a well-formed integer (no
    leading zero on a multi-digit number)."""
    positions = [i for i, c in enumerate(answer) if c.isdigit()]
    i = rng.choice(positions)
    leading = i == positions[0] and len(positions) > 1
    choices = [d for d in "0123456789" if d != answer[i] and not (leading and d == "0")]
    return answer[:i] + rng.choice(choices) + answer[i + 1 :]


def sft_batch(
    tokenizer: TaskTokenizer,
    problems: Sequence[Problem],
    seq_length: int,
    answers: Optional[Sequence[str]] = None,
) -> Dict[str, torch.Tensor]:
    """Training batch; `answers` overrides the reference answers (label noise)."""
    prompts = prompt_tokens(tokenizer, problems)
    p_len = prompts.size(1)
    tokens = torch.full((len(problems), seq_length), PAD_ID, dtype=torch.int64)
    loss_mask = torch.zeros(len(problems), seq_length - 1)
    for i, prob in enumerate(problems):
        text = prob.answer if answers is None else answers[i]
        answer = tokenizer.encode(text) + [EOS_ID]
        if p_len + len(answer) > seq_length:
            raise ValueError(f"seq_length={seq_length} too short for {prob.prompt}{prob.answer}")
        tokens[i, :p_len] = prompts[i]
        tokens[i, p_len : p_len + len(answer)] = torch.tensor(answer)
        loss_mask[i, p_len - 1 : p_len - 1 + len(answer)] = 1.0
    return {"tokens": tokens, "loss_mask": loss_mask}


def lr_at(step: int, cfg: SFTConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    # float32 cosine, as the measured runs in README used (a float64 one shifts the weights).
    cosine = torch.cos(torch.tensor(progress * math.pi)).item()
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + cosine))


def run_sft(
    model: torch.nn.Module,
    task: ArithmeticTask,
    tokenizer: TaskTokenizer,
    cfg: SFTConfig,
    seq_length: int,
    log: Optional[Callable[[str], None]] = None,
) -> List[float]:
    """Train `model` in place on exact answers; returns the per-step loss history."""
    device = default_device()
    rank = dist.get_rank() if dist.is_initialized() else 0
    # Different problems on each data-parallel rank; the stream is fixed by cfg.seed.
    rng = random.Random(cfg.seed * 1000 + rank)
    routers = {n: p for n, p in model.named_parameters() if n.endswith("router.weight")}
    if cfg.router_init_scale != 1.0:
        with torch.no_grad():
            for p in routers.values():
                p.mul_(cfg.router_init_scale)
    params = [p for n, p in model.named_parameters() if not (cfg.freeze_router and n in routers)]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.98), weight_decay=0.0)
    model.train()
    losses = []
    t0 = time.time()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        problems = task.sample(rng, cfg.batch_size)
        answers = [demonstration(p, cfg, rng) for p in problems]
        batch = sft_batch(tokenizer, problems, seq_length, answers)
        tokens, mask = batch["tokens"].to(device), batch["loss_mask"].to(device)
        nll = -score(model, tokens, tokenizer.vocab_size)[0]
        loss = (nll * mask).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        reduce_gradients(model)
        clip_gradients(model, cfg.grad_clip, params)
        opt.step()
        losses.append(float(loss.detach()))
        if log is not None and (step % 50 == 0 or step == cfg.steps - 1):
            log(
                f"sft step {step:4d} loss {losses[-1]:.4f} ({time.time() - t0:.1f}s, cpu {time.process_time():.1f}s)"
            )
    return losses


def sft_cache_key(
    model_cfg: ModelConfig,
    task_cfg: TaskConfig,
    sft_cfg: SFTConfig,
    tokenizer: TaskTokenizer,
    layout: Dict[str, int],
    extra: Optional[dict] = None,
) -> str:
    """Hash of everything the warm-start weights depend on."""
    with open(tokenizer.model_file, "rb") as f:
        tok_hash = hashlib.sha256(f.read()).hexdigest()
    blob = json.dumps(
        {
            "model": dataclasses.asdict(model_cfg),
            "task": dataclasses.asdict(task_cfg),
            "sft": dataclasses.asdict(sft_cfg),
            "tokenizer": tok_hash,
            "layout": layout,
            "extra": extra or {},
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def sft_checkpoint_file(run_dir: str, key: str) -> str:
    """Layout-independent (full_state_dict) warm-start file; loads under any EP size."""
    return os.path.join(run_dir, f"sft-{key}", "model_full.pt")


def save_state_atomic(state: dict, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)
