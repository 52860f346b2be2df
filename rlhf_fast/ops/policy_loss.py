"""``policy_loss``: every PPO / GRPO-family loss from the logits, gradient computed in forward.

Layers, in reading order: the row sweeps (``row_sweeps.py``) and the coefficient step
(``rlhf_fast.policy_coefficients``) -> ``_FusedPolicyLoss`` (autograd) -> ``policy_loss``.

Forward: stats sweep (one read: logp, entropy) -> coefficients on ``[B, T]`` -> gradient
sweep (one read, one write of dL/dlogits, over the logits when ``inplace``). Backward only
rescales the saved gradient by ``grad_output``, and not at all when it is 1. Masked rows are
never read.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..backend import BACKENDS
from ..config import PolicyLossConfig
from ..policy_coefficients import policy_coefficients
from ..validation import (
    check_logits,
    check_target_range,
    check_token_tensor,
    float_token_tensor,
)
from .row_sweeps import grad_sweep, stats_sweep

IGNORE = -100
"""Targets of masked positions are replaced by this: their rows are skipped by both sweeps."""


class PolicyLossOutput(NamedTuple):
    """``loss``: scalar float32, differentiable w.r.t. the logits; ``logprobs`` and
    ``entropy``: float32 ``[B, T]``, detached, 0 at masked positions; ``metrics``: detached
    float32 scalars (clip_frac_low / high / dual, kl_mean, entropy_mean, ratio_mean / min /
    max, token_count), plain means over valid tokens."""

    loss: Tensor
    logprobs: Tensor
    entropy: Tensor
    metrics: dict[str, Tensor]


def _increment_version(t: Tensor) -> None:
    # The kernels overwrite the logits through a raw pointer: tell autograd they changed, so
    # any other saved use of them fails loudly instead of reading a gradient.
    bump = getattr(torch.autograd.graph, "increment_version", None)
    if bump is not None:
        bump(t)


class _FusedPolicyLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, advantages, valid, old, ref, rollout, config, backend,
                inplace, metrics_out):
        logp, entropy, stats = stats_sweep(logits, targets, config.temperature, IGNORE, True,
                                           backend)
        coef = policy_coefficients(logp, entropy, valid, advantages, old, ref, rollout, config)
        metrics_out.update(coef.metrics)
        if ctx.needs_input_grad[0]:
            grad = grad_sweep(coef.c_logp, coef.c_entropy, logits, targets, entropy, stats,
                              config.temperature, IGNORE, backend,
                              out=logits if inplace else None)
            if inplace:
                _increment_version(logits)
            ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(logp, entropy)
        return coef.loss, logp, entropy

    @staticmethod
    def backward(ctx, grad_loss, _grad_logp, _grad_entropy):
        (grad,) = ctx.saved_tensors
        # One scalar sync saves a full read + write of [B, T, V] in the common case.
        if grad_loss is not None and grad_loss.item() != 1.0:
            grad = grad * grad_loss.to(grad.dtype)
        return (grad,) + (None,) * 10


def _resolve_config(config: str | PolicyLossConfig, overrides: dict) -> PolicyLossConfig:
    if isinstance(config, str):
        return PolicyLossConfig.preset(config, **overrides)
    if isinstance(config, PolicyLossConfig):
        return config.replace(**overrides) if overrides else config
    raise TypeError(f"config must be a preset name or a PolicyLossConfig, got "
                    f"{type(config).__name__}")


def policy_loss(
    logits: Tensor,
    targets: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    old_logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    rollout_logprobs: Tensor | None = None,
    config: str | PolicyLossConfig = "grpo",
    inplace: bool = False,
    backend: str = "auto",
    **overrides: object,
) -> PolicyLossOutput:
    """Policy-gradient loss straight from the logits, in two reads and one write of them.

    Args:
        logits: ``[B, T, V]`` (or ``[N, V]``, one sequence), float32 / bfloat16 / float16;
            ``logits[:, t]`` scores ``targets[:, t]``.
        targets: ``[B, T]`` int64 / int32, the sampled tokens.
        advantages: ``[B]`` (per sequence) or ``[B, T]``.
        mask: ``[B, T]`` bool or 0/1: the tokens that enter the loss (no prompt, padding or
            tool output). Masked rows are not read.
        old_logprobs: ``[B, T]`` log-probs of the policy that sampled; None: on-policy (the
            ratio is 1 in value and carries the gradient of logp).
        ref_logprobs: ``[B, T]`` reference-model log-probs (KL with ``kl_reference="ref"``).
        rollout_logprobs: ``[B, T]`` the inference engine's log-probs (rollout correction).
        config: a preset name (``PolicyLossConfig.preset``) or a ``PolicyLossConfig``;
            ``**overrides`` replace its fields (``clip_eps_high=0.28``, ...).
        inplace: write the gradient over ``logits`` (saves ``[B, T, V]`` of memory; the logits
            are consumed and must not be used afterwards).
        backend: ``"auto"`` | ``"triton"`` | ``"torch"``.

    Returns:
        ``PolicyLossOutput(loss, logprobs, entropy, metrics)``. The loss is
        ``sum_t w_t * L_t (* rollout weight * entropy mask) + kl_coef * sum_t w_t * KL_t -
        entropy_coef * sum_t w_t * H_t`` with w the aggregation weights; formulas per field in
        ``PolicyLossConfig`` and ``rlhf_fast.reference.policy_loss``.
    """
    c = _resolve_config(config, overrides)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check_logits(logits)
    check_token_tensor(targets, "targets", logits, integer=True)
    flat = logits.dim() == 2
    if flat:
        logits = logits.unsqueeze(0)
    shape = tuple(logits.shape[:2])
    targets = targets.reshape(shape)
    mask = _mask(mask, logits, flat)
    advantages = _advantages(advantages, logits, flat)
    old = float_token_tensor(old_logprobs, "old_logprobs", logits, flat)
    ref = float_token_tensor(ref_logprobs, "ref_logprobs", logits, flat)
    rollout = float_token_tensor(rollout_logprobs, "rollout_logprobs", logits, flat)
    if c.rollout_correction is not None and rollout is None:
        raise ValueError(f"rollout_correction={c.rollout_correction!r} needs rollout_logprobs")
    if c.kl_coef != 0 and c.kl_reference == "ref" and ref is None:
        raise ValueError("kl_coef != 0 with kl_reference='ref' needs ref_logprobs")

    valid = mask & (targets != IGNORE)
    targets = torch.where(valid, targets, torch.full_like(targets, IGNORE))
    check_target_range(targets, logits.shape[-1], IGNORE)
    metrics: dict[str, Tensor] = {}
    loss, logp, entropy = _FusedPolicyLoss.apply(
        logits, targets, advantages, valid, old, ref, rollout, c, backend, bool(inplace), metrics)
    if flat:
        logp, entropy = logp.squeeze(0), entropy.squeeze(0)
    return PolicyLossOutput(loss, logp, entropy, metrics)


def _mask(mask: object, logits: Tensor, flat: bool) -> Tensor:
    expected = tuple(logits.shape[1:2]) if flat else tuple(logits.shape[:2])
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a bool or 0/1 tensor of shape {expected}, got "
                        f"{type(mask).__name__}")
    if tuple(mask.shape) != expected:
        raise ValueError(f"mask must have shape {expected}, got {tuple(mask.shape)}")
    if mask.device != logits.device:
        raise ValueError(f"mask is on {mask.device} but logits are on {logits.device}")
    return (mask if mask.dtype == torch.bool else mask != 0).reshape(logits.shape[:2])


def _advantages(advantages: object, logits: Tensor, flat: bool) -> Tensor:
    batch, seq_len = logits.shape[:2]
    allowed = [(seq_len,)] if flat else [(batch,), (batch, seq_len)]
    if not isinstance(advantages, Tensor) or not advantages.dtype.is_floating_point:
        raise TypeError(f"advantages must be a float tensor of shape "
                        f"{' or '.join(map(str, allowed))}")
    if tuple(advantages.shape) not in allowed:
        raise ValueError(f"advantages must have shape {' or '.join(map(str, allowed))} "
                         f"(per sequence or per token), got {tuple(advantages.shape)}")
    if advantages.device != logits.device:
        raise ValueError(f"advantages are on {advantages.device} but logits are on "
                         f"{logits.device}")
    advantages = advantages.float()
    return advantages.reshape(1, seq_len) if flat else advantages
