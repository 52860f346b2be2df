"""Preference losses: the hand-derived per-pair derivatives against autograd of the
independent reference formula, at margins of both signs; ORPO's guard for a pair with an
empty chosen or rejected sequence; sequence scores; the config's checks at their bounds."""

import dataclasses
import math

import pytest
import torch
from preference_problems import LOSS_TYPES, check_dpo, loss_kwargs, make_pairs

from rlhf_fast import preference_coefficients as pc
from rlhf_fast.preference_config import BATCH_SORTED_LOSSES, PreferenceLossConfig, preference_config
from rlhf_fast.reference import dpo as reference_dpo

# Chosen / rejected scores (log-ratio or mean log-prob) straddling every kink: margins of
# both signs, |beta * u| below and above the hinge's 1, IPO's 1 / (2 beta), SPPO's targets.
D_W = torch.tensor([-0.3, -2.5, -0.05, -1.0, -4.0, -0.7], dtype=torch.float64)
D_L = torch.tensor([-1.9, -0.4, -0.06, -1.0, -0.2, -3.5], dtype=torch.float64)


def autograd_pair(d_w, d_l, config):
    w, lo = d_w.clone().requires_grad_(), d_l.clone().requires_grad_()
    loss = reference_dpo._pair_loss(w, lo, config)
    g_w, g_l = torch.autograd.grad(loss.sum(), (w, lo))
    return loss.detach(), g_w, g_l


@pytest.mark.parametrize("loss_type", [t for t in LOSS_TYPES if t not in BATCH_SORTED_LOSSES])
@pytest.mark.parametrize("beta", [0.1, 1.7])
def test_pair_derivatives_against_autograd(loss_type, beta):
    # (AOT's losses sort across the batch: not per-pair functions; test_dpo covers them.)
    kwargs = {**loss_kwargs(loss_type), "beta": beta}
    config = preference_config(**kwargs)
    loss, g_w, g_l = pc.pair_losses(D_W, D_L, config)
    ref_loss, ref_w, ref_l = autograd_pair(D_W, D_L, config)
    assert torch.allclose(loss, ref_loss, rtol=1e-10, atol=1e-12)
    assert torch.allclose(g_w, ref_w, rtol=1e-9, atol=1e-12), (g_w, ref_w)
    assert torch.allclose(g_l, ref_l, rtol=1e-9, atol=1e-12), (g_l, ref_l)


@pytest.mark.parametrize(("loss_type", "extra"), [
    ("sigmoid", {"label_smoothing": 0.3}), ("robust", {"label_smoothing": 0.2}),
    ("exo_pair", {}), ("exo_pair", {"label_smoothing": 0.25}), ("simpo", {"gamma": 1.1}),
    ("discopop", {"discopop_tau": 0.6}), ("orpo", {}),
])
def test_pair_derivatives_with_options(loss_type, extra):
    config = preference_config(loss_type=loss_type, beta=0.8, **extra)
    loss, g_w, g_l = pc.pair_losses(D_W, D_L, config)
    ref_loss, ref_w, ref_l = autograd_pair(D_W, D_L, config)
    assert torch.allclose(loss, ref_loss, rtol=1e-10, atol=1e-12)
    assert torch.allclose(g_w, ref_w, rtol=1e-9, atol=1e-12)
    assert torch.allclose(g_l, ref_l, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("empty", ["chosen", "rejected", "both"])
def test_orpo_pair_with_an_empty_sequence_adds_nothing(empty, device):
    problem = make_pairs(pairs=3, seed=14, device=device)
    rows = {"chosen": [1], "rejected": [4], "both": [1, 4]}[empty]
    problem["mask"][rows] = False
    out, grad, _ = check_dpo(problem, {"loss_type": "orpo", "beta": 0.4}, "torch")
    # The guarded pair's rejected row has no gradient; its chosen row keeps only the NLL's.
    assert (grad[4] == 0).all()
    assert bool((grad[1] == 0).all()) == (empty != "rejected")
    # The guarded pair contributes 0 to the pair mean (which still counts it): the loss is
    # the other pairs' ORPO term over 3 pairs plus the chosen NLL.
    config = preference_config(loss_type="orpo", beta=0.4)
    valid = problem["mask"]
    score, _, _ = pc.sequence_scores(_logp(problem), valid, None, config)
    keep = torch.tensor([True, False, True])
    pair_loss, _, _ = pc.pair_losses(score[:3][keep], score[3:][keep], config)
    lp = _logp(problem).double()
    nll = -torch.where(valid[:3], lp[:3], 0.0).sum() / valid[:3].sum()
    expected = pair_loss.sum() / 3 + nll
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)


def _logp(problem):
    from rlhf_fast import reference
    return reference.token_logprobs(problem["logits"].double(), problem["targets"])


def test_orpo_pairs_guard_directly():
    config = preference_config(loss_type="orpo", beta=0.5)
    a_w = torch.tensor([-0.5, 0.0, -0.7], dtype=torch.float64)
    a_l = torch.tensor([0.0, -0.9, -0.2], dtype=torch.float64)
    nonempty = torch.tensor([True, False, True, False, True, True])
    loss, g_w, g_l = pc.orpo_pairs(a_w, a_l, nonempty, config)
    assert loss[:2].tolist() == [0.0, 0.0] and g_w[:2].tolist() == [0.0, 0.0]
    assert g_l[:2].tolist() == [0.0, 0.0]
    ref_loss, ref_w, ref_l = autograd_pair(a_w[2:], a_l[2:], config)
    assert torch.allclose(loss[2:], ref_loss) and torch.allclose(g_w[2:], ref_w)
    assert torch.allclose(g_l[2:], ref_l)


@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("layout", ["token", "sequence", None])
def test_sequence_scores(average, layout):
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.25, -4.0], [-1.0, -1.0, -1.0],
                         [-2.0, -0.5, -0.5]], dtype=torch.float64)
    valid = torch.tensor([[1, 1, 0], [0, 1, 1], [0, 0, 0], [1, 1, 1]], dtype=torch.bool)
    ref_tok = logp - 0.5
    ref = {"token": ref_tok, "sequence": torch.where(valid, ref_tok, 0.0).sum(-1),
           None: None}[layout]
    config = preference_config(loss_type="sigmoid", average_logprobs=average,
                               reference_free=layout is None)
    score, ref_score, scale = pc.sequence_scores(logp, valid, ref, config)
    sums = torch.tensor([-3.0, -4.25, 0.0, -3.0], dtype=torch.float64)
    lengths = torch.tensor([2.0, 2.0, 1.0, 3.0], dtype=torch.float64)  # empty: divided by 1
    expected = sums / lengths if average else sums
    assert torch.allclose(score, expected)
    ref_expected = (sums - 0.5 * torch.tensor([2.0, 2.0, 0.0, 3.0])) \
        / (lengths if average else 1.0)
    assert torch.allclose(ref_score, ref_expected if layout else torch.zeros_like(ref_score))
    assert torch.allclose(scale, 1 / lengths if average else torch.ones(4, dtype=scale.dtype))


@pytest.mark.parametrize("loss_type", ["sigmoid", "orpo", "simpo", "ipo"])
def test_nll_and_chunked_normalisers(loss_type):
    # Two chunks of pairs with the whole batch's normalisers add up to the whole batch.
    problem = make_pairs(pairs=4, seed=3)
    config = preference_config(**loss_kwargs(loss_type), nll_coef=0.3)
    lp = _logp(problem).float()
    valid = problem["mask"]
    ref = problem["ref"] if config.uses_reference else None
    chosen = valid[:4].sum()
    whole = pc.preference_coefficients(lp, valid, ref, config, num_pairs=4,
                                       chosen_tokens=chosen)
    total, parts = 0.0, []
    for rows in ([0, 1, 4, 5], [2, 3, 6, 7]):
        part = pc.preference_coefficients(lp[rows], valid[rows],
                                          ref[rows] if ref is not None else None, config,
                                          num_pairs=4, chosen_tokens=chosen)
        total += part.loss.item()
        parts.append(part.c_logp)
    assert total == pytest.approx(whole.loss.item(), rel=1e-9)
    joined = torch.cat([parts[0][:2], parts[1][:2], parts[0][2:], parts[1][2:]])
    assert torch.allclose(joined, whole.c_logp, rtol=1e-6, atol=1e-9)
    # ... and equal the reference's loss and per-token gradient.
    lpr = lp.double().requires_grad_()
    ref_loss = reference_dpo.dpo_loss_from_logprobs(
        lpr, valid, ref.double() if ref is not None else None, config)[0]
    (grad,) = torch.autograd.grad(ref_loss, lpr)
    assert whole.loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    assert torch.allclose(whole.c_logp.double(), grad, rtol=1e-5, atol=1e-7)


def test_config_defaults_and_derived_fields():
    for loss_type in LOSS_TYPES:
        config = preference_config(loss_type=loss_type)
        assert config.average_logprobs == (loss_type in ("ipo", "simpo", "orpo"))
        assert config.uses_reference == (loss_type not in ("simpo", "orpo"))
        assert config.nll_weight == (1.0 if loss_type == "orpo" else 0.0)
        assert config.smoothing == (1e-3 if loss_type == "exo_pair" else 0.0)
    assert not preference_config(reference_free=True).uses_reference
    assert preference_config(loss_type="orpo", nll_coef=0.5).nll_weight == 1.5
    assert preference_config(nll_coef=0.5).nll_weight == 0.5
    assert preference_config(loss_type="exo_pair", label_smoothing=0.2).smoothing == 0.2
    assert preference_config(loss_type="ipo", average_logprobs=False).average_logprobs is False
    c = preference_config(beta=2, temperature=3, gamma=0, discopop_tau=1)
    assert (c.beta, c.temperature, c.discopop_tau) == (2.0, 3.0, 1.0)


def test_config_dataclass_defaults_are_the_checked_defaults():
    assert PreferenceLossConfig() == preference_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        PreferenceLossConfig().beta = 0.2


@pytest.mark.parametrize(("kwargs", "error"), [
    (dict(beta=-0.1), ValueError), (dict(beta=math.inf), ValueError),
    (dict(beta="strong"), TypeError), (dict(label_smoothing=-0.01), ValueError),
    (dict(loss_type="robust", label_smoothing=0.5), ValueError),
    (dict(loss_type="exo_pair", label_smoothing=1.0), ValueError),
    (dict(loss_type="simpo", gamma=math.nan), ValueError),
    (dict(nll_coef=-1e-9), ValueError), (dict(discopop_tau=-1.0), ValueError),
    (dict(loss_type="simpo", average_logprobs=False), ValueError),
    (dict(temperature=-1.0), ValueError), (dict(loss_type="SIGMOID"), ValueError),
    # Loss lists: two of the same type, a type that cannot be mixed, a weight per type.
    (dict(loss_type=["sigmoid", "sigmoid"]), ValueError),
    (dict(loss_type=["sigmoid", "ipo"]), ValueError),
    (dict(loss_type=["sigmoid", "hinge"], loss_weights=[1.0]), ValueError),
    (dict(loss_type=["sigmoid", "hinge"], loss_weights=[1.0, 0.5, 0.25]), ValueError),
])
def test_config_rejects(kwargs, error):
    with pytest.raises(error):
        preference_config(**kwargs)


@pytest.mark.parametrize("kwargs", [
    dict(label_smoothing=0.0), dict(loss_type="robust", label_smoothing=0.49),
    dict(label_smoothing=0.99), dict(nll_coef=0.0), dict(loss_type="simpo", gamma=-0.5),
    dict(loss_type="discopop", discopop_tau=1e-6), dict(beta=1e-6),
    dict(ld_alpha=0.0), dict(ld_alpha=1.0),
    dict(loss_type=["sigmoid", "hinge"], loss_weights=[1.0, 0.5]),
    dict(loss_type=["sigmoid", "hinge", "bco_pair"]),
])
def test_config_accepts_the_edges(kwargs):
    preference_config(**kwargs)


@pytest.mark.parametrize("loss_type", ["sigmoid", "orpo", "ipo", "nca_pair"])
def test_one_pair_with_one_chosen_token(loss_type):
    # One pair, one chosen token: the pair and token normalisers are exactly 1.
    problem = make_pairs(pairs=1, seq_len=5, seed=21)
    problem["mask"][0] = False
    problem["mask"][0, 2] = True
    check_dpo(problem, {**loss_kwargs(loss_type), "nll_coef": 0.5}, "torch")


def test_hinge_at_its_kink_follows_relu():
    # beta * (D_w - D_l) == 1 exactly: relu(1 - x) at 0, whose derivative torch takes as 0.
    config = preference_config(loss_type="hinge", beta=0.5)
    d_w = torch.tensor([-0.5, -0.5, -0.5], dtype=torch.float64)
    d_l = torch.tensor([-2.5, -2.0, -3.0], dtype=torch.float64)   # x = 1, 0.75, 1.25
    loss, g_w, g_l = pc.pair_losses(d_w, d_l, config)
    ref_loss, ref_w, ref_l = autograd_pair(d_w, d_l, config)
    assert torch.equal(loss, ref_loss) and torch.equal(g_w, ref_w) and torch.equal(g_l, ref_l)
    assert g_w.tolist() == [0.0, -0.5, 0.0]


SCORED = {
    # TRL's f-divergences through a margin loss (alpha 1 is the reverse-KL limit), AlphaPO,
    # LD-DPO's down-weighted tail, OpenRLHF's per-sequence-mean NLL.
    "forward_kl": dict(loss_type="sigmoid", f_divergence="forward_kl"),
    "js_divergence": dict(loss_type="sigmoid", f_divergence="js_divergence"),
    "alpha_divergence": dict(loss_type="sigmoid", f_divergence="alpha_divergence",
                             f_alpha=0.25),
    "alpha_divergence_at_one": dict(loss_type="hinge", f_divergence="alpha_divergence",
                                    f_alpha=1.0),
    "alphapo": dict(loss_type="simpo", alphapo=0.75, gamma=0.5),
    "ld_alpha": dict(loss_type="sigmoid", ld_alpha=0.25),
    "nll_sequence_mean": dict(loss_type="sigmoid", nll_coef=0.5,
                              nll_aggregation="sequence_mean"),
}


@pytest.mark.parametrize("name", list(SCORED))
def test_scored_losses_against_reference(name):
    # preference_coefficients against autograd of the reference: loss, dL/dlogp and the
    # rewards (the transformed scores with AlphaPO). Chosen sequence 0 keeps one token, so a
    # per-sequence mean over it divides by 1; lengths differ within pairs (LD-DPO's tail).
    problem = make_pairs(pairs=3, seed=5)
    valid = problem["mask"].clone()
    valid[0] = False
    valid[0, 3] = True
    config = preference_config(**SCORED[name], beta=0.7)
    lp = _logp(problem).float()
    ref = problem["ref"] if config.uses_reference else None
    coef = pc.preference_coefficients(lp, valid, ref, config, num_pairs=3,
                                      chosen_tokens=valid[:3].sum(),
                                      chosen_sequences=(valid[:3].sum(-1) > 0).sum())
    lpr = lp.double().requires_grad_()
    ref_loss, _, _, metrics = reference_dpo.dpo_loss_from_logprobs(
        lpr, valid, ref.double() if ref is not None else None, config)
    (grad,) = torch.autograd.grad(ref_loss, lpr)
    assert coef.loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    assert torch.allclose(coef.c_logp.double(), grad, rtol=1e-5, atol=1e-7)
    for key in ("rewards_chosen", "rewards_rejected"):
        assert coef.pairs[key].mean().item() == pytest.approx(metrics[key].item(), rel=1e-6)


@pytest.mark.parametrize("name", ["ld_alpha", "nll_sequence_mean"])
def test_packed_pairs_equal_the_padded_rows(name):
    # The same rows packed back to back into [1, 2b T] (cu_seqlens every T): the same loss
    # and coefficients (LD-DPO's token positions count from each sequence's own start).
    from rlhf_fast.ops.packing import Packed

    problem = make_pairs(pairs=3, seed=6)
    valid = problem["mask"]
    config = preference_config(**SCORED[name], beta=0.7)
    lp = _logp(problem).float()
    ref = problem["ref"]
    kwargs = dict(num_pairs=3, chosen_tokens=valid[:3].sum(),
                  chosen_sequences=(valid[:3].sum(-1) > 0).sum())
    padded = pc.preference_coefficients(lp, valid, ref, config, **kwargs)
    rows, steps = valid.shape
    layout = Packed.from_cu_seqlens(torch.arange(rows + 1) * steps, rows * steps)
    packed = pc.preference_coefficients(lp.reshape(1, -1), valid.reshape(1, -1),
                                        ref.reshape(1, -1), config, layout=layout, **kwargs)
    assert packed.loss.item() == pytest.approx(padded.loss.item(), rel=1e-12)
    assert torch.allclose(packed.c_logp.reshape(rows, steps), padded.c_logp, rtol=1e-6,
                          atol=1e-9)
    weights = pc.token_weights(valid.reshape(1, -1), config, layout).reshape(rows, steps)
    assert torch.equal(weights, pc.token_weights(valid, config))
