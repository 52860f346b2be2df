"""``PolicyLossConfig``'s parts: every flat keyword lands in its part, parts and flat keywords
spell the same configs, and the custom ops' string form and the repr round-trip."""

import dataclasses
import pickle

import pytest

import rlhf_fast
from rlhf_fast.config import PARTS, PRESETS, PolicyLossConfig
from rlhf_fast.ops.custom_op_args import decode_config, encode_config
from rlhf_fast.policy_config_parts import FLAT_NAMES

# A valid non-default value for every flat keyword, with the settings it needs beside it.
SAMPLES: dict[str, tuple[object, dict]] = {
    "ratio_level": ("sequence", {}),
    "log_ratio_clamp": (None, {}),
    "clip_eps_low": (0.1, {}),
    "clip_eps_high": (0.3, {}),
    "dual_clip_c": (3.0, {}),
    "delta": (2.0, {}),
    "clip_gradient": ("keep_both", {}),
    "gmpo_clip": (0.3, {}),
    "gmpo_clip_high": (0.5, {"objective": "gmpo", "ratio_level": "sequence"}),
    "dppo_ratio_cap": (2.5, {}),
    "sapo_tau_pos": (0.9, {}),
    "sapo_tau_neg": (1.1, {}),
    "vespo_k_pos": (1.5, {}),
    "vespo_lambda_pos": (2.5, {}),
    "vespo_k_neg": (2.5, {}),
    "vespo_lambda_neg": (1.5, {}),
    "aggregation": ("seq_mean_token_sum", {}),
    "max_length": (64, {}),
    "normalizer": (12.0, {}),
    "count_empty_sequences": (True, {}),
    "kl_coef": (0.05, {}),
    "kl_estimator": ("k1", {}),
    "kl_gradient": ("k2", {}),
    "kl_ratio_weighted": (True, {}),
    "kl_clamp": (10.0, {}),
    "kl_reference": ("old", {}),
    "kl_aggregation": ("token_mean", {}),
    "kl_normalizer": (7.0, {"kl_aggregation": "token_mean"}),
    "entropy_coef": (0.01, {}),
    "entropy_aggregation": ("token_mean", {}),
    "entropy_normalizer": (5.0, {"entropy_aggregation": "token_mean"}),
    "entropy_advantage_alpha": (0.2, {}),
    "top_entropy_quantile": (0.2, {}),
    "cov_selection": ("clip_cov", {}),
    "cov_ratio": (1e-3, {}),
    "cov_lower": (0.5, {}),
    "cov_upper": (4.0, {}),
    "cov_kl_coef": (0.2, {}),
    "rollout_correction": ("token_mask", {}),
    "rollout_cap": (3.0, {}),
    "rollout_floor": (0.5, {"rollout_correction": "token_mask"}),
    "rollout_normalize": (True, {"rollout_correction": "token_truncate"}),
    "off_policy_mask_threshold": (0.5, {}),
}

NAMESPACE = {name: getattr(rlhf_fast, name) for name in rlhf_fast.__all__}


def test_flat_names_cover_every_part_field_once():
    fields = {(part, f.name) for part, cls in PARTS.items() for f in dataclasses.fields(cls)}
    assert sorted(FLAT_NAMES.values()) == sorted(fields)
    assert set(SAMPLES) == set(FLAT_NAMES)


@pytest.mark.parametrize("flat_name", sorted(FLAT_NAMES))
def test_flat_keyword_part_and_mapping_spell_the_same_config(flat_name):
    value, companions = SAMPLES[flat_name]
    part, name = FLAT_NAMES[flat_name]
    config = PolicyLossConfig(**companions, **{flat_name: value})
    assert getattr(getattr(config, part), name) == value
    assert getattr(getattr(config, part), name) != getattr(PARTS[part](), name)
    assert config.flat()[flat_name] == value
    assert PolicyLossConfig(**config.flat()) == config
    whole = config.replace(**{part: getattr(config, part)})
    assert whole == config
    # The mapping form updates the part (here a default one) with the same value.
    others = {k: v for k, v in companions.items() if FLAT_NAMES.get(k, ("",))[0] != part}
    same_part = {FLAT_NAMES[k][1]: v for k, v in companions.items()
                 if FLAT_NAMES.get(k, ("",))[0] == part}
    mapped = PolicyLossConfig(**others, **{part: {**same_part, name: value}})
    assert mapped == config


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_the_op_string_the_repr_and_pickle(name):
    config = PRESETS[name]
    assert decode_config(PolicyLossConfig, encode_config(config)) == config
    assert eval(repr(config), NAMESPACE) == config  # our own repr, evaluated with the public names
    assert pickle.loads(pickle.dumps(config)) == config
    assert PolicyLossConfig(**config.flat()) == config
    assert {config: 1}[dataclasses.replace(config)] == 1


def test_a_mapping_updates_the_preset_part_and_a_whole_part_replaces_it():
    grpo = PRESETS["grpo"]
    assert grpo.replace(kl={"estimator": "k1"}).kl == dataclasses.replace(grpo.kl,
                                                                           estimator="k1")
    assert grpo.replace(kl=rlhf_fast.KLConfig(estimator="k1")).kl.coef == 0.0
    assert PolicyLossConfig.preset("grpo", kl_coef=0.0).kl.coef == 0.0
    assert PolicyLossConfig.preset("grpo", aggregation="token_mean", max_length=9).aggregation \
        == rlhf_fast.AggregationConfig(mode="token_mean", max_length=9)
    # Flat keywords of one part on top of a mapping of the same part.
    mixed = PolicyLossConfig(clip={"eps_high": 0.3}, dual_clip_c=2.0)
    assert mixed.clip == rlhf_fast.ClipConfig(eps_high=0.3, dual_c=2.0)


def test_ambiguous_or_mistyped_parts_are_refused():
    with pytest.raises(TypeError, match=r"kl is given whole and by the flat keyword\(s\) "
                                        r"\['kl_coef'\]"):
        PolicyLossConfig(kl=rlhf_fast.KLConfig(coef=0.1), kl_coef=0.2)
    with pytest.raises(TypeError, match="clip must be a ClipConfig or a mapping of its fields, "
                                        "got float"):
        PolicyLossConfig(clip=0.2)
    with pytest.raises(TypeError, match="unexpected keyword argument 'eps'"):
        PolicyLossConfig(clip={"eps": 0.2})
    with pytest.raises(TypeError, match=r"unknown PolicyLossConfig field\(s\) \['kl_cof'\]"):
        PRESETS["grpo"].replace(kl_cof=0.1)


def test_each_part_checks_its_fields_under_their_flat_names():
    with pytest.raises(ValueError, match="clip_eps_high must lie in"):
        rlhf_fast.ClipConfig(eps_high=-0.1)
    with pytest.raises(ValueError, match="kl_estimator must be one of"):
        PolicyLossConfig(kl={"estimator": "k4"})
    with pytest.raises(ValueError, match="rollout_floor bounds the rollout correction"):
        rlhf_fast.RolloutCorrectionConfig(floor=0.5)
    with pytest.raises(ValueError, match="objective='gmpo' is sequence-level"):
        PolicyLossConfig("gmpo")


def test_repr_lists_only_what_differs_from_the_defaults():
    assert repr(PolicyLossConfig()) == "PolicyLossConfig()"
    assert repr(PRESETS["dapo"]) == "PolicyLossConfig(clip=ClipConfig(eps_high=0.28))"
