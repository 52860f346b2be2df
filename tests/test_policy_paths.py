"""The one-kernel token-level path and the two-pass path give the same loss and gradient,
and each configuration takes the path docs/architecture.md (Two paths) assigns it."""

import pytest
import torch
from numerics import assert_grad_close
from policy_problems import make_problem

import rlhf_fast
from rlhf_fast import PolicyLossConfig
from rlhf_fast.ops import policy_loss as policy_op

TOKEN_LEVEL = [
    PolicyLossConfig.preset("ppo", dual_clip_c=3.0, delta=2.0, kl_coef=0.1,
                            kl_reference="ref", kl_clamp=0.5, entropy_coef=0.01),
    PolicyLossConfig.preset("dapo", rollout_correction="token_mask", rollout_cap=1.3),
    PolicyLossConfig.preset("cispo", kl_coef=0.2, kl_estimator="k2"),
    PolicyLossConfig.preset("sapo", kl_coef=0.3, kl_reference="old", kl_estimator="k1"),
    PolicyLossConfig.preset("aepo", entropy_advantage_alpha=None),
    PolicyLossConfig.preset("gppo", temperature=0.8),
    PolicyLossConfig.preset("reinforce", log_ratio_clamp=None),
]


def run(problem, config, fused, monkeypatch):
    monkeypatch.setattr(policy_op, "FUSE_TOKEN_LEVEL", fused)
    x = problem["logits"].clone().requires_grad_()
    out = rlhf_fast.policy_loss(x, problem["targets"], problem["advantages"], problem["mask"],
                                old_logprobs=problem["old_logprobs"],
                                ref_logprobs=problem["ref_logprobs"]
                                if config.kl.reference == "ref" else None,
                                rollout_logprobs=problem["rollout_logprobs"]
                                if config.rollout.mode is not None else None,
                                config=config, backend="triton")
    out.loss.backward()
    return out, x.grad


@pytest.mark.parametrize("config", TOKEN_LEVEL, ids=lambda c: c.objective + "-" + c.clip.gradient)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_equals_two_pass(config, dtype, device, monkeypatch):
    problem = make_problem(dtype=dtype, device=device, spread=0.4, per_token_adv=True)
    fused, g_fused = run(problem, config, True, monkeypatch)
    split, g_split = run(problem, config, False, monkeypatch)
    assert fused.loss.item() == pytest.approx(split.loss.item(), rel=1e-6, abs=1e-9)
    assert torch.equal(fused.logprobs, split.logprobs)
    assert torch.equal(fused.entropy, split.entropy)
    assert_grad_close(g_fused, g_split.float(), dtype)


@pytest.mark.parametrize(("config", "old_given", "fused"), [
    (PolicyLossConfig.preset("dapo"), True, True),
    (PolicyLossConfig.preset("ppo", rollout_correction="token_truncate"), True, True),
    (PolicyLossConfig.preset("ppo", rollout_correction="token_truncate"), False, False),
    (PolicyLossConfig.preset("ppo", rollout_correction="sequence_mask"), True, False),
    (PolicyLossConfig.preset("gspo"), True, False),
    (PolicyLossConfig.preset("gspo_token"), True, False),
    (PolicyLossConfig.preset("gmpo"), True, False),
    (PolicyLossConfig.preset("aepo"), True, False),
    (PolicyLossConfig.preset("dapo", top_entropy_quantile=0.2), True, False),
])
def test_path_choice(config, old_given, fused):
    assert policy_op.fused_token_level(config, torch.zeros(1) if old_given else None) == fused


def test_fused_kernel_is_launched_for_token_level(device, monkeypatch):
    calls = []
    original = policy_op._fused_token_policy
    monkeypatch.setattr(policy_op, "_fused_token_policy",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    problem = make_problem(device=device)
    run(problem, PolicyLossConfig.preset("dapo"), True, monkeypatch)
    assert calls == [1]
    run(problem, PolicyLossConfig.preset("gspo"), True, monkeypatch)
    assert calls == [1], "sequence-level losses take the two-pass path"
