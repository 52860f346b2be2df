"""The coefficient step of the policy losses: per-token loss, ``c = dL/dlogp``, ``c_H = dL/dH``.

Input: the stats sweep's float32 ``logp`` and ``entropy`` ``[B, T]`` and the per-token side
tensors. Output: the scalar loss, the two coefficients and the metrics. Everything here is
``[B, T]``-sized, so it costs nothing next to a pass over ``[B, T, V]``; the gradient sweep
then turns the coefficients into dL/dlogits (docs/architecture.md, One coefficient per token).

Every derivative is written out by hand and mirrors the autograd of
``rlhf_fast.reference.policy_loss`` exactly, including the conventions of torch's
``clamp`` (gradient passes at the bounds) and ``minimum`` (half to each side on ties).
Sums are taken in float64 so the loss keeps its relative accuracy at any token count.

Sequences are rows of the ``[B, T]`` inputs, or spans of a packed ``[1, N]`` row given by a
``layout`` (``rlhf_fast.ops.packing``); every per-sequence statistic goes through the
layout's ``seq_sum`` / ``per_token``, so one code serves both layouts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .config import KL_WEIGHT_CAP, PolicyLossConfig
from .loss_weights import (
    covariance_selection,
    dppo_keep,
    entropy_advantage,
    entropy_statistics,
    off_policy_mask,
    rollout_weights,
    sequence_count,
    term_weights,
    top_entropy_mask,
    vespo_weights,
)
from .ops.packing import Layout, Padded


@dataclass
class Coefficients:
    loss: Tensor            # float32 scalar
    c_logp: Tensor          # float32 [B, T]: dL/dlogp
    c_entropy: Tensor | None  # float32 [B, T]: dL/dH, None when the loss has no entropy term
    metrics: dict[str, Tensor]


def _clamped(x: Tensor, bound: float | None) -> tuple[Tensor, Tensor]:
    """clamp(x, -bound, bound) and its derivative (1 inside the closed interval, else 0)."""
    if bound is None:
        return x, torch.ones_like(x)
    return x.clamp(-bound, bound), (x.abs() <= bound).to(x.dtype)


def _min_grads(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Shares of d minimum(a, b) going to a and to b (1/0, 0/1, or 1/2 each on ties)."""
    to_a = torch.where(a < b, 1.0, torch.where(a > b, 0.0, 0.5)).to(a.dtype)
    return to_a, 1.0 - to_a


def _ppo_clip(ratio: Tensor, adv: Tensor, c: PolicyLossConfig) -> tuple[Tensor, Tensor]:
    """Per-token loss -min(r'A, clip(r)A) (dual-capped) and its derivative in r."""
    hi = 1.0 + c.clip.eps_high
    upper = ratio > hi
    clipped = torch.where(upper, hi, ratio)
    # d clip(r) / d r: 1 inside; (1+eps)/r with the stop-gradient bound (value hi = hi*r/sg r).
    d_clipped = torch.where(upper, hi / ratio if c.clip.gradient != "zero" else 0.0, 1.0)
    if c.clip.eps_low is not None:
        lo = 1.0 - c.clip.eps_low
        lower = ratio < lo
        clipped = torch.where(lower, lo, clipped)
        d_lower = lo / ratio if c.clip.gradient == "keep_both" else 0.0
        d_clipped = torch.where(lower, d_lower, d_clipped)
    if c.clip.delta is not None:
        delta = c.clip.delta
        unclipped, d_unclipped = ratio.clamp(max=delta), (ratio <= delta).to(ratio.dtype)
    else:
        unclipped, d_unclipped = ratio, torch.ones_like(ratio)
    s1, s2 = unclipped * adv, clipped * adv
    to_s1, to_s2 = _min_grads(s1, s2)
    loss = -torch.minimum(s1, s2)
    d_loss = -(to_s1 * d_unclipped + to_s2 * d_clipped) * adv
    if c.clip.dual_c is not None:
        cap = -c.clip.dual_c * adv
        to_loss, _ = _min_grads(loss, cap)
        negative = adv < 0
        d_loss = torch.where(negative, to_loss * d_loss, d_loss)
        loss = torch.where(negative, torch.minimum(loss, cap), loss)
    return loss, d_loss


def _token_objective(ratio: Tensor, adv: Tensor, c: PolicyLossConfig) -> tuple[Tensor, Tensor]:
    """Per-token loss and its derivative in the ratio, for pg / sapo / ppo_clip."""
    if c.objective == "pg":
        return -ratio * adv, -adv
    if c.objective == "sapo":
        soft = c.soft_clip
        tau = torch.where(adv > 0, soft.sapo_tau_pos, soft.sapo_tau_neg).to(ratio.dtype)
        gate = torch.sigmoid(tau * (ratio - 1.0))
        return -(4.0 / tau) * gate * adv, -4.0 * gate * (1.0 - gate) * adv
    return _ppo_clip(ratio, adv, c)


def _kl(logp: Tensor, old: Tensor, ref: Tensor | None,
        c: PolicyLossConfig) -> tuple[Tensor, Tensor] | None:
    """Per-token KL estimate and the derivative in logp that the loss uses (the estimator's,
    or k2's for the straight-through ``kl_gradient``); None without a KL term."""
    if c.kl.reference == "ref":
        if ref is None:
            return None
        log_x, d_log_x = ref - logp, -1.0
    else:
        log_x, d_log_x = logp - old, 1.0
    raw = log_x
    d_clamp = torch.ones_like(log_x)
    if c.kl.clamp is not None:
        log_x, d_clamp = _clamped(log_x, c.ratio.log_clamp)
    if c.kl.estimator == "k1":
        k, dk = -log_x, -torch.ones_like(log_x)
    elif c.kl.estimator == "k2":
        k, dk = 0.5 * log_x * log_x, log_x
    elif c.kl.estimator == "abs":
        k, dk = log_x.abs(), torch.sign(log_x)
    else:
        k, dk = torch.exp(log_x) - 1.0 - log_x, torch.exp(log_x) - 1.0
    if c.kl.clamp is not None:
        k, d_value = _clamped(k, c.kl.clamp)
        dk = dk * d_value
    if c.kl.gradient == "k2":
        return k, raw * d_log_x
    if c.kl.gradient == "k2_weighted":
        weight = torch.exp(logp - old).clamp(max=KL_WEIGHT_CAP)
        return k, weight * raw * d_log_x
    return k, dk * d_clamp * d_log_x


def policy_coefficients(
    logp: Tensor, entropy: Tensor, valid: Tensor, advantages: Tensor,
    old_logprobs: Tensor | None, ref_logprobs: Tensor | None, rollout_logprobs: Tensor | None,
    config: PolicyLossConfig, entropy_stats: dict | None = None, *,
    layout: Layout | None = None, weights: Tensor | None = None,
    rollout_weight: Tensor | None = None, sequence_norm: Tensor | None = None,
) -> Coefficients:
    """Loss, coefficients and metrics from per-token values (all ``[B, T]``, or ``[1, N]``
    for a packed batch described by ``layout``).

    logp, entropy: float32 from the stats sweep; valid: bool mask (mask and target !=
    ignore_index); advantages: ``[B]`` (``[S]``) or per token; old / ref / rollout: float32
    or None (old None: on-policy, r = 1 carrying the gradient of logp). ``entropy_stats``:
    the batch's entropy mean / std / quantile threshold when this call sees only part of
    the batch (``rlhf_fast.loss_weights.entropy_statistics``); None computes them here.

    A call that sees a chunk of the batch (``rlhf_fast.ops.linear``) passes what the chunk
    cannot know, computed over the whole batch: ``weights`` (the aggregation weights, per
    token), ``rollout_weight`` (the rollout-correction weights, per token) and
    ``sequence_norm`` (GMPO's sequence count). Statistics of the chunk's own sequences
    (lengths, sequence ratios) are then taken over the chunk: it must hold whole sequences
    when the loss has any.
    """
    c = config
    f32 = torch.float32
    layout = layout if layout is not None else Padded(logp.shape[0])
    m = valid.to(f32)
    adv = advantages.to(f32)
    adv = layout.per_token(adv).expand_as(logp) if adv.dim() == 1 else adv
    old = logp if old_logprobs is None else old_logprobs.to(f32)
    rollout = rollout_logprobs.to(f32) if rollout_logprobs is not None else None
    if entropy_stats is None and (c.entropy.advantage_alpha is not None
                                  or c.entropy.top_quantile is not None):
        entropy_stats = entropy_statistics(entropy, m, c.entropy.top_quantile)
    if c.entropy.advantage_alpha is not None:
        adv = entropy_advantage(adv, entropy, m, c.entropy.advantage_alpha, entropy_stats)
    entropy_mask = top_entropy_mask(entropy, m, c.entropy.top_quantile, entropy_stats)
    is_weight = rollout_weight if rollout_weight is not None \
        else rollout_weights(old, rollout, m, c, layout)
    # ``weights`` (the policy term's) from the whole batch; the KL and entropy terms' own
    # aggregations (kl_aggregation, entropy_aggregation) are taken over what this call sees,
    # so a chunked caller runs those configs on the whole batch (PolicyLossConfig.
    # needs_whole_batch).
    weights, kl_weights, entropy_weights = term_weights(m, entropy_mask, c, layout, weights)
    policy_weights = weights * entropy_mask * off_policy_mask(
        adv, logp, rollout if rollout is not None else old, m, c.rollout.off_policy_mask_threshold,
        layout)
    if c.objective != "vespo":  # VESPO folds the rollout weight into its gamma weight
        policy_weights = policy_weights * is_weight

    seq_lengths = layout.seq_sum(m)                       # [B] / [S]
    seq_safe_lengths = seq_lengths.clamp(min=1)
    safe_lengths = layout.per_token(seq_safe_lengths)
    log_ratio, d_log_ratio = _clamped(logp - old, c.ratio.log_clamp)
    if c.ratio.level == "token":
        ratio = torch.exp(log_ratio)
    else:
        log_s = layout.per_token(layout.seq_sum(log_ratio * m)) / safe_lengths
        ratio = torch.exp(log_s).expand_as(logp)

    if c.objective == "gmpo":
        # Sign-aware log-space clip: the pessimistic side of each token's log-ratio is capped.
        sign = torch.sign(adv)
        low = c.clip.gmpo
        high = c.clip.gmpo_high if c.clip.gmpo_high is not None else c.clip.gmpo
        log_ratio_c = sign * torch.minimum(sign * log_ratio, sign * log_ratio.clamp(-low, high))
        kept = ((sign > 0) & (log_ratio <= high)) | ((sign < 0) & (log_ratio >= -low))
        seq_ratio = torch.exp(layout.seq_sum(log_ratio_c * m) / seq_safe_lengths)
        mean_adv = layout.seq_sum(adv * m) / seq_safe_lengths
        nonempty = (seq_lengths > 0).to(f32)
        norm = sequence_norm if sequence_norm is not None else sequence_count(m, c, layout)
        scale = nonempty * layout.first(is_weight) / norm
        pg_loss = (-mean_adv * seq_ratio * scale).double().sum()
        c_logp = (layout.per_token(-mean_adv * seq_ratio * scale) * m * kept.to(f32)
                  * d_log_ratio / safe_lengths)
    elif c.objective in ("cispo", "dppo_tv", "dppo_kl", "vespo"):
        # -sg(w) * A * logp: the gradient is -w * A, with a detached per-token weight w.
        if c.objective == "cispo":
            w = ratio.clamp(max=1.0 + c.clip.eps_high)
            if c.clip.eps_low is not None:
                w = w.clamp(min=1.0 - c.clip.eps_low)
        elif c.objective == "vespo":
            w = vespo_weights(log_ratio, adv, m, is_weight, c, layout)
        else:
            w = ratio.clamp(max=c.clip.dppo_ratio_cap) * dppo_keep(logp, old, adv, c)
        pg_loss = (policy_weights * -w * adv * logp).double().sum()
        c_logp = policy_weights * -w * adv
    else:
        per_token, d_ratio = _token_objective(ratio, adv, c)
        d_cov = None
        if c.cov.mode is not None:
            per_token, d_ratio, d_cov = _covariance_terms(per_token, d_ratio, ratio, log_ratio,
                                                          d_log_ratio, adv, logp, m, c)
        pg_loss = (policy_weights * per_token).double().sum()
        g_ratio = policy_weights * d_ratio  # dL / d ratio_t
        if c.ratio.level == "token":
            c_logp = g_ratio * ratio * d_log_ratio
        elif c.ratio.level == "sequence_token":
            c_logp = g_ratio * ratio     # log r_t = sg(log s) + logp_t - sg(logp_t)
        else:
            # s_i = exp(mean_t m log r_t): every token of sequence i gets sum_u dL/ds_i.
            g_seq = layout.per_token(layout.seq_sum(g_ratio))
            c_logp = g_seq * ratio * m * d_log_ratio / safe_lengths
        if d_cov is not None:
            c_logp = c_logp + policy_weights * d_cov

    loss = pg_loss
    kl = _kl(logp, old, ref_logprobs.to(f32) if ref_logprobs is not None else None, c)
    if kl is not None and c.kl.coef != 0:
        value, d_value = kl
        if c.kl.ratio_weighted:
            weighted = kl_weights * value
            if c.ratio.level == "token":
                d_ratio_kl = weighted * ratio * d_log_ratio
            elif c.ratio.level == "sequence_token":
                d_ratio_kl = weighted * ratio
            else:  # the sequence ratio s_i multiplies every token's estimate of sequence i
                d_ratio_kl = layout.per_token(layout.seq_sum(weighted)) * ratio * m \
                    * d_log_ratio / safe_lengths
            value, d_value = value * ratio, d_value * ratio
            c_logp = c_logp + c.kl.coef * d_ratio_kl
        loss = loss + c.kl.coef * (kl_weights * value).double().sum()
        c_logp = c_logp + c.kl.coef * kl_weights * d_value
    c_entropy = None
    if c.entropy.coef != 0:
        loss = loss - c.entropy.coef * (entropy_weights * entropy).double().sum()
        c_entropy = -c.entropy.coef * entropy_weights

    metrics = _metrics(ratio, adv, m, kl[0] if kl is not None else None, entropy, c)
    return Coefficients(loss.to(f32), c_logp.contiguous(), c_entropy, metrics)


def _covariance_terms(per_token: Tensor, d_ratio: Tensor, ratio: Tensor, log_ratio: Tensor,
                      d_log_ratio: Tensor, adv: Tensor, logp: Tensor, m: Tensor,
                      c: PolicyLossConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Clip-Cov / KL-Cov on a token-level objective: (per-token loss, its derivative in the
    ratio, the extra derivative in logp). Clip-Cov zeroes the selected tokens; KL-Cov adds
    cov_kl_coef * |log r| to them (derivative cov_kl_coef * sign(log r) through the clamp)."""
    if c.cov.mode == "clip_cov":
        clipped = ratio.clamp(max=1.0 + c.clip.eps_high)
        if c.clip.eps_low is not None:
            clipped = clipped.clamp(min=1.0 - c.clip.eps_low)
        eligible = -adv * clipped <= -adv * ratio       # not clipped by PPO
        keep = 1.0 - covariance_selection(adv, logp, m, eligible, c)
        return per_token * keep, d_ratio * keep, torch.zeros_like(per_token)
    selected = covariance_selection(adv, logp, m, torch.ones_like(m, dtype=torch.bool), c)
    penalty = c.cov.kl_coef * selected
    return (per_token + penalty * log_ratio.abs(), d_ratio,
            penalty * torch.sign(log_ratio) * d_log_ratio)


def _metrics(ratio: Tensor, adv: Tensor, m: Tensor, kl: Tensor | None, entropy: Tensor,
             c: PolicyLossConfig) -> dict[str, Tensor]:
    """Detached statistics over valid tokens (plain means over tokens, not loss-weighted):
    clip fractions (low / high / dual), KL and entropy means, ratio mean / min / max and the
    valid token count."""
    valid = m > 0
    count = m.sum()
    denom = count.clamp(min=1)
    zero = torch.zeros((), dtype=torch.float32, device=m.device)

    def frac(x: Tensor) -> Tensor:
        return (x & valid).sum() / denom

    hi = 1.0 + c.clip.eps_high
    lo = 1.0 - c.clip.eps_low if c.clip.eps_low is not None else -float("inf")
    if c.objective == "ppo_clip":
        clip_high, clip_low = frac((adv > 0) & (ratio > hi)), frac((adv < 0) & (ratio < lo))
    elif c.objective == "cispo":
        clip_high, clip_low = frac(ratio > hi), frac(ratio < lo)
    else:
        clip_high = clip_low = zero
    if c.objective == "ppo_clip" and c.clip.dual_c is not None:
        clip_dual = frac((adv < 0) & (ratio > c.clip.dual_c))
    else:
        clip_dual = zero
    big = torch.finfo(torch.float32).max
    any_valid = count > 0
    return {
        "clip_frac_low": clip_low,
        "clip_frac_high": clip_high,
        "clip_frac_dual": clip_dual,
        "kl_mean": (kl * m).sum() / denom if kl is not None else zero,
        "entropy_mean": (entropy * m).sum() / denom,
        "ratio_mean": torch.where(any_valid, (ratio * m).sum() / denom, 1.0),
        "ratio_min": torch.where(any_valid, torch.where(valid, ratio, big).min(), 1.0),
        "ratio_max": torch.where(any_valid, torch.where(valid, ratio, -big).max(), 1.0),
        "token_count": count,
    }
