"""Reference batch entropy statistics: AEPO's entropy z-score and the top-entropy mask.

From ``PolicyLossConfig.entropy.advantage_alpha`` and ``.top_quantile``, over the
valid tokens of the batch (their entropies ``h_1..h_n``, detached):

    z(H) = (H - mean h) / std h,   std with Bessel's correction (divide by n - 1);
           a std that is 0 or undefined (n < 2) counts as 1; no valid token: mean 0
    A~   = A * (1 + alpha * z(H))                                       (AEPO)
    keep = H >= q_{1 - rho}(h)     the (1 - rho) quantile, linear interpolation between
                                   the sorted values; ties with the threshold are kept

so the mask keeps the HIGH-entropy end: the fraction rho of tokens with the largest entropy.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _valid_entropies(entropy: Tensor, mask: Tensor) -> list[float]:
    return [h for h, m in zip(entropy.detach().flatten().tolist(), mask.flatten().tolist(),
                              strict=True) if m]


def entropy_zscore(entropy: Tensor, mask: Tensor) -> Tensor:
    """z(H) ``[B, T]`` at every position (masked ones included), detached."""
    h = _valid_entropies(entropy, mask)
    n = len(h)
    mean = sum(h) / n if n else 0.0
    std = math.sqrt(sum((x - mean) ** 2 for x in h) / (n - 1)) if n >= 2 else 0.0
    if not (std > 0 and math.isfinite(std)):
        std = 1.0
    return (entropy.detach() - mean) / std


def entropy_advantage(advantages: Tensor, entropy: Tensor, mask: Tensor,
                      alpha: float) -> Tensor:
    """AEPO's entropy-aware advantage ``A * (1 + alpha * z(H))``, ``[B, T]``."""
    return advantages * (1 + alpha * entropy_zscore(entropy, mask))


def linear_quantile(values: list[float], q: float) -> float:
    """The q-quantile of ``values`` with linear interpolation between order statistics."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    fraction = position - low
    return ordered[low] + fraction * (ordered[high] - ordered[low])


def top_entropy_mask(entropy: Tensor, mask: Tensor, quantile: float | None) -> Tensor:
    """1.0 where a token's entropy is in the top ``quantile`` fraction of the valid tokens
    (``H >= q_{1 - quantile}``), else 0.0; all ones when off or when no token is valid."""
    h = _valid_entropies(entropy, mask)
    if quantile is None or not h:
        return torch.ones_like(entropy)
    threshold = linear_quantile(h, 1.0 - quantile)
    return (entropy.detach() >= threshold).to(entropy.dtype)
