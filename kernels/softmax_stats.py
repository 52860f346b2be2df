"""Stats sweep: the softmax statistics of one row, read once, in float32.

For a row of scaled logits ``z = logits * inv_temp`` and a target column ``y`` the sweep
returns, without ever holding the row:

    m       = max_j z_j                                  (the reference point)
    log_s   = log sum_j exp(z_j - m)                     (so lse = m + log_s)
    logp_y  = z_y - m - log_s                            (log-prob of the target)
    q       = 1 - p_y = sum_{j != y} p_j                 (no cancellation when p_y -> 1)
    H       = -sum_j p_j log p_j = log_s - sum_j p_j (z_j - m)

Accuracy when the row is confident (p_y -> 1) comes from summing the target's column apart
from the others: ``s_excl = sum_{j != y} exp(z_j - m)`` and ``q = s_excl / s`` are sums of
positive terms, and ``log_s`` is taken as ``log1p(s_excl / e_y)`` beside ``z_y - m`` when
the target dominates. ``1 - exp(logp_y)`` in float32 would round to 0 there.

The sweep keeps its running statistics per lane (a vector of BLOCK_V partial maxima and
sums) and merges the lanes once at the end, so the loop body has no cross-lane reduction.
``-inf`` logits are legal (a banned token has probability 0 and adds nothing to the
entropy); NaN or ``+inf`` anywhere in a row makes that row's outputs NaN, as in torch.
"""

import triton
import triton.language as tl


@triton.jit
def log1p_accurate(x):
    """log(1 + x) for x >= 0 to a few ulps (Goldberg's trick; Triton has no log1p)."""
    u = 1.0 + x
    d = u - 1.0
    # d is exactly the part of x that survived the rounding of 1 + x; scaling log(u) by
    # x / d restores the lost low bits.
    return tl.where(d == 0.0, x, tl.log(u) * (x / tl.where(d == 0.0, 1.0, d)))


@triton.jit
def online_stats_update(m, s, t, z, keep):
    """Fold one block of scaled logits into the per-lane running statistics.

    m: running max per lane (-inf while a lane has seen nothing finite);
    s: sum of exp(z - m) over kept columns;  t: sum of exp(z - m) * (z - m) over kept columns.
    z: float32 block, -inf outside the row;  keep: columns that enter s and t (the target's
    column is excluded so that it can be added back exactly at the end).
    """
    m_new = tl.maximum(m, z)
    # A lane that has seen only -inf keeps an empty state around a finite reference point.
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - m_ref)
    # Rebasing t to the new max needs (m - m_ref) * s; an empty state must add 0, not NaN.
    shift = tl.where(m == float("-inf"), 0.0, m - m_ref)
    e = tl.where(keep, tl.exp(z - m_ref), 0.0)
    ez = tl.where(e > 0.0, e * (z - m_ref), 0.0)
    t = alpha * (t + shift * s) + ez
    s = alpha * s + e
    return m_new, s, t


@triton.jit
def merge_lane_stats(m, s, t):
    """Merge per-lane (m, s, t) into row scalars around the row max."""
    m_row = tl.max(m, axis=0)
    m_ref = tl.where(m_row == float("-inf"), 0.0, m_row)
    alpha = tl.exp(m - m_ref)
    shift = tl.where(m == float("-inf"), 0.0, m - m_ref)
    s_row = tl.sum(alpha * s, axis=0)
    t_row = tl.sum(alpha * (t + shift * s), axis=0)
    return m_ref, s_row, t_row


@triton.jit
def row_softmax_stats(row_ptr, n_cols, target, inv_temp, BLOCK_V: tl.constexpr):
    """One read of a row: returns (m, log_s, logp_y, q, entropy) as float32 scalars.

    row_ptr: pointer to the row's first logit (unit column stride); n_cols: V (runtime);
    target: column of the target, 0 <= target < V.
    """
    cols = tl.arange(0, BLOCK_V)
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_V], tl.float32)
    t = tl.zeros([BLOCK_V], tl.float32)
    # Full blocks without a bounds mask (vectorised loads), then one masked tail.
    n_full = n_cols // BLOCK_V * BLOCK_V
    for start in range(0, n_full, BLOCK_V):
        z = tl.load(row_ptr + start + cols).to(tl.float32) * inv_temp
        m, s, t = online_stats_update(m, s, t, z, start + cols != target)
    tail = n_full + cols
    in_row = tail < n_cols
    z = tl.load(row_ptr + tail, mask=in_row, other=float("-inf")).to(tl.float32) * inv_temp
    m, s, t = online_stats_update(m, s, t, z, in_row & (tail != target))
    m, s_excl, t_excl = merge_lane_stats(m, s, t)

    z_y = tl.load(row_ptr + target).to(tl.float32) * inv_temp
    d_y = z_y - m
    e_y = tl.exp(d_y)
    s_all = s_excl + e_y
    # When the target holds at least half the mass, log s = d_y + log1p(s_excl / e_y) keeps
    # the tiny s_excl that s_excl + e_y would round away; otherwise plain log is accurate.
    log_s = tl.where(
        e_y >= s_excl,
        d_y + log1p_accurate(s_excl / tl.where(e_y > 0.0, e_y, 1.0)),
        tl.log(s_all),
    )
    logp_y = d_y - log_s
    q = s_excl / s_all
    t_all = t_excl + tl.where(e_y > 0.0, e_y * d_y, 0.0)
    entropy = log_s - t_all / s_all
    return m, log_s, logp_y, q, entropy
