"""Row blocks of a ``[B, T, V]`` tensor as views, sized to stay in the CPU's caches."""

from __future__ import annotations

from collections.abc import Iterator

from torch import Tensor

BLOCK_BYTES = 4 * 2**20
"""Size of one float32 ``[rows, V]`` scratch block of the torch backend's sweeps. Every pass
of a sweep (upcast, max, subtract, exp, sums) reads and writes one block while it is still
in cache, and the same few blocks are reused for the whole call: no allocation, and no
page faults, per block. Measured on the 2-core AMD EPYC development machine (one thread,
V=32000 float32): the stats and gradient sweeps took 9.4 and 8.4 ns an element with 64 MiB
blocks, freshly allocated per block; about 2 and 1.5 with the reused 4 MiB blocks and the
pass count of ``token_logprobs.py`` (benchmarks/NOTES.md, Fused-linear for long
sequences)."""

CHUNK_BYTES = BLOCK_BYTES
"""Former name of ``BLOCK_BYTES``, kept for callers that size chunks with it."""

SCRATCH_BLOCKS = 3
"""Scratch blocks a sweep holds at once (scaled logits / log p, exp, product)."""

WORKING_SET_BYTES = 4 * 2**20 * SCRATCH_BLOCKS + 16 * 2**20
"""Bound on the torch backend's live temporaries: ``SCRATCH_BLOCKS`` float32 blocks plus
the per-row vectors and the allocator's and thread pool's own buffers (16 MiB of slack)."""


def block_rows(n_cols: int, block_bytes: int = BLOCK_BYTES) -> int:
    """Rows of ``n_cols`` float32 columns in one block (at least 1)."""
    return max(1, block_bytes // max(1, 4 * n_cols))


def row_chunks(batch: int, seq_len: int, n_cols: int,
               chunk_bytes: int = BLOCK_BYTES) -> Iterator[tuple[int, slice]]:
    """Yield ``(b, t_slice)`` so that ``x[b, t_slice]`` is a ``[rows, V]`` view of bounded size."""
    rows = block_rows(n_cols, chunk_bytes)
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
