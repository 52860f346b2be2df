"""GAE: a reverse recurrence over time, parallel over sequences.

Grid ``(cdiv(B, BLOCK_B),)``; each program owns BLOCK_B sequences and walks t = T-1 .. 0:

    delta_t = r_t + gamma * V_next - V_t
    A_t     = delta_t + gamma * lam * A_next
    R_t     = A_t + V_t

Masked positions (tool output, padding) are transparent: V_next and A_next carry across
them unchanged, and they get A = R = 0. Inputs and outputs are contiguous float32 ``[B, T]``
(the mask as float32 0/1); ``T`` is a runtime argument. The recurrence is carried in float64:
its rounding error would otherwise grow with T, and the kernel is bound by its float32
loads and stores, not by arithmetic.
"""

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["n_steps"])
def gae_kernel(rewards_ptr, values_ptr, mask_ptr, adv_ptr, returns_ptr, n_seq, n_steps,
               gamma, lam, BLOCK_B: tl.constexpr):
    seqs = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    live = seqs < n_seq
    row = seqs.to(tl.int64) * n_steps
    # Broadcast into float64 vectors (a scalar argument may be a plain float here).
    gamma64 = tl.zeros([BLOCK_B], tl.float64) + gamma
    decay = gamma64 * (tl.zeros([BLOCK_B], tl.float64) + lam)
    next_value = tl.zeros([BLOCK_B], tl.float64)
    next_adv = tl.zeros([BLOCK_B], tl.float64)
    for i in range(0, n_steps):
        t = n_steps - 1 - i
        r = tl.load(rewards_ptr + row + t, mask=live, other=0.0).to(tl.float64)
        v = tl.load(values_ptr + row + t, mask=live, other=0.0).to(tl.float64)
        valid = tl.load(mask_ptr + row + t, mask=live, other=0.0) > 0.0
        adv = r + gamma64 * next_value - v + decay * next_adv
        next_value = tl.where(valid, v, next_value)
        next_adv = tl.where(valid, adv, next_adv)
        tl.store(adv_ptr + row + t, tl.where(valid, adv, 0.0).to(tl.float32), mask=live)
        tl.store(returns_ptr + row + t, tl.where(valid, adv + v, 0.0).to(tl.float32), mask=live)
