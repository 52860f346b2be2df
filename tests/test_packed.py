"""Packed (``cu_seqlens``) inputs of the logits ops equal the padded layout's: loss, per-token
outputs, metrics and gradients, for every aggregation and every sequence- or batch-level
statistic, both backends, float32 and bfloat16, empty sequences included; and the packed
results against the float64 reference run on the same sequences padded."""

import pytest
import torch
from numerics import assert_grad_close
from packing import cu_seqlens, lengths_for, pack, unpack
from policy_problems import loss_scale

import rlhf_fast
from rlhf_fast import PolicyLossConfig, reference
from rlhf_fast.preference_config import preference_config

S, T, V = 4, 6, 40

POLICY_CONFIGS = {
    "token_mean": PolicyLossConfig.preset("dapo", entropy_coef=0.05),
    "seq_mean_token_mean": PolicyLossConfig.preset("grpo", kl_coef=0.1),
    "seq_mean_token_sum": PolicyLossConfig.preset("ppo", aggregation="seq_mean_token_sum"),
    "seq_mean_token_sum_norm": PolicyLossConfig.preset("dr_grpo", max_length=T + 2),
    "gspo": PolicyLossConfig.preset("gspo", clip_eps_low=0.05, clip_eps_high=0.08),
    "gspo_token": PolicyLossConfig.preset("gspo_token", clip_eps_low=0.05, clip_eps_high=0.08),
    "gmpo": PolicyLossConfig.preset("gmpo"),
    "rollout_sequence": PolicyLossConfig.preset("grpo", kl_coef=0.0,
                                                rollout_correction="sequence_truncate"),
    "rollout_on_policy": PolicyLossConfig.preset("bnpo", rollout_correction="sequence_mask",
                                                 rollout_cap=3.0),
    "aepo": PolicyLossConfig.preset("aepo"),
    "top_entropy": PolicyLossConfig.preset("dapo", top_entropy_quantile=0.5,
                                           entropy_coef=0.1),
}


def policy_problem(dtype, seed=0, per_token_adv=False):
    """Padded [S, T] problem whose positions past each sequence's length are masked, and
    its lengths (sequence 1 empty; sequence 2 present but fully masked)."""
    g = torch.Generator().manual_seed(seed)
    lengths = lengths_for(S, T, seed)
    logits = (torch.randn(S, T, V, generator=g) * 2).to(dtype)
    targets = torch.randint(0, V, (S, T), generator=g)
    mask = (torch.rand(S, T, generator=g) > 0.2) & (torch.arange(T) < lengths[:, None])
    mask[2] = False
    mask[0, 0] = True
    adv = torch.randn((S, T) if per_token_adv else (S,), generator=g)
    logp = reference.token_logprobs(logits.double(), targets).float()
    old, ref, rollout = (logp + 0.2 * torch.randn(S, T, generator=g) for _ in range(3))
    return dict(logits=logits, targets=targets, mask=mask, adv=adv, old=old, ref=ref,
                rollout=rollout), lengths


def _run_policy(p, config, backend, lengths=None):
    name_on_policy = config.rollout.mode == "sequence_mask"
    logits = p["logits"] if lengths is None else pack(p["logits"], lengths)
    x = logits.clone().requires_grad_()

    def side(t):
        return t if lengths is None else pack(t, lengths)

    adv = p["adv"] if lengths is None or p["adv"].dim() == 1 else pack(p["adv"], lengths)
    out = rlhf_fast.policy_loss(
        x, side(p["targets"]), adv, side(p["mask"]),
        old_logprobs=None if name_on_policy else side(p["old"]),
        ref_logprobs=side(p["ref"]) if config.kl.reference == "ref" and config.kl.coef else None,
        rollout_logprobs=side(p["rollout"]) if config.rollout.mode else None,
        config=config, backend=backend,
        cu_seqlens=cu_seqlens(lengths) if lengths is not None else None)
    (out.loss * 0.7).backward()
    return out, x.grad


def _close(a, b, what, rtol=1e-6, atol=1e-6):
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol, msg=what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(POLICY_CONFIGS))
def test_policy_loss_packed_equals_padded(name, dtype, backend):
    config = POLICY_CONFIGS[name]
    p, lengths = policy_problem(dtype, seed=len(name), per_token_adv=name == "aepo")
    padded, padded_grad = _run_policy(p, config, backend)
    packed, packed_grad = _run_policy(p, config, backend, lengths)
    _close(packed.loss, padded.loss, "loss")
    _close(packed.logprobs, pack(padded.logprobs, lengths), "logprobs")
    _close(packed.entropy, pack(padded.entropy, lengths), "entropy")
    for key in padded.metrics:
        _close(packed.metrics[key], padded.metrics[key], key)
    _close(packed_grad, pack(padded_grad, lengths), "gradient",
           rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-6)
    # Against the float64 reference on the padded sequences.
    xr = p["logits"].double().requires_grad_()
    on_policy = config.rollout.mode == "sequence_mask"
    loss, _, _, _ = reference.policy_loss(
        xr, p["targets"], p["adv"].double(), p["mask"],
        old_logprobs=None if on_policy else p["old"].double(),
        ref_logprobs=p["ref"].double() if config.kl.reference == "ref" and config.kl.coef
        else None,
        rollout_logprobs=p["rollout"].double() if config.rollout.mode else None,
        config=config)
    (loss * 0.7).backward()
    scale = loss_scale({"mask": p["mask"], "advantages": p["adv"]}, config, loss.item())
    assert abs(packed.loss.item() - loss.item()) <= 1e-5 * scale
    assert_grad_close(unpack(packed_grad, lengths, T), xr.grad, dtype)


def pair_problem(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([T, 0, 3, 5, T, 2])            # chosen 1 is empty
    logits = (torch.randn(6, T, V, generator=g) * 2).to(dtype)
    targets = torch.randint(0, V, (6, T), generator=g)
    mask = (torch.arange(T) >= 1) & (torch.arange(T) < lengths[:, None])
    mask[0] = True
    ref = reference.token_logprobs(logits.double(), targets).float() \
        + 0.3 * torch.randn(6, T, generator=g)
    return dict(logits=logits, targets=targets, mask=mask, ref=ref), lengths


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("kwargs", "ref_layout"), [
    (dict(loss_type="sigmoid", nll_coef=0.3), "token"),
    (dict(loss_type="sigmoid", nll_coef=0.3), "sequence"),
    (dict(loss_type="ipo"), "token"), (dict(loss_type="orpo"), None),
    (dict(loss_type="sigmoid", ld_alpha=0.5), "token"),
    (dict(loss_type="sigmoid", nll_coef=0.3, nll_aggregation="sequence_mean"), "token"),
    (dict(loss_type="aot"), "token")],
    ids=["sigmoid-rpo-token", "sigmoid-rpo-sequence", "ipo-token", "orpo", "ld-dpo",
         "rpo-sequence-mean", "aot"])
def test_dpo_loss_packed_equals_padded(kwargs, ref_layout, dtype, backend):
    p, lengths = pair_problem(dtype, seed=3)
    config = preference_config(**kwargs)
    ref = p["ref"] if config.uses_reference else None
    if ref is not None and ref_layout == "sequence":
        ref = torch.where(p["mask"], ref, 0.0).sum(-1)

    def run(packed):
        logits = pack(p["logits"], lengths) if packed else p["logits"]
        x = logits.clone().requires_grad_()
        r = pack(ref, lengths) if packed and ref is not None and ref.dim() == 2 else ref
        out = rlhf_fast.dpo_loss(
            x, pack(p["targets"], lengths) if packed else p["targets"],
            pack(p["mask"], lengths) if packed else p["mask"], ref_logprobs=r,
            cu_seqlens=cu_seqlens(lengths) if packed else None, backend=backend, **kwargs)
        (out.loss * 1.5).backward()
        return out, x.grad

    padded, padded_grad = run(False)
    packed, packed_grad = run(True)
    for a, b, what in ((packed.loss, padded.loss, "loss"),
                       (packed.chosen_logprobs, padded.chosen_logprobs, "chosen"),
                       (packed.rejected_logprobs, padded.rejected_logprobs, "rejected")):
        _close(a, b, what)
    for key in padded.metrics:
        _close(packed.metrics[key], padded.metrics[key], key)
    _close(packed_grad, pack(padded_grad, lengths), "gradient",
           rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-6)
    xr = p["logits"].double().requires_grad_()
    loss = reference.dpo_loss(xr, p["targets"], p["mask"],
                              ref_logprobs=ref.double() if ref is not None else None,
                              config=config)[0]
    (loss * 1.5).backward()
    assert abs(packed.loss.item() - loss.item()) <= 1e-5 * max(1.0, abs(loss.item()))
    assert_grad_close(unpack(packed_grad, lengths, T), xr.grad, dtype)


def test_token_logprobs_packed(backend):
    p, lengths = policy_problem(torch.float32)
    x = pack(p["logits"], lengths)
    logp, ent = rlhf_fast.token_logprobs(x, pack(p["targets"], lengths), return_entropy=True,
                                         cu_seqlens=cu_seqlens(lengths), backend=backend)
    flat, flat_ent = rlhf_fast.token_logprobs(x, pack(p["targets"], lengths),
                                              return_entropy=True, backend=backend)
    assert torch.equal(logp, flat) and torch.equal(ent, flat_ent)


def test_packed_argument_errors():
    p, lengths = policy_problem(torch.float32)
    x, y, m = (pack(p[k], lengths) for k in ("logits", "targets", "mask"))
    cu = cu_seqlens(lengths)
    with pytest.raises(TypeError, match="cu_seqlens must be an int32"):
        rlhf_fast.policy_loss(x, y, p["adv"], m, config="dapo", cu_seqlens=cu.float())
    with pytest.raises(ValueError, match=r"cu_seqlens must be 1-D \[S \+ 1\]"):
        rlhf_fast.policy_loss(x, y, p["adv"], m, config="dapo", cu_seqlens=cu[None])
    with pytest.raises(ValueError, match=r"logits must be packed rows \[N, V\]"):
        rlhf_fast.policy_loss(p["logits"], p["targets"], p["adv"], p["mask"], config="dapo",
                              cu_seqlens=cu)
    with pytest.raises(ValueError, match="end at the number of packed tokens"):
        rlhf_fast.policy_loss(x, y, p["adv"], m, config="dapo", cu_seqlens=cu - 1)
    shuffled = cu.clone()
    shuffled[1], shuffled[2] = cu[2] + 1, cu[1]
    with pytest.raises(ValueError, match="never decrease"):
        rlhf_fast.token_logprobs(x, y, cu_seqlens=shuffled)
    with pytest.raises(ValueError, match=r"advantages must have shape"):
        rlhf_fast.policy_loss(x, y, p["adv"][:3], m, config="dapo", cu_seqlens=cu)
    with pytest.raises(ValueError, match="needs max_length"):
        rlhf_fast.policy_loss(x, y, p["adv"], m, config="dr_grpo", cu_seqlens=cu)
    with pytest.raises(ValueError, match="even number of sequences"):
        rlhf_fast.dpo_loss(x, y, m, reference_free=True, cu_seqlens=cu[:-1])
    with pytest.raises(ValueError, match=r"\[2B\] = \(4,\)"):
        rlhf_fast.dpo_loss(x, y, m, ref_logprobs=torch.zeros(3), cu_seqlens=cu)
