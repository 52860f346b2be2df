"""The ``lm_head`` side of the fused-linear ops: input checks, one chunk's hidden rows and
logits, and the gradients of hidden, weight and bias accumulated chunk by chunk."""

from __future__ import annotations

import torch
from torch import Tensor

from .row_sweeps import stats_sweep
from .vocab_parallel import all_reduce_hidden_grad

UPCAST_BLOCK_BYTES = 16 * 2**20
"""Bound on the float32 copy of a chunk's 16-bit gradient that the CPU's weight-gradient GEMM
reads: the copy is made ``UPCAST_BLOCK_BYTES`` of columns at a time, not for the chunk."""

CAST_BLOCK_BYTES = 8 * 2**20
"""Float32 bytes cast per step when the weight gradient is written in its 16-bit dtype into
the accumulator's own storage (``WeightGradAccumulator.result``)."""


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


def check_main_grad(main_grad: object, weight: Tensor) -> None:
    """None, or a float32 ``[V, H]`` tensor on the weight's device that is not the weight."""
    if main_grad is None:
        return
    if not isinstance(main_grad, Tensor) or main_grad.dtype != torch.float32 \
            or tuple(main_grad.shape) != tuple(weight.shape):
        raise TypeError(f"main_grad must be a float32 tensor of the weight's shape "
                        f"{tuple(weight.shape)} (the float32 gradient buffer the weight's "
                        f"gradient is added to), got "
                        f"{getattr(main_grad, 'dtype', type(main_grad).__name__)} "
                        f"{tuple(getattr(main_grad, 'shape', ()))}")
    if main_grad.device != weight.device:
        raise ValueError(f"main_grad is on {main_grad.device} but weight is on "
                         f"{weight.device}")
    if main_grad.requires_grad:
        raise ValueError("main_grad must not require grad (it is a gradient buffer)")


class TokenRows:
    """The rows of a ``[B, T, X]`` tensor in flattened token order: ``rows(start, stop)`` is
    ``[stop - start, X]``, a view when the strides allow it (a contiguous tensor, a batch of
    one), else a copy of just those rows (``hidden[:, :-1]`` of a model's output)."""

    def __init__(self, x: Tensor):
        self.x = x
        try:
            self.flat: Tensor | None = x.view(-1, x.shape[-1])
        except RuntimeError:
            self.flat = None

    def __call__(self, start: int, stop: int) -> Tensor:
        if self.flat is not None:
            return self.flat[start:stop]
        seq_len = self.x.shape[1]
        pieces = [self.x[b, max(start - b * seq_len, 0):min(stop - b * seq_len, seq_len)]
                  for b in range(start // seq_len, (stop - 1) // seq_len + 1)]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


class LogitsBuffer:
    """One ``[C, V]`` buffer, in the inputs' dtype, that every chunk's logits (and their
    gradient, written over them) reuse: no allocation per chunk."""

    def __init__(self, rows: int, vocab: int, dtype: torch.dtype, device: torch.device):
        self.buffer = torch.empty((rows, vocab), dtype=dtype, device=device)

    def take(self, rows: int) -> Tensor:
        return self.buffer[:rows]


def chunk_logits(hidden_c: Tensor, weight: Tensor, bias: Tensor | None,
                 out: Tensor | None = None) -> Tensor:
    """``hidden_c @ weight.T (+ bias)`` in the input dtype (GEMM 1): ``[n, H]`` -> ``[n, V]``
    (``[b, T, H]`` -> ``[b, T, V]``), into ``out`` when given."""
    if hidden_c.dim() == 3:
        flat = chunk_logits(hidden_c.flatten(0, 1), weight, bias, out)
        return flat.view(*hidden_c.shape[:2], weight.shape[0])
    if bias is not None:
        return torch.addmm(bias, hidden_c, weight.t(), out=out)
    return torch.mm(hidden_c, weight.t(), out=out)


def reference_logprobs(ref_hidden_c: Tensor, ref_weight: Tensor, targets_c: Tensor,
                       temperature: float, ignore_index: int, backend: str,
                       out: Tensor | None = None) -> Tensor:
    """float32 log-probs (``targets_c``'s shape) of the reference model's head on one chunk
    (hidden rows ``[n, H_ref]``), under no_grad: one GEMM (into ``out`` when given) and one
    stats sweep."""
    with torch.no_grad():
        logits = chunk_logits(ref_hidden_c.reshape(-1, ref_hidden_c.shape[-1]), ref_weight,
                              None, out)
        logits = logits.view(*targets_c.shape, ref_weight.shape[0])
        return stats_sweep(logits, targets_c, temperature, ignore_index, False, backend)[0]


def accumulate_weight_grad(acc: Tensor, grad_logits: Tensor, hidden: Tensor,
                           hidden32: Tensor | None = None) -> None:
    """``acc += grad_logits.T @ hidden`` into the float32 ``acc`` ``[V', H]`` (never a bf16
    partial); ``grad_logits`` ``[n, V']``, ``hidden`` ``[n, H]``; ``hidden32``: ``hidden``
    in float32 when the caller has it."""
    g, h = grad_logits, hidden
    if g.dtype == torch.float32:
        acc.addmm_(g.t(), h)
        return
    if acc.is_cuda:
        try:  # cuBLAS: bf16 / fp16 inputs, fp32 accumulation and output, in place.
            torch.addmm(acc, g.t(), h, out_dtype=torch.float32, out=acc)
            return
        except (RuntimeError, TypeError):
            pass
    # No 16-bit x 16-bit -> float32 GEMM here (the CPU): upcast column blocks of g.
    h32 = hidden32 if hidden32 is not None else h.float()
    cols = max(128, UPCAST_BLOCK_BYTES // max(1, 4 * g.shape[0]))
    for c0 in range(0, g.shape[1], cols):
        acc[c0:c0 + cols].addmm_(g[:, c0:c0 + cols].t().float(), h32)


class WeightGradAccumulator:
    """dL/dW summed over chunks in float32, returned once in the weight's dtype.

    - ``main_grad`` given: the chunks' products are added to it (Megatron-style trainers keep
      one float32 buffer per weight); nothing else is allocated and ``result()`` is None.
    - float32 weight: one ``[V, H]`` float32 buffer, returned as it is.
    - 16-bit weight: two float32 buffers of ``ceil(V/2)`` and ``floor(V/2)`` rows. The first
      one's storage holds exactly the ``[V, H]`` 16-bit result, so ``result()`` writes the
      result into it, rows in increasing order (each block is cast to a small temporary
      before it is written, and the bytes written never reach rows not yet read), copies the
      second half after it, and frees the second buffer: the cast needs no ``[V, H]`` copy
      beside the float32 accumulator (2.3 GiB + 1.2 GiB at V = 151936, H = 4096 otherwise).
    """

    def __init__(self, weight: Tensor, main_grad: Tensor | None = None):
        vocab, hidden = weight.shape
        self.shape, self.dtype = (vocab, hidden), weight.dtype
        self.external = main_grad is not None
        if main_grad is not None:
            self.parts = [(0, vocab, main_grad)]
        elif weight.dtype == torch.float32 or vocab < 2:
            self.parts = [(0, vocab, torch.zeros(weight.shape, dtype=torch.float32,
                                                 device=weight.device))]
        else:
            half = (vocab + 1) // 2
            self.parts = [(r0, r1, torch.zeros((r1 - r0, hidden), dtype=torch.float32,
                                               device=weight.device))
                          for r0, r1 in ((0, half), (half, vocab))]

    def add(self, grad_logits: Tensor, hidden_c: Tensor) -> None:
        """``+= grad_logits.T @ hidden_c`` (``[n, V]``, ``[n, H]``)."""
        hidden32 = None
        if grad_logits.dtype != torch.float32 and not grad_logits.is_cuda:
            hidden32 = hidden_c.float()
        whole = len(self.parts) == 1
        for r0, r1, acc in self.parts:
            accumulate_weight_grad(acc, grad_logits if whole else grad_logits[:, r0:r1],
                                   hidden_c, hidden32)

    def result(self) -> Tensor | None:
        """The gradient in the weight's dtype (None with ``main_grad``); call once."""
        if self.external:
            return None
        if len(self.parts) == 1:
            acc = self.parts[0][2]
            return acc if self.dtype == torch.float32 else acc.to(self.dtype)
        (_, half, first), (_, _, second) = self.parts
        vocab, hidden = self.shape
        out = first.view(-1).view(self.dtype)[:vocab * hidden].view(vocab, hidden)
        step = max(1, CAST_BLOCK_BYTES // (4 * hidden))
        for r0 in range(0, half, step):
            r1 = min(r0 + step, half)
            out[r0:r1].copy_(first[r0:r1].to(self.dtype))   # read whole, then write
        for r0 in range(0, vocab - half, step):
            r1 = min(r0 + step, vocab - half)
            out[half + r0:half + r1].copy_(second[r0:r1])
        self.parts = []
        return out


class HeadGradients:
    """The gradients of ``logits = hidden @ weight.T (+ bias)`` summed over chunks: GEMM 2
    into ``grad_hidden``, GEMM 3 into the float32 ``WeightGradAccumulator``, the bias sum in
    float32. Inputs that need no gradient get none (their GEMM is skipped); ``main_grad``
    receives the weight's gradient instead of a new tensor. With a vocabulary shard in
    ``backend`` the weight holds this rank's rows only, and ``grad_hidden`` is summed over
    the group in ``result`` (``vocab_parallel.py``).

    ``one_chunk``: the caller adds exactly one chunk (the whole batch). A 16-bit weight's
    gradient is then one GEMM in the weight's dtype (float32 accumulation inside the GEMM,
    one rounding: the same value as the float32 accumulator cast once), with no float32
    ``[V, H]`` buffers and, on the CPU, no float32 copies of the gradient's columns."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Tensor | None,
                 needs: tuple[bool, bool, bool], main_grad: Tensor | None = None,
                 backend: str = "auto", one_chunk: bool = False):
        need_h, need_w, need_b = needs
        self.weight, self.bias, self.backend = weight, bias, backend
        # One chunk, 16-bit weight, no main_grad: GEMM 3 straight into the result.
        self.direct = need_w and one_chunk and main_grad is None \
            and weight.dtype != torch.float32
        self.weight_grad: Tensor | None = None
        need_w = need_w and not self.direct
        # Every token belongs to exactly one chunk: each row is written once, no fill.
        self.hidden = hidden.new_empty(hidden.shape) if need_h else None
        self.hidden_flat = self.hidden.view(-1, hidden.shape[-1]) if need_h else None
        self.weight_acc = WeightGradAccumulator(weight, main_grad) if need_w else None
        self.bias_acc = torch.zeros(weight.shape[0], dtype=torch.float32,
                                    device=weight.device) if need_b else None

    def add(self, grad_logits: Tensor, hidden_c: Tensor,
            rows: tuple[int, int] | Tensor) -> None:
        """One chunk: ``grad_logits`` ``[n, V]`` of the chunk whose hidden rows are
        ``hidden_c`` ``[n, H]``, found at tokens ``rows = (start, stop)`` of the flattened
        batch, or at the sequences ``rows`` (an index over dim 0 of ``hidden``)."""
        if self.hidden is not None:
            if isinstance(rows, tuple):
                torch.mm(grad_logits, self.weight, out=self.hidden_flat[rows[0]:rows[1]])
            else:
                g_hidden = grad_logits @ self.weight
                self.hidden.index_copy_(0, rows, g_hidden.view(rows.shape[0],
                                                               *self.hidden.shape[1:]))
                del g_hidden
        if self.direct:
            assert self.weight_grad is None, "one_chunk: add is called once"
            self.weight_grad = torch.mm(grad_logits.t(), hidden_c)
        if self.weight_acc is not None:
            self.weight_acc.add(grad_logits, hidden_c)
        if self.bias_acc is not None:
            self.bias_acc += grad_logits.sum(0, dtype=torch.float32)

    def result(self) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """(grad_hidden, grad_weight, grad_bias) in the inputs' dtypes, None where not
        needed (or where ``main_grad`` took the weight's); the float32 accumulators are cast
        once."""
        if self.hidden is not None:
            all_reduce_hidden_grad(self.hidden, self.backend)
        weight_grad = self.weight_grad if self.direct else (
            self.weight_acc.result() if self.weight_acc is not None else None)
        return (self.hidden, weight_grad,
                self.bias_acc.to(self.bias.dtype) if self.bias_acc is not None else None)


def head_outputs(grads: tuple[Tensor | None, ...], like: Tensor) -> tuple[Tensor, ...]:
    """``HeadGradients.result()`` as custom-op outputs (tensors only): an input that needs no
    gradient gets an empty ``[0]`` tensor like ``like``."""
    return tuple(g if g is not None else like.new_empty(0) for g in grads)


def head_gradients_fake(hidden: Tensor, weight: Tensor, bias: Tensor | None,
                        needs: tuple[bool, bool, bool], main_grad: Tensor | None = None
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """What ``head_outputs`` returns, as fake tensors (shapes, dtypes, strides) for tracing:
    contiguous gradients; none for the weight when ``main_grad`` takes it."""
    need_h, need_w, need_b = needs
    empty = hidden.new_empty(0)
    return (hidden.new_empty(hidden.shape) if need_h else empty,
            weight.new_empty(weight.shape) if need_w and main_grad is None else empty,
            bias.new_empty(bias.shape) if need_b and bias is not None else empty)
