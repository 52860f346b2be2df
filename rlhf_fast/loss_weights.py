"""Detached per-token weights of the policy losses, on ``[B, T]`` tensors.

None of these carries a gradient: they are the aggregation weights, the entropy-aware
advantage, the top-entropy mask and the rollout importance weights. The reference and the
fused op both use them; what the two compute independently is everything differentiable.

Sequences are rows of ``[B, T]`` tensors, or, for packed batches, the spans of a ``[1, N]``
row given by a ``layout`` (``rlhf_fast.ops.packing``: ``seq_sum`` and ``per_token``); the
default is the padded layout, and its results are the same to the bit either way.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .config import PolicyLossConfig
from .ops.packing import Layout, Padded


def _layout(layout: Layout | None, mask: Tensor) -> Layout:
    return layout if layout is not None else Padded(mask.shape[0])


def aggregation_weights(mask: Tensor, aggregation: str, normalizer: float | None = None,
                        max_length: int | None = None, layout: Layout | None = None) -> Tensor:
    """w with ``aggregated loss = sum(w * L)``; mask ``[B, T]`` (or ``[1, N]`` packed) of 0/1
    in the working dtype.

    ``token_mean``: 1 / sum(m); ``seq_mean_token_mean``: 1 / (L_i * non-empty sequences);
    ``seq_mean_token_sum``: 1 / non-empty sequences; ``seq_mean_token_sum_norm``:
    1 / (B * max_length), max_length defaulting to T (a packed batch has no T: it needs
    ``max_length`` or ``normalizer``). ``normalizer`` replaces the count.
    """
    layout = _layout(layout, mask)
    seq_lengths = layout.seq_sum(mask)
    lengths = layout.per_token(seq_lengths)
    n_seq = (seq_lengths > 0).sum().clamp(min=1)
    norm = normalizer
    if aggregation == "token_mean":
        return mask / (norm if norm is not None else mask.sum().clamp(min=1))
    if aggregation == "seq_mean_token_mean":
        return mask / lengths.clamp(min=1) / (norm if norm is not None else n_seq)
    if aggregation == "seq_mean_token_sum":
        return mask / (norm if norm is not None else n_seq)
    if aggregation != "seq_mean_token_sum_norm":
        raise ValueError(f"unknown aggregation {aggregation!r}")
    if norm is None and max_length is None and not isinstance(layout, Padded):
        raise ValueError("aggregation='seq_mean_token_sum_norm' on a packed batch needs "
                         "max_length (or normalizer): a packed batch has no padded length")
    max_length = max_length if max_length is not None else mask.shape[-1]
    return mask / (norm if norm is not None else layout.num_sequences * max_length)


def sequence_count(mask: Tensor, config: PolicyLossConfig,
                   layout: Layout | None = None) -> Tensor:
    """Denominator of per-sequence losses (GMPO): ``normalizer`` or non-empty sequences."""
    if config.normalizer is not None:
        # A fill on the device: torch.tensor(...) would copy from the host and synchronise.
        return torch.full((), config.normalizer, dtype=mask.dtype, device=mask.device)
    return (_layout(layout, mask).seq_sum(mask) > 0).sum().clamp(min=1).to(mask.dtype)


def entropy_statistics(entropy: Tensor, mask: Tensor, quantile: float | None) -> dict:
    """Mean, std (unbiased; 1 when zero or undefined) and the (1 - quantile) quantile of the
    entropy over valid tokens: what the batch-statistic features need.

    Computed with masks, not by gathering the valid tokens (whose count the host would have to
    read): no host sync. The quantile is ``torch.quantile``'s linear interpolation between
    the sorted valid values, step for step; with no valid token it is -inf (every token
    passes) and the mean 0.
    """
    valid = mask > 0
    n = valid.sum()
    one = torch.ones((), dtype=entropy.dtype, device=entropy.device)
    zero = torch.zeros_like(entropy)
    mean = torch.where(valid, entropy, zero).sum() / n.clamp(min=1)
    deviation = torch.where(valid, entropy - mean, zero)
    std = ((deviation * deviation).sum() / (n - 1).clamp(min=1)).sqrt()
    std = torch.where((n > 1) & (std > 0) & torch.isfinite(std), std, one)
    threshold = None
    if quantile is not None:
        values = torch.where(valid, entropy, float("inf")).flatten().sort().values
        rank = (1 - quantile) * (n - 1).to(entropy.dtype)
        below = rank.floor().long().clamp(min=0)
        above = rank.ceil().long().clamp(min=0)
        low, high = values[below], values[above]
        threshold = torch.where(n > 0, low.lerp(high, rank - below.to(entropy.dtype)),
                                float("-inf"))
    return {"mean": mean, "std": std, "threshold": threshold}


def entropy_advantage(advantages: Tensor, entropy: Tensor, mask: Tensor, alpha: float,
                      stats: dict | None = None) -> Tensor:
    """AEPO: ``A * (1 + alpha * z(H))``, z standardised over valid tokens (unbiased std;
    a zero or undefined std counts as 1)."""
    stats = stats if stats is not None else entropy_statistics(entropy, mask, None)
    return advantages * (1 + alpha * (entropy - stats["mean"]) / stats["std"])


def top_entropy_mask(entropy: Tensor, mask: Tensor, quantile: float | None,
                     stats: dict | None = None) -> Tensor:
    """1 where a token's entropy is at least the (1 - quantile) quantile of valid tokens."""
    if quantile is None:
        return torch.ones_like(entropy)
    stats = stats if stats is not None else entropy_statistics(entropy, mask, quantile)
    if stats["threshold"] is None:
        return torch.ones_like(entropy)
    return (entropy >= stats["threshold"]).to(entropy.dtype)


def _truncated(w: Tensor, config: PolicyLossConfig) -> Tensor:
    if config.rollout_correction.endswith("truncate"):
        return torch.clamp(w, max=config.rollout_cap)
    return torch.where(w <= config.rollout_cap, w, torch.zeros_like(w))


def _rollout_log_weights(old: Tensor, rollout: Tensor, config: PolicyLossConfig) -> Tensor:
    log_w = old - rollout.to(old.dtype)
    if config.log_ratio_clamp is not None:
        log_w = log_w.clamp(-config.log_ratio_clamp, config.log_ratio_clamp)
    return log_w


def rollout_weights(old: Tensor, rollout: Tensor | None, mask: Tensor,
                    config: PolicyLossConfig, layout: Layout | None = None) -> Tensor:
    """Truncated importance weights against the inference engine (1 when off)."""
    if config.rollout_correction is None or rollout is None:
        return torch.ones_like(old)
    if config.rollout_correction.startswith("sequence"):
        layout = _layout(layout, mask)
        w = rollout_sequence_weights(old, rollout, mask, config, layout)
        return layout.per_token(w).expand_as(old)
    return _truncated(torch.exp(_rollout_log_weights(old, rollout, config)), config)


def rollout_sequence_weights(old: Tensor, rollout: Tensor | None, mask: Tensor,
                             config: PolicyLossConfig, layout: Layout | None = None
                             ) -> Tensor:
    """Per-sequence ``[S]`` weights of sequence-level rollout correction: the product of the
    token ratios (the exp of the masked sum of log-ratios), truncated or masked at the cap;
    1 when there is no sequence-level correction."""
    layout = _layout(layout, mask)
    if config.rollout_correction is None or rollout is None \
            or not config.rollout_correction.startswith("sequence"):
        return torch.ones(layout.num_sequences, dtype=old.dtype, device=old.device)
    log_w = layout.seq_sum(_rollout_log_weights(old, rollout, config) * mask)
    return _truncated(torch.exp(log_w), config)
