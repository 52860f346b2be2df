"""Tolerances of docs/architecture.md (Numerical contract) and the norm-wise comparisons the
tests use."""

import torch

GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}
"""Gradients (stored in the logits' dtype) vs the float64 reference, relative, norm-wise."""

VALUE_TOL = 1e-5
"""Per-token outputs: absolute for float32 logits, relative norm-wise for bf16/fp16 logits."""


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (0 when both are zero)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    num = (a - e).norm().item()
    den = e.norm().item()
    return num / den if den > 0 else num


def assert_grad_close(actual, expected, dtype):
    assert torch.isfinite(actual).all(), "gradient has NaN/inf"
    err = rel_err(actual, expected)
    assert err <= GRAD_RTOL[dtype], f"gradient rel err {err:.3e} > {GRAD_RTOL[dtype]:.0e} ({dtype})"


def assert_values_close(actual, expected, dtype, name="value"):
    assert actual.dtype == torch.float32, f"{name} must be float32, got {actual.dtype}"
    assert torch.isfinite(actual).all(), f"{name} has NaN/inf"
    if dtype == torch.float32:
        err = (actual.double().cpu() - expected.double().cpu()).abs().max().item() \
            if actual.numel() else 0.0
        assert err <= VALUE_TOL, f"{name} abs err {err:.3e} > {VALUE_TOL:.0e}"
    else:
        err = rel_err(actual, expected)
        assert err <= VALUE_TOL, f"{name} rel err {err:.3e} > {VALUE_TOL:.0e} ({dtype})"
