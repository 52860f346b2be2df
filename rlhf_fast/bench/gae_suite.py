"""The ``gae`` suite: ``rlhf_fast.gae.gae`` against its torch path and the Python loop.

Implementations: ``rlhf_fast`` (Triton on CUDA, the torch path on the CPU), ``torch`` (the
vectorised-over-B torch path, a Python loop over T), ``reference`` (the recursion as a
Python loop over B and T; at B=1024, T=8192 it is timed once, reps = 1). Useful bytes:
rewards, values and mask read once, advantages and returns written once: 5*B*T*4.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict

import torch

from ..gae import gae
from .case import Case
from .measure import median_ms, peak_extra_mib

SUITE = "gae"
IMPLS = ("rlhf_fast", "torch", "reference")
QUICK_SHAPES = {"cpu": [(256 * 256, 256)], "cuda": [(1024 * 8192, 8192)]}
FULL_SHAPES = [(1024 * 8192, 8192)]
TINY_SHAPES = [(8 * 16, 16)]
"""``--shapes tiny``: the harness end to end in seconds (tests); the timings mean nothing."""
GAMMA, LAM = 0.99, 0.95


def useful_bytes(case: Case) -> int:
    """Three float32 inputs read and two float32 outputs written once."""
    return 5 * case.n * 4


def cases(shapes: str, device: torch.device, dtype: str = "float32") -> list[Case]:
    grid = {"quick": QUICK_SHAPES[device.type], "full": FULL_SHAPES, "tiny": TINY_SHAPES}[shapes]
    # n = B * T tokens; v holds T (the "vocabulary" column of the table is the length here).
    return [Case(n, t, "float32", "fwd") for n, t in grid]


def make_inputs(case: Case, device: torch.device):
    batch, steps = case.n // case.v, case.v
    g = torch.Generator(device=device).manual_seed(0)
    rewards = torch.randn(batch, steps, device=device, generator=g)
    values = torch.randn(batch, steps, device=device, generator=g)
    mask = torch.rand(batch, steps, device=device, generator=g) > 0.1
    return rewards, values, mask


def _loop(rewards, values, mask):
    r, v, m = rewards.tolist(), values.tolist(), mask.tolist()
    adv = [[0.0] * len(row) for row in r]
    for b, row in enumerate(r):
        next_value = next_adv = 0.0
        for t in range(len(row) - 1, -1, -1):
            if m[b][t]:
                next_adv = row[t] + GAMMA * next_value - v[b][t] + GAMMA * LAM * next_adv
                next_value = v[b][t]
                adv[b][t] = next_adv
    return torch.tensor(adv)


def make_step(impl: str, inputs) -> Callable[[], object]:
    if impl == "reference":
        return lambda: _loop(*inputs)
    backend = "auto" if impl == "rlhf_fast" else "torch"
    return lambda: gae(*inputs, GAMMA, LAM, backend=backend)


def label(case: Case) -> str:
    """``B=.. T=.. fp32``: a gae case names its batch and length, not N and V."""
    return f"B={case.n // case.v} T={case.v} fp32"


def run_case(case: Case, impl: str, device: torch.device, *, warmup: int, reps: int) -> dict:
    record = {"suite": SUITE, "case": asdict(case), "label": label(case),
              "mode": case.mode, "impl": impl,
              "useful_bytes": useful_bytes(case), "bytes_formula": "5*B*T*4"}
    inputs = make_inputs(case, device)
    step = make_step(impl, inputs)
    slow = impl == "reference"
    record["median_ms"] = median_ms(step, device, warmup=0 if slow else warmup,
                                    reps=1 if slow else reps)
    record["peak_extra_mib"] = peak_extra_mib(step, device)
    expected = _loop(*(x.cpu() for x in inputs)) if case.n <= 2**20 else None
    if expected is not None and impl != "reference":
        got = step()
        got = got[0] if isinstance(got, tuple) else got
        record["err_adv"] = (got.cpu().double() - expected.double()).abs().max().item()
    return {**record, "status": "ok"}
