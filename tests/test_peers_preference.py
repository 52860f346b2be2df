"""The peers' preference-loss options in ``dpo_loss`` / ``linear_dpo_loss``: TRL's
f-divergences, LD-DPO's ``ld_alpha`` and OpenRLHF's per-sequence-mean NLL, against the
float64 reference on both backends, and the fused-linear op chunked by single pairs."""

import pytest
import torch
from preference_problems import check_dpo, make_pairs

import rlhf_fast

CASES = {
    "forward_kl_sigmoid": dict(loss_type="sigmoid", beta=0.5, f_divergence="forward_kl"),
    "js_hinge": dict(loss_type="hinge", beta=0.5, f_divergence="js_divergence"),
    "alpha_robust": dict(loss_type="robust", beta=0.5, label_smoothing=0.2,
                         f_divergence="alpha_divergence", f_alpha=0.3),
    "alpha_capped_exo": dict(loss_type="exo_pair", beta=0.5, f_divergence="alpha_divergence",
                             f_alpha=40.0),
    "js_discopop": dict(loss_type="discopop", beta=0.5, f_divergence="js_divergence"),
    "ld_alpha_sigmoid": dict(loss_type="sigmoid", beta=0.5, ld_alpha=0.3),
    "ld_alpha_ipo": dict(loss_type="ipo", beta=0.5, ld_alpha=0.0),
    "nll_sequence_mean": dict(loss_type="sigmoid", beta=0.5, nll_coef=0.7,
                              nll_aggregation="sequence_mean"),
    "orpo_nll_sequence_mean": dict(loss_type="orpo", beta=0.2, nll_aggregation="sequence_mean"),
    "alphapo_simpo": dict(loss_type="simpo", beta=2.0, gamma=0.4, alphapo=0.5),
    "alphapo_cpo": dict(loss_type="sigmoid", beta=0.5, reference_free=True, alphapo=-0.3,
                        nll_coef=1.0),
    # MPO-style mixture (TRL loss_type=["sigmoid", "bco_pair"], loss_weights=[0.8, 0.2]);
    # with an f-divergence, which only the margin loss takes.
    "mixture": dict(loss_type=("sigmoid", "bco_pair"), loss_weights=(0.8, 0.2), beta=0.5,
                    label_smoothing=0.1),
    "mixture_js": dict(loss_type=("hinge", "apo_zero", "nca_pair"), loss_weights=(1.0, 0.5, 2.0),
                       beta=0.5, f_divergence="js_divergence"),
}


TRITON_CASES = ("forward_kl_sigmoid", "alpha_capped_exo", "ld_alpha_sigmoid",
                "nll_sequence_mean", "alphapo_simpo", "mixture_js")


def pairs_with_an_empty_sequence(device="cpu"):
    problem = make_pairs(pairs=4, seed=13, device=device)
    problem["mask"][5] = False      # an empty rejected sequence
    return problem


@pytest.mark.parametrize("name", list(CASES))
def test_against_reference_torch(name):
    check_dpo(pairs_with_an_empty_sequence(), CASES[name], "torch")


@pytest.mark.parametrize("name", TRITON_CASES)
def test_against_reference_triton(name, device):
    check_dpo(pairs_with_an_empty_sequence(device), CASES[name], "triton")


def test_linear_chunks_add_up():
    # Chunks of one pair: LD-DPO's pairing, the f-divergence and the NLL's batch-wide count
    # survive chunking (the chunking is host code, the same on both backends).
    config = dict(loss_type="sigmoid", beta=0.5, f_divergence="js_divergence", ld_alpha=0.3,
                  nll_coef=0.7, nll_aggregation="sequence_mean")
    problem = make_pairs(pairs=4, seed=14)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(8, 7, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    outs = []
    for chunk_size in (1, None):
        out = rlhf_fast.linear_dpo_loss(hidden, weight, problem["targets"], problem["mask"],
                                        ref_logprobs=problem["ref"], chunk_size=chunk_size,
                                        backend="torch", **config)
        grads = torch.autograd.grad(out.loss, (hidden, weight))
        outs.append((out.loss, *grads))
    for a, b in zip(*outs, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    logits = (hidden @ weight.T).detach()
    direct = rlhf_fast.dpo_loss(logits, problem["targets"], problem["mask"],
                                ref_logprobs=problem["ref"], backend="torch", **config)
    assert torch.allclose(direct.loss, outs[0][0], rtol=1e-5)


@pytest.mark.parametrize("loss_type", ["aot", "aot_unpaired"])
def test_aot_sorts_over_the_batch(loss_type):
    # One chunk whatever chunk_size (the sort is batch-wide), and not the pairwise sigmoid.
    problem = make_pairs(pairs=5, seed=17)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(10, 7, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g)
    # A reference that ranks the pairs differently from the policy, so the sorts matter.
    ref = problem["ref"] + 3.0 * torch.randn(problem["ref"].shape, generator=g)
    kwargs = dict(ref_logprobs=ref, beta=0.02, backend="torch")  # unsaturated margins
    chunked = rlhf_fast.linear_dpo_loss(hidden, weight, problem["targets"], problem["mask"],
                                        chunk_size=1, loss_type=loss_type, **kwargs)
    logits = (hidden @ weight.T).detach()
    whole = rlhf_fast.dpo_loss(logits, problem["targets"], problem["mask"],
                               loss_type=loss_type, **kwargs)
    pairwise = rlhf_fast.dpo_loss(logits, problem["targets"], problem["mask"], **kwargs)
    assert torch.allclose(chunked.loss, whole.loss, rtol=1e-5)
    assert abs(whole.loss.item() - pairwise.loss.item()) > 1e-3


def test_options_change_the_loss():
    problem = make_pairs(pairs=4, seed=15)
    base = dict(ref_logprobs=problem["ref"], beta=0.5, backend="torch")
    plain = rlhf_fast.dpo_loss(problem["logits"], problem["targets"], problem["mask"], **base)
    for name in ("forward_kl_sigmoid", "ld_alpha_sigmoid", "mixture"):
        kwargs = {k: v for k, v in CASES[name].items() if k != "beta"}
        other = rlhf_fast.dpo_loss(problem["logits"], problem["targets"], problem["mask"],
                                   **base, **kwargs)
        assert abs(other.loss.item() - plain.loss.item()) > 1e-4, name


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(loss_type="nca_pair", f_divergence="forward_kl"), "f_divergence"),
    (dict(f_divergence="js_divergence", average_logprobs=True), "average_logprobs"),
    (dict(f_alpha=0.2), "f_alpha"),
    (dict(f_divergence="tv"), "f_divergence"),
    (dict(ld_alpha=1.5), "ld_alpha"),
    (dict(nll_aggregation="sum"), "nll_aggregation"),
    (dict(loss_type="sigmoid", alphapo=0.5), "alphapo"),
    (dict(loss_type=("sigmoid", "ipo")), "weighted sum"),
    (dict(loss_type=("sigmoid", "hinge"), loss_weights=(1.0,)), "loss_weights"),
])
def test_bad_options_are_named(kwargs, match):
    problem = make_pairs(pairs=2, seed=1)
    with pytest.raises(ValueError, match=match):
        rlhf_fast.dpo_loss(problem["logits"], problem["targets"], problem["mask"],
                           ref_logprobs=problem["ref"], **kwargs)


def test_ld_alpha_needs_per_token_reference():
    problem = make_pairs(pairs=2, seed=1)
    sums = torch.where(problem["mask"], problem["ref"], 0.0).sum(-1)
    with pytest.raises(ValueError, match="per token"):
        rlhf_fast.dpo_loss(problem["logits"], problem["targets"], problem["mask"],
                           ref_logprobs=sums, ld_alpha=0.5)


@pytest.mark.parametrize(("loss_type", "alpha"), [("simpo", 0.5), ("sigmoid", -0.3),
                                                   ("ipo", 0.2)])
def test_trl_cpo_alphapo(loss_type, alpha):
    # TRL's CPOTrainer.cpo_loss on the sequence log-probs, called with the attributes it reads.
    import os
    from types import SimpleNamespace

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")   # CPO lives in trl.experimental
    from trl.experimental.cpo.cpo_trainer import CPOTrainer
    problem = make_pairs(pairs=4, seed=16)
    beta = 2.0 if loss_type == "simpo" else 0.5
    kwargs = dict(loss_type=loss_type, beta=beta, alphapo=alpha,
                  reference_free=loss_type != "simpo", average_logprobs=loss_type != "sigmoid")
    if loss_type == "simpo":
        kwargs["gamma"] = 0.4
    x = problem["logits"].clone().requires_grad_()
    out = rlhf_fast.dpo_loss(x, problem["targets"], problem["mask"], backend="torch", **kwargs)
    out.loss.backward()
    trainer = SimpleNamespace(alpha=alpha, beta=beta, loss_type=loss_type, label_smoothing=0.0,
                              simpo_gamma=0.4,
                              accelerator=SimpleNamespace(device=torch.device("cpu")))
    xr = problem["logits"].double().requires_grad_()
    logp = rlhf_fast.reference.token_logprobs(xr, problem["targets"])
    m = problem["mask"].double()
    seq = (logp * m).sum(-1)
    if loss_type != "sigmoid":
        seq = seq / m.sum(-1)
    losses, chosen_rewards, _ = CPOTrainer.cpo_loss(trainer, seq[:4], seq[4:])
    losses.mean().backward()
    assert out.loss.item() == pytest.approx(losses.mean().item(), rel=1e-5)
    assert out.metrics["rewards_chosen"].item() == pytest.approx(chosen_rewards.mean().item(),
                                                                 rel=1e-5)
    err = (x.grad.double() - xr.grad).norm() / xr.grad.norm()
    assert err <= 1e-5


def test_mixture_is_the_weighted_sum_of_its_losses():
    problem = make_pairs(pairs=4, seed=18)
    kwargs = dict(ref_logprobs=problem["ref"], beta=0.5, backend="torch")

    def loss(**more):
        return rlhf_fast.dpo_loss(problem["logits"], problem["targets"], problem["mask"],
                                  **kwargs, **more).loss

    mixed = loss(loss_type=["sigmoid", "bco_pair", "apo_down"], loss_weights=[0.8, 0.2, 0.5])
    parts = 0.8 * loss(loss_type="sigmoid") + 0.2 * loss(loss_type="bco_pair") \
        + 0.5 * loss(loss_type="apo_down")
    assert torch.allclose(mixed, parts, rtol=1e-6)


@pytest.mark.parametrize("loss_type", ["aot", "aot_unpaired", "orpo"])
def test_single_loss_weight_scales_its_pair_losses(loss_type, device):
    """``loss_weights=[w]`` with one type multiplies its pair mean, whatever the type: also
    the batch-sorted aot losses and orpo (whose NLL stays unweighted, as for any loss), in
    the float64 reference and in dpo_loss / linear_dpo_loss (both backends for aot; the
    weighting is host code the backends share): the loss and its gradient are affine in w
    and move with it (aot: linear, its w = 0 loss is 0)."""
    problem = make_pairs(pairs=3, seq_len=5, seed=21)
    h = torch.randn(6, 5, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    lm = torch.randn(50, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ref = None if loss_type == "orpo" else problem["ref"]

    def reference_step(logits, w):
        from rlhf_fast.preference_config import preference_config
        from rlhf_fast.reference.dpo import dpo_loss as reference_dpo_loss
        config = preference_config(beta=0.5, loss_type=loss_type, loss_weights=[w])
        return reference_dpo_loss(logits, problem["targets"], problem["mask"],
                                  ref_logprobs=None if ref is None else ref.double(),
                                  config=config)[0]

    def op_step(backend, linear):
        def step(leaf, w):
            args = (problem["targets"].to(device), problem["mask"].to(device))
            kwargs = dict(ref_logprobs=None if ref is None else ref.to(device), beta=0.5,
                          loss_type=loss_type, loss_weights=[w], backend=backend)
            if linear:
                return rlhf_fast.linear_dpo_loss(leaf, lm.float().to(device), *args,
                                                 **kwargs).loss
            return rlhf_fast.dpo_loss(leaf, *args, **kwargs).loss
        return step

    runs = [("reference", reference_step, h @ lm.T, 1e-12)]
    for backend in ("torch", "triton") if loss_type == "aot" else ("torch",):
        runs.append((f"dpo_loss[{backend}]", op_step(backend, False),
                     (h @ lm.T).float().to(device), 1e-5))
        runs.append((f"linear_dpo_loss[{backend}]", op_step(backend, True),
                     h.float().to(device), 1e-5))
    for name, step, leaf_value, tol in runs:
        losses, grads = [], []
        if loss_type != "orpo":     # no NLL term: the w = 0 loss is 0, with no gradient
            losses.append(torch.zeros((), dtype=torch.float64))
            grads.append(torch.zeros(leaf_value.shape, dtype=torch.float64))
        for w in (0.0, 1.0, 2.0)[len(losses):]:
            leaf = leaf_value.clone().requires_grad_()
            loss = step(leaf, w)
            loss.backward()
            losses.append(loss.detach().double().cpu())
            grads.append(leaf.grad.double().cpu())
        assert abs(losses[1] - losses[0]) > 1e-2, name          # the pair term is there
        assert (grads[1] - grads[0]).norm() > 1e-3 * grads[1].norm(), name
        torch.testing.assert_close(losses[2], 2 * losses[1] - losses[0], rtol=tol, atol=tol,
                                   msg=name)
        torch.testing.assert_close(grads[2], 2 * grads[1] - grads[0], rtol=tol,
                                   atol=tol * grads[1].norm().item(), msg=name)
