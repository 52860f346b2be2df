"""The peers' extra policy objectives in ``policy_loss``: verl's DPPO-TV / DPPO-KL, Clip-Cov /
KL-Cov and GMPO with asymmetric bounds, TRL's VESPO. Loss and gradient against the independent
float64 reference on both backends, then against verl 0.9.1's ``core_algos`` and TRL 1.16's
``get_gamma_weights`` on the same log-probs.

Problems have per-token advantages of both signs, an empty sequence between others and
log-probs a few tenths from the old / rollout ones, so the trust regions, the gamma weight's
two sides and the covariance bounds all bind somewhere."""

from __future__ import annotations

import pytest
import torch
from policy_problems import check_policy, make_problem

import rlhf_fast
from rlhf_fast import PolicyLossConfig, reference
from rlhf_fast.loss_weights import covariance_selection, dppo_keep


def problem(seed=0, spread=0.6, batch=4, seq_len=8, n_cols=24):
    p = make_problem(batch=batch, seq_len=seq_len, n_cols=n_cols, seed=seed, spread=spread,
                     per_token_adv=True)
    p["mask"][1] = False
    p["mask"][0, :2] = True
    return p


CASES = {
    # The sampled tokens' probabilities are a few hundredths: thresholds of 1e-3 bind.
    "dppo_tv": dict(objective="dppo_tv", clip_eps_low=0.005, clip_eps_high=0.002),
    "dppo_kl": dict(objective="dppo_kl", clip_eps_low=1e-3, clip_eps_high=1e-4,
                    dppo_ratio_cap=1.5),
    "dppo_tv_seq_mean": dict(objective="dppo_tv", clip_eps_low=0.005, clip_eps_high=0.005,
                             aggregation="seq_mean_token_mean"),
    "vespo": dict(objective="vespo"),
    "vespo_token_rollout": dict(objective="vespo", rollout_correction="token_truncate",
                                rollout_cap=1.5),
    "vespo_sequence_rollout": dict(objective="vespo", rollout_correction="sequence_mask",
                                   rollout_cap=3.0),
    "kl_cov": dict(objective="pg", cov_selection="kl_cov", cov_ratio=0.2, cov_kl_coef=0.5,
                   log_ratio_clamp=None),
    "kl_cov_ppo": dict(cov_selection="kl_cov", cov_ratio=0.1),
    "clip_cov": dict(cov_selection="clip_cov", cov_ratio=0.15, cov_lower=0.0, cov_upper=5.0,
                     log_ratio_clamp=None),
    "gmpo_asymmetric": dict(objective="gmpo", ratio_level="sequence", gmpo_clip=0.1,
                            gmpo_clip_high=0.3),
}

TRITON_CASES = ("dppo_tv", "dppo_kl", "vespo_token_rollout", "kl_cov", "clip_cov",
                "gmpo_asymmetric")


@pytest.mark.parametrize("name", list(CASES))
def test_against_reference_torch(name):
    check_policy(problem(), PolicyLossConfig(**CASES[name]), "torch", seed=7)


@pytest.mark.parametrize("name", TRITON_CASES)
def test_against_reference_triton(name):
    check_policy(problem(seed=1), PolicyLossConfig(**CASES[name]), "triton", seed=7)


def test_selections_bind():
    # The cases above test something only if the masks are neither all-on nor all-off.
    p = problem()
    m = p["mask"].float()
    old, adv = p["old_logprobs"], p["advantages"]
    logp = reference.token_logprobs(p["logits"].double(), p["targets"]).float()
    for name in ("dppo_tv", "dppo_kl"):
        keep = dppo_keep(logp, old, adv, PolicyLossConfig(**CASES[name]))
        assert 0 < (keep * m).sum() < m.sum(), name
    for name in ("kl_cov", "clip_cov"):
        torch.manual_seed(7)
        picked = covariance_selection(adv, logp, m, torch.ones_like(m, dtype=torch.bool),
                                      PolicyLossConfig(**CASES[name]))
        assert 0 < picked.sum() < m.sum(), name


def test_presets_are_one_line():
    for name in ("clip_cov", "kl_cov", "dppo_tv", "dppo_kl", "vespo"):
        assert PolicyLossConfig.preset(name).needs_batch_statistics == (
            name in ("clip_cov", "kl_cov", "vespo"))


def test_bad_combinations_are_refused():
    with pytest.raises(ValueError, match="gmpo_clip_high"):
        PolicyLossConfig(gmpo_clip_high=0.3)
    with pytest.raises(ValueError, match="ratio_level='token'"):
        PolicyLossConfig(objective="vespo", ratio_level="sequence")
    with pytest.raises(ValueError, match="cov_selection"):
        PolicyLossConfig(objective="cispo", cov_selection="kl_cov")
    with pytest.raises(ValueError, match="clip_eps_low"):
        PolicyLossConfig(objective="dppo_tv", clip_eps_low=None)


def trl_adaptive_entropy(coef, entropies, target=0.2, delta=0.005, low=0.0, high=1.0):
    """TRL 1.16's use_adaptive_entropy, as its training step writes it: the coefficient
    applied in each step, given the window entropies measured at the end of each step."""
    last, applied = float("inf"), []
    for world_entropy in entropies:
        applied.append(coef if last <= target else 0.0)
        if world_entropy <= target:
            coef = min(coef + delta, high)
        else:
            coef = max(coef - delta, low)
        last = world_entropy
    return applied


def test_adaptive_entropy_controller():
    # The bonus it drives (entropy_aggregation="token_mean") is tested on both backends in
    # tests/test_peers_policy.py; here the controller's trajectory.
    from rlhf_fast.entropy_control import AdaptiveEntropyController
    ctrl = AdaptiveEntropyController(value=0.01, target=2.5, delta=0.004)
    applied, measured = [], []
    for step in range(5):
        coef = ctrl.coef
        applied.append(coef)
        config = PolicyLossConfig(entropy_coef=coef, entropy_aggregation="token_mean")
        out, _, _ = check_policy(problem(seed=step), config, "torch")
        for scale in (0.6, 1.0):  # two micro-batches: the window is their token-weighted mean
            ctrl.observe(out.metrics["entropy_mean"] * out.metrics["token_count"] * scale,
                         out.metrics["token_count"])
        measured.append(float((out.metrics["entropy_mean"] * 1.6 / 2).item()))
        ctrl.step()
    assert applied == pytest.approx(trl_adaptive_entropy(0.01, measured, 2.5, 0.004))
    assert 0 < sum(a > 0 for a in applied) < 5, (applied, measured)   # both sides reached


# --- against the peers' own functions ------------------------------------------------------

verl_core = pytest.importorskip(
    "verl.trainer.ppo.core_algos",
    reason="verl is optional (installed by .ci/run without its dependencies)")


def op_and_peer(p, config, peer_loss_of_logp, **inputs):
    x = p["logits"].clone().requires_grad_()
    out = rlhf_fast.policy_loss(x, p["targets"], p["advantages"], p["mask"],
                                old_logprobs=p["old_logprobs"], config=config, **inputs)
    out.loss.backward()
    xr = p["logits"].double().requires_grad_()
    peer = peer_loss_of_logp(reference.token_logprobs(xr, p["targets"]))
    peer.backward()
    assert out.loss.item() == pytest.approx(peer.item(), rel=1e-5, abs=1e-7)
    err = (x.grad.double() - xr.grad).norm() / xr.grad.norm()
    assert err <= 1e-5, f"gradient rel err {err:.2e}"


def verl_policy_loss(**fields):
    from verl.workers.config import PolicyLossConfig as VerlConfig
    return VerlConfig(**fields)


def actor(**fields):
    from verl.workers.config import ActorConfig
    return ActorConfig(strategy="fsdp", ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=2,
                       rollout_n=1, **fields)


@pytest.mark.parametrize("name", ["dppo_tv", "dppo_kl"])
def test_verl_dppo(name):
    p = problem()
    c = PolicyLossConfig(**CASES[name])
    verl_config = actor(clip_ratio=0.2, clip_ratio_low=c.clip.eps_low,
                        clip_ratio_high=c.clip.eps_high, clip_ratio_c=c.clip.dppo_ratio_cap)
    fn = verl_core.get_policy_loss_fn(name)

    def peer(logp):
        return fn(p["old_logprobs"].double(), logp, p["advantages"].double(),
                  p["mask"].double(), "token-mean", verl_config, None)[0]

    op_and_peer(p, c, peer)


def test_verl_kl_cov():
    p = problem()
    c = PolicyLossConfig(**CASES["kl_cov"])
    verl_config = actor(clip_ratio=0.2, policy_loss=verl_policy_loss(
        loss_mode="kl_cov", kl_cov_ratio=0.2, ppo_kl_coef=0.5))

    def peer(logp):
        return verl_core.compute_policy_loss_kl_cov(
            p["old_logprobs"].double(), logp, p["advantages"].double(), p["mask"].double(),
            "token-mean", verl_config, None)[0]

    op_and_peer(p, c, peer)


def test_verl_clip_cov_whole_pool():
    # verl draws its k tokens with randperm: with cov_ratio 1 it takes the whole pool, so the
    # draw no longer matters and the two must agree exactly.
    p = problem()
    c = PolicyLossConfig(cov_selection="clip_cov", cov_ratio=1.0, cov_lower=0.0,
                         cov_upper=5.0, log_ratio_clamp=None)
    verl_config = actor(clip_ratio=0.2, policy_loss=verl_policy_loss(
        loss_mode="clip_cov", clip_cov_ratio=1.0, clip_cov_lb=0.0, clip_cov_ub=5.0))

    def peer(logp):
        return verl_core.compute_policy_loss_clip_cov(
            p["old_logprobs"].double(), logp, p["advantages"].double(), p["mask"].double(),
            "token-mean", verl_config, None)[0]

    op_and_peer(p, c, peer)


def test_verl_geo_mean_asymmetric():
    # verl's geo_mean: clip_ratio_low / clip_ratio_high are log-space bounds; torch.mean over
    # the whole batch counts the empty sequence.
    p = problem()
    adv = p["advantages"][:, 0].contiguous()
    p = dict(p, advantages=adv)
    c = PolicyLossConfig(objective="gmpo", ratio_level="sequence", gmpo_clip=0.1,
                         gmpo_clip_high=0.3, count_empty_sequences=True, log_ratio_clamp=None)
    verl_config = actor(clip_ratio=0.2, clip_ratio_low=0.1, clip_ratio_high=0.3)
    m = p["mask"].double()

    def peer(logp):
        return verl_core.compute_policy_loss_geo_mean(
            p["old_logprobs"].double(), logp, adv.double()[:, None] * m, m, "token-mean",
            verl_config, None)[0]

    op_and_peer(p, c, peer)


def test_trl_vespo():
    from trl.trainer.grpo_trainer import GRPOTrainer
    p = problem(spread=0.3)
    adv = p["advantages"][:, 0].contiguous()
    p = dict(p, advantages=adv)
    c = PolicyLossConfig(objective="vespo", vespo_k_pos=1.5, vespo_lambda_pos=2.5,
                         vespo_k_neg=2.5, vespo_lambda_neg=1.5)
    m = p["mask"].double()

    def peer(logp):
        a = adv.double()[:, None]
        phi = GRPOTrainer.get_gamma_weights(a, logp - p["old_logprobs"].double(), m, None,
                                            1.5, 2.5, 2.5, 1.5)
        per_token = -phi * a * logp
        return (per_token * m).sum() / m.sum()

    op_and_peer(p, c, peer)
