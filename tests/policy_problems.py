"""Random policy-loss problems whose ratios straddle the clip bounds, and the comparison
of the fused op against the float64 reference (loss, logprobs, entropy, gradient, metrics)."""

import zlib

import torch
from numerics import GRAD_RTOL, assert_grad_close, rel_err

import rlhf_fast
from rlhf_fast import reference
from rlhf_fast.loss_weights import aggregation_weights

LOSS_RTOL = 1e-5


def stable_seed(*parts) -> int:
    """A seed that is the same in every run (``hash`` of a str is salted per process)."""
    return zlib.crc32(repr(parts).encode()) % 10_000


def loss_scale(problem, config, loss) -> float:
    """The norm-wise scale of a loss that is a sum of per-token terms: its own magnitude or
    the aggregated |advantage| (each policy term is about |A| * ratio), whichever is larger.
    A sum that nearly cancels is compared to the size of its terms, not to the remainder."""
    m = problem["mask"].double()
    adv = problem["advantages"].double()
    if m.dim() == 1:  # flattened: one sequence of per-token advantages
        m, adv = m.unsqueeze(0), adv.unsqueeze(0)
    agg = config.aggregation
    w = aggregation_weights(m, agg.mode, agg.normalizer, agg.max_length, agg.count_empty_sequences)
    adv = adv.unsqueeze(-1).expand_as(m) if adv.dim() == 1 else adv
    return max(abs(loss), float((w * adv.abs()).sum()))


def small_op_inputs(batch: int, seq_len: int, n_cols: int, hidden: int) -> dict:
    """Small inputs for every op, seed 0: logits ``[B, T, V]``, hidden ``[B, T, H]``, weight
    ``[V, H]``, targets, a mask with at least one valid token, ``[B]`` advantages and
    ``[B, T]`` log-probs."""
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(batch, seq_len, generator=g) > 0.3
    mask[0, 0] = True
    return dict(logits=torch.randn(batch, seq_len, n_cols, generator=g),
                hidden=torch.randn(batch, seq_len, hidden, generator=g),
                weight=torch.randn(n_cols, hidden, generator=g) * 0.5,
                targets=torch.randint(0, n_cols, (batch, seq_len), generator=g), mask=mask,
                adv=torch.randn(batch, generator=g),
                lp=torch.randn(batch, seq_len, generator=g) - 3)


def make_problem(batch=3, seq_len=6, n_cols=64, dtype=torch.float32, seed=0, spread=0.3,
                 per_token_adv=False, device="cpu"):
    """logits / targets / mask / advantages, and old / ref / rollout log-probs within
    ``spread`` of the current log-probs, so ratios fall both inside and outside the clip
    range. The last sequence is fully masked."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, seq_len, n_cols, generator=g) * 2).to(dtype)
    targets = torch.randint(0, n_cols, (batch, seq_len), generator=g)
    mask = torch.rand(batch, seq_len, generator=g) > 0.25
    mask[-1] = False
    mask[0, 0] = True
    adv_shape = (batch, seq_len) if per_token_adv else (batch,)
    advantages = torch.randn(adv_shape, generator=g)
    logp = reference.token_logprobs(logits.double(), targets).float()

    def near():
        return logp + spread * torch.randn(batch, seq_len, generator=g)

    p = dict(logits=logits, targets=targets, mask=mask, advantages=advantages,
             old_logprobs=near(), ref_logprobs=near(), rollout_logprobs=near())
    return {k: v.to(device) for k, v in p.items()}


def policy_inputs(problem, config, *, use_old=True, use_rollout=True):
    """The per-token side inputs ``config`` reads. The op refuses inputs the config would
    ignore: a reference with a KL to the old policy, rollout log-probs without rollout
    correction or off-policy sequence mask."""
    reads_rollout = (config.rollout.mode is not None
                     or config.rollout.off_policy_mask_threshold is not None)
    return dict(old_logprobs=problem["old_logprobs"] if use_old else None,
                ref_logprobs=problem["ref_logprobs"] if config.kl.reference == "ref" else None,
                rollout_logprobs=problem["rollout_logprobs"]
                if use_rollout and reads_rollout else None)


def check_policy(problem, config, backend, *, use_old=True, use_rollout=True, grad_scale=1.0,
                 seed=None):
    """Fused op vs float64 reference on the same values. ``seed``: the global generators are
    seeded with it before the op and again before the reference (Clip-Cov's random draw)."""
    dtype = problem["logits"].dtype
    inputs = policy_inputs(problem, config, use_old=use_old, use_rollout=use_rollout)
    x = problem["logits"].clone().requires_grad_()
    if seed is not None:
        torch.manual_seed(seed)
    out = rlhf_fast.policy_loss(x, problem["targets"], problem["advantages"], problem["mask"],
                                config=config, backend=backend, **inputs)
    (out.loss * grad_scale).backward()

    xr = problem["logits"].detach().double().requires_grad_()
    ref_inputs = {k: (v.double() if v is not None else None) for k, v in inputs.items()}
    if seed is not None:
        torch.manual_seed(seed)
    loss, logp, ent, metrics = reference.policy_loss(
        xr, problem["targets"], problem["advantages"].double(), problem["mask"],
        config=config, **ref_inputs)
    (loss * grad_scale).backward()

    assert out.loss.dtype == torch.float32 and out.loss.dim() == 0
    assert torch.isfinite(out.loss)
    scale = loss_scale(problem, config, loss.item())
    err = abs(out.loss.item() - loss.item()) / max(scale, 1e-30)
    assert err <= LOSS_RTOL, \
        f"loss {out.loss.item()} vs reference {loss.item()} (norm-wise rel {err:.2e})"
    valid = problem["mask"].double()
    for name, actual, expected in (("logprobs", out.logprobs, logp),
                                   ("entropy", out.entropy, ent)):
        assert actual.dtype == torch.float32
        assert rel_err(actual * valid, expected * valid) <= 1e-5, name
        assert (actual[~problem["mask"]] == 0).all(), f"{name} must be 0 at masked positions"
    if xr.grad.norm() > 0:
        assert_grad_close(x.grad, xr.grad, dtype)
    else:
        assert (x.grad == 0).all(), "reference gradient is zero, op's is not"
    for key, value in metrics.items():
        assert torch.allclose(out.metrics[key].double(), value.double(), rtol=1e-5, atol=1e-6), \
            f"metric {key}: {out.metrics[key].item()} vs {value.item()}"
    return out, x.grad, xr.grad


__all__ = ["GRAD_RTOL", "check_policy", "loss_scale", "make_problem", "stable_seed"]
