"""PPO value (critic) loss with value clipping, on ``[B, T]``."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .loss_weights import aggregation_weights


class ValueLossOutput(NamedTuple):
    loss: Tensor       # scalar, differentiable w.r.t. values
    clip_frac: Tensor  # fraction of valid tokens where the clipped term is the larger one


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *,
               clip: float | None = 0.5, aggregation: str = "token_mean",
               normalizer: float | None = None, max_length: int | None = None
               ) -> ValueLossOutput:
    """``0.5 * agg[max((v - R)^2, (v_clip - R)^2)]``, ``v_clip = v_old + clip(v - v_old, +-c)``.

    values: ``[B, T]`` current value predictions (differentiable); old_values: the rollout's
    predictions; returns: the targets (GAE returns); mask: ``[B, T]`` bool or 0/1.
    ``clip=None`` is the unclipped squared error. ``aggregation`` / ``normalizer`` /
    ``max_length`` as in ``PolicyLossConfig`` (verl default clip 0.5).
    """
    if values.shape != old_values.shape or values.shape != returns.shape \
            or tuple(mask.shape) != tuple(values.shape):
        raise ValueError(f"values, old_values, returns and mask must share one shape; got "
                         f"{tuple(values.shape)}, {tuple(old_values.shape)}, "
                         f"{tuple(returns.shape)}, {tuple(mask.shape)}")
    if clip is not None and not clip > 0:
        raise ValueError(f"clip must be None or > 0, got {clip}")
    m = mask.to(values.dtype)
    target = returns.detach().to(values.dtype)
    unclipped = (values - target) ** 2
    if clip is None:
        per_token = 0.5 * unclipped
        clipped_larger = torch.zeros_like(m, dtype=torch.bool)
    else:
        old = old_values.detach().to(values.dtype)
        v_clip = old + torch.clamp(values - old, -clip, clip)
        clipped = (v_clip - target) ** 2
        per_token = 0.5 * torch.maximum(unclipped, clipped)
        clipped_larger = clipped > unclipped
    weights = aggregation_weights(m, aggregation, normalizer, max_length)
    loss = (weights * per_token).sum()
    valid = m > 0
    clip_frac = (clipped_larger & valid).sum() / valid.sum().clamp(min=1)
    return ValueLossOutput(loss, clip_frac.detach().float())
