"""Torch backend of ``token_logprobs``: the stats sweep and gradient sweep over row chunks.

Mirrors ``kernels/softmax_stats.py`` and ``kernels/softmax_grad.py``: the target's column is
summed apart from the others so that ``1 - p_y`` and ``log_s`` stay exact when ``p_y -> 1``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import validation
from .chunks import CHUNK_BYTES, merge_batch, row_chunks


def _scaled_rows(x: Tensor, rows: Tensor | None, inv_temp: float) -> Tensor:
    """float32 ``x[rows] * inv_temp`` (all rows when None) as a new tensor; the gathered copy
    is dropped before returning, so a chunk holds no more temporaries than without rows."""
    if rows is None:
        return x.float() * inv_temp
    return x.index_select(0, rows).float().mul_(inv_temp)


def _chunk_stats(x: Tensor, rows: Tensor | None, targets: Tensor, inv_temp: float,
                 ignore_index: int, with_entropy: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Stats of rows ``rows`` (None: all) of ``x [R, V]``, whose targets are ``targets``:
    returns ``logp``, ``entropy`` and ``stats [., 3]`` for those rows."""
    n_cols = x.shape[-1]
    z = _scaled_rows(x, rows, inv_temp)
    ignored = targets == ignore_index
    valid = (targets >= 0) & (targets < n_cols)
    y = torch.where(valid, targets, torch.zeros_like(targets)).unsqueeze(-1)

    m = z.amax(-1, keepdim=True)
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    d = z.sub_(m)                                   # z - m, in place over z
    d_y = d.gather(-1, y).squeeze(-1)
    e = d.exp()
    e.scatter_(-1, y, 0.0)                          # the target is added back exactly below
    s_kept = e.sum(-1)                              # = n_max + r, rounded
    # The maxima are worth exactly exp(0) = 1 each and add nothing to t (d = 0): zero them to
    # leave the mass strictly below the max; NaN (from NaN or +inf logits) stays and poisons
    # the row. n_max is an integer, recovered exactly from the rounded difference (its error
    # is far below 1/2 at any V), without a full-size count.
    e.masked_fill_(d == 0, 0.0)
    r = e.sum(-1)
    n_max = torch.round(s_kept - r)
    e_y = d_y.exp()
    s_excl = n_max + r
    s_all = s_excl + e_y
    # s - 1 without cancellation (see kernels/softmax_stats.py).
    s_minus_1 = torch.where(d_y == 0, s_excl, (n_max - 1) + r + e_y)
    log_s = torch.log1p(s_minus_1)
    logp = d_y - log_s
    q = s_excl / s_all

    if with_entropy:
        banned = e == 0                             # exp(-inf): 0 * -inf must give 0
        ed = e.mul_(d).masked_fill_(banned, 0.0)    # e * (z - m), in place over e
        t_excl = ed.sum(-1)
        t_all = t_excl + torch.where(e_y > 0, e_y * d_y, torch.zeros_like(e_y))
        entropy = log_s - t_all / s_all
    else:
        entropy = torch.zeros_like(logp)

    stats = torch.stack([m.squeeze(-1), log_s, q], dim=-1)
    nan = torch.full_like(logp, float("nan"))
    bad = ~valid & ~ignored
    logp = torch.where(ignored, torch.zeros_like(logp), torch.where(bad, nan, logp))
    entropy = torch.where(ignored, torch.zeros_like(entropy), torch.where(bad, nan, entropy))
    stats = torch.where(ignored.unsqueeze(-1), torch.zeros_like(stats),
                        torch.where(bad.unsqueeze(-1), float("nan"), stats))
    return logp, entropy, stats


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


def _chunk_grad(x: Tensor, rows: Tensor | None, y: Tensor, st: Tensor, c: Tensor,
                c_h: Tensor | None, entropy: Tensor | None, inv_temp: float) -> Tensor:
    """dL/dx of rows ``rows`` (None: all) of ``x [R, V]`` as float32; the other arguments
    are those rows' (see ``token_logprobs_backward``)."""
    n_cols = x.shape[-1]
    m, log_s, q = st[:, 0:1], st[:, 1:2], st[:, 2]
    # Two float32 [rows, V] temporaries: log p (then the entropy term, in place) and p
    # (then the gradient, in place).
    logp_all = _scaled_rows(x, rows, inv_temp).sub_(m).sub_(log_s)
    p = logp_all.exp()
    term = None
    if c_h is not None:
        banned = p == 0                             # banned tokens: 0 * -inf -> 0
        term = logp_all.add_(entropy.unsqueeze(-1)).mul_(p).masked_fill_(banned, 0.0)
        del banned
    g = p.mul_(-c.unsqueeze(-1))                    # -c * p, over p
    valid = (y >= 0) & (y < n_cols)
    y_safe = torch.where(valid, y, torch.zeros_like(y)).unsqueeze(-1)
    target_grad = torch.where(valid, c * q, g.gather(-1, y_safe).squeeze(-1))
    g.scatter_(-1, y_safe, target_grad.unsqueeze(-1))
    if term is not None:
        g.addcmul_(term, c_h.unsqueeze(-1), value=-1.0)   # - c_H * p * (log p + H)
    return g.mul_(inv_temp)


def token_logprobs_forward(logits: Tensor, targets: Tensor, temperature: float,
                           ignore_index: int, with_entropy: bool,
                           chunk_bytes: int = CHUNK_BYTES) -> tuple[Tensor, Tensor, Tensor]:
    """logits ``[B, T, V]`` (any strides), targets ``[B, T]`` -> logp, entropy, stats.

    logp and entropy are float32 ``[B, T]`` (entropy is empty when not asked for);
    stats is float32 ``[B, T, 3]`` holding ``(m, log_s, 1 - p_y)`` of the scaled logits.
    """
    out_shape = logits.shape[:2]
    logits = merge_batch(logits)
    targets = targets.reshape(logits.shape[:2])
    batch, seq_len, n_cols = logits.shape
    logp = logits.new_empty((batch, seq_len), dtype=torch.float32)
    entropy = logits.new_empty((batch, seq_len) if with_entropy else (0,), dtype=torch.float32)
    stats = logits.new_empty((batch, seq_len, 3), dtype=torch.float32)
    inv_temp = 1.0 / temperature
    for b, ts in row_chunks(batch, seq_len, n_cols, chunk_bytes):
        y = targets[b, ts]
        rows = active_rows(y != ignore_index)
        if rows is None:
            lp, ent, st = _chunk_stats(logits[b, ts], None, y, inv_temp, ignore_index,
                                       with_entropy)
            logp[b, ts], stats[b, ts] = lp, st
            if with_entropy:
                entropy[b, ts] = ent
            continue
        # Ignored rows are not read: they get 0, the active ones are gathered and computed.
        logp[b, ts], stats[b, ts] = 0.0, 0.0
        if with_entropy:
            entropy[b, ts] = 0.0
        if rows.numel() == 0:
            continue
        lp, ent, st = _chunk_stats(logits[b, ts], rows, y.index_select(0, rows), inv_temp,
                                   ignore_index, with_entropy)
        logp[b, ts].index_copy_(0, rows, lp)
        stats[b, ts].index_copy_(0, rows, st)
        if with_entropy:
            entropy[b, ts].index_copy_(0, rows, ent)
    if with_entropy:
        entropy = entropy.view(out_shape)
    return logp.view(out_shape), entropy, stats.view(*out_shape, 3)


def token_logprobs_backward(grad_logp: Tensor | None, grad_entropy: Tensor | None,
                            logits: Tensor, targets: Tensor, entropy: Tensor, stats: Tensor,
                            temperature: float, ignore_index: int, out: Tensor | None = None,
                            chunk_bytes: int = CHUNK_BYTES) -> Tensor:
    """dL/dlogits ``[B, T, V]`` in the logits' dtype from the upstream ``[B, T]`` gradients.

        dL/dlogits = (c * (onehot(y) - p) - c_H * p * (log p + H)) / temperature

    Written into ``out`` when given (it may be ``logits``: each chunk is read first).
    """
    if out is None:
        out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    result = out
    merged_logits, merged_out = merge_batch(logits), merge_batch(out)
    if merged_logits.shape == merged_out.shape:  # both merged, or neither: chunks line up
        logits, out = merged_logits, merged_out
    batch, seq_len, n_cols = logits.shape
    targets = targets.reshape(batch, seq_len)
    stats = stats.reshape(batch, seq_len, 3)
    grad_logp = grad_logp.reshape(batch, seq_len) if grad_logp is not None else None
    grad_entropy = grad_entropy.reshape(batch, seq_len) if grad_entropy is not None else None
    entropy = entropy.reshape(batch, seq_len) if grad_entropy is not None else entropy
    inv_temp = 1.0 / temperature
    for b, ts in row_chunks(batch, seq_len, n_cols, chunk_bytes):
        y = targets[b, ts]
        c = grad_logp[b, ts].float() if grad_logp is not None \
            else torch.zeros(y.shape, dtype=torch.float32, device=y.device)
        c_h = grad_entropy[b, ts].float() if grad_entropy is not None else None
        active = c != 0
        if c_h is not None:
            active |= c_h != 0
        active &= y != ignore_index
        rows = active_rows(active)
        ent = entropy[b, ts] if c_h is not None else None
        if rows is None:
            g = _chunk_grad(logits[b, ts], None, y, stats[b, ts], c, c_h, ent, inv_temp)
            if not skips_inactive_rows(active):  # inactive rows computed too: zero them
                g.masked_fill_(~active.unsqueeze(-1), 0.0)
            out[b, ts] = g
            del g
            continue
        # Rows with a zero coefficient (masked, clipped) are not read: their gradient is 0.
        if rows.numel() == 0:
            out[b, ts] = 0.0
            continue
        g = _chunk_grad(logits[b, ts], rows, y.index_select(0, rows),
                        stats[b, ts].index_select(0, rows), c.index_select(0, rows),
                        c_h.index_select(0, rows) if c_h is not None else None,
                        ent.index_select(0, rows) if ent is not None else None, inv_temp)
        out[b, ts] = 0.0                            # after the gather: out may be the logits
        out[b, ts].index_copy_(0, rows, g.to(out.dtype))
        del g
    return result
