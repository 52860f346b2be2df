"""``dpo_loss``: DPO and its variants from ``[chosen; rejected]`` logits, gradient in forward.

The per-token coefficient of a preference loss is the pair's ``dL/dlogp(y)`` (divided by the
length when the sequence log-probs are averaged), which needs both sequences' sums: so the
stats sweep runs first (one read of the logits -> ``logp`` ``[2B, T]``), the coefficient step
works on ``[2B]`` / ``[2B, T]`` tensors (``rlhf_fast.preference_coefficients``), then the
gradient sweep writes ``dL/dlogits`` (one read, one write). Nothing of size ``[2B, T, V]``
is held in float32; backward only rescales the saved gradient by ``grad_output``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..backend import BACKENDS
from ..preference_coefficients import (
    PairCoefficients,
    preference_coefficients,
    preference_metrics,
)
from ..preference_config import PreferenceLossConfig, preference_config
from ..validation import check_logits, check_mask, check_target_range, check_token_tensor
from .forward_gradients import mark_overwritten, scale_by_grad_output
from .policy_loss import IGNORE
from .row_sweeps import grad_sweep, stats_sweep


class PreferenceLossOutput(NamedTuple):
    """``loss``: float32 scalar, differentiable; ``chosen_logprobs`` / ``rejected_logprobs``:
    float32 ``[B]`` sequence log-probs of the policy (sums over the masked tokens, or means
    with ``average_logprobs``), detached; ``metrics``: detached float32 scalars
    (rewards_chosen / rejected / margin / accuracy with reward = beta * (logp - ref),
    logps_chosen / rejected, nll, pair_count)."""

    loss: Tensor
    chosen_logprobs: Tensor
    rejected_logprobs: Tensor
    metrics: dict[str, Tensor]


class PreferenceInputs(NamedTuple):
    """The per-token inputs of a preference loss, checked and shaped ``[2B, T]``."""

    targets: Tensor         # IGNORE where the token does not enter the loss
    valid: Tensor           # bool: mask and target != IGNORE
    ref: Tensor | None      # float32 [2B] or [2B, T]; None when the loss reads no reference


def check_pair_batch(shape: tuple[int, ...], name: str) -> int:
    """``shape`` is ``[2B, T, ...]``: return B, or say how the batch is malformed."""
    if len(shape) < 3:
        raise ValueError(f"{name} must be [2B, T, ...]: B chosen sequences, then their B "
                         f"rejected partners, stacked on dim 0; got shape {shape}")
    if shape[0] % 2:
        raise ValueError(f"{name}.shape[0] must be even (B chosen sequences, then their B "
                         f"rejected partners, in the same order); got {shape[0]} sequences")
    return shape[0] // 2


def preference_inputs(config: PreferenceLossConfig, logits: Tensor, targets: Tensor,
                      mask: object, ref_logprobs: object,
                      ref_model: bool | None = None) -> PreferenceInputs:
    """Check targets ``[2B, T]``, mask ``[2B, T]`` and ``ref_logprobs`` (``[2B]`` sums or
    ``[2B, T]`` per token) against ``logits`` ``[2B, T, V]`` (only shape and device are
    used). ``ref_model``: None when the caller takes no reference model, else whether its
    hidden states were given (they replace ``ref_logprobs``)."""
    check_token_tensor(targets, "targets", logits, integer=True)
    shape = tuple(logits.shape[:2])
    valid = check_mask(mask, shape, logits) & (targets != IGNORE)
    targets = torch.where(valid, targets, torch.full_like(targets, IGNORE))
    check_target_range(targets, logits.shape[-1], IGNORE)
    ref = _check_ref_logprobs(config, ref_logprobs, shape, logits, ref_model)
    return PreferenceInputs(targets, valid, ref)


def _check_ref_logprobs(config: PreferenceLossConfig, ref: object, shape: tuple[int, int],
                  logits: Tensor, ref_model: bool | None) -> Tensor | None:
    alternatives = " or ref_hidden / ref_weight" if ref_model is not None else ""
    if not config.uses_reference:
        if ref is not None or ref_model:
            why = ("reference_free=True" if config.reference_free
                   else f"loss_type={config.loss_type!r} is reference-free")
            raise ValueError(f"{why}: pass no ref_logprobs{alternatives}")
        return None
    if ref_model:
        if ref is not None:
            raise ValueError("pass ref_logprobs or ref_hidden / ref_weight, not both")
        return None
    allowed = f"[2B] = {shape[:1]} (sequence sums) or [2B, T] = {shape} (per token)"
    if ref is None:
        raise ValueError(f"loss_type={config.loss_type!r} compares with a reference model: "
                         f"pass ref_logprobs {allowed}{alternatives}, or reference_free=True")
    if not isinstance(ref, Tensor) or not ref.dtype.is_floating_point:
        raise TypeError(f"ref_logprobs must be a float tensor {allowed}")
    if tuple(ref.shape) not in (shape[:1], shape):
        raise ValueError(f"ref_logprobs must be {allowed}, got {tuple(ref.shape)}")
    if ref.device != logits.device:
        raise ValueError(f"ref_logprobs are on {ref.device} but logits are on {logits.device}")
    return ref.float()


def preference_forward(logits: Tensor, targets: Tensor, valid: Tensor, ref: Tensor | None,
                       config: PreferenceLossConfig, backend: str, *, num_pairs: int,
                       chosen_tokens: Tensor, write_grad: bool, out: Tensor | None = None
                       ) -> tuple[PairCoefficients, Tensor | None]:
    """Stats sweep, coefficients, gradient sweep over ``[2b, T, V]`` logits of ``b`` pairs
    (chosen rows first): (coefficients, dL/dlogits or None). ``targets`` hold ``IGNORE`` at
    masked positions, whose rows are neither read nor written (their gradient is 0)."""
    logp, entropy, stats = stats_sweep(logits, targets, config.temperature, IGNORE, False,
                                       backend)
    coef = preference_coefficients(logp, valid, ref, config, num_pairs=num_pairs,
                                   chosen_tokens=chosen_tokens)
    grad = None
    if write_grad:
        grad = grad_sweep(coef.c_logp, None, logits, targets, entropy, stats,
                          config.temperature, IGNORE, backend, out=out)
    return coef, grad


class _FusedPreferenceLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, valid, ref, config, backend, inplace, metrics_out):
        write_grad = ctx.needs_input_grad[0]
        num_pairs = logits.shape[0] // 2
        chosen_tokens = valid[:num_pairs].sum()
        coef, grad = preference_forward(
            logits, targets, valid, ref, config, backend, num_pairs=num_pairs,
            chosen_tokens=chosen_tokens, write_grad=write_grad,
            out=logits if inplace and write_grad else None)
        metrics_out.update(preference_metrics([coef.pairs], chosen_tokens))
        if write_grad:
            if inplace:
                mark_overwritten(logits)
            ctx.save_for_backward(grad)
        chosen = coef.pairs["logps_chosen"].float()
        rejected = coef.pairs["logps_rejected"].float()
        ctx.mark_non_differentiable(chosen, rejected)
        return coef.loss.float(), chosen, rejected

    @staticmethod
    def backward(ctx, grad_loss, _grad_chosen, _grad_rejected):
        return scale_by_grad_output(ctx.saved_tensors, grad_loss) + (None,) * 7


def dpo_loss(
    logits: Tensor,
    targets: Tensor,
    mask: Tensor,
    *,
    ref_logprobs: Tensor | None = None,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    average_logprobs: bool | None = None,
    nll_coef: float = 0.0,
    gamma: float = 0.0,
    reference_free: bool = False,
    temperature: float = 1.0,
    discopop_tau: float = 0.05,
    inplace: bool = False,
    backend: str = "auto",
) -> PreferenceLossOutput:
    """A preference loss over B pairs, in two reads and one write of the logits.

    Args:
        logits: ``[2B, T, V]`` float32 / bfloat16 / float16: the B chosen sequences, then
            their B rejected partners in the same order; ``logits[:, t]`` scores
            ``targets[:, t]``.
        targets: ``[2B, T]`` int64 / int32; -100 counts as masked.
        mask: ``[2B, T]`` bool or 0/1: the response tokens (no prompt, no padding). Masked
            rows are not read.
        ref_logprobs: the reference model's log-probs of the same tokens, ``[2B]`` (sums over
            the masked tokens) or ``[2B, T]`` (per token). Required unless the loss is
            reference-free (simpo, orpo, ``reference_free=True``).
        beta, loss_type, label_smoothing, gamma: the loss (formulas in
            ``rlhf_fast.preference_config``): sigmoid, ipo, hinge, robust, exo_pair,
            nca_pair, bco_pair, sppo_hard, apo_zero, apo_down, discopop, simpo, orpo.
        discopop_tau: DiscoPOP's temperature of the logistic mix (0.05).
        average_logprobs: sequence log-probs as per-token means instead of sums; None: True
            for ipo, simpo and orpo, else False.
        nll_coef: weight of the chosen sequences' NLL (token mean over all chosen tokens),
            RPO; orpo always adds it with weight 1 (plus ``nll_coef``).
        reference_free: the reference log-probs are taken as 0.
        temperature: logits are divided by it.
        inplace: write the gradient over ``logits`` (they are consumed).
        backend: ``"auto"`` | ``"triton"`` | ``"torch"``.

    Returns:
        ``PreferenceLossOutput(loss, chosen_logprobs, rejected_logprobs, metrics)``; the loss
        is the mean over pairs of the per-pair loss (+ the NLL term).
    """
    config = preference_config(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                               average_logprobs=average_logprobs, nll_coef=nll_coef,
                               gamma=gamma, reference_free=reference_free,
                               temperature=temperature, discopop_tau=discopop_tau)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check_logits(logits)
    check_pair_batch(tuple(logits.shape), "logits")
    inputs = preference_inputs(config, logits, targets, mask, ref_logprobs)
    if inplace and logits.stride(-1) != 1:
        raise ValueError("inplace=True writes the gradient over the logits, which needs a "
                         f"contiguous last dimension; got strides {tuple(logits.stride())}")
    metrics: dict[str, Tensor] = {}
    loss, chosen, rejected = _FusedPreferenceLoss.apply(
        logits, inputs.targets, inputs.valid, inputs.ref, config, backend, bool(inplace),
        metrics)
    return PreferenceLossOutput(loss, chosen, rejected, metrics)
