"""rlhf_fast: fused Triton kernels for the loss side of LLM reinforcement learning.

Public API (see DESIGN.md section 2):

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
"""

from .config import PRESETS, PolicyLossConfig
from .ops.dpo import PreferenceLossOutput, dpo_loss
from .ops.linear import linear_policy_loss, linear_token_logprobs
from .ops.linear_dpo import linear_dpo_loss
from .ops.policy_loss import PolicyLossOutput, policy_loss
from .ops.token_logprobs import token_logprobs

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "PolicyLossConfig",
    "PolicyLossOutput",
    "PreferenceLossOutput",
    "__version__",
    "dpo_loss",
    "linear_dpo_loss",
    "linear_policy_loss",
    "linear_token_logprobs",
    "policy_loss",
    "token_logprobs",
]
