"""Value loss, KL controllers, KL-in-reward shaping, overlong penalty, dynamic sampling."""

import math

import pytest
import torch

from rlhf_fast.kl_control import (
    AdaptiveKLController,
    FixedKLController,
    ProportionalKLController,
    kl_penalized_rewards,
)
from rlhf_fast.reward_shaping import DynamicSampling, filter_groups, overlong_penalty
from rlhf_fast.value import value_loss


def test_value_loss_matches_formula_and_gradient():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(3, 5, generator=g, dtype=torch.float64)
    old = values + 0.8 * torch.randn(3, 5, generator=g, dtype=torch.float64)
    returns = torch.randn(3, 5, generator=g, dtype=torch.float64)
    mask = torch.rand(3, 5, generator=g) > 0.3
    v = values.clone().requires_grad_()
    out = value_loss(v, old, returns, mask, clip=0.5)
    out.loss.backward()
    total, grad, clipped, count = 0.0, torch.zeros_like(values), 0, int(mask.sum())
    for b in range(3):
        for t in range(5):
            if not mask[b, t]:
                continue
            vt, ot, rt = values[b, t].item(), old[b, t].item(), returns[b, t].item()
            vc = ot + max(-0.5, min(0.5, vt - ot))
            l1, l2 = (vt - rt) ** 2, (vc - rt) ** 2
            total += 0.5 * max(l1, l2) / count
            clipped += l2 > l1
            # The clipped branch has no gradient where it binds (|v - old| > c).
            binds = l2 > l1 and abs(vt - ot) > 0.5
            grad[b, t] = 0.0 if binds else (vt - rt) / count
    assert math.isclose(out.loss.item(), total, rel_tol=1e-12)
    assert torch.allclose(v.grad, grad, atol=1e-12)
    assert math.isclose(out.clip_frac.item(), clipped / count, rel_tol=1e-6)


def test_value_loss_unclipped_and_seq_mean():
    values = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    out = value_loss(values, values, torch.zeros(2, 3), mask, clip=None,
                     aggregation="seq_mean_token_mean")
    assert math.isclose(out.loss.item(), (0.5 * (1 + 4) / 2 + 0.5 * 9) / 2, rel_tol=1e-6)
    with pytest.raises(ValueError, match="share one shape"):
        value_loss(values, values[:, :2], values, mask)


def test_adaptive_controller_halves_and_doubles():
    ctl = AdaptiveKLController(value=1.0, target=0.01)
    assert ctl.update(0.001) == 0.5         # < target / 1.5
    assert ctl.update(0.01) == 0.5          # inside [target / 1.5, 1.5 * target]
    assert ctl.update(0.02) == 1.0          # > 1.5 * target
    assert ctl.update(0.0066) == 0.5        # just below target / 1.5 = 0.00667
    assert FixedKLController(0.1).update(5.0) == 0.1


def test_proportional_controller():
    ctl = ProportionalKLController(value=0.1, target=0.1, horizon=10_000)
    expected = 0.1
    for kl, n in [(0.2, 256), (0.1, 256), (0.05, 512), (0.0, 100)]:
        error = min(max(kl / 0.1 - 1, -0.2), 0.2)
        expected *= 1 + error * n / 10_000
        assert math.isclose(ctl.update(kl, n), expected, rel_tol=1e-12)


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_penalized_rewards(estimator):
    logp = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-0.3, -0.1, 0.0, 0.0], [-1.0] * 4])
    ref = torch.tensor([[-1.5, -1.0, -0.5, 0.0], [-0.2, -0.4, 0.0, 0.0], [-1.2] * 4])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    scores = torch.tensor([2.0, -1.0, 5.0])
    rewards, kl = kl_penalized_rewards(scores, logp, ref, mask, beta=0.1, estimator=estimator)
    for b in range(3):
        valid = [t for t in range(4) if mask[b, t]]
        for t in range(4):
            x = ref[b, t].item() - logp[b, t].item()
            k = -x if estimator == "k1" else math.exp(x) - 1 - x
            expected = -0.1 * k if t in valid else 0.0
            if valid and t == valid[-1]:
                expected += scores[b].item()
            assert math.isclose(rewards[b, t].item(), expected, abs_tol=1e-6)
    assert (kl[~mask] == 0).all()


def test_overlong_penalty_piecewise():
    lengths = torch.tensor([100, 16384, 18432, 20480, 30000])
    got = overlong_penalty(lengths, max_length=20480, cache_length=4096)
    assert torch.allclose(got, torch.tensor([0.0, 0.0, -0.5, -1.0, -1.0]))
    assert torch.allclose(overlong_penalty(lengths, 20480, 4096, factor=0.5), got * 0.5)
    with pytest.raises(ValueError, match="cache_length <= max_length"):
        overlong_penalty(lengths, 100, 200)


def test_dynamic_sampling_filters_and_fills():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    keep, dropped = filter_groups(rewards, 3)
    assert keep.tolist() == [False, True, False, True] and dropped == 2
    sampler = DynamicSampling(target_groups=3, group_size=3, max_batches=3)
    assert sampler.add(rewards).tolist() == [1, 3] and not sampler.full
    assert sampler.add(rewards).tolist() == [1] and sampler.full
    assert sampler.dropped == 4 and sampler.collected == 3
    empty = DynamicSampling(target_groups=1, group_size=3, max_batches=1)
    empty.add(torch.ones(6))
    with pytest.raises(RuntimeError, match="no full batch after 1 generation batches"):
        empty.add(torch.ones(6))
