"""Reference policy losses: the plain formulas on ``[B, T]`` log-probs, autograd for gradients.

Every stop-gradient is a ``.detach()``, every clip a ``torch.where`` or ``clamp``: this file is
what the fused op's hand-derived coefficients are tested against (in float64). It shares no
code with the implementation: aggregation, entropy statistics, rollout weights and KL
estimators come from the sibling reference modules, written from the formulas.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import PolicyLossConfig
from .aggregation import aggregate, sequence_mean
from .entropy import entropy_advantage, top_entropy_mask
from .kl import kl_estimate
from .rollout import off_policy_mask, rollout_weights
from .selection import covariance_selection, dppo_keep, vespo_weights
from .token_logprobs import token_logprobs


def _clamp(x: Tensor, bound: float | None) -> Tensor:
    return x if bound is None else x.clamp(-bound, bound)


def policy_loss(
    logits: Tensor,
    targets: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    old_logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    rollout_logprobs: Tensor | None = None,
    config: PolicyLossConfig,
) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
    """Loss, logp ``[B, T]``, entropy ``[B, T]`` and metrics, all from the plain formulas.

    logits ``[B, T, V]``; targets, mask ``[B, T]``; advantages ``[B]`` or ``[B, T]``. Runs in
    the logits' dtype (float64 in the tests). ``old_logprobs=None`` is on-policy: old is
    ``logp.detach()``, so r = 1 in value and carries the gradient of logp.
    """
    c = config
    if logits.dim() == 2:  # [N, V]: one sequence of N tokens
        def lift(t):
            return t.unsqueeze(0) if t is not None else None

        loss, logp, entropy, metrics = policy_loss(
            logits.unsqueeze(0), targets.unsqueeze(0), advantages.unsqueeze(0),
            mask.unsqueeze(0), old_logprobs=lift(old_logprobs), ref_logprobs=lift(ref_logprobs),
            rollout_logprobs=lift(rollout_logprobs), config=config)
        return loss, logp.squeeze(0), entropy.squeeze(0), metrics
    logp, entropy = token_logprobs(logits, targets, temperature=c.temperature,
                                   return_entropy=True)
    valid = mask.bool() & (targets != -100)
    loss, metrics = policy_loss_from_logprobs(
        logp, entropy, valid, advantages, old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs, rollout_logprobs=rollout_logprobs, config=config)
    return loss, logp.detach(), entropy.detach(), metrics


def policy_loss_from_logprobs(
    logp: Tensor,
    entropy: Tensor,
    valid: Tensor,
    advantages: Tensor,
    *,
    old_logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    rollout_logprobs: Tensor | None = None,
    config: PolicyLossConfig,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``policy_loss`` from the per-token log-probs and entropies ``[B, T]`` (differentiable
    in both: dL/dlogp and dL/dH are the coefficients of DESIGN's one-coefficient view) and
    the bool mask of the tokens that count. Returns (loss, metrics)."""
    c = config
    dtype = logp.dtype
    m = valid.to(dtype)
    adv = advantages.to(dtype)
    adv = adv.unsqueeze(-1).expand_as(logp) if adv.dim() == 1 else adv
    old = logp.detach() if old_logprobs is None else old_logprobs.to(dtype)
    ent = entropy.detach()

    if c.entropy.advantage_alpha is not None:
        adv = entropy_advantage(adv, ent, m, c.entropy.advantage_alpha)
    entropy_mask = top_entropy_mask(ent, m, c.entropy.top_quantile)

    lengths = m.sum(-1)
    safe_lengths = lengths.clamp(min=1)
    log_ratio = _clamp(logp - old, c.ratio.log_clamp)
    if c.ratio.level == "token":
        ratio = torch.exp(log_ratio)
    elif c.ratio.level == "sequence":
        log_s = (log_ratio * m).sum(-1) / safe_lengths
        ratio = torch.exp(log_s).unsqueeze(-1).expand_as(logp)
    else:
        log_s = ((log_ratio * m).sum(-1) / safe_lengths).detach()
        ratio = torch.exp(log_s.unsqueeze(-1) + logp - logp.detach())

    is_weight = rollout_weights(old.detach(), rollout_logprobs, m, c)
    behaviour = rollout_logprobs if rollout_logprobs is not None else old
    keep_off_policy = off_policy_mask(adv, logp.detach(), behaviour.detach().to(dtype), m,
                                      c.rollout.off_policy_mask_threshold)

    def agg(values: Tensor, aggregation: str | None = None, normalizer: float | None = None,
            mask: Tensor = m) -> Tensor:
        if aggregation is None:
            aggregation, normalizer = c.aggregation.mode, c.aggregation.normalizer
        return aggregate(values, mask, aggregation, normalizer, c.aggregation.max_length,
                         c.aggregation.count_empty_sequences)

    hi_const = 1.0 + c.clip.eps_high
    lo_const = 1.0 - c.clip.eps_low if c.clip.eps_low is not None else None

    if c.objective == "gmpo":
        sign = torch.sign(adv)
        high = c.clip.gmpo_high if c.clip.gmpo_high is not None else c.clip.gmpo
        clipped = log_ratio.clamp(-c.clip.gmpo, high)
        log_ratio_c = sign * torch.minimum(sign * log_ratio, sign * clipped)
        seq_ratio = torch.exp((log_ratio_c * m).sum(-1) / safe_lengths)
        mean_adv = (adv * m).sum(-1) / safe_lengths
        seq_loss = -mean_adv * seq_ratio * is_weight[:, 0]
        pg_loss = sequence_mean(seq_loss, lengths > 0, c.aggregation.normalizer,
                                c.aggregation.count_empty_sequences)
    else:
        if c.objective == "pg":
            per_token = -ratio * adv
        elif c.objective == "sapo":
            tau = torch.where(adv > 0, c.soft_clip.sapo_tau_pos, c.soft_clip.sapo_tau_neg).to(dtype)
            per_token = -(4.0 / tau) * torch.sigmoid(tau * (ratio - 1.0)) * adv
        elif c.objective == "cispo":
            w = ratio.detach().clamp(max=hi_const)
            if lo_const is not None:
                w = w.clamp(min=lo_const)
            per_token = -w * adv * logp
        elif c.objective in ("dppo_tv", "dppo_kl"):
            w = ratio.detach().clamp(max=c.clip.dppo_ratio_cap)
            keep = dppo_keep(logp.detach(), old.detach(), adv, c)
            per_token = -w * keep * adv * logp
        elif c.objective == "vespo":
            phi = vespo_weights(log_ratio.detach(), adv, m, is_weight, c)
            per_token = -phi * adv * logp
        else:
            hi = hi_const * ratio / ratio.detach() if c.clip.gradient != "zero" else hi_const
            lo = lo_const
            if lo is not None and c.clip.gradient == "keep_both":
                lo = lo_const * ratio / ratio.detach()
            hi_t = torch.as_tensor(hi, dtype=dtype)
            clipped = torch.where(ratio > hi_t, hi_t, ratio)
            if lo is not None:
                lo_t = torch.as_tensor(lo, dtype=dtype)
                clipped = torch.where(ratio < lo_t, lo_t, clipped)
            unclipped = ratio if c.clip.delta is None else torch.clamp(ratio, max=c.clip.delta)
            per_token = -torch.minimum(unclipped * adv, clipped * adv)
            if c.clip.dual_c is not None:
                capped = torch.minimum(per_token, -c.clip.dual_c * adv)
                per_token = torch.where(adv < 0, capped, per_token)
        if c.cov.mode == "clip_cov":
            plain = ratio.detach().clamp(max=hi_const)
            if lo_const is not None:
                plain = plain.clamp(min=lo_const)
            clipped_by_ppo = -adv * plain > -adv * ratio.detach()
            chosen = covariance_selection(adv, logp.detach(), m, ~clipped_by_ppo, c)
            per_token = per_token * (1 - chosen)
        elif c.cov.mode == "kl_cov":
            chosen = covariance_selection(adv, logp.detach(), m, torch.ones_like(m).bool(), c)
            per_token = per_token + chosen * c.cov.kl_coef * torch.abs(log_ratio)
        weight = keep_off_policy * entropy_mask
        if c.objective != "vespo":  # VESPO's rollout weight is inside phi
            weight = weight * is_weight
        pg_loss = agg(per_token * weight)

    loss = pg_loss
    kl = kl_estimate(logp, old, ref_logprobs.to(dtype) if ref_logprobs is not None else None, c)
    if kl is not None and c.kl.coef != 0:
        kl_term = kl * ratio if c.kl.ratio_weighted else kl
        loss = loss + c.kl.coef * agg(kl_term, c.kl.aggregation, c.kl.normalizer)
    if c.entropy.coef != 0:
        if c.entropy.aggregation is None:
            bonus = agg(entropy_mask * entropy)
        else:
            bonus = agg(entropy, c.entropy.aggregation, c.entropy.normalizer,
                        mask=m * entropy_mask)
        loss = loss - c.entropy.coef * bonus

    return loss, _metrics(ratio.detach(), adv, m, kl, ent, c)


def _metrics(ratio, adv, m, kl, ent, c: PolicyLossConfig) -> dict[str, Tensor]:
    """Detached per-batch statistics over valid tokens (plain means, not loss-weighted)."""
    valid = m > 0
    count = valid.sum()
    denom = count.clamp(min=1)
    zero = torch.zeros((), dtype=ratio.dtype)

    def frac(x: Tensor) -> Tensor:
        return (x & valid).sum() / denom

    hi = 1.0 + c.clip.eps_high
    lo = 1.0 - c.clip.eps_low if c.clip.eps_low is not None else -float("inf")
    if c.objective == "ppo_clip":
        clip_high = frac((adv > 0) & (ratio > hi))
        clip_low = frac((adv < 0) & (ratio < lo))
    elif c.objective == "cispo":
        clip_high, clip_low = frac(ratio > hi), frac(ratio < lo)
    else:
        clip_high = clip_low = zero
    clip_dual = frac((adv < 0) & (ratio > c.clip.dual_c)) \
        if c.objective == "ppo_clip" and c.clip.dual_c is not None else zero
    r = ratio[valid]
    return {
        "clip_frac_low": clip_low,
        "clip_frac_high": clip_high,
        "clip_frac_dual": clip_dual,
        "kl_mean": (kl.detach() * m).sum() / denom if kl is not None else zero,
        "entropy_mean": (ent * m).sum() / denom,
        "ratio_mean": r.mean() if r.numel() else zero + 1,
        "ratio_min": r.min() if r.numel() else zero + 1,
        "ratio_max": r.max() if r.numel() else zero + 1,
        "token_count": count.to(ratio.dtype),
    }
