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


def best_ms(fn, device: torch.device, *, warmup: int, reps: int) -> float:
    """The fastest of ``reps`` timed calls: a ceiling is the best the device did, not a
    typical call (on a shared machine the median of a ceiling drifts with the load)."""
    return min(median_ms(fn, device, warmup=warmup if i == 0 else 0, reps=1) for i in range(reps))


def linear_gemm_tflops(n: int, h: int, v: int, dtype: str, device: torch.device) -> float:
    """The rate, in TFLOP/s, of a fused-linear case's own GEMMs run alone, back to back:

        logits = hidden @ weight.T      [N, H] x [H, V]
        grad_hidden = G @ weight        [N, V] x [V, H]
        grad_weight = G.T @ hidden      [V, N] x [N, H]

    6*N*H*V FLOP over the sum of the three best-of-reps times, in the case's dtype. It is the
    ceiling of the fused-linear suites' ``% gemm``, measured in the process that runs the
    implementation, right before it and on its shapes, so that the ratio means "share of the
    time the op would take if it were nothing but its GEMMs". The run's square matmul
    (``matmul_tflops``) is another shape measured minutes earlier: on the CPU the case's
    shapes ran 30 % faster than it, and with a shared machine's load drift the ratio against
    it passed 100 %.
    """
    dt = getattr(torch, dtype)
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, h, device=device, dtype=dt, generator=g)
    weight = torch.randn(v, h, device=device, dtype=dt, generator=g)
    grad = torch.randn(n, v, device=device, dtype=dt, generator=g)
    reps = 10 if device.type == "cuda" else 5
    ms = sum(best_ms(fn, device, warmup=2, reps=reps) for fn in (
        lambda: hidden @ weight.T, lambda: grad @ weight, lambda: grad.T @ hidden))
    return 6 * n * h * v / (ms * 1e-3) / 1e12
