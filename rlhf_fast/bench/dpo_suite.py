"""The ``dpo`` suite: the sigmoid DPO loss, forward + backward, from logits and from hidden
states.

Modes:

- ``logits``: ``dpo_loss`` on ``[2B, T, V]`` logits with per-sequence reference log-probs.
  Useful bytes 2*N*V*s (logits read once, gradient written once; N = 2B*T tokens).
- ``linear``: ``linear_dpo_loss`` from hidden states ``[2B, T, H]`` and the ``lm_head``
  weight, the reference model given as its hidden states and head (its log-probs computed
  in the loop, as Liger does). Useful FLOPs 8*N*H*V: the three GEMMs of the policy and the
  reference model's logits GEMM, against the rate of the case's GEMMs run alone just before
  (``ceilings.linear_gemm_tflops``).
- ``packed``: ``linear`` on the same pairs packed back to back (``[N', H]`` with
  ``cu_seqlens``, each sequence up to its last response token, no padding); the reference
  runs on the padded layout, which the packed results must equal. 8*N'*H*V (real tokens).
- ``long``: ``linear`` on ONE pair of N/2-token sequences, which ``rlhf_fast`` cuts into
  four token chunks: the sequence log-probs come from the no-grad pre-pass (10*N*H*V FLOPs
  run, 8*N*H*V counted as useful).

Implementations: ``rlhf_fast``; ``reference`` (the float32 reference on materialised logits,
eager); ``liger`` (Liger-Kernel's ``LigerFusedLinearDPOLoss``, linear mode, when installed,
on CUDA). Errors are against the float64 reference on the same inputs (quick shapes only).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import asdict

import torch

import rlhf_fast
from rlhf_fast import reference
from rlhf_fast.preference_config import preference_config

from .case import Case
from .ceilings import linear_gemm_tflops
from .ground_truth import float64_reference
from .measure import median_ms, peak_extra_mib
from .rotation import rotating

SUITE = "dpo"
IMPLS = ("rlhf_fast", "reference", "liger")
BETA = 0.1
CONFIG = preference_config(beta=BETA, loss_type="sigmoid")
SEQ_LEN = 256
QUICK_SHAPES = {"cpu": {"logits": [(512, 32000)], "linear": [(256, 128, 32000)]},
                "cuda": {"logits": [(16384, 128256)], "linear": [(16384, 4096, 128256)]}}
FULL_SHAPES = {"logits": [(16384, 128256), (16384, 151936), (32768, 151936)],
               "linear": [(16384, 4096, 128256), (32768, 4096, 151936)]}
TINY_SHAPES = {"logits": [(64, 1000)], "linear": [(64, 32, 1000)]}
LINEAR_MODES = ("linear", "packed", "long")
LONG_CHUNKS = 4
"""``long`` mode: ``rlhf_fast`` cuts its pair into this many token chunks."""
"""``--shapes tiny``: the harness end to end in seconds (tests); the timings mean nothing."""


def useful_bytes(case: Case) -> int:
    """logits mode: the logits read once and the gradient written once, 2*N*V*s."""
    return 2 * case.logit_bytes if case.mode == "logits" else 0


def useful_flops(case: Case) -> int:
    """linear mode: three GEMMs of N x H x V and the reference model's one, 8*N*H*V."""
    return 8 * case.n * case.h * case.v if case.mode in LINEAR_MODES else 0


def cases(shapes: str, device: torch.device, dtype: str = "bfloat16") -> list[Case]:
    grid = {"quick": QUICK_SHAPES[device.type], "full": FULL_SHAPES, "tiny": TINY_SHAPES}[shapes]
    return ([Case(n, v, dtype, "logits") for n, v in grid["logits"]]
            + [Case(n, v, dtype, mode, h) for n, h, v in grid["linear"]
               for mode in LINEAR_MODES])


def _pairs(case: Case) -> tuple[int, int]:
    if case.mode == "long":
        return 1, case.n // 2
    seq_len = min(SEQ_LEN, case.n // 2)
    return case.n // (2 * seq_len), seq_len


def make_inputs(case: Case, device: torch.device, seed: int = 0) -> dict:
    """B pairs of T tokens: a prompt (masked) then a response of its own length, padded;
    masked targets are -100 (the layout Liger takes)."""
    pairs, seq_len = _pairs(case)
    g = torch.Generator(device=device).manual_seed(seed)
    dtype = getattr(torch, case.dtype)
    targets = torch.randint(0, case.v, (2 * pairs, seq_len), device=device, generator=g)
    t = torch.arange(seq_len, device=device)
    start = torch.randint(0, seq_len // 4, (2 * pairs, 1), device=device, generator=g)
    stop = torch.randint(seq_len // 2, seq_len + 1, (2 * pairs, 1), device=device, generator=g)
    mask = (t >= start) & (t < stop)
    inputs = dict(targets=targets.masked_fill(~mask, -100), mask=mask)
    if case.mode == "logits":
        logits = torch.randn(2 * pairs, seq_len, case.v, device=device, generator=g,
                             dtype=dtype).mul_(2.0)
        with torch.no_grad():
            logp = rlhf_fast.token_logprobs(logits, inputs["targets"])
        noise = 0.1 * torch.randn(2 * pairs, seq_len, device=device, generator=g)
        inputs.update(logits=logits, ref=((logp + noise) * mask).sum(-1))
        return inputs
    hidden = torch.randn(2 * pairs, seq_len, case.h, device=device, generator=g, dtype=dtype)
    weight = (torch.randn(case.v, case.h, device=device, generator=g) / case.h**0.5).to(dtype)
    ref_hidden = hidden + 0.1 * torch.randn(hidden.shape, device=device, generator=g,
                                            dtype=dtype)
    inputs.update(hidden=hidden, weight=weight, ref_hidden=ref_hidden, ref_weight=weight.clone())
    if case.mode == "packed":                 # each sequence up to its last response token
        keep = t < stop
        cu = torch.zeros(2 * pairs + 1, dtype=torch.int32, device=device)
        cu[1:] = stop.squeeze(-1).cumsum(0)
        inputs.update(keep=keep, cu_seqlens=cu, packed_hidden=hidden[keep].contiguous(),
                      packed_targets=inputs["targets"][keep], packed_mask=mask[keep],
                      packed_ref_hidden=ref_hidden[keep].contiguous())
    return inputs


def _hidden(case: Case, inputs: dict) -> torch.Tensor:
    return inputs["packed_hidden" if case.mode == "packed" else "hidden"]


def _padded(h: torch.Tensor, p: dict) -> torch.Tensor:
    """Packed hidden states ``[N', H]`` back at their padded positions ``[2B, T, H]``
    (differentiable: the reference's gradient comes back packed)."""
    if "keep" not in p:
        return h
    out = h.new_zeros((*p["keep"].shape, h.shape[-1]))
    out[p["keep"]] = h
    return out


def absent_reason(case: Case, impl: str, device: torch.device) -> str | None:
    if impl != "liger":
        return None
    if case.mode == "logits":
        return "Liger's DPO loss is fused-linear only"
    if case.mode != "linear":
        return "liger is compared in linear mode only"
    if device.type != "cuda":
        return "liger-kernel needs CUDA"
    try:
        import liger_kernel.chunked_loss  # noqa: F401
    except ImportError:
        return "liger-kernel is not installed"
    return None


def _liger_module() -> torch.nn.Module:
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    accepted = inspect.signature(LigerFusedLinearDPOLoss.__init__).parameters
    wanted = dict(beta=BETA, use_ref_model=True, compute_nll_loss=False, loss_type="sigmoid",
                  average_log_prob=False)
    return LigerFusedLinearDPOLoss(**{k: v for k, v in wanted.items() if k in accepted})


def _linear_fn(impl: str, mode: str = "linear") -> Callable:
    if impl == "rlhf_fast" and mode == "packed":
        return lambda h, w, p: rlhf_fast.linear_dpo_loss(
            h, w, p["packed_targets"], p["packed_mask"], ref_hidden=p["packed_ref_hidden"],
            ref_weight=p["ref_weight"], beta=BETA, cu_seqlens=p["cu_seqlens"]).loss
    if impl == "rlhf_fast":
        def ours(h, w, p):
            chunk = {"chunk_tokens": max(1, h.shape[0] * h.shape[1] // LONG_CHUNKS)} \
                if mode == "long" else {}
            return rlhf_fast.linear_dpo_loss(h, w, p["targets"], p["mask"],
                                             ref_hidden=p["ref_hidden"],
                                             ref_weight=p["ref_weight"], beta=BETA,
                                             **chunk).loss
        return ours
    if impl == "liger":
        module = _liger_module()

        def liger(h, w, p):
            out = module(w, h, p["targets"], ref_input=p["ref_hidden"],
                         ref_weight=p["ref_weight"])
            return out[0] if isinstance(out, tuple) else out
        return liger

    def ref(h, w, p):
        with torch.no_grad():
            ref_logp = reference.token_logprobs((p["ref_hidden"] @ p["ref_weight"].T).float(),
                                                p["targets"])
        return reference.dpo_loss((_padded(h, p) @ w.T).float(), p["targets"], p["mask"],
                                  ref_logprobs=ref_logp, config=CONFIG)[0]
    return ref


def _logits_fn(impl: str) -> Callable:
    if impl == "rlhf_fast":
        return lambda x, p: rlhf_fast.dpo_loss(x, p["targets"], p["mask"],
                                               ref_logprobs=p["ref"], beta=BETA).loss
    return lambda x, p: reference.dpo_loss(x.float(), p["targets"], p["mask"],
                                           ref_logprobs=p["ref"], config=CONFIG)[0]


def make_step(case: Case, impl: str, inputs: dict) -> Callable[[], object]:
    if case.mode == "logits":
        loss_fn = _logits_fn(impl)
        leaf = inputs["logits"].detach().requires_grad_()

        def logits_step():
            leaf.grad = None
            loss_fn(leaf, inputs).backward()
            return leaf.grad
        return logits_step
    loss_fn = _linear_fn(impl, case.mode)
    h = _hidden(case, inputs).detach().requires_grad_()
    w = inputs["weight"].detach().requires_grad_()

    def linear_step():
        h.grad = w.grad = None
        loss_fn(h, w, inputs).backward()
        return h.grad
    return linear_step


def _float64(case: Case, inputs: dict) -> tuple[float, tuple[torch.Tensor, ...]]:
    """The float64 reference loss and gradient(s) on the same inputs."""
    if case.mode == "logits":
        xr = inputs["logits"].detach().double().requires_grad_()
        ref = reference.dpo_loss(xr, inputs["targets"], inputs["mask"],
                                 ref_logprobs=inputs["ref"].double(), config=CONFIG)[0]
        ref.backward()
        return ref.item(), (xr.grad,)
    hr = _hidden(case, inputs).detach().double().requires_grad_()
    wr = inputs["weight"].detach().double().requires_grad_()
    with torch.no_grad():
        ref_logp = reference.token_logprobs(
            inputs["ref_hidden"].double() @ inputs["ref_weight"].double().T, inputs["targets"])
    ref = reference.dpo_loss(_padded(hr, inputs) @ wr.T, inputs["targets"], inputs["mask"],
                             ref_logprobs=ref_logp, config=CONFIG)[0]
    ref.backward()
    return ref.item(), (hr.grad, wr.grad)


def errors(case: Case, impl: str, inputs: dict) -> dict[str, float]:
    """Relative error of the loss, norm-wise relative error of the gradient(s), against the
    float64 reference on the same inputs (skipped above 2^26 logits)."""
    if case.n * case.v > 2**26:
        return {}
    if case.mode == "logits":
        leaves = (inputs["logits"].detach().requires_grad_(),)
        loss = _logits_fn(impl)(*leaves, inputs)
    else:
        leaves = (_hidden(case, inputs).detach().requires_grad_(),
                  inputs["weight"].detach().requires_grad_())
        loss = _linear_fn(impl, case.mode)(*leaves, inputs)
    loss.backward()
    ref, ref_grads = float64_reference((SUITE, case), lambda: _float64(case, inputs))
    err_grad = max(((leaf.grad.double() - g).norm() / g.norm()).item()
                   for leaf, g in zip(leaves, ref_grads, strict=True))
    return {"err_loss": abs(loss.item() - ref) / max(abs(ref), 1e-30), "err_grad": err_grad}


def run_case(case: Case, impl: str, device: torch.device, *, warmup: int, reps: int) -> dict:
    record = {"suite": SUITE, "case": asdict(case), "label": case.label, "mode": case.mode,
              "impl": impl, "useful_bytes": useful_bytes(case),
              "bytes_formula": "2*N*V*s" if case.mode == "logits" else "-"}
    if case.mode in LINEAR_MODES:
        record.update(useful_flops=useful_flops(case), flops_formula="8*N*H*V")
    reason = absent_reason(case, impl, device)
    if reason:
        return {**record, "status": "absent", "reason": reason}
    if case.mode in LINEAR_MODES:
        record["gemm_tflops"] = linear_gemm_tflops(case.n, case.h, case.v, case.dtype, device)
    if case.mode == "logits":
        step = rotating(lambda i: make_step(case, impl, make_inputs(case, device, seed=i)),
                        case.logit_bytes, device)
    else:
        inputs = make_inputs(case, device)
        if case.mode == "packed":               # no padding: only the real tokens are run
            record.update(useful_flops=8 * inputs["packed_hidden"].shape[0] * case.h * case.v,
                          flops_formula="8*N'*H*V (N' real tokens)")
        step = make_step(case, impl, inputs)
    record["median_ms"] = median_ms(step, device, warmup=warmup, reps=reps)
    record["peak_extra_mib"] = peak_extra_mib(step, device)
    del step
    record.update(errors(case, impl, make_inputs(case, device)))
    return {**record, "status": "ok"}
