"""``shop``: an embedded agentic task where the tools help, with verifiable rewards.

Two kinds of prompt, drawn uniformly:

- ``37*48=``: a product of two two-digit numbers, too hard for the tiny model's head; the
  calculator has it: ``<python>37*48</python><result>1776</result>1776<eos>``;
- ``apple=``: the price of a good, which only the knowledge base knows:
  ``<search>apple</search><result>apple costs 2354</result>2354<eos>``.

Widths are fixed on purpose: goods have five letters like the products' ``37*48``, factors
lie in [32, 99] and prices in [1000, 9999], so every answer has four digits. The two copies
the model makes (the prompt's operands or good into the call, the result's number into the
answer) are then the same for both tools and at fixed offsets, which a three-layer model
learns within its short warm-up (copying at variable offsets takes it far longer).

Rewards (TRL's convention, one float per completion):

- ``correct``: 1 when the final answer (the text after the last ``</result>``, or the whole
  completion without a tool call) is exactly the answer;
- ``format``: 1 when generation ended with ``<eos>``, the final answer is a number, and every
  result in the completion was inserted by a tool call (the model wrote no ``<result>`` of
  its own).

The task's reward is ``correct + format_weight * format``. Held-out prompts (``eval_prompts``)
come from a pool disjoint from the training prompts (a fixed hash of the prompt text).

The tiny model's warm-up (``demonstration_batch``) teacher-forces whole trajectories with the
results masked out of the loss, as a rollout inserts them. The demonstrations are imperfect
on purpose: the writer skips the calculator in ``guess_calculation`` of them and the search
in ``guess_lookup``, writing a guess (a wrong number of the right size) instead. The
warmed-up model knows the format and copies well, and its greedy answers use the tools, but
sampled at temperature 1 it calls a tool about two times in three: RL with the exact-match
reward teaches it to call the tool every time.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from functools import cached_property

import torch

from ..tasks.arithmetic import EVAL_SEED, held_out
from ..tasks.tiny import WarmupConfig, supervised_batch
from ..tasks.tokenizer import char_tokenizer
from .search import KnowledgeBase, packaged_knowledge
from .tools import RESULT_CLOSE, RESULT_OPEN, ToolBox, default_toolbox

CHARSET = "0123456789abcdefghijklmnopqrstuvwxyz +-*/=.,:;'()<>_|!?"
"""Characters of prompts, calls and results (tool error messages included), one token each."""

NUMBER = re.compile(r"-?\d{1,12}")


def final_answer(completion: str) -> str:
    """The text after the last result (the whole completion without one), stripped."""
    return completion.rsplit(RESULT_CLOSE, 1)[-1].strip()


def correct_reward(completions: list[str], answer: list[str], **_) -> list[float]:
    """1.0 where the final answer is exactly the answer."""
    return [float(final_answer(c) == a) for c, a in zip(completions, answer, strict=True)]


@dataclass(frozen=True, repr=False)
class ShopTask:
    """Products, prices and priced products (module docstring)."""

    name: str = "shop"
    """Registry name (``rlhf-fast train arpo --task NAME``)."""

    kinds: tuple[str, ...] = ("python", "search")
    """Prompt kinds to draw from: ``python`` (``37*48=``), ``search`` (``apple=``)."""

    eval_size: int = 200
    """Held-out prompts in ``eval_prompts``."""

    format_weight: float = 0.1
    """Weight of the format reward next to the correctness reward (1.0)."""

    guess_calculation: float = 0.5
    """Warm-up: share of calculator calls the demonstrations skip, guessing the product
    (the writer over-trusts mental arithmetic)."""

    guess_lookup: float = 0.1
    """Warm-up: share of searches the demonstrations skip, guessing the price."""

    max_new_tokens: int = 48
    """Length budget of a completion (generated and inserted tokens): a demonstration has
    at most 30 (``<search>apple</search><result>apple costs 2354</result>2354<eos>``)."""

    accuracy_reward: str = "correct"
    """The reward whose mean is the task's accuracy."""

    warmup_config: WarmupConfig = field(
        default_factory=lambda: WarmupConfig(steps=300, batch_size=32, lr=3e-3))
    """The tiny model's warm-up on this task (``warmed_up_tiny_model`` reads it)."""

    def __post_init__(self) -> None:
        if not self.kinds or set(self.kinds) - {"python", "search"}:
            raise ValueError(f"kinds must be a non-empty subset of (python, search), got "
                             f"{self.kinds}")
        for name in ("guess_calculation", "guess_lookup"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")

    def __repr__(self) -> str:
        # The warm-up cache key is built from repr(task): the knowledge base is part of it.
        return (f"ShopTask(name={self.name!r}, kinds={self.kinds!r}, "
                f"guess_calculation={self.guess_calculation!r}, guess_lookup="
                f"{self.guess_lookup!r}, max_new_tokens="
                f"{self.max_new_tokens!r}, knowledge={self.knowledge.digest()})")

    # --- tools, tokenizer ---------------------------------------------------------------

    @cached_property
    def knowledge(self) -> KnowledgeBase:
        return packaged_knowledge()

    def toolbox(self) -> ToolBox:
        """The tools the task is solved with: the calculator and the packaged search."""
        return default_toolbox()

    def tokenizer(self):
        """The character tokenizer over ``CHARSET`` with every tag of the toolbox as one
        token."""
        tok = char_tokenizer(CHARSET)
        tok.add_tokens(list(self.toolbox().tags))
        return tok

    # --- prompts ------------------------------------------------------------------------

    def example(self, kind: str, a: int | str, b: int | None = None) -> dict:
        """``{"prompt", "answer", "kind"}``: ``a*b`` (python) or the price of good ``a``
        (search)."""
        if kind == "python":
            return {"prompt": f"{a}*{b}=", "answer": str(a * b), "kind": kind}
        return {"prompt": f"{a}=", "answer": str(self.price(a)), "kind": kind}

    def price(self, good: str) -> int:
        """The knowledge base's price of ``good``."""
        return int(self.knowledge.lookup(good).text.rsplit(" ", 1)[-1])

    def _draw(self, rng: random.Random, from_held_out: bool) -> dict:
        goods = [e.title for e in self.knowledge.entries]
        while True:
            kind = rng.choice(self.kinds)
            a = rng.randrange(32, 100) if kind == "python" else rng.choice(goods)
            b = rng.randrange(32, 100) if kind != "search" else None
            ex = self.example(kind, a, b)
            if held_out([ord(c) for c in ex["prompt"]]) == from_held_out:
                return ex

    def train_prompts(self, n: int, seed: int = 0) -> list[dict]:
        """``n`` training examples (never from the held-out pool)."""
        rng = random.Random(seed)
        return [self._draw(rng, from_held_out=False) for _ in range(n)]

    def eval_prompts(self) -> list[dict]:
        """The fixed held-out sample (the same in every run)."""
        rng = random.Random(EVAL_SEED)
        return [self._draw(rng, from_held_out=True) for _ in range(self.eval_size)]

    # --- rewards ------------------------------------------------------------------------

    def format_reward(self, completions: list[str], finished: list[bool], **_) -> list[float]:
        """1.0 where the completion ended by itself with a numeric final answer, and each
        result was inserted by a call."""
        closes = self.toolbox().stop_strings

        def ok(text: str, done: bool) -> bool:
            calls = sum(text.count(tag) for tag in closes)
            return (done and NUMBER.fullmatch(final_answer(text)) is not None
                    and text.count(RESULT_OPEN) == calls and text.count(RESULT_CLOSE) == calls)
        return [float(ok(c, f)) for c, f in zip(completions, finished, strict=True)]

    @property
    def reward_functions(self) -> dict:
        """Name -> (reward function, weight)."""
        return {"correct": (correct_reward, 1.0),
                "format": (self.format_reward, self.format_weight)}

    # --- warm-up demonstrations ---------------------------------------------------------

    def demonstration(self, example: dict, rng: random.Random) -> str:
        """A whole trajectory (results included) for ``example``; the call is skipped with
        probability ``guess_calculation`` / ``guess_lookup`` and its value guessed."""
        def guess(true: int) -> int:
            digits = len(str(true))
            low = 10 ** (digits - 1) if digits > 1 else 0
            value = rng.randrange(low, 10**digits)
            return value if value != true else (value + 1 if value + 1 < 10**digits else low)

        def python(x: int, y: int) -> tuple[str, int]:
            if rng.random() < self.guess_calculation:
                return "", guess(x * y)
            return f"<python>{x}*{y}</python>{RESULT_OPEN}{x * y}{RESULT_CLOSE}", x * y

        def search(good: str) -> tuple[str, int]:
            price = self.price(good)
            if rng.random() < self.guess_lookup:
                return "", guess(price)
            return (f"<search>{good}</search>{RESULT_OPEN}{self.knowledge.search(good)}"
                    f"{RESULT_CLOSE}", price)

        prompt = example["prompt"][:-1]
        if example["kind"] == "python":
            x, y = (int(v) for v in prompt.split("*"))
            text, value = python(x, y)
        else:
            text, value = search(prompt)
        return f"{text}{value}"

    def demonstration_batch(self, tokenizer, rng: random.Random,
                            config: WarmupConfig) -> dict[str, torch.Tensor]:
        """The warm-up's batch: ``config.batch_size`` demonstrations (``masked_batch``)."""
        examples = self.train_prompts(config.batch_size, seed=rng.randrange(2**31))
        return self.masked_batch(tokenizer, examples,
                                 [self.demonstration(ex, rng) for ex in examples])

    @staticmethod
    def masked_batch(tokenizer, examples: list[dict],
                     completions: list[str]) -> dict[str, torch.Tensor]:
        """``supervised_batch`` of ``prompt + completion + <eos>`` with the inserted results
        (from ``<result>`` to ``</result>``) out of the labels, as a rollout masks them."""
        batch = supervised_batch(tokenizer, examples, completions)
        ids = batch["input_ids"]
        opened = ids == tokenizer.convert_tokens_to_ids(RESULT_OPEN)
        closed = ids == tokenizer.convert_tokens_to_ids(RESULT_CLOSE)
        inside = (opened.cumsum(-1) - closed.cumsum(-1) > 0) | closed
        batch["labels"] = batch["labels"].masked_fill(inside, -100)
        return batch


AGENT_TASKS: dict[str, ShopTask] = {"shop": ShopTask()}
"""The embedded agentic tasks by name."""


def get_agent_task(name: str) -> ShopTask:
    """The embedded agentic task ``name``; unknown names raise ``ValueError``."""
    if name not in AGENT_TASKS:
        raise ValueError(f"unknown agentic task {name!r}; tasks: {sorted(AGENT_TASKS)}")
    return AGENT_TASKS[name]
