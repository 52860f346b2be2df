"""Fused token-level policy loss: stats sweep, coefficient and gradient sweep in ONE kernel.

Grid ``(N,)``, one program per row (rows addressed as in ``token_logprobs.py``). Per row:
one read for the statistics (logp, entropy), the token's coefficient c = dL/dlogp from its
advantage, old / ref log-probs and weights (``policy_coefficient.py``), then the gradient
sweep writes dL/dlogits. The second read of the row follows the first at once, while the
row is still in L2. Rows whose target is ``ignore_index`` (masked) and rows whose
coefficients are both zero write zeros without reading. A target outside ``[0, V)`` gives
NaN (the host checks targets first).

Inputs per row (float32): adv, old (HAS_OLD; else on-policy, old = logp), ref (KL to the
reference), weight (aggregation weight w), policy_weight (w x rollout weight).
"""

import triton
import triton.language as tl

from .policy_coefficient import token_policy_coefficient
from .softmax_grad import softmax_grad_block
from .softmax_stats import row_softmax_stats


@triton.jit
def fill_row(out_row_ptr, n_cols, value, BLOCK_V: tl.constexpr):
    cols = tl.arange(0, BLOCK_V)
    block = tl.full([BLOCK_V], value, out_row_ptr.dtype.element_ty)
    for start in range(0, n_cols, BLOCK_V):
        tl.store(out_row_ptr + start + cols, block, mask=start + cols < n_cols)


@triton.jit(do_not_specialize=["seq_len"])
def token_policy_loss_kernel(
    logits_ptr, targets_ptr, grad_ptr, logp_ptr, entropy_ptr,
    adv_ptr, old_ptr, ref_ptr, weight_ptr, policy_weight_ptr,
    n_cols, seq_len, stride_b, stride_t, out_stride_b, out_stride_t, inv_temp, ignore_index,
    clip_low, clip_high, dual_c, delta, log_ratio_clamp, kl_coef, kl_clamp, entropy_coef,
    tau_pos, tau_neg,
    BLOCK_V: tl.constexpr, OBJECTIVE: tl.constexpr, CLIP_GRADIENT: tl.constexpr,
    HAS_LOW: tl.constexpr, HAS_DUAL: tl.constexpr, HAS_DELTA: tl.constexpr,
    HAS_CLAMP: tl.constexpr, HAS_OLD: tl.constexpr, KL_MODE: tl.constexpr,
    KL_FROM_OLD: tl.constexpr, HAS_KL_CLAMP: tl.constexpr, HAS_ENTROPY_COEF: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // seq_len
    t = row - b * seq_len
    row_ptr = logits_ptr + b * stride_b + t * stride_t
    out_row_ptr = grad_ptr + b * out_stride_b + t * out_stride_t
    target = tl.load(targets_ptr + row)

    if target == ignore_index:
        tl.store(logp_ptr + row, 0.0)
        tl.store(entropy_ptr + row, 0.0)
        fill_row(out_row_ptr, n_cols, 0.0, BLOCK_V)
    elif (target < 0) | (target >= n_cols):
        tl.store(logp_ptr + row, float("nan"))
        tl.store(entropy_ptr + row, float("nan"))
        fill_row(out_row_ptr, n_cols, float("nan"), BLOCK_V)
    else:
        # In range now: compare columns against an int32 target (an int64 one would widen
        # every column index of the block to 64 bits).
        column = target.to(tl.int32)
        m, log_s, logp, q, entropy = row_softmax_stats(row_ptr, n_cols, column, inv_temp,
                                                       BLOCK_V)
        tl.store(logp_ptr + row, logp)
        tl.store(entropy_ptr + row, entropy)

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

        if (c != 0.0) | (c_entropy != 0.0):
            cols = tl.arange(0, BLOCK_V)
            for start in range(0, n_cols, BLOCK_V):
                block = start + cols
                in_row = block < n_cols
                z = tl.load(row_ptr + block, mask=in_row, other=float("-inf"))
                z = z.to(tl.float32) * inv_temp
                g = softmax_grad_block(z, block, column, m, log_s, q, entropy, c, c_entropy,
                                       inv_temp, HAS_ENTROPY_COEF)
                tl.store(out_row_ptr + block, g.to(grad_ptr.dtype.element_ty), mask=in_row)
        else:
            fill_row(out_row_ptr, n_cols, 0.0, BLOCK_V)
