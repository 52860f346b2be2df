"""Launch heuristics shared by the row kernels: block size and warps from V alone.

Block sizes are the only compile-time shape parameters; they depend on V (fixed by the
model), never on N or T, so new batch shapes reuse the compiled kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_BLOCK_V = 2048
"""Columns per block of a row sweep: 2048 at 8 warps. Triton's ptxas flow keeps these
kernels at 64 registers; at 4096 x 16 warps the stats sweep with entropy spilled on sm_80,
at 2048 x 8 warps nothing spills (the fused policy kernel included) and 4 blocks fit an SM."""

COLS_PER_THREAD = 8
"""8 columns a thread per block: one 16-byte load of bf16, and the per-lane running state
of the stats sweep (3 x 8 fp32); 16 a thread spilled."""


STATS_MAXNREG = 72
"""Register budget of the kernels that run the stats sweep (forward, fused policy). Left to
itself ptxas settles some variants at 64 registers with a 4-byte spill (sm_80, bf16, with
entropy); at 72 none spills and 3 blocks of 8 warps still fit an SM."""


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def row_block_config(n_cols: int) -> tuple[int, int]:
    """``(BLOCK_V, num_warps)`` for a sweep over rows of ``n_cols`` columns."""
    block = min(MAX_BLOCK_V, max(16, next_power_of_2(n_cols)))
    num_warps = max(1, min(8, block // (32 * COLS_PER_THREAD)))
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
    maxnreg: int | None = None

    @property
    def label(self) -> str:
        switches = ",".join(f"{k}={v}" for k, v in self.constexprs.items())
        return f"{self.kernel.split(':')[1]}[{self.types.get('logits_ptr', '')}|{switches}]"
