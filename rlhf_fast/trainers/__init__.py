"""Thin trainers for the critic-free policy-gradient family, on any Hugging Face causal LM.

Each step is rollout -> score -> advantages -> update (``core.py``); the loss is
``linear_policy_loss`` on the backbone's final hidden states and ``lm_head.weight``, so the
``[tokens, vocab]`` logits never exist. One short file per algorithm family, each mapping its
paper's objective to code line by line:

- ``grpo.py``: GRPO, BNPO, Dr. GRPO;
- ``dapo.py``: DAPO (clip-higher, dynamic sampling, token-level loss, overlong penalty);
- ``gspo.py``: GSPO, GSPO-token, GMPO (sequence-level ratios);
- ``cispo.py``: CISPO, SAPO (bounded importance weights);
- ``reinforce.py``: REINFORCE++, REINFORCE++-baseline, RLOO (KL in the reward);
- ``ppo.py`` (+ ``critic.py``): PPO with a critic (four models), PPO-penalty, TRPO-style;
- ``dpo.py`` (+ ``pairs.py``): DPO and the preference losses, offline or online.
- ``agentic.py``: ARPO, AEPO (multi-turn rollouts with tools, entropy-guided rollout trees).

``registry.ALGORITHMS`` and ``registry.AGENTIC_ALGORITHMS`` name them all (``rlhf-fast train
ALGO``).

Where later trainers plug in (documented in each module):

- generation: ``generation.Generator`` (``generate(prefixes, sampling) -> [Completion]``),
  ``HFGenerator`` by default; a multi-turn rollout overrides ``Trainer.rollout`` and builds
  rows with ``RolloutBatch.from_trajectories`` (``Segment(trainable=False)`` for tool
  output: attention 1, loss mask 0);
- the batch: ``batch.RolloutBatch`` (``input_ids``, ``attention_mask``, ``loss_mask``,
  ``sampler_logprobs``, ``finished``, ``rewards``, ``reward_terms``, ``old_logprobs``,
  ``ref_logprobs``, ``advantages``, ``columns``);
- statistics: ``statistics.BatchStatistics`` (``all_reduce_sum``, ``all_reduce_max``,
  ``gather``, ``local``, ``world_scale``): every normaliser, gathered advantage input and
  logged mean; a DDP / FSDP2 subclass all-reduces;
- the loss: ``Trainer.loss_config_for`` (global normaliser) and ``Trainer.backward`` (the
  micro-batch loop), where a critic adds its value loss;
- checkpoints: ``Trainer.save`` / ``load`` with ``extra_state`` / ``load_extra_state``;
- metrics: the keys listed in ``metrics.py``.
"""

from .agentic import AEPOConfig, AEPOTrainer, ARPOConfig, ARPOTrainer
from .batch import RolloutBatch, Segment, Trajectory
from .cispo import CISPOConfig, CISPOTrainer
from .config import TrainerConfig
from .core import Trainer
from .critic import Critic
from .dapo import DAPOConfig, DAPOTrainer
from .dpo import DPOConfig, DPOTrainer
from .generation import Completion, Generator, HFGenerator, SamplingParams
from .grpo import GRPOConfig, GRPOTrainer
from .gspo import GSPOConfig, GSPOTrainer
from .pairs import PairBatch, arithmetic_pairs, load_pairs
from .policy import Policy, ReferencePolicy
from .ppo import PPOConfig, PPOTrainer
from .registry import AGENTIC_ALGORITHMS, ALGORITHMS, make_config, make_trainer
from .reinforce import ReinforceConfig, ReinforceTrainer
from .rewards import RewardModel
from .statistics import BatchStatistics

__all__ = [
    "AGENTIC_ALGORITHMS", "ALGORITHMS", "AEPOConfig", "AEPOTrainer", "ARPOConfig",
    "ARPOTrainer", "BatchStatistics", "CISPOConfig", "CISPOTrainer", "Completion", "Critic",
    "DAPOConfig", "DAPOTrainer", "DPOConfig", "DPOTrainer", "GRPOConfig", "GRPOTrainer",
    "GSPOConfig", "GSPOTrainer", "Generator", "HFGenerator", "PPOConfig", "PPOTrainer",
    "PairBatch", "Policy", "ReferencePolicy", "ReinforceConfig", "ReinforceTrainer",
    "RewardModel", "RolloutBatch", "SamplingParams", "Segment", "Trainer", "TrainerConfig",
    "Trajectory", "arithmetic_pairs", "load_pairs", "make_config", "make_trainer",
]
