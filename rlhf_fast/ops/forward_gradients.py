"""Gradients computed in the forward pass (docs/architecture.md, One coefficient per token):
what backward does with them, and the guard on outputs that carry no gradient.

The ops that write their gradient in the forward (``policy_loss``, ``dpo_loss`` and their
fused-linear forms) already fold ``loss_scale`` into it, so ``loss.backward()`` reaches
backward with ``grad_output = 1`` and nothing is left to do. Any other ``grad_output`` is
applied without a host sync:

- CPU tensors, eager: the value is read on the host (there is no device to wait for) and the
  gradient is multiplied only when it is not 1;
- CUDA tensors, eager: ``kernels/grad_scale.py`` reads the factor on the device and rescales
  the saved gradient in place, or returns at once when the factor is 1;
- under ``torch.compile``: one pointwise multiply in the compiled backward graph.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import validation
from ..validation import device_check

SCALE_BLOCK = 1024
"""Columns per block of the rescale kernel (8 bf16 a thread at 4 warps)."""

MAX_SCALE_PROGRAMS = 1024
"""Programs of the rescale kernel: each strides over rows, so a factor of 1 costs this many
scalar loads, whatever the gradient's size."""


def _rows_view(g: Tensor) -> tuple[int, int, int, int, int] | None:
    """``(n_rows, seq_len, n_cols, stride_b, stride_t)`` of ``g`` seen as ``[B, T, C]`` rows of
    unit column stride, or None when it cannot be (then torch rescales it)."""
    if g.dim() == 0 or g.stride(-1) != 1:
        return None
    if g.dim() == 1:
        return 1, 1, g.shape[0], 0, 0
    if g.dim() == 2:
        return g.shape[0], g.shape[0], g.shape[1], 0, g.stride(0)
    if g.dim() == 3:
        return g.shape[0] * g.shape[1], g.shape[1], g.shape[2], g.stride(0), g.stride(1)
    return None


def scale_rows_(g: Tensor, factor: Tensor) -> bool:
    """``g *= factor`` in place with the Triton kernel (``factor`` a float32 device scalar;
    nothing happens on the device when it is 1), for CUDA tensors and, under
    ``TRITON_INTERPRET=1``, CPU ones. False, with ``g`` untouched, where the kernel does not
    apply (no Triton, or ``g`` not a stack of rows with unit column stride)."""
    from ..backend import triton_interpreted

    view = _rows_view(g)
    if view is None or not (g.is_cuda or triton_interpreted()):
        return False
    from ..kernels.grad_scale import scale_rows_kernel

    n_rows, seq_len, n_cols, stride_b, stride_t = view
    if n_rows * n_cols:
        grid = (min(n_rows, MAX_SCALE_PROGRAMS),)
        scale_rows_kernel[grid](g, factor.reshape(1), n_rows, seq_len, n_cols, stride_b,
                                stride_t, BLOCK=SCALE_BLOCK, num_warps=4)
    return True


def scale_by_grad_output(ctx, grads: tuple[Tensor | None, ...], grad_output: Tensor | None
                         ) -> tuple[Tensor | None, ...]:
    """The saved forward gradients ``grads`` times ``grad_output`` (a 0-dim tensor), without
    a host sync (see the module docstring). A gradient rescaled in place by the kernel stays
    saved; ``ctx`` remembers the factor it holds, so a second backward through a retained
    graph scales from the right base."""
    if grad_output is None:
        return (None,) * len(grads)
    if torch.compiler.is_compiling():
        return tuple((g.float() * grad_output.float()).to(g.dtype) if g is not None else None
                     for g in grads)
    if validation.host_reads_are_free(grad_output):
        value = grad_output.item()
        if value == 1.0:
            return grads
        return tuple(g * value if g is not None else None for g in grads)
    target = grad_output.detach().float()
    applied = getattr(ctx, "applied_grad_scale", None)
    factor = target if applied is None else target / applied
    ctx.applied_grad_scale = target.clone()
    scaled = []
    for g in grads:
        if g is not None and not scale_rows_(g, factor):
            g = (g.float() * target).to(g.dtype)  # out of place: the saved one stays as is
        scaled.append(g)
    return tuple(scaled)


def reject_output_gradients(op: str, grads: dict[str, Tensor | None], remedy: str) -> None:
    """Outputs of an op that writes its gradient in the forward (per-token log-probs and
    entropies, sequence log-probs) carry no gradient to its inputs: raise when a nonzero
    gradient reaches one of them, instead of dropping it (``device_check``: no host sync)."""
    for name, g in grads.items():
        if g is None:
            continue
        device_check((g == 0).all(), lambda name=name: (
            f"{op}: a nonzero gradient reached {name}, which does not carry one back to the "
            f"inputs (the op writes its gradient in the forward pass, for the loss only). "
            f"{remedy}"), RuntimeError)
