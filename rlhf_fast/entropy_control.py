"""Adaptive entropy coefficient (Skywork-OR1; TRL's ``use_adaptive_entropy``).

The coefficient c of the entropy bonus (``PolicyLossConfig.entropy.coef``) moves towards a
target entropy once per optimiser step, on the host:

    H = sum of the window's token entropies / their count (all micro-batches of the step)
    c <- min(c + delta, c_max)   if H <= target      (entropy too low: push it up)
    c <- max(c - delta, c_min)   otherwise

and the bonus applied during the next step is c while the last measured H <= target, else 0
(before the first measurement H = inf: no bonus). TRL's defaults: target 0.2 nats, delta
0.005, [c_min, c_max] = [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class AdaptiveEntropyController:
    """``value``: the coefficient c (TRL's ``entropy_coef``); ``target``: the entropy target
    (``entropy_target``); ``delta``: the step (``entropy_coef_delta``); ``min_value`` /
    ``max_value``: the bounds (``entropy_coef_min`` / ``entropy_coef_max``)."""

    value: float = 0.0
    target: float = 0.2
    delta: float = 0.005
    min_value: float = 0.0
    max_value: float = 1.0
    last_entropy: float = math.inf
    _window: list[Tensor | float] = field(default_factory=lambda: [0.0, 0.0], repr=False)

    def __post_init__(self) -> None:
        if not self.min_value <= self.value <= self.max_value:
            raise ValueError(f"value must lie in [min_value, max_value] = [{self.min_value}, "
                             f"{self.max_value}], got {self.value}")
        if not self.delta >= 0:
            raise ValueError(f"delta must be >= 0, got {self.delta}")

    @property
    def coef(self) -> float:
        """The ``entropy_coef`` to use for this step's micro-batches."""
        return self.value if self.last_entropy <= self.target else 0.0

    def observe(self, entropy_sum: Tensor | float, token_count: Tensor | float) -> None:
        """Add one micro-batch: the sum of its tokens' entropies and their count (e.g.
        ``out.metrics["entropy_mean"] * out.metrics["token_count"]`` and
        ``out.metrics["token_count"]``; all-reduce both across ranks first for a global
        window). Tensors stay on their device until ``step``."""
        self._window = [self._window[0] + entropy_sum, self._window[1] + token_count]

    def step(self) -> float:
        """At the optimiser step: measure the window's entropy, move the coefficient, reset
        the window; returns the new ``value``."""
        total, count = (float(x.detach()) if isinstance(x, Tensor) else float(x)
                        for x in self._window)
        entropy = total / max(count, 1.0)
        if entropy <= self.target:
            self.value = min(self.value + self.delta, self.max_value)
        else:
            self.value = max(self.value - self.delta, self.min_value)
        self.last_entropy = entropy
        self._window = [0.0, 0.0]
        return self.value


__all__ = ["AdaptiveEntropyController"]
