"""The ``logprobs`` suite: ``token_logprobs`` (log-prob + entropy) against the reference.

Modes: ``fwd`` (under no_grad: the old-/reference-policy pass) and ``fwd+bwd`` (loss
``sum(logp) - 0.01 * sum(entropy)``, backward to the logits). Implementations:

- ``rlhf_fast``           ``rlhf_fast.token_logprobs`` (Triton on CUDA, torch backend on CPU);
- ``reference``           ``rlhf_fast.reference`` on the logits upcast to float32, eager;
- ``reference_compiled``  the same under ``torch.compile`` (CUDA only: on the CPU its C++
                          build takes minutes, so it is reported absent).

Useful bytes (s = bytes per logit): ``fwd`` N*V*s (logits read once); ``fwd+bwd`` 2*N*V*s
(logits read once, gradient written once), the floor of any implementation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict

import torch

import rlhf_fast
from rlhf_fast import reference

from .case import Case
from .ground_truth import float64_reference
from .measure import median_ms, peak_extra_mib
from .rotation import rotating

SUITE = "logprobs"
IMPLS = ("rlhf_fast", "reference", "reference_compiled")
MODES = ("fwd", "fwd+bwd")
ENTROPY_COEF = 0.01

QUICK_SHAPES = {"cpu": [(512, 32000)], "cuda": [(8192, 151936)]}
FULL_SHAPES = [(n, v) for n in (8192, 32768) for v in (32000, 128256, 151936, 262144)]
TINY_SHAPES = [(64, 1000)]
"""``--shapes tiny``: the harness end to end in seconds (tests); the timings mean nothing."""
BYTES_FORMULA = {"fwd": "N*V*s", "fwd+bwd": "2*N*V*s"}


def useful_bytes(case: Case) -> int:
    """fwd: the logits read once; fwd+bwd: read once and the gradient written once."""
    return case.logit_bytes * (1 if case.mode == "fwd" else 2)


def cases(shapes: str, device: torch.device, dtype: str = "bfloat16") -> list[Case]:
    grid = {"quick": QUICK_SHAPES[device.type], "full": FULL_SHAPES, "tiny": TINY_SHAPES}[shapes]
    return [Case(n, v, dtype, mode) for n, v in grid for mode in MODES]


def make_inputs(case: Case, device: torch.device, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(case.n, case.v, device=device, generator=g,
                         dtype=getattr(torch, case.dtype)).mul_(2.0)
    targets = torch.randint(0, case.v, (case.n,), device=device, generator=g)
    return logits, targets


def _op(impl: str) -> Callable:
    if impl == "rlhf_fast":
        return lambda x, y: rlhf_fast.token_logprobs(x, y, return_entropy=True)

    def ref(x, y):
        return reference.token_logprobs(x.float(), y, return_entropy=True)

    return torch.compile(ref) if impl == "reference_compiled" else ref


def absent_reason(impl: str, device: torch.device) -> str | None:
    if impl == "reference_compiled" and device.type != "cuda":
        return "torch.compile on the CPU is skipped (minutes of C++ build)"
    return None


def make_step(case: Case, impl: str, logits, targets) -> Callable[[], object]:
    """One timed step: forward under no_grad, or forward + backward to a leaf."""
    op = _op(impl)
    if case.mode == "fwd":
        def step():
            with torch.no_grad():
                return op(logits, targets)
        return step
    leaf = logits.detach().requires_grad_()

    def step():
        leaf.grad = None
        logp, ent = op(leaf, targets)
        (logp.sum() - ENTROPY_COEF * ent.sum()).backward()
        return leaf.grad
    return step


def errors(case: Case, impl: str, logits, targets) -> dict[str, float]:
    """Max abs error of logp and entropy, and norm-wise relative error of the gradient,
    against the float64 reference on the same values."""
    x = logits.detach().requires_grad_()
    logp, ent = _op(impl)(x, targets)

    def float64():
        xr = logits.detach().double().requires_grad_()
        rlogp, rent = reference.token_logprobs(xr, targets, return_entropy=True)
        if case.mode == "fwd+bwd":
            (rlogp.sum() - ENTROPY_COEF * rent.sum()).backward()
        return rlogp.detach(), rent.detach(), xr.grad
    rlogp, rent, rgrad = float64_reference((SUITE, case), float64)
    out = {"err_logp": (logp.double() - rlogp).abs().max().item(),
           "err_entropy": (ent.double() - rent).abs().max().item()}
    if case.mode == "fwd+bwd":
        (logp.sum() - ENTROPY_COEF * ent.sum()).backward()
        out["err_grad"] = ((x.grad.double() - rgrad).norm() / rgrad.norm()).item()
    return out


def run_case(case: Case, impl: str, device: torch.device, *, warmup: int, reps: int) -> dict:
    """Time, peak extra memory and errors of one implementation on one case."""
    record = {"suite": SUITE, "case": asdict(case), "label": case.label, "mode": case.mode,
              "impl": impl, "useful_bytes": useful_bytes(case),
              "bytes_formula": BYTES_FORMULA[case.mode]}
    reason = absent_reason(impl, device)
    if reason:
        return {**record, "status": "absent", "reason": reason}
    step = rotating(lambda i: make_step(case, impl, *make_inputs(case, device, seed=i)),
                    case.logit_bytes, device)
    record["median_ms"] = median_ms(step, device, warmup=warmup, reps=reps)
    record["peak_extra_mib"] = peak_extra_mib(step, device)
    del step
    record.update(errors(case, impl, *make_inputs(case, device)))
    return {**record, "status": "ok"}
