"""Input checks shared by the ops: clear errors naming the argument and what was expected."""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_logits(logits: object, name: str = "logits") -> None:
    """``[B, T, V]`` or ``[N, V]``, float32/bfloat16/float16, V >= 1."""
    if not isinstance(logits, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in LOGIT_DTYPES:
        raise TypeError(
            f"{name} must be float32, bfloat16 or float16, got {logits.dtype} "
            f"(the float64 ground truth is rlhf_fast.reference)"
        )
    if logits.dim() not in (2, 3):
        raise ValueError(f"{name} must be [B, T, V] or [N, V], got shape {tuple(logits.shape)}")
    if logits.shape[-1] < 1:
        raise ValueError(f"{name} must have a vocabulary dimension V >= 1, got shape "
                         f"{tuple(logits.shape)}")


def check_token_tensor(x: object, name: str, like: Tensor, *, integer: bool = False) -> None:
    """A per-token tensor of shape ``like.shape[:-1]`` on ``like``'s device."""
    expected = tuple(like.shape[:-1])
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {expected}, "
                        f"got {type(x).__name__}")
    if integer and x.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be int64 or int32, got {x.dtype}")
    if tuple(x.shape) != expected:
        raise ValueError(f"{name} must have shape {expected} (logits.shape[:-1]), "
                         f"got {tuple(x.shape)}")
    if x.device != like.device:
        raise ValueError(f"{name} is on {x.device} but logits are on {like.device}")


def check_temperature(temperature: object) -> float:
    """A finite float > 0."""
    try:
        value = float(temperature)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TypeError(f"temperature must be a positive float, got {temperature!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"temperature must be finite and > 0, got {value}")
    return value


def target_checks_enabled() -> bool:
    """Data-dependent checks (one host sync) are on unless ``RLHF_FAST_CHECK_TARGETS=0``."""
    return os.environ.get("RLHF_FAST_CHECK_TARGETS", "1") != "0"


def check_target_range(targets: Tensor, n_cols: int, ignore_index: int) -> None:
    """Every target is in ``[0, V)`` or equals ``ignore_index``.

    Costs one device-to-host sync. With ``RLHF_FAST_CHECK_TARGETS=0`` it is skipped and a
    target out of range gives NaN for its row (the kernels never read out of bounds).
    """
    if not target_checks_enabled() or targets.numel() == 0:
        return
    bad = ((targets < 0) | (targets >= n_cols)) & (targets != ignore_index)
    if bool(bad.any()):
        first = targets[bad].flatten()[0].item()
        raise ValueError(
            f"targets must lie in [0, {n_cols}) or equal ignore_index={ignore_index}; "
            f"found {int(bad.sum())} out of range (first: {first})"
        )


def float_token_tensor(x: object, name: str, logits: Tensor, flat: bool) -> Tensor | None:
    """None, or a float per-token tensor (``[B, T]``; ``[N]`` for flattened logits) returned
    as float32 ``[B, T]``. ``logits`` is already ``[B, T, V]`` (``[1, N, V]`` when flat)."""
    if x is None:
        return None
    expected = tuple(logits.shape[1:2]) if flat else tuple(logits.shape[:2])
    if not isinstance(x, Tensor) or not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be None or a float tensor of shape {expected}")
    if tuple(x.shape) != expected:
        raise ValueError(f"{name} must have shape {expected}, got {tuple(x.shape)}")
    if x.device != logits.device:
        raise ValueError(f"{name} is on {x.device} but logits are on {logits.device}")
    return x.float().reshape(logits.shape[:2])


def check_mask(mask: object, expected: tuple[int, ...], like: Tensor) -> Tensor:
    """A bool or 0/1 tensor of shape ``expected`` on ``like``'s device, returned as bool."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a bool or 0/1 tensor of shape {expected}, got "
                        f"{type(mask).__name__}")
    if tuple(mask.shape) != expected:
        raise ValueError(f"mask must have shape {expected}, got {tuple(mask.shape)}")
    if mask.device != like.device:
        raise ValueError(f"mask is on {mask.device} but logits are on {like.device}")
    return mask if mask.dtype == torch.bool else mask != 0
