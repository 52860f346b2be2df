"""The ``policy`` suite: ``policy_loss`` forward + backward against the reference and Liger.

Modes: ``token`` (DAPO: clip-higher, token mean; the one-kernel path on Triton),
``token+entropy`` (the same with an entropy bonus) and ``sequence`` (GSPO: stats sweep ->
coefficients -> gradient sweep). Implementations:

- ``rlhf_fast``           ``rlhf_fast.policy_loss`` (Triton on CUDA, torch backend on CPU);
- ``reference``           ``rlhf_fast.reference.policy_loss`` on float32-upcast logits, eager;
- ``reference_compiled``  the same under ``torch.compile`` (CUDA only);
- ``liger``               Liger-Kernel's ``triton_grpo_loss`` (loss_type ``dapo``; token mode
                          only: it has no entropy bonus and is run at token level), when
                          installed, on CUDA.

Useful bytes (s = bytes per logit): 2*N*V*s, the logits read once and the gradient written
once (4*N*V for bf16; docs/architecture.md, Benchmarks).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict

import torch

import rlhf_fast
from rlhf_fast import PolicyLossConfig, reference

from .case import Case
from .ground_truth import float64_reference
from .measure import median_ms, peak_extra_mib
from .rotation import rotating

SUITE = "policy"
IMPLS = ("rlhf_fast", "reference", "reference_compiled", "liger")
MODES = {
    "token": PolicyLossConfig.preset("dapo"),
    "token+entropy": PolicyLossConfig.preset("dapo", entropy_coef=0.01),
    "sequence": PolicyLossConfig.preset("gspo"),
}
SEQ_LEN = 128
QUICK_SHAPES = {"cpu": [(512, 32000)], "cuda": [(8192, 151936)]}
FULL_SHAPES = [(8192, 151936), (32768, 151936)]
TINY_SHAPES = [(64, 1000)]
"""``--shapes tiny``: the harness end to end in seconds (tests); the timings mean nothing."""


def useful_bytes(case: Case) -> int:
    """The logits read once and the gradient written once: 2*N*V*s."""
    return 2 * case.logit_bytes


def cases(shapes: str, device: torch.device, dtype: str = "bfloat16") -> list[Case]:
    grid = {"quick": QUICK_SHAPES[device.type], "full": FULL_SHAPES, "tiny": TINY_SHAPES}[shapes]
    return [Case(n, v, dtype, mode) for n, v in grid for mode in MODES]


def make_inputs(case: Case, device: torch.device, seed: int = 0) -> dict:
    """Logits with one extra position (Liger's layout), sampled tokens, old / ref log-probs
    near the current ones, per-sequence advantages and a ragged completion mask."""
    seq_len = min(SEQ_LEN, case.n)
    batch = case.n // seq_len
    g = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(batch, seq_len + 1, case.v, device=device, generator=g,
                         dtype=getattr(torch, case.dtype)).mul_(2.0)
    targets = torch.randint(0, case.v, (batch, seq_len), device=device, generator=g)
    with torch.no_grad():
        logp = rlhf_fast.token_logprobs(logits[:, :-1], targets)
    noise = torch.randn(batch, seq_len, device=device, generator=g)
    lengths = torch.randint(seq_len // 2, seq_len + 1, (batch,), device=device, generator=g)
    mask = torch.arange(seq_len, device=device) < lengths.unsqueeze(-1)
    return dict(logits=logits, targets=targets, old=logp + 0.1 * noise,
                ref=logp - 0.1 * noise, advantages=torch.randn(batch, device=device,
                                                               generator=g), mask=mask)


def absent_reason(case: Case, impl: str, device: torch.device) -> str | None:
    if impl == "reference_compiled" and device.type != "cuda":
        return "torch.compile on the CPU is skipped (minutes of C++ build)"
    if impl == "liger":
        if case.mode != "token":
            return "Liger's GRPO loss has no entropy bonus / is compared at token level only"
        if device.type != "cuda":
            return "Liger's Triton kernels need CUDA"
        try:
            import liger_kernel.transformers.grpo_loss  # noqa: F401
        except ImportError:
            return "liger-kernel is not installed"
    return None


def _loss_fn(case: Case, impl: str) -> Callable:
    config = MODES[case.mode]
    if impl == "rlhf_fast":
        def ours(leaf, p):
            return rlhf_fast.policy_loss(leaf[:, :-1], p["targets"], p["advantages"], p["mask"],
                                         old_logprobs=p["old"], config=config).loss
        return ours
    if impl == "liger":
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss

        def liger(leaf, p):
            loss, _ = triton_grpo_loss(
                leaf, p["old"], None, p["targets"], p["advantages"], p["mask"],
                temperature=1.0, beta=0.0, eps_low=config.clip.eps_low,
                eps_high=config.clip.eps_high, inplace=False, loss_type="dapo", reduce=True,
                num_items_in_batch=p["mask"].sum())
            return loss
        return liger

    def ref(leaf, p):
        return reference.policy_loss(leaf[:, :-1].float(), p["targets"], p["advantages"],
                                     p["mask"], old_logprobs=p["old"], config=config)[0]
    return torch.compile(ref) if impl == "reference_compiled" else ref


def make_step(case: Case, impl: str, inputs: dict) -> Callable[[], object]:
    loss_fn = _loss_fn(case, impl)
    leaf = inputs["logits"].detach().requires_grad_()

    def step():
        leaf.grad = None
        loss_fn(leaf, inputs).backward()
        return leaf.grad
    return step


def errors(case: Case, impl: str, inputs: dict) -> dict[str, float]:
    """Relative error of the loss and norm-wise relative error of the gradient against the
    float64 reference on the same values."""
    leaf = inputs["logits"].detach().requires_grad_()
    loss = _loss_fn(case, impl)(leaf, inputs)
    loss.backward()

    def float64():
        xr = inputs["logits"].detach().double().requires_grad_()
        ref = reference.policy_loss(xr[:, :-1], inputs["targets"],
                                    inputs["advantages"].double(), inputs["mask"],
                                    old_logprobs=inputs["old"].double(),
                                    config=MODES[case.mode])[0]
        ref.backward()
        return ref.item(), xr.grad
    ref, ref_grad = float64_reference((SUITE, case), float64)
    diff = (leaf.grad.double() - ref_grad).norm().item()
    scale = ref_grad.norm().item()
    return {"err_loss": abs(loss.item() - ref) / max(abs(ref), 1e-30),
            "err_grad": diff / scale if scale > 0 else diff}


def run_case(case: Case, impl: str, device: torch.device, *, warmup: int, reps: int) -> dict:
    record = {"suite": SUITE, "case": asdict(case), "label": case.label, "mode": case.mode,
              "impl": impl, "useful_bytes": useful_bytes(case), "bytes_formula": "2*N*V*s"}
    reason = absent_reason(case, impl, device)
    if reason:
        return {**record, "status": "absent", "reason": reason}
    step = rotating(lambda i: make_step(case, impl, make_inputs(case, device, seed=i)),
                    case.logit_bytes, device)
    record["median_ms"] = median_ms(step, device, warmup=warmup, reps=reps)
    record["peak_extra_mib"] = peak_extra_mib(step, device)
    del step
    record.update(errors(case, impl, make_inputs(case, device)))
    return {**record, "status": "ok"}
