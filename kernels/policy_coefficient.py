"""Per-token coefficient of the token-level policy losses, on device: c = dL/dlogp.

The Triton twin of ``rlhf_fast/policy_coefficients.py`` for the losses whose coefficient
depends only on the token itself and on weights known from the mask (PPO-clip and its
dual-clip / delta / AEPO / GPPO variants, pg, SAPO, CISPO, the KL penalty). Conventions are
torch's: clamp passes the gradient at its bounds, min gives half to each side on ties.

Switches (constexpr): OBJECTIVE 0 pg, 1 ppo_clip, 2 sapo, 3 cispo; CLIP_GRADIENT 0 zero,
1 keep_high, 2 keep_both; KL_MODE 0 none, 1 k1, 2 k2, 3 k3.
"""

import triton
import triton.language as tl

PG = tl.constexpr(0)
PPO_CLIP = tl.constexpr(1)
SAPO = tl.constexpr(2)
CISPO = tl.constexpr(3)


@triton.jit
def half_share(a, b):
    """Share of d min(a, b) that goes to a: 1, 0, or 1/2 on a tie."""
    return tl.where(a < b, 1.0, tl.where(a > b, 0.0, 0.5))


@triton.jit
def ppo_clip_dloss(ratio, adv, clip_low, clip_high, dual_c, delta,
                   CLIP_GRADIENT: tl.constexpr, HAS_LOW: tl.constexpr,
                   HAS_DUAL: tl.constexpr, HAS_DELTA: tl.constexpr):
    """d/d ratio of -min(r' A, clip(r) A), capped at -c A for A < 0 when HAS_DUAL."""
    hi = 1.0 + clip_high
    upper = ratio > hi
    clipped = tl.where(upper, hi, ratio)
    if CLIP_GRADIENT > 0:
        d_clipped = tl.where(upper, hi / ratio, 1.0)
    else:
        d_clipped = tl.where(upper, 0.0, 1.0)
    if HAS_LOW:
        lo = 1.0 - clip_low
        lower = ratio < lo
        clipped = tl.where(lower, lo, clipped)
        if CLIP_GRADIENT == 2:
            d_clipped = tl.where(lower, lo / ratio, d_clipped)
        else:
            d_clipped = tl.where(lower, 0.0, d_clipped)
    if HAS_DELTA:
        unclipped = tl.minimum(ratio, delta)
        d_unclipped = tl.where(ratio <= delta, 1.0, 0.0)
    else:
        unclipped = ratio
        d_unclipped = 1.0
    s1 = unclipped * adv
    s2 = clipped * adv
    to_s1 = half_share(s1, s2)
    d_loss = -(to_s1 * d_unclipped + (1.0 - to_s1) * d_clipped) * adv
    if HAS_DUAL:
        loss = -tl.minimum(s1, s2)
        to_loss = half_share(loss, -dual_c * adv)
        d_loss = tl.where(adv < 0.0, to_loss * d_loss, d_loss)
    return d_loss


@triton.jit
def kl_dlogp(logp, old, ref, log_ratio_clamp, kl_clamp,
             KL_MODE: tl.constexpr, KL_FROM_OLD: tl.constexpr, HAS_KL_CLAMP: tl.constexpr,
             HAS_CLAMP: tl.constexpr):
    """d/d logp of the KL estimator (k1 / k2 / k3) with verl's optional clamps."""
    if KL_FROM_OLD:
        log_x = logp - old
        d_sign = 1.0
    else:
        log_x = ref - logp
        d_sign = -1.0
    d_clamp = 1.0
    if HAS_KL_CLAMP and HAS_CLAMP:
        d_clamp = tl.where(tl.abs(log_x) <= log_ratio_clamp, 1.0, 0.0)
        log_x = tl.minimum(tl.maximum(log_x, -log_ratio_clamp), log_ratio_clamp)
    if KL_MODE == 1:
        k = -log_x
        dk = -1.0
    elif KL_MODE == 2:
        k = 0.5 * log_x * log_x
        dk = log_x
    else:
        e = tl.exp(log_x)
        k = e - 1.0 - log_x
        dk = e - 1.0
    if HAS_KL_CLAMP:
        dk = tl.where(tl.abs(k) <= kl_clamp, dk, 0.0)
    return dk * d_clamp * d_sign


@triton.jit
def token_policy_coefficient(
    logp, adv, old, ref, weight, policy_weight,
    clip_low, clip_high, dual_c, delta, log_ratio_clamp, kl_coef, kl_clamp, tau_pos, tau_neg,
    OBJECTIVE: tl.constexpr, CLIP_GRADIENT: tl.constexpr, HAS_LOW: tl.constexpr,
    HAS_DUAL: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_CLAMP: tl.constexpr,
    KL_MODE: tl.constexpr, KL_FROM_OLD: tl.constexpr, HAS_KL_CLAMP: tl.constexpr,
):
    """c = dL/dlogp of one token: ``policy_weight`` (aggregation x rollout weight) times the
    objective's derivative, plus ``kl_coef * weight`` times the KL estimator's."""
    raw = logp - old
    if HAS_CLAMP:
        log_ratio = tl.minimum(tl.maximum(raw, -log_ratio_clamp), log_ratio_clamp)
        d_log_ratio = tl.where(tl.abs(raw) <= log_ratio_clamp, 1.0, 0.0)
    else:
        log_ratio = raw
        d_log_ratio = 1.0
    ratio = tl.exp(log_ratio)
    if OBJECTIVE == CISPO:
        w = tl.minimum(ratio, 1.0 + clip_high)
        if HAS_LOW:
            w = tl.maximum(w, 1.0 - clip_low)
        c = policy_weight * (-w * adv)
    else:
        if OBJECTIVE == PG:
            d_ratio = -adv
        elif OBJECTIVE == SAPO:
            tau = tl.where(adv > 0.0, tau_pos, tau_neg)
            gate = tl.sigmoid(tau * (ratio - 1.0))
            d_ratio = -4.0 * gate * (1.0 - gate) * adv
        else:
            d_ratio = ppo_clip_dloss(ratio, adv, clip_low, clip_high, dual_c, delta,
                                     CLIP_GRADIENT, HAS_LOW, HAS_DUAL, HAS_DELTA)
        c = policy_weight * d_ratio * ratio * d_log_ratio
    if KL_MODE > 0:
        c += kl_coef * weight * kl_dlogp(logp, old, ref, log_ratio_clamp, kl_clamp,
                                         KL_MODE, KL_FROM_OLD, HAS_KL_CLAMP, HAS_CLAMP)
    return c
