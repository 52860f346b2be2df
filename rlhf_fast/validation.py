"""Input checks shared by the ops: clear errors naming the argument and what was expected."""

from __future__ import annotations

import math
import os
from collections.abc import Callable

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
    """Data-dependent checks (target range) are on unless ``RLHF_FAST_CHECK_TARGETS=0``."""
    return os.environ.get("RLHF_FAST_CHECK_TARGETS", "1") != "0"


def host_reads_are_free(t: Tensor) -> bool:
    """Whether reading ``t``'s values on the host costs no device synchronisation: CPU tensors
    in eager mode. Everywhere else (CUDA; anything traced by ``torch.compile``) the ops read
    nothing on the host. The one place that decides it (tests switch it off to run the
    device paths on the CPU)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def device_check(ok: Tensor, message: Callable[[], str], error: type[Exception] = ValueError
                 ) -> None:
    """Raise ``error(message())`` unless the bool scalar ``ok`` is true, without a host sync.

    On CPU tensors in eager mode the value is read directly (no device to wait for) and the
    error is raised at once with a detailed message. On an accelerator, and whenever the call
    is being traced by ``torch.compile``, the check is ``torch._assert_async``: it runs on the
    device and fails at the next synchronisation (on CUDA as a device-side assertion, which
    ends the process's CUDA context, as an out-of-range target does in ``cross_entropy``).
    """
    if host_reads_are_free(ok):
        if not bool(ok):
            raise error(message())
        return
    torch._assert_async(ok, message())


def check_target_range(targets: Tensor, n_cols: int, ignore_index: int) -> None:
    """Every target is in ``[0, V)`` or equals ``ignore_index`` (``device_check``: no host
    sync). With ``RLHF_FAST_CHECK_TARGETS=0`` it is skipped and a target out of range gives
    NaN for its row (the kernels never read out of bounds)."""
    if not target_checks_enabled() or targets.numel() == 0:
        return
    bad = ((targets < 0) | (targets >= n_cols)) & (targets != ignore_index)

    def message() -> str:
        text = f"targets must lie in [0, {n_cols}) or equal ignore_index={ignore_index}"
        if host_reads_are_free(bad):
            first = targets[bad].flatten()[0].item()
            text += f"; found {int(bad.sum())} out of range (first: {first})"
        return text

    device_check(~bad.any(), message)


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


def check_mask(mask: object, expected: tuple[int, ...], like: Tensor,
               name: str = "mask") -> Tensor:
    """A bool or 0/1 tensor of shape ``expected`` on ``like``'s device (metadata only; the
    values of a non-bool mask are checked by ``mask_to_bool``). ``name``: the argument's."""
    if not isinstance(mask, Tensor) or mask.dtype.is_complex:
        raise TypeError(f"{name} must be a bool or 0/1 tensor of shape {expected}, got "
                        f"{type(mask).__name__ if not isinstance(mask, Tensor) else mask.dtype}")
    if tuple(mask.shape) != expected:
        raise ValueError(f"{name} must have shape {expected}, got {tuple(mask.shape)}")
    if mask.device != like.device:
        raise ValueError(f"{name} is on {mask.device} but logits are on {like.device}")
    return mask


def mask_to_bool(mask: Tensor) -> Tensor:
    """``mask`` as bool. A mask selects tokens: a float or integer mask must hold only 0 and 1
    (``device_check``, no host sync). Soft masks are rejected rather than read as weights:
    every normaliser, sequence length, sequence mean and metric of the losses counts tokens,
    and a weight would have to mean something different in each of them. Per-token weights
    of the policy term go in ``advantages`` ``[B, T]``."""
    if mask.dtype == torch.bool:
        return mask
    ok = ((mask == 0) | (mask == 1)).all()
    device_check(ok, lambda: (
        "mask must be bool or hold only 0 and 1 (it selects tokens; soft weights are not "
        "supported: put per-token weights of the policy term in advantages [B, T])"
        + (f"; found {mask[(mask != 0) & (mask != 1)].flatten()[0].item()!r}"
           if host_reads_are_free(mask) else "")))
    return mask != 0


def check_loss_scale(loss_scale: object) -> float:
    """A finite Python number > 0 (for example ``1 / grad_accum_steps``). Not a tensor: its
    value would have to be read on the host."""
    if isinstance(loss_scale, (Tensor, bool)):
        raise TypeError(f"loss_scale must be a Python float, got {type(loss_scale).__name__}")
    try:
        value = float(loss_scale)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TypeError(f"loss_scale must be a float, got {loss_scale!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"loss_scale must be finite and > 0, got {value}")
    return value


def check_inplace(logits: Tensor, writes_grad: bool) -> None:
    """``inplace=True`` overwrites ``logits`` with their gradient: refuse what autograd refuses
    to modify in place (a leaf that requires grad, or a view of one) and rows that are not
    contiguous in their last dimension. ``writes_grad``: a gradient is computed (grad mode
    on and logits requiring grad); without one nothing is written."""
    if logits.stride(-1) != 1:
        raise ValueError("inplace=True writes the gradient over the logits, which needs a "
                         f"contiguous last dimension; got strides {tuple(logits.stride())}")
    if not writes_grad:
        return
    if logits.is_leaf:
        raise RuntimeError("inplace=True: logits is a leaf tensor that requires grad, which "
                           "cannot be modified in place (PyTorch refuses it too); pass "
                           "inplace=False, or logits computed by the model (a non-leaf)")
    base = logits._base
    if base is not None and base.is_leaf and base.requires_grad:
        raise RuntimeError("inplace=True: logits is a view of a leaf tensor that requires "
                           "grad, which cannot be modified in place (PyTorch refuses it "
                           "too); pass inplace=False")
