"""``linear_dpo_loss``: ``dpo_loss`` from hidden states and the ``lm_head`` weight, chunk by
chunk, never holding the ``[2B, T, V]`` logits.

A chunk holds whole pairs (rows ``s:e`` and their partners ``B+s:B+e``), so every pair's
sequence log-probs, loss and coefficients complete inside it; the pair count and the chosen
token count are taken over the whole batch first, so the chunks add up exactly. Per chunk:

    logits_c = hidden_c @ weight.T (+ bias)                # GEMM 1
    ref logp = stats sweep of ref_hidden_c @ ref_weight.T  # no_grad, when a ref model is given
    stats sweep / pair coefficients / gradient sweep       # grad written over logits_c
    grad_hidden_c  = G_c @ weight                          # GEMM 2
    grad_weight   += G_c.T @ hidden_c                      # GEMM 3, into ONE float32 buffer

The gradients are complete after the forward pass; backward only rescales. The data steps
run inside the custom op ``rlhf_fast::linear_dpo_loss`` (one opaque node for
``torch.compile``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from ..backend import BACKENDS
from ..preference_coefficients import preference_metrics
from ..preference_config import BATCH_SORTED_LOSSES, PreferenceLossConfig
from ..validation import check_loss_scale
from .custom_op_args import decode_config, encode_config, pack_metrics, unpack_metrics
from .dpo import (
    OUTPUT_GRADIENT_REMEDY,
    PREFERENCE_METRICS,
    PreferenceLossOutput,
    check_pair_batch,
    loss_config,
    preference_forward,
    preference_inputs,
)
from .forward_gradients import reject_output_gradients, scale_by_grad_output
from .linear import sequences_per_chunk
from .lm_head import (
    HeadGradients,
    check_linear,
    chunk_logits,
    head_gradients_fake,
    head_outputs,
    reference_logprobs,
)
from .policy_loss import IGNORE, token_inputs
from .vocab_parallel import chunk_width, shard_backend


def pair_chunks(num_pairs: int, pairs_per_chunk: int, device: torch.device
                ) -> list[tuple[slice, Tensor | None]]:
    """Each chunk's pairs ``s:e`` and its rows ``[s..e-1, B+s..B+e-1]`` as an index; the
    index is None for a single chunk holding the whole batch (its rows are the batch, in
    order: no gather)."""
    if pairs_per_chunk >= num_pairs:
        return [(slice(None), None)]
    chunks = []
    for s in range(0, num_pairs, pairs_per_chunk):
        e = min(s + pairs_per_chunk, num_pairs)
        chosen = torch.arange(s, e, device=device)
        chunks.append((slice(s, e), torch.cat([chosen, chosen + num_pairs])))
    return chunks


def _rows(x: Tensor | None, index: Tensor | None) -> Tensor | None:
    if x is None or index is None:
        return x
    return x.index_select(0, index)


def _linear_dpo_impl(hidden, weight, bias, targets, mask, ref, ref_hidden, ref_weight, config,
                     backend, chunk_size, loss_scale, needs):
    write_grad = any(needs)
    c = decode_config(PreferenceLossConfig, config)
    targets, valid = token_inputs(mask, targets, weight.shape[0], backend)
    num_pairs, seq_len = hidden.shape[0] // 2, hidden.shape[1]
    vocab = weight.shape[0]
    # A pair is two sequences: size chunks as if it were one sequence of length 2T.
    per_chunk = sequences_per_chunk(2 * seq_len, chunk_width(vocab, backend),
                                    hidden.element_size(), chunk_size, num_pairs)
    if c.loss_type in BATCH_SORTED_LOSSES:  # AOT sorts over the batch: one chunk
        per_chunk = max(num_pairs, 1)
    chosen_tokens = valid[:num_pairs].sum()
    chosen_sequences = valid[:num_pairs].any(-1).sum()
    grads = HeadGradients(hidden, weight, bias, needs, backend)
    loss = torch.zeros((), dtype=torch.float64, device=hidden.device)
    chosen = hidden.new_empty(num_pairs, dtype=torch.float32)
    rejected = torch.empty_like(chosen)
    parts = []
    for pairs, index in pair_chunks(num_pairs, per_chunk, hidden.device):
        hidden_c, targets_c = _rows(hidden, index), _rows(targets, index)
        ref_c = _rows(ref, index)
        if ref_hidden is not None:
            ref_c = reference_logprobs(_rows(ref_hidden, index), ref_weight, targets_c,
                                       c.temperature, IGNORE, backend)
        logits = chunk_logits(hidden_c, weight, bias)
        coef, grad_logits = preference_forward(
            logits, targets_c, _rows(valid, index), ref_c, c, backend,
            num_pairs=num_pairs, chosen_tokens=chosen_tokens, write_grad=write_grad,
            chosen_sequences=chosen_sequences,
            out=logits, loss_scale=loss_scale)
        loss += coef.loss
        parts.append(coef.pairs)
        chosen[pairs] = coef.pairs["logps_chosen"].float()
        rejected[pairs] = coef.pairs["logps_rejected"].float()
        if write_grad:
            grads.add(grad_logits, hidden_c, index)
        del logits, grad_logits
    metrics = pack_metrics(preference_metrics(parts, chosen_tokens), PREFERENCE_METRICS)
    return (loss.float(), chosen, rejected, metrics,
            *head_outputs(grads.result(), hidden))


@torch.library.custom_op("rlhf_fast::linear_dpo_loss", mutates_args=())
def linear_dpo_loss_op(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, mask: Tensor,
    ref: Optional[Tensor], ref_hidden: Optional[Tensor], ref_weight: Optional[Tensor],
    config: str, backend: str, chunk_size: Optional[int], loss_scale: float,
    need_hidden: bool, need_weight: bool, need_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, chosen ``[B]``, rejected ``[B]``, metrics ``[8]``, grad_hidden, grad_weight,
    grad_bias), each gradient ``[0]`` when not asked for."""
    return _linear_dpo_impl(hidden, weight, bias, targets, mask, ref, ref_hidden, ref_weight,
                            config, backend, chunk_size, loss_scale,
                            (need_hidden, need_weight, need_bias))


@linear_dpo_loss_op.register_fake
def _linear_dpo_loss_fake(hidden, weight, bias, targets, mask, ref, ref_hidden, ref_weight,
                          config, backend, chunk_size, loss_scale, need_hidden, need_weight,
                          need_bias):
    pairs = hidden.shape[0] // 2
    return (hidden.new_empty((), dtype=torch.float32),
            hidden.new_empty((pairs,), dtype=torch.float32),
            hidden.new_empty((pairs,), dtype=torch.float32),
            hidden.new_empty((len(PREFERENCE_METRICS),), dtype=torch.float32),
            *head_gradients_fake(hidden, weight, bias, (need_hidden, need_weight, need_bias)))


class _LinearPreferenceLoss(torch.autograd.Function):
    """Forward: one custom op (chunks of pairs, loss, the three gradients); backward: the
    saved gradients times ``grad_output`` (nothing when it is 1)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, mask, ref, ref_hidden, ref_weight, config,
                backend, chunk_size, loss_scale, grad_enabled):
        # needs_input_grad follows requires_grad even under no_grad: no gradient then.
        needs = tuple(grad_enabled and need for need in ctx.needs_input_grad[:3])
        loss, chosen, rejected, metrics, *grads = linear_dpo_loss_op(
            hidden, weight, bias, targets, mask, ref, ref_hidden, ref_weight, config, backend,
            chunk_size, loss_scale, *needs)
        ctx.mark_non_differentiable(metrics)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*(g if need else None
                                for g, need in zip(grads, needs, strict=True)))
        return loss, chosen, rejected, metrics

    @staticmethod
    def backward(ctx, grad_loss, grad_chosen, grad_rejected, _grad_metrics):
        reject_output_gradients("linear_dpo_loss", {"out.chosen_logprobs": grad_chosen,
                                                    "out.rejected_logprobs": grad_rejected},
                                OUTPUT_GRADIENT_REMEDY)
        return scale_by_grad_output(ctx, ctx.saved_tensors, grad_loss) + (None,) * 10


def linear_dpo_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    mask: Tensor,
    *,
    bias: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    ref_hidden: Tensor | None = None,
    ref_weight: Tensor | None = None,
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
    chunk_size: int | None = None,
    loss_scale: float = 1.0,
    backend: str = "auto",
    process_group: ProcessGroup | None = None,
    vocab_offset: int | None = None,
) -> PreferenceLossOutput:
    """``dpo_loss`` on ``logits = hidden @ weight.T (+ bias)`` without materialising them.

    hidden ``[2B, T, H]`` (B chosen sequences, then their B rejected partners), weight
    ``[V, H]``, bias ``[V]`` or None, all of one dtype; targets and mask ``[2B, T]``.
    Differentiable w.r.t. hidden, weight and bias; the weight gradient is accumulated in
    float32 across chunks and cast once. The reference enters as ``ref_logprobs`` (``[2B]``
    or ``[2B, T]``) or as the reference model's final hidden states ``ref_hidden``
    ``[2B, T, H_ref]`` and head ``ref_weight`` ``[V, H_ref]``, whose log-probs are computed
    per chunk under no_grad (both at once raise). ``chunk_size``: pairs per chunk (default:
    as many as fit ``CHUNK_BUDGET_BYTES`` of logits). ``loss_scale`` multiplies the loss and
    the three gradients through the per-token coefficients, so the GEMMs produce them scaled
    (no extra pass). Every other argument as in ``rlhf_fast.dpo_loss``, and:

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
    config = loss_config(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                         average_logprobs=average_logprobs, nll_coef=nll_coef, gamma=gamma,
                         reference_free=reference_free, temperature=temperature,
                         discopop_tau=discopop_tau, f_divergence=f_divergence,
                         f_alpha=f_alpha, ld_alpha=ld_alpha, nll_aggregation=nll_aggregation,
                         alphapo=alphapo, loss_weights=loss_weights)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    loss_scale = check_loss_scale(loss_scale)
    check_linear(hidden, weight, bias)
    check_pair_batch(tuple(hidden.shape), "hidden")
    backend = shard_backend(backend, process_group, vocab_offset, weight.shape[0],
                            hidden.device)
    if (ref_hidden is None) != (ref_weight is None):
        raise ValueError("ref_hidden and ref_weight go together")
    if ref_hidden is not None:
        check_linear(ref_hidden, ref_weight, None)
        if ref_hidden.shape[:2] != hidden.shape[:2] or ref_weight.shape[0] != weight.shape[0]:
            raise ValueError("ref_hidden must be [2B, T, H_ref] and ref_weight [V, H_ref] "
                             "matching hidden's [2B, T] and weight's V")
        ref_hidden, ref_weight = ref_hidden.detach(), ref_weight.detach()
    logits_like = hidden.new_zeros(1).expand(*hidden.shape[:2], weight.shape[0])  # shape only
    inputs = preference_inputs(config, logits_like, targets, mask, ref_logprobs,
                               ref_model=ref_hidden is not None)
    loss, chosen, rejected, metrics = _LinearPreferenceLoss.apply(
        hidden, weight, bias, inputs.targets, inputs.mask, inputs.ref, ref_hidden, ref_weight,
        encode_config(config), backend, chunk_size, loss_scale, torch.is_grad_enabled())
    return PreferenceLossOutput(loss, chosen, rejected,
                                unpack_metrics(metrics, PREFERENCE_METRICS))
