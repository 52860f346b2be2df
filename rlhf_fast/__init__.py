"""rlhf_fast: fused Triton kernels for the loss side of LLM reinforcement learning.

Public API (see docs/architecture.md, Public API):

- ``token_logprobs(logits, targets, *, temperature, return_entropy, ignore_index)``:
  log-prob of each target and the entropy of each row, in one read of the logits.
- ``policy_loss(logits, targets, advantages, mask, *, old_logprobs, ref_logprobs,
  rollout_logprobs, config="grpo", inplace=False, **overrides)``: PPO, GRPO, Dr. GRPO,
  DAPO, GSPO, CISPO, SAPO, GMPO, AEPO, PPO-penalty, ... with the gradient written in the
  forward pass; ``PolicyLossConfig`` and its presets choose the loss.
- ``linear_token_logprobs`` / ``linear_policy_loss``: the same from hidden states and the
  ``lm_head`` weight, chunk by chunk, never holding the ``[tokens, vocab]`` logits.
- ``dpo_loss(logits, targets, mask, *, ref_logprobs, beta, loss_type, ...)``: DPO, IPO,
  SimPO, ORPO and the other preference losses over ``[chosen; rejected]`` logits;
  ``linear_dpo_loss`` from hidden states and the ``lm_head`` weight.
- ``rlhf_fast.reference``: the plain-PyTorch ground truth of every op (autograd, float64).

The pieces around the loss are submodules, imported on first use (``import rlhf_fast`` stays
as cheap as the ops alone): ``rlhf_fast.advantages``, ``rlhf_fast.gae``, ``rlhf_fast.value``,
``rlhf_fast.kl_control``, ``rlhf_fast.entropy_control``, ``rlhf_fast.reward_shaping``,
``rlhf_fast.packing`` (``cu_seqlens`` from ``position_ids`` / sequence ids),
``rlhf_fast.rollout_correction`` and ``rlhf_fast.reference``.
"""

import importlib

from .config import PRESETS, PolicyLossConfig
from .ops.dpo import PreferenceLossOutput, dpo_loss
from .ops.linear import linear_policy_loss, linear_token_logprobs
from .ops.linear_dpo import linear_dpo_loss
from .ops.policy_loss import PolicyLossOutput, policy_loss
from .ops.token_logprobs import token_logprobs
from .policy_config_parts import (
    AggregationConfig,
    ClipConfig,
    CovSelectionConfig,
    EntropyConfig,
    KLConfig,
    RatioConfig,
    RolloutCorrectionConfig,
    SoftClipConfig,
)

__version__ = "0.1.0"

LAZY_SUBMODULES = ("advantages", "entropy_control", "gae", "kl_control", "packing", "reference",
                   "reward_shaping", "rollout_correction", "value")
"""Submodules reachable as attributes of ``rlhf_fast`` without importing them up front."""


def __getattr__(name: str) -> object:
    # PEP 562: ``rlhf_fast.gae.gae(...)`` works after a bare ``import rlhf_fast``.
    if name in LAZY_SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *LAZY_SUBMODULES})


__all__ = [
    "PRESETS",
    "AggregationConfig",
    "ClipConfig",
    "CovSelectionConfig",
    "EntropyConfig",
    "KLConfig",
    "PolicyLossConfig",
    "PolicyLossOutput",
    "PreferenceLossOutput",
    "RatioConfig",
    "RolloutCorrectionConfig",
    "SoftClipConfig",
    "__version__",
    "dpo_loss",
    "linear_dpo_loss",
    "linear_policy_loss",
    "linear_token_logprobs",
    "policy_loss",
    "token_logprobs",
]
