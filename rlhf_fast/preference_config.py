"""``PreferenceLossConfig``: the hyper-parameters of ``dpo_loss`` / ``linear_dpo_loss``, checked.

Scores, with ``logp(y)`` the policy's sequence log-prob over the masked tokens (a sum, or the
per-token mean when ``average_logprobs``) and ``ref(y)`` the reference model's on the same
tokens:

    D_w = logp(y_w) - ref(y_w),   D_l = logp(y_l) - ref(y_l),   u = D_w - D_l

(ref = 0 for the reference-free losses and ``reference_free=True``). Per-pair losses, with
beta, eps = ``label_smoothing`` and x = beta * u:

    sigmoid    -(1-eps) log s(x) - eps log s(-x)                (DPO; eps > 0: conservative DPO)
    robust     (-(1-eps) log s(x) + eps log s(-x)) / (1 - 2 eps)
    hinge      relu(1 - x)                                        (SLiC)
    ipo        (u - 1/(2 beta))^2                                 (length-normalised by default)
    exo_pair   s(x) (log s(x) - log(1-eps)) + s(-x) (log s(-x) - log eps)   (eps = 0 -> 1e-3)
    nca_pair   -log s(beta D_w) - log s(-beta D_w) / 2 - log s(-beta D_l) / 2
    bco_pair   -log s(beta D_w) - log s(-beta D_l)                (TRL's, without the running mean)
    sppo_hard  (D_w - 1/(2 beta))^2 + (D_l + 1/(2 beta))^2
    apo_zero   1 - s(beta D_w) + s(beta D_l)
    apo_down   s(beta D_w) + 1 - s(x)
    discopop   (1 - g) (-log s(x)) + g e^-x,  g = s(x / tau)     (tau = ``discopop_tau``)
    simpo      -(1-eps) log s(x') - eps log s(-x'),  x' = beta (a_w - a_l) - gamma
    orpo       -beta log s(o),  o = (a_w - a_l) - (log(1 - e^a_w) - log(1 - e^a_l))
    aot        sigmoid's loss on x_k = beta (sort(logp_w - logp_l)_k - sort(ref_w - ref_l)_k),
               the k-th smallest of each over the batch (AOT, paired)
    aot_unpaired   the same on x_k = beta (sort(D_w)_k - sort(D_l)_k)

with s the logistic sigmoid and a the length-normalised policy log-probs (simpo and orpo are
reference-free; an orpo pair with an empty sequence adds 0: its odds are undefined). A
sequence with no masked-in token scores 0. The loss is the mean over pairs, plus ``nll_coef``
(plus 1 for orpo) times the chosen sequences' NLL, a mean over all their tokens (RPO, ORPO),
or with ``nll_aggregation="sequence_mean"`` the mean over non-empty chosen sequences of
their token-mean NLL (OpenRLHF).

TRL's f-divergences (``f_divergence``) replace D by f'(u) of the ratio u = e^D in the losses
built on the margin D_w - D_l (sigmoid, hinge, robust, exo_pair, discopop):

    reverse_kl   D              forward_kl   1 - e^-D          js_divergence   log 2 + log s(D)
    alpha_divergence   (e^((alpha-1) min(D, 80 / (alpha-1))) - 1) / (alpha-1)  (D if alpha = 1)

AlphaPO (``alphapo`` = a != 0, TRL CPO's ``alpha``): the reference-free losses (simpo, and
sigmoid / hinge / ipo with ``reference_free``, CPO) replace the policy score by the reward
(1 - e^(-a D)) / a, and the reported rewards are beta times it.

A weighted sum of loss types (TRL's ``loss_type`` list with ``loss_weights``): the loss is
``loss_weight`` times the first type's pair mean plus ``w_k`` times each of ``mixture``'s
``(type_k, w_k)``, every type on the same scores (f-divergence scores for the margin losses,
plain log-ratios for the others, as TRL).

LD-DPO (``ld_alpha``): in a pair, the tokens of a sequence beyond the shorter sequence's
length (its first ``min(L_w, L_l)`` valid tokens are shared) count with weight ``ld_alpha``
in the sums of the policy's and the reference's log-probs.

WPO (``use_weighting``, TRL DPOConfig's): each pair's loss (every type of a mixture) is
multiplied by the constant weight w = exp(c_w + c_l), with c a sequence's token mean over its
masked tokens of logp_t - log sum_v p_v(t)^2 (p: the softmax of the temperature-scaled logits;
an empty sequence has c = 0). TRL 1.16 clamps nothing (earlier TRL used min(w, 1)). The NLL
term is multiplied by the batch mean of w, as TRL weighs its ``"sft"`` loss type. w carries no
gradient and the metrics are not weighted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from .validation import check_temperature

LossType = Literal["sigmoid", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair",
                   "sppo_hard", "apo_zero", "apo_down", "discopop", "simpo", "orpo", "aot",
                   "aot_unpaired"]
LOSS_TYPES: tuple[str, ...] = ("sigmoid", "ipo", "hinge", "robust", "exo_pair", "nca_pair",
                               "bco_pair", "sppo_hard", "apo_zero", "apo_down", "discopop",
                               "simpo", "orpo", "aot", "aot_unpaired")

MIXABLE_LOSSES = ("sigmoid", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair",
                  "sppo_hard", "apo_zero", "apo_down", "discopop")
"""Losses that a weighted sum of several loss types may hold (TRL's list ``loss_type``):
those on the summed sequence scores, with no batch sort and no length normalisation."""

BATCH_SORTED_LOSSES = ("aot", "aot_unpaired")
"""Losses that sort scores across the batch: ``linear_dpo_loss`` runs them in one chunk."""

REFERENCE_FREE_LOSSES = ("simpo", "orpo")
"""Losses defined on the policy alone: they take no reference log-probs."""

AVERAGED_BY_DEFAULT = ("ipo", "simpo", "orpo")
"""Losses whose sequence log-probs are per-token means unless ``average_logprobs=False``
(TRL's IPO, SimPO and ORPO; OpenRLHF's IPO uses sums: pass ``average_logprobs=False``)."""

SMOOTHED_LOSSES = ("sigmoid", "robust", "exo_pair", "simpo", "aot", "aot_unpaired")
"""Losses that take ``label_smoothing``."""

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
"""TRL's ``f_divergence_type`` values."""

F_DIVERGENCE_LOSSES = ("sigmoid", "hinge", "robust", "exo_pair", "discopop")
"""Losses on the margin that take an ``f_divergence`` other than reverse_kl."""

F_ALPHA_EXP_CAP = 80.0
"""alpha_divergence's exponent (alpha - 1) D is capped here (TRL's float32 clamp)."""

UNWEIGHTED_LOSSES = ("aot", "aot_unpaired", "simpo", "orpo")
"""Losses that refuse ``use_weighting`` (WPO): the batch-sorted ones (TRL refuses them) and
those outside TRL's DPO trainer."""

NLL_AGGREGATIONS = ("token_mean", "sequence_mean")

EXO_DEFAULT_EPS = 1e-3
"""EXO's epsilon when ``label_smoothing`` is 0 (its log would be -inf)."""


@dataclass(frozen=True)
class PreferenceLossConfig:
    """A checked set of preference-loss hyper-parameters (see the module docstring)."""

    beta: float = 0.1
    loss_type: LossType = "sigmoid"
    label_smoothing: float = 0.0
    average_logprobs: bool = False
    nll_coef: float = 0.0
    gamma: float = 0.0
    reference_free: bool = False
    temperature: float = 1.0
    discopop_tau: float = 0.05
    f_divergence: str = "reverse_kl"
    f_alpha: float = 0.5
    ld_alpha: float | None = None
    nll_aggregation: str = "token_mean"
    alphapo: float = 0.0
    loss_weight: float = 1.0
    mixture: tuple[tuple[str, float], ...] = ()
    use_weighting: bool = False

    @property
    def uses_reference(self) -> bool:
        """Whether the loss reads reference log-probs."""
        return not self.reference_free and self.loss_type not in REFERENCE_FREE_LOSSES

    @property
    def nll_weight(self) -> float:
        """Weight of the chosen sequences' token-mean NLL in the loss."""
        return self.nll_coef + (1.0 if self.loss_type == "orpo" else 0.0)

    @property
    def smoothing(self) -> float:
        """The epsilon the loss uses (EXO's default when 0)."""
        if self.loss_type == "exo_pair" and self.label_smoothing == 0:
            return EXO_DEFAULT_EPS
        return self.label_smoothing


def _finite(value: object, name: str) -> float:
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a float, got {value!r}") from None
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x}")
    return x


def preference_config(*, beta: float = 0.1, loss_type: str | Sequence[str] = "sigmoid",
                      label_smoothing: float = 0.0, average_logprobs: bool | None = None,
                      nll_coef: float = 0.0, gamma: float = 0.0, reference_free: bool = False,
                      temperature: float = 1.0, discopop_tau: float = 0.05,
                      f_divergence: str = "reverse_kl", f_alpha: float = 0.5,
                      ld_alpha: float | None = None, nll_aggregation: str = "token_mean",
                      alphapo: float = 0.0, loss_weights: Sequence[float] | None = None,
                      use_weighting: bool = False) -> PreferenceLossConfig:
    """Check the keyword arguments of ``dpo_loss`` and resolve the per-loss defaults
    (``average_logprobs=None``: True for ipo / simpo / orpo, else False)."""
    types, weights = _loss_types(loss_type, loss_weights)
    loss_type = types[0]
    beta = _finite(beta, "beta")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    eps = _finite(label_smoothing, "label_smoothing")
    if eps != 0 and not set(types) & set(SMOOTHED_LOSSES):
        raise ValueError(f"label_smoothing applies to {SMOOTHED_LOSSES}, not to "
                         f"loss_type={loss_type!r}; got {eps}")
    upper = 0.5 if "robust" in types else 1.0
    if not 0 <= eps < upper:
        raise ValueError(f"label_smoothing must be in [0, {upper}) for loss_type="
                         f"{loss_type!r}, got {eps}")
    gamma = _finite(gamma, "gamma")
    if gamma != 0 and loss_type != "simpo":
        raise ValueError(f"gamma is SimPO's target margin (loss_type='simpo'); got gamma="
                         f"{gamma} with loss_type={loss_type!r}")
    nll_coef = _finite(nll_coef, "nll_coef")
    if nll_coef < 0:
        raise ValueError(f"nll_coef must be >= 0, got {nll_coef}")
    discopop_tau = _finite(discopop_tau, "discopop_tau")
    if discopop_tau <= 0:
        raise ValueError(f"discopop_tau must be > 0, got {discopop_tau}")
    if average_logprobs is None:
        average_logprobs = loss_type in AVERAGED_BY_DEFAULT
    if f_divergence not in F_DIVERGENCES:
        raise ValueError(f"f_divergence must be one of {F_DIVERGENCES}, got {f_divergence!r}")
    f_alpha = _finite(f_alpha, "f_alpha")
    if f_divergence != "reverse_kl":
        if loss_type not in F_DIVERGENCE_LOSSES:
            raise ValueError(f"f_divergence={f_divergence!r} applies to {F_DIVERGENCE_LOSSES} "
                             f"(TRL's other losses use the plain log-ratios), not to "
                             f"loss_type={loss_type!r}")
        if average_logprobs or reference_free:
            raise ValueError(f"f_divergence={f_divergence!r} is defined on the summed "
                             f"log-ratio to a reference: it takes neither average_logprobs "
                             f"nor reference_free")
    if f_divergence != "alpha_divergence" and f_alpha != 0.5:
        raise ValueError(f"f_alpha is alpha_divergence's coefficient; f_divergence="
                         f"{f_divergence!r} would ignore it")
    if ld_alpha is not None:
        ld_alpha = _finite(ld_alpha, "ld_alpha")
        if not 0 <= ld_alpha <= 1:
            raise ValueError(f"ld_alpha must be None or in [0, 1], got {ld_alpha}")
    alphapo = _finite(alphapo, "alphapo")
    if alphapo != 0 and not (loss_type == "simpo" or (
            reference_free and loss_type in ("sigmoid", "hinge", "ipo"))):
        raise ValueError(f"alphapo is AlphaPO's reward shape for CPO / SimPO: loss_type='simpo', "
                         f"or 'sigmoid' / 'hinge' / 'ipo' with reference_free=True; got "
                         f"loss_type={loss_type!r}, reference_free={reference_free}")
    if nll_aggregation not in NLL_AGGREGATIONS:
        raise ValueError(f"nll_aggregation must be one of {NLL_AGGREGATIONS}, got "
                         f"{nll_aggregation!r}")
    if loss_type in ("simpo", "orpo") and not average_logprobs:
        raise ValueError(f"loss_type={loss_type!r} is defined on length-normalised "
                         f"log-probs; average_logprobs=False is not supported")
    if not isinstance(use_weighting, bool):
        raise TypeError(f"use_weighting must be a bool, got {use_weighting!r}")
    if use_weighting and loss_type in UNWEIGHTED_LOSSES:
        raise ValueError(f"use_weighting (WPO) weighs each pair's loss: not defined for "
                         f"loss_type={loss_type!r} (aot / aot_unpaired sort the pairs, as TRL "
                         f"refuses; simpo / orpo are not TRL DPO losses)")
    return PreferenceLossConfig(beta=beta, loss_type=loss_type, label_smoothing=eps,  # type: ignore[arg-type]
                                average_logprobs=bool(average_logprobs), nll_coef=nll_coef,
                                gamma=gamma, reference_free=bool(reference_free),
                                temperature=check_temperature(temperature),
                                discopop_tau=discopop_tau, f_divergence=f_divergence,
                                f_alpha=f_alpha, ld_alpha=ld_alpha,
                                nll_aggregation=nll_aggregation, alphapo=alphapo,
                                loss_weight=weights[0],
                                mixture=tuple(zip(types[1:], weights[1:], strict=True)),
                                use_weighting=use_weighting)


def _loss_types(loss_type: str | Sequence[str], loss_weights: Sequence[float] | None
                ) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """The loss types and their weights (ones by default); several types must be distinct
    and ``MIXABLE_LOSSES``."""
    types = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    if not types:
        raise ValueError("loss_type must name at least one loss")
    for kind in types:
        if kind not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {kind!r}")
    if len(types) > 1:
        bad = [k for k in types if k not in MIXABLE_LOSSES]
        if bad or len(set(types)) != len(types):
            raise ValueError(f"a weighted sum of loss types takes distinct types among "
                             f"{MIXABLE_LOSSES}; got {types}")
    if loss_weights is None:
        return types, (1.0,) * len(types)
    weights = tuple(_finite(w, "loss_weights") for w in loss_weights)
    if len(weights) != len(types):
        raise ValueError(f"loss_weights must give one weight per loss type ({len(types)}), "
                         f"got {len(weights)}")
    return types, weights
