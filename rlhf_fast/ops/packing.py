"""Sequence layouts of a batch: padded rows ``[B, T]`` or packed tokens with ``cu_seqlens``.

Packed (padding-free) batches are the layout of flash-attn's varlen kernels, verl's
remove-padding and TRL's padding-free mode: the tokens of S sequences back to back, rows
``[N, ...]``, and ``cu_seqlens`` ``[S + 1]`` (int32; int64 is accepted) with sequence i at
rows ``cu_seqlens[i]:cu_seqlens[i + 1]``, ``cu_seqlens[0] = 0`` and ``cu_seqlens[S] = N``.
An empty sequence repeats an offset. Inside the ops a packed batch is one row of N tokens,
per-token tensors ``[1, N]``.

The coefficient steps see a layout through two operations, so the same code serves both
layouts: ``seq_sum(x)`` (per-token -> per-sequence, ``[S]``) and ``per_token(s)`` (per-sequence
``[S]`` -> a tensor that broadcasts against the per-token ones), plus ``num_sequences``. For a
padded batch they are ``x.sum(-1)`` and ``s.unsqueeze(-1)``: the padded results do not change
by a bit. For a packed one they are an ``index_add_`` over the tokens' sequence ids and a
gather; no value is read on the host (the ids come from ``searchsorted`` on the device).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..validation import device_check, host_reads_are_free


class Padded:
    """Per-token tensors ``[B, T]``: sequence i is row i."""

    def __init__(self, batch: int):
        self.num_sequences = batch

    def seq_sum(self, x: Tensor) -> Tensor:
        """Per-sequence sums ``[B]`` of a per-token tensor ``[B, T]``."""
        return x.sum(-1)

    def per_token(self, s: Tensor) -> Tensor:
        """``[B]`` per-sequence values as ``[B, 1]``, broadcasting against ``[B, T]``."""
        return s.unsqueeze(-1)

    def first(self, x: Tensor) -> Tensor:
        """Each sequence's first per-token value ``[B]`` (of ``[B, T]``; T >= 1)."""
        return x[:, 0] if x.shape[-1] > 0 else x.new_zeros(x.shape[0])


class Packed:
    """Per-token tensors ``[1, N]`` holding S sequences back to back (module docstring)."""

    def __init__(self, seq_ids: Tensor, num_sequences: int):
        self.seq_ids = seq_ids                  # int64 [N]: each token's sequence
        self.num_sequences = num_sequences

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: Tensor, n_tokens: int) -> Packed:
        """The layout of ``cu_seqlens`` ``[S + 1]`` over ``n_tokens`` tokens; its values are
        checked on the device (``check_cu_seqlens_values``)."""
        check_cu_seqlens_values(cu_seqlens, n_tokens)
        ends = cu_seqlens[1:].to(torch.int64).contiguous()
        positions = torch.arange(n_tokens, device=cu_seqlens.device)
        return cls(torch.searchsorted(ends, positions, right=True), cu_seqlens.shape[0] - 1)

    def seq_sum(self, x: Tensor) -> Tensor:
        """Per-sequence sums ``[S]`` of a per-token tensor ``[1, N]`` (or ``[N]``), in its
        dtype."""
        flat = x.reshape(-1)
        return flat.new_zeros(self.num_sequences).index_add_(0, self.seq_ids, flat)

    def per_token(self, s: Tensor) -> Tensor:
        """``[S]`` per-sequence values as ``[1, N]``: each token gets its sequence's value."""
        return s.index_select(0, self.seq_ids).unsqueeze(0)

    def first(self, x: Tensor) -> Tensor:
        """Each sequence's first per-token value ``[S]`` of ``[1, N]`` (an empty sequence gets
        a neighbour's value: callers mask its tokens, which do not exist)."""
        flat = x.reshape(-1)
        if flat.numel() == 0:
            return flat.new_zeros(self.num_sequences)
        ids = torch.arange(self.num_sequences, device=flat.device)
        starts = torch.searchsorted(self.seq_ids, ids).clamp(max=flat.numel() - 1)
        return flat.index_select(0, starts)


Layout = Padded | Packed


def check_cu_seqlens(cu_seqlens: object, like: Tensor, name: str = "cu_seqlens") -> int:
    """``cu_seqlens`` is a 1-D int32 / int64 tensor ``[S + 1]`` on ``like``'s device (shape and
    dtype only, no value is read): return S."""
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dtype not in (torch.int32, torch.int64):
        got = cu_seqlens.dtype if isinstance(cu_seqlens, Tensor) else type(cu_seqlens).__name__
        raise TypeError(f"{name} must be an int32 (or int64) tensor [S + 1] of sequence "
                        f"offsets, got {got}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
        raise ValueError(f"{name} must be 1-D [S + 1] (S sequences: 0, then each sequence's "
                         f"end offset), got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != like.device:
        raise ValueError(f"{name} is on {cu_seqlens.device} but the inputs are on "
                         f"{like.device}")
    return cu_seqlens.shape[0] - 1


def check_cu_seqlens_values(cu_seqlens: Tensor, n_tokens: int) -> None:
    """``cu_seqlens[0] == 0``, non-decreasing, ``cu_seqlens[-1] == n_tokens``, checked on the
    device (``device_check``: no host sync)."""
    c = cu_seqlens.to(torch.int64)
    ok = (c[0] == 0) & (c[-1] == n_tokens)
    if c.shape[0] > 1:
        ok = ok & (c[1:] >= c[:-1]).all()

    def message() -> str:
        text = (f"cu_seqlens must start at 0, never decrease and end at the number of packed "
                f"tokens N = {n_tokens}")
        if host_reads_are_free(c):
            shown = c[:8].tolist()
            text += f"; got {shown}{' ...' if c.shape[0] > 8 else ''} (last {int(c[-1])})"
        return text

    device_check(ok, message)


def expand_advantages(advantages: Tensor, layout: Layout, like: Tensor) -> Tensor:
    """Per-token float32 advantages shaped like ``like`` (``[B, T]`` or ``[1, N]``) from
    per-sequence ``[B]`` / ``[S]`` or per-token ones."""
    if advantages.dim() == 1:
        return layout.per_token(advantages).expand_as(like)
    return advantages
