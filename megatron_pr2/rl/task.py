# Synthetic verifiable task for the end-to-end RL demo: integer addition / subtraction.
#
# A problem is "AAA+BBB=" (operands zero-padded to `num_digits`, so every prompt has the same
# length in characters and, with a digit-splitting tokenizer, in tokens); the answer is the
# plain decimal result ("-17", "1042"). Rewards are computed from decoded text only, so the
# reward function is independent of the model and of the tokenizer.
#
# Everything is generated locally from a seed: no datasets are downloaded.

import dataclasses
import random
from typing import List, Sequence


@dataclasses.dataclass(frozen=True)
class Problem:
    """One arithmetic problem."""

    a: int
    """First operand (0 <= a < 10**num_digits)."""
    b: int
    """Second operand (0 <= b < 10**num_digits)."""
    op: str
    """'+' or '-'."""
    num_digits: int
    """Operand width used in the prompt (operands are zero-padded to it)."""

    @property
    def prompt(self) -> str:
        """Prompt text, e.g. '012+345='."""
        return f"{self.a:0{self.num_digits}d}{self.op}{self.b:0{self.num_digits}d}="

    @property
    def answer(self) -> str:
        """Reference answer text, e.g. '357' or '-333'."""
        return str(self.a + self.b if self.op == "+" else self.a - self.b)


@dataclasses.dataclass
class TaskConfig:
    """Configuration of the arithmetic task."""

    num_digits: int = 2
    """Digits per operand (1-4)."""
    ops: str = "+-"
    """Operators to sample from, a subset of '+-'."""
    partial_credit: float = 0.5
    """Weight of the per-character partial credit for a well-formed but wrong answer; the
    reward of a wrong answer is partial_credit * (fraction of right-aligned characters that
    match the reference), always < 1. 0 gives a pure exact-match reward."""

    def __post_init__(self) -> None:
        if not 1 <= self.num_digits <= 4:
            raise ValueError(f"TaskConfig.num_digits must be in [1, 4], got {self.num_digits}")
        if not self.ops or any(c not in "+-" for c in self.ops):
            raise ValueError(f"TaskConfig.ops must be a non-empty subset of '+-', got {self.ops!r}")
        if not 0.0 <= self.partial_credit < 1.0:
            raise ValueError(
                f"TaskConfig.partial_credit must be in [0, 1), got {self.partial_credit}"
            )

    @property
    def max_answer_chars(self) -> int:
        """Longest possible answer text (sign or carry digit included)."""
        return self.num_digits + 1

    @property
    def prompt_chars(self) -> int:
        """Length of every prompt in characters."""
        return 2 * self.num_digits + 2


class ArithmeticTask:
    """Problem generator and reward function."""

    def __init__(self, config: TaskConfig):
        self.config = config

    def sample(self, rng: random.Random, n: int) -> List[Problem]:
        """Draw n problems from `rng` (a seeded random.Random: the stream is reproducible)."""
        hi = 10**self.config.num_digits
        return [
            Problem(
                a=rng.randrange(hi),
                b=rng.randrange(hi),
                op=rng.choice(self.config.ops),
                num_digits=self.config.num_digits,
            )
            for _ in range(n)
        ]

    def corpus(self, seed: int, n: int) -> List[str]:
        """Prompt+answer lines, used to train the tokenizer and for supervised warm-up."""
        rng = random.Random(seed)
        return [p.prompt + p.answer for p in self.sample(rng, n)]

    def reward(self, problem: Problem, completion: str) -> float:
        """Reward of a decoded completion (text generated after the prompt, EOS stripped)."""
        return score_answer(problem.answer, completion, self.config.partial_credit)

    def rewards(self, problems: Sequence[Problem], completions: Sequence[str]) -> List[float]:
        return [self.reward(p, c) for p, c in zip(problems, completions)]


def _is_integer(text: str) -> bool:
    body = text[1:] if text.startswith("-") else text
    return body.isdigit() and (body == "0" or not body.startswith("0"))


def score_answer(reference: str, completion: str, partial_credit: float) -> float:
    """1.0 for an exact answer; partial_credit * matching-character fraction for a well-formed
    integer that is wrong (characters compared right-aligned over the longer of the two
    strings); 0.0 for anything that is not an integer."""
    completion = completion.strip()
    if completion == reference:
        return 1.0
    if partial_credit == 0.0 or not _is_integer(completion):
        return 0.0
    width = max(len(reference), len(completion))
    ref, got = reference.rjust(width), completion.rjust(width)
    matches = sum(1 for r, g in zip(ref, got) if r == g)
    return partial_credit * matches / width


def exact_match(reference: str, completion: str) -> float:
    """1.0 when the completion is exactly the reference answer, else 0.0."""
    return float(completion.strip() == reference)
