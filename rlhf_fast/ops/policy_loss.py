"""``policy_loss``: every PPO / GRPO-family loss from the logits, gradient computed in forward.

Layers, in reading order: the fused token-level launcher (device code in
``kernels/policy_loss.py``), the row sweeps (``row_sweeps.py``) and the coefficient step
(``rlhf_fast.policy_coefficients``) -> ``_FusedPolicyLoss`` (autograd) -> ``policy_loss``.

Two paths (DESIGN.md section 3), both writing the gradient in the forward pass:

- token-level losses on the Triton backend: ONE kernel per row computes the statistics, the
  token's coefficient and the gradient (the row is read twice back to back, written once);
- everything else (sequence ratios, GMPO, batch entropy statistics, sequence-level rollout
  correction, the torch backend): stats sweep -> coefficients on ``[B, T]`` -> gradient
  sweep, 2 reads and 1 write of the logits.

The loss value and the metrics always come from the ``[B, T]`` coefficient step. Backward
only rescales the saved gradient by ``grad_output``, and not at all when it is 1. Masked
rows are never read.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..backend import BACKENDS, resolve_backend
from ..config import PolicyLossConfig
from ..loss_weights import aggregation_weights, rollout_weights
from ..policy_coefficients import policy_coefficients
from ..validation import (
    check_logits,
    check_mask,
    check_target_range,
    check_token_tensor,
    float_token_tensor,
)
from .forward_gradients import mark_overwritten, scale_by_grad_output
from .launch import FUSED_MAX_REGISTERS, row_launch, same_alignment
from .row_sweeps import grad_sweep, stats_sweep

IGNORE = -100
"""Targets of masked positions are replaced by this: their rows are skipped by both sweeps."""

FUSE_TOKEN_LEVEL = True
"""Use the one-kernel path for token-level losses on the Triton backend (tests turn it off
to compare the two paths)."""

OBJECTIVE_CODES = {"pg": 0, "ppo_clip": 1, "sapo": 2, "cispo": 3}
CLIP_GRADIENT_CODES = {"zero": 0, "keep_high": 1, "keep_both": 2}
KL_CODES = {"k1": 1, "k2": 2, "k3": 3}


def fused_token_level(c: PolicyLossConfig, old: Tensor | None) -> bool:
    """True when every token's coefficient depends only on the token and on weights known
    from the mask, so one kernel can compute loss and gradient."""
    token_rollout = c.rollout_correction in (None, "token_truncate", "token_mask")
    return (c.ratio_level == "token" and c.objective != "gmpo"
            and c.entropy_advantage_alpha is None and c.top_entropy_quantile is None
            # On-policy rollout weights depend on logp itself: not known before the sweep.
            and token_rollout and (c.rollout_correction is None or old is not None))


def _kl_mode(c: PolicyLossConfig, ref: Tensor | None) -> int:
    if c.kl_coef == 0 or (c.kl_reference == "ref" and ref is None):
        return 0
    return KL_CODES[c.kl_estimator]


def _fused_token_policy(logits: Tensor, targets: Tensor, advantages: Tensor, valid: Tensor,
                        old: Tensor | None, ref: Tensor | None, rollout: Tensor | None,
                        c: PolicyLossConfig, out: Tensor | None):
    """One launch: logp, entropy ``[B, T]`` and dL/dlogits (into ``out`` when given)."""
    from ..kernels.policy_loss import token_policy_loss_kernel, token_policy_loss_onchip_kernel

    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    batch, seq_len, n_cols = logits.shape
    grad = out if out is not None else torch.empty(logits.shape, dtype=logits.dtype,
                                                   device=logits.device)
    logp = logits.new_empty((batch, seq_len), dtype=torch.float32)
    entropy = torch.empty_like(logp)
    if batch * seq_len == 0:
        return logp, entropy, grad
    m = valid.float()
    weight = aggregation_weights(m, c.aggregation, c.normalizer, c.max_length).contiguous()
    policy_weight = weight
    if c.rollout_correction is not None:
        policy_weight = (weight * rollout_weights(old, rollout, m, c)).contiguous()
    adv = advantages.unsqueeze(-1).expand(batch, seq_len) if advantages.dim() == 1 \
        else advantages
    kl_mode = _kl_mode(c, ref)
    launch = row_launch(n_cols, logits.dtype)
    kernel = token_policy_loss_onchip_kernel if launch.on_chip else token_policy_loss_kernel
    kernel[(batch * seq_len,)](
        logits, targets.contiguous(), grad, logp, entropy,
        adv.contiguous(), old.contiguous() if old is not None else logp,
        ref.contiguous() if ref is not None else logp, weight, policy_weight,
        n_cols, seq_len, logits.stride(0), logits.stride(1), grad.stride(0), grad.stride(1),
        1.0 / c.temperature, IGNORE,
        c.clip_eps_low or 0.0, c.clip_eps_high, c.dual_clip_c or 0.0, c.delta or 0.0,
        c.log_ratio_clamp or 0.0, c.kl_coef, c.kl_clamp or 0.0, c.entropy_coef,
        c.sapo_tau_pos, c.sapo_tau_neg,
        OBJECTIVE=OBJECTIVE_CODES[c.objective],
        CLIP_GRADIENT=CLIP_GRADIENT_CODES[c.clip_gradient],
        HAS_LOW=c.clip_eps_low is not None, HAS_DUAL=c.dual_clip_c is not None,
        HAS_DELTA=c.delta is not None, HAS_CLAMP=c.log_ratio_clamp is not None,
        HAS_OLD=old is not None, KL_MODE=kl_mode, KL_FROM_OLD=c.kl_reference == "old",
        HAS_KL_CLAMP=c.kl_clamp is not None, HAS_ENTROPY_COEF=c.entropy_coef != 0,
        SAME_ALIGNMENT=same_alignment(logits, grad, launch.vec), num_warps=launch.num_warps,
        maxnreg=None if launch.on_chip else FUSED_MAX_REGISTERS, **launch.constexprs,
    )
    return logp, entropy, grad


class PolicyLossOutput(NamedTuple):
    """``loss``: scalar float32, differentiable w.r.t. the logits; ``logprobs`` and
    ``entropy``: float32 ``[B, T]``, detached, 0 at masked positions; ``metrics``: detached
    float32 scalars (clip_frac_low / high / dual, kl_mean, entropy_mean, ratio_mean / min /
    max, token_count), plain means over valid tokens."""

    loss: Tensor
    logprobs: Tensor
    entropy: Tensor
    metrics: dict[str, Tensor]


def policy_forward(logits: Tensor, targets: Tensor, advantages: Tensor, valid: Tensor,
                   old: Tensor | None, ref: Tensor | None, rollout: Tensor | None,
                   config: PolicyLossConfig, backend: str, *, write_grad: bool,
                   out: Tensor | None = None, entropy_stats: dict | None = None):
    """One forward over ``[B, T, V]`` logits: (coefficients, logp, entropy, grad or None).

    ``targets`` already hold ``IGNORE`` at masked positions. With ``write_grad`` the gradient
    is written (into ``out`` when given, possibly the logits themselves): in one kernel for
    token-level losses on Triton, else by the gradient sweep. ``entropy_stats`` carries
    batch-wide entropy statistics computed elsewhere (chunked callers).
    """
    if (write_grad and FUSE_TOKEN_LEVEL and fused_token_level(config, old)
            and resolve_backend(backend, logits) == "triton"):
        logp, entropy, grad = _fused_token_policy(logits, targets, advantages, valid, old, ref,
                                                  rollout, config, out)
        coef = policy_coefficients(logp, entropy, valid, advantages, old, ref, rollout, config,
                                   entropy_stats)
        return coef, logp, entropy, grad
    logp, entropy, stats = stats_sweep(logits, targets, config.temperature, IGNORE, True,
                                       backend)
    coef = policy_coefficients(logp, entropy, valid, advantages, old, ref, rollout, config,
                               entropy_stats)
    grad = None
    if write_grad:
        grad = grad_sweep(coef.c_logp, coef.c_entropy, logits, targets, entropy, stats,
                          config.temperature, IGNORE, backend, out=out)
    return coef, logp, entropy, grad


class _FusedPolicyLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, advantages, valid, old, ref, rollout, config, backend,
                inplace, metrics_out):
        write_grad = ctx.needs_input_grad[0]
        coef, logp, entropy, grad = policy_forward(
            logits, targets, advantages, valid, old, ref, rollout, config, backend,
            write_grad=write_grad, out=logits if inplace and write_grad else None)
        metrics_out.update(coef.metrics)
        if write_grad:
            if inplace:
                mark_overwritten(logits)
            ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(logp, entropy)
        return coef.loss, logp, entropy

    @staticmethod
    def backward(ctx, grad_loss, _grad_logp, _grad_entropy):
        return scale_by_grad_output(ctx.saved_tensors, grad_loss) + (None,) * 10


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
    inputs = side_inputs(c, logits, flat, targets, mask, advantages, old_logprobs,
                         ref_logprobs, rollout_logprobs)
    if inplace and logits.stride(-1) != 1:
        raise ValueError("inplace=True writes the gradient over the logits, which needs a "
                         f"contiguous last dimension; got strides {tuple(logits.stride())}")
    metrics: dict[str, Tensor] = {}
    loss, logp, entropy = _FusedPolicyLoss.apply(
        logits, inputs.targets, inputs.advantages, inputs.valid, inputs.old, inputs.ref,
        inputs.rollout, c, backend, bool(inplace), metrics)
    if flat:
        logp, entropy = logp.squeeze(0), entropy.squeeze(0)
    return PolicyLossOutput(loss, logp, entropy, metrics)


class SideInputs(NamedTuple):
    """The per-token inputs of a policy loss, checked and shaped ``[B, T]``."""

    targets: Tensor         # IGNORE where the token does not enter the loss
    valid: Tensor           # bool: mask and target != IGNORE
    advantages: Tensor      # float32 [B] or [B, T]
    old: Tensor | None
    ref: Tensor | None
    rollout: Tensor | None


def side_inputs(c: PolicyLossConfig, logits: Tensor, flat: bool, targets: Tensor,
                mask: object, advantages: object, old_logprobs: object, ref_logprobs: object,
                rollout_logprobs: object, ref_model: bool | None = None) -> SideInputs:
    """Check and shape the per-token inputs against ``logits`` ``[B, T, V]`` (``[1, N, V]``
    when ``flat``; only its shape and device are used). ``ref_model``: None when the caller
    takes no reference model; else whether its hidden states were given (they replace
    ``ref_logprobs``)."""
    mask = _mask(mask, logits, flat)
    advantages = _advantages(advantages, logits, flat)
    old = float_token_tensor(old_logprobs, "old_logprobs", logits, flat)
    ref = float_token_tensor(ref_logprobs, "ref_logprobs", logits, flat)
    rollout = float_token_tensor(rollout_logprobs, "rollout_logprobs", logits, flat)
    if c.rollout_correction is not None and rollout is None:
        raise ValueError(f"rollout_correction={c.rollout_correction!r} needs rollout_logprobs")
    if c.kl_coef != 0 and c.kl_reference == "ref" and ref is None and not ref_model:
        raise ValueError("kl_coef != 0 with kl_reference='ref' needs ref_logprobs"
                         + (" or ref_hidden / ref_weight" if ref_model is not None else ""))
    valid = mask & (targets != IGNORE)
    targets = torch.where(valid, targets, torch.full_like(targets, IGNORE))
    check_target_range(targets, logits.shape[-1], IGNORE)
    return SideInputs(targets, valid, advantages, old, ref, rollout)


def _mask(mask: object, logits: Tensor, flat: bool) -> Tensor:
    expected = tuple(logits.shape[1:2]) if flat else tuple(logits.shape[:2])
    return check_mask(mask, expected, logits).reshape(logits.shape[:2])


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
