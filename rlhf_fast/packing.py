"""``cu_seqlens`` for packed (padding-free) batches from what data pipelines hand out.

Every op takes a packed batch as ``cu_seqlens`` ``[S + 1]`` int32 offsets (sequence i at rows
``cu_seqlens[i]:cu_seqlens[i + 1]``; ``rlhf_fast/ops/packing.py``). Padding-free pipelines
(Hugging Face's ``DataCollatorWithFlattening``, TRL's ``padding_free``, verl's remove-padding
path) hand out ``position_ids`` that restart at 0 at each sequence start, shape ``[1, N]`` or
``[N]``, and sometimes per-token sequence ids. The two functions here turn those into
``cu_seqlens``.

Both read their input on the host once: S, the length of the result, depends on the values,
so no device code can produce it without a sync. Call them in the data pipeline (the
collator, the batch preparation), once per batch, and pass the result to the ops, which
themselves never read a value on the host (so they compile without graph breaks). This is
why the ops take ``cu_seqlens`` and not ``position_ids``.
"""

from __future__ import annotations

import torch
from torch import Tensor

INT32_MAX = 2**31 - 1


def _packed_row(x: object, name: str, what: str) -> Tensor:
    """``x`` as an int64 ``[N]`` CPU tensor, after checking it is an int32 / int64 tensor of
    shape ``[N]`` or ``[1, N]`` (one packed row)."""
    if not isinstance(x, Tensor) or x.dtype not in (torch.int32, torch.int64):
        got = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"{name} must be an int32 (or int64) tensor [N] or [1, N] of {what}, "
                        f"got {got}")
    if not (x.dim() == 1 or (x.dim() == 2 and x.shape[0] == 1)):
        raise ValueError(f"{name} must be one packed row [N] or [1, N] of {what}, got shape "
                         f"{tuple(x.shape)} (a padded [B, T] batch needs no cu_seqlens)")
    if x.shape[-1] > INT32_MAX:
        raise ValueError(f"{name} holds {x.shape[-1]} tokens, more than int32 cu_seqlens hold")
    return x.reshape(-1).to("cpu", torch.int64)  # the one host read


def _first_bad(bad: Tensor) -> int:
    return int(bad.nonzero()[0, 0])


def cu_seqlens_from_position_ids(position_ids: Tensor, *, start: int = 0) -> Tensor:
    """int32 ``cu_seqlens`` ``[S + 1]`` of a packed batch from its ``position_ids``.

    Args:
        position_ids: int32 / int64 ``[N]`` or ``[1, N]``, the positions of the N packed
            tokens: each sequence's positions are ``start, start + 1, ...``, so a sequence
            begins wherever the position is ``start`` (``DataCollatorWithFlattening``'s
            ``position_ids``; ``start`` is its ``position_ids_start``, 0 unless set).
        start: the first position of every sequence.

    Returns:
        int32 ``[S + 1]`` on ``position_ids``' device: 0, then the index of each later
        sequence start, then N. S is the number of positions equal to ``start``; N = 0 gives
        ``[0]`` (no sequence). A length-1 sequence is a ``start`` followed by another.

    The first position must be ``start`` and every later one either ``start`` (a new
    sequence) or the previous one + 1; anything else raises ``ValueError`` naming the first
    offending index. Transformers' flash-attention path only looks for the minimum position
    and would read a truncated, shuffled or multi-row tensor as some other set of sequences;
    here that is an error. Empty sequences have no tokens, so they cannot appear: use
    ``cu_seqlens_from_sequence_ids`` with ``num_sequences`` for those.

    Reads ``position_ids`` on the host once (a device sync: S depends on the values), so it
    belongs in the data pipeline, not inside a compiled training step.
    """
    pos = _packed_row(position_ids, "position_ids", "positions restarting at each sequence")
    n = pos.shape[0]
    if n == 0:
        return torch.zeros(1, dtype=torch.int32, device=position_ids.device)
    if pos[0] != start:
        raise ValueError(f"position_ids must start at {start} (the first sequence's first "
                         f"position), got {int(pos[0])} at index 0")
    restarts = pos == start
    continues = torch.zeros_like(restarts)
    continues[1:] = pos[1:] == pos[:-1] + 1
    bad = ~(restarts | continues)
    if bad.any():
        i = _first_bad(bad)
        raise ValueError(f"position_ids[{i}] = {int(pos[i])} neither restarts a sequence at "
                         f"{start} nor continues the previous position {int(pos[i - 1])} by "
                         f"+1 (positions must be {start}, {start + 1}, ... per sequence)")
    ends = torch.tensor([n], dtype=torch.int64)
    cu = torch.cat([restarts.nonzero().reshape(-1), ends])
    return cu.to(device=position_ids.device, dtype=torch.int32)


def cu_seqlens_from_sequence_ids(sequence_ids: Tensor, *,
                                 num_sequences: int | None = None) -> Tensor:
    """int32 ``cu_seqlens`` ``[S + 1]`` of a packed batch from each token's sequence index.

    Args:
        sequence_ids: int32 / int64 ``[N]`` or ``[1, N]``, non-decreasing: token j belongs
            to sequence ``sequence_ids[j]`` (``DataCollatorWithFlattening``'s ``seq_idx``).
            The value is the sequence's index (its row of per-sequence tensors such as
            ``advantages`` ``[S]``), so an index with no token is an empty sequence.
        num_sequences: S; None means ``max(sequence_ids) + 1`` (0 when N = 0). Pass it when
            the last sequences may be empty.

    Returns:
        int32 ``[S + 1]`` on ``sequence_ids``' device: ``cu_seqlens[i + 1]`` is the number of
        tokens with index <= i.

    Negative, decreasing or (with ``num_sequences``) out-of-range indices raise
    ``ValueError``. Reads ``sequence_ids`` on the host once (a device sync: S depends on the
    values), so it belongs in the data pipeline, not inside a compiled training step.
    """
    ids = _packed_row(sequence_ids, "sequence_ids", "per-token sequence indices")
    if num_sequences is not None and (not isinstance(num_sequences, int) or num_sequences < 0):
        raise ValueError(f"num_sequences must be a non-negative int, got {num_sequences!r}")
    if ids.numel() and ids.min() < 0:
        i = _first_bad(ids < 0)
        raise ValueError(f"sequence_ids must be >= 0, got {int(ids[i])} at index {i}")
    if ids.numel() > 1 and (ids[1:] < ids[:-1]).any():
        i = _first_bad(ids[1:] < ids[:-1]) + 1
        raise ValueError(f"sequence_ids must never decrease (each sequence's tokens back to "
                         f"back), got {int(ids[i - 1])} then {int(ids[i])} at index {i}")
    seen = int(ids[-1]) + 1 if ids.numel() else 0
    if num_sequences is None:
        num_sequences = seen
    elif seen > num_sequences:
        raise ValueError(f"sequence_ids holds index {seen - 1} but num_sequences = "
                         f"{num_sequences}")
    cu = torch.zeros(num_sequences + 1, dtype=torch.int64)
    cu[1:] = torch.bincount(ids, minlength=num_sequences).cumsum(0)
    return cu.to(device=sequence_ids.device, dtype=torch.int32)


__all__ = ["cu_seqlens_from_position_ids", "cu_seqlens_from_sequence_ids"]
