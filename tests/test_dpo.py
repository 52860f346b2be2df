"""dpo_loss against the float64 reference: every loss_type, fp32 / bf16, both backends,
padding, per-token and per-sequence reference log-probs, reference-free mode, edge cases and
errors."""

import itertools

import pytest
import torch
from numerics import assert_grad_close
from preference_problems import LOSS_TYPES, check_dpo, loss_kwargs, make_pairs

import rlhf_fast
from rlhf_fast import reference
from rlhf_fast.preference_config import preference_config


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_loss_type_matches_reference(loss_type, dtype, backend, device):
    problem = make_pairs(dtype=dtype, seed=LOSS_TYPES.index(loss_type), device=device)
    check_dpo(problem, loss_kwargs(loss_type), backend)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "nca_pair", "apo_down"])
def test_per_sequence_reference_equals_per_token(loss_type, backend, device):
    problem = make_pairs(seed=11, device=device)
    out_seq, grad_seq, _ = check_dpo(problem, loss_kwargs(loss_type), backend,
                                     ref_layout="sequence")
    out_tok, grad_tok, _ = check_dpo(problem, loss_kwargs(loss_type), backend)
    assert torch.allclose(out_seq.loss, out_tok.loss, rtol=1e-6)
    assert torch.allclose(grad_seq, grad_tok, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("kwargs", [
    dict(loss_type="sigmoid", average_logprobs=True),
    dict(loss_type="ipo", average_logprobs=False, beta=0.05),
    dict(loss_type="sigmoid", nll_coef=0.7),
    dict(loss_type="orpo", nll_coef=0.5, beta=0.2),
    dict(loss_type="hinge", beta=0.2),
    dict(loss_type="exo_pair"),                       # default epsilon 1e-3
    dict(loss_type="robust", label_smoothing=0.3),
    dict(loss_type="sigmoid", temperature=0.7),
    dict(loss_type="simpo", beta=2.5, gamma=1.2, average_logprobs=None),
    dict(loss_type="discopop", discopop_tau=0.5, beta=0.2),
    dict(loss_type="bco_pair", average_logprobs=True),
], ids=lambda k: "-".join(f"{a}={b}" for a, b in k.items()))
def test_options_match_reference(kwargs, backend, device):
    check_dpo(make_pairs(seed=5, device=device), kwargs, backend)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "apo_zero", "sppo_hard"])
def test_reference_free(loss_type, backend, device):
    problem = make_pairs(seed=3, device=device)
    out, _, _ = check_dpo(problem, {**loss_kwargs(loss_type), "reference_free": True}, backend)
    # Reference-free is the same loss with zero reference log-probs.
    zero = torch.zeros_like(problem["ref"])
    with_zero_ref = rlhf_fast.dpo_loss(problem["logits"], problem["targets"], problem["mask"],
                                       ref_logprobs=zero, backend=backend,
                                       **loss_kwargs(loss_type))
    assert torch.allclose(out.loss, with_zero_ref.loss, rtol=1e-6)


def test_rewards_and_accuracy_follow_the_margins(backend, device):
    problem = make_pairs(pairs=4, seed=8, device=device)
    out, _, _ = check_dpo(problem, {"loss_type": "sigmoid", "beta": 0.3}, backend)
    m = problem["mask"]
    policy = torch.where(m, reference.token_logprobs(problem["logits"].double(),
                                                     problem["targets"]), 0.0).sum(-1)
    ref = torch.where(m, problem["ref"].double(), 0.0).sum(-1)
    rewards = 0.3 * (policy - ref)
    assert torch.allclose(out.metrics["rewards_accuracy"].double(),
                          (rewards[:4] > rewards[4:]).double().mean())
    assert torch.allclose(out.metrics["rewards_margin"].double(),
                          (rewards[:4] - rewards[4:]).mean(), atol=1e-5)
    assert out.metrics["pair_count"].item() == 4


def test_fully_masked_sequences_and_padding_only_pairs(backend, device):
    problem = make_pairs(pairs=3, seed=4, device=device)
    problem["mask"][0] = False          # a chosen sequence with no response token
    problem["mask"][4] = False          # a rejected one
    _, grad, _ = check_dpo(problem, {"loss_type": "ipo"}, backend)   # averaged: 0 / 0
    assert (grad[0] == 0).all() and (grad[4] == 0).all()
    check_dpo(problem, {"loss_type": "sigmoid", "nll_coef": 1.0}, backend)


def test_all_masked_batch_is_finite(backend, device):
    problem = make_pairs(pairs=2, seed=6, device=device)
    problem["mask"][:] = False
    out, grad, _ = check_dpo(problem, {"loss_type": "orpo"}, backend)
    assert torch.isfinite(out.loss) and (grad == 0).all()


def test_empty_batch(backend, device):
    logits = torch.zeros(0, 5, 11, device=device, requires_grad=True)
    targets = torch.zeros(0, 5, dtype=torch.long, device=device)
    out = rlhf_fast.dpo_loss(logits, targets, targets.bool(),
                             ref_logprobs=torch.zeros(0, device=device), backend=backend)
    out.loss.backward()
    assert out.loss.item() == 0 and logits.grad.shape == logits.shape
    assert out.chosen_logprobs.shape == (0,) and out.metrics["pair_count"].item() == 0


def test_confident_chosen_tokens(backend, device):
    """p_y -> 1 on every chosen token: ORPO's log(1 - e^a) and the gradient stay finite."""
    problem = make_pairs(pairs=2, seq_len=5, seed=9, device=device)
    logits = problem["logits"].clone()
    rows = torch.arange(2)
    logits[rows[:, None], torch.arange(5), problem["targets"][:2]] += 12.0
    problem["logits"] = logits
    for kwargs in ({"loss_type": "orpo"}, {"loss_type": "sigmoid"}, {"loss_type": "apo_zero"}):
        check_dpo(problem, kwargs, backend)


def test_orpo_with_a_certain_chosen_sequence(backend, device):
    """Chosen tokens so dominant that float32 logp is exactly 0: the odds are infinite, the
    loss and gradient take their limits (no 0 / 0)."""
    problem = make_pairs(pairs=2, seq_len=5, seed=10, device=device)
    logits = problem["logits"].clone()
    logits[torch.arange(2)[:, None], torch.arange(5), problem["targets"][:2]] += 200.0
    problem["logits"] = logits
    out, _, _ = check_dpo(problem, {"loss_type": "orpo"}, backend)
    assert out.chosen_logprobs.max().item() > -1e-30


def test_targets_ignore_index_count_as_masked(backend, device):
    problem = make_pairs(seed=12, device=device)
    targets = problem["targets"].clone()
    targets[~problem["mask"]] = -100
    all_true = torch.ones_like(problem["mask"])
    a = rlhf_fast.dpo_loss(problem["logits"], targets, all_true,
                           ref_logprobs=torch.where(problem["mask"], problem["ref"], 0.0).sum(-1),
                           backend=backend)
    b = rlhf_fast.dpo_loss(problem["logits"], problem["targets"], problem["mask"],
                           ref_logprobs=problem["ref"], backend=backend)
    assert torch.allclose(a.loss, b.loss, rtol=1e-6)


def test_grad_output_scaling_and_inplace(backend, device):
    problem = make_pairs(seed=2, device=device)
    _, grad, _ = check_dpo(problem, {"loss_type": "sigmoid"}, backend, grad_scale=-2.5)
    x = problem["logits"].clone().requires_grad_()
    y = x * 1.0   # a non-leaf whose storage the op may overwrite
    out = rlhf_fast.dpo_loss(y, problem["targets"], problem["mask"],
                             ref_logprobs=problem["ref"], inplace=True, backend=backend)
    (-2.5 * out.loss).backward()
    assert_grad_close(x.grad, grad.double(), torch.float32)


def test_strided_logits_slice(backend, device):
    """``logits[:, :-1]`` (the usual shift) is read in place."""
    problem = make_pairs(seq_len=8, seed=13, device=device)
    full = problem["logits"]
    sliced = {**problem, "logits": full[:, :-1], "targets": problem["targets"][:, 1:],
              "mask": problem["mask"][:, 1:], "ref": problem["ref"][:, 1:]}
    check_dpo(sliced, {"loss_type": "sigmoid"}, backend)


def test_training_raises_the_margin(device):
    """A tabular policy trained with DPO: the implicit reward margin grows monotonically."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 4, 16, generator=g).to(device)
    targets = torch.randint(0, 16, (8, 4), generator=g).to(device)
    mask = torch.ones(8, 4, dtype=torch.bool, device=device)
    ref = reference.token_logprobs(logits.double(), targets).float().sum(-1)
    params = logits.clone().requires_grad_()
    opt = torch.optim.SGD([params], lr=2.0)
    margins = []
    for _ in range(6):
        out = rlhf_fast.dpo_loss(params, targets, mask, ref_logprobs=ref, beta=0.1)
        margins.append(out.metrics["rewards_margin"].item())
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert all(b > a for a, b in itertools.pairwise(margins)), margins
    assert out.metrics["rewards_accuracy"].item() == 1.0


def _call(problem, **kwargs):
    args = dict(ref_logprobs=problem["ref"])
    args.update(kwargs)
    logits = args.pop("logits", problem["logits"])
    targets = args.pop("targets", problem["targets"])
    mask = args.pop("mask", problem["mask"])
    return rlhf_fast.dpo_loss(logits, targets, mask, **args)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(logits="odd"), ValueError, "must be even"),
    (dict(logits="flat"), ValueError, r"\[2B, T, \.\.\.\]"),
    (dict(ref_logprobs="half"), ValueError, r"ref_logprobs must be \[2B\]"),
    (dict(ref_logprobs="transposed"), ValueError, r"ref_logprobs must be \[2B\]"),
    (dict(ref_logprobs=None), ValueError, "reference_free=True"),
    (dict(ref_logprobs="int"), TypeError, "float tensor"),
    (dict(loss_type="simpo"), ValueError, "reference-free"),
    (dict(reference_free=True), ValueError, "pass no ref_logprobs"),
    (dict(mask="transposed"), ValueError, r"mask must have shape \(6, 7\)"),
    (dict(targets="out_of_range"), ValueError, r"targets must lie in \[0, 50\)"),
    (dict(loss_type="dpo"), ValueError, "loss_type must be one of"),
    (dict(beta=0.0), ValueError, "beta must be > 0"),
    (dict(beta=float("nan")), ValueError, "beta must be finite"),
    (dict(loss_type="hinge", label_smoothing=0.1), ValueError, "label_smoothing applies"),
    (dict(loss_type="robust", label_smoothing=0.5), ValueError, r"\[0, 0.5\)"),
    (dict(label_smoothing=1.0), ValueError, r"\[0, 1.0\)"),
    (dict(gamma=0.5), ValueError, "SimPO's target margin"),
    (dict(nll_coef=-1.0), ValueError, "nll_coef must be >= 0"),
    (dict(loss_type="discopop", discopop_tau=0.0), ValueError, "discopop_tau must be > 0"),
    (dict(loss_type="orpo", ref_logprobs=None, average_logprobs=False), ValueError,
     "length-normalised"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
])
def test_bad_input_is_named(kwargs, error, match):
    problem = make_pairs(pairs=3, seq_len=7)
    replace = {
        "odd": problem["logits"][:5], "flat": problem["logits"][0],
        "half": problem["ref"][:3, 0], "transposed": None, "int": problem["targets"],
        "out_of_range": problem["targets"] + 50,
    }
    for key, value in list(kwargs.items()):
        if isinstance(value, str) and value in replace:
            if value == "transposed":
                kwargs[key] = problem[key if key != "ref_logprobs" else "ref"].T
            else:
                kwargs[key] = replace[value]
    with pytest.raises(error, match=match):
        _call(problem, **kwargs)


def test_reference_free_losses_need_no_reference(backend):
    problem = make_pairs(seed=1)
    for loss_type in ("simpo", "orpo"):
        config = preference_config(loss_type=loss_type)
        assert not config.uses_reference and config.average_logprobs
        rlhf_fast.dpo_loss(problem["logits"], problem["targets"], problem["mask"],
                           loss_type=loss_type, backend=backend)
