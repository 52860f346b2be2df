"""Reference reward shaping: DAPO's soft overlong penalty and its group filter.

    penalty(L) = 0                                  L <= L_max - L_cache
               = ((L_max - L_cache) - L) / L_cache  L_max - L_cache < L <= L_max
               = -1                                 L > L_max
    (times ``factor``); a group is kept when its rewards are not all equal.
"""

from __future__ import annotations

import torch
from torch import Tensor


def overlong_penalty(lengths: Tensor, max_length: int, cache_length: int,
                     factor: float = 1.0) -> Tensor:
    """Per-sequence penalty, float32."""
    expected = max_length - cache_length
    out = []
    for length in lengths.tolist():
        if length <= expected:
            out.append(0.0)
        elif length <= max_length:
            out.append(factor * (expected - length) / cache_length)
        else:
            out.append(-factor)
    return torch.tensor(out, dtype=torch.float32)


def keep_groups(rewards: Tensor, group_size: int) -> list[bool]:
    """Whether each group's rewards differ (it carries a learning signal)."""
    values = rewards.flatten().tolist()
    return [len(set(values[g:g + group_size])) > 1 for g in range(0, len(values), group_size)]
