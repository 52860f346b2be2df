"""policy_loss, both backends, against the float64 reference: every preset x ratio level x
dtype x {KL, entropy bonus, rollout correction}, plus hypothesis-drawn problems."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from policy_problems import check_policy, make_problem, stable_seed

from rlhf_fast import PRESETS, PolicyLossConfig

RATIO_LEVELS = ["token", "sequence", "sequence_token"]
FEATURES = {
    "plain": {},
    "kl": {"kl_coef": 0.1},
    "entropy": {"entropy_coef": 0.05},
    "rollout": {"rollout_correction": "token_truncate", "rollout_cap": 1.2},
}


PEER_PRESETS = ("clip_cov", "kl_cov", "dppo_tv", "dppo_kl", "vespo")
"""Token-level presets with their own tests (tests/test_peers_losses.py: a seeded draw for
clip_cov, both backends, every feature)."""


def configs():
    for preset in PRESETS:
        if preset in PEER_PRESETS:
            continue
        for level in RATIO_LEVELS:
            if preset == "gmpo" and level != "sequence":
                continue
            yield preset, level


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("preset", "level"), list(configs()))
def test_preset_matches_reference(backend, device, preset, level, dtype, feature):
    overrides = dict(FEATURES[feature])
    if preset == "gmpo" and feature == "rollout":
        overrides["rollout_correction"] = "sequence_truncate"
    if preset in ("gspo", "gspo_token"):
        overrides.update(clip_eps_low=0.05, clip_eps_high=0.08)  # ratios straddle the bounds
    config = PolicyLossConfig.preset(preset, ratio_level=level, **overrides)
    problem = make_problem(dtype=dtype, device=device, seed=stable_seed(preset, level, feature))
    check_policy(problem, config, backend)


@pytest.mark.parametrize("correction", ["token_truncate", "token_mask", "sequence_truncate",
                                        "sequence_mask"])
def test_rollout_corrections(backend, device, correction):
    config = PolicyLossConfig.preset("dapo", rollout_correction=correction, rollout_cap=1.5)
    check_policy(make_problem(device=device, spread=0.1), config, backend)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("reference_policy", ["ref", "old"])
@pytest.mark.parametrize("kl_clamp", [None, 0.05])
def test_kl_estimators(backend, device, estimator, reference_policy, kl_clamp):
    config = PolicyLossConfig.preset("grpo", kl_estimator=estimator, kl_coef=0.5,
                                     kl_reference=reference_policy, kl_clamp=kl_clamp)
    check_policy(make_problem(device=device, spread=0.5), config, backend)


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean",
                                         "seq_mean_token_sum", "seq_mean_token_sum_norm"])
@pytest.mark.parametrize("normalizer", [None, 7.0])
def test_aggregations(backend, device, aggregation, normalizer):
    config = PolicyLossConfig(aggregation=aggregation, normalizer=normalizer, max_length=10)
    check_policy(make_problem(device=device, per_token_adv=True), config, backend)


@pytest.mark.parametrize("overrides", [
    {"dual_clip_c": 2.0}, {"delta": 1.5}, {"clip_eps_low": None},
    {"clip_gradient": "keep_high"}, {"clip_gradient": "keep_both", "dual_clip_c": 3.0},
    {"objective": "pg", "delta": None}, {"objective": "sapo"}, {"objective": "cispo"},
    {"log_ratio_clamp": 0.2}, {"log_ratio_clamp": None}, {"temperature": 0.7},
    {"entropy_advantage_alpha": 0.2}, {"top_entropy_quantile": 0.5, "entropy_coef": 0.1},
])
def test_fields(backend, device, overrides):
    config = PolicyLossConfig(**overrides)
    check_policy(make_problem(device=device, spread=0.6, per_token_adv=True), config, backend)


def test_on_policy(backend, device):
    for preset in ("grpo", "gspo", "gspo_token", "sapo", "cispo", "gmpo"):
        config = PolicyLossConfig.preset(preset, kl_coef=0.0)
        check_policy(make_problem(device=device), config, backend, use_old=False,
                     use_rollout=False)


def test_float16(backend, device):
    config = PolicyLossConfig.preset("dapo", entropy_coef=0.01)
    check_policy(make_problem(dtype=torch.float16, device=device), config, backend)


def test_odd_vocab_and_flattened_rows(backend, device):
    problem = make_problem(batch=1, seq_len=5, n_cols=4097, device=device)
    check_policy(problem, PolicyLossConfig.preset("dapo"), backend)
    flat = {k: v[0] for k, v in problem.items()}
    flat["advantages"] = problem["advantages"].expand(5).contiguous()
    check_policy(flat, PolicyLossConfig.preset("dapo"), backend)


@st.composite
def policy_problems(draw):
    preset = draw(st.sampled_from(sorted(set(PRESETS) - set(PEER_PRESETS))))
    level = "sequence" if preset == "gmpo" else draw(st.sampled_from(RATIO_LEVELS))
    overrides = {"ratio_level": level}
    if draw(st.booleans()):
        overrides["kl_coef"] = draw(st.sampled_from([0.01, 0.3]))
    if draw(st.booleans()):
        overrides["entropy_coef"] = 0.02
    if preset in ("gspo", "gspo_token"):
        overrides.update(clip_eps_low=0.05, clip_eps_high=0.08)
    problem = make_problem(
        batch=draw(st.integers(1, 4)), seq_len=draw(st.integers(1, 7)),
        n_cols=draw(st.sampled_from([2, 33, 300])),
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])),
        seed=draw(st.integers(0, 10_000)), spread=draw(st.sampled_from([0.05, 0.3, 1.0])),
        per_token_adv=draw(st.booleans()))
    return problem, PolicyLossConfig.preset(preset, **overrides)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=policy_problems())
def test_hypothesis_torch(case):
    check_policy(case[0], case[1], "torch")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=policy_problems())
def test_hypothesis_triton(case):
    check_policy(case[0], case[1], "triton")
