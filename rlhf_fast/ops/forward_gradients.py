"""Gradients computed in the forward pass (docs/architecture.md, One coefficient per token):
what backward does with them, and how an input overwritten by its own gradient is flagged."""

from __future__ import annotations

import torch
from torch import Tensor


def scale_by_grad_output(grads: tuple[Tensor | None, ...], grad_output: Tensor | None
                         ) -> tuple[Tensor | None, ...]:
    """``grads * grad_output`` (each in its own dtype). Nothing is done when ``grad_output`` is
    1: one scalar sync saves a full read and write of every gradient in the common case."""
    if grad_output is None or grad_output.item() == 1.0:
        return grads
    scale = grad_output.float()
    return tuple(g * scale.to(g.dtype) if g is not None else None for g in grads)


def mark_overwritten(t: Tensor) -> None:
    """The kernels wrote over ``t`` through a raw pointer: bump its version so that any other
    saved use of it fails loudly instead of reading a gradient."""
    bump = getattr(torch.autograd.graph, "increment_version", None)
    if bump is not None:
        bump(t)
