"""How a row of logits is cut into 16-byte vectors, tiles and a ragged edge.

A thread reads VEC = 16 / element-size consecutive columns with one 128-bit access (8 for
bf16 / fp16, 4 for fp32); a tile is ``[T, VEC]``: one vector for each of the T threads of the
program. The streaming loops read two tiles per trip (two loads in flight per thread); the
on-chip kernels hold ``[R * T, VEC]``, R vectors per thread. Tiles are 2-D on purpose: Triton
3.6 and 3.9 both lay ``[T, VEC]`` out one vector per thread, so that every per-thread
reduction stays in the thread (a ``[U, T, VEC]`` tile got shuffles inside the loop on 3.6).

Vector accesses need 16-byte aligned addresses. A row starts anywhere (``V = 50257`` puts row
``n`` at element ``50257 * n``), so each row is peeled:

    [0, head)                          head  < VEC columns up to the first aligned address
    [head, head + n_vec * VEC)         whole aligned vectors: the tiles (the last trip masks
                                       the vectors past the row, by whole vectors)
    [head + n_vec * VEC, n_cols)       tail < VEC columns

The head and the tail, at most 2 * (VEC - 1) columns, are read one column per thread.
Alignment is computed from the row's element offset, so it holds when the tensor's base
address is 16-byte aligned (Triton then specialises the pointer as such); otherwise the hint
is still true but the compiler, not knowing the base, emits narrower accesses.
"""

import triton
import triton.language as tl


@triton.jit
def row_geometry(row_offset, n_cols, VEC: tl.constexpr):
    """(head, n_vec) of a row starting ``row_offset`` (int64) elements past an aligned base:
    columns before the first aligned address, then whole aligned vectors. int32; n_cols >= 1."""
    head = ((VEC - row_offset % VEC) % VEC).to(tl.int32)
    head = tl.minimum(head, n_cols)
    return head, (n_cols - head) // VEC


@triton.jit
def tile_offsets(SLOTS: tl.constexpr, VEC: tl.constexpr):
    """int32 ``[SLOTS, VEC]``: offsets of ``SLOTS`` consecutive vectors (slot i: thread
    i mod T)."""
    return tl.arange(0, SLOTS)[:, None] * VEC + tl.arange(0, VEC)[None, :]


@triton.jit
def vector_mask(left, SLOTS: tl.constexpr, VEC: tl.constexpr):
    """``[SLOTS, VEC]`` mask of the first ``left`` vectors: constant over each vector, so
    masked accesses stay 128-bit."""
    return (tl.arange(0, SLOTS)[:, None] < left) & (tl.arange(0, VEC)[None, :] < VEC)


@triton.jit
def edge_columns(head, n_vec, n_cols, T: tl.constexpr, VEC: tl.constexpr):
    """Columns (int32 ``[T, 1]``, one per thread) and mask of the head and the tail: thread
    ``i < VEC`` takes column ``head - VEC + i`` (valid when >= 0), thread ``VEC + i`` takes
    ``head + n_vec * VEC + i`` (valid when < n_cols). Needs T >= 2 * VEC."""
    i = tl.arange(0, T)[:, None]
    cols = tl.where(i < VEC, head - VEC + i, head + n_vec * VEC + (i - VEC))
    valid = tl.where(i < VEC, cols >= 0, (i < 2 * VEC) & (cols < n_cols))
    return cols, valid
