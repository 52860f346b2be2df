"""GSPO (Zheng et al. 2025, Group Sequence Policy Optimization), GSPO-token, and GMPO
(Zhao et al. 2025, geometric-mean policy optimisation): the importance ratio of a whole
sequence instead of each token.

    GSPO:  J = E [ 1/G sum_i min(s_i A_i, clip(s_i, 1 - eps_l, 1 + eps_h) A_i) ]
           s_i = (pi_theta(o_i|q) / pi_old(o_i|q)) ^ (1/|o_i|)
               = exp( 1/|o_i| sum_t log(pi_theta(o_it) / pi_old(o_it)) )
    GSPO-token: s_it = sg[s_i] * pi_theta(o_it) / sg[pi_theta(o_it)]  (token advantages
           allowed; equal to GSPO in value and gradient when A is per sequence)
    GMPO:  J = E [ 1/G sum_i A_i * exp( 1/|o_i| sum_t clip_log(log r_it) ) ]
           (the token log-ratio clipped in log space, to [-0.4, 0.4], on the pessimistic side)
    A_i = (R_i - mean(R)) / std(R)

Line by line: s_i, its clip (eps 3e-4 / 4e-4) and the per-sequence mean are the ``gspo`` /
``gspo_token`` presets; GMPO's objective is the ``gmpo`` preset; ``linear_policy_loss`` cuts
the batch into whole sequences, so each s_i completes inside a chunk. A_i is GRPO's
estimator. With one optimiser step per rollout the ratio is 1 and clipping never binds; the
sequence ratio matters with ``epochs > 1`` or several mini-batches (the paper: 4 mini-batch
steps per rollout), where old log-probs are computed first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import PolicyLossConfig
from .grpo import GRPOConfig, GRPOTrainer


@dataclass(frozen=True)
class GSPOConfig(GRPOConfig):
    """GSPO: the ``gspo`` preset (``gspo_token`` and ``gmpo`` through ``loss``)."""

    loss: PolicyLossConfig = field(default_factory=lambda: PolicyLossConfig.preset("gspo"))
    """Sequence ratio, clip 3e-4 / 4e-4, per-sequence token mean, no KL."""


class GSPOTrainer(GRPOTrainer):
    """The sequence-level ratio lives in the loss; the rest is GRPO."""

    config_class = GSPOConfig
