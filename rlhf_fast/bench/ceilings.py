"""Hardware ceilings measured in the same run as the ops they judge."""

from __future__ import annotations

import torch

from .measure import median_ms


def copy_bandwidth_gbps(device: torch.device, n_bytes: int | None = None) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written.

        GB/s = 2 * n_bytes / t

    1 GiB buffers on CUDA (far above L2), 256 MiB on the CPU.
    """
    if n_bytes is None:
        n_bytes = 2**30 if device.type == "cuda" else 2**28
    src = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    reps = 20 if device.type == "cuda" else 5
    ms = median_ms(lambda: dst.copy_(src), device, warmup=3, reps=reps)
    return 2 * n_bytes / (ms * 1e-3) / 1e9


def matmul_tflops(device: torch.device, size: int | None = None) -> float:
    """bf16 matmul rate in TFLOP/s: ``2 * n^3 / t`` for an ``n x n @ n x n`` product
    (n = 8192 on CUDA, 1024 on the CPU)."""
    n = size or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    reps = 20 if device.type == "cuda" else 3
    ms = median_ms(lambda: a @ b, device, warmup=2, reps=reps)
    return 2 * n**3 / (ms * 1e-3) / 1e12
