"""Vocabulary-parallel row statistics: each rank of a tensor-parallel group holds a contiguous
slice of the vocabulary columns (docs/architecture.md, Vocabulary-parallel ops).

Rank r holds columns ``[offset_r, offset_r + V_r)`` of every row (slices may be uneven, none
empty); targets are full-vocabulary ids on every rank. The existing row sweeps
(``row_sweeps.py``) run on each rank's slice unchanged; only their per-row statistics cross
ranks, so every rank gets exactly the full-vocabulary log-probs, entropies and coefficients,
and writes the gradient of its own slice.

Forward (``sharded_stats_sweep``), per row, z = logits / temperature:

1. the local stats sweep over the slice, with the target moved into the slice: its local
   column on the rank that holds it (the owner), a stand-in column elsewhere. It gives
   ``m_r`` (the slice's max), ``s_r = sum_{v in r} exp(z_v - m_r)``, ``q_r`` (the owner's
   ``1 - p_y`` within the slice) and ``H_r``, whence ``a_r = log s_r - H_r =
   sum_v exp(z_v - m_r) (z_v - m_r) / s_r``;
2. ``M = max_r m_r``: one all-reduce (MAX) of 1 float32 per row;
3. one all-reduce (SUM) of 4 float32 per row (5 with the entropy), w_r = exp(m_r - M):

       S      = sum_r w_r s_r                          (sum exp(z - M) over the vocabulary)
       S_excl = sum_r w_r s_r (q_r on the owner, 1 elsewhere)     (S minus the target's)
       x_y    = the target's logit (from the owner, 0 elsewhere)
       owners = the number of ranks whose slice holds the target (1 when it is in range)
       T      = sum_r w_r s_r (a_r + m_r - M)          (only with the entropy)
       Q      = sum_r (w_r s_r)^2 e^(l_r)              (only for WPO's ln sum_v p_v^2: l_r
                                                        is the slice's own ln sum p^2)

4. on every rank, the same ``[N]`` arithmetic as the single-process sweep:

       d_y = z_y - M,   log S = log1p(S_excl + expm1(d_y))   (exact when p_y -> 1)
       logp = d_y - log S,   1 - p_y = S_excl / S,   H = log S - T / S,
       ln sum_v p_v^2 = ln Q - 2 log S

Backward: nothing is communicated. The gradient sweep of each rank's slice needs only
``(M, log S)``, the entropy and the per-token coefficients, which every rank holds; on the
ranks that do not hold the target, the stand-in column is given ``q = -p`` of that column,
so the sweep's target term ``c * q`` writes the plain ``-c * p`` there.

Bytes communicated per row and forward (all-reduce payloads; a ring all-reduce puts
2 (P - 1) / P times that on each link): 4 (MAX) + 16 (SUM), or 4 + 20 with the entropy
(policy losses always compute it): 20 or 24 bytes, 4 more for WPO's sum of squares,
whatever V and P; ``[N, V]`` data never
moves (``tests/test_vocab_parallel.py`` counts them). The shard's offset is all-gathered once
per (group, slice width) and cached, unless given (``vocab_offset``). The fused-linear ops
also all-reduce dL/dhidden (``[N, D]`` in the hidden dtype), the sum over the slices of
``dL/dlogits_r @ W_r``, as a column-parallel ``lm_head`` does in its backward.

The group travels into the custom ops inside the ``backend`` string
(``"auto@vocab:<group name>:<offset>:<chunk width>"``, ``shard_backend``), so they keep their
schemas and stay opaque nodes for ``torch.compile``; the row sweeps split it off again
(``split_backend``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from ..validation import device_check, target_checks_enabled

SHARD_TAG = "@vocab:"
"""Separates the backend name from the shard in a ``backend`` string."""

MAX_FLOATS_PER_ROW = 1
"""float32 values per row in the forward's MAX all-reduce (the row max)."""

SUM_FLOATS_PER_ROW = 4
"""float32 values per row in the forward's SUM all-reduce without the entropy (S, S_excl,
the target logit, the owner count); the entropy adds one (T)."""

_LAYOUTS: dict[tuple[str, int], tuple[int, int]] = {}
"""(column offset, widest slice) already gathered, by (group name, local slice width)."""


@dataclass(frozen=True)
class VocabShard:
    """This rank's slice of the vocabulary."""

    group: dist.ProcessGroup
    """The tensor-parallel group whose ranks hold the slices."""
    offset: int
    """The full-vocabulary id of the slice's first column."""
    chunk_width: int
    """The slice width every rank sizes its chunks by (the fused-linear ops cut the batch
    into the same chunks on every rank): the widest slice, or this rank's own width when
    ``vocab_offset`` was given."""


def bytes_per_row(with_entropy: bool, with_sum_sq: bool = False) -> int:
    """Bytes one rank sends into the all-reduces per row of a forward (float32 payloads)."""
    return 4 * (MAX_FLOATS_PER_ROW + SUM_FLOATS_PER_ROW + int(with_entropy) + int(with_sum_sq))


def slice_layout(group: dist.ProcessGroup, n_local: int,
                 device: torch.device) -> tuple[int, int]:
    """(this rank's first column, the widest slice): the slice widths, all-gathered once per
    (group, width) and cached (a group's slices are fixed for the life of the process; pass
    ``vocab_offset`` explicitly otherwise). Under ``torch.compile`` the cached layout is a
    constant of the graph; the gather itself must have run eagerly (or pass
    ``vocab_offset``)."""
    key = (group.group_name, n_local)
    if key not in _LAYOUTS:
        if torch.compiler.is_compiling():
            raise RuntimeError(
                "process_group under torch.compile: the vocabulary slices' layout is gathered "
                "on the first call, which must run eagerly (call the op once outside the "
                "compiled function), or pass vocab_offset= (then nothing is gathered)")
        if dist.get_backend(group) == "nccl" and device.type != "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        width = torch.tensor([n_local], dtype=torch.int64, device=device)
        widths = [torch.empty_like(width) for _ in range(dist.get_world_size(group))]
        dist.all_gather(widths, width, group=group)
        sizes = [int(w) for w in widths]
        _LAYOUTS[key] = (sum(sizes[:dist.get_rank(group)]), max(sizes))
    return _LAYOUTS[key]


def shard_backend(backend: str, process_group: dist.ProcessGroup | None,
                  vocab_offset: int | None, n_local: int, device: torch.device) -> str:
    """``backend`` with this rank's shard appended (unchanged without a group): what the
    public ops pass into their custom ops."""
    if process_group is None:
        if vocab_offset is not None:
            raise ValueError("vocab_offset is the column offset of this rank's vocabulary "
                             "slice: it needs process_group (the tensor-parallel group)")
        return backend
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed ProcessGroup, got "
                        f"{type(process_group).__name__}")
    if n_local < 1:
        raise ValueError("every rank's vocabulary slice needs at least one column, got a "
                         "slice of width 0")
    chunk_width = n_local
    if vocab_offset is None:
        vocab_offset, chunk_width = slice_layout(process_group, n_local, device)
    elif isinstance(vocab_offset, bool) or not isinstance(vocab_offset, int) \
            or vocab_offset < 0:
        raise ValueError(f"vocab_offset must be an int >= 0 (the full-vocabulary id of this "
                         f"rank's first column), got {vocab_offset!r}")
    return f"{backend}{SHARD_TAG}{process_group.group_name}:{vocab_offset}:{chunk_width}"


def split_backend(backend: str) -> tuple[str, VocabShard | None]:
    """(plain backend name, shard or None) of a ``backend`` string."""
    if SHARD_TAG not in backend:
        return backend, None
    name, spec = backend.split(SHARD_TAG)
    group_name, offset, chunk_width = spec.rsplit(":", 2)
    group = dist.distributed_c10d._resolve_process_group(group_name)
    return name, VocabShard(group, int(offset), int(chunk_width))


def is_sharded(backend: str) -> bool:
    return SHARD_TAG in backend


def chunk_width(n_cols: int, backend: str) -> int:
    """The vocabulary width the fused-linear ops size their chunks by: ``n_cols``, or the
    shard's ``chunk_width`` (the same on every rank)."""
    shard = split_backend(backend)[1]
    return n_cols if shard is None else shard.chunk_width


def all_reduce_hidden_grad(grad: Tensor, backend: str) -> None:
    """Sum the slices' partial dL/dhidden over the group, in place (fused-linear ops)."""
    _, shard = split_backend(backend)
    if shard is not None:
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=shard.group)


STAND_IN = 0
"""The local column the sweeps treat as the target on the ranks that do not hold it."""


def local_ignore_index(ignore_index: int) -> int:
    """The ``ignore_index`` of this rank's sweeps: a negative one, which no local column can
    equal (a full-vocabulary ``ignore_index`` of 3 must not ignore local column 3)."""
    return ignore_index if ignore_index < 0 else -1


def local_targets(targets: Tensor, shard: VocabShard, n_local: int,
                  ignore_index: int) -> tuple[Tensor, Tensor]:
    """(targets for this rank's sweeps, bool ``owned``): the local column where this rank
    holds the target, ``STAND_IN`` where it does not, ``local_ignore_index`` where the
    target is ``ignore_index``."""
    local = targets - shard.offset
    ignored = targets == ignore_index
    owned = (local >= 0) & (local < n_local) & ~ignored
    moved = torch.where(owned, local, torch.full_like(local, STAND_IN))
    return torch.where(ignored, torch.full_like(local, local_ignore_index(ignore_index)),
                       moved), owned


def _column(logits: Tensor, columns: Tensor) -> Tensor:
    """float32 ``logits[b, t, columns[b, t]]`` (``columns`` in range)."""
    return logits.gather(-1, columns.unsqueeze(-1).to(torch.int64)).squeeze(-1).float()


def sharded_stats_sweep(local_sweep, logits: Tensor, targets: Tensor, temperature: float,
                        ignore_index: int, with_entropy: bool, backend: str,
                        shard: VocabShard, log_sum_sq: Tensor | None = None
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """``stats_sweep`` over this rank's slice ``logits`` ``[B, T, V_r]`` with full-vocabulary
    ``targets`` ``[B, T]``: the full-vocabulary (logp, entropy, stats), the stats in the
    units of ``backend``'s gradient sweep, as ``sharded_grad_targets`` expects them (module
    docstring: two all-reduces, 20 or 24 bytes per row). ``log_sum_sq`` (float32 ``[B, T]``)
    receives the full vocabulary's ln sum_v p_v^2 (4 more bytes per row)."""
    from ..backend import resolve_backend

    n_local = logits.shape[-1]
    inv_temp = 1.0 / temperature
    # Triton's stats hold the raw logits' max, the torch backend's the scaled one.
    raw_max = resolve_backend(backend, logits) == "triton"
    sweep_targets, owned = local_targets(targets, shard, n_local, ignore_index)
    local_sum_sq = torch.empty_like(targets, dtype=torch.float32) \
        if log_sum_sq is not None else None
    _, entropy_r, stats_r = local_sweep(logits, sweep_targets, temperature,
                                        local_ignore_index(ignore_index), with_entropy, backend,
                                        local_sum_sq)
    ignored = targets == ignore_index
    row_max, log_s, q = stats_r.unbind(-1)
    # The target's logit on its owner, the stand-in column's elsewhere.
    picked = _column(logits, torch.where(ignored, STAND_IN, sweep_targets))
    x_y = torch.where(owned, picked, 0.0)

    big = torch.where(torch.isnan(row_max), float("-inf"), row_max)
    dist.all_reduce(big, op=dist.ReduceOp.MAX, group=shard.group)

    def below_max(x: Tensor) -> Tensor:
        """z - M of raw logits ``x`` (exactly 0 at the maximum)."""
        return (x - big) * inv_temp if raw_max else x * inv_temp - big

    empty = (row_max == float("-inf")) | (log_s == float("-inf"))   # a fully banned slice
    d_r = (row_max - big) * (inv_temp if raw_max else 1.0)
    mass = torch.where(empty, 0.0, torch.exp(d_r + log_s))
    parts = [mass, torch.where(owned, mass * q, mass), x_y, owned.float()]
    if with_entropy:
        a_r = log_s - entropy_r
        parts.append(torch.where(empty, 0.0, mass * (a_r + d_r)))
    if local_sum_sq is not None:
        # sum over the slice of exp(z - M)^2 = (its mass)^2 times its own sum of p^2.
        parts.append(torch.where(empty, 0.0, mass * mass * torch.exp(local_sum_sq)))
    payload = torch.stack(parts, dim=-1)
    dist.all_reduce(payload, op=dist.ReduceOp.SUM, group=shard.group)
    total, excl, x_y, owners = payload[..., 0], payload[..., 1], payload[..., 2], payload[..., 3]

    bad = (owners != 1) & ~ignored
    if target_checks_enabled() and targets.numel():
        device_check(~bad.any(), lambda: (
            f"targets must lie in [0, V) or equal ignore_index={ignore_index}, where V is the "
            f"sum of the ranks' vocabulary slices: some targets lie in no rank's slice"))
    d_y = below_max(x_y)
    log_total = torch.log1p(excl + torch.expm1(d_y))
    logp = d_y - log_total
    q_global = excl / total
    # The stand-in column on ranks without the target: q = -p makes c * q = -c * p.
    q_global = torch.where(owned, q_global, -torch.exp(below_max(picked) - log_total))
    stats = torch.stack([big, log_total, q_global], dim=-1)

    nan = torch.full_like(logp, float("nan"))
    zero = torch.zeros_like(logp)
    logp = torch.where(ignored, zero, torch.where(bad, nan, logp))
    stats = torch.where(ignored.unsqueeze(-1), 0.0,
                        torch.where(bad.unsqueeze(-1), float("nan"), stats))
    if with_entropy:
        entropy = log_total - payload[..., 4] / total
        entropy = torch.where(ignored, zero, torch.where(bad, nan, entropy))
    else:
        entropy = entropy_r
    if log_sum_sq is not None:
        sum_sq = torch.log(payload[..., -1]) - 2.0 * log_total
        log_sum_sq.copy_(torch.where(ignored, zero, torch.where(bad, nan, sum_sq)))
    return logp, entropy, stats


def sharded_grad_targets(targets: Tensor, shard: VocabShard, n_local: int,
                         ignore_index: int) -> tuple[Tensor, int]:
    """(targets, ignore_index) of this rank's gradient sweep, with the stats of
    ``sharded_stats_sweep``."""
    return (local_targets(targets, shard, n_local, ignore_index)[0],
            local_ignore_index(ignore_index))
