"""Reference PPO value loss (critic) with value clipping, differentiated by autograd.

    v_clip = v_old + clip(v - v_old, -c, c)
    L = 0.5 * agg[ max((v - R)^2, (v_clip - R)^2) ]      (clip=None: 0.5 * agg[(v - R)^2])

``agg`` is a policy-loss aggregation (``reference.aggregation.aggregate``) with its
``normalizer`` and ``max_length``; the returns R and v_old are constants.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .aggregation import aggregate


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *,
               clip: float | None = 0.5, aggregation: str = "token_mean",
               normalizer: float | None = None, max_length: int | None = None
               ) -> tuple[Tensor, Tensor]:
    """(loss, clip fraction): the fraction of valid tokens whose clipped term is the larger."""
    target = returns.detach().to(values.dtype)
    unclipped = (values - target) ** 2
    if clip is None:
        per_token = unclipped / 2
        clipped_larger = torch.zeros_like(mask, dtype=torch.bool)
    else:
        old = old_values.detach().to(values.dtype)
        v_clip = old + torch.clamp(values - old, -clip, clip)
        clipped = (v_clip - target) ** 2
        per_token = torch.maximum(unclipped, clipped) / 2
        clipped_larger = clipped > unclipped
    loss = aggregate(per_token, mask, aggregation, normalizer, max_length)
    valid = mask.bool()
    count = int(valid.sum())
    fraction = int((clipped_larger & valid).sum()) / count if count else 0.0
    return loss, torch.tensor(fraction)
