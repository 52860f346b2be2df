"""Preference pairs for DPO: loading and checking ``{prompt, chosen, rejected}`` rows, the
embedded task's pair generator, and the stacked batch ``linear_dpo_loss`` takes.

A pair batch of B pairs is one ``RolloutBatch`` of 2B rows: rows ``0..B-1`` are the chosen
completions, rows ``B..2B-1`` their rejected partners, in the same order (the layout of
``dpo_loss`` / ``linear_dpo_loss``). Each row is the prompt (left-padded) then the completion
(right-padded) and ``<eos>``, so the loss mask covers exactly the completion tokens and the
hidden states come from ``Policy.completion_hidden`` as in the RL trainers.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .batch import RolloutBatch, Segment, Trajectory

PAIR_COLUMNS = ("prompt", "chosen", "rejected")
"""The columns of a preference pair (TRL's standard, non-conversational format)."""


def load_pairs(source) -> list[dict]:
    """Checked pairs from a JSONL file path (one object per line), a ``datasets.Dataset``
    (anything with ``column_names`` whose rows are dicts), or a sequence of dicts. Other
    columns are kept. Raises ``ValueError`` naming the pair and column for a missing column,
    an empty prompt or completion, and ``TypeError`` for a value that is not a string."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"pairs file {path} does not exist")
        rows = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number} is not a JSON object: {error}") from None
    elif hasattr(source, "column_names"):
        missing = [c for c in PAIR_COLUMNS if c not in source.column_names]
        if missing:
            raise ValueError(f"the dataset is missing column(s) {missing}: preference pairs "
                             f"need the columns {list(PAIR_COLUMNS)} (it has "
                             f"{list(source.column_names)})")
        rows = [dict(row) for row in source]
    elif isinstance(source, Sequence):
        rows = list(source)
    else:
        raise TypeError(f"pairs must be a JSONL path, a datasets.Dataset or a list of dicts, "
                        f"got {type(source).__name__}")
    return check_pairs(rows)


def check_pairs(rows: Sequence) -> list[dict]:
    """The rows as dicts, after checking each has non-empty string columns ``PAIR_COLUMNS``."""
    if not rows:
        raise ValueError("no preference pairs")
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise TypeError(f"pair {i} must be a dict with {list(PAIR_COLUMNS)}, got "
                            f"{type(row).__name__}")
        missing = [c for c in PAIR_COLUMNS if c not in row]
        if missing:
            raise ValueError(f"pair {i} is missing column(s) {missing}: a preference pair has "
                             f"{list(PAIR_COLUMNS)}")
        for column in PAIR_COLUMNS:
            if not isinstance(row[column], str):
                raise TypeError(f"pair {i}: {column!r} must be a string (conversational "
                                f"pairs: apply the chat template first), got "
                                f"{type(row[column]).__name__}")
            if not row[column]:
                what = "prompt" if column == "prompt" else f"{column!r} completion"
                raise ValueError(f"pair {i} has an empty {what}: DPO compares the "
                                 "log-probabilities of two non-empty completions")
        out.append(dict(row))
    return out


def arithmetic_pairs(task, n: int | None = None, *, seed: int = 0,
                     held_out: bool = False) -> list[dict]:
    """Pairs for an embedded arithmetic task: the answer is chosen; the rejected completion
    is, with equal odds, the right number restated (``16=16``, the warm-up's habit) or a
    number off by 1 or 2. ``held_out``: from the task's held-out prompts (``n`` of them, all
    by default), else ``n`` training prompts drawn with ``seed``."""
    if held_out:
        examples = task.eval_prompts()[:n]
    else:
        if n is None:
            raise ValueError("n (the number of training pairs) is required")
        examples = task.train_prompts(n, seed=seed)
    rng = random.Random(seed + 7919)
    pairs = []
    for ex in examples:
        answer = ex["answer"]
        if rng.random() < 0.5:
            rejected = f"{answer}={answer}"
        else:
            rejected = str(int(answer) + rng.choice((-2, -1, 1, 2)))
        pairs.append({"prompt": ex["prompt"], "chosen": answer, "rejected": rejected,
                      "answer": answer})
    return pairs


@dataclass
class TokenizedPair:
    """Token ids of one pair: the prompt (with the tokenizer's special tokens) and each
    completion followed by ``<eos>``."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


def tokenize_pair(tokenizer, pair: Mapping, index: int, context: int | None,
                  prompt_ids: list[int] | None = None) -> TokenizedPair:
    """``TokenizedPair`` of ``pair``; raises when a completion encodes to nothing or the
    longer row exceeds the model's ``context``."""
    prompt = prompt_ids if prompt_ids is not None else tokenizer(pair["prompt"])["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = {}
    for column in ("chosen", "rejected"):
        tokens = tokenizer(pair[column], add_special_tokens=False)["input_ids"]
        if not tokens:
            raise ValueError(f"pair {index}: the {column!r} completion {pair[column]!r} "
                             "encodes to no tokens")
        ids[column] = tokens + eos
    longest = len(prompt) + max(len(ids["chosen"]), len(ids["rejected"]))
    if context is not None and longest > context:
        raise ValueError(f"pair {index} has {longest} tokens (prompt and completion), more "
                         f"than the model's context of {context} (max_position_embeddings)")
    return TokenizedPair(prompt, ids["chosen"], ids["rejected"])


@dataclass
class PairBatch:
    """B preference pairs as 2B stacked rows (chosen, then rejected)."""

    rows: RolloutBatch
    """``2B`` rows: ``rows[:B]`` chosen, ``rows[B:]`` rejected (``input_ids [2B, P + T]``,
    ``loss_mask [2B, T]`` on the completion and ``<eos>``)."""
    index: Tensor
    """``[B]`` int64: each pair's position in the dataset (-1 for sampled pairs)."""
    ref_logprobs: Tensor | None = None
    """``[2B]`` float32 reference sequence log-probs (sums over the completion), when
    precomputed; None: computed inside the loss from the reference model."""

    @property
    def size(self) -> int:
        return self.index.shape[0]

    @property
    def loss_mask(self) -> Tensor:
        return self.rows.loss_mask

    @property
    def chosen_tokens(self) -> Tensor:
        """Completion tokens of the chosen rows (the NLL term's count)."""
        return self.rows.loss_mask[:self.size].sum()

    def select(self, pairs: Tensor) -> PairBatch:
        """The pairs ``pairs`` (int64 index), chosen and rejected rows together."""
        rows = torch.cat([pairs, pairs + self.size])
        ref = self.ref_logprobs[rows] if self.ref_logprobs is not None else None
        return PairBatch(self.rows.select(rows), self.index[pairs], ref)

    def split(self, size: int) -> list[PairBatch]:
        """Consecutive chunks of ``size`` pairs."""
        return [self.select(torch.arange(s, min(s + size, self.size)))
                for s in range(0, self.size, size)]

    @staticmethod
    def collate(pairs: Sequence[TokenizedPair], index: Sequence[int], *, pad_id: int
                ) -> PairBatch:
        """Stack tokenized pairs: chosen rows, then rejected rows, padded together."""
        rows = [Trajectory(p.prompt, [Segment(p.chosen)], True) for p in pairs]
        rows += [Trajectory(p.prompt, [Segment(p.rejected)], True) for p in pairs]
        batch = RolloutBatch.from_trajectories(rows, pad_id=pad_id, group_size=1,
                                               prompts=[""] * len(rows),
                                               completions=[""] * len(rows))
        return PairBatch(batch, torch.tensor(list(index), dtype=torch.int64))
