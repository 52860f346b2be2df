"""The rollout batch: what generation produced, what scoring and the advantage estimator
added, and the per-token masks the loss needs.

Layout: row ``i`` is ``prompt_i`` left-padded to ``prompt_width = P`` columns, then its
completion right-padded to ``T`` columns: ``input_ids [B, P + T]``. Per-token tensors
(``loss_mask``, the log-probs, per-token advantages) cover the completion columns only,
``[B, T]``, aligned with ``targets = input_ids[:, P:]``: the hidden state at column
``P + t - 1`` scores ``targets[:, t]``.

Two masks, on purpose:

- ``attention_mask [B, P + T]``: the tokens the model sees (prompt, generated tokens and any
  tool output);
- ``loss_mask [B, T]``: the tokens the loss trains on (generated tokens only: never padding,
  never tool output or other inserted text).

A multi-turn rollout builds rows from ``Trajectory`` objects: the prompt, then segments that
are generated (``trainable=True``, with the sampler's log-probs) or inserted (a tool result,
``trainable=False``: attention 1, loss 0). Branching trajectories that share a prefix are
independent rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch
from torch import Tensor


@dataclass
class Segment:
    """A run of completion tokens: generated (trainable) or inserted (tool output)."""

    ids: list[int]
    """Token ids."""

    logprobs: list[float] | None = None
    """The sampler's log-prob of each generated token (None for inserted text)."""

    trainable: bool = True
    """Whether the loss trains on these tokens."""


@dataclass
class Trajectory:
    """One row: a prompt and the completion segments that followed it."""

    prompt_ids: list[int]
    segments: list[Segment]
    finished: bool = False
    """Generation stopped by itself (end of sequence or a stop string), not at the limit."""

    @property
    def completion_ids(self) -> list[int]:
        return [t for s in self.segments for t in s.ids]


@dataclass
class RolloutBatch:
    """B rows in groups of ``group_size`` consecutive rows (the completions of one prompt).

    Fields set by the rollout come first; ``rewards``, ``old_logprobs``, ``ref_logprobs``
    and ``advantages`` are filled by the later stages of the trainer.
    """

    input_ids: Tensor
    """``[B, P + T]`` int64: left-padded prompt, then the completion, right-padded."""
    attention_mask: Tensor
    """``[B, P + T]`` int64: 1 on every real token (prompt, generated, inserted)."""
    loss_mask: Tensor
    """``[B, T]`` bool: the completion tokens the loss trains on."""
    sampler_logprobs: Tensor
    """``[B, T]`` float32: the generator's log-prob of each generated token (0 elsewhere),
    after its temperature / top-p: the rollout-correction input."""
    finished: Tensor
    """``[B]`` bool: stopped by end of sequence or a stop string, not at the length limit."""
    prompt_width: int
    """P: the prompt columns of ``input_ids``."""
    group_size: int
    """G: rows per prompt."""
    prompts: list[str]
    """Prompt text per row."""
    completions: list[str]
    """Decoded completion per row (special tokens removed)."""
    columns: dict[str, list] = field(default_factory=dict)
    """Dataset columns per row (e.g. ``answer``), handed to the reward functions."""
    rewards: Tensor | None = None
    """``[B]`` float32: the weighted sum of the reward terms (plus any shaping)."""
    reward_terms: dict[str, Tensor] = field(default_factory=dict)
    """Name -> ``[B]`` float32: each reward function's raw score."""
    old_logprobs: Tensor | None = None
    """``[B, T]`` float32 log-probs of the policy that sampled (None: on-policy update)."""
    ref_logprobs: Tensor | None = None
    """``[B, T]`` float32 log-probs of the reference model (None: no KL term)."""
    advantages: Tensor | None = None
    """``[B]`` (per sequence) or ``[B, T]`` (per token) float32."""
    values: Tensor | None = None
    """``[B, T]`` float32 value estimates of the critic at rollout time (PPO), 0 where the
    loss mask is 0."""
    returns: Tensor | None = None
    """``[B, T]`` float32 targets of the critic (GAE returns, ``advantages + values``)."""

    # --- views ----------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def targets(self) -> Tensor:
        """``[B, T]``: the completion tokens the hidden states score."""
        return self.input_ids[:, self.prompt_width:]

    @property
    def position_ids(self) -> Tensor:
        """``[B, P + T]``: positions counted from each row's first real token (left padding
        must not shift them), as ``generate`` counts them."""
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)

    @property
    def completion_lengths(self) -> Tensor:
        """``[B]``: real completion tokens (generated and inserted)."""
        return self.attention_mask[:, self.prompt_width:].sum(-1)

    def completion_ids(self) -> list[list[int]]:
        """Real completion tokens per row."""
        lengths = self.completion_lengths.tolist()
        return [row[:n] for row, n in zip(self.targets.tolist(), lengths, strict=True)]

    # --- row operations -------------------------------------------------------------------

    def select(self, rows: Tensor) -> RolloutBatch:
        """The rows ``rows`` (int64 index) as a new batch (``group_size`` kept as is)."""
        index = rows.tolist()
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                value = value[rows]
            elif f.name in ("prompts", "completions"):
                value = [value[i] for i in index]
            elif f.name == "columns":
                value = {k: [v[i] for i in index] for k, v in value.items()}
            elif f.name == "reward_terms":
                value = {k: v[rows] for k, v in value.items()}
            out[f.name] = value
        return RolloutBatch(**out)

    def split(self, size: int) -> list[RolloutBatch]:
        """Consecutive chunks of ``size`` rows (the last may be smaller)."""
        return [self.select(torch.arange(s, min(s + size, self.size)))
                for s in range(0, self.size, size)]

    @staticmethod
    def cat(batches: list[RolloutBatch]) -> RolloutBatch:
        """Rows of several batches (same group size) in order, re-padded to a common P and
        T."""
        prompt_width = max(b.prompt_width for b in batches)
        width = max(b.input_ids.shape[1] - b.prompt_width for b in batches)
        padded = [_repad(b, prompt_width, width) for b in batches]
        out = {}
        for f in fields(RolloutBatch):
            values = [getattr(b, f.name) for b in padded]
            if f.name in ("prompt_width", "group_size"):
                out[f.name] = values[0]
            elif values[0] is None:
                out[f.name] = None
            elif isinstance(values[0], Tensor):
                out[f.name] = torch.cat(values)
            elif isinstance(values[0], list):
                out[f.name] = [x for v in values for x in v]
            else:  # dicts of lists or tensors
                out[f.name] = {k: (torch.cat([v[k] for v in values])
                                   if isinstance(values[0][k], Tensor)
                                   else [x for v in values for x in v[k]])
                               for k in values[0]}
        return RolloutBatch(**out)

    @staticmethod
    def from_trajectories(trajectories: list[Trajectory], *, pad_id: int, group_size: int,
                          prompts: list[str], completions: list[str],
                          columns: dict[str, list] | None = None) -> RolloutBatch:
        """Collate trajectories: prompts left-padded, completions right-padded; ``loss_mask``
        is 1 on trainable segments only, ``attention_mask`` on every real token."""
        if len(trajectories) % group_size:
            raise ValueError(f"{len(trajectories)} trajectories are not a multiple of "
                             f"group_size={group_size}")
        prompt_width = max(len(t.prompt_ids) for t in trajectories)
        width = max(1, max(len(t.completion_ids) for t in trajectories))
        batch = len(trajectories)
        input_ids = torch.full((batch, prompt_width + width), pad_id, dtype=torch.int64)
        attention = torch.zeros_like(input_ids)
        loss_mask = torch.zeros((batch, width), dtype=torch.bool)
        sampler = torch.zeros((batch, width), dtype=torch.float32)
        for i, t in enumerate(trajectories):
            p = len(t.prompt_ids)
            input_ids[i, prompt_width - p:prompt_width] = torch.tensor(t.prompt_ids)
            attention[i, prompt_width - p:prompt_width] = 1
            col = 0
            for s in t.segments:
                n = len(s.ids)
                if n == 0:
                    continue
                input_ids[i, prompt_width + col:prompt_width + col + n] = torch.tensor(s.ids)
                attention[i, prompt_width + col:prompt_width + col + n] = 1
                if s.trainable:
                    loss_mask[i, col:col + n] = True
                    if s.logprobs is not None:
                        sampler[i, col:col + n] = torch.tensor(s.logprobs)
                col += n
        return RolloutBatch(
            input_ids=input_ids, attention_mask=attention, loss_mask=loss_mask,
            sampler_logprobs=sampler,
            finished=torch.tensor([t.finished for t in trajectories], dtype=torch.bool),
            prompt_width=prompt_width, group_size=group_size, prompts=list(prompts),
            completions=list(completions), columns=dict(columns or {}))

    def to(self, device: torch.device | str) -> RolloutBatch:
        """The same batch with its tensors on ``device``."""
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self)
                 if isinstance(getattr(self, f.name), Tensor)}
        moved["reward_terms"] = {k: v.to(device) for k, v in self.reward_terms.items()}
        return replace(self, **moved)


def _repad(b: RolloutBatch, prompt_width: int, width: int) -> RolloutBatch:
    """``b`` with prompts left-padded to ``prompt_width`` and completions right-padded to
    ``width`` columns."""
    left, right = prompt_width - b.prompt_width, width - (b.input_ids.shape[1] - b.prompt_width)
    if left == 0 and right == 0:
        return b

    def pad(x: Tensor, l: int, r: int) -> Tensor:  # noqa: E741
        return torch.nn.functional.pad(x, (l, r))

    per_token = {name: pad(getattr(b, name), 0, right)
                 for name in ("loss_mask", "sampler_logprobs", "old_logprobs", "ref_logprobs",
                              "values", "returns")
                 if getattr(b, name) is not None}
    adv = b.advantages
    if adv is not None and adv.dim() == 2:
        adv = pad(adv, 0, right)
    # Padding ids are never attended to nor trained on; 0 is in every vocabulary.
    input_ids = pad(b.input_ids, left, right)
    return replace(b, input_ids=input_ids, attention_mask=pad(b.attention_mask, left, right),
                   prompt_width=prompt_width, advantages=adv, **per_token)
