"""A throughput model of a row kernel on one SM: which limit binds, and how close to the HBM floor.

ESTIMATES, not measurements: every constant is printed with the report and written to its
JSON, so that a GPU run can say how far off it was.

Per row of V elements, on the SM that runs it (rows are spread evenly over the SMs):

- instruction time: for each pipe, the thread-instructions the row costs (per-element counts of
  the row loops read from SASS, times V; plus the code outside the loops, once per thread)
  divided by the pipe's per-SM throughput;
- memory time: the HBM bytes the row moves divided by the SM's share of the bandwidth. A loop
  that keeps fewer bytes in flight per SM than bandwidth x latency (Little's law) stretches it
  by the ratio;
- the row takes the larger of the two (instruction issue and memory overlap perfectly across
  the warps and programs resident on the SM: optimistic), and the binding limit is the one
  that sets it;
- fraction of the floor = (compulsory bytes / bandwidth) / that time.

Kernels that read a row twice (stats then gradient, in one program) get the second read's L2
hit rate from ``second_read_hit_rate``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Gpu:
    """Per-SM limits of one GPU (per clock unless stated).

    name: marketing name; arch: compute capability x 10; sms: streaming multiprocessors;
    clock_ghz: sustained SM clock under load; hbm_tb_s: datasheet HBM bandwidth (TB/s);
    l2_mb: L2 capacity (MB); issue: thread-instructions issued (4 schedulers x 32);
    fp32: FFMA / FMUL / FADD lanes; alu: compare, select, min / max, integer add / logic /
    shift lanes; imad: IMAD lanes; xu: MUFU (ex2, lg2, rcp) and conversion lanes; shfl:
    shuffle lanes; regs: 32-bit registers; max_warps / max_ctas: resident limits;
    smem_kb: shared memory per SM usable by CTAs; latency_ns: loaded DRAM latency assumed
    for Little's law.
    """

    name: str
    arch: int
    sms: int
    clock_ghz: float
    hbm_tb_s: float
    l2_mb: float
    issue: int = 128
    fp32: int = 128
    alu: int = 64
    imad: int = 64
    xu: int = 16
    shfl: int = 32
    regs: int = 65536
    max_warps: int = 64
    max_ctas: int = 32
    smem_kb: int = 228
    latency_ns: float = 800.0

    @property
    def hbm_bytes_per_clock(self) -> float:
        """HBM bytes per SM clock per SM."""
        return self.hbm_tb_s * 1e12 / self.sms / (self.clock_ghz * 1e9)

    @property
    def bytes_in_flight_needed(self) -> float:
        """Little's law: bytes one SM must have in flight to draw its share of HBM."""
        return self.hbm_bytes_per_clock * self.latency_ns * self.clock_ghz

    def rate(self, pipe: str) -> int:
        return getattr(self, pipe)


GPUS = {
    90: (Gpu("H100 SXM", 90, sms=132, clock_ghz=1.755, hbm_tb_s=3.35, l2_mb=50),
         Gpu("H200 SXM", 90, sms=132, clock_ghz=1.755, hbm_tb_s=4.8, l2_mb=50)),
    80: (Gpu("A100 SXM 80GB", 80, sms=108, clock_ghz=1.41, hbm_tb_s=2.039, l2_mb=40, fp32=64,
             smem_kb=164),),
}
"""The GPUs each target is estimated on. Throughputs: CUDA C Programming Guide, "arithmetic
instruction throughput" (cc 8.0 / 9.0); bandwidths and L2 sizes: NVIDIA datasheets; clocks:
typical sustained clocks under load, not boost."""

PIPES = ("issue", "fp32", "alu", "imad", "xu", "shfl")


def ctas_per_sm(gpu: Gpu, regs: int, num_warps: int, shared_bytes: int) -> int:
    """Resident programs per SM: warps, registers (allocated per warp in units of 256) and
    shared memory (plus 1 KB the driver reserves per CTA) each limit it."""
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    by_regs = gpu.regs // (regs_per_warp * num_warps)
    by_warps = gpu.max_warps // num_warps
    by_smem = (gpu.smem_kb * 1024) // (shared_bytes + 1024) if shared_bytes else gpu.max_ctas
    return max(0, min(gpu.max_ctas, by_regs, by_warps, by_smem))


def second_read_hit_rate(rows_in_flight: int, row_bytes: float, l2_bytes: float, reverse: bool,
                         stores_allocate: bool, stats_share: float = 0.5) -> float:
    """ESTIMATE: fraction of a row's second read served by L2 (LRU, fully associative).

    ``rows_in_flight`` programs each read their row (first pass, a share ``stats_share`` of
    the row's time), then read it again and write the gradient. Between the first and the
    second read of a byte, the SM population inserts new bytes into L2 at
    ``rows_in_flight * row_bytes * (1 + misses + writes) / row time``; the re-read hits when
    fewer than ``l2_bytes`` were inserted meanwhile. A column at fraction x of the row waits
    ``(1 - x)`` row times when the second read runs backwards, ``share * (1 - x) + (1 -
    share) * x`` when it runs forwards. Stores with an evict-first hint are modelled as not
    displacing the row (``stores_allocate=False``). Solved as a fixed point in the hit rate.
    """
    if rows_in_flight <= 0 or row_bytes <= 0:
        return 1.0
    hit = 1.0
    for _ in range(60):
        inserted = rows_in_flight * row_bytes * (1.0 + (1.0 - hit) + (1.0 if stores_allocate
                                                                        else 0.0))
        reach = l2_bytes / inserted  # waiting time (in row times) that still hits
        if reverse:
            new = min(1.0, reach)
        else:
            a, b = stats_share, 1.0 - 2.0 * stats_share  # wait(x) = a + b x, x in [0, 1]
            if abs(b) < 1e-12:
                new = 1.0 if a < reach else 0.0
            else:
                x = (reach - a) / b
                new = min(1.0, max(0.0, x)) if b > 0 else min(1.0, max(0.0, 1.0 - x))
        if abs(new - hit) < 1e-9:
            break
        hit = 0.5 * (hit + new)
    return hit


@dataclass
class RowCost:
    """What one row costs a kernel, per element of the row (V elements): thread-instructions
    per pipe in the loops (``loop``) and outside them per thread (``overhead``)."""

    loop: dict[str, float]
    overhead: dict[str, float]


@dataclass
class Estimate:
    """The model's verdict for one kernel launch on one GPU (times in ns per row per SM)."""

    gpu: str
    instr_ns: dict[str, float]
    memory_ns: float
    latency_stretch: float
    bytes_per_element: float
    floor_bytes_per_element: float
    l2_hit: float | None
    binding: str
    time_ns: float
    floor_fraction: float

    def as_dict(self) -> dict:
        return asdict(self)


def estimate(gpu: Gpu, cost: RowCost, n_cols: int, threads: int, ctas: int,
             bytes_per_element: float, floor_bytes_per_element: float,
             in_flight_per_thread: float, l2_hit: float | None = None,
             phases_overlap: bool = True) -> Estimate:
    """Time of one row on one SM of ``gpu`` (``ctas`` programs of ``threads`` resident).
    ``phases_overlap=False``: a program alone on its SM that loads its whole row, computes,
    then stores (no loop to overlap them in): memory and instruction times add up."""
    clock = gpu.clock_ghz
    instr_ns = {}
    for pipe in PIPES:
        thread_instr = cost.loop.get(pipe, 0.0) * n_cols + cost.overhead.get(pipe, 0.0) * threads
        instr_ns[pipe] = thread_instr / gpu.rate(pipe) / clock
    memory_ns = bytes_per_element * n_cols / gpu.hbm_bytes_per_clock / clock
    in_flight = ctas * threads * in_flight_per_thread
    stretch = max(1.0, gpu.bytes_in_flight_needed / in_flight) if in_flight > 0 else 1.0
    pipe, pipe_ns = max(instr_ns.items(), key=lambda kv: kv[1])
    mem_ns = memory_ns * stretch
    if mem_ns >= pipe_ns:
        binding = "HBM" if stretch == 1.0 else "latency"
        time_ns = mem_ns
    else:
        binding, time_ns = pipe, pipe_ns
    if not phases_overlap:
        binding = f"{binding}+{pipe if binding in ('HBM', 'latency') else 'HBM'} (serial)"
        time_ns = mem_ns + pipe_ns
    floor_ns = floor_bytes_per_element * n_cols / gpu.hbm_bytes_per_clock / clock
    return Estimate(gpu.name, instr_ns, memory_ns, stretch, bytes_per_element,
                    floor_bytes_per_element, l2_hit, binding, time_ns,
                    floor_ns / time_ns if time_ns > 0 else 0.0)


def constants() -> dict:
    """Everything the model assumes, for the report."""
    return {
        "gpus": {f"sm_{arch}": [asdict(g) | {"hbm_bytes_per_clock_per_sm": g.hbm_bytes_per_clock,
                                            "bytes_in_flight_needed": g.bytes_in_flight_needed}
                                for g in gpus]
                 for arch, gpus in GPUS.items()},
        "assumptions": [
            "instruction issue and memory overlap perfectly across resident warps (optimistic)",
            "per-element loop costs x V, plus the code outside the loops once per thread per "
            "row (static count, fill loops for masked rows excluded)",
            "memory time stretched by (bytes needed in flight / bytes in flight) when a loop "
            "keeps too few loads in flight (Little's law at the stated latency)",
            "second read of a row (one-program kernels): LRU L2 model, reported at the full "
            "L2 and at half of it (two partitions that may duplicate a line); the fraction "
            "uses the lower",
            "a kernel holding its row in registers: per-element cost = growth of its SASS "
            "between two row lengths; alone on its SM (1 program), its memory and "
            "instruction times add up instead of overlapping",
        ],
    }
