"""Test harness: Triton kernels run on the CPU under the interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton is first imported, hence at the top of this file.
Tests marked ``gpu`` run only when CUDA is available.
"""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Triton 3.9 warns when this is unset; 1 is its current default (fma contraction on).
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(params=["triton", "torch"])
def backend(request):
    return request.param


@pytest.fixture
def device():
    return DEVICE
