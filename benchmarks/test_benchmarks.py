"""Every suite under pytest-benchmark, on the quick shapes of the current device.

``pytest benchmarks/ --benchmark-only`` (needs the [bench] extra). The same cases and steps as
``rlhf-fast bench`` (``rlhf_fast.bench``); this entry adds pytest-benchmark's statistics and
its comparison between runs. Implementations absent on this device (a peer not installed,
torch.compile on the CPU) are not collected.
"""

import pytest
import torch

from rlhf_fast.bench import (
    dpo_suite,
    gae_suite,
    linear_suite,
    logprobs_suite,
    policy_suite,
    train_suite,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(step):
    if DEVICE.type != "cuda":
        return step

    def synced():
        step()
        torch.cuda.synchronize()
    return synced


def _params(suite, absent):
    return [pytest.param(case, impl, id=f"{case.label}-{case.mode}-{impl}")
            for case in suite.cases("quick", DEVICE) for impl in suite.IMPLS
            if absent(case, impl) is None]


@pytest.mark.parametrize(("case", "impl"), _params(
    logprobs_suite, lambda case, impl: logprobs_suite.absent_reason(impl, DEVICE)))
def test_logprobs(benchmark, case, impl):
    step = logprobs_suite.make_step(case, impl, *logprobs_suite.make_inputs(case, DEVICE))
    benchmark.pedantic(_sync(step), rounds=5, warmup_rounds=1)


@pytest.mark.parametrize(("case", "impl"), _params(
    policy_suite, lambda case, impl: policy_suite.absent_reason(case, impl, DEVICE)))
def test_policy(benchmark, case, impl):
    step = policy_suite.make_step(case, impl, policy_suite.make_inputs(case, DEVICE))
    benchmark.pedantic(_sync(step), rounds=5, warmup_rounds=1)


@pytest.mark.parametrize(("case", "impl"), _params(gae_suite, lambda case, impl: None))
def test_gae(benchmark, case, impl):
    step = gae_suite.make_step(impl, gae_suite.make_inputs(case, DEVICE))
    benchmark.pedantic(_sync(step), rounds=3, warmup_rounds=1)


@pytest.mark.parametrize(("case", "impl"), _params(
    linear_suite, lambda case, impl: linear_suite.absent_reason(case, impl, DEVICE)))
def test_linear(benchmark, case, impl):
    step = linear_suite.make_step(case, impl, linear_suite.make_inputs(case, DEVICE))
    benchmark.pedantic(_sync(step), rounds=3, warmup_rounds=1)


@pytest.mark.parametrize(("case", "impl"), _params(
    dpo_suite, lambda case, impl: dpo_suite.absent_reason(case, impl, DEVICE)))
def test_dpo(benchmark, case, impl):
    step = dpo_suite.make_step(case, impl, dpo_suite.make_inputs(case, DEVICE))
    benchmark.pedantic(_sync(step), rounds=3, warmup_rounds=1)


@pytest.mark.parametrize(("case", "impl"), _params(train_suite, lambda case, impl: None))
def test_train(benchmark, case, impl):
    pytest.importorskip("transformers")
    step = train_suite.make_step(*train_suite.make_trainer(case, impl, DEVICE))
    benchmark.pedantic(_sync(step), rounds=3, warmup_rounds=1)
