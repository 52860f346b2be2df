"""Reference rollout correction: truncated importance weights against the inference engine.

From ``PolicyLossConfig.rollout_correction``: the sampler (vLLM, SGLang) drew the tokens with
log-probs ``rollout``; the trainer's policy that the PPO ratio is taken against has ``old``
(the current log-probs when on-policy). The weight corrects the sampler towards the trainer,
so its log is ``old - rollout`` (each token's log-ratio clamped to +-log_ratio_clamp):

    token_truncate      w_t = min(exp(old_t - rollout_t), C)
    token_mask          w_t = exp(old_t - rollout_t) if it is <= C, else 0
    sequence_truncate   w_i = min(exp(sum_t m_t (old_t - rollout_t)), C)  on every token of i
    sequence_mask       w_i = exp(sum_t m_t (old_t - rollout_t)) if it is <= C, else 0

Detached: it multiplies the policy term only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import PolicyLossConfig


def rollout_weights(old: Tensor, rollout: Tensor | None, mask: Tensor,
                    config: PolicyLossConfig) -> Tensor:
    """``[B, T]`` weights (all ones without correction), in ``old``'s dtype, detached."""
    if config.rollout_correction is None or rollout is None:
        return torch.ones_like(old)
    log_w = old.detach() - rollout.detach().to(old.dtype)
    if config.log_ratio_clamp is not None:
        log_w = torch.clamp(log_w, min=-config.log_ratio_clamp, max=config.log_ratio_clamp)
    level, rule = config.rollout_correction.split("_")
    if level == "sequence":
        per_sequence = torch.where(mask.bool(), log_w, torch.zeros_like(log_w)).sum(dim=1)
        log_w = per_sequence[:, None].expand_as(old)
    w = torch.exp(log_w)
    cap = torch.tensor(config.rollout_cap, dtype=w.dtype)
    if rule == "truncate":
        return torch.minimum(w, cap)
    return torch.where(w <= cap, w, torch.zeros_like(w))
