"""The ``lm_head`` side of the fused-linear ops: input checks, one chunk's logits, and the
gradients of hidden, weight and bias accumulated chunk by chunk."""

from __future__ import annotations

import torch
from torch import Tensor

from .row_sweeps import stats_sweep
from .vocab_parallel import all_reduce_hidden_grad


def check_linear(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    """hidden ``[B, T, H]`` or ``[N, H]``, weight ``[V, H]``, bias ``[V]`` or None: one float
    dtype, one device."""
    if not isinstance(hidden, Tensor) or hidden.dim() not in (2, 3) \
            or hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError("hidden must be a float32 / bfloat16 / float16 tensor [B, T, H] or "
                        "[N, H]")
    if not isinstance(weight, Tensor) or weight.dim() != 2 \
            or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, H] with H = {hidden.shape[-1]} (hidden's last "
                         f"dim), got {tuple(getattr(weight, 'shape', ()))}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match hidden's {hidden.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if bias is not None and (tuple(bias.shape) != (weight.shape[0],)
                             or bias.dtype != hidden.dtype):
        raise ValueError(f"bias must be [{weight.shape[0]}] of dtype {hidden.dtype}")


def chunk_logits(hidden_c: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``[b, T, H] @ [V, H].T (+ bias)`` in the input dtype: ``[b, T, V]`` (GEMM 1)."""
    if bias is not None:
        return torch.addmm(bias, hidden_c.flatten(0, 1), weight.t()).view(
            *hidden_c.shape[:2], weight.shape[0])
    return (hidden_c.flatten(0, 1) @ weight.t()).view(*hidden_c.shape[:2], weight.shape[0])


def reference_logprobs(ref_hidden_c: Tensor, ref_weight: Tensor, targets_c: Tensor,
                       temperature: float, ignore_index: int, backend: str) -> Tensor:
    """float32 log-probs ``[b, T]`` of the reference model's head on one chunk, under no_grad:
    one GEMM and one stats sweep, the chunk's reference logits freed on return."""
    with torch.no_grad():
        logits = chunk_logits(ref_hidden_c, ref_weight, None)
        return stats_sweep(logits, targets_c, temperature, ignore_index, False, backend)[0]


def accumulate_weight_grad(acc: Tensor, grad_logits: Tensor, hidden: Tensor) -> None:
    """``acc += grad_logits.T @ hidden`` into the float32 ``acc`` (never a bf16 partial)."""
    g, h = grad_logits.flatten(0, 1), hidden.flatten(0, 1)
    if acc.is_cuda and g.dtype != torch.float32:
        try:  # cuBLAS: bf16 / fp16 inputs, fp32 accumulation and output, in place.
            torch.addmm(acc, g.t(), h, out_dtype=torch.float32, out=acc)
            return
        except (RuntimeError, TypeError):
            pass
    acc.addmm_(g.t().float(), h.float())


class HeadGradients:
    """The gradients of ``logits = hidden @ weight.T (+ bias)`` summed over chunks: GEMM 2
    into ``grad_hidden``, GEMM 3 into ONE float32 ``grad_weight`` buffer, the bias sum in
    float32. Inputs that need no gradient get none (their GEMM is skipped). With a
    vocabulary shard in ``backend`` the weight holds this rank's rows only, and
    ``grad_hidden`` is summed over the group in ``result`` (``vocab_parallel.py``)."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Tensor | None,
                 needs: tuple[bool, bool, bool], backend: str = "auto"):
        need_h, need_w, need_b = needs
        self.weight, self.bias, self.backend = weight, bias, backend
        self.hidden = torch.zeros_like(hidden) if need_h else None
        self.weight_acc = torch.zeros(weight.shape, dtype=torch.float32,
                                      device=weight.device) if need_w else None
        self.bias_acc = torch.zeros(weight.shape[0], dtype=torch.float32,
                                    device=weight.device) if need_b else None

    def add(self, grad_logits: Tensor, hidden_c: Tensor,
            rows: slice | Tensor | None = None) -> None:
        """One chunk: ``grad_logits`` ``[b, T, V]`` of the chunk whose hidden states are
        ``hidden_c``, found at ``rows`` of the batch (a slice, an index tensor, or None for
        the whole batch)."""
        if self.hidden is not None:
            g_hidden = (grad_logits.flatten(0, 1) @ self.weight).view(hidden_c.shape)
            if rows is None:
                self.hidden.copy_(g_hidden)
            elif isinstance(rows, slice):
                self.hidden[rows] = g_hidden
            else:
                self.hidden.index_copy_(0, rows, g_hidden)
            del g_hidden
        if self.weight_acc is not None:
            accumulate_weight_grad(self.weight_acc, grad_logits, hidden_c)
        if self.bias_acc is not None:
            self.bias_acc += grad_logits.float().sum((0, 1))

    def result(self) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """(grad_hidden, grad_weight, grad_bias) in the inputs' dtypes, None where not
        needed; the float32 accumulators are cast once."""
        if self.hidden is not None:
            all_reduce_hidden_grad(self.hidden, self.backend)
        return (self.hidden,
                self.weight_acc.to(self.weight.dtype) if self.weight_acc is not None else None,
                self.bias_acc.to(self.bias.dtype) if self.bias_acc is not None else None)


def head_outputs(grads: tuple[Tensor | None, ...], like: Tensor) -> tuple[Tensor, ...]:
    """``HeadGradients.result()`` as custom-op outputs (tensors only): an input that needs no
    gradient gets an empty ``[0]`` tensor like ``like``."""
    return tuple(g if g is not None else like.new_empty(0) for g in grads)


def head_gradients_fake(hidden: Tensor, weight: Tensor, bias: Tensor | None,
                        needs: tuple[bool, bool, bool]) -> tuple[Tensor, Tensor, Tensor]:
    """What ``head_outputs`` returns, as fake tensors (shapes, dtypes, strides) for tracing:
    ``zeros_like(hidden)``'s layout, contiguous weight and bias gradients."""
    need_h, need_w, need_b = needs
    empty = hidden.new_empty(0)
    return (torch.empty_like(hidden) if need_h else empty,
            weight.new_empty(weight.shape) if need_w else empty,
            bias.new_empty(bias.shape) if need_b and bias is not None else empty)
