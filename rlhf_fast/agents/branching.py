"""The arithmetic of ARPO's and AEPO's entropy-guided rollout trees, as plain functions.

- Step entropy (ARPO): ``H = sum_{t < k} H_t / log|V|`` over the first ``k`` tokens a round
  generates (a sum over tokens, not a mean, as the official code does; ``H_t`` the full
  entropy of the sampler's distribution where the code reads the top-10 log-probs).
  ``delta_H = H_after_tool - H_root``, ``H_root`` that of the first round of the tree's root
  sample.
- ARPO branches after a tool call with probability ``clip(tau + w * delta_H, 0, 1)`` (the
  code's ``U - w * delta_H <= tau`` with ``U ~ U(0, 1)``); defaults ``tau = 0.5``,
  ``w = 0.2``: ``0.5 + 0.2 * delta_H``.
- AEPO adds the consecutive-branch penalty: the code draws ``U`` and branches iff
  ``clip((U + w * delta_H) * max(0, 1 - 0.05 * l), 0, 1) >= tau``, ``l`` the number of
  consecutive rounds in which the prompt branched; so the probability is
  ``clip(1 - tau / (1 - 0.05 l) + w * delta_H, 0, 1)``: ARPO's at ``l = 0``,
  ``clip(0.2 * delta_H, 0, 1)`` at ``l = 10``, 0 from ``l = 20`` on.
- AEPO's entropy pre-monitoring splits a budget of ``k`` rollouts into
  ``m = clip(floor(k * sigmoid(beta * (H_root - mean H_tool))) + 1, 1, k)`` global samples
  and ``k - m`` for branching (``beta = 0.5``): a root more uncertain than the tool steps
  gets more global samples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def step_entropy(entropies: Sequence[float], tokens: int, vocab_size: int) -> float:
    """ARPO's entropy of a generation round: the sum of the first ``tokens`` per-token
    entropies (nats), divided by ``log(vocab_size)``."""
    if tokens < 1 or vocab_size < 2:
        raise ValueError(f"need tokens >= 1 and vocab_size >= 2, got {tokens}, {vocab_size}")
    return float(sum(entropies[:tokens])) / math.log(vocab_size)


def arpo_branch_probability(delta_entropy: float, tau: float = 0.5,
                            weight: float = 0.2) -> float:
    """``clip(tau + weight * delta_entropy, 0, 1)``."""
    return min(1.0, max(0.0, tau + weight * delta_entropy))


def aepo_branch_probability(delta_entropy: float, consecutive: int, tau: float = 0.5,
                            weight: float = 0.2, penalty: float = 0.05) -> float:
    """``clip(1 - tau / (1 - penalty * consecutive) + weight * delta_entropy, 0, 1)``, 0 once
    ``penalty * consecutive >= 1``."""
    if consecutive < 0:
        raise ValueError(f"consecutive must be >= 0, got {consecutive}")
    factor = 1.0 - penalty * consecutive
    if factor <= 0:
        return 0.0
    return min(1.0, max(0.0, 1.0 - tau / factor + weight * delta_entropy))


def global_samples(budget: int, root_entropy: float, tool_entropy: float,
                   beta: float = 0.5) -> int:
    """AEPO's share of ``budget`` rollouts sampled from the root:
    ``clip(floor(budget * sigmoid(beta * (root - tool))) + 1, 1, budget)``."""
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")
    share = 1.0 / (1.0 + math.exp(-beta * (root_entropy - tool_entropy)))
    return min(budget, max(1, math.floor(budget * share) + 1))


def top_share(branch_counts: Sequence[int], top: int = 3) -> tuple[int, int]:
    """(branches taken from the ``top`` most-branched trajectories, all branches) of one
    tree: AEPO's measure of branch concentration."""
    ordered = sorted(branch_counts, reverse=True)
    return sum(ordered[:top]), sum(ordered)
