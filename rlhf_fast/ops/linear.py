"""Fused-linear ops: from hidden states and the ``lm_head`` weight to loss and gradients,
never holding the ``[tokens, vocab]`` logits.

The batch is cut into chunks of whole sequences (per-sequence statistics complete inside a
chunk). Per chunk:

    logits_c = hidden_c @ weight.T (+ bias)            # GEMM 1, input dtype, fp32 accumulate
    stats sweep / coefficients / gradient sweep        # grad written over logits_c in place
    grad_hidden_c  = G_c @ weight                      # GEMM 2
    grad_weight   += G_c.T @ hidden_c                  # GEMM 3, into ONE float32 buffer

so the peak extra memory is one chunk of logits, O(N) float32 statistics and the float32
weight gradient. ``linear_policy_loss`` computes its gradients in the forward pass (the
coefficients are known there): no logits recompute; backward only rescales.
``linear_token_logprobs`` cannot (its upstream gradients arrive later): its backward
recomputes each chunk's logits, then runs the gradient sweep and GEMMs 2-3.

Normalisers known from the mask (token and sequence counts) are computed once over the whole
batch, kept on the device, and folded with ``loss_scale`` into every chunk's coefficient
scale; batch-wide entropy statistics (``entropy_advantage_alpha``,
``top_entropy_quantile``) come from a no-grad pre-pass over all chunks. Each op's data steps
run inside a ``torch.library`` custom op (one opaque node for ``torch.compile``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from ..backend import BACKENDS
from ..config import PolicyLossConfig
from ..loss_weights import entropy_statistics
from ..validation import check_loss_scale, check_temperature
from .custom_op_args import decode_config, encode_config, pack_metrics, unpack_metrics
from .forward_gradients import reject_output_gradients, scale_by_grad_output
from .lm_head import (
    HeadGradients,
    check_linear,
    chunk_logits,
    head_gradients_fake,
    head_outputs,
    reference_logprobs,
)
from .policy_loss import (
    IGNORE,
    POLICY_METRICS,
    PolicyLossOutput,
    _resolve_config,
    policy_forward,
    side_inputs,
    token_inputs,
)
from .row_sweeps import check_targets, grad_sweep, stats_sweep
from .vocab_parallel import chunk_width, shard_backend

CHUNK_BUDGET_BYTES = 512 * 2**20
"""Default budget for one chunk of logits (in the logits' dtype). A chunk is at least one
sequence; override with ``chunk_size`` (sequences per chunk)."""


def sequences_per_chunk(seq_len: int, vocab: int, element_size: int,
                        chunk_size: int | None, batch: int) -> int:
    """Whole sequences per chunk: ``chunk_size``, or as many as fit the budget (>= 1)."""
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 (sequences per chunk), got {chunk_size}")
        return min(chunk_size, max(batch, 1))
    per_sequence = max(1, seq_len * vocab * element_size)
    return max(1, min(max(batch, 1), CHUNK_BUDGET_BYTES // per_sequence))


def _merge_metrics(parts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Token-count-weighted means, min / max of the ratio extremes, summed count."""
    counts = torch.stack([p["token_count"] for p in parts])
    total = counts.sum()
    merged = {"token_count": total}
    for key in parts[0]:
        if key == "token_count":
            continue
        values = torch.stack([p[key] for p in parts]).float()
        if key in ("ratio_min", "ratio_max"):
            pick = torch.where(counts > 0, values,
                               float("inf") if key == "ratio_min" else float("-inf"))
            extreme = pick.min() if key == "ratio_min" else pick.max()
            merged[key] = torch.where(total > 0, extreme, 1.0)
        else:
            merged[key] = torch.where(total > 0, (values * counts).sum() / total.clamp(min=1),
                                      values[0] * 0 + (1.0 if key == "ratio_mean" else 0.0))
    return merged


def chunk_config(c: PolicyLossConfig, valid: Tensor, loss_scale: float
                 ) -> tuple[PolicyLossConfig, float | Tensor]:
    """(config for every chunk, scale for every chunk): the aggregation's denominator is the
    whole batch's, not a chunk's. A count taken from the mask stays on the device (no host
    sync): the chunks get ``normalizer=1`` and the scale ``loss_scale / count``; constant
    denominators (``normalizer``, ``B * max_length``) go into the config as before."""
    if c.normalizer is not None or c.needs_whole_batch:
        return c, loss_scale  # (a whole-batch config runs in one chunk)
    if c.aggregation == "seq_mean_token_sum_norm":
        max_length = c.max_length if c.max_length is not None else valid.shape[1]
        return c.replace(normalizer=float(valid.shape[0] * max_length)), loss_scale
    if c.aggregation == "token_mean":
        count = valid.sum()
    else:  # seq_mean_token_mean, seq_mean_token_sum: the non-empty sequences
        count = (valid.sum(-1) > 0).sum()
    return c.replace(normalizer=1.0), (loss_scale / count.clamp(min=1).double()).float()


def _linear_policy_impl(hidden, weight, bias, targets, advantages, mask, old, ref, rollout,
                        ref_hidden, ref_weight, config, backend, chunk_size, loss_scale,
                        needs):
    write_grad = any(needs)
    targets, valid = token_inputs(mask, targets, weight.shape[0], backend)
    batch, seq_len, _ = hidden.shape
    vocab = weight.shape[0]
    c, scale = chunk_config(decode_config(PolicyLossConfig, config), valid, loss_scale)
    per_chunk = sequences_per_chunk(seq_len, chunk_width(vocab, backend), hidden.element_size(),
                                    chunk_size, batch)
    if c.needs_whole_batch:  # batch-wide statistics no chunk scale carries: one chunk
        per_chunk = max(batch, 1)
    chunks = [slice(s, min(s + per_chunk, batch)) for s in range(0, batch, per_chunk)]

    entropy_stats = None
    if c.entropy_advantage_alpha is not None or c.top_entropy_quantile is not None:
        # pre-pass: the batch's entropy statistics
        entropy = torch.cat([stats_sweep(chunk_logits(hidden[r], weight, bias), targets[r],
                                         c.temperature, IGNORE, True, backend)[1]
                             for r in chunks])
        entropy_stats = entropy_statistics(entropy, valid.float(), c.top_entropy_quantile)

    grads = HeadGradients(hidden, weight, bias, needs, backend)
    logp = hidden.new_empty((batch, seq_len), dtype=torch.float32)
    entropy = torch.empty_like(logp)
    loss = torch.zeros((), dtype=torch.float64, device=hidden.device)
    parts = []
    for rows in chunks:
        logits = chunk_logits(hidden[rows], weight, bias)
        ref_c = ref[rows] if ref is not None else None
        if ref_hidden is not None:
            ref_c = reference_logprobs(ref_hidden[rows], ref_weight, targets[rows],
                                       c.temperature, IGNORE, backend)
        coef, logp_c, entropy_c, grad_logits = policy_forward(
            logits, targets[rows], advantages[rows], valid[rows],
            old[rows] if old is not None else None, ref_c,
            rollout[rows] if rollout is not None else None, c, backend,
            write_grad=write_grad, out=logits, entropy_stats=entropy_stats, loss_scale=scale)
        loss += coef.loss.double()
        parts.append(coef.metrics)
        logp[rows], entropy[rows] = logp_c, entropy_c
        if write_grad:
            grads.add(grad_logits, hidden[rows], rows)
        del logits, grad_logits
    metrics = pack_metrics(_merge_metrics(parts), POLICY_METRICS)
    return (loss.float(), logp, entropy, metrics,
            *head_outputs(grads.result(), hidden))


@torch.library.custom_op("rlhf_fast::linear_policy_loss", mutates_args=())
def linear_policy_loss_op(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
    advantages: Tensor, mask: Tensor, old: Optional[Tensor], ref: Optional[Tensor],
    rollout: Optional[Tensor], ref_hidden: Optional[Tensor], ref_weight: Optional[Tensor],
    config: str, backend: str, chunk_size: Optional[int], loss_scale: float,
    need_hidden: bool, need_weight: bool, need_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, logp ``[B, T]``, entropy ``[B, T]``, metrics ``[9]``, grad_hidden, grad_weight,
    grad_bias), each gradient ``[0]`` when not asked for."""
    return _linear_policy_impl(hidden, weight, bias, targets, advantages, mask, old, ref,
                               rollout, ref_hidden, ref_weight, config, backend, chunk_size,
                               loss_scale, (need_hidden, need_weight, need_bias))


@linear_policy_loss_op.register_fake
def _linear_policy_loss_fake(hidden, weight, bias, targets, advantages, mask, old, ref,
                             rollout, ref_hidden, ref_weight, config, backend, chunk_size,
                             loss_scale, need_hidden, need_weight, need_bias):
    per_token = hidden.shape[:2]
    return (hidden.new_empty((), dtype=torch.float32),
            hidden.new_empty(per_token, dtype=torch.float32),
            hidden.new_empty(per_token, dtype=torch.float32),
            hidden.new_empty((len(POLICY_METRICS),), dtype=torch.float32),
            *head_gradients_fake(hidden, weight, bias, (need_hidden, need_weight, need_bias)))


class _LinearPolicyLoss(torch.autograd.Function):
    """Forward: one custom op (chunks, loss, the three gradients); backward: the saved
    gradients times ``grad_output`` (nothing when it is 1)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, advantages, mask, old, ref, rollout,
                ref_hidden, ref_weight, config, backend, chunk_size, loss_scale, grad_enabled):
        # needs_input_grad follows requires_grad even under no_grad: no gradient then.
        needs = tuple(grad_enabled and need for need in ctx.needs_input_grad[:3])
        loss, logp, entropy, metrics, *grads = linear_policy_loss_op(
            hidden, weight, bias, targets, advantages, mask, old, ref, rollout, ref_hidden,
            ref_weight, config, backend, chunk_size, loss_scale, *needs)
        ctx.mark_non_differentiable(metrics)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*(g if need else None
                                for g, need in zip(grads, needs, strict=True)))
        return loss, logp, entropy, metrics

    @staticmethod
    def backward(ctx, grad_loss, grad_logp, grad_entropy, _grad_metrics):
        reject_output_gradients("linear_policy_loss", {"out.logprobs": grad_logp,
                                                       "out.entropy": grad_entropy},
                                LINEAR_OUTPUT_GRADIENT_REMEDY)
        return scale_by_grad_output(ctx, ctx.saved_tensors, grad_loss) + (None,) * 13


LINEAR_OUTPUT_GRADIENT_REMEDY = (
    "For an entropy term pass entropy_coef=... (the loss subtracts entropy_coef times the "
    "aggregated entropy, with its gradient); for any other term built from per-token "
    "log-probs or entropies, compute them with rlhf_fast.linear_token_logprobs(hidden, "
    "weight, targets, return_entropy=True), whose outputs are differentiable.")


def _as_batch(hidden: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, bool]:
    flat = hidden.dim() == 2
    if flat:
        hidden = hidden.unsqueeze(0)
    expected = tuple(hidden.shape[:2])
    if not isinstance(targets, Tensor) or targets.dtype not in (torch.int64, torch.int32):
        raise TypeError("targets must be an int64 / int32 tensor")
    if tuple(targets.reshape(-1).shape) != (expected[0] * expected[1],) \
            or targets.dim() != (1 if flat else 2):
        raise ValueError(f"targets must have shape {expected[1:] if flat else expected} "
                         f"(hidden.shape[:-1]), got {tuple(targets.shape)}")
    if targets.device != hidden.device:
        raise ValueError(f"targets is on {targets.device} but hidden is on {hidden.device}")
    return hidden, targets.reshape(expected), flat


def linear_policy_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    bias: Tensor | None = None,
    old_logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    rollout_logprobs: Tensor | None = None,
    ref_hidden: Tensor | None = None,
    ref_weight: Tensor | None = None,
    config: str | PolicyLossConfig = "grpo",
    chunk_size: int | None = None,
    loss_scale: float = 1.0,
    backend: str = "auto",
    process_group: ProcessGroup | None = None,
    vocab_offset: int | None = None,
    **overrides: object,
) -> PolicyLossOutput:
    """``policy_loss`` on ``logits = hidden @ weight.T (+ bias)`` without materialising them.

    hidden ``[B, T, H]`` (or ``[N, H]``: one sequence), weight ``[V, H]`` (may be tied to the
    embedding), bias ``[V]`` or None, all of one dtype. Differentiable w.r.t. hidden, weight
    and bias; the weight gradient is accumulated in float32 across chunks and cast once.
    ``ref_hidden`` / ``ref_weight``: the reference model's final hidden states and head; its
    log-probs are computed per chunk under no_grad instead of being passed in (passing
    ``ref_logprobs`` as well raises). ``chunk_size``: sequences per chunk (default: as many
    as fit ``CHUNK_BUDGET_BYTES``). ``loss_scale`` multiplies the loss and the three
    gradients through the per-token coefficients, so the GEMMs produce them scaled (no extra
    pass). ``out.logprobs`` / ``out.entropy`` carry no gradient back (a nonzero one raises;
    use ``entropy_coef``, or ``rlhf_fast.linear_token_logprobs`` for other terms). Every
    other argument, preset and field as in ``rlhf_fast.policy_loss``, and:

        process_group: the tensor-parallel group when ``weight`` (and ``bias``,
            ``ref_weight``) hold only this rank's contiguous slice of the vocabulary rows
            (slices may be uneven; targets stay full-vocabulary ids): the results are the
            full-vocabulary ones on every rank, the weight and bias gradients this rank's
            slice, and dL/dhidden the full one (summed over the group: one all-reduce of
            ``[B, T, H]``); row statistics cost two all-reduces of 20-24 bytes a row
            (``rlhf_fast.ops.vocab_parallel``). Every rank cuts the batch into the same
            chunks (sized by the widest slice).
        vocab_offset: the full-vocabulary id of this rank's first row of ``weight``; None:
            from the slice widths, all-gathered once per group and width. When given with
            uneven slices, give ``chunk_size`` too (chunks are then sized by the local width,
            and must be the same on every rank).
    """
    c = _resolve_config(config, overrides)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    loss_scale = check_loss_scale(loss_scale)
    check_linear(hidden, weight, bias)
    hidden, targets, flat = _as_batch(hidden, targets)
    backend = shard_backend(backend, process_group, vocab_offset, weight.shape[0],
                            hidden.device)
    if (ref_hidden is None) != (ref_weight is None):
        raise ValueError("ref_hidden and ref_weight go together")
    if ref_hidden is not None:
        check_linear(ref_hidden, ref_weight, None)
        ref_hidden = ref_hidden.unsqueeze(0) if flat else ref_hidden
        if ref_hidden.shape[:2] != hidden.shape[:2] or ref_weight.shape[0] != weight.shape[0]:
            raise ValueError("ref_hidden must be [B, T, H_ref] and ref_weight [V, H_ref] "
                             "matching hidden's [B, T] and weight's V")
        ref_hidden, ref_weight = ref_hidden.detach(), ref_weight.detach()
    if c.objective == "gmpo" and c.aggregation in ("token_mean", "seq_mean_token_sum_norm"):
        raise ValueError("linear_policy_loss with objective='gmpo' takes a seq_mean_* "
                         "aggregation (its denominator is the sequence count)")
    logits_like = hidden.new_zeros(1).expand(*hidden.shape[:2], weight.shape[0])  # shape only
    inputs = side_inputs(c, logits_like, flat, targets, mask, advantages, old_logprobs,
                         ref_logprobs, rollout_logprobs, ref_model=ref_hidden is not None)
    loss, logp, entropy, metrics = _LinearPolicyLoss.apply(
        hidden, weight, bias, inputs.targets, inputs.advantages, inputs.mask, inputs.old,
        inputs.ref, inputs.rollout, ref_hidden, ref_weight, encode_config(c), backend,
        chunk_size, loss_scale, torch.is_grad_enabled())
    if flat:
        logp, entropy = logp.squeeze(0), entropy.squeeze(0)
    return PolicyLossOutput(loss, logp, entropy, unpack_metrics(metrics, POLICY_METRICS))


# --- linear_token_logprobs: custom ops and their autograd -----------------------------------

@torch.library.custom_op("rlhf_fast::linear_token_logprobs", mutates_args=())
def linear_token_logprobs_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                             targets: Tensor, temperature: float, ignore_index: int,
                             with_entropy: bool, backend: str, chunk_size: Optional[int]
                             ) -> tuple[Tensor, Tensor, Tensor]:
    """(logp ``[B, T]``, entropy ``[B, T]`` or ``[0]``, stats ``[B, T, 3]``) of
    ``hidden @ weight.T (+ bias)``: one GEMM and one stats sweep per chunk."""
    check_targets(targets, weight.shape[0], ignore_index, backend)
    batch, seq_len, _ = hidden.shape
    per_chunk = sequences_per_chunk(seq_len, chunk_width(weight.shape[0], backend),
                                    hidden.element_size(), chunk_size, batch)
    logp = hidden.new_empty((batch, seq_len), dtype=torch.float32)
    entropy = torch.empty_like(logp) if with_entropy else logp.new_empty(0)
    stats = hidden.new_empty((batch, seq_len, 3), dtype=torch.float32)
    for s in range(0, batch, per_chunk):
        rows = slice(s, min(s + per_chunk, batch))
        lp, ent, st = stats_sweep(chunk_logits(hidden[rows], weight, bias), targets[rows],
                                  temperature, ignore_index, with_entropy, backend)
        logp[rows], stats[rows] = lp, st
        if with_entropy:
            entropy[rows] = ent
    return logp, entropy, stats


@linear_token_logprobs_op.register_fake
def _linear_token_logprobs_fake(hidden, weight, bias, targets, temperature, ignore_index,
                                with_entropy, backend, chunk_size):
    per_token = hidden.shape[:2]
    return (hidden.new_empty(per_token, dtype=torch.float32),
            hidden.new_empty(per_token if with_entropy else (0,), dtype=torch.float32),
            hidden.new_empty((*per_token, 3), dtype=torch.float32))


@torch.library.custom_op("rlhf_fast::linear_token_logprobs_backward", mutates_args=())
def linear_token_logprobs_backward_op(
    grad_logp: Optional[Tensor], grad_entropy: Optional[Tensor], hidden: Tensor,
    weight: Tensor, bias: Optional[Tensor], targets: Tensor, entropy: Tensor, stats: Tensor,
    temperature: float, ignore_index: int, backend: str, chunk_size: Optional[int],
    need_hidden: bool, need_weight: bool, need_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_hidden, grad_weight, grad_bias), ``[0]`` where not asked for: each chunk's
    logits recomputed (see the module docstring), gradient sweep, GEMMs 2-3."""
    needs = (need_hidden, need_weight, need_bias)
    grads = HeadGradients(hidden, weight, bias, needs, backend)
    batch, seq_len, _ = hidden.shape
    per_chunk = sequences_per_chunk(seq_len, chunk_width(weight.shape[0], backend),
                                    hidden.element_size(), chunk_size, batch)
    for s in range(0, batch, per_chunk):
        rows = slice(s, min(s + per_chunk, batch))
        logits = chunk_logits(hidden[rows], weight, bias)
        g = grad_sweep(grad_logp[rows].float() if grad_logp is not None else None,
                       grad_entropy[rows].float() if grad_entropy is not None else None,
                       logits, targets[rows],
                       entropy[rows] if grad_entropy is not None else entropy, stats[rows],
                       temperature, ignore_index, backend, out=logits)
        grads.add(g, hidden[rows], rows)
        del logits, g
    return head_outputs(grads.result(), hidden)


@linear_token_logprobs_backward_op.register_fake
def _linear_token_logprobs_backward_fake(grad_logp, grad_entropy, hidden, weight, bias,
                                         targets, entropy, stats, temperature, ignore_index,
                                         backend, chunk_size, need_hidden, need_weight,
                                         need_bias):
    return head_gradients_fake(hidden, weight, bias, (need_hidden, need_weight, need_bias))


def _linear_logprobs_setup(ctx, inputs, output) -> None:
    hidden, weight, bias, targets, temperature, ignore_index, with_entropy, backend, \
        chunk_size = inputs
    _, entropy, stats = output
    ctx.save_for_backward(hidden, weight, bias, targets, entropy, stats)
    ctx.hparams = (temperature, ignore_index, with_entropy, backend, chunk_size)
    ctx.mark_non_differentiable(stats)
    ctx.set_materialize_grads(False)


def _linear_logprobs_backward(ctx, grad_logp, grad_entropy, _grad_stats):
    temperature, ignore_index, with_entropy, backend, chunk_size = ctx.hparams
    grad_entropy = grad_entropy if with_entropy else None
    needs = tuple(ctx.needs_input_grad[:3])
    if (grad_logp is None and grad_entropy is None) or not any(needs):
        return (None,) * 9
    hidden, weight, bias, targets, entropy, stats = ctx.saved_tensors
    grads = linear_token_logprobs_backward_op(
        grad_logp, grad_entropy, hidden, weight, bias, targets, entropy, stats, temperature,
        ignore_index, backend, chunk_size, *needs)
    kept = tuple(g if need else None for g, need in zip(grads, needs, strict=True))
    return (*kept, *(None,) * 6)


linear_token_logprobs_op.register_autograd(_linear_logprobs_backward,
                                           setup_context=_linear_logprobs_setup)


def linear_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    backend: str = "auto",
    process_group: ProcessGroup | None = None,
    vocab_offset: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """``token_logprobs`` of ``hidden @ weight.T (+ bias)``, chunk by chunk.

    hidden ``[B, T, H]`` or ``[N, H]``; weight ``[V, H]``; bias ``[V]`` or None. Under
    ``torch.no_grad()`` (old / reference policy) it is one GEMM and one stats sweep per
    chunk, nothing saved; with grad, backward recomputes each chunk's logits. Returns float32
    logp (and entropy) of shape ``hidden.shape[:-1]``; differentiable w.r.t. hidden, weight
    and bias. A target outside ``[0, V)`` other than ``ignore_index`` raises (checked on the
    device, as in ``token_logprobs``). ``torch.compile`` (``fullgraph=True``) sees it as one
    custom op (and one for its backward).

    Args (vocabulary-parallel heads):
        process_group: the tensor-parallel group when ``weight`` (and ``bias``,
            ``ref_weight``) hold only this rank's contiguous slice of the vocabulary rows
            (slices may be uneven; targets stay full-vocabulary ids): the results are the
            full-vocabulary ones on every rank, the weight and bias gradients this rank's
            slice, and dL/dhidden the full one (summed over the group: one all-reduce of
            ``[B, T, H]``); row statistics cost two all-reduces of 20-24 bytes a row
            (``rlhf_fast.ops.vocab_parallel``). Every rank cuts the batch into the same
            chunks (sized by the widest slice).
        vocab_offset: the full-vocabulary id of this rank's first row of ``weight``; None:
            from the slice widths, all-gathered once per group and width. When given with
            uneven slices, give ``chunk_size`` too (chunks are then sized by the local width,
            and must be the same on every rank).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check_linear(hidden, weight, bias)
    hidden, targets, flat = _as_batch(hidden, targets)
    temperature = check_temperature(temperature)
    backend = shard_backend(backend, process_group, vocab_offset, weight.shape[0],
                            hidden.device)
    logp, entropy, _ = linear_token_logprobs_op(hidden, weight, bias, targets, temperature,
                                                int(ignore_index), bool(return_entropy),
                                                backend, chunk_size)
    if flat:
        logp = logp.squeeze(0)
        entropy = entropy.squeeze(0) if return_entropy else entropy
    return (logp, entropy) if return_entropy else logp
