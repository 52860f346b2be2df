"""Advantage estimators, whitening and GAE against the independent loop references, on
rewards chosen so that a wrong formula differs (groups with ties, singletons, both signs,
few valid tokens), plus GAE's parameter checks at their bounds."""

import math

import pytest
import torch

from rlhf_fast import advantages as impl
from rlhf_fast.gae import gae
from rlhf_fast.reference import advantages as ref
from rlhf_fast.reference import gae as ref_gae

REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 3.0, -1.0, 2.0, 0.25,
                        -2.0, -2.5, 4.0, 0.0])


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("group_size", [1, 2, 4, 8])
@pytest.mark.parametrize("singleton", ["zero", "raw"])
def test_group_advantages(scale, unbiased, group_size, singleton):
    kwargs = dict(scale=scale, eps=0.05, unbiased=unbiased, singleton=singleton)
    got = impl.group_advantages(REWARDS, group_size, **kwargs)
    assert torch.allclose(got, ref.group_advantages(REWARDS, group_size, **kwargs),
                          rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("preset", ["trl", "verl", "openrlhf"])
@pytest.mark.parametrize("group_size", [1, 4])
def test_group_presets(preset, group_size):
    eps = {"trl": 1e-4, "verl": 1e-6, "openrlhf": 1e-9}[preset]
    singleton = "raw" if preset == "verl" else "zero"
    got = impl.group_advantages(REWARDS, group_size, preset=preset, eps=0.5, unbiased=False)
    expected = ref.group_advantages(REWARDS, group_size, eps=eps, singleton=singleton)
    assert torch.allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_batch_scale_of_one_reward():
    assert impl.group_advantages(torch.tensor([2.0]), 1, scale="batch").item() == 0.0


@pytest.mark.parametrize("group_size", [1, 2, 4])
def test_rloo_and_winrate(group_size):
    assert torch.allclose(impl.rloo_advantages(REWARDS, group_size),
                          ref.rloo_advantages(REWARDS, group_size), atol=1e-6)
    for temperature in (1.0, 0.3):
        got = impl.winrate_advantages(REWARDS, group_size, temperature=temperature)
        assert torch.allclose(got, ref.winrate_advantages(REWARDS, group_size,
                                                          temperature=temperature), atol=1e-6)


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_winrate_temperature_must_be_positive(bad):
    with pytest.raises(ValueError, match="temperature must be > 0"):
        impl.winrate_advantages(REWARDS, 4, temperature=bad)


@pytest.mark.parametrize(("values", "group_size"), [(REWARDS.view(4, 4), 4), (REWARDS, 0),
                                                    (REWARDS, 3), (REWARDS, -4)])
def test_bad_groups(values, group_size):
    with pytest.raises(ValueError):
        impl.group_advantages(values, group_size)
    with pytest.raises(ValueError):
        impl.rloo_advantages(values, group_size)


def test_bad_scale_and_singleton():
    with pytest.raises(ValueError, match="scale must be"):
        impl.group_advantages(REWARDS, 4, scale="std")
    with pytest.raises(ValueError, match="singleton must be"):
        impl.group_advantages(REWARDS, 4, singleton="one")


VALUES = torch.tensor([[1.0, -2.0, 3.5, 0.25, 8.0], [4.0, 4.5, -1.0, 2.0, 0.0]])


@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("valid", [[[1, 1, 1, 0, 1], [0, 1, 1, 0, 0]],   # six valid
                                   [[0, 1, 0, 0, 0], [0, 0, 0, 0, 1]],   # two valid
                                   [[0, 0, 0, 1, 0], [0, 0, 0, 0, 0]],   # one valid
                                   [[0] * 5, [0] * 5]])                  # none
@pytest.mark.parametrize("eps", [1e-8, 0.5])
def test_masked_whiten(shift_mean, unbiased, valid, eps):
    mask = torch.tensor(valid, dtype=torch.bool)
    kwargs = dict(shift_mean=shift_mean, unbiased=unbiased, eps=eps)
    got = impl.masked_whiten(VALUES, mask, **kwargs)
    assert torch.allclose(got, ref.masked_whiten(VALUES, mask, **kwargs), rtol=1e-5,
                          atol=1e-6)


def test_whiten_without_shift_keeps_the_mean_by_hand():
    x = torch.tensor([[1.0, 2.0, 6.0, 100.0]])
    mask = torch.tensor([[True, True, True, False]])
    got = impl.masked_whiten(x, mask, shift_mean=False, eps=0.0)
    mean, std = 3.0, math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 2)
    expected = [(v - mean) / std + mean for v in (1.0, 2.0, 6.0)] + [0.0]
    assert torch.allclose(got, torch.tensor([expected]), atol=1e-6)


TOKEN_REWARDS = torch.tensor([[0.5, -1.0, 2.0, 0.0, 1.5], [1.0, 0.25, -0.5, 3.0, -2.0],
                              [0.0, 0.0, 0.0, 0.0, 0.0]])
TOKEN_MASK = torch.tensor([[1, 1, 0, 1, 1], [0, 1, 1, 1, 0], [0, 0, 0, 0, 0]],
                          dtype=torch.bool)


@pytest.mark.parametrize("gamma", [1.0, 0.7, 0.0])
def test_returns_and_reinforce_pp(backend, gamma, monkeypatch):
    monkeypatch.setenv("RLHF_FAST_BACKEND", backend)
    assert torch.allclose(impl.returns_to_go(TOKEN_REWARDS, TOKEN_MASK, gamma),
                          ref.returns_to_go(TOKEN_REWARDS, TOKEN_MASK, gamma), atol=1e-6)
    for eps in (1e-8, 0.3):
        got = impl.reinforce_pp_advantages(TOKEN_REWARDS, TOKEN_MASK, gamma, eps=eps)
        assert torch.allclose(got, ref.reinforce_pp_advantages(TOKEN_REWARDS, TOKEN_MASK,
                                                               gamma, eps=eps), atol=1e-5)


@pytest.mark.parametrize("eps", [1e-8, 0.3])
def test_reinforce_pp_baseline(eps):
    rewards = torch.tensor([1.0, 3.0, -2.0, 0.5, 0.5, 4.0])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0], [0, 1, 1], [1, 1, 1]],
                        dtype=torch.bool)
    got = impl.reinforce_pp_baseline_advantages(rewards, 3, mask, eps=eps)
    assert torch.allclose(got, ref.reinforce_pp_baseline_advantages(rewards, 3, mask, eps=eps),
                          atol=1e-5)


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 1.0), (0.9, 0.6), (0.0, 1.0), (1.0, 0.0),
                                            (0.5, 0.25)])
def test_gae_against_reference(backend, gamma, lam):
    g = torch.Generator().manual_seed(4)
    rewards = torch.randn(3, 7, generator=g)
    values = torch.randn(3, 7, generator=g)
    mask = torch.rand(3, 7, generator=g) > 0.35
    mask[2] = False
    adv, ret = gae(rewards, values, mask, gamma, lam, backend=backend)
    ref_adv, ref_ret = ref_gae.gae(rewards, values, mask, gamma, lam)
    assert torch.allclose(adv.double(), ref_adv, atol=1e-6)
    assert torch.allclose(ret.double(), ref_ret, atol=1e-6)


@pytest.mark.parametrize(("gamma", "lam"), [(-0.01, 0.5), (1.01, 0.5), (0.5, -0.01),
                                            (0.5, 1.01), (math.nan, 0.5), (0.5, math.nan)])
def test_gae_rejects_parameters_outside_the_unit_interval(gamma, lam):
    r = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="gamma and lam must lie in"):
        gae(r, r, r > 0, gamma, lam)


@pytest.mark.parametrize(("gamma", "lam"), [(0.0, 0.0), (1.0, 1.0), (0.0, 1.0), (1.0, 0.0)])
def test_gae_accepts_the_bounds(gamma, lam):
    r = torch.ones(2, 3)
    adv, _ = gae(r, r, r > 0, gamma, lam, backend="torch")
    assert torch.allclose(adv.double(), ref_gae.gae(r, r, r > 0, gamma, lam)[0])


def test_gae_input_checks():
    r = torch.zeros(2, 3)
    with pytest.raises(TypeError, match="values must be a float"):
        gae(r, r.long(), r > 0)
    with pytest.raises(TypeError, match="rewards must be a float"):
        gae(r[0], r[0], r[0] > 0)
    with pytest.raises(TypeError, match="values must be a float"):
        gae(r, [[0.0] * 3] * 2, r > 0)
    with pytest.raises(ValueError, match="share the shape"):
        gae(r, r, torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="share the shape"):
        gae(r, torch.zeros(3, 3), r > 0)
    with pytest.raises(ValueError, match="backend must be one of"):
        gae(r, r, r > 0, backend="cuda")


@pytest.mark.parametrize(("backend", "triton_runs"), [("torch", False), ("triton", True)])
def test_gae_backend_dispatch(backend, triton_runs, monkeypatch):
    from rlhf_fast import gae as gae_module

    calls = []
    original = gae_module._gae_triton
    monkeypatch.setattr(gae_module, "_gae_triton",
                        lambda *a: calls.append(1) or original(*a))
    r = torch.ones(2, 3)
    gae(r, r, r > 0, 0.5, 0.5, backend=backend)
    assert bool(calls) == triton_runs


def test_documented_defaults():
    # group: eps 1e-6, Bessel std, singleton "zero"; returns / REINFORCE++: gamma 1.
    assert torch.allclose(impl.group_advantages(REWARDS, 4),
                          ref.group_advantages(REWARDS, 4, eps=1e-6, unbiased=True),
                          rtol=1e-6, atol=1e-6)
    assert torch.equal(impl.group_advantages(REWARDS[:2], 1), torch.zeros(2))
    assert torch.allclose(impl.returns_to_go(TOKEN_REWARDS, TOKEN_MASK),
                          ref.returns_to_go(TOKEN_REWARDS, TOKEN_MASK, 1.0), atol=1e-6)
    assert torch.allclose(impl.reinforce_pp_advantages(TOKEN_REWARDS, TOKEN_MASK),
                          ref.reinforce_pp_advantages(TOKEN_REWARDS, TOKEN_MASK, 1.0),
                          atol=1e-5)
    assert torch.allclose(impl.winrate_advantages(REWARDS, 4),
                          ref.winrate_advantages(REWARDS, 4, temperature=1.0), atol=1e-6)
    x = VALUES
    mask = torch.ones_like(x, dtype=torch.bool)
    assert torch.allclose(impl.masked_whiten(x, mask),
                          ref.masked_whiten(x, mask, shift_mean=True, unbiased=True, eps=1e-8),
                          atol=1e-6)


@pytest.mark.parametrize("unbiased", [True, False])
def test_batch_scale_of_two_rewards(unbiased):
    r = torch.tensor([1.0, 4.0])
    got = impl.group_advantages(r, 2, scale="batch", unbiased=unbiased, eps=0.0)
    assert torch.allclose(got, ref.group_advantages(r, 2, scale="batch", unbiased=unbiased,
                                                    eps=0.0))


# Non-contiguous groups of unequal sizes by id: ids 3 (four samples), 0 (three), 7 (two, a
# tie), 5 (one: a singleton).
IDS = torch.tensor([3, 0, 3, 7, 0, 3, 5, 0, 7, 3])
BY_ID = torch.tensor([1.0, 0.5, -2.0, 0.25, 3.0, 0.0, 4.0, -1.0, 0.25, 2.5])


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("singleton", ["zero", "raw"])
def test_group_advantages_by_id(scale, unbiased, singleton):
    kwargs = dict(scale=scale, eps=0.05, unbiased=unbiased, singleton=singleton)
    got = impl.group_advantages(BY_ID, None, group_ids=IDS, **kwargs)
    expected = ref.group_advantages(BY_ID, None, group_ids=IDS, **kwargs)
    assert torch.allclose(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("singleton", ["zero", "raw"])
def test_rloo_and_winrate_by_id(singleton):
    got = impl.rloo_advantages(BY_ID, None, singleton=singleton, group_ids=IDS)
    assert torch.allclose(got, ref.rloo_advantages(BY_ID, None, singleton=singleton,
                                                   group_ids=IDS), atol=1e-6)
    for temperature in (1.0, 0.3):
        got = impl.winrate_advantages(BY_ID, None, temperature=temperature, group_ids=IDS)
        expected = ref.winrate_advantages(BY_ID, None, temperature=temperature, group_ids=IDS)
        assert torch.allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize("by_id", [False, True])
def test_opo_gpg_passk_against_reference(by_id):
    rewards, size, ids = (BY_ID, None, IDS) if by_id else (REWARDS, 4, None)
    lengths = torch.arange(rewards.numel()) % 5 + 1
    got = impl.opo_advantages(rewards, lengths, size, group_ids=ids)
    assert torch.allclose(got, ref.opo_advantages(rewards, lengths, size, group_ids=ids),
                          atol=1e-6)
    got = impl.gpg_advantages(rewards, size, f_norm=0.5, group_ids=ids)
    assert torch.allclose(got, ref.gpg_advantages(rewards, size, f_norm=0.5, group_ids=ids),
                          atol=1e-6)
    for scale in ("group", "none"):
        got = impl.passk_advantages(rewards, size, scale=scale, eps=0.05, group_ids=ids)
        expected = ref.passk_advantages(rewards, size, scale=scale, eps=0.05, group_ids=ids)
        assert torch.allclose(got, expected, atol=1e-6), (scale, got, expected)


def test_gpg_groups_of_one_and_two():
    # A group of one keeps alpha R / f_norm (mean 0), a group of two is centred.
    rewards, ids = torch.tensor([2.0, 1.0, 3.0]), torch.tensor([0, 1, 1])
    got = impl.gpg_advantages(rewards, None, group_ids=ids)
    assert torch.allclose(got, torch.tensor([2.0, -1.0, 1.0]), atol=1e-6)
    assert torch.allclose(ref.gpg_advantages(rewards, None, group_ids=ids), got, atol=1e-6)


@pytest.mark.parametrize("by_id", [False, True])
@pytest.mark.parametrize("with_mask", [False, True])
def test_gdpo_against_reference(by_id, with_mask):
    components = torch.stack([BY_ID if by_id else REWARDS[:10],
                              torch.tensor([0.0, 1.0, 1.0, 0.0, 2.0, 1.0, -1.0, 0.5, 3.0,
                                            1.0])], dim=1)
    size, ids = (None, IDS) if by_id else (5, None)
    weights = torch.tensor([1.0, 0.5])
    mask = (torch.arange(4)[None, :] < (torch.arange(10) % 4 + 1)[:, None]) if with_mask \
        else None
    got = impl.gdpo_advantages(components, size, weights=weights, mask=mask, group_ids=ids)
    expected = ref.gdpo_advantages(components, size, weights=weights, mask=mask,
                                   group_ids=ids)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_gdpo_of_two_samples():
    # One group of two: the batch std of the two summed advantages is taken (Bessel).
    components = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    got = impl.gdpo_advantages(components, 2, weights=torch.tensor([1.0, 2.0]))
    expected = ref.gdpo_advantages(components, 2, weights=torch.tensor([1.0, 2.0]))
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert got.abs().max() < 1.0


def test_sum_pi_squared_by_hand():
    logits = torch.tensor([[0.5, -1.0, 2.0, 0.0], [3.0, 3.0, -2.0, 1.0]])
    for temperature in (1.0, 0.7):
        p = torch.softmax(logits.double() / temperature, -1)
        got = impl.sum_pi_squared(logits, temperature)
        assert torch.allclose(got.double(), (p * p).sum(-1), rtol=1e-6)


@pytest.mark.parametrize("tail", [None, True, False])
def test_optimal_token_baseline_against_reference(tail):
    # Groups by id with a unique longest response (the zero tail) and a singleton.
    g = torch.Generator().manual_seed(4)
    n, steps = 7, 6
    ids = torch.tensor([0, 1, 0, 0, 1, 2, 1])
    lengths = torch.tensor([6, 3, 2, 4, 5, 3, 5])
    mask = torch.arange(steps)[None, :] < lengths[:, None]
    token_rewards = torch.randn(n, steps, generator=g)
    old = -torch.rand(n, steps, generator=g) * 2
    sum_pi_sq = torch.rand(n, steps, generator=g) * 0.5
    kwargs = dict(group_ids=ids) if tail is None else dict(group_ids=ids,
                                                           handle_zero_tail=tail)
    got = impl.optimal_token_baseline_advantages(token_rewards, mask, old, sum_pi_sq, **kwargs)
    expected = ref.optimal_token_baseline_advantages(token_rewards, mask, old, sum_pi_sq,
                                                     **kwargs)
    for a, b in zip(got, expected, strict=True):
        assert torch.allclose(a, b.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("rewards", "ids", "match"), [
    (BY_ID.view(2, 5), IDS.view(2, 5), "rewards must be 1-D"),
    (BY_ID, IDS.bool(), "group_ids must be an integer tensor"),
    (BY_ID, IDS[:5], "group_ids must be an integer tensor"),
    (BY_ID, IDS.float(), "group_ids must be an integer tensor"),
])
def test_bad_group_ids(rewards, ids, match):
    with pytest.raises(ValueError, match=match):
        impl.group_advantages(rewards, None, group_ids=ids)
