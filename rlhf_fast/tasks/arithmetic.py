"""Arithmetic with a verifiable reward: ``"3+8+5="`` -> ``"16"`` then ``<eos>``.

Rewards (TRL's reward-function convention: lists in, one float per completion out):

- ``correct``: 1 when the completion, stripped of special tokens, equals the answer exactly;
- ``format``: 1 when the completion is a number of at most ``answer_digits`` digits (a
  leading ``-`` allowed) and generation stopped by itself (``<eos>``), not at the length
  limit.

The task's reward is ``correct + format_weight * format``. Operand tuples are split once, by
a fixed hash, into a training pool and a held-out pool: ``eval_prompts`` come only from the
held-out pool and ``train_prompts`` never do, so held-out accuracy measures generalisation.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass

EVAL_SEED = 1234
"""Seed of the fixed held-out sample (the same prompts in every run)."""


def held_out(operands: Sequence[int]) -> bool:
    """About 1 operand tuple in 8 is held out, by a hash that mixes every operand."""
    h = 0
    for x in operands:
        h = (h * 1_000_003 + x * 7919 + 17) % 2_147_483_647
    return h % 8 == 3


def correct_reward(completions: Sequence[str], answer: Sequence[str], **_) -> list[float]:
    """1.0 where the completion is exactly the answer, else 0.0."""
    return [float(c.strip() == a) for c, a in zip(completions, answer, strict=True)]


@dataclass(frozen=True)
class ArithmeticTask:
    """``x_1 <op> x_2 <op> ... =`` with ``terms`` operands uniform in ``[0, 10**digits)``,
    evaluated left to right."""

    name: str = "sum3"
    """Registry name (``rlhf-fast train --task NAME``)."""

    terms: int = 3
    """Operands per prompt (>= 2)."""

    digits: int = 1
    """Digits of each operand."""

    operators: str = "+"
    """Operators to draw from (each position independently), a subset of ``+-*``."""

    eval_size: int = 200
    """Held-out prompts in ``eval_prompts`` (drawn with replacement if the pool is
    smaller)."""

    format_weight: float = 0.1
    """Weight of the format reward next to the correctness reward (1.0)."""

    def __post_init__(self) -> None:
        if not (self.terms >= 2 and self.digits >= 1):
            raise ValueError(f"need terms >= 2 and digits >= 1, got {self.terms}, "
                             f"{self.digits}")
        if not self.operators or set(self.operators) - set("+-*"):
            raise ValueError(f"operators must be a non-empty subset of '+-*', got "
                             f"{self.operators!r}")

    @property
    def answer_digits(self) -> int:
        """Most digits an answer can have (its sign aside)."""
        largest = 10**self.digits - 1
        bound = largest**self.terms if "*" in self.operators else largest * self.terms
        return len(str(bound))

    @property
    def max_new_tokens(self) -> int:
        """Room for the longest answer written twice (``-12=-12``, what a sloppy policy
        writes) and ``<eos>``."""
        return 2 * (self.answer_digits + 1) + 2

    @property
    def max_prompt_chars(self) -> int:
        """Characters of the longest prompt."""
        return self.terms * (self.digits + 1)

    def example(self, operands: Sequence[int], ops: Sequence[str]) -> dict:
        """``{"prompt", "answer"}`` for these operands and operators (left to right)."""
        value = operands[0]
        text = str(operands[0])
        for op, x in zip(ops, operands[1:], strict=True):
            value = {"+": value + x, "-": value - x, "*": value * x}[op]
            text += f"{op}{x}"
        return {"prompt": f"{text}=", "answer": str(value)}

    def _draw(self, rng: random.Random, from_held_out: bool) -> dict:
        high = 10**self.digits
        while True:
            operands = [rng.randrange(high) for _ in range(self.terms)]
            if held_out(operands) == from_held_out:
                ops = [rng.choice(self.operators) for _ in range(self.terms - 1)]
                return self.example(operands, ops)

    def train_prompts(self, n: int, seed: int = 0) -> list[dict]:
        """``n`` training examples ``{"prompt", "answer"}`` (never from the held-out pool)."""
        rng = random.Random(seed)
        return [self._draw(rng, from_held_out=False) for _ in range(n)]

    def eval_prompts(self) -> list[dict]:
        """The fixed held-out sample: ``eval_size`` examples, the same in every run."""
        rng = random.Random(EVAL_SEED)
        return [self._draw(rng, from_held_out=True) for _ in range(self.eval_size)]

    def held_out_pool_size(self) -> int:
        """Operand tuples in the held-out pool."""
        high = 10**self.digits
        return sum(held_out(t) for t in itertools.product(range(high), repeat=self.terms))

    def format_reward(self, completions: Sequence[str], finished: Sequence[bool],
                      **_) -> list[float]:
        """1.0 where the completion is a well-formed number that ended with ``<eos>``."""
        def ok(text: str, done: bool) -> bool:
            digits = text[1:] if text.startswith("-") else text
            return done and digits.isdigit() and len(digits) <= self.answer_digits
        return [float(ok(c, f)) for c, f in zip(completions, finished, strict=True)]

    @property
    def reward_functions(self) -> dict:
        """Name -> (reward function, weight); the trainer sums the weighted rewards."""
        return {"correct": (correct_reward, 1.0),
                "format": (self.format_reward, self.format_weight)}

    accuracy_reward: str = "correct"
    """The reward whose mean is the task's accuracy."""


TASKS: dict[str, ArithmeticTask] = {
    # Three one-digit operands summed: a 3-layer model reaches partial accuracy in a few
    # hundred supervised steps, which leaves RL room to improve. The default.
    "sum3": ArithmeticTask(name="sum3", terms=3, digits=1, operators="+"),
    # Two two-digit operands: carries make it much harder for a tiny model.
    "add2": ArithmeticTask(name="add2", terms=2, digits=2, operators="+"),
    # Three one-digit operands with + and -: negative answers, the sign is part of it.
    "mixed3": ArithmeticTask(name="mixed3", terms=3, digits=1, operators="+-"),
}
"""The embedded tasks by name."""


def get_task(name: str) -> ArithmeticTask:
    """The embedded task ``name``; unknown names raise ``ValueError`` listing the tasks."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; tasks: {sorted(TASKS)}")
    return TASKS[name]
