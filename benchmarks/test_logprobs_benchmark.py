"""token_logprobs under pytest-benchmark, on the quick shape of the current device.

The same cases and steps as ``rlhf-fast bench --suite logprobs`` (rlhf_fast.bench); this
wrapper adds pytest-benchmark's statistics and comparison between runs.
"""

import pytest
import torch

from rlhf_fast.bench import logprobs_suite

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = logprobs_suite.cases("quick", DEVICE)


@pytest.mark.parametrize("impl", ["rlhf_fast", "reference"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c.label}-{c.mode}" for c in CASES])
def test_token_logprobs(benchmark, case, impl):
    logits, targets = logprobs_suite.make_inputs(case, DEVICE)
    step = logprobs_suite.make_step(case, impl, logits, targets)
    if DEVICE.type == "cuda":
        def timed():
            step()
            torch.cuda.synchronize()
        benchmark(timed)
    else:
        benchmark.pedantic(step, rounds=3, warmup_rounds=1)
