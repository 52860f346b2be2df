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
