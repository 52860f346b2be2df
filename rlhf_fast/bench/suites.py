"""The benchmark suites by name. Each module exposes SUITE, IMPLS, Case, cases(shapes,
device) and run_case(case, impl, device, warmup=, reps=)."""

from . import logprobs_suite, policy_suite

SUITES = {"logprobs": logprobs_suite, "policy": policy_suite}
