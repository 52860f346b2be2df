"""backend='auto' picks Triton on CUDA or under the interpreter, else the torch backend."""

import pytest
import torch

from rlhf_fast.backend import resolve_backend


def test_auto_follows_interpreter_and_device(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv("RLHF_FAST_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("auto", cpu) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert resolve_backend("auto", cpu) == "torch"
    meta_cuda = torch.empty(1, device="meta")
    assert resolve_backend("torch", meta_cuda) == "torch"


def test_env_override(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("RLHF_FAST_BACKEND", "torch")
    assert resolve_backend("auto", torch.zeros(1)) == "torch"
    assert resolve_backend("triton", torch.zeros(1)) == "triton"  # explicit beats the variable
    monkeypatch.setenv("RLHF_FAST_BACKEND", "fast")
    with pytest.raises(ValueError, match="RLHF_FAST_BACKEND must be one of"):
        resolve_backend("auto", torch.zeros(1))


def test_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        resolve_backend("triton", torch.zeros(1))
