"""Launch heuristics shared by the row kernels: block size and warps from V alone.

Block sizes are the only compile-time shape parameters; they depend on V (fixed by the
model), never on N or T, so new batch shapes reuse the compiled kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_BLOCK_V = 2048
"""Columns per block of a row sweep: 2048 at 16 warps (4 columns a thread)."""

COLS_PER_THREAD = 4
"""4 columns a thread per block: the stats sweep keeps four per-lane running values per
column (max, count at the max, mass below it, entropy term), 16 registers at 4 columns.
With 8 a thread ptxas held the kernels at 64-80 registers and spilled on sm_80 / sm_90; at 4
every kernel compiles for both with 20-59 registers and no spill (``rlhf-fast aot``)."""


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def row_block_config(n_cols: int) -> tuple[int, int]:
    """``(BLOCK_V, num_warps)`` for a sweep over rows of ``n_cols`` columns."""
    block = min(MAX_BLOCK_V, max(16, next_power_of_2(n_cols)))
    num_warps = max(1, min(16, block // (32 * COLS_PER_THREAD)))
    return block, num_warps


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class KernelSpec:
    """One compiled variant of a kernel, for the ahead-of-time check (``rlhf_fast.aot``).

    kernel: ``"module:name"`` of the ``@triton.jit`` function; types: Triton types of the
    runtime arguments (``"*bf16"``, ``"i32"``, ...); constexprs: the compile-time switches;
    aligned: arguments that launches see divisible by 16 (pointers, V, strides).
    """

    kernel: str
    types: dict[str, str]
    constexprs: dict[str, object]
    aligned: tuple[str, ...]
    num_warps: int

    @property
    def label(self) -> str:
        switches = ",".join(f"{k}={v}" for k, v in self.constexprs.items())
        return f"{self.kernel.split(':')[1]}[{self.types.get('logits_ptr', '')}|{switches}]"
