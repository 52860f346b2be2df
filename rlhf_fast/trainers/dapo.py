"""DAPO (Yu et al. 2025): decoupled clip, dynamic sampling, token-level loss, overlong
reward shaping.

    J(theta) = E_{(q,a), {o_i} ~ pi_old} [ 1 / sum_i |o_i| * sum_i sum_t
                 min(r_it A_it, clip(r_it, 1 - eps_low, 1 + eps_high) A_it) ]
    s.t. 0 < |{o_i : is_equivalent(a, o_i)}| < G
    A_it = (R_i - mean(R)) / std(R)
    R_i  = rule reward + R_length(|o_i|)

Line by line in this trainer:

- eps_low = 0.2, eps_high = 0.28 (clip-higher) and 1 / sum_i |o_i| (token-level): the
  ``dapo`` preset (``token_mean`` over the whole mini-batch), no KL term;
- s.t. 0 < #correct < G (dynamic sampling): ``DAPOTrainer.collect`` keeps generating
  batches and keeps the groups whose ``filter_metric`` is not constant
  (``DynamicSampling``), until ``batch_size / group_size`` groups are collected or
  ``max_generation_batches`` batches were drawn (then it raises, as verl does);
- R_length (soft overlong punishment): ``shape_rewards`` adds ``overlong_penalty`` with
  L_max = ``max_new_tokens`` (the hard generation cap, as in the paper's Eq. 13) and
  L_cache = ``overlong_cache``;
- A_it: the GRPO estimator (group mean and std).

Deviations: verl's recipe also uses dual clip c = 10 (not in the paper's objective; set
``loss=PolicyLossConfig.preset("dapo", dual_clip_c=10.0)`` for it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..config import PolicyLossConfig
from ..reward_shaping import DynamicSampling, overlong_penalty
from .batch import RolloutBatch
from .grpo import GRPOConfig, GRPOTrainer


@dataclass(frozen=True)
class DAPOConfig(GRPOConfig):
    """DAPO: the ``dapo`` preset, dynamic sampling and the soft overlong penalty."""

    loss: PolicyLossConfig = field(default_factory=lambda: PolicyLossConfig.preset("dapo"))
    """Clip 0.2 / 0.28, token-level mean, no KL."""

    dynamic_sampling: bool = True
    """Drop groups whose ``filter_metric`` is the same for every completion."""

    filter_metric: str = "reward"
    """``reward`` (the summed reward) or the name of one reward function (DAPO: accuracy)."""

    max_generation_batches: int = 10
    """Generation batches allowed per step before dynamic sampling gives up."""

    overlong_cache: int | None = None
    """L_cache of the overlong penalty (None: a fifth of ``max_new_tokens``, DAPO's
    4096 / 20480); 0 turns the penalty off."""

    overlong_factor: float = 1.0
    """Scale of the overlong penalty."""

    @property
    def cache_length(self) -> int:
        if self.overlong_cache is not None:
            return self.overlong_cache
        return max(1, round(0.2 * self.max_new_tokens))


class DAPOTrainer(GRPOTrainer):
    """GRPO's advantage with DAPO's sampling and shaping."""

    config_class = DAPOConfig

    def shape_rewards(self, batch: RolloutBatch, rewards: Tensor) -> Tensor:
        # R_i += R_length(|o_i|): 0 up to L_max - L_cache, then linear to -1 at L_max.
        c = self.config
        if c.cache_length == 0:
            return rewards
        lengths = batch.completion_lengths.float()
        return rewards + overlong_penalty(lengths, c.max_new_tokens, c.cache_length,
                                          c.overlong_factor)

    def collect(self) -> RolloutBatch:
        # Keep sampling until batch_size / G groups with 0 < #correct < G are collected.
        c = self.config
        if not c.dynamic_sampling:
            return super().collect()
        if c.filter_metric != "reward" and c.filter_metric not in self.reward_functions:
            raise ValueError(f"filter_metric {c.filter_metric!r} is neither 'reward' nor a "
                             f"reward function ({sorted(self.reward_functions)})")
        sampler = DynamicSampling(c.prompts_per_step, c.group_size, c.max_generation_batches)
        kept = []
        while not sampler.full:
            batch = self.rollout(self.sample_prompts(c.prompts_per_step))
            self.score(batch)
            metric = (batch.rewards if c.filter_metric == "reward"
                      else batch.reward_terms[c.filter_metric])
            # The filter and the count of kept groups span every rank's groups (gather:
            # rank order, the single-process order); each rank keeps its own kept rows.
            metric = self.statistics.gather(metric)                           # [B_global]
            groups = sampler.add(metric)                                      # [kept groups]
            rows = (groups[:, None] * c.group_size + torch.arange(c.group_size)).flatten()
            keep = torch.zeros(metric.numel(), dtype=torch.bool)
            keep[rows] = True
            kept.append(batch.select(self.statistics.local(keep).nonzero().flatten()))
        self.sampling_stats = {"dapo/generation_batches": float(sampler.batches),
                               "dapo/dropped_groups": float(sampler.dropped)}
        return RolloutBatch.cat(kept)

    def batch_metrics(self, batch: RolloutBatch) -> dict[str, float]:
        return {**super().batch_metrics(batch), **getattr(self, "sampling_stats", {})}
