"""Fused token-level policy loss: stats sweep, coefficient and gradient sweep in ONE program.

Grid ``(N,)``, one program per row (rows addressed and cut into 16-byte vectors as in
``token_logprobs.py``). Per row: the statistics (logp, entropy), the token's coefficient
c = dL/dlogp from its advantage, old / ref log-probs and weights (``policy_coefficient.py``),
then dL/dlogits. Rows whose target is ``ignore_index`` (masked) and rows whose coefficients
are both zero write zeros without reading. A target outside ``[0, V)`` gives NaN (the host
checks targets first).

Two kernels, one per row length:

- ``token_policy_loss_onchip_kernel`` (short rows, see ``rlhf_fast.ops.launch``): the whole
  row is loaded once into registers (``[UNROLL * THREADS, VEC]``), the statistics and the
  gradient are computed from there, the exponentials of the statistics reused for the
  gradient: exactly one read and one write of the logits.
- ``token_policy_loss_kernel`` (long rows): a stats sweep, then a gradient sweep that reads the
  row again backwards, starting with the end that the first read has just brought into L2.
  The second read and the writes carry evict-first hints so that they do not push the rows
  of the other programs out of L2. Why backwards: a forward second read would hit L2 for
  every column or for none (each column waits half a row's time between its reads), a
  backward one degrades gracefully when the rows in flight over-commit L2; the L2 model's
  worst case over the plausible capacities and store policies is better backwards
  (benchmarks/NOTES.md).

Inputs per row (float32): adv, old (HAS_OLD; else on-policy, old = logp), ref (KL to the
reference), weight (aggregation weight w), policy_weight (w x rollout weight).
"""

import triton
import triton.language as tl

from .policy_coefficient import token_policy_coefficient
from .row_tiles import tile_offsets
from .softmax_grad import (
    exponential_coefs,
    fill_row,
    grad_from_exponentials,
    sweep_row_grad,
    target_grad,
)
from .softmax_stats import (
    LN2,
    LOG2E,
    finish_row_stats,
    load_row,
    row_stats_in_registers,
    sweep_row_stats,
)


@triton.jit
def row_coefficients(row, logp, entropy, adv_ptr, old_ptr, ref_ptr, weight_ptr,
                     policy_weight_ptr, clip_low, clip_high, dual_c, delta, log_ratio_clamp,
                     kl_coef, kl_clamp, entropy_coef, tau_pos, tau_neg,
                     OBJECTIVE: tl.constexpr, CLIP_GRADIENT: tl.constexpr,
                     HAS_LOW: tl.constexpr, HAS_DUAL: tl.constexpr, HAS_DELTA: tl.constexpr,
                     HAS_CLAMP: tl.constexpr, HAS_OLD: tl.constexpr, KL_MODE: tl.constexpr,
                     KL_FROM_OLD: tl.constexpr, HAS_KL_CLAMP: tl.constexpr,
                     HAS_ENTROPY_COEF: tl.constexpr):
    """(c, c_entropy) = (dL/dlogp, dL/dH) of the token of ``row``."""
    adv = tl.load(adv_ptr + row)
    old = logp
    if HAS_OLD:
        old = tl.load(old_ptr + row)
    ref = 0.0
    if KL_MODE > 0 and not KL_FROM_OLD:
        ref = tl.load(ref_ptr + row)
    weight = tl.load(weight_ptr + row)
    policy_weight = tl.load(policy_weight_ptr + row)
    c = token_policy_coefficient(
        logp, adv, old, ref, weight, policy_weight,
        clip_low, clip_high, dual_c, delta, log_ratio_clamp, kl_coef, kl_clamp,
        tau_pos, tau_neg,
        OBJECTIVE, CLIP_GRADIENT, HAS_LOW, HAS_DUAL, HAS_DELTA, HAS_CLAMP,
        KL_MODE, KL_FROM_OLD, HAS_KL_CLAMP,
    )
    c_entropy = 0.0
    if HAS_ENTROPY_COEF:
        c_entropy = -entropy_coef * weight
    return c, c_entropy


@triton.jit(do_not_specialize=["seq_len"])
def token_policy_loss_kernel(
    logits_ptr, targets_ptr, grad_ptr, logp_ptr, entropy_ptr,
    adv_ptr, old_ptr, ref_ptr, weight_ptr, policy_weight_ptr,
    n_cols, seq_len, stride_b, stride_t, out_stride_b, out_stride_t, inv_temp, ignore_index,
    clip_low, clip_high, dual_c, delta, log_ratio_clamp, kl_coef, kl_clamp, entropy_coef,
    tau_pos, tau_neg,
    OBJECTIVE: tl.constexpr, CLIP_GRADIENT: tl.constexpr,
    HAS_LOW: tl.constexpr, HAS_DUAL: tl.constexpr, HAS_DELTA: tl.constexpr,
    HAS_CLAMP: tl.constexpr, HAS_OLD: tl.constexpr, KL_MODE: tl.constexpr,
    KL_FROM_OLD: tl.constexpr, HAS_KL_CLAMP: tl.constexpr, HAS_ENTROPY_COEF: tl.constexpr,
    SAME_ALIGNMENT: tl.constexpr, THREADS: tl.constexpr, VEC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // seq_len
    t = row - b * seq_len
    row_offset = b * stride_b + t * stride_t
    grad_offset = b * out_stride_b + t * out_stride_t
    target = tl.load(targets_ptr + row)

    # Rows without a gradient (masked, invalid target, zero coefficients) share one fill.
    fill = 0.0
    write_grad = False
    if target == ignore_index:
        tl.store(logp_ptr + row, 0.0)
        tl.store(entropy_ptr + row, 0.0)
    elif (target < 0) | (target >= n_cols):
        tl.store(logp_ptr + row, float("nan"))
        tl.store(entropy_ptr + row, float("nan"))
        fill = float("nan")
    else:
        k = inv_temp * LOG2E
        m, s, r, t_sum, _ = sweep_row_stats(logits_ptr, row_offset, n_cols, k, True, THREADS,
                                            VEC, "", False)
        x_y = tl.load(logits_ptr + row_offset + target).to(tl.float32)
        log2_s, logp, q, entropy = finish_row_stats(m, s, r, t_sum, x_y, k)
        tl.store(logp_ptr + row, logp)
        tl.store(entropy_ptr + row, entropy)
        c, c_entropy = row_coefficients(
            row, logp, entropy, adv_ptr, old_ptr, ref_ptr, weight_ptr, policy_weight_ptr,
            clip_low, clip_high, dual_c, delta, log_ratio_clamp, kl_coef, kl_clamp,
            entropy_coef, tau_pos, tau_neg, OBJECTIVE, CLIP_GRADIENT, HAS_LOW, HAS_DUAL,
            HAS_DELTA, HAS_CLAMP, HAS_OLD, KL_MODE, KL_FROM_OLD, HAS_KL_CLAMP,
            HAS_ENTROPY_COEF)
        if (c != 0.0) | (c_entropy != 0.0):
            write_grad = True
            coef_a = -(c + c_entropy * entropy) * inv_temp
            coef_b = -c_entropy * LN2 * inv_temp
            sweep_row_grad(logits_ptr, grad_ptr, row_offset, grad_offset, n_cols, k, m,
                           log2_s, coef_a, coef_b, HAS_ENTROPY_COEF, True, SAME_ALIGNMENT,
                           THREADS, VEC, True)
            # The loop wrote the target column as any other; its own value goes after it.
            tl.debug_barrier()
            g_y = target_grad(x_y, m, k, log2_s, q, entropy, c, c_entropy, inv_temp)
            tl.store(grad_ptr + grad_offset + target, g_y.to(grad_ptr.dtype.element_ty))
    if not write_grad:
        fill_row(grad_ptr, grad_offset, n_cols, fill, THREADS, VEC)


@triton.jit(do_not_specialize=["seq_len"])
def token_policy_loss_onchip_kernel(
    logits_ptr, targets_ptr, grad_ptr, logp_ptr, entropy_ptr,
    adv_ptr, old_ptr, ref_ptr, weight_ptr, policy_weight_ptr,
    n_cols, seq_len, stride_b, stride_t, out_stride_b, out_stride_t, inv_temp, ignore_index,
    clip_low, clip_high, dual_c, delta, log_ratio_clamp, kl_coef, kl_clamp, entropy_coef,
    tau_pos, tau_neg,
    OBJECTIVE: tl.constexpr, CLIP_GRADIENT: tl.constexpr,
    HAS_LOW: tl.constexpr, HAS_DUAL: tl.constexpr, HAS_DELTA: tl.constexpr,
    HAS_CLAMP: tl.constexpr, HAS_OLD: tl.constexpr, KL_MODE: tl.constexpr,
    KL_FROM_OLD: tl.constexpr, HAS_KL_CLAMP: tl.constexpr, HAS_ENTROPY_COEF: tl.constexpr,
    SAME_ALIGNMENT: tl.constexpr, UNROLL: tl.constexpr, THREADS: tl.constexpr,
    VEC: tl.constexpr,
):
    """The whole row in registers (``[UNROLL * THREADS, VEC]``): needs
    ``UNROLL * THREADS * VEC >= n_cols``."""
    row = tl.program_id(0).to(tl.int64)
    b = row // seq_len
    t = row - b * seq_len
    row_offset = b * stride_b + t * stride_t
    grad_offset = b * out_stride_b + t * out_stride_t
    target = tl.load(targets_ptr + row)

    if target == ignore_index:
        tl.store(logp_ptr + row, 0.0)
        tl.store(entropy_ptr + row, 0.0)
        fill_row(grad_ptr, grad_offset, n_cols, 0.0, THREADS, VEC)
    elif (target < 0) | (target >= n_cols):
        tl.store(logp_ptr + row, float("nan"))
        tl.store(entropy_ptr + row, float("nan"))
        fill_row(grad_ptr, grad_offset, n_cols, float("nan"), THREADS, VEC)
    else:
        k = inv_temp * LOG2E
        x, x_edge, head, in_row, edge, edge_valid = load_row(
            logits_ptr, row_offset, n_cols, UNROLL, THREADS, VEC)
        x_y = tl.load(logits_ptr + row_offset + target).to(tl.float32)
        m, s, r, t_sum, _, d, e, d_edge, e_edge = row_stats_in_registers(x, x_edge, k, True,
                                                                          False)
        log2_s, logp, q, entropy = finish_row_stats(m, s, r, t_sum, x_y, k)
        tl.store(logp_ptr + row, logp)
        tl.store(entropy_ptr + row, entropy)
        c, c_entropy = row_coefficients(
            row, logp, entropy, adv_ptr, old_ptr, ref_ptr, weight_ptr, policy_weight_ptr,
            clip_low, clip_high, dual_c, delta, log_ratio_clamp, kl_coef, kl_clamp,
            entropy_coef, tau_pos, tau_neg, OBJECTIVE, CLIP_GRADIENT, HAS_LOW, HAS_DUAL,
            HAS_DELTA, HAS_CLAMP, HAS_OLD, KL_MODE, KL_FROM_OLD, HAS_KL_CLAMP,
            HAS_ENTROPY_COEF)
        m_ref = tl.where(m == float("-inf"), 0.0, m)
        coef_a, coef_b = exponential_coefs(c, c_entropy, s, t_sum, inv_temp)
        # Zero coefficients (a clipped token) give zeros through the same stores.
        zero = (c == 0.0) & (c_entropy == 0.0)
        coef_a = tl.where(zero, 0.0, coef_a)
        coef_b = tl.where(zero, 0.0, coef_b)
        out_ty = grad_ptr.dtype.element_ty
        offsets = tile_offsets(UNROLL * THREADS, VEC)
        if SAME_ALIGNMENT:
            out = grad_ptr + tl.multiple_of(grad_offset + head, VEC) + offsets
        else:
            out = grad_ptr + (grad_offset + head) + offsets
        g = grad_from_exponentials(d, e, coef_a, coef_b, HAS_ENTROPY_COEF)
        tl.store(out, g.to(out_ty), mask=in_row, cache_modifier=".cs")
        g_edge = grad_from_exponentials(d_edge, e_edge, coef_a, coef_b, HAS_ENTROPY_COEF)
        tl.store(grad_ptr + grad_offset + edge, g_edge.to(out_ty), mask=edge_valid)
        tl.debug_barrier()
        g_y = target_grad(x_y, m_ref, k, log2_s, q, entropy, c, c_entropy, inv_temp)
        tl.store(grad_ptr + grad_offset + target, g_y.to(out_ty))
