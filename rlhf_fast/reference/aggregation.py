"""Reference loss aggregation: the four ways a per-token loss becomes one number.

Written from the definitions of ``PolicyLossConfig.aggregation`` / ``normalizer`` /
``max_length``, as explicit sums (no weight tensor), so a wrong weight in the fused ops
cannot hide here. ``m`` is the 0/1 mask of the tokens that count, ``L`` the per-token loss:

    token_mean               sum_{i,t} m L / N_tok             N_tok = sum m
    seq_mean_token_mean      sum_i (sum_t m L / |y_i|) / N_seq  over non-empty sequences
    seq_mean_token_sum       sum_i (sum_t m L) / N_seq          over non-empty sequences
    seq_mean_token_sum_norm  sum_{i,t} m L / (B * max_length)   max_length default T

``normalizer`` replaces the denominator (N_tok, N_seq or B * max_length). An empty batch
(or an empty sequence) adds 0: a count of 0 is never divided by.
"""

from __future__ import annotations

import torch
from torch import Tensor

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum",
                "seq_mean_token_sum_norm")


def aggregate(values: Tensor, mask: Tensor, aggregation: str, normalizer: float | None = None,
              max_length: int | None = None) -> Tensor:
    """The aggregated scalar of ``values`` ``[B, T]`` over ``mask`` ``[B, T]`` (0/1 or bool),
    differentiable in ``values``; computed in ``values``' dtype."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}")
    m = mask.to(values.dtype)
    batch, seq_len = m.shape
    # A masked position may hold inf or NaN (an unused log-ratio): select, never multiply.
    picked = torch.where(m > 0, values, torch.zeros((), dtype=values.dtype))
    per_sequence_sum = picked.sum(dim=1)
    lengths = m.sum(dim=1)
    if aggregation == "token_mean":
        count = float(m.sum())
        denominator = normalizer if normalizer is not None else count
        return picked.sum() / denominator if denominator else picked.sum() * 0
    if aggregation == "seq_mean_token_sum_norm":
        length = max_length if max_length is not None else seq_len
        denominator = normalizer if normalizer is not None else batch * length
        return picked.sum() / denominator if denominator else picked.sum() * 0
    total = picked.sum() * 0
    non_empty = 0
    for i in range(batch):
        if float(lengths[i]) == 0:
            continue
        non_empty += 1
        if aggregation == "seq_mean_token_mean":
            total = total + per_sequence_sum[i] / lengths[i]
        else:
            total = total + per_sequence_sum[i]
    denominator = normalizer if normalizer is not None else non_empty
    return total / denominator if denominator else total


def sequence_mean(values: Tensor, non_empty: Tensor, normalizer: float | None = None) -> Tensor:
    """Sum of per-sequence ``values`` ``[B]`` over the non-empty sequences, divided by their
    number (or by ``normalizer``): GMPO's per-sequence mean."""
    picked = torch.where(non_empty, values, torch.zeros((), dtype=values.dtype))
    count = int(non_empty.sum())
    denominator = normalizer if normalizer is not None else count
    return picked.sum() / denominator if denominator else picked.sum()
