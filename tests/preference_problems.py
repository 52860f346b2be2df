"""Random preference batches (prompt, response and padding of different lengths per
sequence) and the comparison of ``dpo_loss`` against the float64 reference."""

import torch
from numerics import assert_grad_close

import rlhf_fast
from rlhf_fast import reference
from rlhf_fast.preference_config import LOSS_TYPES, SMOOTHED_LOSSES, preference_config

LOSS_RTOL = 1e-5
METRIC_TOL = 1e-5


def loss_kwargs(loss_type: str) -> dict:
    """Hyper-parameters that exercise every term of ``loss_type`` (smoothing, margin)."""
    kwargs = {"loss_type": loss_type, "beta": 0.5 if loss_type != "simpo" else 2.0}
    if loss_type in SMOOTHED_LOSSES:
        kwargs["label_smoothing"] = 0.1
    if loss_type == "simpo":
        kwargs["gamma"] = 0.4
    return kwargs


def response_mask(batch: int, seq_len: int, g: torch.Generator) -> torch.Tensor:
    """Each sequence: a masked prompt, a response of its own length, masked padding."""
    prompt = torch.randint(0, seq_len // 2, (batch,), generator=g)
    length = torch.randint(1, seq_len, (batch,), generator=g)
    t = torch.arange(seq_len)
    return (t >= prompt[:, None]) & (t < (prompt + length)[:, None])


def make_pairs(pairs=3, seq_len=7, n_cols=50, dtype=torch.float32, seed=0, device="cpu"):
    """logits ``[2B, T, V]``, targets, mask and per-token reference log-probs that differ
    from the policy's by a few tenths, so margins take both signs."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(2 * pairs, seq_len, n_cols, generator=g) * 2).to(dtype)
    targets = torch.randint(0, n_cols, (2 * pairs, seq_len), generator=g)
    mask = response_mask(2 * pairs, seq_len, g)
    logp = reference.token_logprobs(logits.double(), targets).float()
    ref = logp + 0.3 * torch.randn(2 * pairs, seq_len, generator=g)
    p = dict(logits=logits, targets=targets, mask=mask, ref=ref)
    return {k: v.to(device) for k, v in p.items()}


def reference_inputs(problem: dict, kwargs: dict, ref_layout: str = "token"):
    """The config, and the reference log-probs in the requested layout (None when the loss
    is reference-free)."""
    config = preference_config(**kwargs)
    if not config.uses_reference:
        return config, None
    ref = problem["ref"]
    if ref_layout == "sequence":
        ref = torch.where(problem["mask"], ref, 0.0).sum(-1)
    return config, ref


def with_prompts(problem: dict) -> torch.Tensor:
    """An ``nll_mask`` covering ``mask``: each sequence's prompt (every position before its
    response) and response, as TRL's ORPO attention mask."""
    mask = problem["mask"]
    started = mask.cumsum(-1) > 0
    before = ~started & mask.any(-1, keepdim=True)
    return mask | before


def loss_scale(problem: dict, config, ref, nll_mask=None, log_sum_sq=None) -> float:
    """The norm-wise scale of the loss: its magnitude or its first-order sensitivity to the
    per-token log-probs it is built from, sum_t |dL/dlogp_t * logp_t|, whichever is larger.
    A loss whose terms nearly cancel (robust at large smoothing, EXO or IPO near their
    optimum) is compared to the size of what it is made of, as the policy tests do."""
    logp = reference.token_logprobs(problem["logits"].double() / config.temperature,
                                    problem["targets"]).requires_grad_()
    valid = problem["mask"] & (problem["targets"] != -100)
    nll_valid = nll_mask.bool() & (problem["targets"] != -100) if nll_mask is not None else None
    loss = reference.dpo_loss_from_logprobs(
        logp, valid, ref.double() if ref is not None else None, config,
        log_sum_sq=log_sum_sq, nll_valid=nll_valid)[0]
    (grad,) = torch.autograd.grad(loss, logp, allow_unused=True)
    sensitivity = (grad * logp).abs().sum().item() if grad is not None else 0.0
    return max(abs(loss.item()), sensitivity)


def check_dpo(problem: dict, kwargs: dict, backend: str, *, ref_layout: str = "token",
              grad_scale: float = 1.0, nll_mask=None):
    """dpo_loss vs the float64 reference on the same values: loss, sequence log-probs,
    gradient and metrics."""
    dtype = problem["logits"].dtype
    config, ref = reference_inputs(problem, kwargs, ref_layout)
    x = problem["logits"].clone().requires_grad_()
    more = {"nll_mask": nll_mask} if nll_mask is not None else {}
    out = rlhf_fast.dpo_loss(x, problem["targets"], problem["mask"], ref_logprobs=ref,
                             backend=backend, **kwargs, **more)
    (out.loss * grad_scale).backward()

    xr = problem["logits"].detach().double().requires_grad_()
    loss, chosen, rejected, metrics = reference.dpo_loss(
        xr, problem["targets"], problem["mask"],
        ref_logprobs=ref.double() if ref is not None else None, config=config, **more)
    (loss * grad_scale).backward()

    assert out.loss.dtype == torch.float32 and out.loss.dim() == 0
    log_sum_sq = None
    if config.use_weighting:
        z = problem["logits"].double() / config.temperature
        log_sum_sq = torch.logsumexp(2 * torch.log_softmax(z, dim=-1), dim=-1)
    scale = loss_scale(problem, config, ref, nll_mask, log_sum_sq)
    err = abs(out.loss.item() - loss.item()) / max(scale, 1e-30)
    assert err <= LOSS_RTOL, \
        f"loss {out.loss.item()} vs reference {loss.item()} (norm-wise rel {err:.2e})"
    for name, actual, expected in (("chosen", out.chosen_logprobs, chosen),
                                   ("rejected", out.rejected_logprobs, rejected)):
        assert actual.dtype == torch.float32 and actual.shape == expected.shape
        assert torch.allclose(actual.double(), expected, rtol=1e-5, atol=1e-5), name
    if xr.grad.norm() > 0:
        assert_grad_close(x.grad, xr.grad, dtype)
    else:
        assert (x.grad == 0).all(), "reference gradient is zero, op's is not"
    assert set(out.metrics) == set(metrics)
    for key, value in metrics.items():
        assert torch.allclose(out.metrics[key].double(), value.double(), rtol=METRIC_TOL,
                              atol=METRIC_TOL), f"{key}: {out.metrics[key]} vs {value}"
    return out, x.grad, xr.grad


__all__ = ["LOSS_TYPES", "check_dpo", "loss_kwargs", "make_pairs", "reference_inputs",
           "with_prompts"]
