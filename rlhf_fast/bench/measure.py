"""Timing and peak-memory measurement on CUDA (in process) and on the CPU (in a child)."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import statistics
import time
from collections.abc import Callable

import torch


def median_ms(fn: Callable[[], object], device: torch.device, *, warmup: int, reps: int) -> float:
    """Median wall time of ``fn`` in milliseconds: CUDA events on a GPU, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        for _ in range(reps):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _release_freed_memory() -> None:
    # Pages freed by earlier calls (warm-up, timing) stay resident in malloc's arenas and
    # would be reused without raising the high-water mark: hand them back to the OS first.
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        trim = getattr(ctypes.CDLL(libc_name), "malloc_trim", None)
        if trim is not None:
            trim(0)


def peak_extra_mib(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory above what is held before the call, in MiB.

    CUDA: ``max_memory_allocated`` after a peak reset. CPU: the resident set's high-water mark
    (reset through ``/proc/self/clear_refs``) minus the resident set before the call; run it
    in a fresh process (``rlhf_fast.bench.worker``) so freed pages of earlier work do not hide
    the op's own allocations.
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    _release_freed_memory()
    base = _proc_status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current resident set
    fn()
    return max(0, _proc_status_kib("VmHWM") - base) / 2**10
