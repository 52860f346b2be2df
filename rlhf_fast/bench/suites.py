"""The benchmark suites by name. Each module exposes SUITE, IMPLS, cases(shapes, device),
useful_bytes(case) and run_case(case, impl, device, warmup=, reps=); a suite whose cases
are not named by ``Case.label`` also has label(case)."""

from types import ModuleType

from . import dpo_suite, gae_suite, linear_suite, logprobs_suite, policy_suite, train_suite
from .case import Case

SUITES = {"logprobs": logprobs_suite, "policy": policy_suite, "linear": linear_suite,
          "dpo": dpo_suite, "gae": gae_suite,
          "train": train_suite}


def case_label(suite: ModuleType, case: Case) -> str:
    """The name of ``case`` in the suite's records, progress lines and tables."""
    label = getattr(suite, "label", None)
    return label(case) if label is not None else case.label
