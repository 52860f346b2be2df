"""Input checks at their edges: the float-dtype checks of old / ref / rollout log-probs
(an integer or bool tensor is an error, every float dtype is accepted and read as float32),
shapes in the batched and flat layouts, devices, masks, targets at 0, V - 1, V and -1."""

import math

import pytest
import torch

import rlhf_fast
from rlhf_fast import validation

B, T, V = 2, 3, 7
LOGITS = torch.randn(B, T, V, generator=torch.Generator().manual_seed(0))
TARGETS = torch.tensor([[0, 6, 3], [1, 2, 6]])
MASK = torch.ones(B, T, dtype=torch.bool)
ADV = torch.tensor([1.0, -1.0])
SIDE = ("old_logprobs", "ref_logprobs", "rollout_logprobs")


def call(**kwargs):
    args = dict(config="dapo", rollout_correction="token_truncate", kl_coef=0.1,
                backend="torch", old_logprobs=torch.zeros(B, T), ref_logprobs=torch.zeros(B, T),
                rollout_logprobs=torch.zeros(B, T))
    args.update(kwargs)
    logits = args.pop("logits", LOGITS)
    targets = args.pop("targets", TARGETS)
    return rlhf_fast.policy_loss(logits, targets, args.pop("advantages", ADV),
                                 args.pop("mask", MASK), **args)


@pytest.mark.parametrize("name", SIDE)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.uint8])
def test_side_log_probs_must_be_float(name, dtype):
    with pytest.raises(TypeError, match=f"{name} must be None or a float tensor"):
        call(**{name: torch.zeros(B, T, dtype=dtype)})


@pytest.mark.parametrize("name", SIDE)
def test_side_log_probs_not_a_tensor(name):
    with pytest.raises(TypeError, match=name):
        call(**{name: [[0.0] * T] * B})


@pytest.mark.parametrize("name", SIDE)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_side_log_probs_of_any_float_dtype_are_read_as_float32(name, dtype):
    value = torch.full((B, T), -0.75)
    expected = call(**{name: value})
    got = call(**{name: value.to(dtype)})
    assert got.loss.item() == pytest.approx(expected.loss.item(), rel=1e-6)


@pytest.mark.parametrize("name", SIDE)
def test_side_log_probs_shape_and_device(name):
    with pytest.raises(ValueError, match=rf"{name} must have shape \(2, 3\)"):
        call(**{name: torch.zeros(B, T + 1)})
    with pytest.raises(ValueError, match=rf"{name} must have shape \(2, 3\)"):
        call(**{name: torch.zeros(T, B)})
    with pytest.raises(ValueError, match=f"{name} is on meta"):
        call(**{name: torch.zeros(B, T, device="meta")})


def test_flat_layout_takes_flat_side_inputs():
    flat = dict(logits=LOGITS[0], targets=TARGETS[0], mask=MASK[0], advantages=torch.ones(T))
    out = call(**flat, old_logprobs=torch.zeros(T), ref_logprobs=torch.zeros(T),
               rollout_logprobs=torch.zeros(T))
    assert out.logprobs.shape == (T,)
    with pytest.raises(ValueError, match=r"old_logprobs must have shape \(3,\)"):
        call(**flat, old_logprobs=torch.zeros(1, T), ref_logprobs=torch.zeros(T),
             rollout_logprobs=torch.zeros(T))


def test_masks():
    # check_mask checks metadata only; mask_to_bool checks the values (0/1 or bool).
    ints = torch.tensor([[0, 1, 1]])
    assert validation.check_mask(ints, (1, 3), LOGITS) is ints
    assert torch.equal(validation.mask_to_bool(ints), torch.tensor([[False, True, True]]))
    assert torch.equal(validation.mask_to_bool(torch.tensor([[1.0, 0.0, 1.0]])),
                       torch.tensor([[True, False, True]]))
    with pytest.raises(ValueError, match=r"mask must be bool or hold only 0 and 1.*found 2"):
        validation.mask_to_bool(torch.tensor([[0, 2, 1]]))
    with pytest.raises(ValueError, match=r"mask must be bool or hold only 0 and 1.*found 0\.5"):
        validation.mask_to_bool(torch.tensor([[0.5, 1.0, 1.0]]))
    same = torch.tensor([[True, False, True]])
    assert validation.mask_to_bool(same) is same
    assert validation.check_mask(same, (1, 3), LOGITS) is same
    with pytest.raises(TypeError, match=r"mask must be a bool or 0/1 tensor of shape \(1, 3\)"):
        validation.check_mask([[1, 0, 1]], (1, 3), LOGITS)
    with pytest.raises(ValueError, match=r"mask must have shape \(1, 3\)"):
        validation.check_mask(same.T, (1, 3), LOGITS)
    with pytest.raises(ValueError, match="mask is on meta"):
        validation.check_mask(same.to("meta"), (1, 3), LOGITS)


def test_targets_at_the_edges_of_the_vocabulary(monkeypatch):
    validation.check_target_range(torch.tensor([0, V - 1, -100]), V, -100)
    validation.check_target_range(torch.zeros(0, dtype=torch.long), V, -100)
    with pytest.raises(ValueError, match=r"found 1 out of range \(first: 7\)"):
        validation.check_target_range(torch.tensor([V]), V, -100)  # a single target
    for bad, first in (([0, V, -100], V), ([-1, 3], -1), ([-100, 2], -100)):
        ignore = -100 if bad[-1] != 2 else -7
        with pytest.raises(ValueError, match=rf"found 1 out of range \(first: {first}\)"):
            validation.check_target_range(torch.tensor(bad), V, ignore)
    monkeypatch.setenv("RLHF_FAST_CHECK_TARGETS", "0")
    assert not validation.target_checks_enabled()
    validation.check_target_range(torch.tensor([V + 5]), V, -100)
    monkeypatch.setenv("RLHF_FAST_CHECK_TARGETS", "1")
    assert validation.target_checks_enabled()
    monkeypatch.delenv("RLHF_FAST_CHECK_TARGETS")
    assert validation.target_checks_enabled()


def test_logits_and_token_tensors():
    validation.check_logits(torch.zeros(2, 1))
    validation.check_logits(torch.zeros(1, 2, 1, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="V >= 1"):
        validation.check_logits(torch.zeros(2, 3, 0))
    with pytest.raises(TypeError, match="must be float32, bfloat16 or float16"):
        validation.check_logits(torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="targets must be int64 or int32"):
        validation.check_token_tensor(torch.zeros(2, dtype=torch.int16), "targets",
                                      torch.zeros(2, 5), integer=True)
    validation.check_token_tensor(torch.zeros(2, dtype=torch.int32), "targets",
                                  torch.zeros(2, 5), integer=True)
    validation.check_token_tensor(torch.zeros(2), "advantages", torch.zeros(2, 5))
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor of shape \(2,\)"):
        validation.check_token_tensor(3, "x", torch.zeros(2, 5))


@pytest.mark.parametrize("good", [1e-6, 1, 0.5, 2.0])
def test_temperature_accepts_positive_finite(good):
    assert validation.check_temperature(good) == float(good)


@pytest.mark.parametrize("bad", [0.0, -1e-6, math.inf, -math.inf, math.nan])
def test_temperature_rejects(bad):
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        validation.check_temperature(bad)


def test_check_inplace_refuses_a_leaf_and_its_views_not_a_model_output():
    leaf = torch.randn(2, 3, 5, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf tensor"):
        validation.check_inplace(leaf, writes_grad=True)
    with pytest.raises(RuntimeError, match="view of a leaf"):
        validation.check_inplace(leaf[:1], writes_grad=True)
    validation.check_inplace(leaf * 1.0, writes_grad=True)     # a non-leaf: allowed
    validation.check_inplace(leaf, writes_grad=False)          # nothing written
