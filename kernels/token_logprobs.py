"""Kernels of ``token_logprobs``: log-prob of the target and entropy per row, and their gradient.

Row ``n`` of the flattened ``[N, V]`` problem lives at ``logits + b * stride_b + t * stride_t``
with ``b = n // seq_len``, ``t = n % seq_len``: a ``[B, T, V]`` slice of a longer sequence
(``logits[:, :-1]``) is read in place, without a copy. Row offsets are 64-bit. The column
stride must be 1. ``seq_len`` is not specialised, so a new sequence length never recompiles.

Forward (grid ``(N,)``): one read of each row. Writes logp ``[N]``, entropy ``[N]`` (when
WITH_ENTROPY) and the per-row statistics ``stats[N, 3] = (m, log_s, 1 - p_y)`` that the
backward needs. Rows whose target equals ``ignore_index`` are not read and get zeros; a
target outside ``[0, V)`` gives NaN (the host checks targets before launching, this is the
defined result when that check is disabled).

Backward (grid ``(N, cdiv(V, BLOCK_V))``): one read of the logits and one write of the
gradient per block; ignored rows and rows whose coefficients are both zero are not read and
get zeros. The gradient has its own batch / row strides, so it can be written over the
logits themselves (each block is read before it is overwritten, by the same program).
"""

import triton
import triton.language as tl

from .softmax_grad import softmax_grad_block
from .softmax_stats import row_softmax_stats


@triton.jit(do_not_specialize=["seq_len"])
def token_logprobs_fwd_kernel(
    logits_ptr, targets_ptr, logp_ptr, entropy_ptr, stats_ptr,
    n_cols, seq_len, stride_b, stride_t, inv_temp, ignore_index,
    BLOCK_V: tl.constexpr, WITH_ENTROPY: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // seq_len
    row_ptr = logits_ptr + b * stride_b + (row - b * seq_len) * stride_t
    target = tl.load(targets_ptr + row)

    m = 0.0
    log_s = 0.0
    logp = 0.0
    q = 0.0
    entropy = 0.0
    if target != ignore_index:
        if (target >= 0) & (target < n_cols):
            # In range: an int32 target keeps the column comparisons 32-bit.
            m, log_s, logp, q, entropy = row_softmax_stats(
                row_ptr, n_cols, target.to(tl.int32), inv_temp, BLOCK_V
            )
        else:
            m = float("nan")
            log_s = float("nan")
            logp = float("nan")
            q = float("nan")
            entropy = float("nan")

    tl.store(logp_ptr + row, logp)
    if WITH_ENTROPY:
        tl.store(entropy_ptr + row, entropy)
    tl.store(stats_ptr + row * 3, m)
    tl.store(stats_ptr + row * 3 + 1, log_s)
    tl.store(stats_ptr + row * 3 + 2, q)


@triton.jit(do_not_specialize=["seq_len"])
def token_logprobs_bwd_kernel(
    grad_logits_ptr, logits_ptr, targets_ptr, stats_ptr, entropy_ptr,
    grad_logp_ptr, grad_entropy_ptr,
    n_cols, seq_len, stride_b, stride_t, out_stride_b, out_stride_t, inv_temp, ignore_index,
    BLOCK_V: tl.constexpr, HAS_GRAD_LOGP: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    in_row = cols < n_cols
    b = row // seq_len
    t = row - b * seq_len
    out_ptrs = grad_logits_ptr + b * out_stride_b + t * out_stride_t + cols
    target = tl.load(targets_ptr + row)

    c_logp = 0.0
    if HAS_GRAD_LOGP:
        c_logp = tl.load(grad_logp_ptr + row)
    c_entropy = 0.0
    entropy = 0.0
    if HAS_GRAD_ENTROPY:
        c_entropy = tl.load(grad_entropy_ptr + row)
        entropy = tl.load(entropy_ptr + row)

    # NaN coefficients compare unequal to 0 and so take the full path: NaN propagates.
    if (target != ignore_index) & ((c_logp != 0.0) | (c_entropy != 0.0)):
        row_ptr = logits_ptr + b * stride_b + t * stride_t
        z = tl.load(row_ptr + cols, mask=in_row, other=float("-inf")).to(tl.float32) * inv_temp
        m = tl.load(stats_ptr + row * 3)
        log_s = tl.load(stats_ptr + row * 3 + 1)
        q = tl.load(stats_ptr + row * 3 + 2)
        # An out-of-range target has NaN stats, so its (wrapped) int32 column is harmless.
        g = softmax_grad_block(
            z, cols, target.to(tl.int32), m, log_s, q, entropy, c_logp, c_entropy, inv_temp,
            HAS_GRAD_ENTROPY,
        )
        tl.store(out_ptrs, g.to(grad_logits_ptr.dtype.element_ty), mask=in_row)
    else:
        tl.store(out_ptrs, tl.zeros([BLOCK_V], grad_logits_ptr.dtype.element_ty), mask=in_row)
