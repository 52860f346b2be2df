"""The policy loss of one micro-batch: fused (``linear_policy_loss`` on hidden states and
``lm_head.weight``, the ``[tokens, vocab]`` logits never exist) or reference (the plain
autograd formulas of ``rlhf_fast.reference`` on materialised float32 logits).

Both take the same ``PolicyLossConfig`` with its ``normalizer`` set to the mini-batch's
global count, so summing the micro-batch losses gives the mini-batch loss exactly and their
gradients add up to the big-batch gradient. ``--loss reference`` exists to check the fused
path (tests compare loss and gradients) and to measure what it saves (the ``train`` bench).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from ..config import PolicyLossConfig
from ..ops.linear import linear_policy_loss, linear_token_logprobs
from ..ops.policy_loss import PolicyLossOutput
from .batch import RolloutBatch

LOSS_MODES = ("fused", "reference")


def micro_batch_loss(policy, batch: RolloutBatch, config: PolicyLossConfig, *,
                     mode: str = "fused", backend: str = "auto",
                     hidden: Tensor | None = None) -> PolicyLossOutput:
    """Loss (differentiable w.r.t. the policy's parameters), per-token log-probs and entropy
    ``[b, T]`` and metrics of one micro-batch. ``hidden``: the policy's
    ``completion_hidden(batch)`` when the caller already ran the backbone (a critic head on
    the shared backbone reads the same states)."""
    device = policy.weight.device
    if hidden is None:
        hidden = policy.completion_hidden(batch)                           # [b, T, H]
    targets = batch.targets.to(device)                                     # [b, T]
    mask = batch.loss_mask.to(device)                                      # [b, T]
    advantages = batch.advantages.to(device)                               # [b] or [b, T]

    def per_token(x: Tensor | None) -> Tensor | None:
        return x.to(device) if x is not None else None

    old, ref = per_token(batch.old_logprobs), per_token(batch.ref_logprobs)
    rollout = per_token(batch.sampler_logprobs) if config.rollout.mode else None
    if mode == "fused":
        return linear_policy_loss(hidden, policy.weight, targets, advantages, mask,
                                  bias=policy.bias, old_logprobs=old, ref_logprobs=ref,
                                  rollout_logprobs=rollout, config=config, backend=backend)
    if mode != "reference":
        raise ValueError(f"loss must be one of {LOSS_MODES}, got {mode!r}")
    logits = torch.nn.functional.linear(hidden, policy.weight, policy.bias)  # [b, T, V]
    loss, logp, entropy, metrics = reference.policy_loss(
        logits.float(), targets, advantages, mask, old_logprobs=old, ref_logprobs=ref,
        rollout_logprobs=rollout, config=config)
    return PolicyLossOutput(loss, logp, entropy, metrics)


@torch.no_grad()
def sequence_logprobs(model, batch: RolloutBatch, temperature: float, *, mode: str = "fused",
                      backend: str = "auto", hidden: Tensor | None = None) -> Tensor:
    """``[b, T]`` float32 log-probs of ``batch.targets`` under ``model`` (a ``Policy`` or
    ``ReferencePolicy``), 0 where the loss mask is 0; ``hidden`` as in
    ``micro_batch_loss``."""
    device = model.weight.device
    if hidden is None:
        hidden = model.completion_hidden(batch)                            # [b, T, H]
    targets = batch.targets.to(device)
    if mode == "fused":
        logp = linear_token_logprobs(hidden, model.weight, targets, bias=model.bias,
                                     temperature=temperature, backend=backend)
    else:
        logits = torch.nn.functional.linear(hidden, model.weight, model.bias)
        logp = reference.token_logprobs(logits.float(), targets, temperature=temperature)
    return (logp * batch.loss_mask.to(device)).float()
