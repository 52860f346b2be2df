"""Packed (padding-free) batches for the tests: the tokens of padded rows, back to back.

``pack(x, lengths)`` keeps the first ``lengths[i]`` positions of row ``i`` of a padded
``[S, T, ...]`` tensor (an empty sequence has length 0), so a packed op's results can be
compared with the padded op's and with the float64 reference on the padded layout, and
``unpack`` puts per-token results back at their padded positions (0 elsewhere).
"""

import torch


def lengths_for(batch: int, seq_len: int, seed: int = 0, empty: int | None = 1) -> torch.Tensor:
    """Per-sequence lengths in ``[1, T]``, the first sequence full and sequence ``empty``
    (when not None) of length 0."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, seq_len + 1, (batch,), generator=g)
    lengths[0] = seq_len
    if empty is not None:
        lengths[empty] = 0
    return lengths


def cu_seqlens(lengths: torch.Tensor, device="cpu") -> torch.Tensor:
    """int32 ``[S + 1]`` offsets of sequences of ``lengths``."""
    cu = torch.zeros(lengths.shape[0] + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    return cu.to(device)


def present(lengths: torch.Tensor, seq_len: int) -> torch.Tensor:
    """bool ``[S, T]``: the positions a packed batch holds."""
    return torch.arange(seq_len) < lengths.unsqueeze(-1)


def pack(x: torch.Tensor | None, lengths: torch.Tensor) -> torch.Tensor | None:
    """The present positions of ``[S, T, ...]``, rows ``[N, ...]`` (None stays None)."""
    if x is None:
        return None
    return x[present(lengths, x.shape[1]).to(x.device)]


def unpack(x: torch.Tensor, lengths: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Packed rows ``[N, ...]`` back to ``[S, T, ...]``, zeros where nothing was packed."""
    out = x.new_zeros((lengths.shape[0], seq_len, *x.shape[1:]))
    out[present(lengths, seq_len).to(x.device)] = x
    return out
