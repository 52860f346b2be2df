"""Kernels of ``token_logprobs``: log-prob of the target and entropy per row, and their gradient.

Row ``n`` of the flattened ``[N, V]`` problem lives at ``logits + b * stride_b + t * stride_t``
with ``b = n // seq_len``, ``t = n % seq_len``: a ``[B, T, V]`` slice of a longer sequence
(``logits[:, :-1]``) is read in place, without a copy. Row offsets are 64-bit, everything
inside a row 32-bit. The column stride must be 1. ``seq_len`` is not specialised, so a new
sequence length never recompiles. One program (``THREADS = 32 * num_warps`` threads) per row,
grid ``(N,)``; each row is cut into 16-byte vectors as ``row_tiles.py`` describes.

Forward: one read of each row. Writes logp ``[N]``, entropy ``[N]`` (when WITH_ENTROPY) and
the per-row statistics ``stats[N, 3] = (M, log_s, 1 - p_y)`` that the backward needs (M: max
of the raw logits, log_s: log of sum exp((x - M) / temperature)). Rows whose target equals
``ignore_index`` are not read and get zeros; a target outside ``[0, V)`` gives NaN (the host
checks targets before launching, this is the defined result when that check is disabled).

Backward: one read of the logits and one write of the gradient per row; ignored rows and
rows whose coefficients are both zero are not read and get zeros. The gradient has its own
batch / row strides, so it can be written over the logits themselves (each tile is read
before it is overwritten, by the same threads; the target's logit is read first).
"""

import triton
import triton.language as tl

from .softmax_grad import fill_row, sweep_row_grad, target_grad
from .softmax_stats import (
    LN2,
    LOG2E,
    finish_row_stats,
    load_row,
    row_stats_in_registers,
    sweep_row_stats,
)


@triton.jit(do_not_specialize=["seq_len"])
def token_logprobs_fwd_kernel(
    logits_ptr, targets_ptr, logp_ptr, entropy_ptr, stats_ptr,
    n_cols, seq_len, stride_b, stride_t, inv_temp, ignore_index, sum_sq_ptr,
    WITH_ENTROPY: tl.constexpr, ON_CHIP: tl.constexpr, UNROLL: tl.constexpr,
    THREADS: tl.constexpr, VEC: tl.constexpr, WITH_SUM_SQ: tl.constexpr,
):
    """ON_CHIP: the row is loaded whole (``UNROLL * THREADS * VEC >= n_cols``) and its
    statistics computed in registers, exactly as the fused policy kernel does for the same
    launch (bit-identical results); else the row is swept two tiles per trip (UNROLL is then
    unused). WITH_SUM_SQ: also writes ``ln sum_v p_v^2`` of each row to ``sum_sq_ptr`` (WPO's
    weights; 0 for an ignored row, NaN for a target out of range); without it the pointer is
    not touched and the kernel is the same as before the flag existed (the pointer comes last
    so that the other parameters keep their offsets)."""
    row = tl.program_id(0).to(tl.int64)
    b = row // seq_len
    row_offset = b * stride_b + (row - b * seq_len) * stride_t
    target = tl.load(targets_ptr + row)

    m = 0.0
    log_s = 0.0
    logp = 0.0
    q = 0.0
    entropy = 0.0
    log_sum_sq = 0.0
    if target != ignore_index:
        if (target >= 0) & (target < n_cols):
            k = inv_temp * LOG2E
            if ON_CHIP:
                x, x_edge, _, _, _, _ = load_row(logits_ptr, row_offset, n_cols, UNROLL,
                                                 THREADS, VEC)
                m, s, r, t, q2, _, _, _, _ = row_stats_in_registers(x, x_edge, k, WITH_ENTROPY,
                                                                    WITH_SUM_SQ)
            else:
                m, s, r, t, q2 = sweep_row_stats(logits_ptr, row_offset, n_cols, k,
                                                 WITH_ENTROPY, THREADS, VEC, "", WITH_SUM_SQ)
            x_y = tl.load(logits_ptr + row_offset + target).to(tl.float32)
            log2_s, logp, q, entropy = finish_row_stats(m, s, r, t, x_y, k)
            log_s = log2_s * LN2
            if WITH_SUM_SQ:
                # sum p^2 = q2 / s^2; q2 >= 1 (the maximum's term) unless the row is NaN.
                log_sum_sq = tl.log(q2) - 2.0 * log_s
        else:
            m = float("nan")
            log_s = float("nan")
            logp = float("nan")
            q = float("nan")
            entropy = float("nan")
            log_sum_sq = float("nan")

    tl.store(logp_ptr + row, logp)
    if WITH_SUM_SQ:
        tl.store(sum_sq_ptr + row, log_sum_sq)
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
    HAS_GRAD_LOGP: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr,
    SAME_ALIGNMENT: tl.constexpr, THREADS: tl.constexpr, VEC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // seq_len
    t = row - b * seq_len
    row_offset = b * stride_b + t * stride_t
    grad_offset = b * out_stride_b + t * out_stride_t
    target = tl.load(targets_ptr + row)

    c = 0.0
    if HAS_GRAD_LOGP:
        c = tl.load(grad_logp_ptr + row)
    c_entropy = 0.0
    entropy = 0.0
    if HAS_GRAD_ENTROPY:
        c_entropy = tl.load(grad_entropy_ptr + row)
        entropy = tl.load(entropy_ptr + row)

    # NaN coefficients compare unequal to 0 and so take the full path: NaN propagates.
    if (target == ignore_index) | ((c == 0.0) & (c_entropy == 0.0)):
        fill_row(grad_logits_ptr, grad_offset, n_cols, 0.0, THREADS, VEC)
    elif (target < 0) | (target >= n_cols):
        fill_row(grad_logits_ptr, grad_offset, n_cols, float("nan"), THREADS, VEC)
    else:
        m = tl.load(stats_ptr + row * 3)
        log2_s = tl.load(stats_ptr + row * 3 + 1) * LOG2E
        q = tl.load(stats_ptr + row * 3 + 2)
        k = inv_temp * LOG2E
        # Read before the sweep: the gradient may overwrite the logits.
        x_y = tl.load(logits_ptr + row_offset + target).to(tl.float32)
        coef_a = -(c + c_entropy * entropy) * inv_temp
        coef_b = -c_entropy * LN2 * inv_temp
        sweep_row_grad(logits_ptr, grad_logits_ptr, row_offset, grad_offset, n_cols, k, m,
                       log2_s, coef_a, coef_b, HAS_GRAD_ENTROPY, False, SAME_ALIGNMENT,
                       THREADS, VEC, True)
        # The loop wrote the target column as any other; its own value goes after it.
        tl.debug_barrier()
        g_y = target_grad(x_y, m, k, log2_s, q, entropy, c, c_entropy, inv_temp)
        tl.store(grad_logits_ptr + grad_offset + target,
                 g_y.to(grad_logits_ptr.dtype.element_ty))
