"""Reference detached token weights of the DPPO, VESPO and Clip-Cov / KL-Cov objectives,
written as loops over the formulas of ``PolicyLossConfig``.

DPPO (verl's dppo_tv / dppo_kl), with p = exp(logp), q = exp(old) of the sampled token:

    tv   keep = p - q <= eps_high            if A > 0,   p - q >= -eps_low               else
    kl   D = q (old - logp) + (1 - q) log((1 - q + 1e-8) / (1 - p + 1e-8))
         keep = D <= eps_high or p <= q      if A > 0,   D <= eps_low or p >= q          else

VESPO (TRL's gamma weights): log W = clamp(sum_t m_t log r_t + log rho, log 1e-8, 20) with
log rho the rollout weight's log clamped to [log 1e-8, 20] (once per sequence for the
sequence modes, summed over valid tokens otherwise); (k, lam) = (k_pos, lam_pos) if A >= 0
else (k_neg, lam_neg), lam >= 1e-4; phi = exp(lam + k log W - lam W), 0 if not finite.

Covariance selection (Clip-Cov / KL-Cov): over the n valid tokens,
cov_t = (A_t - mean A) (logp_t - mean logp), k = max(floor(cov_ratio * n), 1).
clip_cov draws u = torch.rand(B, T) (float32, global generator of the logits' device) and
picks the k tokens with the smallest u among the valid, eligible tokens with
cov_lower < cov < cov_upper; kl_cov picks the k valid tokens of largest cov, the earlier
(row-major) position first on ties.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..config import PolicyLossConfig


def dppo_keep(logp: Tensor, old: Tensor, advantages: Tensor,
              config: PolicyLossConfig) -> Tensor:
    """1.0 inside DPPO's trust region, 0.0 outside, ``[B, T]``."""
    out = torch.zeros_like(logp)
    for i in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            lp, lq = float(logp[i, t]), float(old[i, t])
            p, q = math.exp(lp), math.exp(lq)
            positive = float(advantages[i, t]) > 0
            if config.objective == "dppo_tv":
                keep = p - q <= config.clip.eps_high if positive \
                    else p - q >= -config.clip.eps_low
            else:
                d = q * (lq - lp) + (1 - q) * math.log((1 - q + 1e-8) / (1 - p + 1e-8))
                keep = (d <= config.clip.eps_high or p <= q) if positive \
                    else (d <= config.clip.eps_low or p >= q)
            out[i, t] = 1.0 if keep else 0.0
    return out


def vespo_weights(log_ratio: Tensor, advantages: Tensor, mask: Tensor, rho: Tensor,
                  config: PolicyLossConfig) -> Tensor:
    """VESPO's gamma weight phi per token, ``[B, T]`` (detached)."""
    low, high = math.log(1e-8), 20.0
    valid = mask.bool()
    out = torch.zeros_like(log_ratio)
    sequence_level = config.rollout.mode in ("sequence_truncate", "sequence_mask")
    for i in range(log_ratio.shape[0]):
        columns = [t for t in range(log_ratio.shape[1]) if valid[i, t]]
        log_w = sum(float(log_ratio[i, t]) for t in columns)
        if config.rollout.mode is not None:

            def log_rho(t: int, row: int = i) -> float:
                r = float(rho[row, t])
                return min(max(math.log(r), low), high) if r > 0 else low

            log_w += log_rho(0) if sequence_level else sum(log_rho(t) for t in columns)
        log_w = min(max(log_w, low), high)
        for t in range(log_ratio.shape[1]):
            if float(advantages[i, t]) >= 0:
                k, lam = config.soft_clip.vespo_k_pos, config.soft_clip.vespo_lambda_pos
            else:
                k, lam = config.soft_clip.vespo_k_neg, config.soft_clip.vespo_lambda_neg
            lam = max(lam, 1e-4)
            try:
                phi = math.exp(lam + k * log_w - lam * math.exp(log_w))
            except OverflowError:
                phi = 0.0
            out[i, t] = phi if math.isfinite(phi) else 0.0
    return out


def covariance_selection(advantages: Tensor, logp: Tensor, mask: Tensor, eligible: Tensor,
                         config: PolicyLossConfig) -> Tensor:
    """1.0 on the tokens Clip-Cov / KL-Cov select, else 0.0, ``[B, T]``."""
    batch, steps = logp.shape
    valid = mask.bool()
    positions = [(i, t) for i in range(batch) for t in range(steps) if valid[i, t]]
    n = len(positions)
    mean_a = sum(float(advantages[p]) for p in positions) / n if n else 0.0
    mean_l = sum(float(logp[p]) for p in positions) / n if n else 0.0

    def cov(p: tuple[int, int]) -> float:
        return (float(advantages[p]) - mean_a) * (float(logp[p]) - mean_l)

    k = max(math.floor(n * config.cov.ratio), 1)
    if config.cov.mode == "clip_cov":
        priority = torch.rand((batch, steps), dtype=torch.float32, device=logp.device)
        pool = [p for p in positions
                if eligible[p] and config.cov.lower < cov(p) < config.cov.upper]
        ranked = sorted(pool, key=lambda p: (float(priority[p]), p))
    else:
        ranked = sorted(positions, key=lambda p: (-cov(p), p))
    out = torch.zeros_like(logp)
    for p in ranked[:k]:
        out[p] = 1.0
    return out
