"""REINFORCE++ (Hu 2025), its group-baseline variant, and RLOO (Ahmadian et al. 2024): the
KL to the reference goes into the reward, not the loss.

    REINFORCE++:  r_t = -beta * KL_t  (+ R on the last token),  KL_t = log pi_old - log pi_ref
                  A_t = sum_{s >= t} gamma^(s-t) r_s,  then whitened over the whole batch
                  L   = token-mean of -min(r_t A_t, clip(r_t, 1 - eps, 1 + eps) A_t)
    baseline:     the same with R replaced by R - mean(R of its group)
    RLOO:         R'_i = R_i - beta * sum_t KL_it
                  A_i  = R'_i - 1/(G-1) sum_{j != i} R'_j     (leave-one-out baseline)
                  L    = mean over sequences of -A_i * sum_t log pi_theta(o_it)   (REINFORCE)

Line by line: ``kl_penalized_rewards`` places -beta * KL_t on every token and R on the
last one; ``reinforce_pp_advantages`` takes the returns and whitens them over the batch's
valid tokens (gathered through ``BatchStatistics``); ``rloo_advantages`` is the
leave-one-out baseline. beta comes from a KL controller (fixed, or Ziegler's proportional
controller with ``kl_target``), which is checkpointed. The loss is the ``ppo`` preset (clip
0.2, token mean); for RLOO its ``seq_mean_token_sum`` aggregation, which with one update per
rollout (ratio 1) is exactly REINFORCE on the sequence log-prob.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from ..advantages import group_advantages, reinforce_pp_advantages, rloo_advantages
from ..config import PolicyLossConfig
from ..kl_control import FixedKLController, ProportionalKLController, kl_penalized_rewards
from .batch import RolloutBatch
from .config import TrainerConfig
from .core import Trainer


@dataclass(frozen=True)
class ReinforceConfig(TrainerConfig):
    """REINFORCE++ / REINFORCE++-baseline / RLOO: KL in the reward, ``ppo`` loss."""

    loss: PolicyLossConfig = field(default_factory=lambda: PolicyLossConfig.preset("ppo"))
    """PPO clip 0.2, token mean, no KL term in the loss (it is in the reward)."""

    estimator: str = "reinforce_pp"
    """``reinforce_pp``, ``reinforce_pp_baseline`` or ``rloo``."""

    kl_coef: float = 0.01
    """beta: weight of the KL penalty in the reward (0: no reference model at all)."""

    kl_estimator: str = "k1"
    """Per-token KL estimator of the penalty (``k1``, ``k2``, ``k3``)."""

    kl_target: float | None = None
    """None: beta is fixed; else Ziegler's proportional controller steers the mean sequence
    KL towards this target."""

    kl_horizon: float = 10_000.0
    """Horizon of the proportional controller (in completions)."""

    gamma: float = 1.0
    """Discount of the returns (REINFORCE++)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.estimator not in ("reinforce_pp", "reinforce_pp_baseline", "rloo"):
            raise ValueError(f"estimator must be reinforce_pp, reinforce_pp_baseline or "
                             f"rloo, got {self.estimator!r}")
        if self.kl_estimator not in ("k1", "k2", "k3"):
            raise ValueError(f"kl_estimator must be k1, k2 or k3, got {self.kl_estimator!r}")


class ReinforceTrainer(Trainer):
    """Advantages from rewards with the KL folded in; the controller's beta is state."""

    config_class = ReinforceConfig

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        c = self.config
        self.kl_controller = (FixedKLController(c.kl_coef) if c.kl_target is None else
                              ProportionalKLController(c.kl_coef, c.kl_target, c.kl_horizon))

    @property
    def needs_reference(self) -> bool:
        return self.config.kl_coef != 0 or super().needs_reference

    @property
    def needs_old_logprobs(self) -> bool:
        return self.config.kl_coef != 0 or super().needs_old_logprobs

    def compute_advantages(self, batch: RolloutBatch) -> None:
        c, stats = self.config, self.statistics
        mask = batch.loss_mask
        beta = self.kl_controller.value
        if batch.ref_logprobs is not None:
            old, ref = batch.old_logprobs, batch.ref_logprobs
        else:
            old = ref = torch.zeros(mask.shape)
        if c.estimator == "rloo":
            # R'_i = R_i - beta * sum_t KL_t;  A_i = R'_i - mean_{j != i} R'_j
            _, kl = kl_penalized_rewards(batch.rewards, old, ref, mask, beta,
                                         estimator=c.kl_estimator)
            scores = batch.rewards - beta * kl.sum(-1)                       # [B]
            advantages = rloo_advantages(stats.gather(scores), batch.group_size)
        else:
            scores = batch.rewards                                           # [B]
            if c.estimator == "reinforce_pp_baseline":
                # R_i - mean(R of its group)
                scores = stats.local(group_advantages(stats.gather(scores), batch.group_size,
                                                      scale="none"))
            # r_t = -beta KL_t (+ R on the last token); A_t = whiten(sum_{s >= t} r_s)
            token_rewards, kl = kl_penalized_rewards(scores, old, ref, mask, beta,
                                                     estimator=c.kl_estimator)  # [B, T]
            advantages = reinforce_pp_advantages(stats.gather(token_rewards),
                                                 stats.gather(mask), c.gamma)
        self.last_kl = stats.mean(kl.sum(-1))                  # mean sequence KL
        batch.advantages = stats.local(advantages)

    def after_step(self, batch: RolloutBatch, metrics: dict) -> dict[str, float]:
        beta = self.kl_controller.value
        self.kl_controller.update(self.last_kl, batch.size)
        return {"reinforce/kl_coef": beta, "reinforce/sequence_kl": self.last_kl}

    def extra_state(self) -> dict:
        return {"kl_controller": asdict(self.kl_controller)}

    def load_extra_state(self, state: dict) -> None:
        for key, value in state.get("kl_controller", {}).items():
            setattr(self.kl_controller, key, value)
