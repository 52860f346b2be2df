"""KL coefficient controllers and KL-in-reward shaping.

Controllers hold ``value`` (the current beta) and change it with ``update(kl, n_steps)`` once
per iteration, on the host:

- ``FixedKLController``: beta never changes;
- ``AdaptiveKLController`` (PPO-penalty, Schulman et al. 2017): halve beta when the
  measured KL < target / 1.5, double it when KL > 1.5 * target;
- ``ProportionalKLController`` (Ziegler et al. 2019; verl / OpenRLHF "adaptive"):
  ``beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class FixedKLController:
    value: float

    def update(self, kl: float, n_steps: int = 1) -> float:
        return self.value


@dataclass
class AdaptiveKLController:
    value: float
    target: float

    def update(self, kl: float, n_steps: int = 1) -> float:
        if kl < self.target / 1.5:
            self.value /= 2.0
        elif kl > self.target * 1.5:
            self.value *= 2.0
        return self.value


@dataclass
class ProportionalKLController:
    value: float
    target: float
    horizon: float = 10_000.0

    def update(self, kl: float, n_steps: int = 1) -> float:
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


def token_kl(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token KL(pi || ref) from samples of pi: k1 = logp - ref; k3 = x - 1 - log x with
    log x = ref - logp (docs/architecture.md, KL conventions: kl_reference="ref")."""
    log_x = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_x
    if estimator == "k2":
        return 0.5 * log_x * log_x
    if estimator == "k3":
        return torch.exp(log_x) - 1.0 - log_x
    raise ValueError(f"estimator must be 'k1', 'k2' or 'k3', got {estimator!r}")


def kl_penalized_rewards(scores: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor,
                         beta: float, *, estimator: str = "k1") -> tuple[Tensor, Tensor]:
    """Token rewards ``-beta * kl_t`` on valid tokens, plus each sequence's score on its last
    valid token (KL in the reward, the PPO-RLHF recipe). scores ``[B]``; logprobs (the
    sampling policy's), ref_logprobs, mask ``[B, T]``. Returns (rewards, kl), ``[B, T]`` each,
    0 at masked positions; a sequence with no valid token drops its score."""
    m = mask.to(torch.float32)
    kl = token_kl(logprobs.float(), ref_logprobs.float(), estimator) * m
    rewards = -beta * kl
    positions = torch.arange(m.shape[1], device=m.device).expand_as(m)
    last = torch.where(m > 0, positions, -1).amax(-1)
    has_token = last >= 0
    rows = torch.arange(m.shape[0], device=m.device)[has_token]
    rewards[rows, last[has_token]] += scores.float()[has_token]
    return rewards, kl
