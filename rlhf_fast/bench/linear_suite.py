"""The ``linear`` suite: from hidden states and lm_head, forward + backward.

Modes: ``policy`` (``linear_policy_loss``, DAPO), ``logprobs`` (``linear_token_logprobs``,
loss ``sum(logp)``), ``packed`` (DAPO on the same sequences packed back to back, ``[N, H]``
with ``cu_seqlens``, no padding) and ``long`` (GSPO on ONE sequence of N tokens, cut into
four token chunks by ``rlhf_fast``, so its sequence statistics come from the no-grad
pre-pass: 8*N*H*V FLOPs run, 6*N*H*V counted as useful; ``packed`` counts its real tokens).
Implementations: ``rlhf_fast`` (chunked, never holding the logits), ``materialised``
(``hidden @ weight.T`` then ``policy_loss`` / ``token_logprobs``), ``reference`` (the
float32 reference on materialised logits, eager) and the peers, when
installed, on CUDA: ``liger`` (``LigerFusedLinearGRPOLoss``, policy mode) and ``cce`` (Cut
Cross-Entropy's ``linear_cross_entropy``, logprobs mode). Useful FLOPs: 6*N*H*V (logits
GEMM, grad_hidden GEMM, grad_weight GEMM) against the rate of the same three GEMMs run alone
in the same process just before the case (``ceilings.linear_gemm_tflops``). Errors are
against the float64 reference on exact products, so bf16 runs show the rounding of the
logits to bf16 that every implementation makes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict

import torch

import rlhf_fast
from rlhf_fast import PolicyLossConfig, reference

from .case import Case
from .ceilings import linear_gemm_tflops
from .ground_truth import float64_reference
from .measure import median_ms, peak_extra_mib

SUITE = "linear"
IMPLS = ("rlhf_fast", "materialised", "reference", "liger", "cce")
MODES = ("policy", "logprobs", "packed", "long")
CONFIG = PolicyLossConfig.preset("dapo")
CONFIGS = {"policy": CONFIG, "packed": CONFIG, "long": PolicyLossConfig.preset("gspo")}
LONG_CHUNKS = 4
"""``long`` mode: ``rlhf_fast`` cuts its one sequence into this many token chunks."""
SEQ_LEN = 128
QUICK_SHAPES = {"cpu": [(256, 256, 32000)], "cuda": [(8192, 4096, 151936)]}
FULL_SHAPES = [(n, h, v) for n in (8192, 32768) for h in (4096, 5120) for v in (128256, 151936)]
TINY_SHAPES = [(64, 32, 1000)]
"""``--shapes tiny``: the harness end to end in seconds (tests); the timings mean nothing."""


def useful_bytes(case: Case) -> int:
    return 0


def useful_flops(case: Case) -> int:
    """Three GEMMs of N x H x V: 6*N*H*V."""
    return 6 * case.n * case.h * case.v


def cases(shapes: str, device: torch.device, dtype: str = "bfloat16") -> list[Case]:
    grid = {"quick": QUICK_SHAPES[device.type], "full": FULL_SHAPES, "tiny": TINY_SHAPES}[shapes]
    return [Case(n, v, dtype, mode, h) for n, h, v in grid for mode in MODES]


def make_inputs(case: Case, device: torch.device, seed: int = 0) -> dict:
    """Padded ``[B, T]`` inputs (``long``: B = 1, T = N); ``packed`` adds the same sequences
    back to back: ``packed_hidden`` ``[N', H]``, ``packed_targets`` / ``packed_old`` /
    ``packed_mask`` ``[N']`` (N' = the real tokens), ``cu_seqlens``, per-token
    ``packed_advantages``."""
    seq_len = case.n if case.mode == "long" else min(SEQ_LEN, case.n)
    batch = case.n // seq_len
    g = torch.Generator(device=device).manual_seed(seed)
    dtype = getattr(torch, case.dtype)
    hidden = torch.randn(batch, seq_len, case.h, device=device, generator=g, dtype=dtype)
    weight = (torch.randn(case.v, case.h, device=device, generator=g) / case.h**0.5).to(dtype)
    targets = torch.randint(0, case.v, (batch, seq_len), device=device, generator=g)
    with torch.no_grad():
        logp = rlhf_fast.linear_token_logprobs(hidden, weight, targets)
    lengths = torch.randint(seq_len // 2, seq_len + 1, (batch,), device=device, generator=g)
    if case.mode == "long":
        lengths.fill_(seq_len)
    mask = torch.arange(seq_len, device=device) < lengths.unsqueeze(-1)
    # long (GSPO): on-policy, old = logp. GSPO clips the sequence ratio at 1 -/+ 3e-4 / 4e-4,
    # which the noise of the other modes would push out of range, zeroing every gradient.
    noise = 0.0 if case.mode == "long" else 0.1
    inputs = dict(hidden=hidden, weight=weight, targets=targets, mask=mask,
                  old=logp + noise * torch.randn(batch, seq_len, device=device, generator=g),
                  advantages=torch.randn(batch, device=device, generator=g))
    if case.mode == "packed":
        cu = torch.zeros(batch + 1, dtype=torch.int32, device=device)
        cu[1:] = lengths.cumsum(0)
        inputs.update(packed_hidden=hidden[mask].contiguous(), packed_targets=targets[mask],
                      packed_old=inputs["old"][mask], packed_mask=mask[mask],
                      packed_advantages=inputs["advantages"].unsqueeze(-1).expand(
                          batch, seq_len)[mask], cu_seqlens=cu)
    return inputs


def absent_reason(case: Case, impl: str, device: torch.device) -> str | None:
    peers = {"liger": ("policy", "liger_kernel.chunked_loss", "liger-kernel"),
             "cce": ("logprobs", "cut_cross_entropy", "cut-cross-entropy")}
    if impl not in peers:
        return None
    mode, module, package = peers[impl]
    if case.mode != mode:
        return f"{impl} is compared in {mode} mode only"
    if device.type != "cuda":
        return f"{package} needs CUDA"
    try:
        __import__(module)
    except ImportError:
        return f"{package} is not installed"
    return None


def _logprobs_fn(impl: str) -> Callable:
    if impl == "rlhf_fast":
        return lambda h, w, p: rlhf_fast.linear_token_logprobs(h, w, p["targets"]).sum()
    if impl == "materialised":
        return lambda h, w, p: rlhf_fast.token_logprobs(h @ w.T, p["targets"]).sum()
    if impl == "cce":
        from cut_cross_entropy import linear_cross_entropy

        return lambda h, w, p: -linear_cross_entropy(h, w, p["targets"], reduction="sum")
    return lambda h, w, p: reference.token_logprobs((h @ w.T).float(), p["targets"]).sum()


def _packed_fn(impl: str) -> Callable:
    """DAPO (token mean) on the packed tokens; the reference sees them as one row ``[1, N']``
    with per-token advantages, which a token mean cannot tell from the sequences."""
    if impl == "rlhf_fast":
        return lambda h, w, p: rlhf_fast.linear_policy_loss(
            h, w, p["packed_targets"], p["advantages"], p["packed_mask"],
            old_logprobs=p["packed_old"], config=CONFIG, cu_seqlens=p["cu_seqlens"]).loss
    if impl == "materialised":
        return lambda h, w, p: rlhf_fast.policy_loss(
            (h @ w.T).unsqueeze(0), p["packed_targets"].unsqueeze(0),
            p["packed_advantages"].unsqueeze(0), p["packed_mask"].unsqueeze(0),
            old_logprobs=p["packed_old"].unsqueeze(0), config=CONFIG).loss
    return lambda h, w, p: reference.policy_loss(
        (h @ w.T).float().unsqueeze(0), p["packed_targets"].unsqueeze(0),
        p["packed_advantages"].unsqueeze(0), p["packed_mask"].unsqueeze(0),
        old_logprobs=p["packed_old"].unsqueeze(0), config=CONFIG)[0]


def _loss_fn(impl: str, mode: str = "policy") -> Callable:
    if mode == "logprobs":
        return _logprobs_fn(impl)
    if mode == "packed":
        return _packed_fn(impl)
    config = CONFIGS[mode]
    if impl == "rlhf_fast":
        def ours(h, w, p):
            chunk = {"chunk_tokens": max(1, h.shape[1] // LONG_CHUNKS)} if mode == "long" else {}
            return rlhf_fast.linear_policy_loss(h, w, p["targets"], p["advantages"], p["mask"],
                                                old_logprobs=p["old"], config=config,
                                                **chunk).loss
        return ours
    if impl == "materialised":
        def materialised(h, w, p):
            return rlhf_fast.policy_loss(h @ w.T, p["targets"], p["advantages"], p["mask"],
                                         old_logprobs=p["old"], config=config).loss
        return materialised
    if impl == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        module = LigerFusedLinearGRPOLoss(beta=0.0, epsilon_low=CONFIG.clip.eps_low,
                                          epsilon_high=CONFIG.clip.eps_high, loss_type="dapo")

        def liger(h, w, p):
            out = module(h, w, p["targets"], p["mask"].to(h.dtype), p["advantages"],
                         old_per_token_logps=p["old"])
            return out[0] if isinstance(out, tuple) else out
        return liger

    def ref(h, w, p):
        return reference.policy_loss((h @ w.T).float(), p["targets"], p["advantages"],
                                     p["mask"], old_logprobs=p["old"], config=config)[0]
    return ref


def _hidden(case: Case, inputs: dict) -> torch.Tensor:
    return inputs["packed_hidden" if case.mode == "packed" else "hidden"]


def make_step(case: Case, impl: str, inputs: dict) -> Callable[[], object]:
    loss_fn = _loss_fn(impl, case.mode)
    h = _hidden(case, inputs).detach().requires_grad_()
    w = inputs["weight"].detach().requires_grad_()

    def step():
        h.grad = w.grad = None
        loss_fn(h, w, inputs).backward()
        return h.grad
    return step


def errors(case: Case, impl: str, inputs: dict) -> dict[str, float]:
    """Norm-wise relative errors of the loss and of grad_hidden / grad_weight against the
    float64 reference on the same hidden states and weight (quick shapes only)."""
    if case.n * case.v > 2**26:
        return {}
    h = _hidden(case, inputs).detach().requires_grad_()
    w = inputs["weight"].detach().requires_grad_()
    loss = _loss_fn(impl, case.mode)(h, w, inputs)
    loss.backward()

    def float64():
        hr = _hidden(case, inputs).detach().double().requires_grad_()
        wr = inputs["weight"].detach().double().requires_grad_()
        if case.mode == "logprobs":
            ref = reference.token_logprobs(hr @ wr.T, inputs["targets"]).sum()
        elif case.mode == "packed":
            p = inputs
            ref = reference.policy_loss(
                (hr @ wr.T).unsqueeze(0), p["packed_targets"].unsqueeze(0),
                p["packed_advantages"].double().unsqueeze(0), p["packed_mask"].unsqueeze(0),
                old_logprobs=p["packed_old"].double().unsqueeze(0), config=CONFIG)[0]
        else:
            ref = reference.policy_loss(hr @ wr.T, inputs["targets"],
                                        inputs["advantages"].double(), inputs["mask"],
                                        old_logprobs=inputs["old"].double(),
                                        config=CONFIGS[case.mode])[0]
        ref.backward()
        return ref.item(), hr.grad, wr.grad
    ref, grad_h, grad_w = float64_reference((SUITE, case), float64)

    def rel(a, b):
        return ((a.double() - b).norm() / b.norm()).item()
    return {"err_loss": abs(loss.item() - ref) / max(abs(ref), 1e-30),
            "err_grad": max(rel(h.grad, grad_h), rel(w.grad, grad_w))}


def run_case(case: Case, impl: str, device: torch.device, *, warmup: int, reps: int) -> dict:
    record = {"suite": SUITE, "case": asdict(case), "label": case.label, "mode": case.mode,
              "impl": impl, "useful_bytes": 0, "bytes_formula": "-",
              "useful_flops": useful_flops(case), "flops_formula": "6*N*H*V"}
    reason = absent_reason(case, impl, device)
    if reason:
        return {**record, "status": "absent", "reason": reason}
    record["gemm_tflops"] = linear_gemm_tflops(case.n, case.h, case.v, case.dtype, device)
    inputs = make_inputs(case, device)
    if case.mode == "packed":                   # no padding: only the real tokens are run
        record["useful_flops"] = 6 * inputs["packed_hidden"].shape[0] * case.h * case.v
        record["flops_formula"] = "6*N'*H*V (N' real tokens)"
    step = make_step(case, impl, inputs)
    record["median_ms"] = median_ms(step, device, warmup=warmup, reps=reps)
    record["peak_extra_mib"] = peak_extra_mib(step, device)
    del step
    record.update(errors(case, impl, inputs))
    return {**record, "status": "ok"}
