"""Which implementation runs an op: ``"triton"`` kernels or the chunked ``"torch"`` backend.

``backend="auto"`` (the default, overridable with the ``RLHF_FAST_BACKEND`` variable) runs the
Triton kernels on CUDA tensors, and anywhere when ``TRITON_INTERPRET=1`` (the Triton
interpreter executes them on the CPU); otherwise the torch backend.
"""

from __future__ import annotations

import os

from torch import Tensor

BACKENDS = ("auto", "triton", "torch")


def triton_interpreted() -> bool:
    """True when Triton kernels run under the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, tensor: Tensor) -> str:
    """Return ``"triton"`` or ``"torch"`` for an op whose main input is ``tensor``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get("RLHF_FAST_BACKEND", "auto")
        if backend not in BACKENDS:
            raise ValueError(f"RLHF_FAST_BACKEND must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if tensor.is_cuda or triton_interpreted() else "torch"
    if backend == "triton" and not (tensor.is_cuda or triton_interpreted()):
        raise ValueError(
            f"backend='triton' needs CUDA tensors or TRITON_INTERPRET=1; got a tensor on "
            f"{tensor.device}. Use backend='torch' or 'auto'."
        )
    return backend
