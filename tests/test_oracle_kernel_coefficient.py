"""The device coefficient helper (``kernels/policy_coefficient.py``) against the host
coefficient step, element by element, on the exact per-token values of
``test_oracle_coefficients.py`` (log-ratios on the clamps, r = 1 on zero-width clip ranges,
KL estimates on their clamps): the fused kernel's switches meet the same ties as the host."""

import pytest
import torch
import triton
import triton.language as tl
from rlhf_fast.kernels.policy_coefficient import token_policy_coefficient
from test_oracle_coefficients import ADV_TOKEN, CONFIGS, LOG_RATIO, LOGP, REF_GAP, ROLLOUT_GAP

from rlhf_fast import PolicyLossConfig
from rlhf_fast.loss_weights import aggregation_weights, rollout_weights
from rlhf_fast.ops.policy_loss import (
    CLIP_GRADIENT_CODES,
    OBJECTIVE_CODES,
    _kl_mode,
    fused_token_level,
)
from rlhf_fast.policy_coefficients import policy_coefficients


@triton.jit
def coefficient_kernel(
    logp_ptr, adv_ptr, old_ptr, ref_ptr, weight_ptr, policy_weight_ptr, out_ptr, n,
    clip_low, clip_high, dual_c, delta, log_ratio_clamp, kl_coef, kl_clamp, tau_pos, tau_neg,
    BLOCK: tl.constexpr, OBJECTIVE: tl.constexpr, CLIP_GRADIENT: tl.constexpr,
    HAS_LOW: tl.constexpr, HAS_DUAL: tl.constexpr, HAS_DELTA: tl.constexpr,
    HAS_CLAMP: tl.constexpr, KL_MODE: tl.constexpr, KL_FROM_OLD: tl.constexpr,
    HAS_KL_CLAMP: tl.constexpr,
):
    offsets = tl.arange(0, BLOCK)
    inside = offsets < n
    c = token_policy_coefficient(
        tl.load(logp_ptr + offsets, mask=inside, other=0.0),
        tl.load(adv_ptr + offsets, mask=inside, other=0.0),
        tl.load(old_ptr + offsets, mask=inside, other=0.0),
        tl.load(ref_ptr + offsets, mask=inside, other=0.0),
        tl.load(weight_ptr + offsets, mask=inside, other=0.0),
        tl.load(policy_weight_ptr + offsets, mask=inside, other=0.0),
        clip_low, clip_high, dual_c, delta, log_ratio_clamp, kl_coef, kl_clamp, tau_pos,
        tau_neg, OBJECTIVE, CLIP_GRADIENT, HAS_LOW, HAS_DUAL, HAS_DELTA, HAS_CLAMP, KL_MODE,
        KL_FROM_OLD, HAS_KL_CLAMP)
    tl.store(out_ptr + offsets, c, mask=inside)


# The configs the fused op sends to this helper (``fused_token_level``; the others, e.g.
# the ratio-weighted KL or DPPO, take the two-sweep path through the host step).
TOKEN_LEVEL = [name for name, fields in CONFIGS.items()
               if PolicyLossConfig(**fields).ratio.level == "token"
               and PolicyLossConfig(**fields).objective != "gmpo"
               and not PolicyLossConfig(**fields).needs_batch_statistics
               and fused_token_level(PolicyLossConfig(**fields), LOGP)]


@pytest.mark.parametrize("name", TOKEN_LEVEL)
@pytest.mark.parametrize("on_policy", [False, True])
def test_device_coefficient_equals_host(name, on_policy):
    run(PolicyLossConfig(**CONFIGS[name]), on_policy)


@pytest.mark.parametrize("name", ["k1_ref", "k3_clamped", "k2_old"])
def test_kl_without_reference_log_probs(name):
    # The launcher's KL switch is off when kl_reference="ref" has no ref log-probs.
    run(PolicyLossConfig(**CONFIGS[name]), False, with_ref=False)


def test_ratio_exactly_at_delta_and_the_dual_cap():
    tied = float(torch.exp(torch.tensor(0.75)).item())  # token [1, 5]'s float32 ratio
    run(PolicyLossConfig(delta=tied, clip_eps_high=0.5), False)
    run(PolicyLossConfig(dual_clip_c=tied), False)


def run(c, on_policy, with_ref=True):
    valid = torch.ones_like(LOGP, dtype=torch.bool)
    logp, adv = LOGP.float(), ADV_TOKEN.float()
    old = logp if on_policy else (LOGP - LOG_RATIO).float()
    ref = (LOGP + REF_GAP).float()
    rollout = (LOGP - LOG_RATIO - ROLLOUT_GAP).float()
    host = policy_coefficients(logp, torch.ones_like(logp), valid, adv,
                               None if on_policy else old, ref if with_ref else None,
                               rollout, c)
    m = valid.float()
    weight = aggregation_weights(m, c.aggregation.mode, c.aggregation.normalizer,
                                 c.aggregation.max_length)
    policy_weight = weight * rollout_weights(old, rollout, m, c)
    out = torch.empty(logp.numel())
    kl_mode = _kl_mode(c, ref if with_ref else None)
    coefficient_kernel[(1,)](
        logp.flatten(), adv.flatten(), old.flatten(), ref.flatten(), weight.flatten(),
        policy_weight.flatten().contiguous(), out, logp.numel(),
        c.clip.eps_low or 0.0, c.clip.eps_high, c.clip.dual_c or 0.0, c.clip.delta or 0.0,
        c.ratio.log_clamp or 0.0, c.kl.coef, c.kl.clamp or 0.0, c.soft_clip.sapo_tau_pos,
        c.soft_clip.sapo_tau_neg, BLOCK=32, OBJECTIVE=OBJECTIVE_CODES[c.objective],
        CLIP_GRADIENT=CLIP_GRADIENT_CODES[c.clip.gradient],
        HAS_LOW=c.clip.eps_low is not None, HAS_DUAL=c.clip.dual_c is not None,
        HAS_DELTA=c.clip.delta is not None, HAS_CLAMP=c.ratio.log_clamp is not None,
        KL_MODE=kl_mode, KL_FROM_OLD=c.kl.reference == "old",
        HAS_KL_CLAMP=c.kl.clamp is not None)
    assert torch.allclose(out.view_as(logp), host.c_logp, rtol=1e-6, atol=1e-8), \
        (out.view_as(logp), host.c_logp)
