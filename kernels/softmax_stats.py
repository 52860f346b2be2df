"""Stats sweep: the softmax statistics of one row, read once, in float32.

For a row of scaled logits ``z = logits * inv_temp`` and a target column ``y`` the sweep
returns, without ever holding the row:

    m       = max_j z_j                                  (the reference point)
    log_s   = log sum_j exp(z_j - m)                     (so lse = m + log_s)
    logp_y  = z_y - m - log_s                            (log-prob of the target)
    q       = 1 - p_y = sum_{j != y} p_j                 (no cancellation when p_y -> 1)
    H       = -sum_j p_j log p_j = log_s - sum_j p_j (z_j - m)

Accuracy when one token dominates (p -> 1 for the target or for any other token) comes from
never forming ``1 + tiny`` and subtracting. The sweep keeps the non-target columns apart
from the target and, among them, counts those equal to the maximum (``n``, each worth
exp(0) = 1) separately from the mass below it (``r``). Then ``s - 1`` is ``n + r`` when the
target is a maximum, else ``(n - 1) + r + exp(z_y - m)``: integers and positive terms only,
and ``log_s = log1p(s - 1)``. ``q = (n + r) / s`` likewise. ``1 - exp(logp_y)`` or
``log(1 + 1e-8)`` in float32 would round to 0.

The sweep keeps its running statistics per lane (a vector of BLOCK_V partial maxima and
sums) and merges the lanes once at the end, so the loop body has no cross-lane reduction.
``-inf`` logits are legal (a banned token has probability 0 and adds nothing to the
entropy); NaN or ``+inf`` anywhere in a row makes that row's outputs NaN, as in torch.
"""

import triton
import triton.language as tl


@triton.jit
def log1p_accurate(x):
    """log(1 + x) for x >= -1 to a few ulps (Goldberg's trick; Triton has no log1p)."""
    u = 1.0 + x
    d = u - 1.0
    # d is exactly the part of x that survived the rounding of 1 + x; scaling log(u) by
    # x / d restores the lost low bits.
    return tl.where(d == 0.0, x, tl.log(u) * (x / tl.where(d == 0.0, 1.0, d)))


@triton.jit
def online_stats_update(m, n, r, t, z, keep):
    """Fold one block of scaled logits into the per-lane running statistics.

    m: running max per lane (-inf while a lane has seen nothing finite), over all columns;
    n: number of kept columns equal to m; r: sum of exp(z - m) over kept columns below m;
    t: sum of exp(z - m) * (z - m) over kept columns.
    z: float32 block, -inf outside the row; keep: columns other than the target (added back
    exactly at the end).
    """
    m_new = tl.maximum(m, z)
    # A lane that has seen only -inf keeps an empty state around a finite reference point.
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - m_ref)
    # Rebasing t to the new max needs (m - m_ref) * s; an empty state must add 0, not NaN.
    shift = tl.where(m == float("-inf"), 0.0, m - m_ref)
    e = tl.where(keep, tl.exp(z - m_ref), 0.0)
    ez = tl.where(e > 0.0, e * (z - m_ref), 0.0)
    t = alpha * (t + shift * (n + r)) + ez
    # A new maximum turns the n old maxima into mass below it. NaN (and +inf, whose
    # exp(z - m) is NaN) must poison the row: it compares false everywhere, so add it to r.
    new_max = z > m
    r = tl.where(new_max, alpha * (r + n), r) + tl.where(keep & (z < m_new), e, 0.0) \
        + tl.where(e != e, e, 0.0)
    n = tl.where(new_max, 0.0, n) + tl.where(keep & (z == m_new), 1.0, 0.0)
    return m_new, n, r, t


@triton.jit
def merge_lane_stats(m, n, r, t):
    """Merge per-lane (m, n, r, t) into row scalars around the row max."""
    m_row = tl.max(m, axis=0)
    m_ref = tl.where(m_row == float("-inf"), 0.0, m_row)
    alpha = tl.exp(m - m_ref)
    shift = tl.where(m == float("-inf"), 0.0, m - m_ref)
    top = m == m_row
    n_row = tl.sum(tl.where(top, n, 0.0), axis=0)
    # Lanes below the row max hold only mass below it, their maxima included.
    r_row = tl.sum(tl.where(top, r, alpha * (n + r)), axis=0)
    t_row = tl.sum(alpha * (t + shift * (n + r)), axis=0)
    return m_ref, n_row, r_row, t_row


@triton.jit
def row_softmax_stats(row_ptr, n_cols, target, inv_temp, BLOCK_V: tl.constexpr):
    """One read of a row: returns (m, log_s, logp_y, q, entropy) as float32 scalars.

    row_ptr: pointer to the row's first logit (unit column stride); n_cols: V (runtime);
    target: column of the target, 0 <= target < V.
    """
    cols = tl.arange(0, BLOCK_V)
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)
    n = tl.zeros([BLOCK_V], tl.float32)
    r = tl.zeros([BLOCK_V], tl.float32)
    t = tl.zeros([BLOCK_V], tl.float32)
    # Full blocks without a bounds mask (vectorised loads), then one masked tail.
    n_full = n_cols // BLOCK_V * BLOCK_V
    for start in range(0, n_full, BLOCK_V):
        z = tl.load(row_ptr + start + cols).to(tl.float32) * inv_temp
        m, n, r, t = online_stats_update(m, n, r, t, z, start + cols != target)
    tail = n_full + cols
    in_row = tail < n_cols
    z = tl.load(row_ptr + tail, mask=in_row, other=float("-inf")).to(tl.float32) * inv_temp
    m, n, r, t = online_stats_update(m, n, r, t, z, in_row & (tail != target))
    m, n, r, t_excl = merge_lane_stats(m, n, r, t)

    z_y = tl.load(row_ptr + target).to(tl.float32) * inv_temp
    d_y = z_y - m
    e_y = tl.exp(d_y)
    s_excl = n + r
    s_all = s_excl + e_y
    # s - 1 without cancellation: the target is a maximum (e_y = 1 exactly), or one of the
    # n kept maxima is the 1.
    s_minus_1 = tl.where(d_y == 0.0, s_excl, (n - 1.0) + r + e_y)
    log_s = log1p_accurate(s_minus_1)
    logp_y = d_y - log_s
    q = s_excl / s_all
    t_all = t_excl + tl.where(e_y > 0.0, e_y * d_y, 0.0)
    entropy = log_s - t_all / s_all
    return m, log_s, logp_y, q, entropy
