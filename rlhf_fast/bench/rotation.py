"""Rotating input copies so that a small problem is not timed out of a warm L2 cache."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch

L2_FLUSH_BYTES = 256 * 2**20
"""Rotate through enough copies that consecutive calls touch at least this much memory
(H100 / H200 L2: 50 MB)."""


def rotating(make: Callable[[int], object], input_bytes: int, device: torch.device,
             max_copies: int = 8) -> Callable[[], object]:
    """``make(i)`` builds the i-th copy of a step's inputs and returns the step; the result
    cycles through the copies on CUDA (one copy on the CPU, which has no such cache)."""
    copies = 1
    if device.type == "cuda" and input_bytes > 0:
        copies = max(1, min(max_copies, -(-L2_FLUSH_BYTES // input_bytes)))
    steps = [make(i) for i in range(copies)]
    if copies == 1:
        return steps[0]
    cycle = itertools.cycle(steps)
    return lambda: next(cycle)()
