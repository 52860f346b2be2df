"""The parts of ``PolicyLossConfig``: one small frozen dataclass per concern, each checking
its own fields.

``r`` is the importance ratio pi / pi_old, ``A`` the advantage, ``logp`` the current
log-prob of the sampled token, ``m`` the mask, ``w`` the aggregation weight of a token
(``sum_t w_t L_t`` is the aggregated loss). Checks that span parts (a field that the
objective would ignore) live in ``PolicyLossConfig``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

RatioLevel = Literal["token", "sequence", "sequence_token"]
ClipGradient = Literal["zero", "keep_high", "keep_both"]
Aggregation = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum",
                      "seq_mean_token_sum_norm"]
KLEstimator = Literal["k1", "k2", "k3", "abs"]
KLGradient = Literal["estimator", "k2", "k2_weighted"]
KLReference = Literal["ref", "old"]
CovSelection = Literal["clip_cov", "kl_cov"]
RolloutCorrection = Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask",
                            "sequence_gate"]


def check_choice(name: str, value: object, choices: object) -> None:
    """``value`` is one of the ``Literal`` ``choices``, or ValueError naming ``name``."""
    allowed = choices.__args__  # type: ignore[attr-defined]
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def check_range(name: str, value: float, low: float, high: float) -> None:
    """``low <= value <= high`` (finite unless ``high`` is inf), or ValueError."""
    if not (math.isfinite(value) or high == math.inf) or not low <= value <= high:
        raise ValueError(f"{name} must lie in [{low}, {high}], got {value}")


def check_positive(name: str, value: float | None) -> None:
    """``value`` is None or a finite number > 0, or ValueError."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")


def check_finite(name: str, value: float) -> None:
    """``value`` is finite, or ValueError."""
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")


def compact_repr(config: object) -> str:
    """``Name(field=value, ...)`` of a config dataclass, listing only the fields that differ
    from their defaults (a config's repr then says what it changes)."""
    changed = []
    for f in dataclasses.fields(config):  # type: ignore[arg-type]
        value = getattr(config, f.name)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING \
            else f.default
        if value != default:
            changed.append(f"{f.name}={value!r}")
    return f"{type(config).__name__}({', '.join(changed)})"


@dataclass(frozen=True)
class RatioConfig:
    """How the importance ratio is formed."""

    level: RatioLevel = "token"
    """``token``: r_t = exp(logp - old); ``sequence`` (GSPO): s_i = exp(masked mean of
    (logp - old)) for every token of sequence i, differentiated through the mean;
    ``sequence_token`` (GSPO-token): log r_t = sg(log s_i) + logp_t - sg(logp_t)."""

    log_clamp: float | None = 20.0
    """Clamp of logp - old (and of KL / rollout log-ratios) before exp; None: no clamp."""

    __repr__ = compact_repr

    def __post_init__(self) -> None:
        check_choice("ratio_level", self.level, RatioLevel)
        check_positive("log_ratio_clamp", self.log_clamp)


@dataclass(frozen=True)
class ClipConfig:
    """The hard trust region: PPO's clip bounds and the objectives' own caps."""

    eps_low: float | None = 0.2
    """Lower clip bound 1 - eps_low. None: no lower bound (CISPO's default). For
    ``dppo_*``: the trust-region threshold for A <= 0."""

    eps_high: float = 0.2
    """Upper clip bound 1 + eps_high (DAPO clip-higher sets it above eps_low). For
    ``dppo_*``: the trust-region threshold for A > 0."""

    dual_c: float | None = None
    """None or c > 1: for A < 0 the per-token loss is capped at -c*A (dual-clip PPO)."""

    delta: float | None = None
    """None or a cap > 1 + eps_high on the unclipped ratio (two-sided clipping)."""

    gradient: ClipGradient = "zero"
    """``zero``: clipped tokens get no gradient (PPO); ``keep_high``: AEPO's upper bound
    (1+eps_high) * r / sg(r), so clipped positive-advantage tokens keep the gradient
    (1+eps_high) * A * dlogp; ``keep_both``: GPPO, both bounds keep a gradient."""

    gmpo: float = 0.4
    """GMPO's clip of the token log-ratio, in log space, on the pessimistic side: the lower
    bound -gmpo (and the upper one unless ``gmpo_high`` is set)."""

    gmpo_high: float | None = None
    """GMPO's upper log-space bound (verl's ``clip_ratio_high``); None: ``gmpo``."""

    dppo_ratio_cap: float = 3.0
    """DPPO's cap C of the detached ratio weight min(r, C) (verl's ``clip_ratio_c``)."""

    __repr__ = compact_repr

    def __post_init__(self) -> None:
        check_choice("clip_gradient", self.gradient, ClipGradient)
        if self.eps_low is not None:
            check_range("clip_eps_low", self.eps_low, 0.0, 1.0)
        check_range("clip_eps_high", self.eps_high, 0.0, math.inf)
        if self.dual_c is not None and not self.dual_c > 1.0:
            raise ValueError(f"dual_clip_c must be None or > 1, got {self.dual_c}")
        if self.delta is not None and not self.delta > 1.0 + self.eps_high:
            raise ValueError(f"delta must be None or > 1 + clip_eps_high = "
                             f"{1.0 + self.eps_high}, got {self.delta}")
        for name, value in (("gmpo_clip", self.gmpo), ("gmpo_clip_high", self.gmpo_high),
                            ("dppo_ratio_cap", self.dppo_ratio_cap)):
            check_positive(name, value)


@dataclass(frozen=True)
class SoftClipConfig:
    """The smooth trust regions: SAPO's sigmoid gate and VESPO's gamma weight."""

    sapo_tau_pos: float = 1.0
    """SAPO temperature for A > 0."""

    sapo_tau_neg: float = 1.05
    """SAPO temperature for A <= 0."""

    vespo_k_pos: float = 2.0
    """VESPO's shape k for A >= 0."""

    vespo_lambda_pos: float = 3.0
    """VESPO's rate lambda for A >= 0 (at least 1e-4)."""

    vespo_k_neg: float = 3.0
    """VESPO's shape k for A < 0."""

    vespo_lambda_neg: float = 2.0
    """VESPO's rate lambda for A < 0 (at least 1e-4)."""

    __repr__ = compact_repr

    def __post_init__(self) -> None:
        check_positive("sapo_tau_pos", self.sapo_tau_pos)
        check_positive("sapo_tau_neg", self.sapo_tau_neg)
        for name in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"):
            check_finite(name, getattr(self, name))


@dataclass(frozen=True)
class AggregationConfig:
    """How per-token losses become one number."""

    mode: Aggregation = "token_mean"
    """``token_mean``: sum(m L) / sum(m); ``seq_mean_token_mean``: mean over non-empty
    sequences of the per-sequence token mean; ``seq_mean_token_sum``: mean over non-empty
    sequences of the per-sequence token sum; ``seq_mean_token_sum_norm`` (Dr. GRPO):
    sum(m L) / (B * max_length)."""

    max_length: int | None = None
    """Length constant of ``seq_mean_token_sum_norm``; None: the padded length T."""

    normalizer: float | None = None
    """Replaces the denominator of the aggregation (token count, sequence count or
    B * max_length): pass the global count over micro-batches and ranks so that gradient
    accumulation is exact. No collective runs inside the op."""

    count_empty_sequences: bool = False
    """Sequences with no valid token count in the sequence denominators (B instead of the
    non-empty sequences) of every sequence aggregation and of GMPO's mean: TRL's ``grpo`` /
    ``luspo`` and verl's ``geo_mean`` count them."""

    __repr__ = compact_repr

    def __post_init__(self) -> None:
        check_choice("aggregation", self.mode, Aggregation)
        check_positive("normalizer", self.normalizer)
        if self.max_length is not None and not self.max_length >= 1:
            raise ValueError(f"max_length must be None or >= 1, got {self.max_length}")


@dataclass(frozen=True)
class KLConfig:
    """The KL penalty."""

    coef: float = 0.0
    """Weight of the KL penalty, aggregated like the policy term (or by ``aggregation``)."""

    estimator: KLEstimator = "k3"
    """Schulman's estimators with log x = log p - log q: k1 = -log x, k2 = (log x)^2 / 2,
    k3 = x - 1 - log x, and verl's abs = |log x| (docs/architecture.md, KL conventions)."""

    gradient: KLGradient = "estimator"
    """``estimator``: the estimator's own gradient; ``k2``: straight-through, the value of
    the estimator with the gradient of k2 (verl's ``k1+``, ``k3+``, ``low_var_kl+``, ``abs+``);
    ``k2_weighted`` (OpenRLHF's unbiased_gradient): the gradient of sg(wt) * k2 with the
    importance weight wt = min(exp(logp - old), 10). The gradients ignore ``clamp``."""

    ratio_weighted: bool = False
    """The KL estimate is multiplied by the (differentiable) ratio r, or the sequence ratio s
    with ``ratio_level="sequence"``: TRL's ``use_bias_correction_kl``."""

    clamp: float | None = None
    """None, or verl's low-variance clamp: the KL log-ratio is clamped by log_ratio_clamp and
    the estimator's value to [-clamp, clamp] (verl: 10)."""

    reference: KLReference = "ref"
    """``ref``: KL(pi || ref) sampled from pi, log x = ref - logp (GRPO); ``old``: KL(old ||
    pi) sampled from pi_old, log x = logp - old (TRPO penalty / PPO-penalty; 0, with a zero
    gradient, on-policy: old_logprobs=None)."""

    aggregation: Aggregation | None = None
    """The KL term's own aggregation (OpenRLHF keeps it a token mean under a per-sequence
    policy loss); None: the policy term's aggregation and normalizer."""

    normalizer: float | None = None
    """Denominator of ``aggregation`` (as the policy term's normalizer); None: counted from
    the mask."""

    __repr__ = compact_repr

    def __post_init__(self) -> None:
        check_finite("kl_coef", self.coef)
        check_choice("kl_estimator", self.estimator, KLEstimator)
        check_choice("kl_gradient", self.gradient, KLGradient)
        check_choice("kl_reference", self.reference, KLReference)
        if self.aggregation is not None:
            check_choice("kl_aggregation", self.aggregation, Aggregation)
        check_positive("kl_clamp", self.clamp)
        check_positive("kl_normalizer", self.normalizer)
        if self.normalizer is not None and self.aggregation is None:
            raise ValueError("kl_normalizer is the denominator of kl_aggregation: set "
                             "kl_aggregation too (the KL term otherwise follows normalizer)")


@dataclass(frozen=True)
class EntropyConfig:
    """The entropy bonus and the entropy-driven token selection and advantage shaping."""

    coef: float = 0.0
    """Entropy bonus: the loss subtracts coef * aggregated entropy (differentiable)."""

    aggregation: Aggregation | None = None
    """The entropy bonus's own aggregation over the tokens it acts on (the valid tokens, or
    under ``top_quantile`` the kept ones, which then alone count in its denominator: TRL's
    token mean for every loss_type); None: the policy term's weights times the top-entropy
    mask."""

    normalizer: float | None = None
    """Denominator of ``aggregation`` (as the policy term's normalizer); None: counted."""

    advantage_alpha: float | None = None
    """AEPO entropy-aware advantage A * (1 + alpha * z(H)), z standardised (unbiased std, 1 if
    zero) over the batch's valid tokens, detached. None: off."""

    top_quantile: float | None = None
    """Only tokens whose entropy is in the top fraction rho of the batch's valid tokens
    enter the policy term and the entropy bonus (threshold: the (1 - rho) quantile). None:
    all tokens."""

    __repr__ = compact_repr

    def __post_init__(self) -> None:
        check_finite("entropy_coef", self.coef)
        if self.aggregation is not None:
            check_choice("entropy_aggregation", self.aggregation, Aggregation)
        check_positive("entropy_normalizer", self.normalizer)
        if self.normalizer is not None and self.aggregation is None:
            raise ValueError("entropy_normalizer is the denominator of entropy_aggregation: "
                             "set entropy_aggregation too")
        if self.advantage_alpha is not None:
            check_range("entropy_advantage_alpha", self.advantage_alpha, 0.0, math.inf)
        if self.top_quantile is not None and not 0.0 < self.top_quantile <= 1.0:
            raise ValueError(f"top_entropy_quantile must be None or in (0, 1], got "
                             f"{self.top_quantile}")


@dataclass(frozen=True)
class CovSelectionConfig:
    """The entropy mechanism's covariance-selected tokens (Clip-Cov / KL-Cov)."""

    mode: CovSelection | None = None
    """Token selection by cov_t = (A_t - mean A) (logp_t - mean logp) over the batch's valid
    tokens (detached), k = max(floor(ratio * tokens), 1): ``clip_cov`` (ppo_clip): among
    the valid tokens not clipped by PPO (-A clip(r) > -A r) with lower < cov < upper, k drawn
    uniformly at random (priorities torch.rand(B, T) from the global generator of the logits'
    device, float32; the k smallest win) lose their loss and gradient; ``kl_cov`` (ppo_clip
    or pg): the k tokens of largest cov (ties: the earlier position) get kl_coef * |logp -
    old| added to their loss."""

    ratio: float = 2e-4
    """Fraction of the valid tokens the selection takes (verl's clip_cov_ratio /
    kl_cov_ratio)."""

    lower: float = 1.0
    """``clip_cov``: lower bound of the covariance of the tokens it may draw."""

    upper: float = 5.0
    """``clip_cov``: upper bound of the covariance of the tokens it may draw."""

    kl_coef: float = 0.1
    """``kl_cov``: weight of |logp - old| on the selected tokens (verl's ppo_kl_coef)."""

    __repr__ = compact_repr

    def __post_init__(self) -> None:
        if self.mode is not None:
            check_choice("cov_selection", self.mode, CovSelection)
        check_positive("cov_ratio", self.ratio)
        for name, value in (("cov_lower", self.lower), ("cov_upper", self.upper),
                            ("cov_kl_coef", self.kl_coef)):
            check_finite(name, value)
        if not self.lower < self.upper:
            raise ValueError(f"cov_lower must be < cov_upper, got {self.lower}, {self.upper}")


@dataclass(frozen=True)
class RolloutCorrectionConfig:
    """Importance sampling against the inference engine's ``rollout_logprobs``."""

    mode: RolloutCorrection | None = None
    """With w_t = exp(old_t - rollout_t): ``token_truncate`` clamp(w_t, floor, cap);
    ``token_mask`` w_t if floor <= w_t <= cap, else 0 (IcePop with a floor);
    ``sequence_truncate`` / ``sequence_mask`` the same on the sequence's product
    exp(sum_t m (old - rollout)); ``sequence_gate`` (OpenRLHF seq-mask-tis) the token
    weights w_t, zeroed for a sequence whose geometric mean exp(mean_t m log w) leaves
    [floor, cap]. Detached; multiplies the policy term only. None: no correction."""

    cap: float = 2.0
    """Cap C of the rollout correction weights."""

    floor: float | None = None
    """Lower bound of the rollout correction weights (a band [floor, cap]); None: none."""

    normalize: bool = False
    """Divide the rollout weights by their batch mean (over valid tokens, or over non-empty
    sequences for the sequence modes) when it exceeds 1e-8 (verl's
    ``rollout_is_batch_normalize``, here over the op's batch)."""

    off_policy_mask_threshold: float | None = None
    """DeepSeek-V3.2's off-policy sequence mask (TRL's OPSM): the policy term of a token with
    A < 0 is dropped when its sequence's mean of (rollout - sg(logp)) over valid tokens
    exceeds the threshold (rollout_logprobs, or old_logprobs when none are given)."""

    __repr__ = compact_repr

    def __post_init__(self) -> None:
        if self.mode is not None:
            check_choice("rollout_correction", self.mode, RolloutCorrection)
        check_positive("rollout_cap", self.cap)
        if self.floor is not None:
            check_range("rollout_floor", self.floor, 0.0, self.cap)
            if self.mode is None:
                raise ValueError("rollout_floor bounds the rollout correction weights: set "
                                 "rollout_correction too")
        if self.normalize and self.mode is None:
            raise ValueError("rollout_normalize rescales the rollout correction weights: set "
                             "rollout_correction too")
        if self.off_policy_mask_threshold is not None \
                and not math.isfinite(self.off_policy_mask_threshold):
            raise ValueError(f"off_policy_mask_threshold must be None or finite, got "
                             f"{self.off_policy_mask_threshold}")


FLAT_NAMES: dict[str, tuple[str, str]] = {
    "ratio_level": ("ratio", "level"),
    "log_ratio_clamp": ("ratio", "log_clamp"),
    "clip_eps_low": ("clip", "eps_low"),
    "clip_eps_high": ("clip", "eps_high"),
    "dual_clip_c": ("clip", "dual_c"),
    "delta": ("clip", "delta"),
    "clip_gradient": ("clip", "gradient"),
    "gmpo_clip": ("clip", "gmpo"),
    "gmpo_clip_high": ("clip", "gmpo_high"),
    "dppo_ratio_cap": ("clip", "dppo_ratio_cap"),
    "sapo_tau_pos": ("soft_clip", "sapo_tau_pos"),
    "sapo_tau_neg": ("soft_clip", "sapo_tau_neg"),
    "vespo_k_pos": ("soft_clip", "vespo_k_pos"),
    "vespo_lambda_pos": ("soft_clip", "vespo_lambda_pos"),
    "vespo_k_neg": ("soft_clip", "vespo_k_neg"),
    "vespo_lambda_neg": ("soft_clip", "vespo_lambda_neg"),
    "aggregation": ("aggregation", "mode"),
    "max_length": ("aggregation", "max_length"),
    "normalizer": ("aggregation", "normalizer"),
    "count_empty_sequences": ("aggregation", "count_empty_sequences"),
    "kl_coef": ("kl", "coef"),
    "kl_estimator": ("kl", "estimator"),
    "kl_gradient": ("kl", "gradient"),
    "kl_ratio_weighted": ("kl", "ratio_weighted"),
    "kl_clamp": ("kl", "clamp"),
    "kl_reference": ("kl", "reference"),
    "kl_aggregation": ("kl", "aggregation"),
    "kl_normalizer": ("kl", "normalizer"),
    "entropy_coef": ("entropy", "coef"),
    "entropy_aggregation": ("entropy", "aggregation"),
    "entropy_normalizer": ("entropy", "normalizer"),
    "entropy_advantage_alpha": ("entropy", "advantage_alpha"),
    "top_entropy_quantile": ("entropy", "top_quantile"),
    "cov_selection": ("cov", "mode"),
    "cov_ratio": ("cov", "ratio"),
    "cov_lower": ("cov", "lower"),
    "cov_upper": ("cov", "upper"),
    "cov_kl_coef": ("cov", "kl_coef"),
    "rollout_correction": ("rollout", "mode"),
    "rollout_cap": ("rollout", "cap"),
    "rollout_floor": ("rollout", "floor"),
    "rollout_normalize": ("rollout", "normalize"),
    "off_policy_mask_threshold": ("rollout", "off_policy_mask_threshold"),
}
"""The flat keyword spelling of every part field (the names peers' flat configs map to,
and the names error messages use) -> (part, field)."""
