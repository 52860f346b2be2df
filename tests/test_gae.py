"""GAE, Triton kernel and torch path, against the recursion written as a Python loop."""

import pytest
import torch

from rlhf_fast.gae import gae


def loop_gae(rewards, values, mask, gamma, lam):
    """The recursion per sequence over its valid tokens only (masked ones are skipped)."""
    adv = torch.zeros_like(rewards, dtype=torch.float64)
    ret = torch.zeros_like(adv)
    for b in range(rewards.shape[0]):
        next_value, next_adv = 0.0, 0.0
        for t in reversed(range(rewards.shape[1])):
            if not mask[b, t]:
                continue
            r, v = rewards[b, t].item(), values[b, t].item()
            a = r + gamma * next_value - v + gamma * lam * next_adv
            adv[b, t], ret[b, t] = a, a + v
            next_value, next_adv = v, a
    return adv, ret


def problem(batch, steps, seed=0, p_mask=0.3):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(batch, steps, generator=g)
    values = torch.randn(batch, steps, generator=g)
    mask = torch.rand(batch, steps, generator=g) > p_mask
    return rewards, values, mask


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 1.0), (0.99, 0.95), (1.0, 0.0), (0.5, 1.0)])
@pytest.mark.parametrize(("batch", "steps"), [(3, 1), (5, 17), (70, 9)])
def test_matches_loop(backend, gamma, lam, batch, steps):
    rewards, values, mask = problem(batch, steps)
    adv, ret = gae(rewards, values, mask, gamma, lam, backend=backend)
    ref_adv, ref_ret = loop_gae(rewards, values, mask, gamma, lam)
    assert adv.dtype == torch.float32 and adv.shape == rewards.shape
    assert torch.allclose(adv.double(), ref_adv, atol=1e-6, rtol=0)
    assert torch.allclose(ret.double(), ref_ret, atol=1e-6, rtol=0)


def test_tool_tokens_in_the_middle_are_transparent(backend):
    # Tokens 2-4 are a tool's output: removing them must not change the others' advantages.
    rewards, values, _ = problem(2, 8, seed=3)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[:, 2:5] = False
    adv, ret = gae(rewards, values, mask, 0.9, 0.8, backend=backend)
    keep = mask[0]
    compact_adv, _ = gae(rewards[:, keep], values[:, keep], mask[:, keep], 0.9, 0.8,
                         backend=backend)
    assert torch.allclose(adv[:, keep], compact_adv, atol=1e-6)
    assert (adv[:, 2:5] == 0).all() and (ret[:, 2:5] == 0).all()


def test_lambda_one_is_reward_to_go_minus_value(backend):
    rewards, values, mask = problem(4, 6, seed=4, p_mask=0.0)
    adv, ret = gae(rewards, values, mask, 1.0, 1.0, backend=backend)
    to_go = rewards.flip(-1).cumsum(-1).flip(-1)
    assert torch.allclose(adv, to_go - values, atol=1e-5)
    assert torch.allclose(ret, to_go, atol=1e-5)


def test_lambda_zero_is_td_residual(backend):
    rewards, values, mask = problem(4, 6, seed=5, p_mask=0.0)
    adv, _ = gae(rewards, values, mask, 0.9, 0.0, backend=backend)
    next_values = torch.cat([values[:, 1:], torch.zeros(4, 1)], dim=1)
    assert torch.allclose(adv, rewards + 0.9 * next_values - values, atol=1e-6)


def test_empty_masks_and_empty_batch(backend):
    rewards, values, _ = problem(3, 5)
    adv, ret = gae(rewards, values, torch.zeros(3, 5, dtype=torch.bool), backend=backend)
    assert (adv == 0).all() and (ret == 0).all()
    adv, ret = gae(torch.zeros(0, 5), torch.zeros(0, 5), torch.zeros(0, 5), backend=backend)
    assert adv.shape == (0, 5)


def test_bad_input():
    rewards, values, mask = problem(2, 3)
    with pytest.raises(ValueError, match="share the shape"):
        gae(rewards, values[:, :2], mask)
    with pytest.raises(ValueError, match="gamma and lam must lie in"):
        gae(rewards, values, mask, gamma=1.5)
    with pytest.raises(TypeError, match="rewards must be a float"):
        gae(rewards.long(), values, mask)
