"""The benchmark suites by name. Each module exposes SUITE, IMPLS, cases(shapes, device),
useful_bytes(case) and run_case(case, impl, device, warmup=, reps=)."""

from . import dpo_suite, gae_suite, linear_suite, logprobs_suite, policy_suite, train_suite

SUITES = {"logprobs": logprobs_suite, "policy": policy_suite, "linear": linear_suite,
          "dpo": dpo_suite, "gae": gae_suite, "train": train_suite}
