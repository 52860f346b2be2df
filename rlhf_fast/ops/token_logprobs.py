"""``token_logprobs``: log-prob of each target and the entropy of each row, fused.

Layers, in reading order: the two row sweeps (``row_sweeps.py``, device code in
``kernels/token_logprobs.py``) -> custom ops ``rlhf_fast::token_logprobs`` and
``rlhf_fast::token_logprobs_backward`` with their autograd formula (so
``torch.compile(fullgraph=True)`` sees one opaque node) -> the public function.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from ..backend import BACKENDS
from ..validation import (
    check_logits,
    check_temperature,
    check_token_tensor,
)
from .packing import check_cu_seqlens, check_cu_seqlens_values
from .row_sweeps import check_targets, grad_sweep, stats_sweep
from .vocab_parallel import shard_backend

__all__ = ["token_logprobs"]


# --- custom ops and autograd ----------------------------------------------------------------

@torch.library.custom_op("rlhf_fast::token_logprobs", mutates_args=())
def token_logprobs_op(logits: Tensor, targets: Tensor, temperature: float, ignore_index: int,
                      with_entropy: bool, backend: str, cu_seqlens: Optional[Tensor] = None
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """logits ``[B, T, V]``, targets ``[B, T]`` -> (logp ``[B, T]``, entropy ``[B, T]`` or
    ``[0]``, stats ``[B, T, 3]``), all float32. ``cu_seqlens`` (packed ``[1, N, V]``) is
    checked only: every output is per token."""
    check_targets(targets, logits.shape[-1], ignore_index, backend)
    if cu_seqlens is not None:
        check_cu_seqlens_values(cu_seqlens, logits.shape[1])
    return stats_sweep(logits, targets, temperature, ignore_index, with_entropy, backend)


@token_logprobs_op.register_fake
def _token_logprobs_fake(logits, targets, temperature, ignore_index, with_entropy, backend,
                         cu_seqlens=None):
    batch, seq_len, _ = logits.shape
    logp = logits.new_empty((batch, seq_len), dtype=torch.float32)
    entropy = logits.new_empty((batch, seq_len) if with_entropy else (0,), dtype=torch.float32)
    return logp, entropy, logits.new_empty((batch, seq_len, 3), dtype=torch.float32)


@torch.library.custom_op("rlhf_fast::token_logprobs_backward", mutates_args=())
def token_logprobs_backward_op(grad_logp: Optional[Tensor], grad_entropy: Optional[Tensor],
                               logits: Tensor, targets: Tensor, entropy: Tensor, stats: Tensor,
                               temperature: float, ignore_index: int, backend: str) -> Tensor:
    """dL/dlogits ``[B, T, V]`` (logits' dtype) from upstream gradients of logp and entropy."""
    return grad_sweep(grad_logp, grad_entropy, logits, targets, entropy, stats, temperature,
                      ignore_index, backend)


@token_logprobs_backward_op.register_fake
def _token_logprobs_backward_fake(grad_logp, grad_entropy, logits, targets, entropy, stats,
                                  temperature, ignore_index, backend):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _setup_context(ctx, inputs, output) -> None:
    logits, targets, temperature, ignore_index, with_entropy, backend, _ = inputs
    _, entropy, stats = output
    ctx.save_for_backward(logits, targets, entropy, stats)
    ctx.hparams = (temperature, ignore_index, with_entropy, backend)
    ctx.mark_non_differentiable(stats)
    # Unused outputs get None, not zeros: the entropy term is then compiled out.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_logp, grad_entropy, _grad_stats):
    temperature, ignore_index, with_entropy, backend = ctx.hparams
    if not with_entropy:
        grad_entropy = None
    if grad_logp is None and grad_entropy is None:
        return (None,) * 7
    logits, targets, entropy, stats = ctx.saved_tensors
    grad = token_logprobs_backward_op(grad_logp, grad_entropy, logits, targets, entropy, stats,
                                      temperature, ignore_index, backend)
    return grad, None, None, None, None, None, None


token_logprobs_op.register_autograd(_backward, setup_context=_setup_context)


# --- public function ------------------------------------------------------------------------

def token_logprobs(
    logits: Tensor,
    targets: Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
    backend: str = "auto",
    cu_seqlens: Tensor | None = None,
    process_group: ProcessGroup | None = None,
    vocab_offset: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Log-prob of each target token and, optionally, the entropy of each row, in one read.

    Args:
        logits: ``[B, T, V]`` or ``[N, V]``, float32 / bfloat16 / float16. Any batch and row
            strides (``logits[:, :-1]`` is read in place); the last dim should be contiguous
            (otherwise it is copied).
        targets: ``[B, T]`` or ``[N]``, int64 or int32: the token scored at each position
            (already shifted: ``logits[:, t]`` scores ``targets[:, t]``).
        temperature: logits are divided by it before the softmax.
        return_entropy: also return the entropy of each row.
        ignore_index: rows with this target give 0 (and zero gradient) and are not read.
        backend: ``"auto"`` | ``"triton"`` | ``"torch"`` (see ``rlhf_fast.backend``).
        cu_seqlens: ``[S + 1]`` int32 offsets of packed sequences (``rlhf_fast.ops.packing``)
            with ``[N, V]`` logits: accepted for a uniform API and checked, and changes
            nothing, since every output is per token (the caller shifts targets within each
            sequence and masks each sequence's last position with ``ignore_index``).
        process_group: the tensor-parallel group when ``logits`` hold only this rank's
            contiguous slice of the vocabulary columns (slices may be uneven; targets stay
            full-vocabulary ids): the results are the full-vocabulary ones on every rank and
            the gradient is this rank's slice, the row statistics combined by two
            all-reduces of 20-24 bytes a row (``rlhf_fast.ops.vocab_parallel``).
        vocab_offset: the full-vocabulary id of this rank's first column; None: from the
            slice widths, all-gathered once per group and width.

    Returns:
        ``logp`` float32 ``[B, T]`` (or ``[N]``), and ``entropy`` of the same shape when
        ``return_entropy``. With ``z = logits / temperature`` and ``p = softmax(z)``:

            logp = log p[target],    entropy = -sum_v p_v log p_v

        Both are differentiable w.r.t. ``logits``:

            dL/dlogits = (g_logp * (onehot(target) - p) - g_H * p * (log p + H)) / temperature

        Statistics and gradients are accumulated in float32 whatever the input dtype; the
        gradient is returned in the logits' dtype. Under ``torch.no_grad()`` the logits are
        read exactly once and nothing is saved.

    A target outside ``[0, V)`` (other than ``ignore_index``) is an error, checked on the
    device without a host sync (``rlhf_fast.validation.device_check``: ``ValueError`` at once
    on CPU tensors, a device-side assertion on CUDA); ``RLHF_FAST_CHECK_TARGETS=0`` skips the
    check and gives NaN for such rows.
    NaN or +inf logits in a row make that row's outputs NaN; -inf logits are banned tokens.
    """
    check_logits(logits)
    check_token_tensor(targets, "targets", logits, integer=True)
    temperature = check_temperature(temperature)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, logits)
        if logits.dim() != 2:
            raise ValueError(f"with cu_seqlens, logits must be packed rows [N, V], got shape "
                             f"{tuple(logits.shape)}")
    backend = shard_backend(backend, process_group, vocab_offset, logits.shape[-1],
                            logits.device)
    flat = logits.dim() == 2
    if flat:
        logits, targets = logits.unsqueeze(0), targets.unsqueeze(0)
    logp, entropy, _ = token_logprobs_op(logits, targets, temperature, int(ignore_index),
                                         bool(return_entropy), backend, cu_seqlens)
    if flat:
        logp = logp.squeeze(0)
        entropy = entropy.squeeze(0) if return_entropy else entropy
    return (logp, entropy) if return_entropy else logp
