"""Reference rollout correction: importance weights against the inference engine, the
off-policy sequence mask and rejection sampling.

From ``PolicyLossConfig.rollout.mode``: the sampler (vLLM, SGLang) drew the tokens with
log-probs ``rollout``; the trainer's policy that the PPO ratio is taken against has ``old``
(the current log-probs when on-policy). The weight corrects the sampler towards the trainer,
so its log is ``old - rollout`` (each token's log-ratio clamped to +-log_ratio_clamp). With
the band [F, C] = [rollout_floor (0 when None), rollout_cap]:

    token_truncate      w_t = min(max(exp(old_t - rollout_t), F), C)
    token_mask          w_t = exp(old_t - rollout_t) if F <= it <= C, else 0
    sequence_truncate   w_i = min(max(exp(sum_t m_t (old_t - rollout_t)), F), C)  on every token
    sequence_mask       w_i = exp(sum_t m_t (old_t - rollout_t)) if F <= it <= C, else 0
    sequence_gate       w_t = exp(old_t - rollout_t) if F <= exp(mean_t m_t (old_t - rollout_t))
                        <= C, else 0 (the gate is the sequence's geometric mean)

``rollout_normalize`` then divides every weight by the mean weight (over valid tokens; over
non-empty sequences, one weight each, for the two sequence_* modes) when that mean is above
1e-8. Detached: the weights multiply the policy term only.

Off-policy sequence mask (``off_policy_mask_threshold`` = d): a token with A < 0 is dropped
when the mean over its sequence's valid tokens of (behaviour - logp) is above d.

Rejection sampling (verl's ``rollout_rs``): divergences of the trainer from the sampler per
token, from log rho = old - rollout clamped to +-20: k1 = -log rho, k2 = (log rho)^2 / 2,
k3 = rho - 1 - log rho; a rule compares a token's value, or its sequence's sum, mean or max
over valid tokens, with its bounds; the mask keeps what passes every rule.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..config import PolicyLossConfig


def rollout_weights(old: Tensor, rollout: Tensor | None, mask: Tensor,
                    config: PolicyLossConfig) -> Tensor:
    """``[B, T]`` weights (all ones without correction), in ``old``'s dtype, detached."""
    mode = config.rollout.mode
    if mode is None or rollout is None:
        return torch.ones_like(old)
    log_w = old.detach() - rollout.detach().to(old.dtype)
    if config.ratio.log_clamp is not None:
        log_w = torch.clamp(log_w, min=-config.ratio.log_clamp, max=config.ratio.log_clamp)
    floor = config.rollout.floor if config.rollout.floor is not None else 0.0
    cap = config.rollout.cap
    valid = mask.bool()
    out = torch.zeros_like(old)
    sequence_weights = []
    for i in range(old.shape[0]):
        logs = [float(log_w[i, t]) for t in range(old.shape[1]) if valid[i, t]]
        for t in range(old.shape[1]):
            token = math.exp(float(log_w[i, t]))
            if mode == "token_truncate":
                out[i, t] = min(max(token, floor), cap)
            elif mode == "token_mask":
                out[i, t] = token if floor <= token <= cap else 0.0
            elif mode == "sequence_gate":
                gate = math.exp(sum(logs) / len(logs)) if logs else 1.0
                out[i, t] = token if floor <= gate <= cap else 0.0
            else:
                product = math.exp(sum(logs))
                if mode == "sequence_truncate":
                    out[i, t] = min(max(product, floor), cap)
                else:
                    out[i, t] = product if floor <= product <= cap else 0.0
        if logs:
            sequence_weights.append(float(out[i, 0]))
    if config.rollout.normalize:
        if mode in ("sequence_truncate", "sequence_mask"):
            picked = sequence_weights
        else:
            picked = [float(out[i, t]) for i in range(old.shape[0])
                      for t in range(old.shape[1]) if valid[i, t]]
        mean = sum(picked) / len(picked) if picked else 0.0
        if mean > 1e-8:
            out = out / mean
    return out


def off_policy_mask(advantages: Tensor, logp: Tensor, behaviour: Tensor, mask: Tensor,
                    threshold: float | None) -> Tensor:
    """1.0 where a token's policy term counts, 0.0 where the off-policy sequence mask drops
    it (A < 0 in a sequence whose mean of behaviour - logp exceeds the threshold)."""
    out = torch.ones_like(logp)
    if threshold is None:
        return out
    valid = mask.bool()
    for i in range(logp.shape[0]):
        gaps = [float(behaviour[i, t]) - float(logp[i, t]) for t in range(logp.shape[1])
                if valid[i, t]]
        mean = sum(gaps) / len(gaps) if gaps else 0.0
        for t in range(logp.shape[1]):
            if float(advantages[i, t]) < 0 and mean > threshold:
                out[i, t] = 0.0
    return out


def rejection_mask(old: Tensor, rollout: Tensor, mask: Tensor,
                   rules: list[tuple[str, str, float | None, float | None]]) -> Tensor:
    """Bool ``[B, T]``: ``mask`` with the tokens (or sequences) that fail a rule removed.
    A rule is (level, estimator, lower, upper) with level token / seq_sum / seq_mean /
    seq_max, estimator k1 / k2 / k3 and inclusive bounds (None: unbounded); k1's bounds
    are on the ratio, compared in log space (log lower <= k1 <= log upper)."""
    keep = mask.bool().clone()
    valid = mask.bool()
    for i in range(old.shape[0]):
        values = {}
        for t in range(old.shape[1]):
            log_rho = min(max(float(old[i, t]) - float(rollout[i, t]), -20.0), 20.0)
            values[t] = {"k1": -log_rho, "k2": log_rho * log_rho / 2,
                         "k3": math.exp(log_rho) - 1 - log_rho}
        for level, name, lower, upper in rules:
            if name == "k1":
                lower = math.log(lower) if lower is not None else None
                upper = math.log(upper) if upper is not None else None
            picked = [values[t][name] for t in range(old.shape[1]) if valid[i, t]]
            if level == "seq_sum":
                stat = sum(picked)
            elif level == "seq_mean":
                stat = sum(picked) / len(picked) if picked else 0.0
            elif level == "seq_max":
                stat = max(picked) if picked else 0.0
            for t in range(old.shape[1]):
                value = values[t][name] if level == "token" else stat
                if (lower is not None and value < lower) or (upper is not None
                                                              and value > upper):
                    keep[i, t] = False
    return keep
