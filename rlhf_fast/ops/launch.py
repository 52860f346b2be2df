"""Launch shapes of the row kernels: threads per row and vector width, from V alone.

A row kernel runs one program of ``32 * num_warps`` threads per row; each thread reads 16 bytes
(VEC columns: 8 for bf16 / fp16, 4 for fp32) per access (``kernels/row_tiles.py``): the
streaming kernels two tiles of one vector a thread per trip, the on-chip kernels the whole row
at once. The shape depends only on V, the dtype and the kind of kernel, never on N or T, so
new batch shapes reuse the compiled kernels. ``rlhf-fast isa`` reports what each shape costs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

VECTOR_BYTES = 16
"""Bytes of one row access per thread: 128-bit loads and stores."""

TILES_PER_TRIP = 2
"""Tiles the streaming loops read per trip (fixed in ``kernels/``): two 16-byte loads in
flight per thread."""

COLUMNS_PER_THREAD = 256
"""Target columns per thread per row for the gradient sweep: a thread's share of the per-row
work (the prologue, the coefficients, the row's edges) stays small next to its loop work."""

MAX_WARPS = 16
"""Largest program of the gradient sweep (512 threads; several programs share an SM)."""

ON_CHIP_COLUMNS = 64
"""Columns of the row per thread in the on-chip kernels (eight 16-byte vectors of bf16 /
fp16, sixteen of fp32)."""

ON_CHIP_THREADS = 128
"""Largest program of the on-chip kernels: two of them share an SM."""

ON_CHIP_MAX_COLUMNS = ON_CHIP_COLUMNS * ON_CHIP_THREADS
"""Longest row (8192 columns, any dtype) held whole in registers and read once. Why there:
Triton's ``tl`` has no explicit shared memory, so the row lives in registers, together with
its exponentials (kept for the gradient, which then costs one multiply a column): about two
registers per column, 127-193 registers for 64 columns a thread (sm_90). Two programs must
share an SM, so that one's loads overlap the other's arithmetic: 128 threads x 64 columns.
Wider programs spill first (512 threads x 64 columns at the 64 registers two of them may
have: 944 B of stack a thread; x 32 columns: 224 B); 16 columns a thread fit, but 512 x 16 is
8192 columns again, with four times the per-row work (reductions across the program, the
coefficient) per column. Longer rows stream, their second read served by L2."""

L2_ROWS_BYTES = 40 * 2**20
"""Bytes of rows the streaming fused kernel aims to keep in flight across the GPU (below an
H100's 50 MB L2), so that its second read of a row hits L2; fewer rows in flight means more
threads per row, and more of the per-row work per column (benchmarks/NOTES.md)."""

SMS = 132
"""SMs of the GPU the launch shapes are sized for (H100 / H200)."""

FUSED_MAX_REGISTERS = 64
"""Register cap of the streaming fused kernel. It makes ``THREADS_PER_SM`` hold, and without it
ptxas recomputed a quarter of the stats loop's ``exp2`` (MUFU) to stay at 48 registers
(sm_90, 256 threads: 1.31 MUFU per element instead of 1.06)."""

THREADS_PER_SM = 65536 // FUSED_MAX_REGISTERS
"""Threads of the streaming fused kernel resident per SM: rows in flight per SM =
THREADS_PER_SM / threads per program."""


@dataclass(frozen=True)
class RowLaunch:
    """How a row kernel is launched: ``num_warps`` warps, VEC columns per 16-byte access;
    ``on_chip``: the whole row held in registers, ``unroll`` vectors a thread (streaming
    kernels read ``TILES_PER_TRIP`` tiles per trip and ignore it)."""

    num_warps: int
    vec: int
    unroll: int = 1
    on_chip: bool = False

    @property
    def threads(self) -> int:
        return 32 * self.num_warps

    @property
    def constexprs(self) -> dict[str, int]:
        """Compile-time launch arguments of the kernel this launch picks."""
        shape = {"THREADS": self.threads, "VEC": self.vec}
        return {"UNROLL": self.unroll, **shape} if self.on_chip else shape


def vector_width(dtype: torch.dtype) -> int:
    return VECTOR_BYTES // torch.empty((), dtype=dtype).element_size()


def pow2_floor(n: int) -> int:
    return 1 << max(0, n.bit_length() - 1)


def pow2_ceil(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def grad_launch(n_cols: int, dtype: torch.dtype) -> RowLaunch:
    """Launch of the gradient sweep: enough threads to stream the row, few enough that each
    handles about ``COLUMNS_PER_THREAD`` columns."""
    warps = pow2_floor(max(1, n_cols // (32 * COLUMNS_PER_THREAD)))
    return RowLaunch(num_warps=min(MAX_WARPS, warps), vec=vector_width(dtype))


def row_launch(n_cols: int, dtype: torch.dtype) -> RowLaunch:
    """Launch of the kernels that compute a row's statistics: the stats sweep and the fused
    policy kernel share it, so that both paths of ``policy_loss`` give bit-identical log-probs
    and entropies. Rows up to ``ON_CHIP_MAX_COLUMNS`` go whole into registers; longer rows
    stream, in programs just large enough that the fused kernel's rows in flight
    (``SMS * THREADS_PER_SM / threads``) fit ``L2_ROWS_BYTES`` (fewer threads per row: less
    per-row work per column)."""
    vec = vector_width(dtype)
    if n_cols <= ON_CHIP_MAX_COLUMNS:
        threads = min(ON_CHIP_THREADS, max(32, pow2_ceil(cdiv(n_cols, ON_CHIP_COLUMNS))))
        slices = pow2_ceil(cdiv(cdiv(n_cols, vec), threads))
        return RowLaunch(threads // 32, vec, unroll=slices, on_chip=True)
    row_bytes = n_cols * (VECTOR_BYTES // vec)
    threads = pow2_ceil(cdiv(SMS * THREADS_PER_SM * row_bytes, L2_ROWS_BYTES))
    return RowLaunch(min(32, max(2, threads // 32)), vec)


def same_alignment(a: torch.Tensor, b: torch.Tensor, vec: int) -> bool:
    """True when every row of ``a`` and ``b`` (``[B, T, V]``) starts at the same offset
    modulo ``vec`` elements, so one peel of the row aligns the accesses of both."""
    return all((sa - sb) % vec == 0 for sa, sb in zip(a.stride()[:2], b.stride()[:2],
                                                      strict=True))
