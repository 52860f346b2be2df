"""The host-side coefficient step (``rlhf_fast.policy_coefficients``) against autograd of the
independent reference, on per-token values that float32 and float64 hold exactly (multiples
of 1/8): so a log-ratio can sit exactly on a clamp, a KL estimate exactly on its clamp, a
ratio exactly on a zero-width clip range, an entropy exactly on the top-entropy threshold,
and both sides see the same tie. Loss, dL/dlogp, dL/dH and the metrics are compared for
every objective, ratio level, clip mode, KL estimator and direction, aggregation and
batch statistic, with advantages of both signs and of zero, and an empty sequence."""

import pytest
import torch

from rlhf_fast import PolicyLossConfig
from rlhf_fast.policy_coefficients import policy_coefficients
from rlhf_fast.reference import policy_loss_from_logprobs

E = 1 / 8
LOGP = torch.tensor([[-1.0, -2.5, -0.5, -3.0, -1.25, -0.75],
                     [-2.0, -0.125, -1.5, -4.0, -0.25, -1.875],
                     [-1.0, -1.0, -1.0, -1.0, -1.0, -1.0],
                     [-0.5, -3.5, -2.25, -1.125, -0.375, -2.75]], dtype=torch.float64)
# logp - old: on the clamps (+-0.5, +-0.25), inside, far outside, and 0 (r = 1 exactly).
LOG_RATIO = torch.tensor([[0.5, -0.5, 0.0, 0.25, -0.25, 1.0],
                          [-1.5, 0.125, 0.0, 2.0, -0.375, 0.75],
                          [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                          [0.0, -0.25, 0.5, -2.5, 0.375, -0.625]], dtype=torch.float64)
# ref - logp: k1 = -(ref - logp) hits +-0.25 (a KL clamp of 0.25) and the log clamp 0.5.
REF_GAP = torch.tensor([[0.25, -0.25, 0.5, -0.5, 1.5, 0.0],
                        [-1.0, 0.125, 2.0, -0.75, 0.25, -2.0],
                        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                        [0.75, -0.125, -0.25, 1.0, -1.5, 0.375]], dtype=torch.float64)
# old - rollout: the rollout weight exp(.) below and above caps of 1.5 / 2.
ROLLOUT_GAP = torch.tensor([[0.25, -0.5, 1.0, 0.0, 0.125, -0.25],
                            [0.5, 0.75, -1.0, 0.25, 0.0, 0.375],
                            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                            [-0.125, 0.25, 0.5, 1.25, -0.75, 0.0]], dtype=torch.float64)
# Entropies with ties (1.5 three times) so a quantile threshold can fall on a tie.
ENTROPY = torch.tensor([[1.5, 0.25, 2.0, 1.5, 0.5, 3.0],
                        [0.75, 1.5, 0.125, 2.5, 1.0, 0.375],
                        [1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
                        [4.0, 0.625, 1.75, 0.875, 2.25, 0.5]], dtype=torch.float64)
VALID = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0],
                      [1, 1, 1, 0, 1, 1]], dtype=torch.bool)
ADV_TOKEN = torch.tensor([[1.5, -0.5, 2.0, -1.0, 0.0, 1.0], [-2.0, 0.5, 1.0, 0.0, -0.25, -1.5],
                          [1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
                          [-1.5, 2.5, -0.125, 1.0, 0.5, -0.75]], dtype=torch.float64)
ADV_SEQUENCE = torch.tensor([1.5, -0.75, 2.0, -1.25], dtype=torch.float64)


def compare(config, *, advantages=ADV_TOKEN, on_policy=False, valid=VALID, with_ref=True):
    old = None if on_policy else LOGP - LOG_RATIO
    ref, rollout = LOGP + REF_GAP, LOGP - LOG_RATIO - ROLLOUT_GAP
    ref = ref if with_ref else None
    coef = policy_coefficients(
        LOGP.float(), ENTROPY.float(), valid, advantages.float(),
        old.float() if old is not None else None, ref.float() if with_ref else None,
        rollout.float(), config)
    logp = LOGP.clone().requires_grad_()
    entropy = ENTROPY.clone().requires_grad_()
    loss, metrics = policy_loss_from_logprobs(
        logp, entropy, valid, advantages, old_logprobs=old, ref_logprobs=ref,
        rollout_logprobs=rollout if config.rollout.mode else None, config=config)
    g_logp, g_entropy = torch.autograd.grad(loss, (logp, entropy), allow_unused=True)
    g_logp = g_logp if g_logp is not None else torch.zeros_like(LOGP)
    g_entropy = g_entropy if g_entropy is not None else torch.zeros_like(ENTROPY)
    assert coef.loss.item() == pytest.approx(loss.item(), rel=1e-6, abs=1e-7)
    assert torch.allclose(coef.c_logp.double(), g_logp, rtol=1e-5, atol=1e-7), \
        (coef.c_logp, g_logp)
    c_entropy = coef.c_entropy if coef.c_entropy is not None else torch.zeros_like(ENTROPY)
    assert torch.allclose(c_entropy.double(), g_entropy, rtol=1e-5, atol=1e-7)
    for key, value in metrics.items():
        assert coef.metrics[key].item() == pytest.approx(value.item(), rel=1e-5, abs=1e-6), key
    return coef


CONFIGS = {
    "ppo": {},
    "ppo_clamp_on_bound": dict(log_ratio_clamp=0.5),
    "ppo_zero_width": dict(clip_eps_low=0.0, clip_eps_high=0.0),
    "ppo_no_low": dict(clip_eps_low=None),
    "ppo_no_clamp": dict(log_ratio_clamp=None, clip_eps_low=0.1, clip_eps_high=0.3),
    "dual": dict(dual_clip_c=1.5),
    "dual_zero_width": dict(dual_clip_c=2.0, clip_eps_low=0.0, clip_eps_high=0.0),
    "delta": dict(delta=1.75, clip_eps_high=0.5),
    "keep_high": dict(clip_gradient="keep_high", dual_clip_c=3.0),
    "keep_high_zero_width": dict(clip_gradient="keep_high", clip_eps_low=0.0,
                                 clip_eps_high=0.0),
    "keep_both": dict(clip_gradient="keep_both", log_ratio_clamp=0.5),
    "keep_both_zero_width": dict(clip_gradient="keep_both", clip_eps_low=0.0,
                                 clip_eps_high=0.0),
    "pg": dict(objective="pg"),
    "pg_clamped": dict(objective="pg", log_ratio_clamp=0.25),
    "sapo": dict(objective="sapo", sapo_tau_pos=2.0, sapo_tau_neg=0.5),
    "cispo": dict(objective="cispo", clip_eps_low=None, clip_eps_high=0.28),
    "cispo_low": dict(objective="cispo", clip_eps_low=0.25, clip_eps_high=0.5),
    "cispo_zero_width": dict(objective="cispo", clip_eps_low=0.0, clip_eps_high=0.0),
    "gspo": dict(ratio_level="sequence", clip_eps_low=0.3, clip_eps_high=0.2,
                 log_ratio_clamp=0.5),
    "gspo_wide": dict(ratio_level="sequence", clip_eps_low=0.9, clip_eps_high=5.0,
                      log_ratio_clamp=0.25),
    "gspo_token": dict(ratio_level="sequence_token", clip_eps_low=0.3, clip_eps_high=0.2,
                       log_ratio_clamp=0.5),
    "gspo_sapo": dict(ratio_level="sequence", objective="sapo"),
    "gmpo": dict(objective="gmpo", ratio_level="sequence", gmpo_clip=0.25,
                 log_ratio_clamp=2.0),
    "gmpo_normalizer": dict(objective="gmpo", ratio_level="sequence", gmpo_clip=0.5,
                            normalizer=5.0),
    "gmpo_rollout": dict(objective="gmpo", ratio_level="sequence",
                         rollout_correction="sequence_truncate", rollout_cap=1.5),
    "k1_ref": dict(objective="pg", kl_coef=0.5, kl_estimator="k1"),
    "k2_ref": dict(objective="pg", kl_coef=0.5, kl_estimator="k2"),
    "k3_ref": dict(objective="pg", kl_coef=0.5, kl_estimator="k3"),
    "k1_old": dict(objective="pg", kl_coef=0.5, kl_estimator="k1", kl_reference="old"),
    "k2_old": dict(objective="pg", kl_coef=0.5, kl_estimator="k2", kl_reference="old"),
    "k3_old": dict(objective="pg", kl_coef=0.5, kl_estimator="k3", kl_reference="old"),
    "k1_clamped": dict(kl_coef=0.5, kl_estimator="k1", kl_clamp=0.25, log_ratio_clamp=0.5),
    "k2_clamped": dict(kl_coef=0.5, kl_estimator="k2", kl_clamp=0.125, log_ratio_clamp=0.5),
    "k3_clamped": dict(kl_coef=0.5, kl_estimator="k3", kl_clamp=0.25, log_ratio_clamp=0.5),
    "k3_old_clamped": dict(kl_coef=0.5, kl_reference="old", kl_clamp=0.25,
                           log_ratio_clamp=0.25),
    "k1_value_clamp_only": dict(kl_coef=0.5, kl_estimator="k1", kl_clamp=0.5,
                                log_ratio_clamp=None),
    "entropy_bonus": dict(entropy_coef=0.25),
    "coefficients_of_one": dict(entropy_coef=1.0, kl_coef=1.0, kl_estimator="k2"),
    "top_entropy": dict(top_entropy_quantile=0.5, entropy_coef=0.25),
    "top_entropy_tie": dict(top_entropy_quantile=0.75, entropy_coef=0.5, objective="pg"),
    "top_entropy_narrow": dict(top_entropy_quantile=0.125),
    "aepo": dict(clip_gradient="keep_high", dual_clip_c=3.0, entropy_advantage_alpha=0.5),
    "aepo_alpha_large": dict(entropy_advantage_alpha=2.0, objective="pg"),
    "rollout_token_truncate": dict(rollout_correction="token_truncate", rollout_cap=1.5),
    "rollout_token_mask": dict(rollout_correction="token_mask", rollout_cap=1.5),
    "rollout_sequence_truncate": dict(rollout_correction="sequence_truncate",
                                      rollout_cap=2.0),
    "rollout_sequence_mask": dict(rollout_correction="sequence_mask", rollout_cap=3.0),
    "rollout_clamped": dict(rollout_correction="token_truncate", rollout_cap=5.0,
                            log_ratio_clamp=0.25),
    "seq_mean_token_mean": dict(aggregation="seq_mean_token_mean", kl_coef=0.25,
                                entropy_coef=0.125),
    "seq_mean_token_sum": dict(aggregation="seq_mean_token_sum", kl_coef=0.25),
    "token_sum_norm": dict(aggregation="seq_mean_token_sum_norm", entropy_coef=0.125),
    "token_sum_norm_max_length": dict(aggregation="seq_mean_token_sum_norm", max_length=9),
    "normalizer": dict(aggregation="seq_mean_token_mean", normalizer=2.5, kl_coef=0.25),
    # TRL's bias-corrected KL (the estimate times the ratio) at each ratio level, the log
    # clamp binding on some tokens (their ratio derivative is 0).
    "kl_ratio_weighted": dict(kl_coef=0.5, kl_ratio_weighted=True, log_ratio_clamp=0.5),
    "kl_ratio_weighted_sequence": dict(ratio_level="sequence", kl_coef=0.5,
                                       kl_ratio_weighted=True, log_ratio_clamp=0.5),
    "kl_ratio_weighted_sequence_token": dict(ratio_level="sequence_token", kl_coef=0.5,
                                             kl_estimator="k2", kl_ratio_weighted=True,
                                             log_ratio_clamp=0.5),
    # Clip-Cov taking every eligible token (cov_ratio 1, a band wider than any covariance):
    # the selection is then the tokens PPO does not clip, whatever the random priorities.
    "clip_cov_all_eligible": dict(cov_selection="clip_cov", cov_ratio=1.0, cov_lower=-1e3,
                                  cov_upper=1e3),
    "clip_cov_no_low": dict(cov_selection="clip_cov", cov_ratio=1.0, cov_lower=-1e3,
                            cov_upper=1e3, clip_eps_low=None, clip_eps_high=0.5),
    # VESPO's gamma weight, alone and with the rollout correction's log rho summed over the
    # valid tokens or taken once per sequence; DPPO's total-variation trust region
    # (the binary KL one needs old log-probs <= 0: tests/test_oracle_policy.py).
    "vespo": dict(objective="vespo"),
    "vespo_token_rollout": dict(objective="vespo", rollout_correction="token_truncate",
                                rollout_cap=1.5),
    "vespo_sequence_rollout": dict(objective="vespo", rollout_correction="sequence_mask",
                                   rollout_cap=3.0),
    "dppo_tv": dict(objective="dppo_tv", clip_eps_low=0.25, clip_eps_high=0.125),
    "everything": dict(dual_clip_c=2.0, delta=3.0, kl_coef=0.25, kl_clamp=1.0,
                       entropy_coef=0.125, top_entropy_quantile=0.75,
                       entropy_advantage_alpha=0.25, rollout_correction="token_mask",
                       rollout_cap=2.0, aggregation="seq_mean_token_mean"),
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("advantages", ["token", "sequence"])
def test_coefficients_against_autograd(name, advantages):
    config = PolicyLossConfig(**CONFIGS[name])
    compare(config, advantages=ADV_TOKEN if advantages == "token" else ADV_SEQUENCE)


@pytest.mark.parametrize("name", ["ppo", "gspo", "gmpo", "sapo", "cispo", "k3_old",
                                  "rollout_token_mask", "aepo"])
def test_on_policy(name):
    compare(PolicyLossConfig(**CONFIGS[name]), on_policy=True)


@pytest.mark.parametrize("name", ["k1_ref", "k3_clamped", "k2_old"])
def test_kl_without_reference_log_probs(name):
    # kl_reference="ref" and no ref log-probs: no KL term; kl_reference="old" needs none.
    compare(PolicyLossConfig(**CONFIGS[name]), with_ref=False)


def test_all_masked_and_single_token():
    for valid in (torch.zeros_like(VALID), VALID & (torch.arange(6) == 1) & (torch.arange(
            4)[:, None] == 0)):
        for name in ("ppo", "gmpo", "aepo", "top_entropy", "normalizer", "token_sum_norm"):
            coef = compare(PolicyLossConfig(**CONFIGS[name]), valid=valid)
            assert torch.isfinite(coef.c_logp).all()


def test_ratio_exactly_at_the_dual_cap_and_delta():
    # Token [1, 5]: log-ratio 0.75, A < 0. With c and delta equal to its float32 ratio, the
    # cap and the delta clamp touch without binding (strict inequalities, torch's clamp).
    tied = float(torch.exp(torch.tensor(0.75)).item())
    compare(PolicyLossConfig(delta=tied, clip_eps_high=0.5))
    # At the cap the loss equals -c A: a tie of the min (half the gradient, torch's rule),
    # which the float64 reference does not see; the clip fraction counts only r > c.
    coef = policy_coefficients(LOGP.float(), ENTROPY.float(), VALID, ADV_TOKEN.float(),
                               (LOGP - LOG_RATIO).float(), None, None,
                               PolicyLossConfig(dual_clip_c=tied))
    ratio = torch.exp(LOG_RATIO.float())
    strict = VALID & (ADV_TOKEN < 0) & (ratio > tied)
    assert VALID[1, 5] and ratio[1, 5] == tied and not strict[1, 5]
    assert coef.metrics["clip_frac_dual"].item() == pytest.approx(strict.sum() / VALID.sum())


def test_zero_width_clip_at_ratio_one():
    # r = 1 exactly with both bounds at 1: a tie with each bound, no clipping, gradient kept.
    coef = compare(PolicyLossConfig(clip_eps_low=0.0, clip_eps_high=0.0))
    at_one = VALID & (LOG_RATIO == 0)
    assert (coef.c_logp[at_one] != 0).all() or (ADV_TOKEN[at_one] == 0).any()
    assert coef.metrics["clip_frac_high"].item() > 0 and coef.metrics["clip_frac_low"] > 0


@pytest.mark.parametrize("name", ["aepo", "aepo_alpha_large", "top_entropy"])
def test_rows_with_the_batch_entropy_statistics_equal_the_whole_batch(name):
    # A chunk of rows given the whole batch's entropy statistics (as the fused-linear op
    # does) gets the whole batch's coefficients for those rows.
    from rlhf_fast.loss_weights import entropy_statistics

    config = PolicyLossConfig(**CONFIGS[name]).replace(aggregation="token_mean",
                                                       normalizer=float(VALID.sum()))
    old, ref, rollout = LOGP - LOG_RATIO, LOGP + REF_GAP, LOGP - LOG_RATIO - ROLLOUT_GAP
    args = [t.float() for t in (LOGP, ENTROPY)]
    whole = policy_coefficients(*args, VALID, ADV_TOKEN.float(), old.float(), ref.float(),
                                rollout.float(), config)
    stats = entropy_statistics(ENTROPY.float(), VALID.float(), config.entropy.top_quantile)
    rows = slice(1, 2)
    part = policy_coefficients(args[0][rows], args[1][rows], VALID[rows],
                               ADV_TOKEN.float()[rows], old.float()[rows], ref.float()[rows],
                               rollout.float()[rows], config, entropy_stats=stats)
    def both(coef, select=slice(None)):
        c_entropy = coef.c_entropy if coef.c_entropy is not None else coef.c_logp * 0
        return torch.cat([coef.c_logp[select], c_entropy[select]])

    assert torch.allclose(both(part), both(whole, rows), rtol=1e-6, atol=1e-8)
    alone = policy_coefficients(args[0][rows], args[1][rows], VALID[rows],
                                ADV_TOKEN.float()[rows], old.float()[rows], ref.float()[rows],
                                rollout.float()[rows], config)
    assert not torch.allclose(both(alone), both(whole, rows), rtol=1e-6, atol=1e-8), \
        "the rows alone must have other statistics, or the test shows nothing"


def test_dual_cap_tie_splits_the_gradient_like_torch_minimum():
    # Token [1, 5] (A = -1.5 < 0, r = exp(0.75)) with the dual cap c equal to its float32
    # ratio: the capped loss -r A ties the cap -c A exactly. The float32 reference sees the
    # tie too, and torch.minimum gives half of the derivative to each side (the cap's is 0).
    tied = float(torch.exp(torch.tensor(0.75)).item())
    config = PolicyLossConfig(dual_clip_c=tied)
    old = (LOGP - LOG_RATIO).float()
    coef = policy_coefficients(LOGP.float(), ENTROPY.float(), VALID, ADV_TOKEN.float(), old,
                               None, None, config)
    logp = LOGP.float().requires_grad_()
    loss, _ = policy_loss_from_logprobs(logp, ENTROPY.float(), VALID, ADV_TOKEN.float(),
                                        old_logprobs=old, config=config)
    (g_logp,) = torch.autograd.grad(loss, logp)
    assert torch.allclose(coef.c_logp, g_logp, rtol=1e-5, atol=1e-7), (coef.c_logp, g_logp)
    uncapped = policy_coefficients(LOGP.float(), ENTROPY.float(), VALID, ADV_TOKEN.float(),
                                   old, None, None, PolicyLossConfig())
    assert coef.c_logp[1, 5] != 0
    assert coef.c_logp[1, 5] == pytest.approx(0.5 * uncapped.c_logp[1, 5].item(), rel=1e-6)
