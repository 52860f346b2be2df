"""The implementation's detached per-token weights (``rlhf_fast.loss_weights``) against the
independent reference and against numbers worked out by hand: aggregation denominators
(every aggregation, ``normalizer``, ``max_length``, empty sequences, an empty batch), AEPO's
entropy z-score (Bessel's std, a zero or undefined std), the top-entropy mask (which end it
keeps, ties), and the rollout-correction weights (direction, truncate vs mask, clamp)."""

import math
import statistics

import pytest
import torch

from rlhf_fast import PolicyLossConfig, loss_weights
from rlhf_fast.reference import aggregation, entropy, rollout
from rlhf_fast.reference import selection as selection_reference

AGGREGATIONS = ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum",
                "seq_mean_token_sum_norm"]
# Sequence 1 is empty and sits between two others; lengths 3, 0, 1, 2 out of T = 4.
MASK = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 1]],
                    dtype=torch.float64)
VALUES = torch.tensor([[1.0, -2.0, 4.0, 9.0], [5.0, 5.0, 5.0, 5.0], [7.0, -3.0, 7.0, 7.0],
                       [0.5, 8.0, 8.0, 1.5]], dtype=torch.float64)


def by_hand(aggregation_name, normalizer=None, max_length=None):
    """The aggregations of VALUES over MASK, written out."""
    seq_sums = [1 - 2 + 4, 0.0, -3.0, 0.5 + 1.5]
    lengths = [3, 0, 1, 2]
    if aggregation_name == "token_mean":
        return sum(seq_sums) / (normalizer or 6)
    if aggregation_name == "seq_mean_token_mean":
        means = [s / n for s, n in zip(seq_sums, lengths, strict=True) if n]
        return sum(means) / (normalizer or 3)
    if aggregation_name == "seq_mean_token_sum":
        return sum(seq_sums) / (normalizer or 3)
    return sum(seq_sums) / (normalizer or 4 * (max_length or 4))


@pytest.mark.parametrize("aggregation_name", AGGREGATIONS)
@pytest.mark.parametrize(("normalizer", "max_length"), [(None, None), (5.0, None),
                                                        (None, 7), (2.5, 7)])
def test_aggregation_by_hand_and_against_reference(aggregation_name, normalizer, max_length):
    expected = by_hand(aggregation_name, normalizer, max_length)
    reference = aggregation.aggregate(VALUES, MASK, aggregation_name, normalizer, max_length)
    assert reference.item() == pytest.approx(expected, rel=1e-12)
    w = loss_weights.aggregation_weights(MASK, aggregation_name, normalizer, max_length)
    assert (w * VALUES).sum().item() == pytest.approx(expected, rel=1e-12)
    assert (w[MASK == 0] == 0).all(), "masked positions weigh nothing"


@pytest.mark.parametrize("aggregation_name", AGGREGATIONS)
def test_empty_batch_aggregates_to_zero(aggregation_name):
    mask = torch.zeros(3, 4, dtype=torch.float64)
    w = loss_weights.aggregation_weights(mask, aggregation_name)
    assert torch.isfinite(w).all() and (w == 0).all()
    assert aggregation.aggregate(VALUES[:3], mask, aggregation_name).item() == 0.0


def test_one_token_sequence_weighs_one():
    # A sequence of one token among others: its per-sequence mean is the token itself.
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    w = loss_weights.aggregation_weights(mask, "seq_mean_token_mean")
    assert torch.allclose(w, torch.tensor([[0.5, 0.0, 0.0], [1 / 6, 1 / 6, 1 / 6]],
                                          dtype=torch.float64), rtol=1e-12)


def test_sequence_count():
    m = MASK
    assert loss_weights.sequence_count(m, PolicyLossConfig()).item() == 3
    assert loss_weights.sequence_count(m, PolicyLossConfig(normalizer=4.5)).item() == 4.5
    assert loss_weights.sequence_count(torch.zeros(2, 3), PolicyLossConfig()).item() == 1


ENTROPY = torch.tensor([[0.5, 2.0, 1.0, 9.0], [3.0, 0.1, 0.2, 0.3]], dtype=torch.float64)
ENTROPY_MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 1]], dtype=torch.float64)
VALID = [0.5, 2.0, 1.0, 3.0, 0.3]


def test_entropy_statistics_use_bessel_std_over_valid_tokens():
    stats = loss_weights.entropy_statistics(ENTROPY, ENTROPY_MASK, 0.4)
    assert stats["mean"].item() == pytest.approx(statistics.mean(VALID), rel=1e-12)
    assert stats["std"].item() == pytest.approx(statistics.stdev(VALID), rel=1e-12)
    assert stats["std"].item() != pytest.approx(statistics.pstdev(VALID), rel=1e-3)
    # The 0.6 quantile of 5 values, linearly interpolated: position 2.4 of the sorted list.
    ordered = sorted(VALID)
    expected = ordered[2] + 0.4 * (ordered[3] - ordered[2])
    assert stats["threshold"].item() == pytest.approx(expected, rel=1e-12)
    assert entropy.linear_quantile(VALID, 0.6) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("alpha", [0.2, 1.5])
def test_entropy_advantage_against_reference_and_by_hand(alpha):
    adv = torch.tensor([[1.0, -2.0, 0.5, 3.0], [-1.0, 4.0, 2.0, 0.7]], dtype=torch.float64)
    got = loss_weights.entropy_advantage(adv, ENTROPY, ENTROPY_MASK, alpha)
    expected = entropy.entropy_advantage(adv, ENTROPY, ENTROPY_MASK, alpha)
    assert torch.allclose(got, expected, rtol=1e-12, atol=0)
    mean, std = statistics.mean(VALID), statistics.stdev(VALID)
    assert got[1, 0].item() == pytest.approx(-1.0 * (1 + alpha * (3.0 - mean) / std))


@pytest.mark.parametrize("valid", [[0.7], [1.5, 1.5, 1.5], []])
def test_entropy_zscore_with_zero_or_undefined_std_divides_by_one(valid):
    h = torch.tensor([[*valid, 4.0]], dtype=torch.float64)
    m = torch.tensor([[1.0] * len(valid) + [0.0]], dtype=torch.float64)
    adv = torch.ones_like(h)
    got = loss_weights.entropy_advantage(adv, h, m, 0.5)
    mean = statistics.mean(valid) if valid else 0.0
    expected = 1 + 0.5 * (h - mean)
    assert torch.allclose(got, expected, rtol=1e-12)
    assert torch.allclose(entropy.entropy_advantage(adv, h, m, 0.5), expected, rtol=1e-12)


@pytest.mark.parametrize("quantile", [0.2, 0.4, 0.5, 1.0])
def test_top_entropy_mask_keeps_the_high_end(quantile):
    got = loss_weights.top_entropy_mask(ENTROPY, ENTROPY_MASK, quantile)
    expected = entropy.top_entropy_mask(ENTROPY, ENTROPY_MASK, quantile)
    assert torch.equal(got, expected)
    # The highest valid entropy (3.0) is always kept; the lowest (0.3) only with rho = 1.
    assert got[1, 0] == 1.0
    assert got[1, 3] == (1.0 if quantile == 1.0 else 0.0)
    kept = [h for h, k in zip(ENTROPY.flatten().tolist(), got.flatten().tolist(), strict=True)
            if k and h in VALID]
    assert len(kept) == max(1, math.ceil(quantile * len(VALID) - 1e-9))


def test_top_entropy_mask_keeps_ties_at_the_threshold():
    h = torch.tensor([[1.0, 2.0, 2.0, 2.0, 5.0]], dtype=torch.float64)
    m = torch.ones_like(h)
    got = loss_weights.top_entropy_mask(h, m, 0.5)  # threshold = median = 2.0
    assert got.tolist() == [[0.0, 1.0, 1.0, 1.0, 1.0]]
    assert torch.equal(entropy.top_entropy_mask(h, m, 0.5), got)
    assert torch.equal(loss_weights.top_entropy_mask(h, m, None), torch.ones_like(h))
    assert torch.equal(loss_weights.top_entropy_mask(h, torch.zeros_like(h), 0.5),
                       torch.ones_like(h))


OLD = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -3.0, -1.0]], dtype=torch.float64)
# old - rollout = log 1.5, log 3, -log 2 ; log 1.2, 25 (clamped), log 1.1
ROLLOUT = OLD - torch.tensor([[math.log(1.5), math.log(3.0), -math.log(2.0)],
                              [math.log(1.2), 25.0, math.log(1.1)]], dtype=torch.float64)
ROLLOUT_MASK = torch.tensor([[1, 1, 1], [1, 0, 1]], dtype=torch.float64)


@pytest.mark.parametrize("correction", ["token_truncate", "token_mask", "sequence_truncate",
                                        "sequence_mask"])
def test_rollout_weights_direction_and_cap(correction):
    config = PolicyLossConfig(rollout_correction=correction, rollout_cap=2.0)
    got = loss_weights.rollout_weights(OLD, ROLLOUT, ROLLOUT_MASK, config)
    expected = rollout.rollout_weights(OLD, ROLLOUT, ROLLOUT_MASK, config)
    assert torch.allclose(got, expected, rtol=1e-12)
    if correction == "token_truncate":  # min(pi_old / pi_rollout, 2)
        hand = [[1.5, 2.0, 0.5], [1.2, 2.0, 1.1]]
    elif correction == "token_mask":  # pi_old / pi_rollout, 0 above 2
        hand = [[1.5, 0.0, 0.5], [1.2, 0.0, 1.1]]
    else:  # the product over the valid tokens: 1.5 * 3 * 0.5 = 2.25 ; 1.2 * 1.1 = 1.32
        first = min(2.25, 2.0) if correction.endswith("truncate") else 0.0
        hand = [[first] * 3, [1.32] * 3]
    assert torch.allclose(got, torch.tensor(hand, dtype=torch.float64), rtol=1e-12)


def test_rollout_weight_at_the_cap_is_kept_by_the_mask():
    old = torch.zeros(1, 2, dtype=torch.float64)
    rollout_logp = torch.tensor([[-math.log(2.0), -math.log(2.0) - 1e-9]], dtype=torch.float64)
    config = PolicyLossConfig(rollout_correction="token_mask", rollout_cap=2.0)
    got = loss_weights.rollout_weights(old, rollout_logp, torch.ones_like(old), config)
    assert got[0, 0].item() == pytest.approx(2.0) and got[0, 1].item() == 0.0


def test_rollout_log_ratio_clamp():
    config = PolicyLossConfig(rollout_correction="token_truncate", rollout_cap=1e9,
                              log_ratio_clamp=0.5)
    old = torch.tensor([[0.0, 0.0, 0.0]], dtype=torch.float64)
    rollout_logp = torch.tensor([[-2.0, 2.0, -0.25]], dtype=torch.float64)
    got = loss_weights.rollout_weights(old, rollout_logp, torch.ones_like(old), config)
    expected = torch.exp(torch.tensor([[0.5, -0.5, 0.25]], dtype=torch.float64))
    assert torch.allclose(got, expected, rtol=1e-12)
    unclamped = loss_weights.rollout_weights(old, rollout_logp, torch.ones_like(old),
                                             config.replace(log_ratio_clamp=None))
    assert torch.allclose(unclamped, torch.exp(-rollout_logp), rtol=1e-12)
    off = loss_weights.rollout_weights(old, rollout_logp, torch.ones_like(old),
                                       PolicyLossConfig())
    assert (off == 1).all()


@pytest.mark.parametrize("aggregation_name", ["seq_mean_token_mean", "seq_mean_token_sum"])
def test_a_single_non_empty_sequence_is_the_mean(aggregation_name):
    mask = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    values = torch.tensor([[9.0, 9.0, 9.0], [1.0, 3.0, 9.0]], dtype=torch.float64)
    w = loss_weights.aggregation_weights(mask, aggregation_name)
    expected = 2.0 if aggregation_name == "seq_mean_token_mean" else 4.0
    assert (w * values).sum().item() == pytest.approx(expected, rel=1e-12)
    assert aggregation.aggregate(values, mask, aggregation_name).item() == \
        pytest.approx(expected, rel=1e-12)


def test_entropy_zscore_of_two_tokens():
    h = torch.tensor([[0.5, 2.0, 7.0]], dtype=torch.float64)
    m = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    adv = torch.ones_like(h)
    got = loss_weights.entropy_advantage(adv, h, m, 0.5)
    std = statistics.stdev([0.5, 2.0])
    assert torch.allclose(got, 1 + 0.5 * (h - 1.25) / std, rtol=1e-12)
    assert torch.allclose(entropy.entropy_advantage(adv, h, m, 0.5), got, rtol=1e-12)


@pytest.mark.parametrize("correction", ["token_truncate", "token_mask", "sequence_truncate",
                                        "sequence_mask"])
def test_rollout_normalize_with_one_counted_unit(correction):
    # One valid token (token modes) or one non-empty sequence (sequence modes): the batch
    # mean is that unit's own weight, so the normalised weight there is exactly 1.
    old = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    rollout_logp = torch.tensor([[-0.5, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    config = PolicyLossConfig(rollout_correction=correction, rollout_cap=2.0,
                              rollout_normalize=True)
    got = loss_weights.rollout_weights(old, rollout_logp, mask, config)
    expected = rollout.rollout_weights(old, rollout_logp, mask, config)
    assert got[0, 0].item() == pytest.approx(1.0, rel=1e-12)
    assert torch.allclose(got * mask, expected * mask, rtol=1e-12)


# Advantages with a non-zero mean and log-probs whose covariances are distinct, so the
# ranking depends on both batch means; position [1, 2] is masked.
COV_ADV = torch.tensor([[2.0, 0.5, 3.0, -1.0], [1.5, 4.0, 9.0, 0.25]], dtype=torch.float64)
COV_LOGP = torch.tensor([[-0.5, -2.0, -1.25, -3.0], [-0.75, -0.25, -8.0, -1.75]],
                        dtype=torch.float64)
COV_MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 1]], dtype=torch.float64)


@pytest.mark.parametrize(("selection", "ratio", "lower", "upper"),
                         [("kl_cov", 0.3, 1.0, 5.0), ("kl_cov", 0.5, 1.0, 5.0),
                          ("clip_cov", 1.0, -0.5, 0.75), ("clip_cov", 0.3, -10.0, 10.0)])
def test_covariance_selection_against_reference(selection, ratio, lower, upper):
    config = PolicyLossConfig(cov_selection=selection, cov_ratio=ratio, cov_lower=lower,
                              cov_upper=upper)
    eligible = torch.tensor([[1, 1, 0, 1], [1, 1, 1, 1]], dtype=torch.bool)
    torch.manual_seed(3)
    got = loss_weights.covariance_selection(COV_ADV, COV_LOGP, COV_MASK, eligible, config)
    torch.manual_seed(3)
    expected = selection_reference.covariance_selection(COV_ADV, COV_LOGP, COV_MASK, eligible,
                                                        config)
    assert torch.equal(got, expected), (got, expected)
    assert 0 < got.sum() < COV_MASK.sum(), "a selection of some tokens, not none or all"


def test_dppo_kl_keeps_a_token_exactly_on_the_bound():
    # p > p_old with A > 0 and A < 0: the binary KL written out here (the same float64
    # operations) is the bound itself, and the trust region is closed: the token is kept.
    logp = torch.tensor([[-0.5, -0.5]], dtype=torch.float64)
    old = torch.tensor([[-1.0, -1.0]], dtype=torch.float64)
    adv = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    p, q = torch.exp(logp), torch.exp(old)
    binary_kl = q * (old - logp) + (1 - q) * torch.log((1.0 - q + 1e-8) / (1.0 - p + 1e-8))
    bound = float(binary_kl[0, 0])
    assert bound > 0
    on_bound = PolicyLossConfig(objective="dppo_kl", clip_eps_high=bound, clip_eps_low=0.0)
    assert loss_weights.dppo_keep(logp, old, adv, on_bound).tolist() == [[1.0, 1.0]]
    below = on_bound.replace(clip_eps_high=math.nextafter(bound, 0.0))
    assert loss_weights.dppo_keep(logp, old, adv, below).tolist() == [[0.0, 1.0]]


def test_rollout_normalize_leaves_a_mean_at_the_threshold():
    # One token whose weight the floor lifts to exactly the threshold 1e-8 (verl divides only
    # by a batch mean above it): the weight stays 1e-8, as in the reference.
    old = torch.zeros(1, 2, dtype=torch.float64)
    rollout_logp = torch.tensor([[30.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    config = PolicyLossConfig(rollout_correction="token_truncate", rollout_cap=2.0,
                              rollout_floor=1e-8, rollout_normalize=True,
                              log_ratio_clamp=None)
    got = loss_weights.rollout_weights(old, rollout_logp, mask, config)
    assert got[0, 0].item() == 1e-8
    assert rollout.rollout_weights(old, rollout_logp, mask, config)[0, 0].item() == 1e-8
