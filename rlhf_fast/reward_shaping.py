"""DAPO's reward shaping: the soft overlong penalty and dynamic sampling."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


def overlong_penalty(lengths: Tensor, max_length: int, cache_length: int,
                     factor: float = 1.0) -> Tensor:
    """0 up to ``max_length - cache_length``, then linear down to ``-factor`` at
    ``max_length``, and ``-factor`` beyond (DAPO's L_max is the hard generation cap)."""
    if not 0 < cache_length <= max_length:
        raise ValueError(f"need 0 < cache_length <= max_length, got {cache_length}, "
                         f"{max_length}")
    expected = max_length - cache_length
    length = lengths.float()
    ramp = (expected - length) / cache_length
    penalty = torch.where(length <= expected, torch.zeros_like(length), ramp.clamp(min=-1.0))
    return factor * penalty


def filter_groups(rewards: Tensor, group_size: int) -> tuple[Tensor, int]:
    """Keep the groups whose rewards are not all equal (they carry a learning signal).

    rewards ``[num_groups * G]`` -> (keep ``[num_groups]`` bool, number of groups dropped).
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards are not a multiple of group_size="
                         f"{group_size}")
    r = rewards.view(-1, group_size)
    keep = (r != r[:, :1]).any(-1)
    return keep, int((~keep).sum())


@dataclass
class DynamicSampling:
    """Accumulates kept groups over generation batches until ``target_groups`` are collected.

    ``add(rewards)`` filters a new batch and returns the indices of its kept groups;
    ``full`` says when to stop sampling, ``dropped`` counts the groups filtered out so far,
    and ``add`` raises after ``max_batches`` batches without filling the target (DAPO's
    ``max_num_gen_batches``)."""

    target_groups: int
    group_size: int
    max_batches: int = 10
    collected: int = 0
    dropped: int = 0
    batches: int = 0
    kept_per_batch: list[Tensor] = field(default_factory=list)

    @property
    def full(self) -> bool:
        return self.collected >= self.target_groups

    def add(self, rewards: Tensor) -> Tensor:
        if self.full:
            raise RuntimeError("DynamicSampling is already full")
        if self.batches >= self.max_batches:
            raise RuntimeError(f"no full batch after {self.max_batches} generation batches "
                               f"({self.collected}/{self.target_groups} groups kept)")
        keep, dropped = filter_groups(rewards, self.group_size)
        index = keep.nonzero().flatten()[: self.target_groups - self.collected]
        self.batches += 1
        self.dropped += dropped
        self.collected += index.numel()
        self.kept_per_batch.append(index)
        return index
