"""Rejection sampling against the inference engine (verl's ``rollout_rs``): a loss mask.

The trainer's policy (``old_logprobs``) and the sampler's (``rollout_logprobs``) disagree on
some tokens; a rule measures the disagreement and drops what exceeds a bound. The result is
a new loss mask, so the dropped tokens also leave every denominator of the loss (verl
replaces its ``response_mask``). Per token, with log rho = clamp(old - rollout, -20, 20):

    k1 = -log rho        k2 = (log rho)^2 / 2        k3 = rho - 1 - log rho

A rule is ``<level>_<estimator>``: ``token_k1|k2|k3`` compares each token's value;
``seq_sum_k*``, ``seq_mean_k*`` and ``seq_max_k2|k3`` compare the sum, mean or max over the
sequence's valid tokens, and drop the whole sequence. k1 rules take ratio bounds
``"lower_upper"`` compared in log space (log lower <= k1 <= log upper; a single number u
means ``1/u_u``); the others take an upper bound. Several rules (comma-separated, one
threshold each or one for all) must all pass. Everything runs on the device, no host sync.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

LEVELS = ("token", "seq_sum", "seq_mean", "seq_max")
ESTIMATORS = ("k1", "k2", "k3")
LOG_RATIO_BOUND = 20.0
"""Clamp of log rho before the estimators (verl's SAFETY_BOUND)."""


def parse_rules(rules: str, thresholds: str | float
                ) -> list[tuple[str, str, float | None, float]]:
    """verl's ``rollout_rs`` / ``rollout_rs_threshold`` as (level, estimator, lower, upper)
    rules: k1 bounds in log space, the others an upper bound only."""
    names = list(dict.fromkeys(r.strip() for r in rules.split(",") if r.strip()))
    specs = [s.strip() for s in str(thresholds).split(",") if s.strip()]
    if not names:
        raise ValueError("rules must name at least one rule, e.g. 'token_k1,seq_mean_k3'")
    if len(specs) not in (1, len(names)):
        raise ValueError(f"thresholds must give one bound for all rules or one per rule "
                         f"({len(names)}), got {thresholds!r}")
    specs = specs * len(names) if len(specs) == 1 else specs
    parsed = []
    for name, spec in zip(names, specs, strict=True):
        level, _, estimator = name.rpartition("_")
        if level not in LEVELS or estimator not in ESTIMATORS or name == "seq_max_k1":
            raise ValueError(f"unknown rule {name!r}: <level>_<estimator> with level in "
                             f"{LEVELS} and estimator in {ESTIMATORS} (no seq_max_k1)")
        if estimator == "k1":
            low_text, sep, high_text = spec.partition("_")
            high = float(high_text if sep else low_text)
            low = float(low_text) if sep else 1.0 / high
            if not 0 < low <= high:
                raise ValueError(f"rule {name!r} needs ratio bounds 0 < lower <= upper, "
                                 f"got {spec!r}")
            parsed.append((level, estimator, math.log(low), math.log(high)))
        else:
            if "_" in spec or not float(spec) > 0:
                raise ValueError(f"rule {name!r} takes one upper bound > 0, got {spec!r}")
            parsed.append((level, estimator, None, float(spec)))
    return parsed


def rejection_mask(old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor,
                   rules: str, thresholds: str | float) -> Tensor:
    """Bool ``[B, T]``: ``mask`` without the tokens and sequences that fail a rule.

    old_logprobs, rollout_logprobs: float ``[B, T]``; mask: bool or 0/1 ``[B, T]``; rules,
    thresholds: verl's ``rollout_rs`` and ``rollout_rs_threshold`` (module docstring), e.g.
    ``rejection_mask(old, rollout, mask, "token_k1,seq_mean_k3", "0.5_2.0,0.01")``.
    """
    parsed = parse_rules(rules, thresholds)
    valid = mask.bool()
    m = valid.to(torch.float64)
    log_rho = (old_logprobs.double() - rollout_logprobs.double()).clamp(-LOG_RATIO_BOUND,
                                                                          LOG_RATIO_BOUND)
    values = {"k1": -log_rho, "k2": 0.5 * log_rho * log_rho,
              "k3": torch.exp(log_rho) - 1.0 - log_rho}
    keep = valid
    for level, estimator, low, high in parsed:
        value = values[estimator]
        if level == "seq_sum":
            stat = (value * m).sum(-1, keepdim=True)
        elif level == "seq_mean":
            stat = (value * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)
        elif level == "seq_max":
            stat = torch.where(valid, value, float("-inf")).amax(-1, keepdim=True)
            stat = torch.where(valid.any(-1, keepdim=True), stat, 0.0)
        else:
            stat = value
        passed = stat <= high
        if low is not None:
            passed = passed & (stat >= low)
        keep = keep & passed
    return keep
