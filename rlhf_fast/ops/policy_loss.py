"""``policy_loss``: every PPO / GRPO-family loss from the logits, gradient computed in forward.

Layers, in reading order: the fused token-level launcher (device code in
``kernels/policy_loss.py``), the row sweeps (``row_sweeps.py``) and the coefficient step
(``rlhf_fast.policy_coefficients``) -> custom ops ``rlhf_fast::policy_loss`` and
``rlhf_fast::policy_loss_inplace`` (every data-dependent step runs inside them, so
``torch.compile(fullgraph=True)`` sees one opaque node) -> ``_PolicyLoss`` (autograd) ->
``policy_loss`` (argument checks on shapes, dtypes and devices only).

Two paths (docs/architecture.md, Two paths), both writing the gradient in the forward pass:

- token-level losses on the Triton backend: ONE kernel per row computes the statistics, the
  token's coefficient and the gradient (the row is read twice back to back, written once);
- everything else (sequence ratios, GMPO, batch entropy statistics, sequence-level rollout
  correction, the torch backend): stats sweep -> coefficients on ``[B, T]`` -> gradient
  sweep, 2 reads and 1 write of the logits.

The loss value and the metrics always come from the ``[B, T]`` coefficient step.
``loss_scale`` multiplies the coefficients, so the gradient is written already scaled;
backward only rescales the saved gradient by ``grad_output``, and not at all when it is 1
(``forward_gradients.py``: no host sync either way). Masked rows are never read.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from ..backend import BACKENDS, resolve_backend
from ..config import PolicyLossConfig
from ..loss_weights import aggregation_weights, rollout_weights
from ..policy_coefficients import Coefficients, policy_coefficients
from ..validation import (
    check_inplace,
    check_logits,
    check_loss_scale,
    check_mask,
    check_token_tensor,
    float_token_tensor,
    mask_to_bool,
)
from .custom_op_args import decode_config, encode_config, pack_metrics, unpack_metrics
from .forward_gradients import reject_output_gradients, scale_by_grad_output
from .launch import FUSED_MAX_REGISTERS, row_launch, same_alignment
from .packing import Layout, Packed, check_cu_seqlens, expand_advantages
from .row_sweeps import check_targets, grad_sweep, stats_sweep
from .vocab_parallel import is_sharded, shard_backend

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
    token_rollout = c.rollout.mode in (None, "token_truncate", "token_mask")
    return (c.ratio.level == "token" and c.objective in OBJECTIVE_CODES
            and c.entropy.advantage_alpha is None and c.entropy.top_quantile is None
            # On-policy rollout weights depend on logp itself: not known before the sweep.
            and token_rollout and (c.rollout.mode is None or old is not None)
            # Not in the kernel yet (the two-sweep path computes them): other KL estimators
            # and gradients, per-term aggregations, empty-sequence counts, batch-normalised
            # rollout weights, the off-policy mask and the covariance selection.
            and c.kl.estimator in KL_CODES and c.kl.gradient == "estimator"
            and not c.kl.ratio_weighted and c.kl.aggregation is None
            and c.entropy.aggregation is None and not c.aggregation.count_empty_sequences
            and not c.rollout.normalize and c.rollout.off_policy_mask_threshold is None
            and c.cov.mode is None)


def _kl_mode(c: PolicyLossConfig, ref: Tensor | None) -> int:
    if c.kl.coef == 0 or (c.kl.reference == "ref" and ref is None):
        return 0
    return KL_CODES[c.kl.estimator]


def _fused_token_policy(logits: Tensor, targets: Tensor, advantages: Tensor, valid: Tensor,
                        old: Tensor | None, ref: Tensor | None, rollout: Tensor | None,
                        c: PolicyLossConfig, out: Tensor | None,
                        loss_scale: float | Tensor = 1.0):
    """One launch: logp, entropy ``[B, T]`` and dL/dlogits (into ``out`` when given), the
    gradient multiplied by ``loss_scale`` (folded into the aggregation weights)."""
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
    weight = aggregation_weights(m, c.aggregation.mode, c.aggregation.normalizer,
                                 c.aggregation.max_length)
    if not (isinstance(loss_scale, float) and loss_scale == 1.0):
        weight = weight * loss_scale
    weight = weight.contiguous()
    policy_weight = weight
    if c.rollout.mode is not None:
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
        c.clip.eps_low or 0.0, c.clip.eps_high, c.clip.dual_c or 0.0, c.clip.delta or 0.0,
        c.ratio.log_clamp or 0.0, c.kl.coef, c.kl.clamp or 0.0, c.entropy.coef,
        c.soft_clip.sapo_tau_pos, c.soft_clip.sapo_tau_neg,
        OBJECTIVE=OBJECTIVE_CODES[c.objective],
        CLIP_GRADIENT=CLIP_GRADIENT_CODES[c.clip.gradient],
        HAS_LOW=c.clip.eps_low is not None, HAS_DUAL=c.clip.dual_c is not None,
        HAS_DELTA=c.clip.delta is not None, HAS_CLAMP=c.ratio.log_clamp is not None,
        HAS_OLD=old is not None, KL_MODE=kl_mode, KL_FROM_OLD=c.kl.reference == "old",
        HAS_KL_CLAMP=c.kl.clamp is not None, HAS_ENTROPY_COEF=c.entropy.coef != 0,
        SAME_ALIGNMENT=same_alignment(logits, grad, launch.vec), num_warps=launch.num_warps,
        maxnreg=None if launch.on_chip else FUSED_MAX_REGISTERS, **launch.constexprs,
    )
    return logp, entropy, grad


class PolicyLossOutput(NamedTuple):
    """``loss``: scalar float32, differentiable w.r.t. the logits; ``logprobs`` and
    ``entropy``: float32 ``[B, T]``, 0 at masked positions, carrying no gradient back (a
    nonzero gradient reaching them raises: add an entropy term with ``entropy_coef``, or build
    other terms from ``rlhf_fast.token_logprobs``); ``metrics``: detached float32 scalars
    (clip_frac_low / high / dual, kl_mean, entropy_mean, ratio_mean / min / max, token_count),
    plain means over valid tokens, never scaled by ``loss_scale``."""

    loss: Tensor
    logprobs: Tensor
    entropy: Tensor
    metrics: dict[str, Tensor]


POLICY_METRICS = ("clip_frac_low", "clip_frac_high", "clip_frac_dual", "kl_mean",
                  "entropy_mean", "ratio_mean", "ratio_min", "ratio_max", "token_count")
"""The keys of ``PolicyLossOutput.metrics``, in the order the custom op packs them."""

OUTPUT_GRADIENT_REMEDY = (
    "For an entropy term pass entropy_coef=... (the loss subtracts entropy_coef times the "
    "aggregated entropy, with its gradient); for any other term built from per-token "
    "log-probs or entropies, compute them with rlhf_fast.token_logprobs(logits, targets, "
    "return_entropy=True), whose outputs are differentiable.")


def token_inputs(mask: Tensor, targets: Tensor, n_cols: int,
                 backend: str = "auto") -> tuple[Tensor, Tensor]:
    """(targets with ``IGNORE`` where the token does not count, bool ``valid``) from a bool or
    0/1 mask; the mask values and the target range are checked on the device (for a
    vocabulary shard in ``backend``, by the sharded stats sweep)."""
    valid = mask_to_bool(mask) & (targets != IGNORE)
    targets = torch.where(valid, targets, torch.full_like(targets, IGNORE))
    check_targets(targets, n_cols, IGNORE, backend)
    return targets, valid


def scale_coefficients(coef: Coefficients, loss_scale: float | Tensor) -> Coefficients:
    """The loss and both coefficients times ``loss_scale`` (``[B, T]`` work only); the
    metrics are left as they are."""
    if isinstance(loss_scale, float) and loss_scale == 1.0:
        return coef
    return dataclasses.replace(
        coef, loss=coef.loss * loss_scale, c_logp=coef.c_logp * loss_scale,
        c_entropy=coef.c_entropy * loss_scale if coef.c_entropy is not None else None)


def policy_forward(logits: Tensor, targets: Tensor, advantages: Tensor, valid: Tensor,
                   old: Tensor | None, ref: Tensor | None, rollout: Tensor | None,
                   config: PolicyLossConfig, backend: str, *, write_grad: bool,
                   out: Tensor | None = None, entropy_stats: dict | None = None,
                   loss_scale: float | Tensor = 1.0, layout: Layout | None = None,
                   weights: Tensor | None = None, rollout_weight: Tensor | None = None,
                   sequence_norm: Tensor | None = None):
    """One forward over ``[B, T, V]`` logits: (coefficients, logp, entropy, grad or None).

    ``targets`` already hold ``IGNORE`` at masked positions. With ``write_grad`` the gradient
    is written (into ``out`` when given, possibly the logits themselves): in one kernel for
    token-level losses on Triton, else by the gradient sweep. ``entropy_stats`` carries
    batch-wide entropy statistics computed elsewhere (chunked callers). ``loss_scale``
    (a float or a 0-dim tensor) multiplies the loss and the gradient. ``layout``: a packed
    batch's sequences (``[1, N, V]`` logits); ``weights`` / ``rollout_weight`` /
    ``sequence_norm``: what ``policy_coefficients`` takes from the whole batch when these
    logits are only a chunk of it (per-token ``advantages`` then).
    """
    extra = dict(layout=layout, weights=weights, rollout_weight=rollout_weight,
                 sequence_norm=sequence_norm)
    if (write_grad and FUSE_TOKEN_LEVEL and fused_token_level(config, old)
            and not is_sharded(backend) and resolve_backend(backend, logits) == "triton"):
        kernel_config, kernel_scale = config, loss_scale
        if weights is not None:
            # Weights from the whole batch (a chunk, a packed batch): the kernel takes them as
            # a per-token scale on a unit token-mean aggregation (weight = mask * 1 * scale).
            kernel_config = config.replace(aggregation="token_mean", normalizer=1.0)
            kernel_scale = weights * loss_scale
        logp, entropy, grad = _fused_token_policy(logits, targets, advantages, valid, old, ref,
                                                  rollout, kernel_config, out,
                                                  loss_scale=kernel_scale)
        coef = policy_coefficients(logp, entropy, valid, advantages, old, ref, rollout, config,
                                   entropy_stats, **extra)
        return scale_coefficients(coef, loss_scale), logp, entropy, grad
    logp, entropy, stats = stats_sweep(logits, targets, config.temperature, IGNORE, True,
                                       backend)
    coef = scale_coefficients(
        policy_coefficients(logp, entropy, valid, advantages, old, ref, rollout, config,
                            entropy_stats, **extra), loss_scale)
    grad = None
    if write_grad:
        grad = grad_sweep(coef.c_logp, coef.c_entropy, logits, targets, entropy, stats,
                          config.temperature, IGNORE, backend, out=out)
    return coef, logp, entropy, grad


# --- custom ops: everything that reads data runs inside them, opaque to torch.compile -------

def packed_inputs(c: PolicyLossConfig, cu_seqlens: Tensor | None, valid: Tensor,
                  advantages: Tensor) -> tuple[Layout | None, Tensor, Tensor | None]:
    """(layout, per-token advantages, aggregation weights) of a packed batch (``[1, N]``
    tensors), or (None, advantages, None) for a padded one."""
    if cu_seqlens is None:
        return None, advantages, None
    layout = Packed.from_cu_seqlens(cu_seqlens, valid.shape[-1])
    advantages = expand_advantages(advantages, layout, valid)
    weights = aggregation_weights(valid.float(), c.aggregation.mode, c.aggregation.normalizer,
                                  c.aggregation.max_length, c.aggregation.count_empty_sequences,
                                  layout)
    return layout, advantages, weights


def _policy_loss_impl(logits, targets, advantages, mask, old, ref, rollout, config, backend,
                      loss_scale, write_grad, out, cu_seqlens):
    c = decode_config(PolicyLossConfig, config)
    targets, valid = token_inputs(mask, targets, logits.shape[-1], backend)
    layout, advantages, weights = packed_inputs(c, cu_seqlens, valid, advantages)
    coef, logp, entropy, grad = policy_forward(
        logits, targets, advantages, valid, old, ref, rollout, c, backend,
        write_grad=write_grad, out=out, loss_scale=loss_scale, layout=layout, weights=weights)
    return coef.loss.float(), logp, entropy, pack_metrics(coef.metrics, POLICY_METRICS), grad


@torch.library.custom_op("rlhf_fast::policy_loss", mutates_args=())
def policy_loss_op(logits: Tensor, targets: Tensor, advantages: Tensor, mask: Tensor,
                   old: Optional[Tensor], ref: Optional[Tensor], rollout: Optional[Tensor],
                   config: str, backend: str, loss_scale: float, write_grad: bool,
                   cu_seqlens: Optional[Tensor] = None
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, logp ``[B, T]``, entropy ``[B, T]``, metrics ``[9]``, dL/dlogits ``[B, T, V]``
    or ``[0]`` without ``write_grad``) of ``[B, T, V]`` logits (``[1, N, V]`` packed, with
    ``cu_seqlens``); ``config`` from ``encode_config``."""
    loss, logp, entropy, metrics, grad = _policy_loss_impl(
        logits, targets, advantages, mask, old, ref, rollout, config, backend, loss_scale,
        write_grad, None, cu_seqlens)
    return loss, logp, entropy, metrics, grad if grad is not None else logits.new_empty(0)


@policy_loss_op.register_fake
def _policy_loss_fake(logits, targets, advantages, mask, old, ref, rollout, config, backend,
                      loss_scale, write_grad, cu_seqlens=None):
    loss, logp, entropy, metrics = _policy_outputs_fake(logits)
    grad = logits.new_empty(logits.shape if write_grad else (0,))
    return loss, logp, entropy, metrics, grad


@torch.library.custom_op("rlhf_fast::policy_loss_inplace", mutates_args=("logits",))
def policy_loss_inplace_op(logits: Tensor, targets: Tensor, advantages: Tensor, mask: Tensor,
                           old: Optional[Tensor], ref: Optional[Tensor],
                           rollout: Optional[Tensor], config: str, backend: str,
                           loss_scale: float, cu_seqlens: Optional[Tensor] = None
                           ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``policy_loss_op`` writing dL/dlogits over ``logits`` (unit column stride)."""
    loss, logp, entropy, metrics, _ = _policy_loss_impl(
        logits, targets, advantages, mask, old, ref, rollout, config, backend, loss_scale,
        True, logits, cu_seqlens)
    return loss, logp, entropy, metrics


@policy_loss_inplace_op.register_fake
def _policy_loss_inplace_fake(logits, targets, advantages, mask, old, ref, rollout, config,
                              backend, loss_scale, cu_seqlens=None):
    return _policy_outputs_fake(logits)


def _policy_outputs_fake(logits: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    per_token = logits.shape[:2]
    return (logits.new_empty((), dtype=torch.float32),
            logits.new_empty(per_token, dtype=torch.float32),
            logits.new_empty(per_token, dtype=torch.float32),
            logits.new_empty((len(POLICY_METRICS),), dtype=torch.float32))


# --- autograd -------------------------------------------------------------------------------

class _PolicyLoss(torch.autograd.Function):
    """Forward: one custom op that computes the loss and writes dL/dlogits; backward: the
    saved gradient times ``grad_output`` (nothing when it is 1)."""

    @staticmethod
    def forward(ctx, logits, targets, advantages, mask, old, ref, rollout, config, backend,
                inplace, loss_scale, grad_enabled, cu_seqlens):
        # needs_input_grad follows requires_grad even under no_grad: nothing to write then.
        write_grad = grad_enabled and ctx.needs_input_grad[0]
        args = (targets, advantages, mask, old, ref, rollout, config, backend, loss_scale)
        if write_grad and inplace:
            loss, logp, entropy, metrics = policy_loss_inplace_op(logits, *args, cu_seqlens)
            grad = logits
        else:
            loss, logp, entropy, metrics, grad = policy_loss_op(logits, *args, write_grad,
                                                                cu_seqlens)
        ctx.mark_non_differentiable(metrics)
        ctx.set_materialize_grads(False)
        if write_grad:
            ctx.save_for_backward(grad)
        return loss, logp, entropy, metrics

    @staticmethod
    def backward(ctx, grad_loss, grad_logp, grad_entropy, _grad_metrics):
        reject_output_gradients("policy_loss", {"out.logprobs": grad_logp,
                                                "out.entropy": grad_entropy},
                                OUTPUT_GRADIENT_REMEDY)
        if not ctx.needs_input_grad[0]:
            return (None,) * 13
        (grad,) = scale_by_grad_output(ctx, ctx.saved_tensors, grad_loss)
        return (grad,) + (None,) * 12


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
    loss_scale: float = 1.0,
    backend: str = "auto",
    cu_seqlens: Tensor | None = None,
    process_group: ProcessGroup | None = None,
    vocab_offset: int | None = None,
    **overrides: object,
) -> PolicyLossOutput:
    """Policy-gradient loss straight from the logits, in two reads and one write of them.

    Args:
        logits: ``[B, T, V]`` (or ``[N, V]``: one sequence, or packed sequences with
            ``cu_seqlens``), float32 / bfloat16 / float16; ``logits[:, t]`` scores
            ``targets[:, t]``.
        targets: ``[B, T]`` int64 / int32, the sampled tokens.
        advantages: ``[B]`` (per sequence) or ``[B, T]``; packed: ``[S]`` or ``[N]`` (``[N]``
            is read per token when ``S == N``).
        mask: ``[B, T]`` bool, or float / int holding only 0 and 1 (other values raise: a
            mask selects tokens, it does not weight them): the tokens that enter the loss (no
            prompt, padding or tool output). Masked rows are not read.
        old_logprobs: ``[B, T]`` log-probs of the policy that sampled; None: on-policy (the
            ratio is 1 in value and carries the gradient of logp).
        ref_logprobs: ``[B, T]`` reference-model log-probs, for the KL with
            ``kl_reference="ref"``; with ``kl_coef=0`` they only feed ``metrics["kl_mean"]``.
            Refused with ``kl_reference="old"`` (that KL compares with ``old_logprobs``).
        rollout_logprobs: ``[B, T]`` the inference engine's log-probs; needs
            ``rollout_correction``, and is refused without it.
        config: a preset name (``PolicyLossConfig.preset``) or a ``PolicyLossConfig``;
            ``**overrides`` replace its fields (``clip_eps_high=0.28``, ...). The default,
            ``"grpo"``, has a KL to the reference (``kl_coef=0.04``): pass ``ref_logprobs``,
            or ``kl_coef=0.0``, or a preset without KL.
        inplace: write the gradient over ``logits`` (saves ``[B, T, V]`` of memory; the logits
            are consumed and must not be used afterwards). Refused, as PyTorch refuses any
            in-place write, on a leaf that requires grad or a view of one. Nothing is written
            when no gradient is computed (``torch.no_grad()`` or logits not requiring grad).
        loss_scale: multiplies the loss and the gradient, folded into the per-token
            coefficients in the forward pass (no extra pass), e.g. ``1 / grad_accum_steps``;
            the metrics are not scaled.
        backend: ``"auto"`` | ``"triton"`` | ``"torch"``.
        cu_seqlens: ``[S + 1]`` int32 offsets of S packed sequences (flash-attn varlen / verl
            remove-padding / TRL padding-free layout; ``rlhf_fast.ops.packing``): logits
            ``[N, V]`` and every per-token input ``[N]``. Sequence lengths, sequence ratios,
            the aggregations and their counts follow the boundaries, and the results equal
            those of the same sequences padded to ``[S, T]``. ``seq_mean_token_sum_norm``
            needs ``max_length`` (or ``normalizer``) then: a packed batch has no padded T.
        process_group: the tensor-parallel group when ``logits`` hold only this rank's
            contiguous slice of the vocabulary columns (slices may be uneven; targets stay
            full-vocabulary ids): the results are the full-vocabulary ones on every rank and
            the gradient is this rank's slice, the row statistics combined by two
            all-reduces of 20-24 bytes a row (``rlhf_fast.ops.vocab_parallel``).
        vocab_offset: the full-vocabulary id of this rank's first column; None: from the
            slice widths, all-gathered once per group and width.

    Advantages and the old / reference / rollout log-probs are constants of the loss: no
    gradient flows to them (as in TRL, verl and OpenRLHF).

    Returns:
        ``PolicyLossOutput(loss, logprobs, entropy, metrics)``. The loss is ``loss_scale *
        (sum_t w_t * L_t (* rollout weight * entropy mask) + kl_coef * sum_t w_t * KL_t -
        entropy_coef * sum_t w_t * H_t)`` with w the aggregation weights; formulas per field
        in ``PolicyLossConfig`` and ``rlhf_fast.reference.policy_loss``. ``torch.compile``
        (``fullgraph=True``) sees the op as one custom op.
    """
    c = _resolve_config(config, overrides)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    loss_scale = check_loss_scale(loss_scale)
    check_logits(logits)
    check_token_tensor(targets, "targets", logits, integer=True)
    sequences = check_packed(c, cu_seqlens, logits, "logits")
    backend = shard_backend(backend, process_group, vocab_offset, logits.shape[-1],
                            logits.device)
    flat = logits.dim() == 2
    if flat:
        logits = logits.unsqueeze(0)
    targets = targets.reshape(logits.shape[:2])
    inputs = side_inputs(c, logits, flat, targets, mask, advantages, old_logprobs,
                         ref_logprobs, rollout_logprobs, sequences=sequences)
    grad_enabled = torch.is_grad_enabled()
    if inplace:
        check_inplace(logits, grad_enabled and logits.requires_grad)
    loss, logp, entropy, metrics = _PolicyLoss.apply(
        logits, inputs.targets, inputs.advantages, inputs.mask, inputs.old, inputs.ref,
        inputs.rollout, encode_config(c), backend, bool(inplace), loss_scale, grad_enabled,
        cu_seqlens)
    if flat:
        logp, entropy = logp.squeeze(0), entropy.squeeze(0)
    return PolicyLossOutput(loss, logp, entropy, unpack_metrics(metrics, POLICY_METRICS))


# --- argument checks (shapes, dtypes, devices, combinations: no data is read) ---------------

class SideInputs(NamedTuple):
    """The per-token inputs of a policy loss, checked and shaped ``[B, T]``."""

    targets: Tensor         # as given; IGNORE (-100) counts as masked
    mask: Tensor            # bool or 0/1, values checked inside the op
    advantages: Tensor      # float32 [B] or [B, T]
    old: Tensor | None
    ref: Tensor | None
    rollout: Tensor | None


def check_config_use(c: PolicyLossConfig) -> None:
    """The clipping fields of ``ppo_clip`` set on another objective, which would ignore
    them, raise (their defaults never do)."""
    if c.objective != "ppo_clip":
        for name, value, default in (("dual_clip_c", c.clip.dual_c, None),
                                     ("delta", c.clip.delta, None),
                                     ("clip_gradient", c.clip.gradient, "zero")):
            if value != default:
                raise ValueError(f"{name}={value!r} applies to objective='ppo_clip' only; "
                                 f"objective={c.objective!r} would ignore it")


def check_packed(c: PolicyLossConfig | None, cu_seqlens: object, rows: Tensor,
                 name: str) -> int | None:
    """None without ``cu_seqlens``; else check that ``rows`` (logits or hidden states) are
    packed ``[N, ...]`` and that the config can run on a packed batch, and return S."""
    if cu_seqlens is None:
        return None
    sequences = check_cu_seqlens(cu_seqlens, rows)
    if rows.dim() != 2:
        raise ValueError(f"with cu_seqlens, {name} must be packed rows [N, "
                         f"{'V' if name == 'logits' else 'H'}] (the tokens of all sequences "
                         f"back to back), got shape {tuple(rows.shape)}")
    if c is not None and c.aggregation.mode == "seq_mean_token_sum_norm" \
            and c.aggregation.normalizer is None and c.aggregation.max_length is None:
        raise ValueError("aggregation='seq_mean_token_sum_norm' (Dr. GRPO: sum / (S * "
                         "max_length)) on a packed batch needs max_length (or normalizer): "
                         "a packed batch has no padded length T to default to")
    return sequences


def side_inputs(c: PolicyLossConfig, logits: Tensor, flat: bool, targets: Tensor,
                mask: object, advantages: object, old_logprobs: object, ref_logprobs: object,
                rollout_logprobs: object, ref_model: bool | None = None,
                sequences: int | None = None) -> SideInputs:
    """Check and shape the per-token inputs against ``logits`` ``[B, T, V]`` (``[1, N, V]``
    when ``flat``; only its shape and device are used), and refuse combinations that would
    drop an argument. ``ref_model``: None when the caller takes no reference model; else
    whether its hidden states were given (they replace ``ref_logprobs``). ``sequences``:
    S for a packed batch (``cu_seqlens``), whose advantages may be ``[S]``."""
    check_config_use(c)
    expected = tuple(logits.shape[1:2]) if flat else tuple(logits.shape[:2])
    mask = check_mask(mask, expected, logits).reshape(logits.shape[:2])
    advantages = _advantages(advantages, logits, flat, sequences)
    old = float_token_tensor(old_logprobs, "old_logprobs", logits, flat)
    ref = float_token_tensor(ref_logprobs, "ref_logprobs", logits, flat)
    rollout = float_token_tensor(rollout_logprobs, "rollout_logprobs", logits, flat)
    alternatives = " or ref_hidden / ref_weight" if ref_model is not None else ""
    if ref is not None and ref_model:
        raise ValueError("pass ref_logprobs or ref_hidden / ref_weight, not both (the "
                         "reference log-probs would come from two places)")
    if c.rollout.mode is not None and rollout is None:
        raise ValueError(f"rollout_correction={c.rollout.mode!r} needs rollout_logprobs")
    if c.rollout.mode is None and c.rollout.off_policy_mask_threshold is None \
            and rollout is not None:
        raise ValueError("rollout_logprobs are given but rollout_correction is None (and so "
                         "is off_policy_mask_threshold), so they would be ignored: set "
                         "rollout_correction ('token_truncate', 'token_mask', "
                         "'sequence_truncate', 'sequence_mask', 'sequence_gate') or "
                         "off_policy_mask_threshold, or drop them")
    has_ref = ref is not None or bool(ref_model)
    if c.kl.reference == "old" and has_ref:
        raise ValueError(f"ref_logprobs{alternatives} are given but kl_reference='old' (the "
                         "KL compares with old_logprobs), so they would be ignored: drop "
                         "them, or set kl_reference='ref'")
    if c.kl.coef != 0 and c.kl.reference == "ref" and not has_ref:
        raise ValueError(
            f"this loss has a KL penalty to the reference model (kl_coef={c.kl.coef}; the "
            f"default preset 'grpo' has kl_coef=0.04), so it needs ref_logprobs"
            f"{alternatives} (the reference model's log-probs of the same tokens). To train "
            f"without the KL term pass kl_coef=0.0, or a preset without KL (config='dapo', "
            f"'dr_grpo', 'bnpo', 'ppo', ...)")
    return SideInputs(targets, mask, advantages, old, ref, rollout)


def _advantages(advantages: object, logits: Tensor, flat: bool,
                sequences: int | None = None) -> Tensor:
    batch, seq_len = logits.shape[:2]
    allowed = [(seq_len,)] if flat else [(batch,), (batch, seq_len)]
    if sequences is not None:
        allowed.append((sequences,))
    if not isinstance(advantages, Tensor) or not advantages.dtype.is_floating_point:
        raise TypeError(f"advantages must be a float tensor of shape "
                        f"{' or '.join(map(str, allowed))}")
    if tuple(advantages.shape) not in allowed:
        raise ValueError(f"advantages must have shape {' or '.join(map(str, allowed))} "
                         f"(per sequence or per token), got {tuple(advantages.shape)}")
    if advantages.device != logits.device:
        raise ValueError(f"advantages are on {advantages.device} but logits are on "
                         f"{logits.device}")
    advantages = advantages.detach().float()
    if flat and tuple(advantages.shape) != (seq_len,):
        return advantages                           # packed: [S], one per sequence
    return advantages.reshape(1, seq_len) if flat else advantages
