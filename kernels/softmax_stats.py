"""Stats sweep: the softmax statistics of one row, read once, in float32.

For a row of raw logits ``x``, ``k = log2(e) / temperature`` and a target column ``y`` the
sweep returns, without ever holding the row:

    M        = max_j x_j                                   (raw units: exact, see below)
    d_j      = (x_j - M) * k                               (log2 units; 0 exactly at the max)
    s        = sum_j 2^d_j,   log_s = ln s                 (lse = M / temperature + log_s)
    logp_y   = d_y ln 2 - log_s
    q        = 1 - p_y = (s - 2^d_y) / s                   (no cancellation when p_y -> 1)
    H        = -sum_j p_j ln p_j = log_s - ln 2 * sum_j 2^d_j d_j / s
    q2       = sum_j 2^(2 d_j),  ln sum_j p_j^2 = ln q2 - 2 log_s     (WITH_SUM_SQ only: WPO)

Cost per element (the loop of ``sweep_row_stats``): one MUFU ``ex2`` on a prescaled input
(``exp2``, no fix-ups), a max, a subtract and a multiply, a compare-and-select, two adds, and
for the entropy a clamp and an fma. Each thread folds its columns into ONE running state
``(m, s, r, t)`` (max, sum, the part of the sum strictly below the max, entropy sum),
rescaled once per trip of two 16-byte vectors; threads merge once at the end.

Exactness when one token dominates (p -> 1 for the target or any other token): ``s - 1``
must keep its relative accuracy although s is 1 + tiny. The elements equal to the running
maximum contribute exactly 1 each (``d == 0``), the others go to ``r`` as well: the number
of maxima is ``c = round(s - r)`` (an integer) and ``s - 1 = (c - 1) + r`` has no
cancellation; ``log_s = log1p(s - 1)``. The max is taken on the raw logits, so ``x - M`` is
exactly 0 at the maximum whatever the temperature.

``-inf`` logits are legal (a banned token has probability 0 and adds nothing to the
entropy); NaN or ``+inf`` anywhere in a row makes that row's outputs NaN, as in torch; a row
of only ``-inf`` gives NaN.
"""

import triton
import triton.language as tl

from .row_tiles import edge_columns, row_geometry, tile_offsets, vector_mask

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
D_FLOOR = tl.constexpr(-256.0)
"""Floor of log2-domain exponents where a product with them is formed: exp2 of it is 0 in
float32, and 0 * -256 is 0 where 0 * -inf would be NaN. NaN passes through the floor."""


@triton.jit
def log1p_accurate(x):
    """log(1 + x) for x >= -1 to a few ulps (Goldberg's trick; Triton has no log1p)."""
    u = 1.0 + x
    d = u - 1.0
    # d is exactly the part of x that survived the rounding of 1 + x; scaling log(u) by
    # x / d restores the lost low bits.
    return tl.where(d == 0.0, x, tl.log(u) * tl.fdiv(x, tl.where(d == 0.0, 1.0, d)))


@triton.jit
def fold_tiles(m, s, r, t, q, x0, x1, k, WITH_ENTROPY: tl.constexpr,
               WITH_SUM_SQ: tl.constexpr):
    """Fold two float32 tiles ``x0``, ``x1`` ``[T, K]`` of raw logits (-inf where masked) into
    the per-thread running state, each ``[T]``: m the max (raw), s = sum 2^((x - m) k), r the
    part of s from columns strictly below m, t = sum 2^d d (WITH_ENTROPY), q = sum 2^(2d)
    (WITH_SUM_SQ: the square of the exponential already taken; rescaled by alpha^2). One
    rescale of the state per call; without the flags t and q pass through untouched."""
    m_new = tl.maximum(m, tl.maximum(tl.max(x0, axis=1), tl.max(x1, axis=1)))
    # A thread that has seen only -inf keeps an empty state around a finite reference.
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    # NaN / +inf in the row: x - m_ref is NaN for that column and poisons s.
    d0 = (x0 - m_ref[:, None]) * k
    d1 = (x1 - m_ref[:, None]) * k
    if WITH_ENTROPY:
        d0 = tl.maximum(d0, D_FLOOR, propagate_nan=tl.PropagateNan.ALL)
        d1 = tl.maximum(d1, D_FLOOR, propagate_nan=tl.PropagateNan.ALL)
    e0 = tl.math.exp2(d0)
    e1 = tl.math.exp2(d1)
    delta = (m - m_ref) * k
    alpha = tl.math.exp2(delta)  # 0 while m is -inf (then s = r = t = 0)
    s_new = alpha * s + (tl.sum(e0, axis=1) + tl.sum(e1, axis=1))
    # A new maximum turns everything seen so far (old maxima included) into mass below it.
    below = tl.sum(tl.where(d0 < 0.0, e0, 0.0), axis=1) + tl.sum(tl.where(d1 < 0.0, e1, 0.0),
                                                                  axis=1)
    r = tl.where(m_new > m, alpha * s, r) + below
    if WITH_ENTROPY:
        # Rebase t to the new max: sum 2^d (d + delta); an empty state adds 0, not NaN.
        shift = tl.where(m == float("-inf"), 0.0, delta)
        t = alpha * (t + shift * s) + (tl.sum(e0 * d0, axis=1) + tl.sum(e1 * d1, axis=1))
    if WITH_SUM_SQ:
        q = (alpha * alpha) * q + (tl.sum(e0 * e0, axis=1) + tl.sum(e1 * e1, axis=1))
    return m_new, s_new, r, t, q


@triton.jit
def merge_thread_states(m, s, r, t, q, k, WITH_ENTROPY: tl.constexpr,
                        WITH_SUM_SQ: tl.constexpr):
    """Merge the per-thread states into the row's (M, s, r, t, q) around the row max (t, q:
    0 without their flags)."""
    m_row = tl.max(m, axis=0)
    m_ref = tl.where(m_row == float("-inf"), 0.0, m_row)
    delta = (m - m_ref) * k
    alpha = tl.math.exp2(delta)
    s_row = tl.sum(alpha * s, axis=0)
    # Threads below the row max hold only mass below it, their own maxima included.
    r_row = tl.sum(tl.where(m == m_row, r, alpha * s), axis=0)
    t_row = 0.0
    if WITH_ENTROPY:
        shift = tl.where(m == float("-inf"), 0.0, delta)
        t_row = tl.sum(alpha * (t + shift * s), axis=0)
    q_row = 0.0
    if WITH_SUM_SQ:
        q_row = tl.sum((alpha * alpha) * q, axis=0)
    return m_row, s_row, r_row, t_row, q_row


@triton.jit
def sweep_row_stats(logits_ptr, row_offset, n_cols, k, WITH_ENTROPY: tl.constexpr,
                    T: tl.constexpr, VEC: tl.constexpr, CACHE: tl.constexpr,
                    WITH_SUM_SQ: tl.constexpr):
    """One read of the row at ``logits_ptr + row_offset`` (unit column stride), two tiles
    per trip: its (M, s, r, t, q) as float32 scalars (see the module docstring; q = 0 without
    WITH_SUM_SQ). ``CACHE``: cache modifier of the tile reads (``""``: the default)."""
    head, n_vec = row_geometry(row_offset, n_cols, VEC)
    ptrs = logits_ptr + tl.multiple_of(row_offset + head, VEC) + tile_offsets(T, VEC)
    m = tl.full([T], float("-inf"), tl.float32)
    s = tl.zeros([T], tl.float32)
    r = tl.zeros([T], tl.float32)
    t = tl.zeros([T], tl.float32)
    q = tl.zeros([T], tl.float32)
    # Whole vectors, 128-bit; the last trip masks the vectors past the row (by whole
    # vectors, so the accesses stay 128-bit).
    left = n_vec
    for _ in range(tl.cdiv(n_vec, 2 * T)):
        x0 = tl.load(ptrs, mask=vector_mask(left, T, VEC), other=float("-inf"),
                     cache_modifier=CACHE).to(tl.float32)
        x1 = tl.load(ptrs + T * VEC, mask=vector_mask(left - T, T, VEC), other=float("-inf"),
                     cache_modifier=CACHE).to(tl.float32)
        m, s, r, t, q = fold_tiles(m, s, r, t, q, x0, x1, k, WITH_ENTROPY, WITH_SUM_SQ)
        ptrs += 2 * T * VEC
        left -= 2 * T
    # The unaligned head and tail, one column per thread.
    cols, valid = edge_columns(head, n_vec, n_cols, T, VEC)
    x = tl.load(logits_ptr + row_offset + cols, mask=valid, other=float("-inf")).to(tl.float32)
    m, s, r, t, q = fold_tiles(m, s, r, t, q, x, tl.full([T, 1], float("-inf"), tl.float32), k,
                               WITH_ENTROPY, WITH_SUM_SQ)
    return merge_thread_states(m, s, r, t, q, k, WITH_ENTROPY, WITH_SUM_SQ)


@triton.jit
def load_row(logits_ptr, row_offset, n_cols, R: tl.constexpr, T: tl.constexpr,
             VEC: tl.constexpr):
    """The whole row in registers: (x float32 ``[R * T, VEC]`` and x_edge ``[T, 1]``, -inf
    outside the row; head; the tile's mask; the edge columns and their mask)."""
    head, n_vec = row_geometry(row_offset, n_cols, VEC)
    in_row = vector_mask(n_vec, R * T, VEC)
    x = tl.load(logits_ptr + tl.multiple_of(row_offset + head, VEC) + tile_offsets(R * T, VEC),
                mask=in_row)
    # -inf outside the row after the widening: one select per column (a masked load's
    # "other" cost more in bf16 on Triton 3.9).
    x = tl.where(in_row, x.to(tl.float32), float("-inf"))
    edge, edge_valid = edge_columns(head, n_vec, n_cols, T, VEC)
    x_edge = tl.load(logits_ptr + row_offset + edge, mask=edge_valid,
                     other=float("-inf")).to(tl.float32)
    return x, x_edge, head, in_row, edge, edge_valid


@triton.jit
def row_stats_in_registers(x, x_edge, k, WITH_ENTROPY: tl.constexpr,
                           WITH_SUM_SQ: tl.constexpr):
    """(M, s, r, t, q, d, e, d_edge, e_edge) of a row held whole in registers (``load_row``):
    ``x`` float32 ``[R * T, VEC]`` (its aligned vectors) and ``x_edge`` ``[T, 1]`` (head and
    tail), -inf where masked. The max comes first (raw logits,
    exact), so the sums need no rescaling; ``d = (x - M) k`` and ``e = 2^d`` are
    returned for the gradient, which then needs no second exponential."""
    m_row = tl.maximum(tl.max(tl.max(x, axis=1), axis=0), tl.max(tl.max(x_edge, axis=1), axis=0))
    m_ref = tl.where(m_row == float("-inf"), 0.0, m_row)
    d = (x - m_ref) * k
    d_edge = (x_edge - m_ref) * k
    if WITH_ENTROPY:
        d = tl.maximum(d, D_FLOOR, propagate_nan=tl.PropagateNan.ALL)
        d_edge = tl.maximum(d_edge, D_FLOOR, propagate_nan=tl.PropagateNan.ALL)
    e = tl.math.exp2(d)
    e_edge = tl.math.exp2(d_edge)
    s = tl.sum(tl.sum(e, axis=1), axis=0) + tl.sum(tl.sum(e_edge, axis=1), axis=0)
    r = (tl.sum(tl.sum(tl.where(d < 0.0, e, 0.0), axis=1), axis=0)
         + tl.sum(tl.sum(tl.where(d_edge < 0.0, e_edge, 0.0), axis=1), axis=0))
    t = 0.0
    if WITH_ENTROPY:
        t = (tl.sum(tl.sum(e * d, axis=1), axis=0)
             + tl.sum(tl.sum(e_edge * d_edge, axis=1), axis=0))
    q = 0.0
    if WITH_SUM_SQ:
        q = (tl.sum(tl.sum(e * e, axis=1), axis=0)
             + tl.sum(tl.sum(e_edge * e_edge, axis=1), axis=0))
    return m_row, s, r, t, q, d, e, d_edge, e_edge


@triton.jit
def finish_row_stats(m_row, s, r, t, x_y, k):
    """(log2_s, logp_y, q, entropy) from a row's merged state and its target's raw logit.
    log2_s = log2 s; logp_y and entropy in nats; q = 1 - p_y."""
    c = tl.math.floor(s - r + 0.5)  # number of maxima, an exact integer
    m_ref = tl.where(m_row == float("-inf"), 0.0, m_row)
    d_y = (x_y - m_ref) * k
    e_y = tl.math.exp2(d_y)
    # s - 1 and s - p_y*s without cancellation: the target is a maximum (e_y = 1 exactly), or
    # one of the c maxima is the 1. c = 0 only for a row without a finite maximum (NaN out).
    s_minus_1 = tl.where(c >= 1.0, (c - 1.0) + r, s - 1.0)
    log_s = log1p_accurate(s_minus_1)
    log2_s = log_s * LOG2E
    logp_y = d_y * LN2 - log_s
    # Approximate divisions (2 ulp): once per row, their IEEE fix-ups would cost more.
    q = tl.fdiv(tl.where(d_y == 0.0, s_minus_1, s - e_y), s)
    entropy = log_s - LN2 * tl.fdiv(t, s)
    return log2_s, logp_y, q, entropy
