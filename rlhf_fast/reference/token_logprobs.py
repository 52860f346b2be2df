"""Reference ``token_logprobs``: log_softmax, gather and entropy, differentiated by autograd."""

from __future__ import annotations

import torch
from torch import Tensor


def token_logprobs(
    logits: Tensor,
    targets: Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
) -> Tensor | tuple[Tensor, Tensor]:
    """Log-prob of each target and (optionally) the entropy of each row.

    logits ``[..., V]`` in any float dtype (computed in that dtype), targets ``[...]``.
    With ``z = logits / temperature``:

        logp[i] = log_softmax(z[i])[targets[i]]
        H[i]    = -sum_v p[i, v] * log p[i, v]

    Rows whose target is ``ignore_index`` give 0 for both. Banned tokens (``-inf`` logits)
    have ``p = 0`` and add 0 to the entropy.
    """
    z = logits / temperature
    ignored = targets == ignore_index
    safe_targets = torch.where(ignored, torch.zeros_like(targets), targets)
    logp_all = torch.log_softmax(z, dim=-1)
    logp = logp_all.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    logp = torch.where(ignored, zero, logp)
    if not return_entropy:
        return logp
    p = logp_all.exp()
    # where() before the product: 0 * -inf would be NaN in value and in gradient.
    finite_logp = torch.where(p > 0, logp_all, torch.zeros_like(logp_all))
    entropy = -(p * finite_logp).sum(-1)
    entropy = torch.where(ignored, zero, entropy)
    return logp, entropy
