"""Reference advantage estimators and whitening, as plain loops over groups and tokens.

Rewards of a group of G responses to one prompt are contiguous (group g is
``rewards[g*G:(g+1)*G]``). With mean and std taken over the group (``std`` with Bessel's
correction when ``unbiased``, else the population std):

    group (GRPO)   (R_i - mean_g) / (std_g + eps);  scale="batch": std over all rewards;
                   scale="none" (Dr. GRPO): R_i - mean_g.  A group of one: 0
                   (singleton="zero") or R / (1 + eps) (singleton="raw", verl's mean 0, std 1)
    RLOO           R_i - mean_{j != i} R_j;  a group of one: 0
    win rate       mean_{j != i} sigmoid((R_i - R_j) / temperature) - 1/2;  a group of one: 0
    whitening      (x - mean) / sqrt(var + eps) over the masked-in positions (Bessel's var
                   when ``unbiased``); shift_mean=False adds the mean back (rescale only);
                   masked positions are 0; fewer than two valid positions: centred only
                   (the mean is not removed when shift_mean=False); none: all 0
    returns        G_t = r_t + gamma * G_{t+1} over each sequence's valid tokens (masked
                   positions are skipped and get 0)
    REINFORCE++    whitened returns;  with baseline: R_i - mean_g on every valid token,
                   whitened over the batch

Everything is computed in float64 Python and returned as float32 tensors.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _groups(rewards: Tensor, group_size: int) -> list[list[float]]:
    values = rewards.double().flatten().tolist()
    return [values[g:g + group_size] for g in range(0, len(values), group_size)]


def _std(values: list[float], unbiased: bool) -> float:
    n = len(values)
    mean = sum(values) / n
    squares = sum((v - mean) ** 2 for v in values)
    return math.sqrt(squares / (n - 1 if unbiased else n))


def group_advantages(rewards: Tensor, group_size: int, *, scale: str = "group",
                     eps: float = 1e-6, unbiased: bool = True,
                     singleton: str = "zero") -> Tensor:
    """GRPO's group-relative advantage, ``[num_groups * G]``."""
    groups = _groups(rewards, group_size)
    flat = [r for group in groups for r in group]
    out = []
    for group in groups:
        if group_size == 1:
            out += [group[0] / (1 + eps) if singleton == "raw" else 0.0]
            continue
        mean = sum(group) / group_size
        if scale == "none":
            out += [r - mean for r in group]
            continue
        std = _std(group if scale == "group" else flat, unbiased) if len(flat) > 1 else 0.0
        out += [(r - mean) / (std + eps) for r in group]
    return torch.tensor(out, dtype=torch.float32)


def rloo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """Leave-one-out baseline, ``[num_groups * G]``."""
    out = []
    for group in _groups(rewards, group_size):
        for i, r in enumerate(group):
            others = group[:i] + group[i + 1:]
            out.append(r - sum(others) / len(others) if others else 0.0)
    return torch.tensor(out, dtype=torch.float32)


def winrate_advantages(rewards: Tensor, group_size: int, *, temperature: float = 1.0) -> Tensor:
    """Centred win probability against the rest of the group, ``[num_groups * G]``."""
    out = []
    for group in _groups(rewards, group_size):
        for i, r in enumerate(group):
            wins = [1 / (1 + math.exp(-(r - other) / temperature))
                    for j, other in enumerate(group) if j != i]
            out.append(sum(wins) / len(wins) - 0.5 if wins else 0.0)
    return torch.tensor(out, dtype=torch.float32)


def masked_whiten(values: Tensor, mask: Tensor, *, shift_mean: bool = True,
                  unbiased: bool = True, eps: float = 1e-8) -> Tensor:
    """Whitening over the masked-in positions of ``values`` (any shape)."""
    x = values.double().flatten().tolist()
    keep = [bool(k) for k in mask.flatten().tolist()]
    picked = [v for v, k in zip(x, keep, strict=True) if k]
    n = len(picked)
    out = [0.0] * len(x)
    if n == 0:
        return torch.zeros_like(values, dtype=torch.float32)
    mean = sum(picked) / n
    for i, (v, k) in enumerate(zip(x, keep, strict=True)):
        if not k:
            continue
        if n < 2:
            out[i] = v - mean if shift_mean else v
            continue
        var = sum((p - mean) ** 2 for p in picked) / (n - 1 if unbiased else n)
        scaled = (v - mean) / math.sqrt(var + eps)
        out[i] = scaled if shift_mean else scaled + mean
    return torch.tensor(out, dtype=torch.float32).view(values.shape)


def returns_to_go(token_rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """Discounted returns over each sequence's valid tokens, ``[B, T]``."""
    batch, steps = token_rewards.shape
    out = torch.zeros(batch, steps, dtype=torch.float64)
    for b in range(batch):
        running = 0.0
        for t in reversed(range(steps)):
            if mask[b, t]:
                running = float(token_rewards[b, t]) + gamma * running
                out[b, t] = running
    return out.float()


def reinforce_pp_advantages(token_rewards: Tensor, mask: Tensor, gamma: float = 1.0,
                            eps: float = 1e-8) -> Tensor:
    """REINFORCE++: returns-to-go whitened over all valid tokens."""
    return masked_whiten(returns_to_go(token_rewards, mask, gamma), mask, eps=eps)


def reinforce_pp_baseline_advantages(rewards: Tensor, group_size: int, mask: Tensor,
                                     eps: float = 1e-8) -> Tensor:
    """REINFORCE++ with the group-mean baseline, ``[num_groups * G, T]``."""
    centred = group_advantages(rewards, group_size, scale="none")
    per_token = centred[:, None].expand(mask.shape).contiguous()
    return masked_whiten(per_token, mask, eps=eps)
