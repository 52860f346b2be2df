"""Row chunks of a ``[B, T, V]`` tensor as views, sized by a byte budget."""

from __future__ import annotations

from collections.abc import Iterator

from torch import Tensor

CHUNK_BYTES = 64 * 2**20
"""Budget of one chunk's float32 ``[rows, V]`` temporaries (a few of them live at once)."""

WORKING_SET_BYTES = 4 * CHUNK_BYTES
"""Bound on the torch backend's live temporaries: each sweep holds at most two float32
``[rows, V]`` chunks and a bool mask at once (measured 145 MiB for the gradient sweep and
153 MiB for the stats sweep at CHUNK_BYTES = 64 MiB); the bound leaves room for the
allocator's and the thread pool's own buffers."""


def row_chunks(batch: int, seq_len: int, n_cols: int,
               chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple[int, slice]]:
    """Yield ``(b, t_slice)`` so that ``x[b, t_slice]`` is a ``[rows, V]`` view of bounded size."""
    rows = max(1, chunk_bytes // max(1, 4 * n_cols))
    for b in range(batch):
        for start in range(0, seq_len, rows):
            yield b, slice(start, min(start + rows, seq_len))



def merge_batch(x: Tensor) -> Tensor:
    """View ``[B, T, ...]`` as ``[1, B*T, ...]`` when the strides allow it (no copy), else ``x``.

    Chunks then span sequence boundaries, so ``B`` large and ``T`` small needs few chunks.
    """
    try:
        return x.view(1, x.shape[0] * x.shape[1], *x.shape[2:])
    except RuntimeError:
        return x
