"""The coefficient step of the preference losses: sequence scores, per-pair loss, ``dL/dlogp``.

Input: the stats sweep's float32 ``logp`` ``[2b, T]`` of a batch (or a chunk) of ``b`` pairs,
chosen sequences first. Output: the loss, the per-token coefficient ``c = dL/dlogp`` and
the per-pair values behind the metrics. Every derivative is written out by hand (the float64
reference in ``rlhf_fast.reference.dpo`` uses autograd); everything is ``[2b]`` or
``[2b, T]``-sized and computed in float64, so it costs nothing next to a pass over the logits.

Each token of sequence i gets ``c_t = dL/dlogp(y_i)`` (divided by the length when the
sequence log-probs are averaged), plus ``-nll_weight / chosen_tokens`` on chosen tokens.

Sequences are the rows of ``[2b, T]``, or the spans of a packed ``[1, N]`` row described by
a ``layout`` (``rlhf_fast.ops.packing``): the 2b sequences of a packed batch are the b
chosen ones, then their b rejected partners in the same order, as the padded rows are.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .ops.packing import Layout, Padded
from .preference_config import F_ALPHA_EXP_CAP, F_DIVERGENCE_LOSSES, PreferenceLossConfig


@dataclass
class PairCoefficients:
    loss: Tensor               # float64 scalar: this batch's (or chunk's) share of the loss
    c_logp: Tensor             # float32 [2b, T]: dL/dlogp, 0 at masked tokens
    pairs: dict[str, Tensor]   # float64 [b] per-pair values (and the scalar "nll_sum")


def token_weights(valid: Tensor, config: PreferenceLossConfig,
                  layout: Layout | None = None) -> Tensor:
    """float64 ``[2b, T]`` (``[1, N]`` packed): each token's weight in its sequence's log-prob
    sum, the mask, or with ``ld_alpha`` (LD-DPO) ``ld_alpha`` on the valid tokens beyond the
    pair's shorter length."""
    m = valid.double()
    if config.ld_alpha is None:
        return m
    layout = layout if layout is not None else Padded(m.shape[0])
    if isinstance(layout, Padded):
        b = m.shape[0] // 2
        length = m.sum(-1)
        shared = torch.minimum(length[:b], length[b:]).repeat(2)
        position = m.cumsum(-1)  # 1-based index of each valid token in its sequence
        return torch.where(position <= shared[:, None], 1.0, config.ld_alpha) * m
    length = layout.seq_sum(m)                      # [2b]: chosen sequences first
    b = length.shape[0] // 2
    shared = torch.minimum(length[:b], length[b:]).repeat(2)
    before = length.cumsum(0) - length              # valid tokens of earlier sequences
    position = m.cumsum(-1) - layout.per_token(before)
    return torch.where(position <= layout.per_token(shared), 1.0, config.ld_alpha) * m


def sequence_scores(logp: Tensor, valid: Tensor, ref: Tensor | None,
                    config: PreferenceLossConfig, layout: Layout | None = None
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """(policy score, reference score, d score / d logp_t) per sequence, float64 ``[2b]``
    (the last times ``token_weights`` is the per-token derivative).

    ``ref``: None, sums ``[2b]`` over the same masked tokens, or per token (``[2b, T]``,
    ``[1, N]`` packed). With ``average_logprobs`` both scores are divided by the sequence's
    token count (an empty sequence scores 0); with ``ld_alpha`` the tokens weigh
    ``token_weights`` (per-token ``ref`` only)."""
    layout = layout if layout is not None else Padded(logp.shape[0])
    weight = token_weights(valid, config, layout)
    length = layout.seq_sum(valid.double())
    scale = 1.0 / length.clamp(min=1) if config.average_logprobs else torch.ones_like(length)
    score = layout.seq_sum(torch.where(valid, logp.double(), 0.0) * weight) * scale
    if not config.uses_reference:
        ref_score = torch.zeros_like(score)
    elif ref.dim() == 2:
        ref_score = layout.seq_sum(torch.where(valid, ref.double(), 0.0) * weight) * scale
    else:
        ref_score = ref.double() * scale
    return score, ref_score, scale


def transformed_scores(d: Tensor, config: PreferenceLossConfig) -> tuple[Tensor, Tensor]:
    """TRL's f'(u) of the ratio u = e^D, or AlphaPO's (1 - e^(-a D)) / a
    (``rlhf_fast.preference_config``), and its derivative in D, float64 ``[2b]``."""
    if config.alphapo != 0:
        e = torch.exp(-config.alphapo * d)
        return (1 - e) / config.alphapo, e
    kind = config.f_divergence
    if kind == "forward_kl":
        e = torch.exp(-d)
        return 1 - e, e
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(d), torch.sigmoid(-d)
    if kind == "alpha_divergence" and abs(config.f_alpha - 1.0) >= 1e-6:
        k = config.f_alpha - 1.0
        t = k * d
        capped = t > F_ALPHA_EXP_CAP
        e = torch.exp(torch.clamp(t, max=F_ALPHA_EXP_CAP))
        return (e - 1) / k, torch.where(capped, 0.0, e)
    return d, torch.ones_like(d)


def _logistic(x: Tensor, eps: float, sign: float) -> tuple[Tensor, Tensor]:
    """``-(1-eps) log s(x) + sign * eps log s(-x)`` and its derivative in x."""
    loss = -(1 - eps) * F.logsigmoid(x) + sign * eps * F.logsigmoid(-x)
    return loss, -(1 - eps) * torch.sigmoid(-x) - sign * eps * torch.sigmoid(x)


def _sigmoid_slope(x: Tensor) -> Tensor:
    return torch.sigmoid(x) * torch.sigmoid(-x)


def pair_losses(d_w: Tensor, d_l: Tensor, config: PreferenceLossConfig
                ) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair loss ``[b]`` and its derivatives in the chosen and rejected scores ``D_w``,
    ``D_l`` (formulas in ``rlhf_fast.preference_config``). ORPO's inputs must be < 0 on
    the rejected side (``orpo_pairs`` takes care of empty sequences)."""
    beta, eps, kind = config.beta, config.smoothing, config.loss_type
    x = beta * (d_w - d_l)
    if kind in ("sigmoid", "simpo"):
        loss, dx = _logistic(x - config.gamma if kind == "simpo" else x, eps, -1.0)
        return loss, beta * dx, -beta * dx
    if kind == "robust":
        loss, dx = _logistic(x, eps, 1.0)
        return loss / (1 - 2 * eps), beta * dx / (1 - 2 * eps), -beta * dx / (1 - 2 * eps)
    if kind == "hinge":
        dx = -(x < 1).double()
        return torch.relu(1 - x), beta * dx, -beta * dx
    if kind == "ipo":
        r = d_w - d_l - 1 / (2 * beta)
        return r * r, 2 * r, -2 * r
    if kind == "exo_pair":
        loss = (torch.sigmoid(x) * (F.logsigmoid(x) - math.log1p(-eps))
                + torch.sigmoid(-x) * (F.logsigmoid(-x) - math.log(eps)))
        # d/dx [s(x) log s(x) + s(-x) log s(-x)] = s(x) s(-x) (log s(x) - log s(-x)) = s s' x
        dx = _sigmoid_slope(x) * (x - math.log1p(-eps) + math.log(eps))
        return loss, beta * dx, -beta * dx
    if kind == "discopop":
        # (1 - g) (-log s(x)) + g e^-x with g = s(x / tau); dg/dx = g (1 - g) / tau.
        tau = config.discopop_tau
        g = torch.sigmoid(x / tau)
        dg = g * torch.sigmoid(-x / tau) / tau
        e = torch.exp(-x)
        loss = (1 - g) * -F.logsigmoid(x) + g * e
        dx = dg * (F.logsigmoid(x) + e) - (1 - g) * torch.sigmoid(-x) - g * e
        return loss, beta * dx, -beta * dx
    x_w, x_l = beta * d_w, beta * d_l
    if kind == "nca_pair":
        loss = -F.logsigmoid(x_w) - 0.5 * F.logsigmoid(-x_w) - 0.5 * F.logsigmoid(-x_l)
        return (loss, beta * (0.5 * torch.sigmoid(x_w) - torch.sigmoid(-x_w)),
                beta * 0.5 * torch.sigmoid(x_l))
    if kind == "bco_pair":
        loss = -F.logsigmoid(x_w) - F.logsigmoid(-x_l)
        return loss, -beta * torch.sigmoid(-x_w), beta * torch.sigmoid(x_l)
    if kind == "sppo_hard":
        r_w, r_l = d_w - 1 / (2 * beta), d_l + 1 / (2 * beta)
        return r_w * r_w + r_l * r_l, 2 * r_w, 2 * r_l
    if kind == "apo_zero":
        loss = 1 - torch.sigmoid(x_w) + torch.sigmoid(x_l)
        return loss, -beta * _sigmoid_slope(x_w), beta * _sigmoid_slope(x_l)
    if kind == "apo_down":
        loss = torch.sigmoid(x_w) + 1 - torch.sigmoid(x)
        return (loss, beta * (_sigmoid_slope(x_w) - _sigmoid_slope(x)),
                beta * _sigmoid_slope(x))
    if kind == "orpo":
        # log odds of a mean log-prob a <= 0: a - log(1 - e^a), d/da = 1 / (1 - e^a).
        not_w, not_l = -torch.expm1(d_w), -torch.expm1(d_l)
        odds = (d_w - d_l) - (torch.log(not_w) - torch.log(not_l))
        loss = -beta * F.logsigmoid(odds)
        # dL/da_w = -beta s(-o) / (1 - e^a_w), rewritten without the 0 / 0 of a certain
        # chosen sequence (a_w = 0, o = +inf): (1 + e^o)(1 - e^a_w) expanded.
        g_w = -beta / (not_w + torch.exp(d_w - d_l) * not_l)
        return loss, g_w, beta * torch.sigmoid(-odds) / not_l
    raise AssertionError(f"unhandled loss_type {kind!r}")


def sorted_pairs(score: Tensor, ref_score: Tensor, config: PreferenceLossConfig
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """AOT's losses on the batch's sorted margins (``rlhf_fast.preference_config``): the loss
    ``[b]`` at each sorted position and its derivatives in ``D_w``, ``D_l`` of each pair (the
    derivative at sorted position k goes to the pair that landed there)."""
    b = score.shape[0] // 2
    d = score - ref_score
    if config.loss_type == "aot":
        policy_sorted, order_w = torch.sort(score[:b] - score[b:], stable=True)
        ref_sorted, _ = torch.sort(ref_score[:b] - ref_score[b:], stable=True)
        order_l = order_w
        x = config.beta * (policy_sorted - ref_sorted)
    else:
        chosen_sorted, order_w = torch.sort(d[:b], stable=True)
        rejected_sorted, order_l = torch.sort(d[b:], stable=True)
        x = config.beta * (chosen_sorted - rejected_sorted)
    loss, dx = _logistic(x, config.smoothing, -1.0)
    g_w = torch.zeros_like(loss).index_put((order_w,), config.beta * dx)
    g_l = torch.zeros_like(loss).index_put((order_l,), -config.beta * dx)
    return loss, g_w, g_l


def _scored_pair_losses(d: Tensor, config: PreferenceLossConfig
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """``pair_losses`` of the log-ratios D ``[2b]``, through the f-divergence (margin losses
    only, as TRL) or AlphaPO transform when one is set: (loss, dL/dD_w, dL/dD_l)."""
    b = d.shape[0] // 2
    transformed = config.alphapo != 0 or (config.f_divergence != "reverse_kl"
                                          and config.loss_type in F_DIVERGENCE_LOSSES)
    if not transformed:
        return pair_losses(d[:b], d[b:], config)
    f, df = transformed_scores(d, config)
    loss, g_w, g_l = pair_losses(f[:b], f[b:], config)
    return loss, g_w * df[:b], g_l * df[b:]


def orpo_pairs(a_w: Tensor, a_l: Tensor, nonempty: Tensor, config: PreferenceLossConfig
               ) -> tuple[Tensor, Tensor, Tensor]:
    """ORPO's pair losses, 0 (with no gradient) for a pair with an empty sequence: the odds
    of a sequence with no token are undefined (its mean log-prob would be 0, a certainty)."""
    b = a_w.shape[0]
    both = nonempty[:b] & nonempty[b:]
    loss, g_w, g_l = pair_losses(torch.where(both, a_w, -1.0), torch.where(both, a_l, -1.0),
                                 config)
    return (torch.where(both, loss, 0.0), torch.where(both, g_w, 0.0),
            torch.where(both, g_l, 0.0))


def chosen_token_mask(layout: Layout, like: Tensor) -> Tensor:
    """Bool, broadcasting against the per-token tensors: the tokens of the first half of the
    sequences (the chosen ones)."""
    s = layout.num_sequences
    return layout.per_token(torch.arange(s, device=like.device) < s // 2)


def wpo_weights(logp: Tensor, log_sum_sq: Tensor, valid: Tensor, layout: Layout) -> Tensor:
    """WPO's per-pair weight ``[b]``, float64, a constant: exp(c_w + c_l) with c a sequence's
    mean over its valid tokens of logp_t - log sum_v p_v(t)^2 (0 for an empty sequence)."""
    aligned = torch.where(valid, logp.double() - log_sum_sq.double(), 0.0)
    c = layout.seq_sum(aligned) / layout.seq_sum(valid.double()).clamp(min=1)
    b = c.shape[0] // 2
    return torch.exp(c[:b] + c[b:])


def preference_coefficients(logp: Tensor, valid: Tensor, ref: Tensor | None,
                            config: PreferenceLossConfig, *, num_pairs: int,
                            chosen_tokens: Tensor, chosen_sequences: Tensor | None = None,
                            layout: Layout | None = None, log_sum_sq: Tensor | None = None,
                            nll_valid: Tensor | None = None) -> PairCoefficients:
    """Loss share and ``c = dL/dlogp`` of ``b`` pairs.

    logp, valid ``[2b, T]`` (chosen rows first), or ``[1, N]`` packed with ``layout``;
    ``num_pairs``, ``chosen_tokens`` and ``chosen_sequences`` (0-dim tensors, kept on the
    device: no host sync; the last only for ``nll_aggregation="sequence_mean"``) are the whole
    batch's pair count, chosen-token count and non-empty chosen sequence count (the
    normalisers of the pair mean and of the NLL), so chunks of pairs add up to the batch's
    loss and gradient exactly.

    ``log_sum_sq`` (float32 like ``logp``, ``use_weighting`` only): log sum_v p_v^2 per token,
    for WPO's pair weights; the NLL term is then weighted by their mean over THIS call's
    pairs, so a call must hold the whole batch when both are on. ``nll_valid`` (bool like
    ``valid``): the NLL's tokens (ORPO's prompt NLL; they may lie outside ``valid``, only the
    chosen sequences' count); None: the chosen sequences' ``valid`` tokens. ``chosen_tokens``
    and ``chosen_sequences`` then count those.
    """
    layout = layout if layout is not None else Padded(logp.shape[0])
    score, ref_score, scale = sequence_scores(logp, valid, ref, config, layout)
    d_score = token_weights(valid, config, layout) * layout.per_token(scale)
    b = score.shape[0] // 2
    d = score - ref_score
    if config.loss_type == "orpo":
        nonempty = layout.seq_sum(valid.double()) > 0
        loss_pairs, g_w, g_l = orpo_pairs(d[:b], d[b:], nonempty, config)
    elif config.loss_type in ("aot", "aot_unpaired"):
        loss_pairs, g_w, g_l = sorted_pairs(score, ref_score, config)
    else:
        loss_pairs, g_w, g_l = _scored_pair_losses(d, config)
    if config.loss_weight != 1.0 or config.mixture:
        # The first type's weight applies whatever the type (orpo and the sorted aot too);
        # a mixture holds only MIXABLE_LOSSES (no sort, no length normalisation).
        loss_pairs, g_w, g_l = (config.loss_weight * x for x in (loss_pairs, g_w, g_l))
        for kind, weight in config.mixture:
            more = _scored_pair_losses(d, dataclasses.replace(config, loss_type=kind,
                                                              mixture=()))
            loss_pairs, g_w, g_l = (x + weight * y for x, y in
                                    zip((loss_pairs, g_w, g_l), more, strict=True))
    pairs_norm = float(max(num_pairs, 1))
    nll_weight = torch.full((), config.nll_weight, dtype=torch.float64, device=logp.device)
    if config.use_weighting:
        w = wpo_weights(logp, log_sum_sq, valid, layout)
        loss_pairs, g_w, g_l = loss_pairs * w, g_w * w, g_l * w
        nll_weight = nll_weight * w.sum() / pairs_norm   # TRL weighs its sft term per pair
    g_seq = torch.cat([g_w, g_l]) / pairs_norm
    c = layout.per_token(g_seq) * d_score
    loss = loss_pairs.sum() / pairs_norm
    chosen_valid = (nll_valid if nll_valid is not None else valid) \
        & chosen_token_mask(layout, valid)
    chosen_logp = torch.where(chosen_valid, logp.double(), 0.0)
    nll_sum = -chosen_logp.sum()
    if config.nll_weight != 0:
        m_w = chosen_valid.double()
        if config.nll_aggregation == "sequence_mean":
            lengths = layout.seq_sum(m_w)
            count = chosen_sequences if chosen_sequences is not None else (lengths > 0).sum()
            per_token = m_w / layout.per_token(lengths).clamp(min=1)
            share = nll_weight / count.double().clamp(min=1)
            loss = loss - share * (chosen_logp * per_token).sum()
            c = c - share * per_token
        else:
            nll_share = nll_weight / chosen_tokens.double().clamp(min=1)
            loss = loss + nll_share * nll_sum
            c = c - nll_share * m_w
    rewarded = transformed_scores(d, config)[0] if config.alphapo != 0 else d
    pairs = {"logps_chosen": score[:b], "logps_rejected": score[b:],
             "rewards_chosen": config.beta * rewarded[:b],
             "rewards_rejected": config.beta * rewarded[b:],
             "nll_sum": nll_sum}
    return PairCoefficients(loss, c.float(), pairs)


def preference_metrics(parts: list[dict[str, Tensor]], chosen_tokens: Tensor
                       ) -> dict[str, Tensor]:
    """Detached float32 scalars over all pairs: mean rewards (beta * D) of chosen and rejected,
    their margin, the accuracy (share of pairs with r_w > r_l), the mean sequence log-probs,
    the chosen NLL (token mean) and the pair count."""
    cat = {k: torch.cat([p[k].reshape(-1) for p in parts]) for k in parts[0]}
    n = cat["rewards_chosen"].numel()

    def mean(x: Tensor) -> Tensor:
        return x.sum() / max(n, 1)

    r_w, r_l = cat["rewards_chosen"], cat["rewards_rejected"]
    metrics = {
        "rewards_chosen": mean(r_w), "rewards_rejected": mean(r_l),
        "rewards_margin": mean(r_w - r_l), "rewards_accuracy": mean((r_w > r_l).double()),
        "logps_chosen": mean(cat["logps_chosen"]), "logps_rejected": mean(cat["logps_rejected"]),
        "nll": cat["nll_sum"].sum() / chosen_tokens.double().clamp(min=1),
        "pair_count": torch.full((), float(n), device=r_w.device),  # no host-to-device copy
    }
    return {k: v.float() for k, v in metrics.items()}
