"""Reference generalised advantage estimation, one sequence and one step at a time.

Over the valid tokens t_1 < ... < t_n of a sequence (masked positions are skipped, as if
they were not there; they get A = R = 0):

    delta_k = r_k + gamma * V_{k+1} - V_k,   A_k = delta_k + gamma * lam * A_{k+1},
    R_k = A_k + V_k,   with V_{n+1} = A_{n+1} = 0.

``masked_gaps="zero"`` (OpenRLHF): r_t = V_t = 0 at masked positions and the same recursion
runs over every position t = T-1, ..., 0 (with V_T = A_T = 0); masked positions then get
A = R = 0 in the output.
"""

from __future__ import annotations

import torch
from torch import Tensor


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0,
        lam: float = 1.0, masked_gaps: str = "skip") -> tuple[Tensor, Tensor]:
    """(advantages, returns), float64 ``[B, T]``."""
    batch, steps = rewards.shape
    advantages = torch.zeros(batch, steps, dtype=torch.float64)
    returns = torch.zeros(batch, steps, dtype=torch.float64)
    for b in range(batch):
        valid = [t for t in range(steps) if mask[b, t]]
        visited = valid if masked_gaps == "skip" else list(range(steps))
        next_value = next_advantage = 0.0
        for t in reversed(visited):
            inside = bool(mask[b, t])
            r = float(rewards[b, t]) if inside else 0.0
            v = float(values[b, t]) if inside else 0.0
            delta = r + gamma * next_value - v
            advantage = delta + gamma * lam * next_advantage
            if inside:
                advantages[b, t], returns[b, t] = advantage, advantage + v
            next_value, next_advantage = v, advantage
    return advantages, returns
