"""The peers' per-term aggregation, KL estimators and rollout corrections in ``policy_loss``:
loss and gradient against the independent float64 reference on both backends, and against
the peers' own functions where they are importable (verl 0.9.1's ``core_algos`` and rollout
correction, TRL 1.16's GRPO static helpers). OpenRLHF is not imported (its package pulls
DeepSpeed); its conventions are stated in the reference and checked there.

Each problem has advantages of both signs per token, an empty sequence in the middle of the
batch, and log-probs within a few tenths of the old / reference / rollout ones, so clips,
bands and masks bind somewhere."""

from __future__ import annotations

import math

import pytest
import torch
from policy_problems import check_policy, make_problem

import rlhf_fast
from rlhf_fast import PolicyLossConfig, reference


def problem(seed=0, spread=0.6, batch=4, seq_len=8):
    p = make_problem(batch=batch, seq_len=seq_len, n_cols=24, seed=seed, spread=spread,
                     per_token_adv=True)
    p["mask"][1] = False          # an empty sequence between others
    p["mask"][0, :2] = True
    return p


def policy(p, config, backend="torch", x=None, **inputs):
    x = p["logits"].clone().requires_grad_() if x is None else x
    out = rlhf_fast.policy_loss(x, p["targets"], p["advantages"], p["mask"],
                                old_logprobs=p["old_logprobs"], config=config,
                                backend=backend, **inputs)
    out.loss.backward()
    return out, x.grad


def peer_on_logits(p, loss_of_logp):
    """(loss, dL/dlogits) of a peer's loss written on per-token log-probs, through the
    float64 reference log-softmax."""
    x = p["logits"].double().requires_grad_()
    logp = reference.token_logprobs(x, p["targets"])
    loss = loss_of_logp(logp)
    loss.backward()
    return loss.detach(), x.grad


def assert_same(out, grad, peer_loss, peer_grad, rel=1e-5):
    assert out.loss.item() == pytest.approx(peer_loss.item(), rel=rel, abs=1e-7)
    err = (grad.double() - peer_grad).norm() / peer_grad.norm().clamp(min=1e-30)
    assert err <= rel, f"gradient rel err {err:.2e}"


# --- against the reference, both backends -------------------------------------------------

CASES = {
    # OpenRLHF: a per-sample policy loss with the KL and the entropy bonus as token means,
    # each with its own global denominator.
    "kl_token_mean_under_seq_mean": dict(aggregation="seq_mean_token_mean", kl_coef=0.3,
                                         kl_aggregation="token_mean", entropy_coef=0.1,
                                         entropy_aggregation="token_mean"),
    "kl_normalizer": dict(aggregation="seq_mean_token_mean", normalizer=3.0, kl_coef=0.3,
                          kl_aggregation="token_mean", kl_normalizer=11.0),
    # TRL: the entropy bonus is a token mean over the kept tokens of top_entropy_quantile.
    "entropy_over_kept_tokens": dict(aggregation="seq_mean_token_mean", entropy_coef=0.2,
                                     entropy_aggregation="token_mean",
                                     top_entropy_quantile=0.4),
    "entropy_normalizer": dict(entropy_coef=0.2, entropy_aggregation="seq_mean_token_sum",
                               entropy_normalizer=2.5),
    # TRL grpo / luspo and verl geo_mean: empty sequences count in the denominators.
    "count_empty_seq_mean": dict(aggregation="seq_mean_token_mean",
                                 count_empty_sequences=True, kl_coef=0.2),
    "count_empty_seq_sum": dict(aggregation="seq_mean_token_sum", count_empty_sequences=True,
                                entropy_coef=0.1, entropy_aggregation="seq_mean_token_mean"),
    "count_empty_gmpo": dict(objective="gmpo", ratio_level="sequence",
                             aggregation="seq_mean_token_mean", count_empty_sequences=True),
    # KL estimators and gradients.
    "kl_abs": dict(objective="pg", kl_coef=0.5, kl_estimator="abs"),
    "kl_abs_old": dict(objective="pg", kl_coef=0.5, kl_estimator="abs", kl_reference="old"),
    "kl_k3_plus": dict(kl_coef=0.5, kl_estimator="k3", kl_clamp=10.0, kl_gradient="k2"),
    "kl_k1_plus": dict(kl_coef=0.5, kl_estimator="k1", kl_gradient="k2"),
    "kl_abs_plus_clamped": dict(kl_coef=0.5, kl_estimator="abs", kl_gradient="k2",
                                kl_clamp=0.3),
    "kl_k3_unbiased": dict(kl_coef=0.5, kl_estimator="k3", kl_clamp=10.0,
                           kl_gradient="k2_weighted"),
    "kl_k2_unbiased_old": dict(objective="pg", kl_coef=0.5, kl_estimator="k2",
                               kl_reference="old", kl_gradient="k2_weighted"),
    "kl_ratio_weighted": dict(kl_coef=0.5, kl_estimator="k3", kl_ratio_weighted=True,
                              log_ratio_clamp=None),
    "kl_ratio_weighted_sequence": dict(ratio_level="sequence", kl_coef=0.5,
                                       kl_ratio_weighted=True, clip_eps_low=0.3,
                                       clip_eps_high=0.3),
    "kl_ratio_weighted_sequence_token": dict(ratio_level="sequence_token", kl_coef=0.5,
                                             kl_ratio_weighted=True),
    # Rollout correction.
    "rollout_band_truncate": dict(rollout_correction="token_truncate", rollout_floor=0.8,
                                  rollout_cap=1.25),
    "rollout_icepop": dict(rollout_correction="token_mask", rollout_floor=0.8,
                           rollout_cap=1.5),
    "rollout_sequence_band": dict(rollout_correction="sequence_mask", rollout_floor=0.3,
                                  rollout_cap=3.0),
    "rollout_sequence_gate": dict(rollout_correction="sequence_gate", rollout_floor=0.85,
                                  rollout_cap=1.2),
    "rollout_normalized_token": dict(rollout_correction="token_truncate", rollout_cap=1.5,
                                     rollout_normalize=True),
    "rollout_normalized_sequence": dict(rollout_correction="sequence_truncate",
                                        rollout_cap=3.0, rollout_normalize=True),
    "off_policy_mask": dict(off_policy_mask_threshold=0.05),
    "off_policy_mask_with_correction": dict(off_policy_mask_threshold=-0.1,
                                            rollout_correction="token_mask",
                                            rollout_cap=1.5),
    "kl_abs_plus": dict(kl_coef=0.5, kl_estimator="abs", kl_gradient="k2"),
    "icepop_normalized_off_policy": dict(rollout_correction="token_mask", rollout_floor=0.8,
                                         rollout_cap=1.5, rollout_normalize=True,
                                         off_policy_mask_threshold=-0.1),
}

TRITON_CASES = ("kl_token_mean_under_seq_mean", "count_empty_seq_mean", "kl_abs_plus",
                "kl_k3_unbiased", "kl_ratio_weighted_sequence", "rollout_sequence_gate",
                "icepop_normalized_off_policy")


@pytest.mark.parametrize("name", list(CASES))
def test_against_reference_torch(name):
    check_policy(problem(), PolicyLossConfig(**CASES[name]), "torch")


@pytest.mark.parametrize("name", TRITON_CASES)
def test_against_reference_triton(name):
    check_policy(problem(seed=1), PolicyLossConfig(**CASES[name]), "triton")


def test_on_policy_off_policy_mask_uses_old_when_no_rollout():
    # Without rollout log-probs the mask compares old and current: on-policy it keeps all.
    config = PolicyLossConfig(off_policy_mask_threshold=0.0)
    check_policy(problem(), config, "torch", use_rollout=False)
    check_policy(problem(), config, "torch", use_old=False, use_rollout=False)


def test_separate_terms_change_the_loss():
    # A per-term aggregation is not the policy term's: the two losses differ.
    p = problem()
    inputs = dict(ref_logprobs=p["ref_logprobs"])
    joint, _ = policy(p, PolicyLossConfig(aggregation="seq_mean_token_mean", kl_coef=0.5),
                      **inputs)
    split, _ = policy(p, PolicyLossConfig(aggregation="seq_mean_token_mean", kl_coef=0.5,
                                          kl_aggregation="token_mean"), **inputs)
    assert abs(joint.loss.item() - split.loss.item()) > 1e-4


# --- against the peers' own functions ------------------------------------------------------

verl_core = pytest.importorskip(
    "verl.trainer.ppo.core_algos",
    reason="verl is optional (installed by .ci/run without its dependencies)")


def _token_mean(values, mask):
    return (values * mask).sum() / mask.sum()


@pytest.mark.parametrize(("mode", "fields"), [
    ("abs", dict(kl_estimator="abs")),
    ("k1+", dict(kl_estimator="k1", kl_gradient="k2")),
    ("low_var_kl+", dict(kl_estimator="k3", kl_clamp=10.0, kl_gradient="k2")),
    ("k3+", dict(kl_estimator="k3", kl_clamp=10.0, kl_gradient="k2")),
    ("k3", dict(kl_estimator="k3", kl_clamp=10.0)),
])
def test_verl_kl_penalty(mode, fields):
    # verl's actor loss with use_kl_loss: kl_loss_coef * agg_loss(kl_penalty(logp, ref)).
    p = problem(spread=1.5)
    config = PolicyLossConfig(objective="pg", kl_coef=0.3, **fields)
    zero = dict(p, advantages=torch.zeros_like(p["advantages"]))
    out, grad = policy(zero, config, ref_logprobs=p["ref_logprobs"])
    m = p["mask"].double()

    def verl_loss(logp):
        kl = verl_core.kl_penalty(logp, p["ref_logprobs"].double(), mode)
        return 0.3 * verl_core.agg_loss(kl, m, "token-mean")

    assert_same(out, grad, *peer_on_logits(p, verl_loss))


def test_verl_rollout_correction_weights():
    from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_weights

    from rlhf_fast.loss_weights import rollout_weights
    p = problem(spread=0.5)
    m = p["mask"].float()
    old, rollout = p["old_logprobs"], p["rollout_logprobs"]
    for level, threshold, fields in (
            ("token", "0.8_1.3", dict(rollout_correction="token_mask", rollout_floor=0.8,
                                      rollout_cap=1.3)),
            ("token", 1.2, dict(rollout_correction="token_truncate", rollout_cap=1.2)),
            ("sequence", "0.5_2.5", dict(rollout_correction="sequence_mask",
                                         rollout_floor=0.5, rollout_cap=2.5))):
        for normalize in (False, True):
            verl_w, _ = compute_rollout_correction_weights(
                old - rollout, m, rollout_is=level, rollout_is_threshold=threshold,
                rollout_is_batch_normalize=normalize)
            ours = rollout_weights(old, rollout, m, PolicyLossConfig(
                rollout_normalize=normalize, **fields))
            assert torch.allclose(ours * m, verl_w * m, rtol=1e-5, atol=1e-7), (level, normalize)


def test_verl_vanilla_with_icepop_weights_equals_token_mask():
    # verl multiplies its per-token loss by rollout_is_weights: the op's token_mask band.
    from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_weights
    from verl.workers.config import ActorConfig
    p = problem(spread=0.5)
    m = p["mask"].float()
    weights, _ = compute_rollout_correction_weights(
        p["old_logprobs"] - p["rollout_logprobs"], m, rollout_is="token",
        rollout_is_threshold="0.8_1.3", rollout_is_batch_normalize=True)
    actor = ActorConfig(strategy="fsdp", ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=2,
                        rollout_n=1, clip_ratio=0.2, clip_ratio_c=3.0)
    config = PolicyLossConfig(dual_clip_c=3.0, rollout_correction="token_mask",
                              rollout_floor=0.8, rollout_cap=1.3, rollout_normalize=True)
    out, grad = policy(p, config, rollout_logprobs=p["rollout_logprobs"])

    def verl_loss(logp):
        return verl_core.compute_policy_loss_vanilla(
            p["old_logprobs"].double(), logp, p["advantages"].double(), m.double(),
            "token-mean", actor, weights.double())[0]

    assert_same(out, grad, *peer_on_logits(p, verl_loss))


def test_verl_rejection_mask():
    from verl.trainer.ppo.rollout_corr_helper import compute_rollout_rejection_mask

    from rlhf_fast.rollout_correction import rejection_mask
    p = problem(spread=0.4, batch=6, seq_len=10)
    m = p["mask"].float()
    for spec, threshold in (("token_k1", "0.7_1.4"), ("seq_sum_k3", 1.3),
                            ("seq_mean_k2,token_k3", "0.13,0.3"), ("seq_max_k2", 0.34),
                            ("seq_mean_k1", 1.1)):
        verl_mask, _ = compute_rollout_rejection_mask(
            p["old_logprobs"] - p["rollout_logprobs"], m, rollout_rs=spec,
            rollout_rs_threshold=threshold)
        ours = rejection_mask(p["old_logprobs"], p["rollout_logprobs"], p["mask"], spec,
                              threshold)
        assert torch.equal(ours, verl_mask.bool()), spec
        assert 0 < ours.sum() < p["mask"].sum(), spec   # the rule binds, and keeps some


def test_trl_off_policy_mask():
    from trl.trainer.grpo_trainer import GRPOTrainer
    p = problem(spread=0.5)
    adv = p["advantages"][:, :1].expand_as(p["advantages"]).contiguous()
    p = dict(p, advantages=adv[:, 0].contiguous())
    config = PolicyLossConfig(off_policy_mask_threshold=0.02)
    out, grad = policy(p, config, rollout_logprobs=p["rollout_logprobs"])
    m = p["mask"].double()

    def trl_loss(logp):
        keep = GRPOTrainer.get_off_policy_mask(
            p["advantages"].double().unsqueeze(1), logp, p["rollout_logprobs"].double(), m,
            0.02)
        ratio = torch.exp(logp - p["old_logprobs"].double())
        a = p["advantages"].double().unsqueeze(1)
        per_token = -torch.minimum(ratio * a, ratio.clamp(0.8, 1.2) * a) * keep
        assert 0 < (keep * (a < 0)).sum() and keep.min() == 0   # the mask binds
        return (per_token * m).sum() / m.sum()

    assert_same(out, grad, *peer_on_logits(p, trl_loss))


def test_reference_rollout_weights_by_hand():
    # One sequence, two valid tokens with log-weights 0.5 and -1: every mode by hand.
    old = torch.tensor([[0.5, -1.0, 7.0]], dtype=torch.float64)
    rollout = torch.zeros_like(old)
    mask = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    e = math.exp

    def weights(**fields):
        return reference.rollout.rollout_weights(old, rollout, mask,
                                                 PolicyLossConfig(**fields))[0, :2].tolist()

    assert weights(rollout_correction="token_truncate", rollout_floor=0.5,
                   rollout_cap=1.5) == pytest.approx([1.5, 0.5])
    assert weights(rollout_correction="token_mask", rollout_floor=0.5,
                   rollout_cap=2.0) == pytest.approx([e(0.5), 0.0])
    assert weights(rollout_correction="sequence_gate", rollout_floor=0.7,
                   rollout_cap=2.0) == pytest.approx([e(0.5), e(-1.0)])   # gate e^-0.25
    assert weights(rollout_correction="sequence_gate", rollout_floor=0.8,
                   rollout_cap=2.0) == pytest.approx([0.0, 0.0])
    mean = (min(e(0.5), 1.2) + e(-1.0)) / 2
    assert weights(rollout_correction="token_truncate", rollout_cap=1.2,
                   rollout_normalize=True) == pytest.approx([1.2 / mean, e(-1.0) / mean])
