"""Bad input gets a clear error naming the argument and the expected shape or dtype."""

import pytest
import torch

import rlhf_fast


def call(logits, targets, **kw):
    return rlhf_fast.token_logprobs(logits, targets, **kw)


@pytest.fixture
def good():
    return torch.randn(2, 3, 10), torch.randint(0, 10, (2, 3))


def test_logits_not_a_tensor(good):
    with pytest.raises(TypeError, match=r"logits must be a torch\.Tensor"):
        call([[1.0, 2.0]], good[1])


@pytest.mark.parametrize("dtype", [torch.float64, torch.int64, torch.bool])
def test_logits_dtype(good, dtype):
    with pytest.raises(TypeError, match="logits must be float32, bfloat16 or float16"):
        call(good[0].to(dtype), good[1])


@pytest.mark.parametrize("shape", [(10,), (1, 2, 3, 10)])
def test_logits_rank(shape):
    with pytest.raises(ValueError, match=r"logits must be \[B, T, V\] or \[N, V\]"):
        call(torch.randn(shape), torch.zeros(shape[:-1], dtype=torch.long))


def test_empty_vocab():
    with pytest.raises(ValueError, match="V >= 1"):
        call(torch.randn(2, 0), torch.zeros(2, dtype=torch.long))


def test_targets_shape(good):
    with pytest.raises(ValueError, match=r"targets must have shape \(2, 3\)"):
        call(good[0], torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"targets must have shape \(2, 3\)"):
        call(good[0], torch.zeros(6, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float32, torch.int16, torch.uint8, torch.bool])
def test_targets_dtype(good, dtype):
    with pytest.raises(TypeError, match="targets must be int64 or int32"):
        call(good[0], good[1].to(dtype))


def test_targets_device(good):
    with pytest.raises(ValueError, match="targets is on meta but logits are on cpu"):
        call(good[0], good[1].to("meta"))


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("inf"), float("nan")])
def test_temperature_value(good, temperature):
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        call(*good, temperature=temperature)


def test_temperature_type(good):
    with pytest.raises(TypeError, match="temperature must be a positive float"):
        call(*good, temperature="hot")


def test_unknown_backend(good):
    with pytest.raises(ValueError, match="backend must be one of"):
        call(*good, backend="cuda")
