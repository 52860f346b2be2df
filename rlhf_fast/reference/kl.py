"""Reference KL estimators, KL-in-reward shaping and KL coefficient controllers.

Schulman's estimators of KL(q || p) from a sample y of q, with log x = log p(y) - log q(y):

    k1 = -log x          k2 = (log x)^2 / 2          k3 = x - 1 - log x          abs = |log x|

``kl_reference="ref"`` (GRPO): q = pi (the policy), p = ref, so log x = ref - logp;
``kl_reference="old"`` (PPO-penalty): q = pi_old, p = pi, so log x = logp - old.
With ``kl_clamp`` (verl's low-variance KL) log x is first clamped to +-log_ratio_clamp and
the estimate to +-kl_clamp; without it nothing is clamped.

``kl_gradient`` keeps the estimate's value and swaps its gradient (straight-through,
``g - sg(g) + sg(k)``): ``k2`` takes g = (log x)^2 / 2 of the unclamped log x (verl's "k3+");
``k2_weighted`` takes g = sg(min(exp(logp - old), 10)) * (log x)^2 / 2 (OpenRLHF's
unbiased-gradient KL).

Controllers (one update per iteration, on the host):
    adaptive (PPO paper):  beta / 2 if KL < target / 1.5;  beta * 2 if KL > 1.5 target
    proportional (Ziegler et al.): beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon)
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import PolicyLossConfig


def estimator(log_x: Tensor, name: str) -> Tensor:
    """k1 / k2 / k3 of ``log x`` (differentiable)."""
    if name == "k1":
        return -log_x
    if name == "k2":
        return log_x**2 / 2
    if name == "k3":
        return torch.exp(log_x) - 1 - log_x
    if name == "abs":
        return torch.abs(log_x)
    raise ValueError(f"unknown KL estimator {name!r}")


def kl_estimate(logp: Tensor, old: Tensor, ref: Tensor | None,
                config: PolicyLossConfig) -> Tensor | None:
    """Per-token KL term of a policy loss (differentiable in ``logp``), or None when
    ``kl_reference="ref"`` and no reference log-probs are given."""
    if config.kl.reference == "ref":
        if ref is None:
            return None
        log_x = ref - logp
    else:
        log_x = logp - old
    if config.kl.clamp is None:
        value = estimator(log_x, config.kl.estimator)
    else:
        clamped = log_x
        if config.ratio.log_clamp is not None:
            clamped = torch.clamp(log_x, -config.ratio.log_clamp, config.ratio.log_clamp)
        value = torch.clamp(estimator(clamped, config.kl.estimator), -config.kl.clamp,
                            config.kl.clamp)
    if config.kl.gradient == "estimator":
        return value
    surrogate = log_x**2 / 2
    if config.kl.gradient == "k2_weighted":
        weight = torch.clamp(torch.exp(logp.detach() - old.detach()), max=10.0)
        surrogate = weight * surrogate
    return surrogate - surrogate.detach() + value.detach()


def token_kl(logprobs: Tensor, ref_logprobs: Tensor, name: str = "k1") -> Tensor:
    """Per-token KL(pi || ref) sampled from pi (log x = ref - logp), unclamped."""
    return estimator(ref_logprobs - logprobs, name)


def kl_penalized_rewards(scores: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor,
                         beta: float, name: str = "k1") -> tuple[Tensor, Tensor]:
    """Token rewards ``-beta * kl_t`` on valid tokens plus each sequence's score on its last
    valid token (a sequence without one drops its score); (rewards, kl), 0 where masked."""
    kl = torch.where(mask.bool(), token_kl(logprobs.double(), ref_logprobs.double(), name), 0.0)
    rewards = -beta * kl
    for i in range(mask.shape[0]):
        valid = [t for t in range(mask.shape[1]) if mask[i, t]]
        if valid:
            rewards[i, valid[-1]] += float(scores[i])
    return rewards, kl


def adaptive_kl_update(beta: float, kl: float, target: float) -> float:
    """The PPO paper's adaptive penalty: halve, double or keep beta."""
    if kl < target / 1.5:
        return beta / 2
    if kl > target * 1.5:
        return beta * 2
    return beta


def proportional_kl_update(beta: float, kl: float, target: float, n_steps: int,
                           horizon: float) -> float:
    """Ziegler et al.'s proportional controller."""
    error = kl / target - 1
    error = max(-0.2, min(0.2, error))
    return beta * (1 + error * n_steps / horizon)
