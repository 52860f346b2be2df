"""policy_loss (torch backend: the host-side coefficient step) against the independent
float64 reference, on inputs chosen so that a wrong formula gives a different answer:
advantages of both signs, clamps that bind and that do not, an empty sequence in the middle
of the batch, few valid tokens (where n and n - 1 differ), caps that bind, zero bounds."""

import math

import pytest
import torch
from oracle_helpers import assert_all_quadrants
from policy_problems import check_policy, make_problem

import rlhf_fast
from rlhf_fast import PolicyLossConfig
from rlhf_fast.reference import aggregation


def problem(batch=4, seq_len=8, spread=0.6, seed=0, empty_row=1, **kwargs):
    """make_problem with per-token advantages of both signs and sequence ``empty_row``
    fully masked (the last one is masked too)."""
    p = make_problem(batch=batch, seq_len=seq_len, n_cols=24, seed=seed, spread=spread,
                     per_token_adv=True, **kwargs)
    if empty_row is not None:
        p["mask"][empty_row] = False
    p["mask"][0, :2] = True
    return p


CASES = {
    # GSPO: sequence ratio, bounds wide enough that some sequences stay unclipped, and a
    # log-ratio clamp that binds on some tokens (their gradient through the mean is 0).
    "gspo_clamp_binds": dict(preset="gspo", clip_eps_low=0.3, clip_eps_high=0.3,
                             log_ratio_clamp=0.25),
    "gspo_token_clamp_binds": dict(preset="gspo_token", clip_eps_low=0.3, clip_eps_high=0.3,
                                   log_ratio_clamp=0.25),
    "gspo_tight": dict(preset="gspo", clip_eps_low=0.02, clip_eps_high=0.05),
    "gmpo_clamp_binds": dict(preset="gmpo", log_ratio_clamp=0.3, gmpo_clip=0.2),
    "gmpo_normalizer": dict(preset="gmpo", normalizer=5.0),
    "gmpo_rollout": dict(preset="gmpo", rollout_correction="sequence_mask", rollout_cap=1.5),
    "aepo_alpha_large": dict(preset="aepo", entropy_advantage_alpha=1.0),
    "aepo_keep_high": dict(preset="aepo", entropy_advantage_alpha=None),
    "gppo_keep_both": dict(preset="gppo", dual_clip_c=2.0),
    "top_entropy_bonus": dict(preset="dapo", top_entropy_quantile=0.3, entropy_coef=0.2),
    "top_entropy_pg": dict(preset="reinforce", top_entropy_quantile=0.6, entropy_coef=0.1),
    "rollout_token_truncate": dict(preset="dapo", rollout_correction="token_truncate",
                                   rollout_cap=1.3),
    "rollout_token_mask": dict(preset="dapo", rollout_correction="token_mask",
                               rollout_cap=1.3),
    "rollout_sequence_truncate": dict(preset="grpo", rollout_correction="sequence_truncate",
                                      rollout_cap=1.5, kl_coef=0.0),
    "rollout_sequence_mask": dict(preset="grpo", rollout_correction="sequence_mask",
                                  rollout_cap=2.5, kl_coef=0.0),
    "rollout_clamped": dict(preset="ppo", rollout_correction="token_truncate",
                            rollout_cap=1.2, log_ratio_clamp=0.3),
    "zero_low_bound": dict(preset="ppo", clip_eps_low=0.0),
    "no_low_bound": dict(preset="ppo", clip_eps_low=None),
    "zero_high_bound": dict(preset="ppo", clip_eps_high=0.0, clip_eps_low=0.0),
    "dual_and_delta": dict(preset="ppo", dual_clip_c=1.5, delta=1.6, clip_eps_high=0.1),
    "sapo_both_signs": dict(preset="sapo", sapo_tau_pos=2.0, sapo_tau_neg=0.5),
    "cispo_low_bound": dict(preset="cispo", clip_eps_low=0.1),
    "pg_off_policy": dict(preset="reinforce", log_ratio_clamp=0.4),
    "token_clamp_binds": dict(preset="ppo", log_ratio_clamp=0.2, clip_eps_low=0.5,
                              clip_eps_high=0.5),
    "temperature": dict(preset="dapo", temperature=0.6, entropy_coef=0.05),
    # DPPO's binary-KL trust region, bounds tight enough that both sides drop some tokens.
    "dppo_kl_tight": dict(preset="ppo", objective="dppo_kl", clip_eps_low=5e-4,
                          clip_eps_high=5e-4),
}


@pytest.mark.parametrize("name", list(CASES))
def test_against_reference(name):
    overrides = dict(CASES[name])
    config = PolicyLossConfig.preset(overrides.pop("preset"), **overrides)
    p = problem(spread=1.0 if "clamp" in name else 0.6)
    assert_all_quadrants(p)
    check_policy(p, config, "torch")


@pytest.mark.parametrize("aggregation_name", ["token_mean", "seq_mean_token_mean",
                                              "seq_mean_token_sum", "seq_mean_token_sum_norm"])
@pytest.mark.parametrize(("normalizer", "max_length"), [(None, None), (3.0, None),
                                                        (None, 9)])
@pytest.mark.parametrize("extra", [{}, {"kl_coef": 0.3, "entropy_coef": 0.1}])
def test_aggregations(aggregation_name, normalizer, max_length, extra):
    config = PolicyLossConfig(aggregation=aggregation_name, normalizer=normalizer,
                              max_length=max_length, **extra)
    check_policy(problem(), config, "torch")


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("kl_reference", ["ref", "old"])
@pytest.mark.parametrize("clamps", [(None, 20.0), (0.08, 0.3), (0.08, None)])
def test_kl_terms(estimator, kl_reference, clamps):
    kl_clamp, log_ratio_clamp = clamps
    config = PolicyLossConfig(objective="pg", kl_coef=0.7, kl_estimator=estimator,
                              kl_reference=kl_reference, kl_clamp=kl_clamp,
                              log_ratio_clamp=log_ratio_clamp)
    check_policy(problem(spread=0.8), config, "torch")


def test_on_policy_with_rollout_correction():
    config = PolicyLossConfig.preset("dapo", rollout_correction="token_mask", rollout_cap=1.2)
    check_policy(problem(), config, "torch", use_old=False)


def test_few_valid_tokens_separate_bessel_from_population_std():
    # Three valid tokens: unbiased and population std differ by sqrt(3/2).
    p = problem(batch=2, seq_len=3, empty_row=None)
    p["mask"][:] = False
    p["mask"][0, :2] = True
    p["mask"][1, 1] = True
    check_policy(p, PolicyLossConfig.preset("aepo", entropy_advantage_alpha=2.0), "torch")


def test_reinforce_loss_is_the_aggregated_negative_advantage():
    # On-policy pg: the loss is agg(-A), computed by hand for each aggregation.
    p = problem()
    m = p["mask"].double()
    for name in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum",
                 "seq_mean_token_sum_norm"):
        out = rlhf_fast.policy_loss(p["logits"], p["targets"], p["advantages"], p["mask"],
                                    config="reinforce", aggregation=name, backend="torch")
        expected = aggregation.aggregate(-p["advantages"].double(), m, name)
        assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_gmpo_empty_sequence_leaves_the_mean():
    # Two sequences, the second empty: the loss is the first sequence's alone (not half).
    p = problem(batch=2, seq_len=4, empty_row=1)
    p["advantages"] = torch.tensor([0.8, -5.0])
    config = PolicyLossConfig.preset("gmpo")
    out = rlhf_fast.policy_loss(p["logits"], p["targets"], p["advantages"], p["mask"],
                                old_logprobs=p["old_logprobs"], config=config, backend="torch")
    single = {k: v[:1] for k, v in p.items()}
    alone = rlhf_fast.policy_loss(single["logits"], single["targets"], single["advantages"],
                                  single["mask"], old_logprobs=single["old_logprobs"],
                                  config=config, backend="torch")
    assert out.loss.item() == pytest.approx(alone.loss.item(), rel=1e-6)
    assert alone.loss.item() != 0


def test_aepo_clipped_positive_token_keeps_boundary_weight_not_ratio():
    # One token with r = 1.5 > 1 + eps, A > 0: dL/dlogp = -(1 + eps) * A (AEPO), not -r * A.
    logits = torch.randn(1, 2, 8, generator=torch.Generator().manual_seed(3))
    targets = torch.tensor([[1, 2]])
    logp = rlhf_fast.token_logprobs(logits, targets)
    old = logp - torch.tensor([[math.log(1.5), 0.0]])
    x = logits.clone().requires_grad_()
    config = PolicyLossConfig.preset("aepo", entropy_advantage_alpha=None)
    rlhf_fast.policy_loss(x, targets, torch.tensor([2.0]), torch.ones(1, 2, dtype=torch.bool),
                          old_logprobs=old, config=config, backend="torch").loss.backward()
    xl = logits.clone().requires_grad_()
    lp = rlhf_fast.token_logprobs(xl, targets, backend="torch")
    (lp * torch.tensor([[-1.2 * 2.0 / 2, -1.0 * 2.0 / 2]])).sum().backward()
    assert torch.allclose(x.grad, xl.grad, rtol=1e-5, atol=1e-7)
