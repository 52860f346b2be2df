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
batch and handed to every chunk; batch-wide entropy statistics (``entropy_advantage_alpha``,
``top_entropy_quantile``) come from a no-grad pre-pass over all chunks.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..backend import BACKENDS
from ..config import PolicyLossConfig
from ..loss_weights import entropy_statistics
from ..validation import check_target_range
from .forward_gradients import scale_by_grad_output
from .lm_head import HeadGradients, check_linear, chunk_logits, reference_logprobs
from .policy_loss import IGNORE, PolicyLossOutput, _resolve_config, policy_forward, side_inputs
from .row_sweeps import grad_sweep, stats_sweep

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
            pick = torch.where(counts > 0, values, values.new_tensor(
                float("inf") if key == "ratio_min" else float("-inf")))
            extreme = pick.min() if key == "ratio_min" else pick.max()
            merged[key] = torch.where(total > 0, extreme, values.new_tensor(1.0))
        else:
            merged[key] = torch.where(total > 0, (values * counts).sum() / total.clamp(min=1),
                                      values[0] * 0 + (1.0 if key == "ratio_mean" else 0.0))
    return merged


def _global_normalizer(c: PolicyLossConfig, valid: Tensor) -> float:
    """The aggregation's denominator over the whole batch (chunks see only part of it)."""
    if c.normalizer is not None:
        return c.normalizer
    if c.aggregation == "token_mean":
        return float(max(int(valid.sum()), 1))
    if c.aggregation in ("seq_mean_token_mean", "seq_mean_token_sum"):
        return float(max(int((valid.sum(-1) > 0).sum()), 1))
    max_length = c.max_length if c.max_length is not None else valid.shape[1]
    return float(valid.shape[0] * max_length)


class _LinearPolicyLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, advantages, valid, old, ref, rollout,
                ref_hidden, ref_weight, config, backend, chunk_size, metrics_out):
        needs = tuple(ctx.needs_input_grad[:3])
        write_grad = any(needs)
        batch, seq_len, _ = hidden.shape
        vocab = weight.shape[0]
        per_chunk = sequences_per_chunk(seq_len, vocab, hidden.element_size(), chunk_size, batch)
        chunks = [slice(s, min(s + per_chunk, batch)) for s in range(0, batch, per_chunk)]
        c = config.replace(normalizer=_global_normalizer(config, valid))

        entropy_stats = None
        if c.entropy_advantage_alpha is not None or c.top_entropy_quantile is not None:
            with torch.no_grad():  # pre-pass: the batch's entropy statistics
                entropy = torch.cat([stats_sweep(chunk_logits(hidden[r], weight, bias),
                                                 targets[r], c.temperature, IGNORE, True,
                                                 backend)[1] for r in chunks])
            entropy_stats = entropy_statistics(entropy, valid.float(), c.top_entropy_quantile)

        grads = HeadGradients(hidden, weight, bias, needs)
        logp = hidden.new_empty((batch, seq_len), dtype=torch.float32)
        entropy = torch.empty_like(logp)
        loss = torch.zeros((), dtype=torch.float64, device=hidden.device)
        parts = []
        for rows in chunks:
            with torch.no_grad():
                logits = chunk_logits(hidden[rows], weight, bias)
                ref_c = ref[rows] if ref is not None else None
                if ref_hidden is not None:
                    ref_c = reference_logprobs(ref_hidden[rows], ref_weight, targets[rows],
                                               c.temperature, IGNORE, backend)
                coef, logp_c, entropy_c, grad_logits = policy_forward(
                    logits, targets[rows], advantages[rows], valid[rows],
                    old[rows] if old is not None else None, ref_c,
                    rollout[rows] if rollout is not None else None, c, backend,
                    write_grad=write_grad, out=logits, entropy_stats=entropy_stats)
                loss += coef.loss.double()
                parts.append(coef.metrics)
                logp[rows], entropy[rows] = logp_c, entropy_c
                if write_grad:
                    grads.add(grad_logits, hidden[rows], rows)
                del logits, grad_logits
        metrics_out.update(_merge_metrics(parts))
        ctx.save_for_backward(*grads.result())
        ctx.mark_non_differentiable(logp, entropy)
        return loss.float(), logp, entropy

    @staticmethod
    def backward(ctx, grad_loss, _grad_logp, _grad_entropy):
        return scale_by_grad_output(ctx.saved_tensors, grad_loss) + (None,) * 12


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
    backend: str = "auto",
    **overrides: object,
) -> PolicyLossOutput:
    """``policy_loss`` on ``logits = hidden @ weight.T (+ bias)`` without materialising them.

    hidden ``[B, T, H]`` (or ``[N, H]``: one sequence), weight ``[V, H]`` (may be tied to the
    embedding), bias ``[V]`` or None, all of one dtype. Differentiable w.r.t. hidden, weight
    and bias; the weight gradient is accumulated in float32 across chunks and cast once.
    ``ref_hidden`` / ``ref_weight``: the reference model's final hidden states and head; its
    log-probs are computed per chunk under no_grad instead of being passed in.
    ``chunk_size``: sequences per chunk (default: as many as fit ``CHUNK_BUDGET_BYTES``).
    Every other argument, preset and field as in ``rlhf_fast.policy_loss``.
    """
    c = _resolve_config(config, overrides)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check_linear(hidden, weight, bias)
    hidden, targets, flat = _as_batch(hidden, targets)
    if (ref_hidden is None) != (ref_weight is None):
        raise ValueError("ref_hidden and ref_weight go together")
    if ref_hidden is not None:
        check_linear(ref_hidden, ref_weight, None)
        ref_hidden = ref_hidden.unsqueeze(0) if flat else ref_hidden
        if ref_hidden.shape[:2] != hidden.shape[:2] or ref_weight.shape[0] != weight.shape[0]:
            raise ValueError("ref_hidden must be [B, T, H_ref] and ref_weight [V, H_ref] "
                             "matching hidden's [B, T] and weight's V")
    if c.objective == "gmpo" and c.aggregation in ("token_mean", "seq_mean_token_sum_norm"):
        raise ValueError("linear_policy_loss with objective='gmpo' takes a seq_mean_* "
                         "aggregation (its denominator is the sequence count)")
    logits_like = hidden.new_zeros(1).expand(*hidden.shape[:2], weight.shape[0])  # shape only
    inputs = side_inputs(c, logits_like, flat, targets, mask, advantages, old_logprobs,
                         ref_logprobs, rollout_logprobs, ref_model=ref_hidden is not None)
    metrics: dict[str, Tensor] = {}
    loss, logp, entropy = _LinearPolicyLoss.apply(
        hidden, weight, bias, inputs.targets, inputs.advantages, inputs.valid, inputs.old,
        inputs.ref, inputs.rollout, ref_hidden, ref_weight, c, backend, chunk_size, metrics)
    if flat:
        logp, entropy = logp.squeeze(0), entropy.squeeze(0)
    return PolicyLossOutput(loss, logp, entropy, metrics)


class _LinearTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, ignore_index, with_entropy,
                backend, chunk_size):
        batch, seq_len, _ = hidden.shape
        per_chunk = sequences_per_chunk(seq_len, weight.shape[0], hidden.element_size(),
                                        chunk_size, batch)
        logp = hidden.new_empty((batch, seq_len), dtype=torch.float32)
        entropy = torch.empty_like(logp) if with_entropy else logp.new_empty(0)
        stats = hidden.new_empty((batch, seq_len, 3), dtype=torch.float32)
        with torch.no_grad():
            for s in range(0, batch, per_chunk):
                rows = slice(s, min(s + per_chunk, batch))
                lp, ent, st = stats_sweep(chunk_logits(hidden[rows], weight, bias),
                                          targets[rows], temperature, ignore_index,
                                          with_entropy, backend)
                logp[rows], stats[rows] = lp, st
                if with_entropy:
                    entropy[rows] = ent
        ctx.save_for_backward(hidden, weight, bias, targets, entropy, stats)
        ctx.hparams = (temperature, ignore_index, with_entropy, backend, per_chunk)
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, targets, entropy, stats = ctx.saved_tensors
        temperature, ignore_index, with_entropy, backend, per_chunk = ctx.hparams
        grad_entropy = grad_entropy if with_entropy else None
        if grad_logp is None and grad_entropy is None:
            return (None,) * 9
        grads = HeadGradients(hidden, weight, bias, tuple(ctx.needs_input_grad[:3]))
        for s in range(0, hidden.shape[0], per_chunk):
            rows = slice(s, min(s + per_chunk, hidden.shape[0]))
            logits = chunk_logits(hidden[rows], weight, bias)  # recomputed: see module doc
            g = grad_sweep(grad_logp[rows].float() if grad_logp is not None else None,
                           grad_entropy[rows].float() if grad_entropy is not None else None,
                           logits, targets[rows], entropy[rows] if with_entropy else entropy,
                           stats[rows], temperature, ignore_index, backend, out=logits)
            grads.add(g, hidden[rows], rows)
            del logits, g
        return grads.result() + (None,) * 6


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
) -> Tensor | tuple[Tensor, Tensor]:
    """``token_logprobs`` of ``hidden @ weight.T (+ bias)``, chunk by chunk.

    hidden ``[B, T, H]`` or ``[N, H]``; weight ``[V, H]``; bias ``[V]`` or None. Under
    ``torch.no_grad()`` (old / reference policy) it is one GEMM and one stats sweep per
    chunk, nothing saved; with grad, backward recomputes each chunk's logits. Returns float32
    logp (and entropy) of shape ``hidden.shape[:-1]``; differentiable w.r.t. hidden, weight
    and bias.
    """
    from ..validation import check_temperature

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check_linear(hidden, weight, bias)
    hidden, targets, flat = _as_batch(hidden, targets)
    temperature = check_temperature(temperature)
    check_target_range(targets, weight.shape[0], ignore_index)
    logp, entropy = _LinearTokenLogprobs.apply(hidden, weight, bias, targets, temperature,
                                               int(ignore_index), bool(return_entropy),
                                               backend, chunk_size)
    if flat:
        logp = logp.squeeze(0)
        entropy = entropy.squeeze(0) if return_entropy else entropy
    return (logp, entropy) if return_entropy else logp
