"""Test harness: Triton kernels run on the CPU under the interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton is first imported, hence at the top of this file.
Tests marked ``gpu`` run only when CUDA is available. Randomness is fixed: hypothesis is
derandomized and every test starts from seeded global generators (docs/architecture.md,
Tests).
"""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Triton 3.9 warns when this is unset; 1 is its current default (fma contraction on).
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import random  # noqa: E402

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"

# Property tests draw the same examples on every run (no flake from a lucky or unlucky
# draw, no replay of a local example database); a test's own @settings (max_examples,
# suppressed health checks) still apply on top. HYPOTHESIS_PROFILE=explore draws afresh.
settings.register_profile("ci", derandomize=True, deadline=None, database=None)
settings.register_profile("explore", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global seeds, whatever ran before it: tests that
    draw from torch's global generator get the same inputs in any order or selection."""
    torch.manual_seed(0)
    random.seed(0)


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
