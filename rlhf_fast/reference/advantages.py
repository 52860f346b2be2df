"""Reference advantage estimators and whitening, as plain loops over groups and tokens.

Rewards of a group of G responses to one prompt are contiguous (group g is
``rewards[g*G:(g+1)*G]``), or, with ``group_ids``, the samples of equal id form a group
(any order, any sizes). With mean and std taken over the group (``std`` with Bessel's
correction when ``unbiased``, else the population std):

    group (GRPO)   (R_i - mean_g) / (std_g + eps);  scale="batch": std over all rewards;
                   scale="none" (Dr. GRPO): R_i - mean_g.  A group of one: 0
                   (singleton="zero") or R / (1 + eps) (singleton="raw", verl's mean 0, std 1;
                   R with scale="none")
    RLOO           R_i - mean_{j != i} R_j;  a group of one: 0 (singleton="zero") or R ("raw")
    win rate       mean_{j != i} sigmoid((R_i - R_j) / temperature) - 1/2;  a group of one: 0
    whitening      (x - mean) / sqrt(var + eps) over the masked-in positions (Bessel's var
                   when ``unbiased``); shift_mean=False adds the mean back (rescale only);
                   masked positions are 0; fewer than two valid positions: centred only
                   (the mean is not removed when shift_mean=False); none: all 0
    returns        G_t = r_t + gamma * G_{t+1} over each sequence's valid tokens (masked
                   positions are skipped and get 0)
    REINFORCE++    whitened returns;  with baseline: R_i - mean_g on every valid token
                   (a group of one: 0, or R with singleton="raw"), whitened over the batch
    ReMax          G_t - b (b: the greedy rollout's reward), G the returns (gamma 1)
    OPO            R_i - sum_g L_j R_j / sum_g L_j (L: response lengths); a group of one: R
    GPG            alpha (R_i - mean_g) / f_norm, alpha = N / max(#{R != 0}, 1); a group
                   of one: alpha R / f_norm
    pass@k         the group's best sample (earliest on ties): (r_max - r_2nd) [/ (std_g +
                   eps)]; the others and a group of one: 0
    GDPO           sum_k w_k (group advantage of component k), then (A - mean) / (std +
                   final_eps) over the batch, or whitened over the valid tokens (mask)
    OTB            G_t - B_t, B_t = sum_g m G W / (sum_g m W + eps) per column, W_t the
                   running sum of m (1 - 2 pi + sum pi^2) (rho^2); a group of one: B = 0;
                   the group's single longest response: B = 0 from the second-longest
                   length on

Everything is computed in float64 Python and returned as float32 tensors.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _members(rewards: Tensor, group_size: int | None, group_ids: Tensor | None
             ) -> list[list[int]]:
    """For each sample, the indices of the samples of its group (itself included)."""
    n = rewards.numel()
    ids = group_ids.tolist() if group_ids is not None else [i // group_size for i in range(n)]
    return [[j for j in range(n) if ids[j] == ids[i]] for i in range(n)]


def _std(values: list[float], unbiased: bool) -> float:
    n = len(values)
    mean = sum(values) / n
    squares = sum((v - mean) ** 2 for v in values)
    return math.sqrt(squares / (n - 1 if unbiased else n))


def group_advantages(rewards: Tensor, group_size: int | None, *, scale: str = "group",
                     eps: float = 1e-6, unbiased: bool = True, singleton: str = "zero",
                     group_ids: Tensor | None = None) -> Tensor:
    """GRPO's group-relative advantage, ``[N]``."""
    flat = rewards.double().flatten().tolist()
    out = []
    for i, members in enumerate(_members(rewards, group_size, group_ids)):
        r = flat[i]
        group = [flat[j] for j in members]
        if len(group) == 1:
            raw = r if scale == "none" else r / (1 + eps)
            out.append(raw if singleton == "raw" else 0.0)
            continue
        mean = sum(group) / len(group)
        if scale == "none":
            out.append(r - mean)
            continue
        std = _std(group if scale == "group" else flat, unbiased) if len(flat) > 1 else 0.0
        out.append((r - mean) / (std + eps))
    return torch.tensor(out, dtype=torch.float32)


def rloo_advantages(rewards: Tensor, group_size: int | None, *, singleton: str = "zero",
                    group_ids: Tensor | None = None) -> Tensor:
    """Leave-one-out baseline, ``[N]``."""
    flat = rewards.double().flatten().tolist()
    out = []
    for i, members in enumerate(_members(rewards, group_size, group_ids)):
        others = [flat[j] for j in members if j != i]
        if others:
            out.append(flat[i] - sum(others) / len(others))
        else:
            out.append(flat[i] if singleton == "raw" else 0.0)
    return torch.tensor(out, dtype=torch.float32)


def winrate_advantages(rewards: Tensor, group_size: int | None, *, temperature: float = 1.0,
                       group_ids: Tensor | None = None) -> Tensor:
    """Centred win probability against the rest of the group, ``[N]``."""
    flat = rewards.double().flatten().tolist()
    out = []
    for i, members in enumerate(_members(rewards, group_size, group_ids)):
        wins = [1 / (1 + math.exp(-(flat[i] - flat[j]) / temperature))
                for j in members if j != i]
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
                            eps: float = 1e-8, *, unbiased: bool = True) -> Tensor:
    """REINFORCE++: returns-to-go whitened over all valid tokens."""
    return masked_whiten(returns_to_go(token_rewards, mask, gamma), mask, eps=eps,
                         unbiased=unbiased)


def reinforce_pp_baseline_advantages(rewards: Tensor, group_size: int | None, mask: Tensor,
                                     eps: float = 1e-8, *, unbiased: bool = True,
                                     singleton: str = "zero",
                                     group_ids: Tensor | None = None) -> Tensor:
    """REINFORCE++ with the group-mean baseline, ``[N, T]``."""
    centred = group_advantages(rewards, group_size, scale="none", singleton=singleton,
                               group_ids=group_ids)
    per_token = centred[:, None].expand(mask.shape).contiguous()
    return masked_whiten(per_token, mask, eps=eps, unbiased=unbiased)


def remax_advantages(token_rewards: Tensor, baselines: Tensor, mask: Tensor
                     ) -> tuple[Tensor, Tensor]:
    """(advantages, returns) ``[B, T]``, 0 at masked positions."""
    returns = returns_to_go(token_rewards, mask, 1.0).double()
    advantages = returns.clone()
    for b in range(returns.shape[0]):
        for t in range(returns.shape[1]):
            if mask[b, t]:
                advantages[b, t] -= float(baselines[b])
    return advantages.float(), returns.float()


def opo_advantages(rewards: Tensor, lengths: Tensor, group_size: int | None = None, *,
                   group_ids: Tensor | None = None) -> Tensor:
    flat, lens = rewards.double().tolist(), lengths.double().tolist()
    out = []
    for i, members in enumerate(_members(rewards, group_size, group_ids)):
        if len(members) == 1:
            out.append(flat[i])
            continue
        baseline = sum(lens[j] * flat[j] for j in members) / sum(lens[j] for j in members)
        out.append(flat[i] - baseline)
    return torch.tensor(out, dtype=torch.float32)


def gpg_advantages(rewards: Tensor, group_size: int | None = None, *, f_norm: float = 1.0,
                   group_ids: Tensor | None = None) -> Tensor:
    flat = rewards.double().tolist()
    alpha = len(flat) / max(sum(1 for r in flat if r != 0), 1)
    out = []
    for i, members in enumerate(_members(rewards, group_size, group_ids)):
        mean = sum(flat[j] for j in members) / len(members) if len(members) > 1 else 0.0
        out.append(alpha * (flat[i] - mean) / f_norm)
    return torch.tensor(out, dtype=torch.float32)


def passk_advantages(rewards: Tensor, group_size: int | None = None, *, scale: str = "group",
                     eps: float = 1e-6, group_ids: Tensor | None = None) -> Tensor:
    flat = rewards.double().tolist()
    out = []
    for i, members in enumerate(_members(rewards, group_size, group_ids)):
        if len(members) == 1:
            out.append(0.0)
            continue
        group = [flat[j] for j in members]
        best = max(group)
        first = next(j for j in members if flat[j] == best)
        if i != first:
            out.append(0.0)
            continue
        gap = best - max(flat[j] for j in members if j != first)
        out.append(gap / (_std(group, True) + eps) if scale == "group" else gap)
    return torch.tensor(out, dtype=torch.float32)


def gdpo_advantages(components: Tensor, group_size: int | None = None, *,
                    weights: Tensor | None = None, eps: float = 1e-6, final_eps: float = 1e-4,
                    singleton: str = "zero", mask: Tensor | None = None,
                    group_ids: Tensor | None = None) -> Tensor:
    k = components.shape[1]
    w = [1.0] * k if weights is None else weights.double().tolist()
    per_k = [group_advantages(components[:, j], group_size, eps=eps, singleton=singleton,
                              group_ids=group_ids).double() for j in range(k)]
    total = [sum(w[j] * float(per_k[j][i]) for j in range(k))
             for i in range(components.shape[0])]
    if mask is not None:
        per_token = torch.tensor(total, dtype=torch.float64)[:, None].expand(mask.shape)
        return masked_whiten(per_token.contiguous(), mask)
    mean = sum(total) / len(total)
    std = _std(total, True) if len(total) > 1 else 0.0
    return torch.tensor([(a - mean) / (std + final_eps) for a in total], dtype=torch.float32)


def optimal_token_baseline_advantages(
    token_rewards: Tensor, mask: Tensor, old_logprobs: Tensor, sum_pi_sq: Tensor,
    group_size: int | None = None, *, group_ids: Tensor | None = None,
    rollout_weights: Tensor | None = None, handle_zero_tail: bool = True, eps: float = 1e-8,
) -> tuple[Tensor, Tensor]:
    n, steps = token_rewards.shape
    valid = [[bool(mask[i, t]) for t in range(steps)] for i in range(n)]
    returns = [[0.0] * steps for _ in range(n)]
    weights = [[0.0] * steps for _ in range(n)]
    for i in range(n):
        running = 0.0
        for t in reversed(range(steps)):
            running += float(token_rewards[i, t]) if valid[i][t] else 0.0
            returns[i][t] = running
        total = 0.0
        for t in range(steps):
            if valid[i][t]:
                w = 1 - 2 * math.exp(float(old_logprobs[i, t])) + float(sum_pi_sq[i, t])
                if rollout_weights is not None:
                    w *= float(rollout_weights[i, t]) ** 2
                total += w
            weights[i][t] = total
    lengths = [sum(row) for row in valid]
    members = _members(token_rewards[:, 0], group_size, group_ids)
    adv = torch.zeros(n, steps, dtype=torch.float64)
    ret = torch.zeros(n, steps, dtype=torch.float64)
    for i in range(n):
        group = members[i]
        others = [lengths[j] for j in group if j != i]
        zero_from = max(others) if handle_zero_tail and others and lengths[i] > max(others) \
            else steps
        for t in range(steps):
            if not valid[i][t]:
                continue
            baseline = 0.0
            if len(group) > 1 and t < zero_from:
                num = sum(returns[j][t] * weights[j][t] for j in group if valid[j][t])
                den = sum(weights[j][t] for j in group if valid[j][t]) + eps
                baseline = num / den
            adv[i, t], ret[i, t] = returns[i][t] - baseline, returns[i][t]
    return adv.float(), ret.float()
