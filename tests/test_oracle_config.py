"""PolicyLossConfig: every check at its bound (a zero bound is a bound), the presets' published
hyper-parameters, and which configurations need batch statistics."""

import dataclasses
import math

import pytest

from rlhf_fast import PRESETS, PolicyLossConfig
from rlhf_fast import config as config_module


@pytest.mark.parametrize(("field", "value"), [
    ("clip_eps_low", 0.0), ("clip_eps_low", 1.0), ("clip_eps_low", None),
    ("clip_eps_high", 0.0), ("clip_eps_high", 1e6), ("clip_eps_high", math.inf),
    ("dual_clip_c", 1.0001),
    ("delta", 1.2001), ("log_ratio_clamp", 1e-9), ("log_ratio_clamp", None),
    ("kl_clamp", 1e-9), ("normalizer", 1e-9), ("rollout_cap", 1e-9), ("temperature", 1e-9),
    ("sapo_tau_pos", 1e-9), ("sapo_tau_neg", 1e-9), ("max_length", 1), ("kl_coef", -1.0),
    ("kl_coef", 0.0), ("entropy_coef", -0.5), ("entropy_advantage_alpha", 0.0),
    ("top_entropy_quantile", 1.0), ("top_entropy_quantile", 1e-9),
    ("rollout_correction", "sequence_mask"),
])
def test_accepted_at_the_bound(field, value):
    assert PolicyLossConfig(**{field: value}).flat()[field] == value


@pytest.mark.parametrize(("field", "value", "message"), [
    ("clip_eps_low", -1e-9, "clip_eps_low must lie in"),
    ("clip_eps_low", 1.0001, "clip_eps_low must lie in"),
    ("clip_eps_low", math.nan, "clip_eps_low must lie in"),
    ("clip_eps_high", -1e-9, "clip_eps_high must lie in"),
    ("clip_eps_high", math.nan, "clip_eps_high must lie in"),
    ("dual_clip_c", 1.0, "dual_clip_c must be None or > 1"),
    ("delta", 1.2, "delta must be None or > 1 \\+ clip_eps_high"),
    ("log_ratio_clamp", 0.0, "log_ratio_clamp must be a finite number > 0"),
    ("log_ratio_clamp", math.inf, "log_ratio_clamp must be a finite"),
    ("kl_clamp", -1.0, "kl_clamp must be"), ("normalizer", 0.0, "normalizer must be"),
    ("rollout_cap", 0.0, "rollout_cap must be"), ("temperature", -1.0, "temperature"),
    ("sapo_tau_pos", 0.0, "sapo_tau_pos"), ("sapo_tau_neg", math.nan, "sapo_tau_neg"),
    ("gmpo_clip", 0.0, "gmpo_clip"), ("max_length", 0, "max_length must be None or >= 1"),
    ("kl_coef", math.inf, "kl_coef must be finite"),
    ("entropy_coef", math.nan, "entropy_coef must be finite"),
    ("entropy_advantage_alpha", -1e-9, "entropy_advantage_alpha must lie in"),
    ("top_entropy_quantile", 0.0, "top_entropy_quantile must be None or in"),
    ("top_entropy_quantile", 1.0001, "top_entropy_quantile must be None or in"),
    ("rollout_correction", "token", "rollout_correction must be one of"),
    ("ratio_level", "seq", "ratio_level must be one of"),
    ("clip_gradient", "keep", "clip_gradient must be one of"),
    ("kl_estimator", "k4", "kl_estimator must be one of"),
    ("kl_reference", "policy", "kl_reference must be one of"),
    ("vespo_k_pos", math.inf, "vespo_k_pos must be finite"),
    ("vespo_lambda_neg", math.nan, "vespo_lambda_neg must be finite"),
    ("cov_lower", -math.inf, "cov_lower must be finite"),
    ("cov_kl_coef", math.nan, "cov_kl_coef must be finite"),
    ("cov_upper", 1.0, "cov_lower must be < cov_upper"),
])
def test_rejected_past_the_bound(field, value, message):
    with pytest.raises(ValueError, match=message):
        PolicyLossConfig(**{field: value})


def test_frozen():
    config = PolicyLossConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.clip_eps_high = 0.3


def test_delta_bound_follows_clip_eps_high():
    PolicyLossConfig(clip_eps_high=0.5, delta=1.51)
    with pytest.raises(ValueError, match="delta"):
        PolicyLossConfig(clip_eps_high=0.5, delta=1.5)


def test_gmpo_constraints():
    PolicyLossConfig(objective="gmpo", ratio_level="sequence",
                     rollout_correction="sequence_truncate")
    for bad in (dict(ratio_level="token"), dict(ratio_level="sequence_token"),
                dict(ratio_level="sequence", rollout_correction="token_mask"),
                dict(ratio_level="sequence", rollout_correction="token_truncate"),
                dict(ratio_level="sequence", top_entropy_quantile=0.5)):
        with pytest.raises(ValueError, match="gmpo"):
            PolicyLossConfig(objective="gmpo", **bad)


# The published hyper-parameters each preset stands for (config.py cites the sources).
PUBLISHED = {
    "ppo": dict(objective="ppo_clip", clip_eps_low=0.2, clip_eps_high=0.2,
                aggregation="token_mean", kl_coef=0.0),
    "ppo_penalty": dict(objective="pg", kl_reference="old", kl_estimator="k3", kl_coef=1.0),
    "grpo": dict(aggregation="seq_mean_token_mean", kl_coef=0.04, kl_estimator="k3",
                 kl_reference="ref", clip_eps_low=0.2, clip_eps_high=0.2),
    "bnpo": dict(aggregation="token_mean", kl_coef=0.0),
    "dr_grpo": dict(aggregation="seq_mean_token_sum_norm", kl_coef=0.0),
    "dapo": dict(clip_eps_low=0.2, clip_eps_high=0.28, aggregation="token_mean",
                 kl_coef=0.0),
    "gspo": dict(ratio_level="sequence", clip_eps_low=3e-4, clip_eps_high=4e-4,
                 aggregation="seq_mean_token_mean"),
    "gspo_token": dict(ratio_level="sequence_token", clip_eps_low=3e-4, clip_eps_high=4e-4,
                       aggregation="seq_mean_token_mean"),
    "cispo": dict(objective="cispo", clip_eps_low=None, clip_eps_high=0.28),
    "sapo": dict(objective="sapo", sapo_tau_pos=1.0, sapo_tau_neg=1.05,
                 aggregation="seq_mean_token_mean"),
    "gmpo": dict(objective="gmpo", ratio_level="sequence", gmpo_clip=0.4,
                 aggregation="seq_mean_token_mean"),
    "gppo": dict(clip_gradient="keep_both"),
    "aepo": dict(clip_gradient="keep_high", dual_clip_c=3.0, entropy_advantage_alpha=0.2,
                 clip_eps_low=0.2, clip_eps_high=0.2),
    "reinforce": dict(objective="pg", aggregation="token_mean"),
    "clip_cov": dict(objective="ppo_clip", cov_selection="clip_cov", cov_ratio=2e-4,
                     cov_lower=1.0, cov_upper=5.0, log_ratio_clamp=None),
    "kl_cov": dict(objective="pg", cov_selection="kl_cov", cov_ratio=2e-4, cov_kl_coef=0.1,
                   log_ratio_clamp=None),
    "dppo_tv": dict(objective="dppo_tv", clip_eps_low=0.2, clip_eps_high=0.2,
                    dppo_ratio_cap=3.0),
    "dppo_kl": dict(objective="dppo_kl", clip_eps_low=0.2, clip_eps_high=0.2,
                    dppo_ratio_cap=3.0),
    "vespo": dict(objective="vespo", vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0,
                  vespo_lambda_neg=2.0, aggregation="token_mean", log_ratio_clamp=20.0),
}

DEFAULTS = dict(objective="ppo_clip", ratio_level="token", clip_eps_low=0.2,
                clip_eps_high=0.2, dual_clip_c=None, delta=None, log_ratio_clamp=20.0,
                clip_gradient="zero", aggregation="token_mean", max_length=None,
                normalizer=None, kl_coef=0.0, kl_estimator="k3", kl_clamp=None,
                kl_reference="ref", entropy_coef=0.0, entropy_advantage_alpha=None,
                top_entropy_quantile=None, rollout_correction=None, rollout_cap=2.0,
                temperature=1.0, sapo_tau_pos=1.0, sapo_tau_neg=1.05, gmpo_clip=0.4,
                gmpo_clip_high=None, dppo_ratio_cap=3.0, vespo_k_pos=2.0,
                vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0,
                cov_selection=None, cov_ratio=2e-4, cov_lower=1.0, cov_upper=5.0,
                cov_kl_coef=0.1, count_empty_sequences=False, kl_gradient="estimator",
                kl_ratio_weighted=False, kl_aggregation=None, kl_normalizer=None,
                entropy_aggregation=None, entropy_normalizer=None, rollout_floor=None,
                rollout_normalize=False, off_policy_mask_threshold=None)


def test_defaults():
    config = PolicyLossConfig()
    assert {k: config.flat()[k] for k in DEFAULTS} == DEFAULTS


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_carry_the_published_values(name):
    assert set(PRESETS) == set(PUBLISHED)
    config = PolicyLossConfig.preset(name)
    expected = {**DEFAULTS, **PUBLISHED[name]}
    assert {k: config.flat()[k] for k in DEFAULTS} == expected


def test_preset_overrides_and_unknown_names():
    assert PolicyLossConfig.preset("dapo", clip_eps_high=0.3).clip.eps_high == 0.3
    assert PolicyLossConfig.preset("dapo").replace() == PRESETS["dapo"]
    with pytest.raises(ValueError, match="unknown preset 'x'"):
        PolicyLossConfig.preset("x")
    with pytest.raises(TypeError, match=r"unknown PolicyLossConfig field\(s\) \['eps'\]"):
        PRESETS["ppo"].replace(eps=0.1)


@pytest.mark.parametrize(("overrides", "expected"), [
    ({}, False), ({"ratio_level": "sequence"}, True), ({"ratio_level": "sequence_token"},
                                                        False),
    ({"objective": "gmpo", "ratio_level": "sequence"}, True),
    ({"entropy_advantage_alpha": 0.0}, True), ({"top_entropy_quantile": 0.5}, True),
    ({"rollout_correction": "sequence_truncate"}, True),
    ({"rollout_correction": "sequence_mask"}, True),
    ({"rollout_correction": "sequence_gate"}, True), ({"objective": "vespo"}, True),
    ({"off_policy_mask_threshold": 0.5}, True),
    ({"rollout_correction": "token_truncate", "rollout_normalize": True}, True),
    ({"objective": "pg", "cov_selection": "kl_cov"}, True),
    ({"rollout_correction": "token_truncate"}, False), ({"kl_coef": 0.5}, False),
])
def test_needs_batch_statistics(overrides, expected):
    assert PolicyLossConfig(**overrides).needs_batch_statistics is expected


@pytest.mark.parametrize(("overrides", "expected"), [
    ({}, False), ({"ratio_level": "sequence"}, False), ({"top_entropy_quantile": 0.5}, False),
    ({"rollout_correction": "sequence_mask"}, False), ({"kl_coef": 0.5}, False),
    ({"cov_selection": "clip_cov"}, True),
    ({"rollout_correction": "token_truncate", "rollout_normalize": True}, True),
    ({"kl_aggregation": "token_mean"}, True), ({"entropy_aggregation": "token_mean"}, True),
    ({"count_empty_sequences": True}, True),
])
def test_needs_whole_batch(overrides, expected):
    assert PolicyLossConfig(**overrides).needs_whole_batch is expected


def test_the_peers_published_constants():
    # OpenRLHF's KL_IS_WEIGHT_CLIP, TRL's VESPO clamps, verl's batch-normalisation floor.
    assert config_module.KL_WEIGHT_CAP == 10.0
    assert config_module.VESPO_LOG_W_BOUNDS == (math.log(1e-8), 20.0)
    assert config_module.VESPO_MIN_LAMBDA == 1e-4
    assert config_module.ROLLOUT_NORMALIZE_MIN == 1e-8
