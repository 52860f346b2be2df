"""Reference loss aggregation: the four ways a per-token loss becomes one number.

Written from the definitions of ``PolicyLossConfig.aggregation`` (``mode`` / ``normalizer`` /
``max_length``), as explicit sums (no weight tensor), so a wrong weight in the fused ops
cannot hide here. ``m`` is the 0/1 mask of the tokens that count, ``L`` the per-token loss:

    token_mean               sum_{i,t} m L / N_tok             N_tok = sum m
    seq_mean_token_mean      sum_i (sum_t m L / |y_i|) / N_seq  over non-empty sequences
    seq_mean_token_sum       sum_i (sum_t m L) / N_seq          over non-empty sequences
    seq_mean_token_sum_norm  sum_{i,t} m L / (B * max_length)   max_length default T

``normalizer`` replaces the denominator (N_tok, N_seq or B * max_length). With
``count_empty`` the sequence count N_seq is B, empty sequences included (TRL's grpo, verl's
geo_mean). An empty batch (or an empty sequence) adds 0: a count of 0 is never divided by.
"""

from __future__ import annotations

import torch
from torch import Tensor

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum",
                "seq_mean_token_sum_norm")


def aggregate(values: Tensor, mask: Tensor, aggregation: str, normalizer: float | None = None,
              max_length: int | None = None, count_empty: bool = False) -> Tensor:
    """The aggregated scalar of ``values`` ``[B, T]`` over ``mask`` ``[B, T]`` (0/1 or bool),
    differentiable in ``values``; computed in ``values``' dtype, without a host sync."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}")
    valid = mask.bool()
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    # A masked position may hold inf or NaN (an unused log-ratio): select, never multiply.
    picked = torch.where(valid, values, zero)
    batch, seq_len = valid.shape
    if aggregation in ("token_mean", "seq_mean_token_sum_norm"):
        total = picked.sum()
        if normalizer is not None:
            return total / normalizer
        if aggregation == "seq_mean_token_sum_norm":
            return total / (batch * (max_length if max_length is not None else seq_len))
        count = valid.sum().to(values.dtype)
        return torch.where(count > 0, total / torch.where(count > 0, count, 1), zero)
    lengths = valid.sum(dim=1).to(values.dtype)
    non_empty = lengths > 0
    per_sequence = picked.sum(dim=1)
    if aggregation == "seq_mean_token_mean":
        per_sequence = per_sequence / torch.where(non_empty, lengths, 1)
    return sequence_mean(per_sequence, non_empty, normalizer, count_empty)


def sequence_mean(values: Tensor, non_empty: Tensor, normalizer: float | None = None,
                  count_empty: bool = False) -> Tensor:
    """Sum of per-sequence ``values`` ``[B]`` over the non-empty sequences, divided by their
    number (all B with ``count_empty``; or by ``normalizer``): the sequence-level mean (and
    GMPO's)."""
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    total = torch.where(non_empty, values, zero).sum()
    if normalizer is not None:
        return total / normalizer
    if count_empty:
        return total / max(values.shape[0], 1)
    count = non_empty.sum().to(values.dtype)
    return torch.where(count > 0, total / torch.where(count > 0, count, 1), zero)
