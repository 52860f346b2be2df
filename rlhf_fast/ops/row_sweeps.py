"""The two row sweeps every op is built from, on either backend (docs/architecture.md, One
coefficient per token).

- ``stats_sweep``: one read of each row -> logp, entropy and the per-row statistics;
- ``grad_sweep``: one read and one write of each row -> dL/dlogits from the per-token
  coefficients ``c = dL/dlogp`` and ``c_H = dL/dH``, optionally over the logits themselves.

Triton launchers here (device code in ``kernels/token_logprobs.py``, launch shapes in
``launch.py``); the torch backend in ``rlhf_fast/torch_backend/token_logprobs.py``.
``backend`` is resolved per call. A ``backend`` string carrying a vocabulary shard
(``vocab_parallel.shard_backend``) runs the same sweeps over this rank's slice of the
vocabulary and combines the row statistics across the group (``vocab_parallel.py``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..backend import resolve_backend
from ..torch_backend import token_logprobs as torch_impl
from ..validation import check_target_range
from .launch import grad_launch, row_launch, same_alignment
from .vocab_parallel import sharded_grad_targets, sharded_stats_sweep, split_backend


def _unit_column_stride(logits: Tensor) -> Tensor:
    # The kernels need unit column stride; any row / batch strides are read in place.
    return logits if logits.stride(-1) == 1 else logits.contiguous()


def check_targets(targets: Tensor, n_cols: int, ignore_index: int, backend: str) -> None:
    """Every target in ``[0, n_cols)`` or ``ignore_index`` (``check_target_range``); with a
    vocabulary shard the check happens after the statistics are combined (a target is in
    range when exactly one rank's slice holds it)."""
    if split_backend(backend)[1] is None:
        check_target_range(targets, n_cols, ignore_index)


def stats_sweep(logits: Tensor, targets: Tensor, temperature: float, ignore_index: int,
                with_entropy: bool, backend: str, log_sum_sq: Optional[Tensor] = None
                ) -> tuple[Tensor, Tensor, Tensor]:
    """logits ``[B, T, V]``, targets ``[B, T]`` -> (logp ``[B, T]``, entropy ``[B, T]`` or
    ``[0]``, stats ``[B, T, 3]``), all float32. ``stats`` are what ``grad_sweep`` of the same
    backend needs, in that backend's units (Triton: the raw logits' max, the log-sum-exp
    below it and 1 - p_y).

    ``log_sum_sq`` (float32 ``[B, T]``, optional) receives ``ln sum_v p_v^2`` of each row in
    the same read (WPO's weights; 0 at ignored rows, NaN at a target out of range); the
    Triton sweep then runs its ``WITH_SUM_SQ`` variant. On a vocabulary shard the slices'
    sums are combined (``vocab_parallel.sharded_stats_sweep``)."""
    backend, shard = split_backend(backend)
    if shard is not None:
        return sharded_stats_sweep(_local_stats_sweep, logits, targets, temperature,
                                   ignore_index, with_entropy, backend, shard, log_sum_sq)
    return _local_stats_sweep(logits, targets, temperature, ignore_index, with_entropy,
                              backend, log_sum_sq)


def _local_stats_sweep(logits: Tensor, targets: Tensor, temperature: float, ignore_index: int,
                       with_entropy: bool, backend: str, log_sum_sq: Optional[Tensor] = None
                       ) -> tuple[Tensor, Tensor, Tensor]:
    if resolve_backend(backend, logits) == "torch":
        return torch_impl.token_logprobs_forward(logits, targets, temperature, ignore_index,
                                                 with_entropy, log_sum_sq=log_sum_sq)
    from ..kernels.token_logprobs import token_logprobs_fwd_kernel

    logits = _unit_column_stride(logits)
    targets = targets.contiguous()
    batch, seq_len, n_cols = logits.shape
    logp = logits.new_empty((batch, seq_len), dtype=torch.float32)
    entropy = logits.new_empty((batch, seq_len) if with_entropy else (0,), dtype=torch.float32)
    stats = logits.new_empty((batch, seq_len, 3), dtype=torch.float32)
    n_rows = batch * seq_len
    if n_rows == 0:
        return logp, entropy, stats
    launch = row_launch(n_cols, logits.dtype)
    with_sum_sq = log_sum_sq is not None
    token_logprobs_fwd_kernel[(n_rows,)](
        logits, targets, logp, entropy if with_entropy else logp, stats,
        n_cols, seq_len, logits.stride(0), logits.stride(1), 1.0 / temperature, ignore_index,
        log_sum_sq if with_sum_sq else logp,
        WITH_ENTROPY=with_entropy, ON_CHIP=launch.on_chip, UNROLL=launch.unroll,
        THREADS=launch.threads, VEC=launch.vec, WITH_SUM_SQ=with_sum_sq,
        num_warps=launch.num_warps,
    )
    return logp, entropy, stats


def grad_sweep(c_logp: Optional[Tensor], c_entropy: Optional[Tensor], logits: Tensor,
               targets: Tensor, entropy: Tensor, stats: Tensor, temperature: float,
               ignore_index: int, backend: str, out: Optional[Tensor] = None) -> Tensor:
    """dL/dlogits ``[B, T, V]`` in the logits' dtype:

        dL/dlogits = (c * (onehot(y) - p) - c_H * p * (log p + H)) / temperature

    ``c_logp`` / ``c_entropy`` are float32 ``[B, T]`` or None (a zero coefficient); ``out``
    (same shape and dtype as logits, unit column stride) receives the gradient, and may be
    ``logits`` itself.
    """
    if out is None:
        out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    backend, shard = split_backend(backend)
    if shard is not None:  # this rank's slice: stats from the sharded stats sweep
        targets, ignore_index = sharded_grad_targets(targets, shard, logits.shape[-1],
                                                     ignore_index)
    if resolve_backend(backend, logits) == "torch":
        return torch_impl.token_logprobs_backward(c_logp, c_entropy, logits, targets, entropy,
                                                  stats, temperature, ignore_index, out=out)
    from ..kernels.token_logprobs import token_logprobs_bwd_kernel

    logits = _unit_column_stride(logits)
    assert out.stride(-1) == 1, "grad_sweep writes rows of unit column stride"
    batch, seq_len, n_cols = logits.shape
    n_rows = batch * seq_len
    if n_rows == 0:
        return out
    c_logp = c_logp.contiguous() if c_logp is not None else None
    c_entropy = c_entropy.contiguous() if c_entropy is not None else None
    launch = grad_launch(n_cols, logits.dtype)
    token_logprobs_bwd_kernel[(n_rows,)](
        out, logits, targets.contiguous(), stats, entropy,
        c_logp if c_logp is not None else stats,
        c_entropy if c_entropy is not None else stats,
        n_cols, seq_len, logits.stride(0), logits.stride(1), out.stride(0), out.stride(1),
        1.0 / temperature, ignore_index,
        HAS_GRAD_LOGP=c_logp is not None, HAS_GRAD_ENTROPY=c_entropy is not None,
        SAME_ALIGNMENT=same_alignment(logits, out, launch.vec), num_warps=launch.num_warps,
        **launch.constexprs,
    )
    return out
