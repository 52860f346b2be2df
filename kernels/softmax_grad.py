"""Gradient sweep: dL/dlogits of a row from its statistics and two per-token coefficients.

With z = logits / temperature, p = softmax(z), c = dL/dlogp_y and c_H = dL/dH (every loss
reduces to these two per-token coefficients; docs/architecture.md, One coefficient per token):

    dL/dlogits_j = ( c * (1[j == y] - p_j)  -  c_H * p_j * (log p_j + H) ) / temperature

Every column but the target is written by the loop as

    u_j = (x_j - M) * k - log2_s = log2 p_j,      g_j = 2^u_j * (A + B * u_j)
    A = -(c + c_H * H) / temperature,             B = -c_H * ln 2 / temperature

(``B = 0`` without the entropy term: one ``exp2`` and one multiply per column, no compare
with the target). The target column is then overwritten once, after a barrier, with
``(c * q - c_H * p_y * (log p_y + H)) / temperature``, where q = 1 - p_y comes from the
stats sweep (exact when p_y -> 1, where 1 - exp(logp_y) rounds to 0). ``x_j - M`` is exact
(0 at the maximum), so ``log p_j + H`` keeps its relative accuracy for a dominant token.
"""

import triton
import triton.language as tl

from .row_tiles import edge_columns, row_geometry, tile_offsets, vector_mask
from .softmax_stats import D_FLOOR, LN2


@triton.jit
def grad_tile(x, m_row, k, log2_s, coef_a, coef_b, WITH_ENTROPY: tl.constexpr):
    """float32 gradient of a tile of raw logits ``x`` (any shape), target column aside."""
    u = tl.fma(x - m_row, k, -log2_s)
    if WITH_ENTROPY:
        # p * (A + B u) -> 0 as p -> 0: a banned (-inf) logit gives 0, not 0 * -inf.
        u = tl.maximum(u, D_FLOOR, propagate_nan=tl.PropagateNan.ALL)
        return tl.math.exp2(u) * tl.fma(u, coef_b, coef_a)
    return tl.math.exp2(u) * coef_a


@triton.jit
def grad_from_exponentials(d, e, coef_a, coef_b, WITH_ENTROPY: tl.constexpr):
    """The same gradient from ``d = (x - M) k`` and ``e = 2^d`` kept from the stats (a row
    held in registers): ``g = e * (A + B d)`` with ``A``, ``B`` from ``exponential_coefs``."""
    if WITH_ENTROPY:
        return e * tl.fma(d, coef_b, coef_a)
    return e * coef_a


@triton.jit
def exponential_coefs(c, c_entropy, s, t, inv_temp):
    """(A, B) of ``grad_from_exponentials``: with p = e / s and log2 p = d - log2 s,
    p (A' + B' log2 p) = e (A' - B' log2 s + B' d) / s, where A' - B' log2 s
    = -(c + c_H (H - log s)) / temperature and H - log s = -ln 2 * t / s (no cancellation)."""
    coef_a = -(c - c_entropy * LN2 * (t / s)) * inv_temp / s
    coef_b = -c_entropy * LN2 * inv_temp / s
    return coef_a, coef_b


@triton.jit
def target_grad(x_y, m_row, k, log2_s, q, entropy, c, c_entropy, inv_temp):
    """The target column's gradient (float32 scalar)."""
    u_y = tl.fma(x_y - m_row, k, -log2_s)
    p_y = tl.math.exp2(u_y)
    g = c * q
    # p * (log p + H) -> 0 as p -> 0 (a -inf target is only possible with ignore rows).
    g -= c_entropy * tl.where(p_y > 0.0, p_y * (u_y * LN2 + entropy), 0.0)
    return g * inv_temp


@triton.jit
def sweep_row_grad(logits_ptr, grad_ptr, row_offset, grad_offset, n_cols, k, m_row, log2_s,
                   coef_a, coef_b, WITH_ENTROPY: tl.constexpr, REVERSE: tl.constexpr,
                   SAME_ALIGNMENT: tl.constexpr, T: tl.constexpr, VEC: tl.constexpr,
                   STREAM: tl.constexpr):
    """Read the row at ``logits_ptr + row_offset`` and write ``grad_tile`` of every column to
    ``grad_ptr + grad_offset`` (unit column strides), two tiles per trip; the caller then
    writes the target column. REVERSE: last tiles first (the end of a row just read by the
    stats sweep is the likeliest to be in L2). SAME_ALIGNMENT: the two rows have the same
    offset modulo VEC (else the stores are not vectorised). STREAM: evict-first hints on the
    reads (``eviction_policy``) and the writes (``.cs``), for data nothing reads again soon."""
    EVICT: tl.constexpr = "evict_first" if STREAM else ""
    CACHE: tl.constexpr = ".cs" if STREAM else ""
    head, n_vec = row_geometry(row_offset, n_cols, VEC)
    TILE: tl.constexpr = T * VEC
    offsets = tile_offsets(T, VEC)
    in_ptrs = logits_ptr + tl.multiple_of(row_offset + head, VEC) + offsets
    if SAME_ALIGNMENT:
        out_ptrs = grad_ptr + tl.multiple_of(grad_offset + head, VEC) + offsets
    else:
        out_ptrs = grad_ptr + (grad_offset + head) + offsets
    out_ty = grad_ptr.dtype.element_ty
    n_trips = tl.cdiv(n_vec, 2 * T)
    # Whole vectors, 128-bit; the vectors past the row are masked in the last trip (by whole
    # vectors, so the accesses stay 128-bit).
    step = 2 * TILE
    left = n_vec
    if REVERSE:
        in_ptrs += (n_trips - 1) * step
        out_ptrs += (n_trips - 1) * step
        left = n_vec - (n_trips - 1) * (2 * T)
        step = -step
    for _ in range(n_trips):
        mask0 = vector_mask(left, T, VEC)
        mask1 = vector_mask(left - T, T, VEC)
        x0 = tl.load(in_ptrs, mask=mask0, eviction_policy=EVICT).to(tl.float32)
        x1 = tl.load(in_ptrs + TILE, mask=mask1, eviction_policy=EVICT).to(tl.float32)
        g0 = grad_tile(x0, m_row, k, log2_s, coef_a, coef_b, WITH_ENTROPY)
        g1 = grad_tile(x1, m_row, k, log2_s, coef_a, coef_b, WITH_ENTROPY)
        tl.store(out_ptrs, g0.to(out_ty), mask=mask0, cache_modifier=CACHE)
        tl.store(out_ptrs + TILE, g1.to(out_ty), mask=mask1, cache_modifier=CACHE)
        in_ptrs += step
        out_ptrs += step
        if REVERSE:
            left += 2 * T
        else:
            left -= 2 * T
    cols, valid = edge_columns(head, n_vec, n_cols, T, VEC)
    x = tl.load(logits_ptr + row_offset + cols, mask=valid, other=float("-inf")).to(tl.float32)
    g = grad_tile(x, m_row, k, log2_s, coef_a, coef_b, WITH_ENTROPY)
    tl.store(grad_ptr + grad_offset + cols, g.to(out_ty), mask=valid)


@triton.jit
def fill_row(grad_ptr, grad_offset, n_cols, value, T: tl.constexpr, VEC: tl.constexpr):
    """Write ``value`` to every column of the row at ``grad_ptr + grad_offset``."""
    head, n_vec = row_geometry(grad_offset, n_cols, VEC)
    out_ptrs = grad_ptr + tl.multiple_of(grad_offset + head, VEC) + tile_offsets(T, VEC)
    block = tl.full([T, VEC], value, grad_ptr.dtype.element_ty)
    left = n_vec
    for _ in range(tl.cdiv(n_vec, T)):
        tl.store(out_ptrs, block, mask=vector_mask(left, T, VEC))
        out_ptrs += T * VEC
        left -= T
    cols, valid = edge_columns(head, n_vec, n_cols, T, VEC)
    tl.store(grad_ptr + grad_offset + cols, tl.full([T, 1], value, grad_ptr.dtype.element_ty),
             mask=valid)
