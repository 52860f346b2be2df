"""``PolicyLossConfig``: every policy-gradient loss rlhf_fast computes, as one frozen dataclass.

Presets are data (``PRESETS``), not code paths: ``PolicyLossConfig.preset("dapo")`` is a
config like any other, and keyword overrides replace fields. Formulas: docs/architecture.md,
One coefficient per token, and ``rlhf_fast.reference.policy_loss``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

Objective = Literal["ppo_clip", "pg", "cispo", "sapo", "gmpo", "dppo_tv", "dppo_kl", "vespo"]
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

KL_WEIGHT_CAP = 10.0
"""Cap of the importance weight min(exp(logp - old), cap) of ``kl_gradient="k2_weighted"``
(OpenRLHF's ``KL_IS_WEIGHT_CLIP``)."""

VESPO_LOG_W_BOUNDS = (math.log(1e-8), 20.0)
"""Bounds of VESPO's sequence log-weight log W (TRL's ``get_gamma_weights``)."""

VESPO_MIN_LAMBDA = 1e-4
"""VESPO's rate lambda is at least this (TRL clamps it)."""

ROLLOUT_NORMALIZE_MIN = 1e-8
"""``rollout_normalize`` divides by the batch mean of the weights only above this (verl)."""


@dataclass(frozen=True)
class PolicyLossConfig:
    """The fields of a policy loss. ``r`` is the importance ratio pi / pi_old, ``A`` the
    advantage, ``logp`` the current log-prob of the sampled token, ``m`` the mask, ``w`` the
    aggregation weight of a token (``sum_t w_t L_t`` is the aggregated loss)."""

    # --- objective and ratio ------------------------------------------------------------

    objective: Objective = "ppo_clip"
    """``ppo_clip``: -min(r*A, clip(r)*A); ``pg``: -r*A (on-policy: REINFORCE);
    ``cispo``: -sg(clip(r, lo, 1+eps_high)) * A * logp; ``sapo``: -(4/tau) sigmoid(tau (r-1)) A
    with tau by the sign of A; ``gmpo``: -mean_A * exp(mean_t clip_log(log r)), per sequence;
    ``dppo_tv`` / ``dppo_kl`` (verl): -sg(min(r, dppo_ratio_cap)) * A * logp * keep, keep = 0
    where the token left the trust region on the side A pushes it: for A > 0 where
    p - p_old > clip_eps_high (tv) or binary KL(p_old, p) > clip_eps_high with p > p_old (kl);
    for A <= 0 where p - p_old < -clip_eps_low or binary KL > clip_eps_low with p < p_old
    (p = exp(logp), unclamped); ``vespo`` (TRL): -sg(phi) * A * logp with the gamma weight
    log phi = lam + k log W - lam W of the sequence weight log W = clamp(sum_t m log r_t
    (+ sum_t m log rho_t), log 1e-8, 20), (k, lam) by A >= 0 (``vespo_*``); the rollout
    correction rho enters W instead of multiplying the loss; a non-finite phi is 0."""

    ratio_level: RatioLevel = "token"
    """``token``: r_t = exp(logp - old); ``sequence`` (GSPO): s_i = exp(masked mean of
    (logp - old)) for every token of sequence i, differentiated through the mean;
    ``sequence_token`` (GSPO-token): log r_t = sg(log s_i) + logp_t - sg(logp_t)."""

    log_ratio_clamp: float | None = 20.0
    """Clamp of logp - old (and of KL / rollout log-ratios) before exp; None: no clamp."""

    sapo_tau_pos: float = 1.0
    """SAPO temperature for A > 0."""

    sapo_tau_neg: float = 1.05
    """SAPO temperature for A <= 0."""

    dppo_ratio_cap: float = 3.0
    """DPPO's cap C of the detached ratio weight min(r, C) (verl's ``clip_ratio_c``)."""

    vespo_k_pos: float = 2.0
    """VESPO's shape k for A >= 0."""

    vespo_lambda_pos: float = 3.0
    """VESPO's rate lambda for A >= 0 (at least 1e-4)."""

    vespo_k_neg: float = 3.0
    """VESPO's shape k for A < 0."""

    vespo_lambda_neg: float = 2.0
    """VESPO's rate lambda for A < 0 (at least 1e-4)."""

    # --- clipping -------------------------------------------------------------------------

    clip_eps_low: float | None = 0.2
    """Lower clip bound 1 - clip_eps_low. None: no lower bound (CISPO's default). For
    ``dppo_*``: the trust-region threshold for A <= 0."""

    clip_eps_high: float = 0.2
    """Upper clip bound 1 + clip_eps_high (DAPO clip-higher sets it above clip_eps_low). For
    ``dppo_*``: the trust-region threshold for A > 0."""

    dual_clip_c: float | None = None
    """None or c > 1: for A < 0 the per-token loss is capped at -c*A (dual-clip PPO)."""

    delta: float | None = None
    """None or a cap > 1 + clip_eps_high on the unclipped ratio (two-sided clipping)."""

    clip_gradient: ClipGradient = "zero"
    """``zero``: clipped tokens get no gradient (PPO); ``keep_high``: AEPO's upper bound
    (1+eps_high) * r / sg(r), so clipped positive-advantage tokens keep the gradient
    (1+eps_high) * A * dlogp; ``keep_both``: GPPO, both bounds keep a gradient."""

    gmpo_clip: float = 0.4
    """GMPO's clip of the token log-ratio, in log space, on the pessimistic side: the lower
    bound -gmpo_clip (and the upper one unless ``gmpo_clip_high`` is set)."""

    gmpo_clip_high: float | None = None
    """GMPO's upper log-space bound (verl's ``clip_ratio_high``); None: ``gmpo_clip``."""

    cov_selection: CovSelection | None = None
    """Entropy-mechanism token selection by cov_t = (A_t - mean A) (logp_t - mean logp) over
    the batch's valid tokens (detached), k = max(floor(cov_ratio * tokens), 1):
    ``clip_cov`` (ppo_clip): among the valid tokens not clipped by PPO (-A clip(r) > -A r)
    with cov_lower < cov < cov_upper, k drawn uniformly at random (priorities torch.rand(B, T)
    from the global generator of the logits' device, float32; the k smallest win) lose their
    loss and gradient; ``kl_cov`` (ppo_clip or pg): the k tokens of largest cov (ties: the
    earlier position) get cov_kl_coef * |logp - old| added to their loss."""

    cov_ratio: float = 2e-4
    """Fraction of the valid tokens ``cov_selection`` selects (verl's clip_cov_ratio /
    kl_cov_ratio)."""

    cov_lower: float = 1.0
    """``clip_cov``: lower bound of the covariance of the tokens it may draw."""

    cov_upper: float = 5.0
    """``clip_cov``: upper bound of the covariance of the tokens it may draw."""

    cov_kl_coef: float = 0.1
    """``kl_cov``: weight of |logp - old| on the selected tokens (verl's ppo_kl_coef)."""

    # --- aggregation ------------------------------------------------------------------------

    aggregation: Aggregation = "token_mean"
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

    # --- KL ---------------------------------------------------------------------------------

    kl_coef: float = 0.0
    """Weight of the KL penalty, aggregated like the policy term (or by ``kl_aggregation``)."""

    kl_estimator: KLEstimator = "k3"
    """Schulman's estimators with log x = log p - log q: k1 = -log x, k2 = (log x)^2 / 2,
    k3 = x - 1 - log x, and verl's abs = |log x| (docs/architecture.md, KL conventions)."""

    kl_gradient: KLGradient = "estimator"
    """``estimator``: the estimator's own gradient; ``k2``: straight-through, the value of
    the estimator with the gradient of k2 (verl's ``k1+``, ``k3+``, ``low_var_kl+``, ``abs+``);
    ``k2_weighted`` (OpenRLHF's unbiased_gradient): the gradient of sg(wt) * k2 with the
    importance weight wt = min(exp(logp - old), 10). The gradients ignore ``kl_clamp``."""

    kl_ratio_weighted: bool = False
    """The KL estimate is multiplied by the (differentiable) ratio r, or the sequence ratio s
    with ``ratio_level="sequence"``: TRL's ``use_bias_correction_kl``."""

    kl_clamp: float | None = None
    """None, or verl's low-variance clamp: the KL log-ratio is clamped by log_ratio_clamp and
    the estimator's value to [-kl_clamp, kl_clamp] (verl: 10)."""

    kl_reference: KLReference = "ref"
    """``ref``: KL(pi || ref) sampled from pi, log x = ref - logp (GRPO); ``old``: KL(old ||
    pi) sampled from pi_old, log x = logp - old (TRPO penalty / PPO-penalty; 0, with a zero
    gradient, on-policy: old_logprobs=None)."""

    kl_aggregation: Aggregation | None = None
    """The KL term's own aggregation (OpenRLHF keeps it a token mean under a per-sequence
    policy loss); None: the policy term's ``aggregation`` and ``normalizer``."""

    kl_normalizer: float | None = None
    """Denominator of ``kl_aggregation`` (as ``normalizer``); None: counted from the mask."""

    # --- entropy ------------------------------------------------------------------------------

    entropy_coef: float = 0.0
    """Entropy bonus: the loss subtracts entropy_coef * aggregated entropy (differentiable)."""

    entropy_aggregation: Aggregation | None = None
    """The entropy bonus's own aggregation over the tokens it acts on (the valid tokens, or
    under ``top_entropy_quantile`` the kept ones, which then alone count in its denominator:
    TRL's token mean for every loss_type); None: the policy term's weights times the
    top-entropy mask."""

    entropy_normalizer: float | None = None
    """Denominator of ``entropy_aggregation`` (as ``normalizer``); None: counted."""

    entropy_advantage_alpha: float | None = None
    """AEPO entropy-aware advantage A * (1 + alpha * z(H)), z standardised (unbiased std, 1 if
    zero) over the batch's valid tokens, detached. None: off."""

    top_entropy_quantile: float | None = None
    """Only tokens whose entropy is in the top fraction rho of the batch's valid tokens
    enter the policy term and the entropy bonus (threshold: the (1 - rho) quantile). None:
    all tokens."""

    # --- rollout correction -------------------------------------------------------------------

    rollout_correction: RolloutCorrection | None = None
    """Importance sampling against the inference engine's rollout_logprobs, with
    w_t = exp(old_t - rollout_t): ``token_truncate`` clamp(w_t, floor, cap);
    ``token_mask`` w_t if floor <= w_t <= cap, else 0 (IcePop with a floor);
    ``sequence_truncate`` / ``sequence_mask`` the same on the sequence's product
    exp(sum_t m (old - rollout)); ``sequence_gate`` (OpenRLHF seq-mask-tis) the token
    weights w_t, zeroed for a sequence whose geometric mean exp(mean_t m log w) leaves
    [floor, cap]. Detached; multiplies the policy term only."""

    rollout_cap: float = 2.0
    """Cap C of the rollout correction weights."""

    rollout_floor: float | None = None
    """Lower bound of the rollout correction weights (a band [floor, cap]); None: none."""

    rollout_normalize: bool = False
    """Divide the rollout weights by their batch mean (over valid tokens, or over non-empty
    sequences for the sequence modes) when it exceeds 1e-8 (verl's
    ``rollout_is_batch_normalize``, here over the op's batch)."""

    off_policy_mask_threshold: float | None = None
    """DeepSeek-V3.2's off-policy sequence mask (TRL's OPSM): the policy term of a token with
    A < 0 is dropped when its sequence's mean of (rollout - sg(logp)) over valid tokens
    exceeds the threshold (rollout_logprobs, or old_logprobs when none are given)."""

    # --- logits -------------------------------------------------------------------------------

    temperature: float = 1.0
    """Logits are divided by it before the softmax."""

    def __post_init__(self) -> None:
        for name, choices in (("objective", Objective), ("ratio_level", RatioLevel),
                              ("clip_gradient", ClipGradient), ("aggregation", Aggregation),
                              ("kl_estimator", KLEstimator), ("kl_gradient", KLGradient),
                              ("kl_reference", KLReference)):
            _check_choice(name, getattr(self, name), choices)
        for name, choices in (("rollout_correction", RolloutCorrection),
                              ("cov_selection", CovSelection), ("kl_aggregation", Aggregation),
                              ("entropy_aggregation", Aggregation)):
            if getattr(self, name) is not None:
                _check_choice(name, getattr(self, name), choices)
        if self.clip_eps_low is not None:
            _check_range("clip_eps_low", self.clip_eps_low, 0.0, 1.0)
        _check_range("clip_eps_high", self.clip_eps_high, 0.0, math.inf)
        if self.dual_clip_c is not None and not self.dual_clip_c > 1.0:
            raise ValueError(f"dual_clip_c must be None or > 1, got {self.dual_clip_c}")
        if self.delta is not None and not self.delta > 1.0 + self.clip_eps_high:
            raise ValueError(f"delta must be None or > 1 + clip_eps_high = "
                             f"{1.0 + self.clip_eps_high}, got {self.delta}")
        for name in ("log_ratio_clamp", "kl_clamp", "normalizer", "rollout_cap", "temperature",
                     "sapo_tau_pos", "sapo_tau_neg", "gmpo_clip", "gmpo_clip_high",
                     "dppo_ratio_cap", "kl_normalizer", "entropy_normalizer", "cov_ratio"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value}")
        if self.max_length is not None and not self.max_length >= 1:
            raise ValueError(f"max_length must be None or >= 1, got {self.max_length}")
        for name in ("kl_coef", "entropy_coef", "vespo_k_pos", "vespo_k_neg", "cov_lower",
                     "cov_upper", "cov_kl_coef", "vespo_lambda_pos", "vespo_lambda_neg"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be finite, got {getattr(self, name)}")
        if self.entropy_advantage_alpha is not None:
            _check_range("entropy_advantage_alpha", self.entropy_advantage_alpha, 0.0, math.inf)
        if self.top_entropy_quantile is not None and not 0.0 < self.top_entropy_quantile <= 1.0:
            raise ValueError(f"top_entropy_quantile must be None or in (0, 1], got "
                             f"{self.top_entropy_quantile}")
        if self.rollout_floor is not None:
            _check_range("rollout_floor", self.rollout_floor, 0.0, self.rollout_cap)
        if self.off_policy_mask_threshold is not None \
                and not math.isfinite(self.off_policy_mask_threshold):
            raise ValueError(f"off_policy_mask_threshold must be None or finite, got "
                             f"{self.off_policy_mask_threshold}")
        if not self.cov_lower < self.cov_upper:
            raise ValueError(f"cov_lower must be < cov_upper, got {self.cov_lower}, "
                             f"{self.cov_upper}")
        self._check_combinations()

    def _check_combinations(self) -> None:
        """Fields that the objective or ratio level would ignore, or cannot take."""
        if self.objective == "gmpo":
            if self.ratio_level != "sequence":
                raise ValueError("objective='gmpo' is sequence-level: set ratio_level='sequence'")
            if self.rollout_correction not in (None, "sequence_truncate", "sequence_mask"):
                raise ValueError("objective='gmpo' takes sequence-level rollout correction only")
            if self.top_entropy_quantile is not None:
                raise ValueError("objective='gmpo' does not take top_entropy_quantile")
            if self.off_policy_mask_threshold is not None:
                raise ValueError("objective='gmpo' does not take off_policy_mask_threshold")
        elif self.gmpo_clip_high is not None:
            raise ValueError(f"gmpo_clip_high applies to objective='gmpo' only; objective="
                             f"{self.objective!r} would ignore it")
        if self.objective in ("dppo_tv", "dppo_kl", "vespo") and self.ratio_level != "token":
            raise ValueError(f"objective={self.objective!r} is defined on token ratios: set "
                             f"ratio_level='token'")
        if self.objective in ("dppo_tv", "dppo_kl") and self.clip_eps_low is None:
            raise ValueError(f"objective={self.objective!r} needs clip_eps_low (its threshold "
                             f"for A <= 0)")
        allowed = {"clip_cov": ("ppo_clip",), "kl_cov": ("ppo_clip", "pg")}
        if self.cov_selection is not None:
            if self.objective not in allowed[self.cov_selection]:
                raise ValueError(f"cov_selection={self.cov_selection!r} takes objective in "
                                 f"{allowed[self.cov_selection]}, got {self.objective!r}")
            if self.ratio_level != "token":
                raise ValueError("cov_selection is defined on token ratios: set "
                                 "ratio_level='token'")
        if self.kl_normalizer is not None and self.kl_aggregation is None:
            raise ValueError("kl_normalizer is the denominator of kl_aggregation: set "
                             "kl_aggregation too (the KL term otherwise follows normalizer)")
        if self.entropy_normalizer is not None and self.entropy_aggregation is None:
            raise ValueError("entropy_normalizer is the denominator of entropy_aggregation: "
                             "set entropy_aggregation too")
        if self.rollout_floor is not None and self.rollout_correction is None:
            raise ValueError("rollout_floor bounds the rollout correction weights: set "
                             "rollout_correction too")
        if self.rollout_normalize and self.rollout_correction is None:
            raise ValueError("rollout_normalize rescales the rollout correction weights: set "
                             "rollout_correction too")

    @classmethod
    def preset(cls, name: str, **overrides: object) -> PolicyLossConfig:
        """The named preset (see ``PRESETS``) with ``overrides`` replacing fields."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
        return PRESETS[name].replace(**overrides)

    def replace(self, **overrides: object) -> PolicyLossConfig:
        """A copy with ``overrides`` replacing fields; unknown names raise ``TypeError``."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown PolicyLossConfig field(s) {unknown}; fields: "
                            f"{sorted(known)}")
        return dataclasses.replace(self, **overrides)

    @property
    def needs_batch_statistics(self) -> bool:
        """True when a token's coefficient depends on other tokens' values."""
        return (self.ratio_level == "sequence" or self.objective in ("gmpo", "vespo")
                or self.entropy_advantage_alpha is not None
                or self.top_entropy_quantile is not None
                or self.cov_selection is not None
                or self.off_policy_mask_threshold is not None
                or self.rollout_normalize
                or self.rollout_correction in ("sequence_truncate", "sequence_mask",
                                               "sequence_gate"))

    @property
    def needs_whole_batch(self) -> bool:
        """True when a token's coefficient depends on statistics over sequences other than
        its own that a per-chunk aggregation scale cannot carry: the covariance selection,
        the rollout weights' batch mean, counts of the KL or entropy term's own aggregation,
        and sequence counts that include empty sequences. Ops that cut the batch into
        chunks of sequences (``linear_policy_loss``) take these in one chunk."""
        return (self.cov_selection is not None or self.rollout_normalize
                or self.kl_aggregation is not None or self.entropy_aggregation is not None
                or self.count_empty_sequences)


def _check_choice(name: str, value: object, choices: object) -> None:
    allowed = choices.__args__  # type: ignore[attr-defined]
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not (math.isfinite(value) or high == math.inf) or not low <= value <= high:
        raise ValueError(f"{name} must lie in [{low}, {high}], got {value}")


PRESETS: dict[str, PolicyLossConfig] = {
    # PPO-clip, epsilon 0.2 (Schulman et al. 2017), token-mean as in verl's default.
    "ppo": PolicyLossConfig(),
    # TRPO penalty form / PPO-penalty: r*A - beta*KL(old || pi) with the sampled k3 (unbiased
    # in value and gradient under samples from pi_old); beta = 1 is the PPO paper's start.
    "ppo_penalty": PolicyLossConfig(objective="pg", kl_reference="old", kl_estimator="k3",
                                    kl_coef=1.0),
    # GRPO (DeepSeekMath): clip 0.2, per-sequence token mean, k3 to the reference, beta 0.04.
    "grpo": PolicyLossConfig(aggregation="seq_mean_token_mean", kl_coef=0.04),
    # BNPO (TRL loss_type="bnpo"): GRPO's clip normalised by the batch's token count.
    "bnpo": PolicyLossConfig(aggregation="token_mean"),
    # Dr. GRPO: no length normalisation, a constant denominator B * max_length, no KL.
    "dr_grpo": PolicyLossConfig(aggregation="seq_mean_token_sum_norm"),
    # DAPO: clip-higher 0.2 / 0.28, token-level mean, no KL.
    "dapo": PolicyLossConfig(clip_eps_low=0.2, clip_eps_high=0.28),
    # GSPO: sequence ratio, epsilon 3e-4 / 4e-4, per-sequence token mean.
    "gspo": PolicyLossConfig(ratio_level="sequence", clip_eps_low=3e-4, clip_eps_high=4e-4,
                             aggregation="seq_mean_token_mean"),
    # GSPO-token: the same with token-wise advantages allowed.
    "gspo_token": PolicyLossConfig(ratio_level="sequence_token", clip_eps_low=3e-4,
                                   clip_eps_high=4e-4, aggregation="seq_mean_token_mean"),
    # CISPO (MiniMax-M1): clipped IS weight as a constant, no lower bound; upper bound 0.28
    # (Trinity-RFT's default; MiniMax does not publish theirs).
    "cispo": PolicyLossConfig(objective="cispo", clip_eps_low=None, clip_eps_high=0.28),
    # SAPO: soft gate, tau 1.0 / 1.05 (verl defaults), per-sequence token mean.
    "sapo": PolicyLossConfig(objective="sapo", aggregation="seq_mean_token_mean"),
    # GMPO: geometric mean of token ratios, log-space clip 0.4.
    "gmpo": PolicyLossConfig(objective="gmpo", ratio_level="sequence",
                             aggregation="seq_mean_token_mean"),
    # GPPO (Klear): stop-gradient clipping on both bounds.
    "gppo": PolicyLossConfig(clip_gradient="keep_both"),
    # AEPO: stop-gradient upper bound, dual clip 3, entropy-aware advantage alpha 0.2.
    "aepo": PolicyLossConfig(clip_gradient="keep_high", dual_clip_c=3.0,
                             entropy_advantage_alpha=0.2),
    # REINFORCE: objective pg on-policy (old_logprobs=None), token mean. The loss value is
    # -A per token (the ratio is 1 in value); its gradient is -A * dlogp, REINFORCE's.
    "reinforce": PolicyLossConfig(objective="pg"),
    # Clip-Cov (Cui et al. 2025, verl clip_cov): PPO-clip, the loss of 2e-4 of the tokens with
    # covariance in (1, 5) zeroed at random; no log-ratio clamp, as verl.
    "clip_cov": PolicyLossConfig(cov_selection="clip_cov", log_ratio_clamp=None),
    # KL-Cov (verl kl_cov): -r*A, plus 0.1 * |log r| on the 2e-4 of tokens of top covariance.
    "kl_cov": PolicyLossConfig(objective="pg", cov_selection="kl_cov", log_ratio_clamp=None),
    # DPPO-Binary-TV / -KL (verl dppo_tv / dppo_kl): verl's defaults, threshold 0.2, cap 3.
    "dppo_tv": PolicyLossConfig(objective="dppo_tv"),
    "dppo_kl": PolicyLossConfig(objective="dppo_kl"),
    # VESPO (TRL loss_type="vespo"): gamma weights k / lambda 2 / 3 (A >= 0) and 3 / 2
    # (A < 0), token mean as TRL normalises it.
    "vespo": PolicyLossConfig(objective="vespo"),
}
