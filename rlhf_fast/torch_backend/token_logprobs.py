"""Torch backend of ``token_logprobs``: the stats sweep and gradient sweep over row blocks.

Mirrors ``kernels/softmax_stats.py`` and ``kernels/softmax_grad.py``: the target's column is
summed apart from the others so that ``1 - p_y`` and ``log_s`` stay exact when ``p_y -> 1``,
and the non-target columns equal to the row's max (each worth exactly ``exp(0) = 1``) are
counted apart from the mass below it.

Speed on the CPU (benchmarks/NOTES.md, Fused-linear for long sequences): rows go through
``BLOCK_BYTES`` float32 scratch blocks that are allocated once per call and stay in cache;
each pass is one vectorised ATen op writing into a block (``out=`` / in place), and the
per-row algebra (``log1p``, ``q``, the entropy) runs once over all rows at the end, not per
block. The one transcendental pass of each sweep is its ``exp``; the masks of the first
version (``d == 0``, ``e == 0``: a compare and a ``masked_fill`` each, 1.5 ns an element
together) are replaced by a ``sign`` and a clamp.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import validation
from .chunks import BLOCK_BYTES, block_rows, merge_batch, row_chunks

LOG_ZERO = -1e4
"""-inf log-probs (banned tokens) are clamped to this finite value before they are multiplied
by their probability 0: ``0 * LOG_ZERO = 0`` where ``0 * -inf`` would be NaN, and
``(LOG_ZERO + H) * c_H`` stays finite for any coefficient. It changes no probability:
``exp(x)`` is exactly 0 in float32 below about -104. NaN stays NaN."""


def skips_inactive_rows(active: Tensor) -> bool:
    """Whether inactive rows (ignored targets, zero coefficients) are gathered out of a chunk.
    The gather's size must be known on the host: free on CPU tensors (the data is there), a
    host sync per chunk anywhere else, where every row is computed instead (static shapes)
    and the inactive ones are zeroed (``rlhf_fast.validation.host_reads_are_free``)."""
    return validation.host_reads_are_free(active)


def active_rows(active: Tensor) -> Tensor | None:
    """None when every row of a chunk is to be computed (use it as is), else the active
    rows' indices (``skips_inactive_rows``)."""
    if not skips_inactive_rows(active) or bool(active.all()):
        return None
    return active.nonzero().squeeze(-1)


class _Scratch:
    """Float32 ``[rows, V]`` blocks reused across the row blocks of one call."""

    def __init__(self, rows: int, n_cols: int, device: torch.device, count: int):
        self.blocks = [torch.empty((rows, n_cols), dtype=torch.float32, device=device)
                       for _ in range(count)]

    def take(self, rows: int) -> list[Tensor]:
        return [b[:rows] for b in self.blocks]


def _load_scaled(z: Tensor, x: Tensor, rows: Tensor | None, inv_temp: float) -> Tensor:
    """``z <- float32(x[rows]) * inv_temp`` (all rows when None); returns ``z``."""
    z.copy_(x if rows is None else x.index_select(0, rows))
    if inv_temp != 1.0:
        z.mul_(inv_temp)
    return z


def _safe_targets(y: Tensor, n_cols: int) -> tuple[Tensor, Tensor]:
    """(targets in range, ``[r, 1]`` index with out-of-range targets sent to column 0)."""
    valid = (y >= 0) & (y < n_cols)
    return valid, torch.where(valid, y, torch.zeros_like(y)).unsqueeze(-1)


def _block_sums(z: Tensor, e: Tensor, tmp: Tensor | None, y_safe: Tensor, with_entropy: bool,
                with_sum_sq: bool
                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """The big passes of the stats sweep over one block ``z`` (scaled logits, overwritten;
    ``e`` and ``tmp`` are scratch, ``tmp`` None without entropy and sums of squares): per
    row the max ``m``,
    ``d_y = z_y - m``, the non-target sum ``s_kept`` of ``e = exp(z - m)``, the part ``r``
    of it strictly below the max, ``t = sum e * (z - m)`` over the non-target columns, and
    with ``with_sum_sq`` ``q = sum e^2`` over them (WPO), else None."""
    m = z.amax(-1, keepdim=True)
    m.masked_fill_(m == float("-inf"), 0.0)       # a row of -inf: keep it finite
    d = z.sub_(m)                                 # z - m, in place
    d_y = d.gather(-1, y_safe)
    if with_entropy:
        d.clamp_(min=LOG_ZERO)                   # -inf -> finite: e * d = 0, not NaN
    torch.exp(d, out=e)
    e.scatter_(-1, y_safe, 0.0)                   # the target is added back exactly later
    s_kept = e.sum(-1)
    t = torch.mul(e, d, out=tmp).sum(-1) if with_entropy else None
    q = torch.mul(e, e, out=tmp).sum(-1) if with_sum_sq else None
    # sign(d) is -1 below the max and 0 at it (NaN stays NaN): r = -sum(e * sign(d)) is the
    # non-target mass strictly below the max, without a compare-and-mask pass.
    r = e.mul_(d.sign_()).sum(-1).neg_()
    return m.squeeze(-1), d_y.squeeze(-1), s_kept, r, t, q


def _finish_stats(m: Tensor, d_y: Tensor, s_kept: Tensor, r: Tensor, t: Tensor | None,
                  targets: Tensor, n_cols: int, ignore_index: int
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row algebra of the stats sweep over all rows at once: logp, entropy, stats."""
    ignored = targets == ignore_index
    valid = (targets >= 0) & (targets < n_cols)
    # The maxima are worth exactly exp(0) = 1 each and add nothing to t (d = 0): n_max is an
    # integer, recovered exactly from the rounded difference (its error is far below 1/2).
    n_max = torch.round(s_kept - r)
    e_y = d_y.exp()
    s_excl = n_max + r
    s_all = s_excl + e_y
    # s - 1 without cancellation (see kernels/softmax_stats.py).
    s_minus_1 = torch.where(d_y == 0, s_excl, (n_max - 1) + r + e_y)
    log_s = torch.log1p(s_minus_1)
    logp = d_y - log_s
    q = s_excl / s_all
    if t is not None:
        t_all = t + torch.where(e_y > 0, e_y * d_y, torch.zeros_like(e_y))
        entropy = log_s - t_all / s_all
    else:
        entropy = torch.zeros_like(logp)
    stats = torch.stack([m, log_s, q], dim=-1)
    nan = torch.full_like(logp, float("nan"))
    bad = ~valid & ~ignored
    logp = torch.where(ignored, torch.zeros_like(logp), torch.where(bad, nan, logp))
    entropy = torch.where(ignored, torch.zeros_like(entropy), torch.where(bad, nan, entropy))
    stats = torch.where(ignored.unsqueeze(-1), torch.zeros_like(stats),
                        torch.where(bad.unsqueeze(-1), float("nan"), stats))
    return logp, entropy, stats


def token_logprobs_forward(logits: Tensor, targets: Tensor, temperature: float,
                           ignore_index: int, with_entropy: bool,
                           chunk_bytes: int = BLOCK_BYTES, log_sum_sq: Tensor | None = None
                           ) -> tuple[Tensor, Tensor, Tensor]:
    """logits ``[B, T, V]`` (any strides), targets ``[B, T]`` -> logp, entropy, stats.

    logp and entropy are float32 ``[B, T]`` (entropy is empty when not asked for);
    stats is float32 ``[B, T, 3]`` holding ``(m, log_s, 1 - p_y)`` of the scaled logits.
    ``log_sum_sq`` (float32 ``[B, T]``, optional) receives ``ln sum_v p_v^2`` of each row
    from the same sweep (WPO): ``ln(q + e_y^2) - 2 log_s``; 0 at ignored rows, NaN at a
    target out of range.
    """
    out_shape = logits.shape[:2]
    logits = merge_batch(logits)
    batch, seq_len, n_cols = logits.shape
    targets = targets.reshape(batch, seq_len)
    # Per-row sums of every block, [B, T] each; rows never read keep 0 (they are ignored).
    sums = torch.zeros((6, batch, seq_len), dtype=torch.float32, device=logits.device)
    m_all, d_y_all, s_kept_all, r_all, t_all, q_all = sums.unbind(0)
    inv_temp = 1.0 / temperature
    if batch * seq_len:
        scratch = _Scratch(min(block_rows(n_cols, chunk_bytes), seq_len), n_cols,
                           logits.device, 3 if with_entropy or log_sum_sq is not None else 2)
    for b, ts in row_chunks(batch, seq_len, n_cols, chunk_bytes):
        y = targets[b, ts]
        rows = active_rows(y != ignore_index)
        if rows is not None and rows.numel() == 0:
            continue                               # every row ignored: not read
        count = y.shape[0] if rows is None else rows.shape[0]
        z, e, *tmp = scratch.take(count)
        y_rows = y if rows is None else y.index_select(0, rows)
        _, y_safe = _safe_targets(y_rows, n_cols)
        _load_scaled(z, logits[b, ts], rows, inv_temp)
        values = _block_sums(z, e, tmp[0] if tmp else None, y_safe, with_entropy,
                             log_sum_sq is not None)
        for out, value in zip((m_all, d_y_all, s_kept_all, r_all, t_all, q_all), values,
                              strict=True):
            if value is None:
                continue
            if rows is None:
                out[b, ts] = value
            else:
                out[b, ts].index_copy_(0, rows, value)
    logp, entropy, stats = _finish_stats(m_all, d_y_all, s_kept_all, r_all,
                                         t_all if with_entropy else None, targets, n_cols,
                                         ignore_index)
    if log_sum_sq is not None:
        # stats[..., 1] is log_s; p_v = e_v / s, so sum p^2 = (q + e_y^2) / s^2.
        lsq = torch.log(q_all + (2.0 * d_y_all).exp()) - 2.0 * stats[..., 1]
        bad = ~((targets >= 0) & (targets < n_cols))
        lsq = torch.where(targets == ignore_index, 0.0,
                          torch.where(bad, float("nan"), lsq))
        log_sum_sq.copy_(lsq.view(out_shape))
    entropy = entropy.view(out_shape) if with_entropy \
        else logits.new_empty((0,), dtype=torch.float32)
    return logp.view(out_shape), entropy, stats.view(*out_shape, 3)


def _block_grad(lp: Tensor, p: Tensor, y: Tensor, stats: Tensor, c: Tensor,
                c_h: Tensor | None, entropy: Tensor | None) -> Tensor:
    """``-dL/dz`` of one block (``z`` = scaled logits, held in ``lp`` and overwritten; ``p``
    is scratch and receives the result), float32 ``[r, V]``; the other arguments are the
    block's per-row values."""
    valid, y_safe = _safe_targets(y, lp.shape[-1])
    m, log_s, q = stats.unbind(-1)
    # (z - m) - log_s: log p to the last bit near 0 (m + log_s would round log_s away).
    lp.sub_(m.unsqueeze(-1)).sub_(log_s.unsqueeze(-1))
    if c_h is not None:
        lp.clamp_(min=LOG_ZERO)                  # banned: p * (log p + H) = 0, not NaN
    torch.exp(lp, out=p)
    if c_h is not None:
        lp_y = lp.gather(-1, y_safe).squeeze(-1)
        entropy_y = c_h * lp_y.exp() * (lp_y + entropy)
        # c + c_H (log p + H), over log p; times p: -dL/dz off the target column.
        lp.add_(entropy.unsqueeze(-1)).mul_(c_h.unsqueeze(-1)).add_(c.unsqueeze(-1))
        g = p.mul_(lp)
        target = c * q - entropy_y
    else:
        g = p.mul_(c.unsqueeze(-1))
        target = c * q                            # c (1 - p_y), exact when p_y -> 1
    current = g.gather(-1, y_safe).squeeze(-1)
    g.scatter_(-1, y_safe, torch.where(valid, -target, current).unsqueeze(-1))
    return g


def _pick(x: Tensor | None, b: int, ts: slice, rows: Tensor | None) -> Tensor | None:
    """The block's rows of a per-row tensor (None stays None)."""
    if x is None:
        return None
    x = x[b, ts]
    return x if rows is None else x.index_select(0, rows)


def token_logprobs_backward(grad_logp: Tensor | None, grad_entropy: Tensor | None,
                            logits: Tensor, targets: Tensor, entropy: Tensor, stats: Tensor,
                            temperature: float, ignore_index: int, out: Tensor | None = None,
                            chunk_bytes: int = BLOCK_BYTES) -> Tensor:
    """dL/dlogits ``[B, T, V]`` in the logits' dtype from the upstream ``[B, T]`` gradients.

        dL/dlogits = (c * (onehot(y) - p) - c_H * p * (log p + H)) / temperature

    Written into ``out`` when given (any float dtype; it may be ``logits``: each block is
    read before it is written).
    """
    if out is None:
        out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    result = out
    merged_logits, merged_out = merge_batch(logits), merge_batch(out)
    if merged_logits.shape == merged_out.shape:  # both merged, or neither: chunks line up
        logits, out = merged_logits, merged_out
    batch, seq_len, n_cols = logits.shape
    if batch * seq_len == 0:
        return result
    targets = targets.reshape(batch, seq_len)
    stats = stats.reshape(batch, seq_len, 3)
    c_all = grad_logp.reshape(batch, seq_len).float() if grad_logp is not None \
        else torch.zeros((batch, seq_len), dtype=torch.float32, device=logits.device)
    c_h_all = grad_entropy.reshape(batch, seq_len).float() if grad_entropy is not None \
        else None
    entropy_all = entropy.reshape(batch, seq_len) if c_h_all is not None else None
    active_all = c_all != 0
    if c_h_all is not None:
        active_all |= c_h_all != 0
    active_all &= targets != ignore_index
    inv_temp = 1.0 / temperature
    scratch = _Scratch(min(block_rows(n_cols, chunk_bytes), seq_len), n_cols, logits.device,
                       2)
    for b, ts in row_chunks(batch, seq_len, n_cols, chunk_bytes):
        active = active_all[b, ts]
        rows = active_rows(active)
        if rows is not None and rows.numel() == 0:
            out[b, ts] = 0.0                       # zero coefficients: not read
            continue

        count = active.shape[0] if rows is None else rows.shape[0]
        lp, p = scratch.take(count)
        _load_scaled(lp, logits[b, ts], rows, inv_temp)
        g = _block_grad(lp, p, *(_pick(x, b, ts, rows) for x in (
            targets, stats, c_all, c_h_all, entropy_all)))
        if rows is None:
            torch.mul(g, -inv_temp, out=out[b, ts])
            if not skips_inactive_rows(active):    # inactive rows computed too: zero them
                out[b, ts].masked_fill_(~active.unsqueeze(-1), 0.0)
            continue
        # Rows with a zero coefficient (masked, clipped) are not read: their gradient is 0.
        block = out[b, ts]
        block.zero_()                              # after the gather: out may be the logits
        block.index_copy_(0, rows, g.mul_(-inv_temp).to(out.dtype))
    return result
