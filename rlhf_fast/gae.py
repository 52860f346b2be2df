"""Generalised advantage estimation on ``[B, T]``: Triton kernel or torch path.

    delta_t = r_t + gamma * V_{t+1} - V_t,   A_t = delta_t + gamma * lam * A_{t+1},
    R_t = A_t + V_t,   with V_{T} = A_{T} = 0 past the last valid token.

Masked positions (multi-turn tool output, padding) are skipped by default
(``masked_gaps="skip"``): the recursion carries ``V_{t+1}`` and ``A_{t+1}`` across them
unchanged (verl's convention). ``masked_gaps="zero"`` is OpenRLHF's: rewards and values are
zeroed at masked positions and the recursion runs through them, so a gap of k positions
discounts what lies beyond it by (gamma * lam)^k and cuts V_{t+1} to 0 at its edge. Either
way masked positions get ``A = R = 0``. Whitening is separate
(``rlhf_fast.advantages.masked_whiten``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .backend import BACKENDS, resolve_backend
from .ops.launch import cdiv

BLOCK_B = 32
"""Sequences per program: one warp's worth of independent recurrences."""


def _check(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> None:
    for name, x in (("rewards", rewards), ("values", values)):
        if not isinstance(x, Tensor) or not x.dtype.is_floating_point or x.dim() != 2:
            raise TypeError(f"{name} must be a float [B, T] tensor")
    if values.shape != rewards.shape or tuple(mask.shape) != tuple(rewards.shape):
        raise ValueError(f"rewards, values and mask must share the shape [B, T]; got "
                         f"{tuple(rewards.shape)}, {tuple(values.shape)}, {tuple(mask.shape)}")
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"gamma and lam must lie in [0, 1], got {gamma}, {lam}")


def _gae_torch(r: Tensor, v: Tensor, m: Tensor, gamma: float, lam: float):
    # The recurrence in float64, like the kernel; results in float32.
    r, v = r.double(), v.double()
    adv = torch.zeros_like(r)
    ret = torch.zeros_like(r)
    next_value = torch.zeros_like(r[:, 0])
    next_adv = torch.zeros_like(r[:, 0])
    for t in range(r.shape[1] - 1, -1, -1):
        step = r[:, t] + gamma * next_value - v[:, t] + gamma * lam * next_adv
        valid = m[:, t] > 0
        next_value = torch.where(valid, v[:, t], next_value)
        next_adv = torch.where(valid, step, next_adv)
        adv[:, t] = torch.where(valid, step, 0.0)
        ret[:, t] = torch.where(valid, step + v[:, t], 0.0)
    return adv.float(), ret.float()


def _gae_triton(r: Tensor, v: Tensor, m: Tensor, gamma: float, lam: float):
    from .kernels.gae import gae_kernel

    adv = torch.empty_like(r)
    ret = torch.empty_like(r)
    n_seq, n_steps = r.shape
    if r.numel():
        gae_kernel[(cdiv(n_seq, BLOCK_B),)](r, v, m, adv, ret, n_seq, n_steps, gamma, lam,
                                            BLOCK_B=BLOCK_B, num_warps=1)
    return adv, ret


MASKED_GAPS = ("skip", "zero")
"""``gae(masked_gaps=...)``: verl's skip, OpenRLHF's zeroed rewards and values."""


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 1.0,
        *, backend: str = "auto", masked_gaps: str = "skip") -> tuple[Tensor, Tensor]:
    """Advantages and returns, float32 ``[B, T]`` (0 at masked positions), computed in float64.

    rewards, values: float ``[B, T]`` (token rewards, e.g. ``-beta * kl_t`` plus the score at
    the last valid token; value estimates); mask: ``[B, T]`` bool or 0/1; gamma, lam in
    [0, 1] (verl's defaults are 1 and 1); masked_gaps: ``"skip"`` (verl) or ``"zero"``
    (OpenRLHF; module docstring). No gradient flows.
    """
    _check(rewards, values, mask, gamma, lam)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if masked_gaps not in MASKED_GAPS:
        raise ValueError(f"masked_gaps must be one of {MASKED_GAPS}, got {masked_gaps!r}")
    r = rewards.detach().float().contiguous()
    v = values.detach().float().contiguous()
    m = mask.detach().to(torch.float32).contiguous()
    if masked_gaps == "skip":
        return gae_op(r, v, m, float(gamma), float(lam), backend)
    # OpenRLHF: zeroed rewards and values, the recursion over every position (trailing
    # padding adds 0); the masked outputs are then set to 0 like the skip mode's.
    adv, ret = gae_op((r * m).contiguous(), (v * m).contiguous(), torch.ones_like(m),
                      float(gamma), float(lam), backend)
    return adv * m, ret * m


@torch.library.custom_op("rlhf_fast::gae", mutates_args=())
def gae_op(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float,
           backend: str) -> tuple[Tensor, Tensor]:
    """(advantages, returns) float32 ``[B, T]`` of contiguous float32 inputs: one opaque node
    for ``torch.compile`` (the recurrence is a Triton kernel or a loop over T)."""
    if resolve_backend(backend, rewards) == "triton":
        return _gae_triton(rewards, values, mask, gamma, lam)
    return _gae_torch(rewards, values, mask, gamma, lam)


@gae_op.register_fake
def _gae_fake(rewards, values, mask, gamma, lam, backend):
    return torch.empty_like(rewards), torch.empty_like(rewards)

