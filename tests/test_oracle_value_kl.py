"""Value loss, KL estimators / controllers / KL-in-reward and DAPO's reward shaping against
the independent references, at the boundaries where a wrong comparison or constant shows."""

import math

import pytest
import torch

from rlhf_fast import kl_control, reward_shaping
from rlhf_fast.reference import kl as ref_kl
from rlhf_fast.reference import shaping as ref_shaping
from rlhf_fast.reference import value as ref_value
from rlhf_fast.value import value_loss

G = torch.Generator().manual_seed(5)
VALUES = torch.randn(4, 6, generator=G, dtype=torch.float64)
OLD = VALUES + 0.9 * torch.randn(4, 6, generator=G, dtype=torch.float64)
RETURNS = torch.randn(4, 6, generator=G, dtype=torch.float64)
MASK = torch.rand(4, 6, generator=G) > 0.3
MASK[1] = False
MASK[0, 0] = True


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean",
                                         "seq_mean_token_sum", "seq_mean_token_sum_norm"])
@pytest.mark.parametrize(("normalizer", "max_length"), [(None, None), (4.0, None), (None, 10)])
@pytest.mark.parametrize("clip", [0.4, None])
def test_value_loss_against_reference(aggregation, normalizer, max_length, clip):
    kwargs = dict(clip=clip, aggregation=aggregation, normalizer=normalizer,
                  max_length=max_length)
    v = VALUES.clone().requires_grad_()
    out = value_loss(v, OLD, RETURNS, MASK, **kwargs)
    out.loss.backward()
    vr = VALUES.clone().requires_grad_()
    loss, frac = ref_value.value_loss(vr, OLD, RETURNS, MASK, **kwargs)
    loss.backward()
    assert out.loss.item() == pytest.approx(loss.item(), rel=1e-12)
    assert torch.allclose(v.grad, vr.grad, rtol=1e-12, atol=1e-15)
    assert out.clip_frac.item() == pytest.approx(frac.item(), rel=1e-6)
    if clip is not None:
        assert 0 < frac.item() < 1, "the clipped term wins on some tokens only"


def test_value_loss_default_clip_is_half():
    a = value_loss(VALUES, OLD, RETURNS, MASK).loss
    b = ref_value.value_loss(VALUES, OLD, RETURNS, MASK, clip=0.5)[0]
    assert a.item() == pytest.approx(b.item(), rel=1e-12)


def test_value_loss_empty_mask_and_checks():
    out = value_loss(VALUES, OLD, RETURNS, torch.zeros_like(MASK))
    assert out.loss.item() == 0.0 and out.clip_frac.item() == 0.0
    for bad in (0.0, -0.5):
        with pytest.raises(ValueError, match="clip must be None or > 0"):
            value_loss(VALUES, OLD, RETURNS, MASK, clip=bad)
    for args in ((VALUES, OLD[:, :5], RETURNS, MASK), (VALUES, OLD, RETURNS[:3], MASK),
                 (VALUES, OLD, RETURNS, MASK[:, :5])):
        with pytest.raises(ValueError, match="share one shape"):
            value_loss(*args)


LOGP = torch.tensor([[-1.0, -2.0, -0.5, -0.1], [-0.3, -3.0, -1.2, -0.7]], dtype=torch.float64)
REF = torch.tensor([[-1.5, -0.5, -0.5, -2.6], [-0.2, -0.4, -2.0, -0.6]], dtype=torch.float64)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_token_kl(estimator):
    got = kl_control.token_kl(LOGP, REF, estimator)
    assert torch.allclose(got, ref_kl.token_kl(LOGP, REF, estimator), rtol=1e-12)
    x = (REF - LOGP)[0, 1].item()  # log(ref / pi) = 1.5
    by_hand = {"k1": -x, "k2": x * x / 2, "k3": math.exp(x) - 1 - x}[estimator]
    assert got[0, 1].item() == pytest.approx(by_hand, rel=1e-12)


def test_token_kl_default_and_unknown():
    assert torch.equal(kl_control.token_kl(LOGP, REF), LOGP - REF)
    with pytest.raises(ValueError, match="estimator must be"):
        kl_control.token_kl(LOGP, REF, "k4")


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_kl_penalized_rewards(estimator, beta):
    mask = torch.tensor([[1, 1, 0, 1], [0, 0, 0, 0]], dtype=torch.bool)
    scores = torch.tensor([2.0, -1.0])
    rewards, kl = kl_control.kl_penalized_rewards(scores, LOGP, REF, mask, beta,
                                                  estimator=estimator)
    ref_rewards, ref_kl_values = ref_kl.kl_penalized_rewards(scores, LOGP, REF, mask, beta,
                                                             estimator)
    assert torch.allclose(rewards.double(), ref_rewards, atol=1e-6)
    assert torch.allclose(kl.double(), ref_kl_values, atol=1e-6)


@pytest.mark.parametrize("target", [0.01, 0.3])
def test_adaptive_controller_at_the_edges(target):
    for kl in (0.0, target / 1.5 * 0.999, target / 1.5, target, target * 1.5,
               target * 1.5 * 1.001, 10 * target):
        ctl = kl_control.AdaptiveKLController(value=0.4, target=target)
        assert ctl.update(kl) == ref_kl.adaptive_kl_update(0.4, kl, target)
        assert ctl.value == ref_kl.adaptive_kl_update(0.4, kl, target)


@pytest.mark.parametrize("kl", [0.0, 0.079, 0.08, 0.09, 0.1, 0.11, 0.12, 0.121, 0.5])
@pytest.mark.parametrize("n_steps", [1, 64])
def test_proportional_controller(kl, n_steps):
    ctl = kl_control.ProportionalKLController(value=0.2, target=0.1, horizon=100.0)
    assert ctl.update(kl, n_steps) == pytest.approx(
        ref_kl.proportional_kl_update(0.2, kl, 0.1, n_steps, 100.0), rel=1e-12)
    default = kl_control.ProportionalKLController(value=0.2, target=0.1)
    assert default.update(kl, n_steps) == pytest.approx(
        ref_kl.proportional_kl_update(0.2, kl, 0.1, n_steps, 10_000.0), rel=1e-12)


def test_fixed_controller():
    ctl = kl_control.FixedKLController(0.3)
    assert ctl.update(100.0, 5) == 0.3 and ctl.value == 0.3


LENGTHS = torch.tensor([0, 99, 100, 101, 150, 199, 200, 201, 5000])


@pytest.mark.parametrize(("max_length", "cache_length"), [(200, 100), (200, 200), (200, 1)])
@pytest.mark.parametrize("factor", [1.0, 0.5])
def test_overlong_penalty(max_length, cache_length, factor):
    got = reward_shaping.overlong_penalty(LENGTHS, max_length, cache_length, factor)
    expected = ref_shaping.overlong_penalty(LENGTHS, max_length, cache_length, factor)
    assert torch.allclose(got, expected, atol=1e-7)


@pytest.mark.parametrize(("max_length", "cache_length"), [(100, 0), (100, 101), (100, -5)])
def test_overlong_penalty_checks(max_length, cache_length):
    with pytest.raises(ValueError, match="cache_length <= max_length"):
        reward_shaping.overlong_penalty(LENGTHS, max_length, cache_length)


def test_filter_groups_and_dynamic_sampling():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 2.0, 2.0, 2.0, 0.0, 0.0, 0.0,
                            3.0, 1.0, 3.0])
    keep, dropped = reward_shaping.filter_groups(rewards, 3)
    assert keep.tolist() == ref_shaping.keep_groups(rewards, 3)
    assert dropped == 2
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        reward_shaping.filter_groups(rewards, 4)
    sampler = reward_shaping.DynamicSampling(target_groups=4, group_size=3, max_batches=2)
    assert sampler.add(rewards).tolist() == [0, 1, 4]
    assert (sampler.collected, sampler.dropped, sampler.batches, sampler.full) == (3, 2, 1,
                                                                                   False)
    assert sampler.add(rewards).tolist() == [0]
    assert sampler.full and sampler.collected == 4 and sampler.dropped == 4
    with pytest.raises(RuntimeError, match="already full"):
        sampler.add(rewards)
    stuck = reward_shaping.DynamicSampling(target_groups=2, group_size=3, max_batches=1)
    stuck.add(torch.zeros(6))
    with pytest.raises(RuntimeError, match="no full batch after 1"):
        stuck.add(rewards)


def test_value_loss_one_valid_token():
    # One token whose clipped term is the larger: loss, gradient 0 and clip fraction 1.
    values = torch.tensor([[2.0, 0.0]], dtype=torch.float64, requires_grad=True)
    old, returns = torch.tensor([[0.0, 0.0]]), torch.tensor([[3.0, 0.0]])
    mask = torch.tensor([[True, False]])
    out = value_loss(values, old, returns, mask, clip=0.5)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(0.5 * (0.5 - 3.0) ** 2)
    assert out.clip_frac.item() == 1.0 and values.grad.abs().sum() == 0


def test_score_lands_on_a_first_and_only_token():
    logp, ref = torch.zeros(2, 3), torch.zeros(2, 3)
    mask = torch.tensor([[True, False, False], [False, False, True]])
    rewards, _ = kl_control.kl_penalized_rewards(torch.tensor([2.0, -1.0]), logp, ref, mask,
                                                 0.1)
    assert rewards.tolist() == [[2.0, 0.0, 0.0], [0.0, 0.0, -1.0]]


def test_proportional_controller_default_is_one_step():
    ctl = kl_control.ProportionalKLController(value=0.2, target=0.1, horizon=10.0)
    assert ctl.update(0.5) == pytest.approx(ref_kl.proportional_kl_update(0.2, 0.5, 0.1, 1,
                                                                           10.0), rel=1e-12)


def test_dynamic_sampling_gives_up_after_ten_batches_by_default():
    sampler = reward_shaping.DynamicSampling(target_groups=1, group_size=2)
    for _ in range(10):  # DAPO's max_num_gen_batches = 10
        assert sampler.add(torch.zeros(4)).numel() == 0
    with pytest.raises(RuntimeError, match="no full batch after 10"):
        sampler.add(torch.zeros(4))
