"""``linear_dpo_loss``: ``dpo_loss`` from hidden states and the ``lm_head`` weight, chunk by
chunk, never holding the ``[2B, T, V]`` logits (docs/architecture.md, Fused-linear chunking).

Every preference loss needs its pairs' sequence log-probs before any token's gradient, so
(as in ``linear_policy_loss``, whose module docstring has the chunking and the cost model):

- one pass, when the pairs fit the chunks: the whole batch in one chunk (padded or packed),
  or, for a padded batch whose pairs fit a chunk (``2T <= C``, or ``chunk_size`` pairs),
  chunks of whole pairs (rows ``s:e`` and their partners ``B+s:B+e``), so every pair's
  sequence log-probs, loss and coefficients complete inside its chunk. 6NHV FLOPs.
- two passes otherwise (a pair longer than a chunk, a packed batch of more than one chunk):
  a no-grad pre-pass (GEMM 1 and the stats sweep over chunks of tokens: logp and the
  sweep's stats, 16 B a token), the coefficient step on the whole batch, then the gradient
  pass (GEMM 1 again, gradient sweep, GEMMs 2-3): 2NHV more, +33%.

The pair count and the chosen-token count are taken over the whole batch, so the chunks add
up exactly. Per chunk:

    logits_c = hidden_c @ weight.T (+ bias)                # GEMM 1
    ref logp = stats sweep of ref_hidden_c @ ref_weight.T  # no_grad, when a ref model is given
    stats sweep / pair coefficients / gradient sweep       # grad written over logits_c
    grad_hidden_c  = G_c @ weight                          # GEMM 2
    grad_weight   += G_c.T @ hidden_c                      # GEMM 3, float32 (or main_grad)

The gradients are complete after the forward pass; backward only rescales. The data steps
run inside the custom op ``rlhf_fast::linear_dpo_loss`` (one opaque node for
``torch.compile``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from ..backend import BACKENDS
from ..preference_coefficients import preference_coefficients, preference_metrics
from ..preference_config import BATCH_SORTED_LOSSES, PreferenceLossConfig
from ..validation import check_loss_scale
from .chunking import check_chunk_args, plan_chunks
from .custom_op_args import decode_config, encode_config, pack_metrics, unpack_metrics
from .dpo import (
    OUTPUT_GRADIENT_REMEDY,
    PREFERENCE_METRICS,
    PreferenceLossOutput,
    check_packed_pairs,
    check_pair_batch,
    loss_config,
    pair_tokens,
    preference_forward,
    preference_inputs,
)
from .forward_gradients import reject_output_gradients, scale_by_grad_output
from .linear import _Chunked, _tokens_per_chunk, check_ref_model, check_unit_grad_output
from .lm_head import (
    HeadGradients,
    LogitsBuffer,
    check_linear,
    check_main_grad,
    chunk_logits,
    head_gradients_fake,
    head_outputs,
    reference_logprobs,
)
from .policy_loss import IGNORE
from .row_sweeps import grad_sweep, stats_sweep
from .vocab_parallel import shard_backend


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


def _scaled(coef, loss_scale: float):
    if loss_scale == 1.0:
        return coef
    return dataclasses.replace(coef, loss=coef.loss * loss_scale,
                               c_logp=coef.c_logp * loss_scale)


def _pair_pass(hidden, weight, bias, targets, valid, ref, ref_hidden, ref_weight, c, backend,
               loss_scale, head, num_pairs, chosen_tokens, chosen_sequences, pairs_per_chunk,
               nll_valid):
    """One pass over chunks of whole pairs (padded): (loss, chosen, rejected, parts)."""
    seq_len, vocab = hidden.shape[1], weight.shape[0]
    chunks = pair_chunks(num_pairs, pairs_per_chunk, hidden.device)
    rows = (2 * num_pairs if chunks[0][1] is None else 2 * pairs_per_chunk) * seq_len
    buffer = LogitsBuffer(rows, vocab, hidden.dtype, hidden.device)
    loss = torch.zeros((), dtype=torch.float64, device=hidden.device)
    chosen = hidden.new_empty(num_pairs, dtype=torch.float32)
    rejected = torch.empty_like(chosen)
    parts = []
    for pairs, index in chunks:
        targets_c = _rows(targets, index)
        ref_c = _rows(ref, index)
        if ref_hidden is not None:
            ref_c = reference_logprobs(_rows(ref_hidden, index), ref_weight, targets_c,
                                       c.temperature, IGNORE, backend,
                                       out=buffer.take(targets_c.numel())
                                       if ref_hidden.dtype == hidden.dtype else None)
        hidden_c = _rows(hidden, index).reshape(-1, hidden.shape[-1])
        logits = chunk_logits(hidden_c, weight, bias, out=buffer.take(hidden_c.shape[0]))
        logits = logits.view(*targets_c.shape, vocab)
        coef, grad = preference_forward(
            logits, targets_c, _rows(valid, index), ref_c, c, backend,
            num_pairs=num_pairs, chosen_tokens=chosen_tokens, write_grad=True, out=logits,
            loss_scale=loss_scale, chosen_sequences=chosen_sequences,
            nll_valid=_rows(nll_valid, index))
        loss += coef.loss
        parts.append(coef.pairs)
        chosen[pairs] = coef.pairs["logps_chosen"].float()
        rejected[pairs] = coef.pairs["logps_rejected"].float()
        head.add(grad.view(-1, vocab), hidden_c,
                 index if index is not None else (0, hidden_c.shape[0]))
        del logits, grad
    return loss, chosen, rejected, parts


def _linear_dpo_impl(hidden, weight, bias, targets, mask, ref, ref_hidden, ref_weight, config,
                     backend, chunk_size, loss_scale, needs, chunk_tokens, cu_seqlens,
                     main_grad, nll_mask):
    write_grad = any(needs)
    c = decode_config(PreferenceLossConfig, config)
    tok = pair_tokens(mask, nll_mask, targets, weight.shape[0], backend, cu_seqlens)
    targets, valid, nll_valid, layout = tok.targets, tok.valid, tok.nll_valid, tok.layout
    num_pairs, chosen_tokens, chosen_sequences = (tok.num_pairs, tok.chosen_tokens,
                                                  tok.chosen_sequences)
    batch, seq_len = hidden.shape[:2]
    packed = cu_seqlens is not None
    tokens = _tokens_per_chunk(chunk_tokens, hidden, weight, backend)
    single = batch * seq_len <= tokens and chunk_size is None
    # single: every path below then takes the whole batch as one chunk (one head.add).
    head = HeadGradients(hidden, weight, bias, needs, main_grad, backend,
                         one_chunk=single) if write_grad else None
    # AOT sorts the margins over the whole batch: chunks of pairs cannot hold it, so more
    # than one chunk takes the pre-pass (the pair step then sees the whole batch, exactly).
    # WPO with an NLL term weighs the NLL by the batch mean of the pair weights: the same.
    batch_wide = c.loss_type in BATCH_SORTED_LOSSES or (c.use_weighting and c.nll_weight != 0)
    pairs_split = batch_wide and not single
    if write_grad and not packed and not pairs_split \
            and (chunk_size is not None or 2 * seq_len <= tokens or single):
        pairs_per_chunk = chunk_size if chunk_size is not None \
            else max(1, tokens // max(1, 2 * seq_len))
        loss, chosen, rejected, parts = _pair_pass(
            hidden, weight, bias, targets, valid, ref, ref_hidden, ref_weight, c, backend,
            loss_scale, head, num_pairs, chosen_tokens, chosen_sequences, pairs_per_chunk,
            nll_valid)
    elif write_grad and single:
        # Packed, one chunk: the whole batch in one pass, its sequences given by the layout.
        targets_c, ref_c = targets, ref
        if ref_hidden is not None:
            ref_c = reference_logprobs(ref_hidden, ref_weight, targets, c.temperature, IGNORE,
                                       backend)
        hidden_c = hidden.reshape(-1, hidden.shape[-1])
        logits = chunk_logits(hidden_c, weight, bias).view(*targets_c.shape, -1)
        coef, grad = preference_forward(
            logits, targets_c, valid, ref_c, c, backend, num_pairs=num_pairs,
            chosen_tokens=chosen_tokens, write_grad=True, out=logits, loss_scale=loss_scale,
            layout=layout, chosen_sequences=chosen_sequences, nll_valid=nll_valid)
        head.add(grad.view(hidden_c.shape[0], -1), hidden_c, (0, hidden_c.shape[0]))
        del logits, grad
        loss, parts = coef.loss, [coef.pairs]
        chosen = coef.pairs["logps_chosen"].float()
        rejected = coef.pairs["logps_rejected"].float()
    else:
        loss, chosen, rejected, parts = _two_passes(
            hidden, weight, bias, targets, valid, ref, ref_hidden, ref_weight, c, backend,
            loss_scale, head, num_pairs, chosen_tokens, chosen_sequences, layout, tokens,
            nll_valid)
    metrics = pack_metrics(preference_metrics(parts, chosen_tokens), PREFERENCE_METRICS)
    grads = head.result() if head is not None else (None, None, None)
    return (loss.float(), chosen, rejected, metrics, *head_outputs(grads, hidden))


def _two_passes(hidden, weight, bias, targets, valid, ref, ref_hidden, ref_weight, c, backend,
                loss_scale, head, num_pairs, chosen_tokens, chosen_sequences, layout, tokens,
                nll_valid):
    """No-grad pre-pass over chunks of tokens, the pair step on the whole batch, then the
    gradient pass when ``head`` is given: (loss, chosen, rejected, parts)."""
    batch, seq_len = hidden.shape[:2]
    plan = plan_chunks(batch, seq_len, layout is not None, tokens, None, False)
    run = _Chunked(hidden, weight, bias, plan, ref_hidden, ref_weight)
    at = run.at
    logp = hidden.new_empty((batch, seq_len), dtype=torch.float32)
    stats = torch.empty((batch, seq_len, 3), dtype=torch.float32, device=hidden.device) \
        if head is not None else None
    ref_all = torch.empty_like(logp) if ref_hidden is not None else ref
    log_sum_sq = torch.empty_like(logp) if c.use_weighting else None
    for chunk in plan.chunks:
        if ref_hidden is not None:
            at(ref_all, chunk).copy_(run.reference(chunk, at(targets, chunk), c.temperature,
                                                   backend))
        logits = run.logits(chunk, run.rows(chunk.start, chunk.stop))
        targets_c = at(targets, chunk)
        sum_sq_c = logp.new_empty(targets_c.shape) if log_sum_sq is not None else None
        logp_c, _, stats_c = stats_sweep(logits, targets_c, c.temperature, IGNORE, False,
                                         backend, log_sum_sq=sum_sq_c)
        at(logp, chunk).copy_(logp_c)
        if sum_sq_c is not None:
            at(log_sum_sq, chunk).copy_(sum_sq_c)
        if stats is not None:
            at(stats, chunk, (3,)).copy_(stats_c)
    coef = _scaled(preference_coefficients(logp, valid, ref_all, c, num_pairs=num_pairs,
                                           chosen_tokens=chosen_tokens,
                                           chosen_sequences=chosen_sequences, layout=layout,
                                           log_sum_sq=log_sum_sq, nll_valid=nll_valid),
                   loss_scale)
    if head is not None:
        no_entropy = logp.new_empty(0)
        for chunk in plan.chunks:
            hidden_c = run.rows(chunk.start, chunk.stop)
            logits = run.logits(chunk, hidden_c)
            grad = grad_sweep(at(coef.c_logp, chunk), None, logits, at(targets, chunk),
                              no_entropy, at(stats, chunk, (3,)), c.temperature, IGNORE,
                              backend, out=logits)
            head.add(grad.view(chunk.size, -1), hidden_c, (chunk.start, chunk.stop))
            del logits, grad
    return (coef.loss, coef.pairs["logps_chosen"].float(), coef.pairs["logps_rejected"].float(),
            [coef.pairs])


@torch.library.custom_op("rlhf_fast::linear_dpo_loss", mutates_args=("main_grad",))
def linear_dpo_loss_op(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, mask: Tensor,
    ref: Optional[Tensor], ref_hidden: Optional[Tensor], ref_weight: Optional[Tensor],
    config: str, backend: str, chunk_size: Optional[int], loss_scale: float,
    need_hidden: bool, need_weight: bool, need_bias: bool, chunk_tokens: Optional[int] = None,
    cu_seqlens: Optional[Tensor] = None, main_grad: Optional[Tensor] = None,
    nll_mask: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, chosen ``[B]``, rejected ``[B]``, metrics ``[8]``, grad_hidden, grad_weight,
    grad_bias), each gradient ``[0]`` when not asked for (the weight's too when ``main_grad``
    receives it). Packed: hidden ``[1, N, H]``, per-token tensors ``[1, N]``."""
    return _linear_dpo_impl(hidden, weight, bias, targets, mask, ref, ref_hidden, ref_weight,
                            config, backend, chunk_size, loss_scale,
                            (need_hidden, need_weight, need_bias), chunk_tokens, cu_seqlens,
                            main_grad, nll_mask)


@linear_dpo_loss_op.register_fake
def _linear_dpo_loss_fake(hidden, weight, bias, targets, mask, ref, ref_hidden, ref_weight,
                          config, backend, chunk_size, loss_scale, need_hidden, need_weight,
                          need_bias, chunk_tokens=None, cu_seqlens=None, main_grad=None,
                          nll_mask=None):
    pairs = (hidden.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1) // 2
    return (hidden.new_empty((), dtype=torch.float32),
            hidden.new_empty((pairs,), dtype=torch.float32),
            hidden.new_empty((pairs,), dtype=torch.float32),
            hidden.new_empty((len(PREFERENCE_METRICS),), dtype=torch.float32),
            *head_gradients_fake(hidden, weight, bias, (need_hidden, need_weight, need_bias),
                                 main_grad))


class _LinearPreferenceLoss(torch.autograd.Function):
    """Forward: one custom op (chunks, loss, the three gradients); backward: the saved
    gradients times ``grad_output`` (nothing when it is 1)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, mask, ref, ref_hidden, ref_weight, config,
                backend, chunk_size, loss_scale, grad_enabled, chunk_tokens, cu_seqlens,
                main_grad, nll_mask):
        # needs_input_grad follows requires_grad even under no_grad: no gradient then.
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        needs = (grad_enabled and need_h, grad_enabled and (need_w or main_grad is not None),
                 grad_enabled and need_b)
        loss, chosen, rejected, metrics, *grads = linear_dpo_loss_op(
            hidden, weight, bias, targets, mask, ref, ref_hidden, ref_weight, config, backend,
            chunk_size, loss_scale, *needs, chunk_tokens, cu_seqlens, main_grad, nll_mask)
        ctx.main_grad = needs[1] and main_grad is not None
        saved = (needs[0], needs[1] and main_grad is None, needs[2])
        ctx.mark_non_differentiable(metrics)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*(g if need else None
                                for g, need in zip(grads, saved, strict=True)))
        return loss, chosen, rejected, metrics

    @staticmethod
    def backward(ctx, grad_loss, grad_chosen, grad_rejected, _grad_metrics):
        reject_output_gradients("linear_dpo_loss", {"out.chosen_logprobs": grad_chosen,
                                                    "out.rejected_logprobs": grad_rejected},
                                OUTPUT_GRADIENT_REMEDY)
        if ctx.main_grad:
            check_unit_grad_output(grad_loss)
        return scale_by_grad_output(ctx, ctx.saved_tensors, grad_loss) + (None,) * 14


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
    use_weighting: bool = False,
    nll_mask: Tensor | None = None,
    chunk_size: int | None = None,
    loss_scale: float = 1.0,
    backend: str = "auto",
    chunk_tokens: int | None = None,
    cu_seqlens: Tensor | None = None,
    main_grad: Tensor | None = None,
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
    per chunk under no_grad (both at once raise).

    - ``chunk_tokens``: tokens per chunk (default: ``rlhf_fast.ops.chunking``); pairs longer
      than a chunk take their sequence log-probs from a no-grad pre-pass (module
      docstring). ``chunk_size`` (padded only, not with ``chunk_tokens``): pairs per chunk.
    - ``cu_seqlens``: ``[2B + 1]`` int32 offsets of 2B packed sequences, the B chosen ones
      then their B rejected partners in the same order (as ``dpo_loss``): hidden ``[N, H]``,
      targets / mask ``[N]``, ``ref_logprobs`` ``[2B]`` or ``[N]``, ``ref_hidden``
      ``[N, H_ref]``; the results equal the padded layout's.
    - ``main_grad``: float32 ``[V, H]`` buffer the weight's gradient is added to in the
      forward pass, as in ``linear_policy_loss``.
    - ``loss_scale`` multiplies the loss and the three gradients through the per-token
      coefficients, so the GEMMs produce them scaled (no extra pass).

    - ``process_group``: the tensor-parallel group when ``weight`` (and ``bias``,
      ``ref_weight``) hold only this rank's contiguous slice of the vocabulary rows (slices
      may be uneven; targets stay full-vocabulary ids): the results are the full-vocabulary
      ones on every rank, the weight and bias gradients this rank's slice, and dL/dhidden
      the full one (summed over the group: one all-reduce of ``[2B, T, H]``); row statistics
      cost two all-reduces of 20-24 bytes a row (``rlhf_fast.ops.vocab_parallel``). Every
      rank cuts the batch into the same chunks (the default chunk is sized by the widest
      slice). Works with ``cu_seqlens`` too.
    - ``vocab_offset``: the full-vocabulary id of this rank's first row of ``weight``; None:
      from the slice widths, all-gathered once per group and width. When given with uneven
      slices, give ``chunk_tokens`` or ``chunk_size`` too (the default chunk is then sized
      by the local width, and must be the same on every rank).

    - ``use_weighting`` (WPO) and ``nll_mask`` (ORPO's prompt NLL) as in ``dpo_loss``:
      the WPO term ln sum_v p_v^2 comes from each chunk's stats sweep; with an NLL term too,
      more than one chunk takes the pre-pass (the NLL's weight is the batch mean of the pair
      weights). ``nll_mask``: ``[2B, T]`` (``[N]`` packed).

    Every other argument as in ``rlhf_fast.dpo_loss``.
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
    check_linear(hidden, weight, bias)
    sequences = check_packed_pairs(cu_seqlens, hidden, "hidden")
    check_chunk_args(chunk_size, chunk_tokens, sequences is not None)
    check_main_grad(main_grad, weight)
    if sequences is None:
        check_pair_batch(tuple(hidden.shape), "hidden")
    backend = shard_backend(backend, process_group, vocab_offset, weight.shape[0],
                            hidden.device)
    logits_like = hidden.new_zeros(1).expand(*hidden.shape[:-1], weight.shape[0])  # shape
    ref_hidden, ref_weight = check_ref_model(
        ref_hidden, ref_weight, hidden, weight, False,
        "[N, H_ref]" if sequences is not None else "[2B, T, H_ref]")
    inputs = preference_inputs(config, logits_like, targets, mask, ref_logprobs,
                               ref_model=ref_hidden is not None, sequences=sequences,
                               nll_mask=nll_mask)
    if sequences is not None:
        hidden = hidden.unsqueeze(0)
        ref_hidden = ref_hidden.unsqueeze(0) if ref_hidden is not None else None
    loss, chosen, rejected, metrics = _LinearPreferenceLoss.apply(
        hidden, weight, bias, inputs.targets, inputs.mask, inputs.ref, ref_hidden, ref_weight,
        encode_config(config), backend, chunk_size, loss_scale, torch.is_grad_enabled(),
        chunk_tokens, cu_seqlens, main_grad, inputs.nll_mask)
    return PreferenceLossOutput(loss, chosen, rejected,
                                unpack_metrics(metrics, PREFERENCE_METRICS))
