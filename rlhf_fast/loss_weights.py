"""Detached per-token weights of the policy losses, on ``[B, T]`` tensors.

None of these carries a gradient: they are the aggregation weights, the entropy-aware
advantage, the top-entropy mask and the rollout importance weights. The reference and the
fused op both use them; what the two compute independently is everything differentiable.

Sequences are rows of ``[B, T]`` tensors, or, for packed batches, the spans of a ``[1, N]``
row given by a ``layout`` (``rlhf_fast.ops.packing``: ``seq_sum`` and ``per_token``); the
default is the padded layout, and its results are the same to the bit either way.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .config import ROLLOUT_NORMALIZE_MIN, VESPO_LOG_W_BOUNDS, VESPO_MIN_LAMBDA, PolicyLossConfig
from .ops.packing import Layout, Padded


def _layout(layout: Layout | None, mask: Tensor) -> Layout:
    return layout if layout is not None else Padded(mask.shape[0])


def aggregation_weights(mask: Tensor, aggregation: str, normalizer: float | None = None,
                        max_length: int | None = None, count_empty: bool = False,
                        layout: Layout | None = None) -> Tensor:
    """w with ``aggregated loss = sum(w * L)``; mask ``[B, T]`` (or ``[1, N]`` packed) of 0/1
    in the working dtype.

    ``token_mean``: 1 / sum(m); ``seq_mean_token_mean``: 1 / (L_i * non-empty sequences);
    ``seq_mean_token_sum``: 1 / non-empty sequences; ``seq_mean_token_sum_norm``:
    1 / (B * max_length), max_length defaulting to T (a packed batch has no T: it needs
    ``max_length`` or ``normalizer``). ``normalizer`` replaces the count; ``count_empty``:
    the sequence count is B (S packed; empty sequences count).
    """
    layout = _layout(layout, mask)
    seq_lengths = layout.seq_sum(mask)
    lengths = layout.per_token(seq_lengths)
    n_seq = (seq_lengths > 0).sum().clamp(min=1) if not count_empty \
        else max(layout.num_sequences, 1)
    norm = normalizer
    if aggregation == "token_mean":
        return mask / (norm if norm is not None else mask.sum().clamp(min=1))
    if aggregation == "seq_mean_token_mean":
        return mask / lengths.clamp(min=1) / (norm if norm is not None else n_seq)
    if aggregation == "seq_mean_token_sum":
        return mask / (norm if norm is not None else n_seq)
    if aggregation != "seq_mean_token_sum_norm":
        raise ValueError(f"unknown aggregation {aggregation!r}")
    if norm is None and max_length is None and not isinstance(layout, Padded):
        raise ValueError("aggregation='seq_mean_token_sum_norm' on a packed batch needs "
                         "max_length (or normalizer): a packed batch has no padded length")
    max_length = max_length if max_length is not None else mask.shape[-1]
    return mask / (norm if norm is not None else layout.num_sequences * max_length)


def term_weights(mask: Tensor, entropy_mask: Tensor, config: PolicyLossConfig,
                 layout: Layout | None = None, policy: Tensor | None = None
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """Aggregation weights of the policy, KL and entropy terms, ``[B, T]`` (``[1, N]``) each.

    The policy term uses ``aggregation`` / ``normalizer`` (or ``policy``, weights computed
    over the whole batch by a caller that sees a chunk of it); the KL term the same unless
    ``kl_aggregation`` is set (then with ``kl_normalizer``); the entropy bonus the policy
    weights times the top-entropy mask unless ``entropy_aggregation`` is set, in which case
    it is aggregated over the tokens it acts on (``mask * entropy_mask``) alone."""
    c = config
    if policy is None:
        policy = aggregation_weights(mask, c.aggregation.mode, c.aggregation.normalizer,
                                     c.aggregation.max_length, c.aggregation.count_empty_sequences,
                                     layout)
    kl = policy
    if c.kl.aggregation is not None:
        kl = aggregation_weights(mask, c.kl.aggregation, c.kl.normalizer, c.aggregation.max_length,
                                 c.aggregation.count_empty_sequences, layout)
    entropy = policy * entropy_mask
    if c.entropy.aggregation is not None:
        entropy = aggregation_weights(mask * entropy_mask, c.entropy.aggregation,
                                      c.entropy.normalizer, c.aggregation.max_length,
                                      c.aggregation.count_empty_sequences, layout)
    return policy, kl, entropy


def sequence_count(mask: Tensor, config: PolicyLossConfig,
                   layout: Layout | None = None) -> Tensor:
    """Denominator of per-sequence losses (GMPO): ``normalizer``, or the non-empty sequences
    (all B, or S packed, with ``count_empty_sequences``)."""
    if config.aggregation.normalizer is not None:
        # A fill on the device: torch.tensor(...) would copy from the host and synchronise.
        return torch.full((), config.aggregation.normalizer, dtype=mask.dtype, device=mask.device)
    layout = _layout(layout, mask)
    if config.aggregation.count_empty_sequences:
        return torch.full((), max(layout.num_sequences, 1), dtype=mask.dtype,
                          device=mask.device)
    return (layout.seq_sum(mask) > 0).sum().clamp(min=1).to(mask.dtype)


def entropy_statistics(entropy: Tensor, mask: Tensor, quantile: float | None) -> dict:
    """Mean, std (unbiased; 1 when zero or undefined) and the (1 - quantile) quantile of the
    entropy over valid tokens: what the batch-statistic features need.

    Computed with masks, not by gathering the valid tokens (whose count the host would have to
    read): no host sync. The quantile is ``torch.quantile``'s linear interpolation between
    the sorted valid values, step for step; with no valid token it is -inf (every token
    passes) and the mean 0.
    """
    valid = mask > 0
    n = valid.sum()
    one = torch.ones((), dtype=entropy.dtype, device=entropy.device)
    zero = torch.zeros_like(entropy)
    mean = torch.where(valid, entropy, zero).sum() / n.clamp(min=1)
    deviation = torch.where(valid, entropy - mean, zero)
    std = ((deviation * deviation).sum() / (n - 1).clamp(min=1)).sqrt()
    std = torch.where((n > 1) & (std > 0) & torch.isfinite(std), std, one)
    threshold = None
    if quantile is not None:
        values = torch.where(valid, entropy, float("inf")).flatten().sort().values
        rank = (1 - quantile) * (n - 1).to(entropy.dtype)
        below = rank.floor().long().clamp(min=0)
        above = rank.ceil().long().clamp(min=0)
        low, high = values[below], values[above]
        threshold = torch.where(n > 0, low.lerp(high, rank - below.to(entropy.dtype)),
                                float("-inf"))
    return {"mean": mean, "std": std, "threshold": threshold}


def entropy_advantage(advantages: Tensor, entropy: Tensor, mask: Tensor, alpha: float,
                      stats: dict | None = None) -> Tensor:
    """AEPO: ``A * (1 + alpha * z(H))``, z standardised over valid tokens (unbiased std;
    a zero or undefined std counts as 1)."""
    stats = stats if stats is not None else entropy_statistics(entropy, mask, None)
    return advantages * (1 + alpha * (entropy - stats["mean"]) / stats["std"])


def top_entropy_mask(entropy: Tensor, mask: Tensor, quantile: float | None,
                     stats: dict | None = None) -> Tensor:
    """1 where a token's entropy is at least the (1 - quantile) quantile of valid tokens."""
    if quantile is None:
        return torch.ones_like(entropy)
    stats = stats if stats is not None else entropy_statistics(entropy, mask, quantile)
    if stats["threshold"] is None:
        return torch.ones_like(entropy)
    return (entropy >= stats["threshold"]).to(entropy.dtype)


def _rollout_log_weights(old: Tensor, rollout: Tensor, config: PolicyLossConfig) -> Tensor:
    log_w = old - rollout.to(old.dtype)
    if config.ratio.log_clamp is not None:
        log_w = log_w.clamp(-config.ratio.log_clamp, config.ratio.log_clamp)
    return log_w


def rollout_weights(old: Tensor, rollout: Tensor | None, mask: Tensor,
                    config: PolicyLossConfig, layout: Layout | None = None) -> Tensor:
    """Importance weights against the inference engine (1 when off): truncated or masked
    to [rollout_floor, rollout_cap], per token or per sequence, or token weights gated by the
    sequence's geometric mean; optionally divided by their batch mean."""
    mode = config.rollout.mode
    if mode is None or rollout is None:
        return torch.ones_like(old)
    layout = _layout(layout, mask)
    log_w = _rollout_log_weights(old, rollout, config)
    per_sequence = mode in ("sequence_truncate", "sequence_mask")
    seq_log_w = layout.seq_sum(log_w * mask)                        # [B] / [S]
    sequence_log_w = layout.per_token(seq_log_w)
    if per_sequence:
        log_w = sequence_log_w.expand_as(old)
    w = torch.exp(log_w)
    cap, floor = config.rollout.cap, config.rollout.floor
    if mode == "sequence_gate":
        lengths = layout.per_token(layout.seq_sum(mask))
        gate = torch.exp(sequence_log_w / lengths.clamp(min=1))
        w = torch.where(_in_band(gate, floor, cap), w, torch.zeros_like(w))
    else:
        w = _bounded(w, mode, floor, cap)
    if config.rollout.normalize:
        if per_sequence:  # one unit per sequence (its weight), the non-empty ones counted
            units = _bounded(torch.exp(seq_log_w), mode, floor, cap)
            counted = (layout.seq_sum(mask) > 0).to(w.dtype)
        else:
            units, counted = w, mask
        mean = (units * counted).sum() / counted.sum().clamp(min=1)
        w = torch.where(mean > ROLLOUT_NORMALIZE_MIN, w / mean, w)
    return w


def _bounded(w: Tensor, mode: str, floor: float | None, cap: float) -> Tensor:
    """Truncated to [floor, cap] (``*_truncate``), or zero outside it (``*_mask``)."""
    if mode.endswith("truncate"):
        return torch.clamp(w, min=floor, max=cap)
    return torch.where(_in_band(w, floor, cap), w, torch.zeros_like(w))


def _in_band(x: Tensor, floor: float | None, cap: float) -> Tensor:
    inside = x <= cap
    return inside if floor is None else inside & (x >= floor)


def off_policy_mask(advantages: Tensor, logp: Tensor, behaviour: Tensor, mask: Tensor,
                    threshold: float | None, layout: Layout | None = None) -> Tensor:
    """DeepSeek-V3.2's off-policy sequence mask: 0 for the tokens with A < 0 of a sequence
    whose mean of (behaviour - logp) over valid tokens exceeds ``threshold``, else 1."""
    if threshold is None:
        return torch.ones_like(logp)
    layout = _layout(layout, mask)
    divergence = layout.per_token(layout.seq_sum((behaviour - logp) * mask))
    mean = divergence / layout.per_token(layout.seq_sum(mask)).clamp(min=1)
    return ((advantages >= 0) | (mean <= threshold)).to(logp.dtype)


def dppo_keep(logp: Tensor, old: Tensor, advantages: Tensor, config: PolicyLossConfig
              ) -> Tensor:
    """DPPO's trust-region mask (1 inside, 0 outside) on the probabilities p = exp(logp),
    p_old = exp(old): total variation p - p_old, or the binary KL of (p_old, p)."""
    p, p_old = torch.exp(logp), torch.exp(old)
    high, low = config.clip.eps_high, config.clip.eps_low
    if config.objective == "dppo_tv":
        keep_pos, keep_neg = p - p_old <= high, p - p_old >= -low
    else:
        binary_kl = p_old * (old - logp) + (1 - p_old) * torch.log(
            (1.0 - p_old + 1e-8) / (1.0 - p + 1e-8))
        keep_pos = (binary_kl <= high) | (p <= p_old)
        keep_neg = (binary_kl <= low) | (p >= p_old)
    return torch.where(advantages > 0, keep_pos, keep_neg).to(logp.dtype)


def vespo_weights(log_ratio: Tensor, advantages: Tensor, mask: Tensor, is_weight: Tensor,
                  config: PolicyLossConfig, layout: Layout | None = None) -> Tensor:
    """VESPO's detached gamma weight phi ``[B, T]``: log W = clamp(sum_t m log r_t (+ the
    rollout correction's log rho, once per sequence or summed over valid tokens), log 1e-8,
    20); log phi = lam + k log W - lam W with (k, lam) by A >= 0; non-finite phi -> 0."""
    low, high = VESPO_LOG_W_BOUNDS
    layout = _layout(layout, mask)
    log_w = layout.seq_sum(log_ratio * mask)                         # [B] / [S]
    if config.rollout.mode is not None:
        log_rho = torch.log(is_weight).clamp(low, high)
        if config.rollout.mode in ("sequence_truncate", "sequence_mask"):
            log_w = log_w + layout.first(log_rho)
        else:
            log_w = log_w + layout.seq_sum(log_rho * mask)
    log_w = layout.per_token(log_w)
    log_w = log_w.clamp(low, high)
    nonneg = advantages >= 0
    soft = config.soft_clip
    k = torch.where(nonneg, soft.vespo_k_pos, soft.vespo_k_neg).to(log_w.dtype)
    lam = torch.where(nonneg, config.soft_clip.vespo_lambda_pos,
                      config.soft_clip.vespo_lambda_neg).to(log_w.dtype).clamp(min=VESPO_MIN_LAMBDA)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
    return torch.where(torch.isfinite(phi), phi, torch.zeros_like(phi))


def covariance_selection(advantages: Tensor, logp: Tensor, mask: Tensor, eligible: Tensor,
                         config: PolicyLossConfig) -> Tensor:
    """The tokens ``cov_selection`` picks (float 0/1 ``[B, T]``), without a host read: the
    covariance cov_t = (A_t - mean A)(logp_t - mean logp) over valid tokens, k = max(floor(
    cov_ratio * valid tokens), 1); ``clip_cov``: k of the ``eligible`` tokens with
    cov_lower < cov < cov_upper at random (the k smallest of torch.rand(B, T)); ``kl_cov``:
    the k valid tokens of largest cov (ties: the earlier flattened position)."""
    valid = mask > 0
    count = mask.sum()
    denom = count.clamp(min=1)
    mean_adv = (advantages * mask).sum() / denom
    mean_logp = (logp * mask).sum() / denom
    cov = (advantages - mean_adv) * (logp - mean_logp)
    k = (count.double() * config.cov.ratio).floor().clamp(min=1)
    if config.cov.mode == "clip_cov":
        pool = valid & eligible & (cov > config.cov.lower) & (cov < config.cov.upper)
        priority = torch.rand(logp.shape, dtype=torch.float32, device=logp.device)
        key = torch.where(pool, priority, 2.0)
    else:
        pool = valid
        key = torch.where(pool, -cov.float(), float("inf"))
    order = key.flatten().argsort(stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    return (pool & (rank.view(logp.shape) < k)).to(logp.dtype)
