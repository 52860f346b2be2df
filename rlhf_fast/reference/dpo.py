"""Reference preference losses: log_softmax over the whole logits, the per-pair formulas as
written in the papers / TRL, autograd for gradients (float64 in the tests).

Only the raw fields of ``PreferenceLossConfig`` are read; what they imply is spelled out
here from the formulas (``PreferenceLossConfig``'s docstring, AOT's sorts included), not
taken from the config's helper properties: EXO's epsilon is 1e-3 when ``label_smoothing``
is 0; ORPO adds its NLL term with weight 1 on top of ``nll_coef``; SimPO and ORPO read no
reference model.

Peer options: ``f_divergence`` maps each sequence's log-ratio D to f'(e^D) before the margin
losses (forward_kl 1 - e^-D, js_divergence log 2 + log s(D), alpha_divergence
(exp(min((a-1) D, 80)) - 1) / (a-1)); ``ld_alpha`` weighs a sequence's valid tokens beyond
the shorter sequence of its pair by ld_alpha (policy and reference sums alike);
``nll_aggregation="sequence_mean"`` is the mean over non-empty chosen sequences of their
token-mean NLL; ``loss_weight`` (of any loss type, the sorted aot and orpo too) and
``mixture`` ((type, weight), ...) make the loss a weighted sum of pair losses, each on the
same scores; ``alphapo`` = a != 0 replaces the (reference-free) score D by the reward
(1 - e^(-a D)) / a, in the loss and in the reported rewards.

WPO (``use_weighting``): with lsq_t = log sum_v softmax(z_t)_v^2 of the temperature-scaled
logits z_t, each sequence's c = mean over its valid tokens of (logp_t - lsq_t) (0 when empty),
each pair's loss times w = exp(c_w + c_l), taken as a constant, and the NLL term times the
mean of w over the pairs (TRL 1.16 multiplies its sft term per pair by w too).

``nll_mask`` (ORPO's prompt NLL): the NLL term is taken over the chosen sequences' tokens in
``nll_mask`` (instead of those in ``mask``); the pair terms still see ``mask`` alone.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..preference_config import PreferenceLossConfig
from .token_logprobs import token_logprobs

EXO_EPSILON = 1e-3
"""EXO's epsilon when no label smoothing is given (log 0 would be -inf)."""


def _smoothing(config: PreferenceLossConfig) -> float:
    if config.loss_type == "exo_pair" and config.label_smoothing == 0:
        return EXO_EPSILON
    return config.label_smoothing


def _nll_weight(config: PreferenceLossConfig) -> float:
    return config.nll_coef + (1.0 if config.loss_type == "orpo" else 0.0)


def _uses_reference(config: PreferenceLossConfig) -> bool:
    return not config.reference_free and config.loss_type not in ("simpo", "orpo")


def _pair_loss(w: Tensor, lo: Tensor, config: PreferenceLossConfig) -> Tensor:
    beta, eps, kind = config.beta, _smoothing(config), config.loss_type
    logits = w - lo
    if kind == "sigmoid":
        return (-(1 - eps) * F.logsigmoid(beta * logits)
                - eps * F.logsigmoid(-beta * logits))
    if kind == "robust":
        return ((-(1 - eps) * F.logsigmoid(beta * logits) + eps * F.logsigmoid(-beta * logits))
                / (1 - 2 * eps))
    if kind == "hinge":
        return torch.relu(1 - beta * logits)
    if kind == "ipo":
        return (logits - 1 / (2 * beta)) ** 2
    if kind == "exo_pair":
        return (torch.sigmoid(beta * logits) * (F.logsigmoid(beta * logits) - math.log(1 - eps))
                + torch.sigmoid(-beta * logits)
                * (F.logsigmoid(-beta * logits) - math.log(eps)))
    if kind == "nca_pair":
        return (-F.logsigmoid(beta * w) - 0.5 * F.logsigmoid(-beta * w)
                - 0.5 * F.logsigmoid(-beta * lo))
    if kind == "bco_pair":
        return -F.logsigmoid(beta * w) - F.logsigmoid(-beta * lo)
    if kind == "discopop":
        x = beta * logits
        mix = torch.sigmoid(x / config.discopop_tau)
        return (1 - mix) * -F.logsigmoid(x) + mix * torch.exp(-x)
    if kind == "sppo_hard":
        return (w - 0.5 / beta) ** 2 + (lo + 0.5 / beta) ** 2
    if kind == "apo_zero":
        return (1 - torch.sigmoid(beta * w)) + torch.sigmoid(beta * lo)
    if kind == "apo_down":
        return torch.sigmoid(beta * w) + (1 - torch.sigmoid(beta * logits))
    if kind == "simpo":
        x = beta * logits - config.gamma
        return -(1 - eps) * F.logsigmoid(x) - eps * F.logsigmoid(-x)
    if kind == "orpo":
        log_odds = logits - (torch.log1p(-torch.exp(w)) - torch.log1p(-torch.exp(lo)))
        return -beta * F.logsigmoid(log_odds)
    raise ValueError(f"unknown loss_type {kind!r}")


def _f_divergence(d: Tensor, config: PreferenceLossConfig) -> Tensor:
    if config.alphapo != 0:
        return (1 - torch.exp(-config.alphapo * d)) / config.alphapo
    kind = config.f_divergence
    if kind == "forward_kl":
        return 1 - torch.exp(-d)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(d)
    if kind == "alpha_divergence" and abs(config.f_alpha - 1) >= 1e-6:
        a = config.f_alpha
        return (torch.exp(torch.clamp((a - 1) * d, max=80.0)) - 1) / (a - 1)
    return d


def dpo_loss(
    logits: Tensor,
    targets: Tensor,
    mask: Tensor,
    *,
    ref_logprobs: Tensor | None = None,
    config: PreferenceLossConfig,
    nll_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
    """(loss, chosen sequence log-probs ``[B]``, rejected ``[B]``, metrics).

    logits ``[2B, T, V]`` (chosen first), targets and mask ``[2B, T]``; ``ref_logprobs``
    ``[2B]`` (sums over the masked tokens) or ``[2B, T]``; ``nll_mask`` ``[2B, T]`` or None
    (the NLL's tokens; None: ``mask``). Runs in the logits' dtype. Targets equal to -100
    count as masked.
    """
    valid = mask.bool() & (targets != -100)
    nll_valid = nll_mask.bool() & (targets != -100) if nll_mask is not None else None
    z = logits / config.temperature
    logp = token_logprobs(z, targets)
    log_sum_sq = None
    if config.use_weighting:
        log_sum_sq = torch.logsumexp(2 * torch.log_softmax(z, dim=-1), dim=-1)
    return dpo_loss_from_logprobs(logp, valid, ref_logprobs, config, log_sum_sq=log_sum_sq,
                                  nll_valid=nll_valid)


def dpo_loss_from_logprobs(logp: Tensor, valid: Tensor, ref_logprobs: Tensor | None,
                           config: PreferenceLossConfig, *, log_sum_sq: Tensor | None = None,
                           nll_valid: Tensor | None = None
                           ) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
    """``dpo_loss`` from the per-token log-probs ``[2B, T]`` (differentiable in them), the
    bool mask of the tokens that count, log sum_v p_v^2 per token (``use_weighting``) and the
    bool mask of the NLL's tokens (None: ``valid``)."""
    m = valid.to(logp.dtype)
    length = m.sum(-1)
    b = logp.shape[0] // 2
    weight = m.clone()
    if config.ld_alpha is not None:
        for i in range(2 * b):
            shared = min(int(length[i % b]), int(length[b + i % b]))
            seen = 0
            for t in range(m.shape[1]):
                if valid[i, t]:
                    seen += 1
                    if seen > shared:
                        weight[i, t] = config.ld_alpha
    policy = (logp * weight).sum(-1)
    ref = torch.zeros_like(policy)
    if _uses_reference(config):
        ref = ref_logprobs.to(logp.dtype)
        ref = torch.where(valid, ref * weight, 0).sum(-1) if ref.dim() == 2 else ref
    if config.average_logprobs:
        policy, ref = policy / length.clamp(min=1), ref / length.clamp(min=1)
    d = policy - ref
    scored = _f_divergence(d, config)
    if config.loss_type in ("aot", "aot_unpaired"):
        if config.loss_type == "aot":
            first = torch.sort(policy[:b] - policy[b:]).values
            second = torch.sort(ref[:b] - ref[b:]).values
        else:
            first, second = torch.sort(d[:b]).values, torch.sort(d[b:]).values
        x = config.beta * (first - second)
        eps = config.label_smoothing
        losses = config.loss_weight * (-(1 - eps) * F.logsigmoid(x) - eps * F.logsigmoid(-x))
    elif config.loss_type == "orpo":  # a pair with an empty sequence has no odds: loss 0
        both = (length[:b] > 0) & (length[b:] > 0)
        safe = torch.full_like(d[:b], -1.0)
        losses = config.loss_weight * torch.where(
            both, _pair_loss(torch.where(both, d[:b], safe), torch.where(both, d[b:], safe),
                             config), 0.0)
    else:
        members = ((config.loss_type, config.loss_weight), *config.mixture)
        losses = 0.0 * d[:b]
        for kind, weight in members:
            member = dataclasses.replace(config, loss_type=kind, mixture=())
            margin = kind in ("sigmoid", "hinge", "robust", "exo_pair", "discopop", "ipo",
                              "simpo")
            x = scored if margin else d   # TRL: the f-divergence scores feed the margin losses
            losses = losses + weight * _pair_loss(x[:b], x[b:], member)
    pair_weight = torch.ones_like(d[:b])
    if config.use_weighting:
        aligned = torch.where(valid, (logp - log_sum_sq.to(logp.dtype)).detach(), 0.0)
        c = aligned.sum(-1) / length.clamp(min=1)
        pair_weight = torch.exp(c[:b] + c[b:])
        losses = losses * pair_weight
    loss = losses.mean() if b > 0 else losses.sum()
    n = nll_valid.to(logp.dtype) if nll_valid is not None else m
    n_length = n.sum(-1)
    chosen_logp = torch.where(n[:b] > 0, logp[:b], 0.0)
    nll = -chosen_logp.sum() / n[:b].sum().clamp(min=1)
    if _nll_weight(config) != 0:
        if config.nll_aggregation == "sequence_mean":
            per_sequence = [-chosen_logp[i].sum() / n_length[i] for i in range(b)
                            if n_length[i] > 0]
            nll_term = sum(per_sequence) / len(per_sequence) if per_sequence else 0.0 * nll
        else:
            nll_term = nll
        if config.use_weighting and b > 0:
            nll_term = nll_term * pair_weight.mean()
        loss = loss + _nll_weight(config) * nll_term
    rewarded = scored if config.alphapo != 0 else d
    r_w, r_l = config.beta * rewarded[:b].detach(), config.beta * rewarded[b:].detach()

    def mean(x: Tensor) -> Tensor:
        return x.sum() / max(b, 1)

    metrics = {"rewards_chosen": mean(r_w), "rewards_rejected": mean(r_l),
               "rewards_margin": mean(r_w - r_l),
               "rewards_accuracy": mean((r_w > r_l).to(r_w.dtype)),
               "logps_chosen": mean(policy[:b].detach()),
               "logps_rejected": mean(policy[b:].detach()), "nll": nll.detach(),
               "pair_count": torch.tensor(float(b))}
    return loss, policy[:b].detach(), policy[b:].detach(), metrics
