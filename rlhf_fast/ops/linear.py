"""Fused-linear ops: from hidden states and the ``lm_head`` weight to loss and gradients,
never holding the ``[tokens, vocab]`` logits (docs/architecture.md, Fused-linear chunking).

The batch is padded ``[B, T, H]`` or packed ``[N, H]`` with ``cu_seqlens``
(``rlhf_fast.ops.packing``); its N tokens are cut into chunks of C tokens (``chunk_tokens``,
by default from the device's memory, V, H and the dtype: ``rlhf_fast.ops.chunking``). Per
chunk:

    logits_c       = hidden_c @ weight.T (+ bias)   # GEMM 1, into one reused [C, V] buffer
    stats sweep / coefficients / gradient sweep     # grad written over logits_c in place
    grad_hidden_c  = G_c @ weight                   # GEMM 2, into grad_hidden's rows
    grad_weight   += G_c.T @ hidden_c               # GEMM 3, ONE float32 buffer (or main_grad)

so the peak extra memory is one chunk, O(N) float32 per-token state and the float32 weight
gradient, whatever the sequence length. The path is chosen from the config, the layout and
the chunk plan (shapes only, never data):

- one pass, token chunks: every token-level loss (PPO-clip and its variants, GRPO, DAPO,
  Dr. GRPO, CISPO, SAPO, the KL, the entropy bonus, token rollout correction, sequence
  rollout correction given ``old_logprobs``). A token's coefficient needs only the token
  and weights known from the mask; the aggregation and rollout weights are computed over
  the whole batch first (O(N)) and each chunk takes its slice. 6NHV FLOPs.
- one pass, chunks of whole sequences: the sequence-level losses (GSPO, GSPO-token, GMPO,
  on-policy sequence rollout correction) on a padded batch whose sequences fit a chunk
  (T <= C): a chunk holds ``C // T`` sequences, which complete inside it. 6NHV.
- two passes: the sequence-level losses when a sequence is longer than a chunk or the batch
  is packed (its boundaries are device data), and the batch entropy statistics (AEPO's
  z-score, the top-entropy quantile) whenever there is more than one chunk. A no-grad
  pre-pass runs GEMM 1 and the stats sweep on every chunk and keeps logp, entropy and the
  sweep's stats (20 B a token); the coefficient step runs once on the whole batch, exactly
  as on materialised logits; then the gradient pass runs GEMM 1 again, the gradient sweep
  and GEMMs 2-3. The extra cost is the second GEMM 1: 2NHV FLOPs, +33% over 6NHV, paid on
  this path only. The logits are still read twice and written once in all.

A batch that fits one chunk is one chunk (one pass). Without a gradient (old policy,
evaluation) every loss is the pre-pass and the coefficient step: 2NHV.
``linear_token_logprobs`` cannot know its upstream gradients in the forward: its forward is
the pre-pass and its backward the gradient pass (8NHV for forward + backward).

Every op's data steps run inside a ``torch.library`` custom op (one opaque node for
``torch.compile``), and none reads a device value on the host.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from ..backend import BACKENDS
from ..config import PolicyLossConfig
from ..loss_weights import aggregation_weights, rollout_weights, sequence_count
from ..policy_coefficients import policy_coefficients
from ..validation import check_loss_scale, check_temperature, device_check
from .chunking import ChunkPlan, check_chunk_args, default_chunk_tokens, plan_chunks
from .custom_op_args import decode_config, encode_config, pack_metrics, unpack_metrics
from .forward_gradients import reject_output_gradients, scale_by_grad_output
from .lm_head import (
    HeadGradients,
    LogitsBuffer,
    TokenRows,
    check_linear,
    check_main_grad,
    chunk_logits,
    head_gradients_fake,
    head_outputs,
    reference_logprobs,
)
from .packing import Packed, Padded, check_cu_seqlens_values, expand_advantages
from .policy_loss import (
    IGNORE,
    POLICY_METRICS,
    PolicyLossOutput,
    _resolve_config,
    check_packed,
    policy_forward,
    scale_coefficients,
    side_inputs,
    token_inputs,
)
from .row_sweeps import check_targets, grad_sweep, stats_sweep
from .vocab_parallel import chunk_width, shard_backend


def prepass_kind(c: PolicyLossConfig, has_old: bool) -> str | None:
    """What a token's coefficient needs beyond the token and the mask: None (token-level),
    ``"sequence"`` (statistics of its sequence's log-probs: GSPO, GSPO-token, GMPO, VESPO,
    the off-policy mask, on-policy sequence rollout correction) or ``"batch"`` (the batch's
    entropy statistics, and every config with ``needs_whole_batch``: the covariance
    selection, batch-normalised rollout weights, the KL / entropy terms' own aggregations,
    empty-sequence counts). Either takes the pre-pass when the plan has more than one chunk
    (unless, for ``"sequence"``, every chunk holds whole sequences); the coefficient step
    then sees the whole batch, as on materialised logits."""
    if c.entropy.advantage_alpha is not None or c.entropy.top_quantile is not None \
            or c.needs_whole_batch:
        return "batch"
    if c.ratio.level != "token" or c.objective in ("gmpo", "vespo") \
            or c.rollout.off_policy_mask_threshold is not None:
        return "sequence"
    if c.rollout.mode in ("sequence_truncate", "sequence_mask", "sequence_gate") \
            and not has_old:
        return "sequence"
    return None


def _merge_metrics(parts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Token-count-weighted means, min / max of the ratio extremes, summed count."""
    if len(parts) == 1:
        return parts[0]
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


class _Chunked:
    """The flattened per-token view of one call: the chunk plan, hidden rows, one reused
    logits buffer, and ``at(x, chunk)``, a chunk of a per-token tensor shaped
    ``chunk.shape``."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, plan: ChunkPlan,
                 ref_hidden: Tensor | None = None, ref_weight: Tensor | None = None):
        self.weight, self.bias, self.plan = weight, bias, plan
        self.vocab = weight.shape[0]
        self.rows = TokenRows(hidden)
        self.buffer = LogitsBuffer(plan.max_size, self.vocab, hidden.dtype, hidden.device)
        self.ref_rows = TokenRows(ref_hidden) if ref_hidden is not None else None
        self.ref_weight = ref_weight
        if ref_hidden is not None:
            same = ref_hidden.dtype == hidden.dtype
            self.ref_buffer = self.buffer if same else LogitsBuffer(
                plan.max_size, self.vocab, ref_hidden.dtype, hidden.device)

    @staticmethod
    def at(x: Tensor | None, chunk, trailing: tuple[int, ...] = ()) -> Tensor | None:
        if x is None:
            return None
        return x.reshape(-1, *trailing)[chunk.start:chunk.stop].view(*chunk.shape, *trailing)

    def logits(self, chunk, hidden_c: Tensor) -> Tensor:
        """The chunk's logits ``[*chunk.shape, V]`` in the reused buffer."""
        out = chunk_logits(hidden_c, self.weight, self.bias, out=self.buffer.take(chunk.size))
        return out.view(*chunk.shape, self.vocab)

    def reference(self, chunk, targets_c: Tensor, temperature: float, backend: str) -> Tensor:
        """The reference model's log-probs of the chunk (before its own logits reuse the
        buffer)."""
        return reference_logprobs(self.ref_rows(chunk.start, chunk.stop), self.ref_weight,
                                  targets_c, temperature, IGNORE, backend,
                                  out=self.ref_buffer.take(chunk.size))


def _tokens_per_chunk(chunk_tokens: int | None, hidden: Tensor, weight: Tensor,
                      backend: str = "auto") -> int:
    """``chunk_tokens``, or the default chunk (``rlhf_fast.ops.chunking``) sized by the
    vocabulary width: with a vocabulary shard in ``backend``, the widest slice's, so that
    every rank cuts the same chunks (the plan depends on shapes and the device's size
    only)."""
    if chunk_tokens is not None:
        return chunk_tokens
    n_tokens = hidden.shape[0] * hidden.shape[1]
    return default_chunk_tokens(n_tokens, chunk_width(weight.shape[0], backend),
                                weight.shape[1], hidden.dtype, hidden.device)


def _linear_policy_impl(hidden, weight, bias, targets, advantages, mask, old, ref, rollout,
                        ref_hidden, ref_weight, config, backend, chunk_size, loss_scale,
                        needs, chunk_tokens, cu_seqlens, main_grad):
    write_grad = any(needs)
    c = decode_config(PolicyLossConfig, config)
    batch, seq_len, _ = hidden.shape
    targets, valid = token_inputs(mask, targets, weight.shape[0], backend)
    layout = Packed.from_cu_seqlens(cu_seqlens, seq_len) if cu_seqlens is not None \
        else Padded(batch)
    # Per-token inputs contiguous once, so that every chunk's slice is a view.
    adv = expand_advantages(advantages, layout, valid).contiguous()
    old, ref, rollout = (x.contiguous() if x is not None else None for x in (old, ref, rollout))
    m = valid.float()
    kind = prepass_kind(c, old is not None)
    plan = plan_chunks(batch, seq_len, cu_seqlens is not None,
                       _tokens_per_chunk(chunk_tokens, hidden, weight, backend), chunk_size,
                       want_whole_sequences=kind == "sequence")
    run = _Chunked(hidden, weight, bias, plan, ref_hidden, ref_weight)
    at = run.at
    head = HeadGradients(hidden, weight, bias, needs, main_grad, backend,
                         one_chunk=len(plan.chunks) == 1) if write_grad else None
    logp = hidden.new_empty((batch, seq_len), dtype=torch.float32)
    entropy = torch.empty_like(logp)
    one_pass = write_grad and len(plan.chunks) > 0 and (
        len(plan.chunks) == 1 or kind is None or (kind == "sequence" and plan.whole_sequences))
    if one_pass:
        # Whole-batch weights, each chunk its slice: the chunks add up to the unchunked
        # loss and gradient (docs/architecture.md, Fused-linear chunking).
        weights = aggregation_weights(m, c.aggregation.mode, c.aggregation.normalizer,
                                      c.aggregation.max_length, c.aggregation.count_empty_sequences,
                                      layout)
        rollout_w = rollout_weights(old, rollout, m, c, layout).contiguous() \
            if rollout is not None and old is not None else None
        seq_norm = sequence_count(m, c, layout) if c.objective == "gmpo" else None
        loss = torch.zeros((), dtype=torch.float64, device=hidden.device)
        parts = []
        for chunk in plan.chunks:
            ref_c = at(ref, chunk) if ref_hidden is None \
                else run.reference(chunk, at(targets, chunk), c.temperature, backend)
            hidden_c = run.rows(chunk.start, chunk.stop)
            logits = run.logits(chunk, hidden_c)
            chunk_layout = layout if len(plan.chunks) == 1 else Padded(chunk.shape[0])
            coef, logp_c, entropy_c, grad = policy_forward(
                logits, at(targets, chunk), at(adv, chunk), at(valid, chunk), at(old, chunk),
                ref_c, at(rollout, chunk), c, backend, write_grad=True, out=logits,
                loss_scale=loss_scale, layout=chunk_layout, weights=at(weights, chunk),
                rollout_weight=at(rollout_w, chunk), sequence_norm=seq_norm)
            loss += coef.loss.double()
            parts.append(coef.metrics)
            at(logp, chunk).copy_(logp_c)
            at(entropy, chunk).copy_(entropy_c)
            head.add(grad.view(chunk.size, -1), hidden_c, (chunk.start, chunk.stop))
            del logits, grad
        metrics = _merge_metrics(parts)
    else:
        # Pre-pass (no grad): logp, entropy, stats of every token; one coefficient step.
        stats = hidden.new_empty((batch, seq_len, 3), dtype=torch.float32) if write_grad \
            else None
        ref_all = torch.empty_like(logp) if ref_hidden is not None else ref
        for chunk in plan.chunks:
            if ref_hidden is not None:
                at(ref_all, chunk).copy_(run.reference(chunk, at(targets, chunk),
                                                       c.temperature, backend))
            logits = run.logits(chunk, run.rows(chunk.start, chunk.stop))
            logp_c, entropy_c, stats_c = stats_sweep(logits, at(targets, chunk),
                                                     c.temperature, IGNORE, True, backend)
            at(logp, chunk).copy_(logp_c)
            at(entropy, chunk).copy_(entropy_c)
            if stats is not None:
                at(stats, chunk, (3,)).copy_(stats_c)
        coef = scale_coefficients(
            policy_coefficients(logp, entropy, valid, adv, old, ref_all, rollout, c,
                                layout=layout), loss_scale)
        loss, metrics = coef.loss, coef.metrics
        if write_grad:
            # Gradient pass: GEMM 1 again (the pre-pass's 2NHV), gradient sweep, GEMMs 2-3.
            for chunk in plan.chunks:
                hidden_c = run.rows(chunk.start, chunk.stop)
                logits = run.logits(chunk, hidden_c)
                grad = grad_sweep(at(coef.c_logp, chunk), at(coef.c_entropy, chunk), logits,
                                  at(targets, chunk), at(entropy, chunk),
                                  at(stats, chunk, (3,)), c.temperature, IGNORE, backend,
                                  out=logits)
                head.add(grad.view(chunk.size, -1), hidden_c, (chunk.start, chunk.stop))
                del logits, grad
    metrics = pack_metrics(metrics, POLICY_METRICS)
    grads = head.result() if head is not None else (None, None, None)
    return (loss.float(), logp, entropy, metrics, *head_outputs(grads, hidden))


@torch.library.custom_op("rlhf_fast::linear_policy_loss", mutates_args=("main_grad",))
def linear_policy_loss_op(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
    advantages: Tensor, mask: Tensor, old: Optional[Tensor], ref: Optional[Tensor],
    rollout: Optional[Tensor], ref_hidden: Optional[Tensor], ref_weight: Optional[Tensor],
    config: str, backend: str, chunk_size: Optional[int], loss_scale: float,
    need_hidden: bool, need_weight: bool, need_bias: bool, chunk_tokens: Optional[int] = None,
    cu_seqlens: Optional[Tensor] = None, main_grad: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, logp ``[B, T]``, entropy ``[B, T]``, metrics ``[9]``, grad_hidden, grad_weight,
    grad_bias), each gradient ``[0]`` when not asked for (the weight's too when ``main_grad``
    receives it). Packed: hidden ``[1, N, H]``, per-token tensors ``[1, N]``."""
    return _linear_policy_impl(hidden, weight, bias, targets, advantages, mask, old, ref,
                               rollout, ref_hidden, ref_weight, config, backend, chunk_size,
                               loss_scale, (need_hidden, need_weight, need_bias), chunk_tokens,
                               cu_seqlens, main_grad)


@linear_policy_loss_op.register_fake
def _linear_policy_loss_fake(hidden, weight, bias, targets, advantages, mask, old, ref,
                             rollout, ref_hidden, ref_weight, config, backend, chunk_size,
                             loss_scale, need_hidden, need_weight, need_bias,
                             chunk_tokens=None, cu_seqlens=None, main_grad=None):
    per_token = hidden.shape[:2]
    return (hidden.new_empty((), dtype=torch.float32),
            hidden.new_empty(per_token, dtype=torch.float32),
            hidden.new_empty(per_token, dtype=torch.float32),
            hidden.new_empty((len(POLICY_METRICS),), dtype=torch.float32),
            *head_gradients_fake(hidden, weight, bias, (need_hidden, need_weight, need_bias),
                                 main_grad))


MAIN_GRAD_REMEDY = (
    "main_grad: the weight's gradient was added to main_grad in the forward pass (scaled by "
    "loss_scale), so a gradient other than 1 reaching the loss cannot be applied to it. "
    "Scale with loss_scale=..., and call backward() on the loss (or a plain sum of losses).")


def check_unit_grad_output(grad_loss: Tensor | None) -> None:
    """With ``main_grad`` the weight's share of the gradient is already applied: the loss's
    gradient must be 1 (``device_check``: no host sync)."""
    if grad_loss is not None:
        device_check((grad_loss == 1).all(), lambda: MAIN_GRAD_REMEDY, RuntimeError)


class _LinearPolicyLoss(torch.autograd.Function):
    """Forward: one custom op (chunks, loss, the three gradients); backward: the saved
    gradients times ``grad_output`` (nothing when it is 1)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, advantages, mask, old, ref, rollout,
                ref_hidden, ref_weight, config, backend, chunk_size, loss_scale, grad_enabled,
                chunk_tokens, cu_seqlens, main_grad):
        # needs_input_grad follows requires_grad even under no_grad: no gradient then.
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        needs = (grad_enabled and need_h, grad_enabled and (need_w or main_grad is not None),
                 grad_enabled and need_b)
        loss, logp, entropy, metrics, *grads = linear_policy_loss_op(
            hidden, weight, bias, targets, advantages, mask, old, ref, rollout, ref_hidden,
            ref_weight, config, backend, chunk_size, loss_scale, *needs, chunk_tokens,
            cu_seqlens, main_grad)
        ctx.main_grad = needs[1] and main_grad is not None
        saved = (needs[0], needs[1] and main_grad is None, needs[2])
        ctx.mark_non_differentiable(metrics)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*(g if need else None
                                for g, need in zip(grads, saved, strict=True)))
        return loss, logp, entropy, metrics

    @staticmethod
    def backward(ctx, grad_loss, grad_logp, grad_entropy, _grad_metrics):
        reject_output_gradients("linear_policy_loss", {"out.logprobs": grad_logp,
                                                       "out.entropy": grad_entropy},
                                LINEAR_OUTPUT_GRADIENT_REMEDY)
        if ctx.main_grad:
            check_unit_grad_output(grad_loss)
        return scale_by_grad_output(ctx, ctx.saved_tensors, grad_loss) + (None,) * 16


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


def check_ref_model(ref_hidden: Tensor | None, ref_weight: Tensor | None, hidden: Tensor,
                    weight: Tensor, flat: bool, rows: str) -> tuple[Tensor | None, ...]:
    """``ref_hidden`` / ``ref_weight`` together, matching hidden's tokens and weight's V;
    returned detached, ``ref_hidden`` shaped like ``hidden`` (``[1, N, H_ref]`` when flat)."""
    if (ref_hidden is None) != (ref_weight is None):
        raise ValueError("ref_hidden and ref_weight go together")
    if ref_hidden is None:
        return None, None
    check_linear(ref_hidden, ref_weight, None)
    ref_hidden = ref_hidden.unsqueeze(0) if flat and ref_hidden.dim() == 2 else ref_hidden
    if ref_hidden.shape[:-1] != hidden.shape[:-1] or ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"ref_hidden must be {rows} and ref_weight [V, H_ref] matching "
                         f"hidden's tokens and weight's V")
    return ref_hidden.detach(), ref_weight.detach()


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
    chunk_tokens: int | None = None,
    cu_seqlens: Tensor | None = None,
    main_grad: Tensor | None = None,
    process_group: ProcessGroup | None = None,
    vocab_offset: int | None = None,
    **overrides: object,
) -> PolicyLossOutput:
    """``policy_loss`` on ``logits = hidden @ weight.T (+ bias)`` without materialising them.

    hidden ``[B, T, H]`` (or ``[N, H]``: one sequence, or packed sequences with
    ``cu_seqlens``), weight ``[V, H]`` (may be tied to the embedding), bias ``[V]`` or None,
    all of one dtype. Differentiable w.r.t. hidden, weight and bias; the weight gradient is
    accumulated in float32 across chunks and cast once.

    - ``chunk_tokens``: tokens per chunk (default: ``rlhf_fast.ops.chunking``, from the
      device's memory, V, H and the dtype). Chunks cut sequences where needed; losses that
      need their sequences' statistics first (GSPO, GMPO, VESPO, the off-policy mask, ...)
      or statistics of the whole batch (the entropy statistics, and every config with
      ``PolicyLossConfig.needs_whole_batch``) then take them from a no-grad pre-pass
      (module docstring: 2NHV more), which gives the coefficient step the whole batch.
      ``chunk_size`` (padded batches only; not with ``chunk_tokens``): whole sequences per
      chunk instead.
    - ``cu_seqlens``: ``[S + 1]`` int32 offsets of S packed sequences (padding-free
      layout): hidden ``[N, H]``, targets / mask / log-probs ``[N]``, advantages ``[S]`` or
      ``[N]``; sequence statistics, aggregations and normalisers follow the boundaries, and
      the results equal the padded layout's. ``seq_mean_token_sum_norm`` needs
      ``max_length`` (or ``normalizer``) then.
    - ``ref_hidden`` / ``ref_weight``: the reference model's final hidden states and head;
      its log-probs are computed per chunk under no_grad instead of being passed in (passing
      ``ref_logprobs`` as well raises).
    - ``main_grad``: a float32 ``[V, H]`` buffer (Megatron-style ``weight.main_grad``) that
      the weight's gradient is ADDED to, in this forward pass (the op computes its
      gradients in the forward), instead of being returned: no second float32 ``[V, H]``
      buffer, ``weight.grad`` stays None. Scale with ``loss_scale``; a gradient other than
      1 reaching the loss raises in backward.
    - ``loss_scale`` multiplies the loss and the three gradients through the per-token
      coefficients, so the GEMMs produce them scaled (no extra pass).
    - ``process_group``: the tensor-parallel group when ``weight`` (and ``bias``,
      ``ref_weight``) hold only this rank's contiguous slice of the vocabulary rows (slices
      may be uneven; targets stay full-vocabulary ids): the results are the full-vocabulary
      ones on every rank, the weight and bias gradients this rank's slice, and dL/dhidden
      the full one (summed over the group: one all-reduce of ``[B, T, H]``); row statistics
      cost two all-reduces of 20-24 bytes a row (``rlhf_fast.ops.vocab_parallel``). Every
      rank cuts the batch into the same chunks (the default chunk is sized by the widest
      slice). Works with ``cu_seqlens`` too.
    - ``vocab_offset``: the full-vocabulary id of this rank's first row of ``weight``; None:
      from the slice widths, all-gathered once per group and width. When given with uneven
      slices, give ``chunk_tokens`` or ``chunk_size`` too (the default chunk is then sized
      by the local width, and must be the same on every rank).

    ``out.logprobs`` / ``out.entropy`` carry no gradient back (a nonzero one raises; use
    ``entropy_coef``, or ``rlhf_fast.linear_token_logprobs`` for other terms). Every other
    argument, preset and field as in ``rlhf_fast.policy_loss``.
    """
    c = _resolve_config(config, overrides)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    loss_scale = check_loss_scale(loss_scale)
    check_linear(hidden, weight, bias)
    sequences = check_packed(c, cu_seqlens, hidden, "hidden")
    check_chunk_args(chunk_size, chunk_tokens, sequences is not None)
    check_main_grad(main_grad, weight)
    hidden, targets, flat = _as_batch(hidden, targets)
    ref_hidden, ref_weight = check_ref_model(ref_hidden, ref_weight, hidden, weight, flat,
                                             "[N, H_ref]" if flat else "[B, T, H_ref]")
    backend = shard_backend(backend, process_group, vocab_offset, weight.shape[0],
                            hidden.device)
    logits_like = hidden.new_zeros(1).expand(*hidden.shape[:2], weight.shape[0])  # shape only
    inputs = side_inputs(c, logits_like, flat, targets, mask, advantages, old_logprobs,
                         ref_logprobs, rollout_logprobs, ref_model=ref_hidden is not None,
                         sequences=sequences)
    loss, logp, entropy, metrics = _LinearPolicyLoss.apply(
        hidden, weight, bias, inputs.targets, inputs.advantages, inputs.mask, inputs.old,
        inputs.ref, inputs.rollout, ref_hidden, ref_weight, encode_config(c), backend,
        chunk_size, loss_scale, torch.is_grad_enabled(), chunk_tokens, cu_seqlens, main_grad)
    if flat:
        logp, entropy = logp.squeeze(0), entropy.squeeze(0)
    return PolicyLossOutput(loss, logp, entropy, unpack_metrics(metrics, POLICY_METRICS))


# --- linear_token_logprobs: custom ops and their autograd -----------------------------------

def _logprobs_plan(hidden: Tensor, weight: Tensor, chunk_size: int | None,
                   chunk_tokens: int | None, packed: bool, backend: str = "auto") -> ChunkPlan:
    batch, seq_len, _ = hidden.shape
    tokens = _tokens_per_chunk(chunk_tokens, hidden, weight, backend)
    return plan_chunks(batch, seq_len, packed, tokens, chunk_size, want_whole_sequences=False)


@torch.library.custom_op("rlhf_fast::linear_token_logprobs", mutates_args=())
def linear_token_logprobs_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                             targets: Tensor, temperature: float, ignore_index: int,
                             with_entropy: bool, backend: str, chunk_size: Optional[int],
                             chunk_tokens: Optional[int] = None,
                             cu_seqlens: Optional[Tensor] = None,
                             keep_logits: bool = False,
                             ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(logp ``[B, T]``, entropy ``[B, T]`` or ``[0]``, stats ``[B, T, 3]``, kept logits) of
    ``hidden @ weight.T (+ bias)``: one GEMM and one stats sweep per chunk of tokens.

    Kept logits: with ``keep_logits`` (a backward will follow) and the whole batch in one
    chunk, that chunk's logits ``[B*T, V]`` in hidden's dtype, for the backward to reuse
    instead of recomputing GEMM 1 (they are within the chunk memory budget by definition);
    otherwise ``[0]``."""
    check_targets(targets, weight.shape[0], ignore_index, backend)
    if cu_seqlens is not None:
        check_cu_seqlens_values(cu_seqlens, hidden.shape[1])
    plan = _logprobs_plan(hidden, weight, chunk_size, chunk_tokens, cu_seqlens is not None,
                          backend)
    run = _Chunked(hidden, weight, bias, plan)
    logp = hidden.new_empty(hidden.shape[:2], dtype=torch.float32)
    entropy = torch.empty_like(logp) if with_entropy else logp.new_empty(0)
    stats = hidden.new_empty((*hidden.shape[:2], 3), dtype=torch.float32)
    for chunk in plan.chunks:
        logits = run.logits(chunk, run.rows(chunk.start, chunk.stop))
        lp, ent, st = stats_sweep(logits, run.at(targets, chunk), temperature, ignore_index,
                                  with_entropy, backend)
        run.at(logp, chunk).copy_(lp)
        run.at(stats, chunk, (3,)).copy_(st)
        if with_entropy:
            run.at(entropy, chunk).copy_(ent)
    kept = (run.buffer.take(plan.max_size) if _keeps_logits(plan, keep_logits)
            else hidden.new_empty(0))
    return logp, entropy, stats, kept


def _keeps_logits(plan: ChunkPlan, keep_logits: bool) -> bool:
    """Whether the forward hands its logits to the backward: one chunk only (shapes only,
    so the fake agrees with the op)."""
    return keep_logits and len(plan.chunks) == 1


@linear_token_logprobs_op.register_fake
def _linear_token_logprobs_fake(hidden, weight, bias, targets, temperature, ignore_index,
                                with_entropy, backend, chunk_size, chunk_tokens=None,
                                cu_seqlens=None, keep_logits=False):
    per_token = hidden.shape[:2]
    plan = _logprobs_plan(hidden, weight, chunk_size, chunk_tokens, cu_seqlens is not None,
                          backend)
    kept = ((plan.max_size, weight.shape[0]) if _keeps_logits(plan, keep_logits) else (0,))
    return (hidden.new_empty(per_token, dtype=torch.float32),
            hidden.new_empty(per_token if with_entropy else (0,), dtype=torch.float32),
            hidden.new_empty((*per_token, 3), dtype=torch.float32),
            hidden.new_empty(kept))


@torch.library.custom_op("rlhf_fast::linear_token_logprobs_backward", mutates_args=())
def linear_token_logprobs_backward_op(
    grad_logp: Optional[Tensor], grad_entropy: Optional[Tensor], hidden: Tensor,
    weight: Tensor, bias: Optional[Tensor], targets: Tensor, entropy: Tensor, stats: Tensor,
    temperature: float, ignore_index: int, backend: str, chunk_size: Optional[int],
    need_hidden: bool, need_weight: bool, need_bias: bool,
    chunk_tokens: Optional[int] = None, packed: bool = False,
    kept_logits: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_hidden, grad_weight, grad_bias), ``[0]`` where not asked for: each chunk's
    logits recomputed (see the module docstring), or the forward's ``kept_logits`` (one
    chunk, ``[B*T, V]``; read, never written, so a retained graph's second backward sees
    them unchanged), gradient sweep, GEMMs 2-3."""
    needs = (need_hidden, need_weight, need_bias)
    plan = _logprobs_plan(hidden, weight, chunk_size, chunk_tokens, packed, backend)
    grads = HeadGradients(hidden, weight, bias, needs, backend=backend,
                          one_chunk=len(plan.chunks) == 1)
    run = _Chunked(hidden, weight, bias, plan)
    at = run.at
    for chunk in plan.chunks:
        hidden_c = run.rows(chunk.start, chunk.stop)
        reuse = kept_logits is not None and kept_logits.numel() > 0
        logits = (kept_logits.view(*chunk.shape, run.vocab) if reuse
                  else run.logits(chunk, hidden_c))
        g = grad_sweep(at(grad_logp, chunk).float() if grad_logp is not None else None,
                       at(grad_entropy, chunk).float() if grad_entropy is not None else None,
                       logits, at(targets, chunk),
                       at(entropy, chunk) if grad_entropy is not None else entropy,
                       at(stats, chunk, (3,)), temperature, ignore_index, backend,
                       out=run.buffer.take(chunk.size).view_as(logits) if reuse else logits)
        grads.add(g.view(chunk.size, -1), hidden_c, (chunk.start, chunk.stop))
        del logits, g
    return head_outputs(grads.result(), hidden)


@linear_token_logprobs_backward_op.register_fake
def _linear_token_logprobs_backward_fake(grad_logp, grad_entropy, hidden, weight, bias,
                                         targets, entropy, stats, temperature, ignore_index,
                                         backend, chunk_size, need_hidden, need_weight,
                                         need_bias, chunk_tokens=None, packed=False,
                                         kept_logits=None):
    return head_gradients_fake(hidden, weight, bias, (need_hidden, need_weight, need_bias))


def _linear_logprobs_setup(ctx, inputs, output) -> None:
    hidden, weight, bias, targets, temperature, ignore_index, with_entropy, backend, \
        chunk_size, chunk_tokens, cu_seqlens, _keep = inputs
    _, entropy, stats, kept_logits = output
    ctx.save_for_backward(hidden, weight, bias, targets, entropy, stats, kept_logits)
    ctx.hparams = (temperature, ignore_index, with_entropy, backend, chunk_size, chunk_tokens,
                   cu_seqlens is not None)
    ctx.mark_non_differentiable(stats, kept_logits)
    ctx.set_materialize_grads(False)


def _linear_logprobs_backward(ctx, grad_logp, grad_entropy, _grad_stats, _grad_kept):
    temperature, ignore_index, with_entropy, backend, chunk_size, chunk_tokens, packed = \
        ctx.hparams
    grad_entropy = grad_entropy if with_entropy else None
    needs = tuple(ctx.needs_input_grad[:3])
    if (grad_logp is None and grad_entropy is None) or not any(needs):
        return (None,) * 12
    hidden, weight, bias, targets, entropy, stats, kept_logits = ctx.saved_tensors
    grads = linear_token_logprobs_backward_op(
        grad_logp, grad_entropy, hidden, weight, bias, targets, entropy, stats, temperature,
        ignore_index, backend, chunk_size, *needs, chunk_tokens, packed, kept_logits)
    kept = tuple(g if need else None for g, need in zip(grads, needs, strict=True))
    return (*kept, *(None,) * 9)


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
    chunk_tokens: int | None = None,
    cu_seqlens: Tensor | None = None,
    process_group: ProcessGroup | None = None,
    vocab_offset: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """``token_logprobs`` of ``hidden @ weight.T (+ bias)``, chunk by chunk of tokens.

    hidden ``[B, T, H]`` or ``[N, H]``; weight ``[V, H]``; bias ``[V]`` or None. Under
    ``torch.no_grad()`` (old / reference policy) it is one GEMM and one stats sweep per
    chunk, nothing saved; with grad, backward recomputes each chunk's logits (a batch of
    one chunk keeps its logits instead: 3 GEMMs, not 4). Returns float32
    logp (and entropy) of shape ``hidden.shape[:-1]``; differentiable w.r.t. hidden, weight
    and bias. ``chunk_tokens``: tokens per chunk (default: ``rlhf_fast.ops.chunking``);
    ``chunk_size``: whole sequences per chunk instead (padded batches). ``cu_seqlens``
    (packed ``[N, H]`` rows) is checked and changes nothing: every output is per token. A
    target outside ``[0, V)`` other than ``ignore_index`` raises (checked on the device, as
    in ``token_logprobs``). ``torch.compile`` (``fullgraph=True``) sees it as one custom op
    (and one for its backward).

    Args (vocabulary-parallel heads):
        process_group: the tensor-parallel group when ``weight`` (and ``bias``) hold only
            this rank's contiguous slice of the vocabulary rows (slices may be uneven;
            targets stay full-vocabulary ids): the results are the full-vocabulary ones on
            every rank, the weight and bias gradients this rank's slice, and dL/dhidden the
            full one (summed over the group: one all-reduce of ``[B, T, H]``); row
            statistics cost two all-reduces of 20-24 bytes a row
            (``rlhf_fast.ops.vocab_parallel``). Every rank cuts the batch into the same
            chunks (the default chunk is sized by the widest slice).
        vocab_offset: the full-vocabulary id of this rank's first row of ``weight``; None:
            from the slice widths, all-gathered once per group and width. When given with
            uneven slices, give ``chunk_tokens`` or ``chunk_size`` too (the default chunk is
            then sized by the local width, and must be the same on every rank).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check_linear(hidden, weight, bias)
    packed = check_packed(None, cu_seqlens, hidden, "hidden") is not None
    check_chunk_args(chunk_size, chunk_tokens, packed)
    hidden, targets, flat = _as_batch(hidden, targets)
    temperature = check_temperature(temperature)
    backend = shard_backend(backend, process_group, vocab_offset, weight.shape[0],
                            hidden.device)
    keep_logits = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    logp, entropy, _, _ = linear_token_logprobs_op(hidden, weight, bias, targets, temperature,
                                                   int(ignore_index), bool(return_entropy),
                                                   backend, chunk_size, chunk_tokens,
                                                   cu_seqlens, keep_logits)
    if flat:
        logp = logp.squeeze(0)
        entropy = entropy.squeeze(0) if return_entropy else entropy
    return (logp, entropy) if return_entropy else logp
