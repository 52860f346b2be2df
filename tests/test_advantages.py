"""Advantage estimators against plain Python loops over groups and tokens."""

import math
import statistics

import pytest
import torch

from rlhf_fast.advantages import (
    GROUP_PRESETS,
    group_advantages,
    masked_whiten,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    returns_to_go,
    rloo_advantages,
    winrate_advantages,
)

REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 3.0, -1.0, 2.0, 0.25])
G = 4


def groups(values):
    return [values[i:i + G] for i in range(0, len(values), G)]


def loop_group(rewards, scale, eps, unbiased):
    r = rewards.tolist()
    std_fn = statistics.stdev if unbiased else statistics.pstdev
    batch_std = std_fn(r)
    out = []
    for group in groups(r):
        mean = sum(group) / len(group)
        std = {"group": std_fn(group), "batch": batch_std, "none": None}[scale]
        out += [(x - mean) if std is None else (x - mean) / (std + eps) for x in group]
    return torch.tensor(out)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("unbiased", [True, False])
def test_group_advantages(scale, unbiased):
    got = group_advantages(REWARDS, G, scale=scale, eps=1e-6, unbiased=unbiased)
    assert torch.allclose(got, loop_group(REWARDS, scale, 1e-6, unbiased), atol=1e-6)
    assert (got[4:8] == 0).all(), "an all-equal group has no signal"


@pytest.mark.parametrize("preset", sorted(GROUP_PRESETS))
def test_framework_presets(preset):
    eps = {"trl": 1e-4, "verl": 1e-6, "openrlhf": 1e-9}[preset]
    got = group_advantages(REWARDS, G, preset=preset)
    assert torch.allclose(got, loop_group(REWARDS, "group", eps, True), atol=1e-6)


def test_singleton_groups():
    r = torch.tensor([2.0, -1.0])
    assert (group_advantages(r, 1, preset="trl") == 0).all()
    assert torch.allclose(group_advantages(r, 1, preset="verl"), r / (1 + 1e-6))
    assert (rloo_advantages(r, 1) == 0).all() and (winrate_advantages(r, 1) == 0).all()


def test_rloo():
    out = []
    for group in groups(REWARDS.tolist()):
        for i, x in enumerate(group):
            others = group[:i] + group[i + 1:]
            out.append(x - sum(others) / len(others))
    assert torch.allclose(rloo_advantages(REWARDS, G), torch.tensor(out), atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_winrate(temperature):
    out = []
    for group in groups(REWARDS.tolist()):
        for i, x in enumerate(group):
            wins = [1 / (1 + math.exp(-(x - y) / temperature))
                    for j, y in enumerate(group) if j != i]
            out.append(sum(wins) / len(wins) - 0.5)
    got = winrate_advantages(REWARDS, G, temperature=temperature)
    assert torch.allclose(got, torch.tensor(out), atol=1e-6)
    assert torch.allclose(got.view(-1, G).sum(-1), torch.zeros(3), atol=1e-6)


@pytest.mark.parametrize("group_size", [4, 8, 16])
def test_winrate_binary_is_scaled_dr_grpo(group_size):
    r = (torch.rand(5 * group_size, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    got = winrate_advantages(r, group_size)
    centred = group_advantages(r, group_size, scale="none")
    factor = (1 / (1 + math.exp(-1)) - 0.5) * group_size / (group_size - 1)
    assert torch.allclose(got, factor * centred, atol=1e-6)


def test_bad_group_shapes():
    with pytest.raises(ValueError, match="not a multiple of group_size=5"):
        group_advantages(REWARDS, 5)
    with pytest.raises(ValueError, match="rewards must be 1-D"):
        group_advantages(REWARDS.view(3, 4), 4)
    with pytest.raises(ValueError, match="unknown preset"):
        group_advantages(REWARDS, G, preset="ray")


def loop_whiten(values, mask, unbiased=True, eps=1e-8):
    picked = [v for v, m in zip(values.flatten().tolist(), mask.flatten().tolist(), strict=True)
              if m]
    mean = sum(picked) / len(picked)
    var = sum((v - mean) ** 2 for v in picked) / (len(picked) - (1 if unbiased else 0))
    return torch.where(mask, (values - mean) / math.sqrt(var + eps), torch.zeros_like(values))


@pytest.mark.parametrize("unbiased", [True, False])
def test_masked_whiten(unbiased):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, generator=g) * 3 + 2
    mask = torch.rand(3, 7, generator=g) > 0.3
    got = masked_whiten(x, mask, unbiased=unbiased)
    assert torch.allclose(got, loop_whiten(x, mask, unbiased), atol=1e-5)
    assert (masked_whiten(x, torch.zeros_like(mask)) == 0).all()


def loop_returns(rewards, mask, gamma):
    out = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        running = 0.0
        for t in reversed(range(rewards.shape[1])):
            if mask[b, t]:
                running = rewards[b, t].item() + gamma * running
                out[b, t] = running
    return out


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_returns_and_reinforce_pp(backend, gamma, monkeypatch):
    monkeypatch.setenv("RLHF_FAST_BACKEND", backend)
    g = torch.Generator().manual_seed(2)
    r = torch.randn(4, 9, generator=g)
    mask = torch.rand(4, 9, generator=g) > 0.3
    mask[2] = False
    expected = loop_returns(r, mask, gamma)
    assert torch.allclose(returns_to_go(r, mask, gamma), expected, atol=1e-6)
    assert torch.allclose(reinforce_pp_advantages(r, mask, gamma),
                          loop_whiten(expected, mask), atol=1e-5)


def test_reinforce_pp_baseline():
    mask = torch.ones(12, 5, dtype=torch.bool)
    mask[3, 2:] = False
    got = reinforce_pp_baseline_advantages(REWARDS, G, mask)
    centred = loop_group(REWARDS, "none", 0, True).unsqueeze(-1).expand(12, 5)
    assert torch.allclose(got, loop_whiten(centred.contiguous(), mask), atol=1e-5)
