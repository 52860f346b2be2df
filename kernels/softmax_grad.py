"""Gradient sweep: dL/dlogits for one block of a row, from the row's saved statistics.

With z = logits * inv_temp, p = softmax(z), the per-token coefficients c = dL/dlogp_y and
c_H = dL/dH give (docs/architecture.md, One coefficient per token):

    dL/dlogits_j = ( c * (1[j == y] - p_j)  -  c_H * p_j * (log p_j + H) ) * inv_temp

p_j is rebuilt as exp((z_j - m) - log_s) from the stats sweep's (m, log_s); the target's
``1 - p_y`` is the sweep's ``q`` (exact when p_y -> 1, where 1 - exp(logp_y) rounds to 0).
"""

import triton
import triton.language as tl


@triton.jit
def softmax_grad_block(
    z, cols, target, m, log_s, q, entropy, c_logp, c_entropy, inv_temp,
    HAS_C_ENTROPY: tl.constexpr,
):
    """Return the float32 gradient for a block ``z`` (scaled logits) at columns ``cols``."""
    logp = (z - m) - log_s
    p = tl.exp(logp)
    is_target = cols == target
    g = tl.where(is_target, c_logp * q, -c_logp * p)
    if HAS_C_ENTROPY:
        # p * (log p + H) -> 0 as p -> 0; a banned (-inf) logit must give 0, not 0 * -inf.
        g -= c_entropy * tl.where(p > 0.0, p * (logp + entropy), 0.0)
    return g * inv_temp
