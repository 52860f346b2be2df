"""GRPO (Shao et al. 2024, DeepSeekMath), with BNPO and Dr. GRPO (Liu et al. 2025) as presets.

    J(theta) = E_q E_{o_1..o_G ~ pi_old(.|q)} [ 1/G sum_i 1/|o_i| sum_t
                 min(r_it A_i, clip(r_it, 1 - eps, 1 + eps) A_i) - beta D_KL[pi_theta || pi_ref] ]
    r_it = pi_theta(o_it | q, o_i<t) / pi_old(o_it | q, o_i<t)
    A_i  = (R_i - mean(R_1..R_G)) / std(R_1..R_G)                       (outcome supervision)
    D_KL = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1                    (k3, per token)

Line by line in this trainer:

- o_1..o_G ~ pi_old:   ``Trainer.rollout`` samples ``group_size`` completions per prompt;
- R_i:                 ``Trainer.score`` (the reward functions, summed with weights);
- A_i:                 ``GRPOTrainer.compute_advantages`` -> ``group_advantages`` (Bessel std,
                       eps 1e-6, as verl); ``scale_rewards="none"`` drops the std (Dr. GRPO);
- min(r A, clip(r) A), 1/|o_i|, 1/G, beta k3: the ``grpo`` preset of ``PolicyLossConfig``
                       (clip 0.2, ``seq_mean_token_mean``, ``kl_coef`` 0.04, k3 to ``ref``),
                       computed by ``linear_policy_loss`` from the hidden states;
- pi_ref:              a frozen copy of the starting model (built only when beta != 0).

Variants (registry names): ``bnpo`` normalises by the batch's token count instead of per
sequence (``token_mean``, no KL); ``dr_grpo`` (Dr. GRPO) takes ``A_i = R_i - mean(R)``, sums
tokens and divides by the constant ``B * max_new_tokens``, no KL.

Deviations from the paper: one policy update per rollout by default (``epochs=1``,
``mini_batch_size=batch_size``), as DeepSeekMath's mu = 1, so the ratio is 1 in value and
``pi_old`` is the current policy; the KL term's samples come from pi_old without an
importance weight (as every implementation does).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..advantages import group_advantages
from ..config import PolicyLossConfig
from .batch import RolloutBatch
from .config import TrainerConfig
from .core import Trainer


@dataclass(frozen=True)
class GRPOConfig(TrainerConfig):
    """GRPO: the ``grpo`` loss preset and group-normalised advantages."""

    loss: PolicyLossConfig = field(default_factory=lambda: PolicyLossConfig.preset("grpo"))
    """Clip 0.2, per-sequence token mean, k3 KL to the reference with beta 0.04."""

    scale_rewards: str = "group"
    """``group``: divide by the group's std (GRPO); ``batch``: by the batch's std;
    ``none``: no division (Dr. GRPO)."""

    advantage_eps: float = 1e-6
    """Added to the std (verl's 1e-6)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scale_rewards not in ("group", "batch", "none"):
            raise ValueError(f"scale_rewards must be group, batch or none, got "
                             f"{self.scale_rewards!r}")


class GRPOTrainer(Trainer):
    """GRPO and its presets: only the advantage is algorithm-specific."""

    config_class = GRPOConfig

    def compute_advantages(self, batch: RolloutBatch) -> None:
        # A_i = (R_i - mean_g R) / (std_g R + eps), over the whole (global) batch's groups.
        rewards = self.statistics.gather(batch.rewards)                       # [B_global]
        advantages = group_advantages(rewards, batch.group_size,
                                      scale=self.config.scale_rewards,
                                      eps=self.config.advantage_eps)
        batch.advantages = self.statistics.local(advantages)                  # [B]
