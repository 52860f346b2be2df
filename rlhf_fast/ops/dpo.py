"""``dpo_loss``: DPO and its variants from ``[chosen; rejected]`` logits, gradient in forward.

The per-token coefficient of a preference loss is the pair's ``dL/dlogp(y)`` (divided by the
length when the sequence log-probs are averaged), which needs both sequences' sums: so the
stats sweep runs first (one read of the logits -> ``logp`` ``[2B, T]``), the coefficient step
works on ``[2B]`` / ``[2B, T]`` tensors (``rlhf_fast.preference_coefficients``), then the
gradient sweep writes ``dL/dlogits`` (one read, one write). Nothing of size ``[2B, T, V]``
is held in float32; backward only rescales the saved gradient by ``grad_output``. The data
steps run inside the custom ops ``rlhf_fast::dpo_loss`` / ``rlhf_fast::dpo_loss_inplace``
(one opaque node for ``torch.compile``); ``_PreferenceLoss`` is their autograd.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple, Optional

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from ..backend import BACKENDS
from ..preference_coefficients import (
    PairCoefficients,
    chosen_token_mask,
    preference_coefficients,
    preference_metrics,
)
from ..preference_config import PreferenceLossConfig, preference_config
from ..validation import (
    check_inplace,
    check_logits,
    check_loss_scale,
    check_mask,
    check_token_tensor,
    device_check,
    mask_to_bool,
)
from .custom_op_args import decode_config, encode_config, pack_metrics, unpack_metrics
from .forward_gradients import reject_output_gradients, scale_by_grad_output
from .packing import Layout, Packed, Padded, check_cu_seqlens
from .policy_loss import IGNORE, token_inputs
from .row_sweeps import grad_sweep, stats_sweep
from .vocab_parallel import shard_backend


class PreferenceLossOutput(NamedTuple):
    """``loss``: float32 scalar, differentiable; ``chosen_logprobs`` / ``rejected_logprobs``:
    float32 ``[B]`` sequence log-probs of the policy (sums over the masked tokens, or means
    with ``average_logprobs``), carrying no gradient back (a nonzero gradient reaching them
    raises: add the chosen NLL with ``nll_coef``, or build other terms from
    ``rlhf_fast.token_logprobs``); ``metrics``: detached float32 scalars (rewards_chosen /
    rejected / margin / accuracy with reward = beta * (logp - ref), logps_chosen / rejected,
    nll, pair_count), never scaled by ``loss_scale``."""

    loss: Tensor
    chosen_logprobs: Tensor
    rejected_logprobs: Tensor
    metrics: dict[str, Tensor]


PREFERENCE_METRICS = ("rewards_chosen", "rewards_rejected", "rewards_margin",
                      "rewards_accuracy", "logps_chosen", "logps_rejected", "nll", "pair_count")
"""The keys of ``PreferenceLossOutput.metrics``, in the order the custom ops pack them."""

OUTPUT_GRADIENT_REMEDY = (
    "For the chosen sequences' NLL (RPO) pass nll_coef=...; for any other term built from "
    "log-probs, compute them with rlhf_fast.token_logprobs(logits, targets) (or "
    "rlhf_fast.linear_token_logprobs), whose output is differentiable.")

DISCOPOP_TAU = 0.05
"""DiscoPOP's temperature when ``discopop_tau`` is not given."""


class PreferenceInputs(NamedTuple):
    """The per-token inputs of a preference loss, checked and shaped ``[2B, T]``."""

    targets: Tensor         # as given; IGNORE (-100) counts as masked
    mask: Tensor            # bool or 0/1, values checked inside the op
    ref: Tensor | None      # float32 [2B] or [2B, T]; None when the loss reads no reference
    nll_mask: Tensor | None = None  # like mask: the NLL's tokens (ORPO's prompt NLL), or None


def check_packed_pairs(cu_seqlens: object, rows: Tensor, name: str) -> int | None:
    """None without ``cu_seqlens``; else check that ``rows`` are packed ``[N, ...]`` with an
    even number of sequences (B chosen, then their B rejected partners) and return 2B."""
    if cu_seqlens is None:
        return None
    sequences = check_cu_seqlens(cu_seqlens, rows)
    if rows.dim() != 2:
        raise ValueError(f"with cu_seqlens, {name} must be packed rows [N, ...] (the tokens "
                         f"of the 2B sequences back to back), got shape {tuple(rows.shape)}")
    if sequences % 2:
        raise ValueError(f"cu_seqlens must hold an even number of sequences (B chosen, then "
                         f"their B rejected partners in the same order); got {sequences}")
    return sequences


def check_pair_batch(shape: tuple[int, ...], name: str) -> int:
    """``shape`` is ``[2B, T, ...]``: return B, or say how the batch is malformed."""
    if len(shape) < 3:
        raise ValueError(f"{name} must be [2B, T, ...]: B chosen sequences, then their B "
                         f"rejected partners, stacked on dim 0; got shape {shape}")
    if shape[0] % 2:
        raise ValueError(f"{name}.shape[0] must be even (B chosen sequences, then their B "
                         f"rejected partners, in the same order); got {shape[0]} sequences")
    return shape[0] // 2


def loss_config(*, beta: float, loss_type: str | Sequence[str], label_smoothing: float,
                average_logprobs: bool | None, nll_coef: float, gamma: float,
                reference_free: bool, temperature: float, discopop_tau: float | None,
                **peer_options: object) -> PreferenceLossConfig:
    """``preference_config`` of the public keyword arguments; ``discopop_tau`` is DiscoPOP's
    only (given with another loss it would be ignored, so it raises)."""
    types = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    if discopop_tau is not None and "discopop" not in types:
        raise ValueError(f"discopop_tau is DiscoPOP's temperature (loss_type='discopop'); "
                         f"loss_type={loss_type!r} would ignore it")
    return preference_config(
        beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
        average_logprobs=average_logprobs, nll_coef=nll_coef, gamma=gamma,
        reference_free=reference_free, temperature=temperature,
        discopop_tau=DISCOPOP_TAU if discopop_tau is None else discopop_tau, **peer_options)


def preference_inputs(config: PreferenceLossConfig, logits: Tensor, targets: Tensor,
                      mask: object, ref_logprobs: object,
                      ref_model: bool | None = None,
                      sequences: int | None = None,
                      nll_mask: object = None) -> PreferenceInputs:
    """Check targets ``[2B, T]``, mask ``[2B, T]`` and ``ref_logprobs`` (``[2B]`` sums or
    ``[2B, T]`` per token) against ``logits`` ``[2B, T, V]`` (only shape and device are
    used; no data is read). ``ref_model``: None when the caller takes no reference model,
    else whether its hidden states were given (they replace ``ref_logprobs``).
    ``sequences``: 2B of a packed batch, whose logits are ``[N, V]`` and per-token inputs
    ``[N]`` (returned as ``[1, N]``; sequence sums stay ``[2B]``). ``nll_mask``: None, or
    shaped as ``mask`` (only with an NLL term)."""
    check_token_tensor(targets, "targets", logits, integer=True)
    shape = tuple(logits.shape[:-1])
    mask = check_mask(mask, shape, logits)
    if nll_mask is not None:
        if config.nll_weight == 0:
            raise ValueError(f"nll_mask selects the NLL term's tokens: pass nll_coef > 0 or "
                             f"loss_type='orpo' (loss_type={config.loss_type!r}, nll_coef="
                             f"{config.nll_coef} has no NLL term)")
        nll_mask = check_mask(nll_mask, shape, logits, name="nll_mask")
    ref = _check_ref_logprobs(config, ref_logprobs, shape, logits, ref_model, sequences)
    if sequences is not None:
        targets, mask = targets.reshape(1, -1), mask.reshape(1, -1)
        nll_mask = nll_mask.reshape(1, -1) if nll_mask is not None else None
        if ref is not None and tuple(ref.shape) == shape and shape != (sequences,):
            ref = ref.reshape(1, -1)
    return PreferenceInputs(targets, mask, ref, nll_mask)


def _check_ref_logprobs(config: PreferenceLossConfig, ref: object, shape: tuple[int, ...],
                        logits: Tensor, ref_model: bool | None,
                        sequences: int | None = None) -> Tensor | None:
    alternatives = " or ref_hidden / ref_weight" if ref_model is not None else ""
    if ref is not None and ref_model:
        raise ValueError("pass ref_logprobs or ref_hidden / ref_weight, not both (the "
                         "reference log-probs would come from two places)")
    if not config.uses_reference:
        if ref is not None or ref_model:
            why = ("reference_free=True" if config.reference_free
                   else f"loss_type={config.loss_type!r} is reference-free")
            raise ValueError(f"{why}: pass no ref_logprobs{alternatives}")
        return None
    if ref_model:
        return None
    if sequences is not None:
        sums, allowed = (sequences,), f"[2B] = ({sequences},) (sequence sums) or [N] = {shape}"
    else:
        sums = shape[:1]
        allowed = f"[2B] = {shape[:1]} (sequence sums) or [2B, T] = {shape} (per token)"
    if ref is None:
        raise ValueError(f"loss_type={config.loss_type!r} compares with a reference model: "
                         f"pass ref_logprobs {allowed}{alternatives}, or reference_free=True")
    if not isinstance(ref, Tensor) or not ref.dtype.is_floating_point:
        raise TypeError(f"ref_logprobs must be a float tensor {allowed}")
    if tuple(ref.shape) not in (sums, shape):
        raise ValueError(f"ref_logprobs must be {allowed}, got {tuple(ref.shape)}")
    if config.ld_alpha is not None and tuple(ref.shape) != shape:
        raise ValueError(f"ld_alpha weighs the reference's tokens too: pass ref_logprobs per "
                         f"token, [2B, T] = {shape}, not sequence sums")
    if ref.device != logits.device:
        raise ValueError(f"ref_logprobs are on {ref.device} but logits are on {logits.device}")
    return ref.detach().float()


def preference_forward(logits: Tensor, targets: Tensor, valid: Tensor, ref: Tensor | None,
                       config: PreferenceLossConfig, backend: str, *, num_pairs: int,
                       chosen_tokens: Tensor, write_grad: bool, out: Tensor | None = None,
                       loss_scale: float = 1.0, layout: Layout | None = None,
                       chosen_sequences: Tensor | None = None,
                       nll_valid: Tensor | None = None
                       ) -> tuple[PairCoefficients, Tensor | None]:
    """Stats sweep, coefficients, gradient sweep over ``[2b, T, V]`` logits of ``b`` pairs
    (chosen rows first; ``[1, N, V]`` packed with ``layout``): (coefficients, dL/dlogits or
    None), both times ``loss_scale``. ``targets`` hold ``IGNORE`` at the positions that are
    neither scored (``valid``) nor in the NLL (``nll_valid``), whose rows are neither read
    nor written (their gradient is 0). With ``use_weighting`` the stats sweep also gives
    ln sum_v p_v^2 per token (its ``WITH_SUM_SQ`` variant, same read)."""
    log_sum_sq = None
    if config.use_weighting:
        log_sum_sq = logits.new_empty(targets.shape, dtype=torch.float32)
    logp, entropy, stats = stats_sweep(logits, targets, config.temperature, IGNORE, False,
                                       backend, log_sum_sq=log_sum_sq)
    coef = preference_coefficients(logp, valid, ref, config, num_pairs=num_pairs,
                                   chosen_tokens=chosen_tokens,
                                   chosen_sequences=chosen_sequences, layout=layout,
                                   log_sum_sq=log_sum_sq, nll_valid=nll_valid)
    if loss_scale != 1.0:
        coef = dataclasses.replace(coef, loss=coef.loss * loss_scale,
                                   c_logp=coef.c_logp * loss_scale)
    grad = None
    if write_grad:
        grad = grad_sweep(coef.c_logp, None, logits, targets, entropy, stats,
                          config.temperature, IGNORE, backend, out=out)
    return coef, grad


# --- custom ops: everything that reads data runs inside them, opaque to torch.compile -------

def pair_layout(cu_seqlens: Tensor | None, valid: Tensor
                ) -> tuple[Layout | None, int, Tensor, Tensor]:
    """(layout, pair count, chosen-token count, non-empty chosen sequence count) of a padded
    ``[2B, T]`` or packed ``[1, N]`` preference batch (the counts stay on the device)."""
    if cu_seqlens is None:
        num_pairs = valid.shape[0] // 2
        return (None, num_pairs, valid[:num_pairs].sum(),
                valid[:num_pairs].any(-1).sum())
    layout = Packed.from_cu_seqlens(cu_seqlens, valid.shape[-1])
    chosen_valid = valid & chosen_token_mask(layout, valid)
    chosen_sequences = (layout.seq_sum(chosen_valid.to(torch.int64)) > 0).sum()
    return layout, layout.num_sequences // 2, chosen_valid.sum(), chosen_sequences


class PairTokens(NamedTuple):
    """The tokens of a preference batch, as the sweeps and the coefficient step take them."""

    targets: Tensor                # IGNORE at every token neither scored nor in the NLL
    valid: Tensor                  # bool: the scored tokens (mask, target != IGNORE)
    nll_valid: Tensor | None       # bool: the NLL's tokens (chosen rows), None: valid's
    layout: Layout | None
    num_pairs: int
    chosen_tokens: Tensor          # the NLL's token count (0-dim, on the device)
    chosen_sequences: Tensor       # its non-empty chosen sequences (0-dim)


def pair_tokens(mask: Tensor, nll_mask: Tensor | None, targets: Tensor, n_cols: int,
                backend: str, cu_seqlens: Tensor | None) -> PairTokens:
    """The swept targets and the masks of ``[2B, T]`` (``[1, N]`` packed) pairs. With
    ``nll_mask`` (which must cover ``mask``) the chosen sequences' tokens in it are swept
    too, for the NLL only; its tokens in the rejected sequences are not swept (their targets
    are still range-checked). Checks on the device, no host sync."""
    if nll_mask is None:
        targets, valid = token_inputs(mask, targets, n_cols, backend)
        return PairTokens(targets, valid, None, *pair_layout(cu_seqlens, valid))
    nll_targets, in_nll = token_inputs(nll_mask, targets, n_cols, backend)
    valid = mask_to_bool(mask) & (targets != IGNORE)
    device_check(~(valid & ~in_nll).any(),
                 lambda: "nll_mask must cover mask: every scored token (mask) must be in "
                         "nll_mask too (nll_mask adds the prompt tokens to the NLL)")
    layout, num_pairs, _, _ = pair_layout(cu_seqlens, valid)
    lay = layout if layout is not None else Padded(valid.shape[0])
    nll_valid = in_nll & chosen_token_mask(lay, in_nll)
    targets = torch.where(valid | nll_valid, nll_targets, torch.full_like(nll_targets, IGNORE))
    chosen_sequences = (lay.seq_sum(nll_valid.to(torch.int64)) > 0).sum()
    return PairTokens(targets, valid, nll_valid, layout, num_pairs, nll_valid.sum(),
                      chosen_sequences)


def _dpo_loss_impl(logits, targets, mask, ref, config, backend, loss_scale, write_grad, out,
                   cu_seqlens, nll_mask):
    c = decode_config(PreferenceLossConfig, config)
    tok = pair_tokens(mask, nll_mask, targets, logits.shape[-1], backend, cu_seqlens)
    valid, chosen_tokens = tok.valid, tok.chosen_tokens
    coef, grad = preference_forward(
        logits, tok.targets, valid, ref, c, backend, num_pairs=tok.num_pairs,
        chosen_tokens=chosen_tokens, write_grad=write_grad, out=out, loss_scale=loss_scale,
        layout=tok.layout, chosen_sequences=tok.chosen_sequences, nll_valid=tok.nll_valid)
    metrics = pack_metrics(preference_metrics([coef.pairs], chosen_tokens), PREFERENCE_METRICS)
    return (coef.loss.float(), coef.pairs["logps_chosen"].float(),
            coef.pairs["logps_rejected"].float(), metrics, grad)


@torch.library.custom_op("rlhf_fast::dpo_loss", mutates_args=())
def dpo_loss_op(logits: Tensor, targets: Tensor, mask: Tensor, ref: Optional[Tensor],
                config: str, backend: str, loss_scale: float, write_grad: bool,
                cu_seqlens: Optional[Tensor] = None, nll_mask: Optional[Tensor] = None
                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, chosen ``[B]``, rejected ``[B]``, metrics ``[8]``, dL/dlogits ``[2B, T, V]`` or
    ``[0]`` without ``write_grad``) of ``[2B, T, V]`` logits (``[1, N, V]`` packed, with
    ``cu_seqlens`` of 2B sequences)."""
    *outputs, grad = _dpo_loss_impl(logits, targets, mask, ref, config, backend, loss_scale,
                                    write_grad, None, cu_seqlens, nll_mask)
    return (*outputs, grad if grad is not None else logits.new_empty(0))


@dpo_loss_op.register_fake
def _dpo_loss_fake(logits, targets, mask, ref, config, backend, loss_scale, write_grad,
                   cu_seqlens=None, nll_mask=None):
    return (*_dpo_outputs_fake(logits, cu_seqlens),
            logits.new_empty(logits.shape if write_grad else (0,)))


@torch.library.custom_op("rlhf_fast::dpo_loss_inplace", mutates_args=("logits",))
def dpo_loss_inplace_op(logits: Tensor, targets: Tensor, mask: Tensor, ref: Optional[Tensor],
                        config: str, backend: str, loss_scale: float,
                        cu_seqlens: Optional[Tensor] = None, nll_mask: Optional[Tensor] = None
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``dpo_loss_op`` writing dL/dlogits over ``logits`` (unit column stride)."""
    *outputs, _ = _dpo_loss_impl(logits, targets, mask, ref, config, backend, loss_scale,
                                 True, logits, cu_seqlens, nll_mask)
    return tuple(outputs)


@dpo_loss_inplace_op.register_fake
def _dpo_loss_inplace_fake(logits, targets, mask, ref, config, backend, loss_scale,
                           cu_seqlens=None, nll_mask=None):
    return _dpo_outputs_fake(logits, cu_seqlens)


def _dpo_outputs_fake(logits: Tensor, cu_seqlens: Tensor | None = None
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    pairs = (logits.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1) // 2
    return (logits.new_empty((), dtype=torch.float32),
            logits.new_empty((pairs,), dtype=torch.float32),
            logits.new_empty((pairs,), dtype=torch.float32),
            logits.new_empty((len(PREFERENCE_METRICS),), dtype=torch.float32))


# --- autograd -------------------------------------------------------------------------------

class _PreferenceLoss(torch.autograd.Function):
    """Forward: one custom op that computes the loss and writes dL/dlogits; backward: the
    saved gradient times ``grad_output`` (nothing when it is 1)."""

    @staticmethod
    def forward(ctx, logits, targets, mask, ref, config, backend, inplace, loss_scale,
                grad_enabled, cu_seqlens, nll_mask):
        # needs_input_grad follows requires_grad even under no_grad: nothing to write then.
        write_grad = grad_enabled and ctx.needs_input_grad[0]
        args = (targets, mask, ref, config, backend, loss_scale)
        if write_grad and inplace:
            loss, chosen, rejected, metrics = dpo_loss_inplace_op(logits, *args, cu_seqlens,
                                                                  nll_mask)
            grad = logits
        else:
            loss, chosen, rejected, metrics, grad = dpo_loss_op(logits, *args, write_grad,
                                                                cu_seqlens, nll_mask)
        ctx.mark_non_differentiable(metrics)
        ctx.set_materialize_grads(False)
        if write_grad:
            ctx.save_for_backward(grad)
        return loss, chosen, rejected, metrics

    @staticmethod
    def backward(ctx, grad_loss, grad_chosen, grad_rejected, _grad_metrics):
        reject_output_gradients("dpo_loss", {"out.chosen_logprobs": grad_chosen,
                                             "out.rejected_logprobs": grad_rejected},
                                OUTPUT_GRADIENT_REMEDY)
        if not ctx.needs_input_grad[0]:
            return (None,) * 11
        (grad,) = scale_by_grad_output(ctx, ctx.saved_tensors, grad_loss)
        return (grad,) + (None,) * 10


def dpo_loss(
    logits: Tensor,
    targets: Tensor,
    mask: Tensor,
    *,
    ref_logprobs: Tensor | None = None,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    label_smoothing: float = 0.0,
    average_logprobs: bool | None = None,
    nll_coef: float = 0.0,
    gamma: float = 0.0,
    reference_free: bool = False,
    temperature: float = 1.0,
    discopop_tau: float | None = None,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
    ld_alpha: float | None = None,
    nll_aggregation: str = "token_mean",
    alphapo: float = 0.0,
    loss_weights: Sequence[float] | None = None,
    use_weighting: bool = False,
    nll_mask: Tensor | None = None,
    inplace: bool = False,
    loss_scale: float = 1.0,
    backend: str = "auto",
    cu_seqlens: Tensor | None = None,
    process_group: ProcessGroup | None = None,
    vocab_offset: int | None = None,
) -> PreferenceLossOutput:
    """A preference loss over B pairs, in two reads and one write of the logits.

    Args:
        logits: ``[2B, T, V]`` float32 / bfloat16 / float16: the B chosen sequences, then
            their B rejected partners in the same order; ``logits[:, t]`` scores
            ``targets[:, t]``.
        targets: ``[2B, T]`` int64 / int32; -100 counts as masked.
        mask: ``[2B, T]`` bool, or float / int holding only 0 and 1 (other values raise): the
            response tokens (no prompt, no padding). Masked rows are not read.
        ref_logprobs: the reference model's log-probs of the same tokens, ``[2B]`` (sums over
            the masked tokens) or ``[2B, T]`` (per token); constants of the loss. Required
            unless the loss is reference-free (simpo, orpo, ``reference_free=True``), and
            refused when it is.
        beta, loss_type, label_smoothing, gamma: the loss (formulas in
            ``rlhf_fast.preference_config``): sigmoid, ipo, hinge, robust, exo_pair,
            nca_pair, bco_pair, sppo_hard, apo_zero, apo_down, discopop, simpo, orpo, aot,
            aot_unpaired.
            ``label_smoothing`` and ``gamma`` raise on losses that do not take them.
        discopop_tau: DiscoPOP's temperature of the logistic mix (None: 0.05); raises with
            any other ``loss_type``.
        average_logprobs: sequence log-probs as per-token means instead of sums; None: True
            for ipo, simpo and orpo, else False.
        nll_coef: weight of the chosen sequences' NLL (token mean over all chosen tokens),
            RPO; orpo always adds it with weight 1 (plus ``nll_coef``).
        f_divergence, f_alpha: TRL's f-divergence (reverse_kl, forward_kl, js_divergence,
            alpha_divergence with coefficient f_alpha) for sigmoid, hinge, robust, exo_pair,
            discopop.
        ld_alpha: LD-DPO's weight of the tokens beyond the shorter sequence of a pair.
        nll_aggregation: ``"token_mean"`` (TRL's sft / RPO) or ``"sequence_mean"``
            (OpenRLHF: mean over chosen sequences of their token-mean NLL).
        alphapo: AlphaPO's reward shape (1 - e^(-a logp)) / a for simpo and the
            reference-free sigmoid / hinge / ipo (CPO); 0: off.
        loss_weights: with ``loss_type`` a list of types (TRL's), the loss is the weighted
            sum of their pair means (ones by default); the types must be distinct among
            sigmoid, hinge, robust, exo_pair, nca_pair, bco_pair, sppo_hard, apo_zero,
            apo_down, discopop. With one type (any), ``[w]`` multiplies its pair mean (not
            the NLL term).
        use_weighting: WPO (TRL's ``use_weighting``): each pair's loss times the constant
            weight exp(c_w + c_l), c a sequence's token mean of logp_t - ln sum_v p_v(t)^2
            (from the same stats sweep, its ``WITH_SUM_SQ`` variant); the NLL term times the
            weights' batch mean (TRL's weighted ``sft``); no clamp (TRL 1.16). Refused with
            aot / aot_unpaired / simpo / orpo. With ``process_group`` the slices' sums of
            squares are combined (4 more bytes a row in the all-reduce).
        nll_mask: shaped and typed as ``mask`` (bool or 0/1), and covering it: the tokens of
            the NLL term (``nll_coef`` or orpo's), e.g. prompt + response for TRL's ORPO,
            whose chosen NLL counts every attended token. The chosen sequences' tokens in
            ``nll_mask`` but not in ``mask`` are swept for the NLL alone (their gradient is
            the NLL's); the pair terms see ``mask`` only. The NLL's token mean (or
            ``sequence_mean``) and ``metrics["nll"]`` then run over ``nll_mask``'s chosen
            tokens. Requires an NLL term.
        reference_free: the reference log-probs are taken as 0.
        temperature: logits are divided by it.
        inplace: write the gradient over ``logits`` (they are consumed). Refused on a leaf
            that requires grad or a view of one, as PyTorch refuses any in-place write.
        loss_scale: multiplies the loss and the gradient, folded into the per-token
            coefficients in the forward pass, e.g. ``1 / grad_accum_steps``; the metrics are
            not scaled.
        backend: ``"auto"`` | ``"triton"`` | ``"torch"``.
        cu_seqlens: ``[2B + 1]`` int32 offsets of 2B packed sequences (padding-free layout,
            ``rlhf_fast.ops.packing``): the B chosen sequences, then their B rejected
            partners in the same order, as the padded rows are stacked. ``logits`` are then
            ``[N, V]``, ``targets`` / ``mask`` ``[N]`` and ``ref_logprobs`` ``[2B]`` or
            ``[N]``; the results equal those of the same sequences padded to ``[2B, T]``.
        process_group: the tensor-parallel group when ``logits`` hold only this rank's
            contiguous slice of the vocabulary columns (slices may be uneven; targets stay
            full-vocabulary ids): the results are the full-vocabulary ones on every rank and
            the gradient is this rank's slice, the row statistics combined by two
            all-reduces of 20-24 bytes a row (``rlhf_fast.ops.vocab_parallel``).
        vocab_offset: the full-vocabulary id of this rank's first column; None: from the
            slice widths, all-gathered once per group and width.

    Returns:
        ``PreferenceLossOutput(loss, chosen_logprobs, rejected_logprobs, metrics)``; the loss
        is ``loss_scale`` times the mean over pairs of the per-pair loss (+ the NLL term).
        ``torch.compile`` (``fullgraph=True``) sees the op as one custom op.
    """
    config = loss_config(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                         average_logprobs=average_logprobs, nll_coef=nll_coef, gamma=gamma,
                         reference_free=reference_free, temperature=temperature,
                         discopop_tau=discopop_tau, f_divergence=f_divergence,
                         f_alpha=f_alpha, ld_alpha=ld_alpha, nll_aggregation=nll_aggregation,
                         alphapo=alphapo, loss_weights=loss_weights,
                         use_weighting=use_weighting)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    loss_scale = check_loss_scale(loss_scale)
    check_logits(logits)
    sequences = check_packed_pairs(cu_seqlens, logits, "logits")
    if sequences is None:
        check_pair_batch(tuple(logits.shape), "logits")
    backend = shard_backend(backend, process_group, vocab_offset, logits.shape[-1],
                            logits.device)
    inputs = preference_inputs(config, logits, targets, mask, ref_logprobs,
                               sequences=sequences, nll_mask=nll_mask)
    if sequences is not None:
        logits = logits.unsqueeze(0)
    grad_enabled = torch.is_grad_enabled()
    if inplace:
        check_inplace(logits, grad_enabled and logits.requires_grad)
    loss, chosen, rejected, metrics = _PreferenceLoss.apply(
        logits, inputs.targets, inputs.mask, inputs.ref, encode_config(config), backend,
        bool(inplace), loss_scale, grad_enabled, cu_seqlens, inputs.nll_mask)
    return PreferenceLossOutput(loss, chosen, rejected,
                                unpack_metrics(metrics, PREFERENCE_METRICS))
