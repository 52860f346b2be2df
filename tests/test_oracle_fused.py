"""The one-kernel token-level path (Triton; the interpreter on the CPU) against the float64
reference, for the switches of its coefficient helper: zero bounds are bounds (0.0 is not
"no bound"), dual clip, delta, the stop-gradient clips, SAPO, CISPO, pg, every KL estimator
and direction with and without clamps, token-level rollout correction, the entropy bonus."""

import pytest
from oracle_helpers import assert_all_quadrants
from policy_problems import check_policy, make_problem

from rlhf_fast import PolicyLossConfig
from rlhf_fast.ops import policy_loss as policy_op

CASES = {
    "zero_low_bound": dict(clip_eps_low=0.0),
    "zero_both_bounds": dict(clip_eps_low=0.0, clip_eps_high=0.0),
    "no_low_bound": dict(clip_eps_low=None, dual_clip_c=2.0),
    "dual_delta": dict(dual_clip_c=1.5, delta=1.6, clip_eps_high=0.1),
    "keep_high": dict(clip_gradient="keep_high", dual_clip_c=3.0),
    "keep_both": dict(clip_gradient="keep_both"),
    "sapo": dict(objective="sapo", sapo_tau_pos=2.0, sapo_tau_neg=0.5),
    "cispo": dict(objective="cispo", clip_eps_low=0.1, clip_eps_high=0.1),
    "cispo_no_low": dict(objective="cispo", clip_eps_low=None, clip_eps_high=0.1),
    "pg_clamp_binds": dict(objective="pg", log_ratio_clamp=0.3),
    "ppo_no_clamp": dict(log_ratio_clamp=None, entropy_coef=0.1, temperature=0.7),
    "k1_ref": dict(kl_coef=0.5, kl_estimator="k1"),
    "k2_ref_clamped": dict(kl_coef=0.5, kl_estimator="k2", kl_clamp=0.05,
                           log_ratio_clamp=0.4),
    "k3_old_clamped": dict(kl_coef=0.5, kl_estimator="k3", kl_reference="old",
                           kl_clamp=0.03, log_ratio_clamp=0.3),
    "k2_old": dict(objective="pg", kl_coef=0.5, kl_estimator="k2", kl_reference="old"),
    "k3_ref_no_log_clamp": dict(kl_coef=0.5, kl_clamp=0.05, log_ratio_clamp=None),
    "rollout_mask": dict(rollout_correction="token_mask", rollout_cap=1.3),
    "rollout_truncate_sum": dict(rollout_correction="token_truncate", rollout_cap=1.2,
                                 aggregation="seq_mean_token_sum", normalizer=2.0),
}


@pytest.mark.parametrize("name", list(CASES))
def test_fused_token_level_against_reference(name, device):
    config = PolicyLossConfig(**CASES[name])
    assert policy_op.fused_token_level(config, old=make_problem()["old_logprobs"])
    p = make_problem(batch=3, seq_len=8, n_cols=24, seed=22, spread=0.8, per_token_adv=True,
                     device=device)
    assert_all_quadrants(p)
    check_policy(p, config, "triton")

