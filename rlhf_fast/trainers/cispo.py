"""CISPO (MiniMax-M1, 2025) and SAPO (soft adaptive policy optimisation): keep a gradient on
every token, and bound the importance weight instead of dropping clipped tokens.

    CISPO: J = E [ 1 / sum_i |o_i| * sum_i sum_t sg(clip(r_it, 1 - eps_low, 1 + eps_high))
                   * A_it * log pi_theta(o_it) ]          (no lower bound by default)
    SAPO:  J = E [ 1/G sum_i 1/|o_i| sum_t (4 / tau) sigmoid(tau (r_it - 1)) A_it ]
           tau = tau_pos (1.0) when A > 0, tau_neg (1.05) otherwise
    A_i = (R_i - mean(R)) / std(R)

Line by line: the stop-gradient clipped weight and the token-level mean are the ``cispo``
preset (upper bound 0.28, Trinity-RFT's default; MiniMax does not publish theirs); SAPO's
soft gate is the ``sapo`` preset; ``linear_policy_loss`` computes both from the hidden
states. A_i is GRPO's estimator. The logged ``policy/loss`` of CISPO is the surrogate whose
gradient is the objective's, not a comparable objective value.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import PolicyLossConfig
from .grpo import GRPOConfig, GRPOTrainer


@dataclass(frozen=True)
class CISPOConfig(GRPOConfig):
    """CISPO: the ``cispo`` preset (``sapo`` through ``loss``)."""

    loss: PolicyLossConfig = field(default_factory=lambda: PolicyLossConfig.preset("cispo"))
    """Clipped IS weight as a constant, upper bound 0.28, no lower bound, token mean."""


class CISPOTrainer(GRPOTrainer):
    """The weight clipping lives in the loss; the rest is GRPO."""

    config_class = CISPOConfig
