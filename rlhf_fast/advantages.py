"""Advantage estimators: group-relative (GRPO / Dr. GRPO), RLOO, win-rate, REINFORCE++.

Rewards of a group of G responses to the same prompt are contiguous: ``rewards`` is
``[num_groups * G]`` and group g is ``rewards[g*G:(g+1)*G]``. Groups that are not contiguous
or not of equal size (verl's ``uid`` index, prompts filtered or partly dropped) pass
``group_ids`` ``[N]`` (int; samples with equal ids form a group) and ``group_size=None``.
Sequence-level advantages come back as ``[N]``; broadcast them over tokens (``policy_loss``
takes ``[B]``).
GAE lives in ``rlhf_fast.gae``. Everything here is no-grad bookkeeping on small tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .gae import gae

GROUP_PRESETS: dict[str, dict] = {
    # TRL GRPOTrainer: (R - mean_g) / (std_g + 1e-4), Bessel std; a singleton group's NaN
    # std gives NaN, which TRL turns into 0.
    "trl": {"eps": 1e-4, "unbiased": True, "singleton": "zero"},
    # verl grpo estimator: (R - mean_g) / (std_g + 1e-6), Bessel std; a singleton group gets
    # mean 0 and std 1, i.e. A = R / (1 + eps).
    "verl": {"eps": 1e-6, "unbiased": True, "singleton": "raw"},
    # OpenRLHF group_norm: (R - mean_g) / (std_g + 1e-9), Bessel std.
    "openrlhf": {"eps": 1e-9, "unbiased": True, "singleton": "zero"},
}
"""The frameworks' group-normalisation conventions (``group_advantages(..., preset=...)``)."""


def _same_group(rewards: Tensor, group_size: int | None, group_ids: Tensor | None
                ) -> tuple[Tensor, Tensor, Tensor]:
    """(rewards ``[N]`` float32, ``same`` ``[N, N]`` float32 with 1 where samples i and j
    share a group, group sizes ``[N]``). Built on the device from ``group_ids``: equal ids
    form a group (no host read, so ids may be any integers, in any order)."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if group_size is not None:
        raise ValueError("pass group_size or group_ids, not both (group_ids define the "
                         "groups; group_size is for contiguous groups of equal size)")
    if not isinstance(group_ids, Tensor) or group_ids.dtype.is_floating_point \
            or group_ids.dtype == torch.bool or tuple(group_ids.shape) != tuple(rewards.shape):
        raise ValueError(f"group_ids must be an integer tensor of shape "
                         f"{tuple(rewards.shape)} (one id per reward)")
    if group_ids.device != rewards.device:
        raise ValueError(f"group_ids are on {group_ids.device} but rewards are on "
                         f"{rewards.device}")
    same = (group_ids[:, None] == group_ids[None, :]).float()
    return rewards.float(), same, same.sum(-1)


def _check_singleton(singleton: str) -> None:
    if singleton not in ("zero", "raw"):
        raise ValueError(f"singleton must be 'zero' or 'raw', got {singleton!r}")


def _groups(rewards: Tensor, group_size: int | None) -> Tensor:
    if group_size is None:
        raise ValueError("pass group_size (contiguous groups of equal size) or group_ids")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [num_groups * group_size], got shape "
                         f"{tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards has {rewards.numel()} entries, not a multiple of "
                         f"group_size={group_size}")
    return rewards.float().view(-1, group_size)


def group_advantages(rewards: Tensor, group_size: int | None, *, scale: str = "group",
                     eps: float = 1e-6, unbiased: bool = True, singleton: str = "zero",
                     preset: str | None = None, group_ids: Tensor | None = None) -> Tensor:
    """GRPO's group-relative advantage ``(R - mean_g) / (std + eps)``.

    scale: ``"group"`` (std of the group), ``"batch"`` (std of all rewards, centring still by
    the group mean) or ``"none"`` (Dr. GRPO: ``R - mean_g``). unbiased: Bessel-corrected
    std. singleton: a group of one gets 0 (``"zero"``) or ``R / (1 + eps)`` (``"raw"``,
    verl's mean 0 / std 1; ``R`` with ``scale="none"``). ``preset`` ("trl", "verl",
    "openrlhf") sets eps / unbiased / singleton as that framework does. All-equal groups
    get 0. ``group_ids`` ``[N]``: groups by id instead of contiguous blocks (then
    ``group_size=None``); groups of any sizes, singletons among them.
    """
    if preset is not None:
        if preset not in GROUP_PRESETS:
            raise ValueError(f"unknown preset {preset!r}; presets: {sorted(GROUP_PRESETS)}")
        eps, unbiased, singleton = (GROUP_PRESETS[preset][k]
                                    for k in ("eps", "unbiased", "singleton"))
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    _check_singleton(singleton)
    if group_ids is not None:
        return _group_advantages_by_id(rewards, group_size, group_ids, scale, eps, unbiased,
                                       singleton)
    r = _groups(rewards, group_size)
    if group_size == 1:
        raw = r if scale == "none" else r / (1.0 + eps)
        out = raw if singleton == "raw" else torch.zeros_like(r)
        return out.view(-1)
    centred = r - r.mean(-1, keepdim=True)
    if scale == "none":
        return centred.view(-1)
    if scale == "group":
        std = r.std(-1, keepdim=True, unbiased=unbiased)
    else:
        std = r.std(unbiased=unbiased) if r.numel() > 1 else torch.zeros(())
    return (centred / (std + eps)).view(-1)


def _group_advantages_by_id(rewards: Tensor, group_size: int | None, group_ids: Tensor,
                            scale: str, eps: float, unbiased: bool, singleton: str) -> Tensor:
    r, same, n = _same_group(rewards, group_size, group_ids)
    mean = same @ r / n
    centred = r - mean
    lone = n == 1
    if scale == "none":
        return torch.where(lone, r if singleton == "raw" else torch.zeros_like(r), centred)
    if scale == "group":
        squares = (same * (r[None, :] - mean[:, None]) ** 2).sum(-1)
        std = torch.sqrt(squares / (n - 1 if unbiased else n).clamp(min=1))
    else:
        std = r.std(unbiased=unbiased) if r.numel() > 1 else torch.zeros((), device=r.device)
    raw = r / (1.0 + eps) if singleton == "raw" else torch.zeros_like(r)
    return torch.where(lone, raw, centred / (std + eps))


def rloo_advantages(rewards: Tensor, group_size: int | None, *, singleton: str = "zero",
                    group_ids: Tensor | None = None) -> Tensor:
    """Leave-one-out baseline: ``R_i - mean_{j != i} R_j = G / (G - 1) * (R_i - mean_g)``.
    A group of one has no baseline: 0 (``singleton="zero"``) or its raw score ``R``
    (``"raw"``, verl's rloo). ``group_ids``: groups by id (``group_size=None``)."""
    _check_singleton(singleton)
    if group_ids is not None:
        r, same, n = _same_group(rewards, group_size, group_ids)
        loo_mean = (same @ r - r) / (n - 1).clamp(min=1)
        lone = r if singleton == "raw" else torch.zeros_like(r)
        return torch.where(n == 1, lone, r - loo_mean)
    r = _groups(rewards, group_size)
    if group_size == 1:
        return (r if singleton == "raw" else torch.zeros_like(r)).view(-1)
    loo_mean = (r.sum(-1, keepdim=True) - r) / (group_size - 1)
    return (r - loo_mean).view(-1)


def winrate_advantages(rewards: Tensor, group_size: int | None, *, temperature: float = 1.0,
                       group_ids: Tensor | None = None) -> Tensor:
    """Centred win probability: ``mean_{j != i} sigmoid((R_i - R_j) / temperature) - 1/2``.

    A soft rank within the group, bounded in (-1/2, 1/2), mean exactly 0 per group; for
    binary rewards it is ``(sigmoid(1 / temperature) - 1/2) * (R_i - mean_g) * G / (G - 1)``.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if group_ids is not None:  # groups by id (group_size=None); a group of one gets 0
        r, same, n = _same_group(rewards, group_size, group_ids)
        pairwise = torch.sigmoid((r[:, None] - r[None, :]) / temperature) * same
        wins = (pairwise.sum(-1) - 0.5) / (n - 1).clamp(min=1)
        return torch.where(n == 1, torch.zeros_like(r), wins - 0.5)
    r = _groups(rewards, group_size)
    if group_size == 1:
        return torch.zeros_like(r).view(-1)
    pairwise = torch.sigmoid((r.unsqueeze(-1) - r.unsqueeze(-2)) / temperature)
    # The diagonal (j == i) contributes sigmoid(0) = 1/2 to each row: take it out.
    wins = (pairwise.sum(-1) - 0.5) / (group_size - 1)
    return (wins - 0.5).view(-1)


def masked_whiten(values: Tensor, mask: Tensor, *, shift_mean: bool = True,
                  unbiased: bool = True, eps: float = 1e-8) -> Tensor:
    """``(x - mean) * rsqrt(var + eps)`` over the positions where ``mask`` is set (verl:
    Bessel variance; OpenRLHF: ``unbiased=False``). Masked positions come back as 0;
    ``shift_mean=False`` adds the mean back (scale only). Fewer than two valid positions:
    centred only (variance undefined). The cases are picked on the device (no host sync;
    ``torch.compile`` traces it in one graph)."""
    m = mask.to(values.dtype)
    count = m.sum()
    mean = (values * m).sum() / count.clamp(min=1)
    centred = (values - mean) * m
    var = (centred * centred).sum() / (count - 1 if unbiased else count).clamp(min=1)
    whitened = centred * torch.rsqrt(var + eps)
    if shift_mean:
        few = centred
    else:
        whitened = whitened + mean * m
        few = values * m
    out = torch.where(count >= 2, whitened, few) * m
    return torch.where(m != 0, out, torch.zeros_like(out))


def returns_to_go(token_rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """``G_t = r_t + gamma * G_{t+1}`` over the valid tokens of each sequence (masked positions
    are transparent and get 0): GAE with zero values and lam = 1."""
    advantages, _ = gae(token_rewards, torch.zeros_like(token_rewards), mask, gamma, 1.0)
    return advantages


def reinforce_pp_advantages(token_rewards: Tensor, mask: Tensor, gamma: float = 1.0,
                            eps: float = 1e-8, *, unbiased: bool = True) -> Tensor:
    """REINFORCE++: token returns-to-go, whitened over all valid tokens of the batch
    (``unbiased``: Bessel's variance, verl; False: OpenRLHF's population variance)."""
    return masked_whiten(returns_to_go(token_rewards, mask, gamma), mask, eps=eps,
                         unbiased=unbiased)


def reinforce_pp_baseline_advantages(rewards: Tensor, group_size: int | None, mask: Tensor,
                                     eps: float = 1e-8, *, unbiased: bool = True,
                                     singleton: str = "zero",
                                     group_ids: Tensor | None = None) -> Tensor:
    """REINFORCE++ with baseline: ``R - mean_g`` on every valid token, whitened over the batch.
    rewards ``[N]``, mask ``[N, T]`` -> ``[N, T]``. ``unbiased``: the whitening's variance
    (Bessel's: verl; population: OpenRLHF). A group of one: 0 (``singleton="zero"``) or its
    raw score before whitening (``"raw"``, verl). ``group_ids``: groups by id."""
    centred = group_advantages(rewards, group_size, scale="none", singleton=singleton,
                               group_ids=group_ids)
    per_token = centred.unsqueeze(-1).expand(mask.shape).to(torch.float32)
    return masked_whiten(per_token, mask, eps=eps, unbiased=unbiased)


def _group_stats(rewards: Tensor, group_size: int | None, group_ids: Tensor | None
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """(rewards ``[N]`` float32, ``same`` ``[N, N]``, group sizes ``[N]``) for contiguous
    groups of ``group_size`` or for ``group_ids``."""
    if group_ids is None:
        r = _groups(rewards, group_size).reshape(-1)
        ids = torch.arange(r.numel(), device=r.device) // group_size
        same = (ids[:, None] == ids[None, :]).float()
        return r, same, same.sum(-1)
    return _same_group(rewards, group_size, group_ids)


def remax_advantages(token_rewards: Tensor, baselines: Tensor, mask: Tensor
                     ) -> tuple[Tensor, Tensor]:
    """ReMax (verl ``remax``): (advantages, returns) ``[B, T]``, returns the undiscounted
    returns-to-go over valid tokens and advantages ``G_t - b`` with ``b`` ``[B]`` the reward
    of the greedy rollout; 0 at masked positions."""
    if baselines.shape != token_rewards.shape[:1]:
        raise ValueError(f"baselines must have shape [B] = {tuple(token_rewards.shape[:1])}, "
                         f"got {tuple(baselines.shape)}")
    returns = returns_to_go(token_rewards, mask)
    m = mask.to(torch.float32)
    return returns - baselines.float()[:, None] * m, returns


def opo_advantages(rewards: Tensor, lengths: Tensor, group_size: int | None = None, *,
                   group_ids: Tensor | None = None) -> Tensor:
    """OPO (verl ``opo``): ``R_i - sum_g(L_j R_j) / sum_g L_j``, the length-weighted group
    baseline, with ``lengths`` ``[N]`` the response lengths (valid tokens). A group of one
    keeps its raw score (verl's baseline 0). ``[N]``."""
    r, same, n = _group_stats(rewards, group_size, group_ids)
    length = lengths.to(r.dtype)
    baseline = same @ (length * r) / (same @ length).clamp(min=1e-30)
    return torch.where(n == 1, r, r - baseline)


def gpg_advantages(rewards: Tensor, group_size: int | None = None, *, f_norm: float = 1.0,
                   group_ids: Tensor | None = None) -> Tensor:
    """GPG (verl ``gpg``): ``alpha * (R - mean_g) / f_norm`` with ``alpha = N / max(#{R != 0},
    1)``; a group of one keeps ``alpha * R / f_norm`` (verl's mean 0). ``[N]``."""
    r, same, n = _group_stats(rewards, group_size, group_ids)
    alpha = r.numel() / (r != 0).sum().clamp(min=1).to(r.dtype)
    mean = torch.where(n == 1, torch.zeros_like(r), same @ r / n)
    return alpha * (r - mean) / f_norm


def passk_advantages(rewards: Tensor, group_size: int | None = None, *, scale: str = "group",
                     eps: float = 1e-6, group_ids: Tensor | None = None) -> Tensor:
    """Pass@k GRPO (verl ``grpo_passk``): in each group only the best sample (the earliest on
    ties) gets ``r_max - r_second``, divided by ``std_g + eps`` (Bessel) with
    ``scale="group"``, not with ``"none"``; every other sample, and a group of one, gets 0.
    ``[N]``."""
    if scale not in ("group", "none"):
        raise ValueError(f"scale must be 'group' or 'none', got {scale!r}")
    r, same, n = _group_stats(rewards, group_size, group_ids)
    inside = same > 0
    neg_inf = torch.full_like(same, float("-inf"))
    best = torch.where(inside, r[None, :], neg_inf).amax(-1)
    index = torch.arange(r.numel(), device=r.device)
    at_best = inside & (r[None, :] == best[:, None])
    first_best = torch.where(at_best, index[None, :], r.numel()).amin(-1)
    is_best = first_best == index
    others = inside & (index[None, :] != first_best[:, None])
    second = torch.where(others, r[None, :], neg_inf).amax(-1)
    gap = best - second
    if scale == "group":
        mean = same @ r / n
        squares = (same * (r[None, :] - mean[:, None]) ** 2).sum(-1)
        gap = gap / (torch.sqrt(squares / (n - 1).clamp(min=1)) + eps)
    return torch.where(is_best & (n > 1), gap, torch.zeros_like(r))


def gdpo_advantages(components: Tensor, group_size: int | None = None, *,
                    weights: Tensor | None = None, eps: float = 1e-6, final_eps: float = 1e-4,
                    singleton: str = "zero", mask: Tensor | None = None,
                    group_ids: Tensor | None = None) -> Tensor:
    """GDPO: each reward component ``components[:, k]`` (``[N, K]``) normalised in its group,
    ``(r_k - mean_g) / (std_g + eps)`` (Bessel), summed with ``weights`` ``[K]`` (ones by
    default), then normalised over the batch. Without ``mask`` (TRL's
    ``multi_objective_aggregation="normalize_then_sum"``: eps = final_eps = 1e-4):
    ``(A - mean) / (std + final_eps)`` -> ``[N]``. With ``mask`` ``[N, T]`` (verl's ``gdpo``:
    eps 1e-6, singleton "raw"): ``masked_whiten`` of A on every valid token -> ``[N, T]``."""
    if components.dim() != 2:
        raise ValueError(f"components must be [N, K] (one column per reward function), got "
                         f"shape {tuple(components.shape)}")
    k = components.shape[1]
    w = torch.ones(k, device=components.device) if weights is None else weights.float()
    if tuple(w.shape) != (k,):
        raise ValueError(f"weights must have shape [{k}], got {tuple(w.shape)}")
    total = sum(w[j] * group_advantages(components[:, j].contiguous(), group_size, eps=eps,
                                        singleton=singleton, group_ids=group_ids)
                for j in range(k))
    if mask is not None:
        return masked_whiten(total[:, None].expand(mask.shape).contiguous(), mask)
    std = total.std() if total.numel() > 1 else torch.zeros((), device=total.device)
    return (total - total.mean()) / (std + final_eps)


def sum_pi_squared(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``sum_v pi_v^2`` per row of ``logits`` ``[..., V]`` (after ``/ temperature``), float32
    ``[...]``: ``exp(logsumexp(2 z) - 2 logsumexp(z))``, the input of
    ``optimal_token_baseline_advantages`` (verl's ``calculate_sum_pi_squared``). No gradient."""
    z = logits.detach().float() / temperature
    return torch.exp(torch.logsumexp(2 * z, -1) - 2 * torch.logsumexp(z, -1))


def optimal_token_baseline_advantages(
    token_rewards: Tensor, mask: Tensor, old_logprobs: Tensor, sum_pi_sq: Tensor,
    group_size: int | None = None, *, group_ids: Tensor | None = None,
    rollout_weights: Tensor | None = None, handle_zero_tail: bool = True, eps: float = 1e-8,
) -> tuple[Tensor, Tensor]:
    """verl's optimal token baseline: (advantages, returns) float32 ``[N, T]``, 0 at masked
    positions.

    G_t: the returns-to-go of the masked rewards; w_t = 1 - 2 pi_t + sum_v pi_v^2 with
    pi_t = exp(old_logprobs), times rho_t^2 with ``rollout_weights``; W_t = sum_{j <= t} m_j
    w_j; per group and column t, B_t = sum_i m G W / (sum_i m W + eps) and A = (G - B) m. A
    group of one has B = 0. ``handle_zero_tail``: the group's single longest response gets
    B = 0 from the column of the second-longest length on (lengths count valid tokens)."""
    n, steps = token_rewards.shape
    ids = group_ids
    if ids is None:
        _groups(token_rewards[:, 0].contiguous(), group_size)   # checks group_size
        ids = torch.arange(n, device=token_rewards.device) // group_size
    _, same, size = _same_group(token_rewards[:, 0].contiguous(), None, ids)
    m = mask.to(torch.float64)
    returns = (token_rewards.double() * m).flip(-1).cumsum(-1).flip(-1)
    w = 1 - 2 * torch.exp(old_logprobs.double()) + sum_pi_sq.double()
    if rollout_weights is not None:
        w = w * rollout_weights.double() ** 2
    cumulative = (w * m).cumsum(-1)
    same = same.double()
    baseline = (same @ (returns * cumulative * m)) / ((same @ (cumulative * m)) + eps)
    baseline = torch.where(size[:, None] > 1, baseline, torch.zeros_like(baseline))
    if handle_zero_tail:
        lengths = m.sum(-1)
        others = same * (1 - torch.eye(n, dtype=same.dtype, device=same.device))
        second = torch.where(others > 0, lengths[None, :], -1.0).amax(-1)
        longest = (lengths > second) & (size > 1)
        columns = torch.arange(steps, device=m.device)[None, :]
        tail = longest[:, None] & (columns >= second[:, None])
        baseline = torch.where(tail, torch.zeros_like(baseline), baseline)
    return ((returns - baseline) * m).float(), (returns * m).float()
