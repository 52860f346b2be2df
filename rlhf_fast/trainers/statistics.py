"""The one place where statistics span the batch: loss normalisers, group statistics,
whitening inputs and logged means (``all_reduce_max`` serves the logged extremes).

Every count or sum that the update divides by (token count, sequence count, ``B *
max_length``), every advantage statistic (group means, batch whitening) and every logged mean
is computed through a ``BatchStatistics``. On one process it is the identity. A distributed
trainer (torchrun, DDP / FSDP2) subclasses it and overrides the three collectives:

- ``all_reduce_sum(x)``: the sum of ``x`` over ranks (``dist.all_reduce``);
- ``gather(x)``: the rows of every rank concatenated along dim 0, in rank order (per-sequence
  tensors; per-token ``[B, T]`` tensors are padded to a common ``T`` first);
- ``local(x)``: this rank's rows of a gathered tensor.

With those, each rank's micro-batch losses use the global ``normalizer`` and the summed
gradients equal the one-big-batch gradient (DDP then averages over ranks, so a distributed
subclass also multiplies the normaliser by the world size's inverse: ``world_scale``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import PolicyLossConfig


class BatchStatistics:
    """Single-process statistics: every collective is the identity."""

    world_scale: float = 1.0
    """Multiplies the loss normaliser. DDP averages gradients over ranks, so a distributed
    subclass sets it to 1 / world_size to recover the global sum's gradient."""

    def all_reduce_sum(self, x: Tensor) -> Tensor:
        """Sum of ``x`` over ranks."""
        return x

    def all_reduce_max(self, x: Tensor) -> Tensor:
        """Maximum of ``x`` over ranks."""
        return x

    def gather(self, x: Tensor) -> Tensor:
        """Rows of every rank, concatenated along dim 0."""
        return x

    def local(self, x: Tensor) -> Tensor:
        """This rank's rows of a ``gather``-ed tensor."""
        return x

    # --- built on the three collectives ------------------------------------------------

    def normalizer(self, loss_mask: Tensor, config: PolicyLossConfig) -> float:
        """The aggregation's denominator over the whole mini-batch (all micro-batches, all
        ranks): tokens for ``token_mean``; non-empty sequences for ``seq_mean_*`` (and GMPO);
        ``B * max_length`` for ``seq_mean_token_sum_norm``. loss_mask ``[B, T]`` bool."""
        if config.aggregation.mode == "token_mean":
            count = self.all_reduce_sum(loss_mask.sum().double())
        elif config.aggregation.mode == "seq_mean_token_sum_norm":
            length = config.aggregation.max_length or loss_mask.shape[1]
            count = self.all_reduce_sum(torch.tensor(float(loss_mask.shape[0] * length),
                                                     dtype=torch.float64))
        else:
            count = self.all_reduce_sum((loss_mask.sum(-1) > 0).sum().double())
        return max(float(count), 1.0) * self.world_scale

    def count_normalizer(self, count: int | float | Tensor) -> float:
        """The denominator of a mean over items counted on every rank (pairs, prompts),
        times ``world_scale``: for a loss that is a plain mean over this rank's ``n`` items
        (``dpo_loss``), ``loss_scale = n / count_normalizer(local count)`` makes the summed
        gradients over micro-batches and ranks the global mean's."""
        total = self.all_reduce_sum(torch.as_tensor(count, dtype=torch.float64).reshape(()))
        return max(float(total), 1.0) * self.world_scale

    def mean(self, values: Tensor, weights: Tensor | None = None) -> float:
        """Weighted mean of ``values`` over the global batch (plain mean without weights)."""
        values = values.detach().double()
        weights = torch.ones_like(values) if weights is None else weights.detach().double()
        total = self.all_reduce_sum(torch.stack([(values * weights).sum(), weights.sum()]))
        return float(total[0] / total[1]) if float(total[1]) > 0 else 0.0
