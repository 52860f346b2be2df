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

Objective = Literal["ppo_clip", "pg", "cispo", "sapo", "gmpo"]
RatioLevel = Literal["token", "sequence", "sequence_token"]
ClipGradient = Literal["zero", "keep_high", "keep_both"]
Aggregation = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum",
                      "seq_mean_token_sum_norm"]
KLEstimator = Literal["k1", "k2", "k3"]
KLReference = Literal["ref", "old"]
RolloutCorrection = Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]


@dataclass(frozen=True)
class PolicyLossConfig:
    """The fields of a policy loss. ``r`` is the importance ratio pi / pi_old, ``A`` the
    advantage, ``logp`` the current log-prob of the sampled token."""

    objective: Objective = "ppo_clip"
    """``ppo_clip``: -min(r*A, clip(r)*A); ``pg``: -r*A (on-policy: REINFORCE);
    ``cispo``: -sg(clip(r, lo, 1+eps_high)) * A * logp; ``sapo``: -(4/tau) sigmoid(tau (r-1)) A
    with tau by the sign of A; ``gmpo``: -mean_A * exp(mean_t clip_log(log r)), per sequence."""

    ratio_level: RatioLevel = "token"
    """``token``: r_t = exp(logp - old); ``sequence`` (GSPO): s_i = exp(masked mean of
    (logp - old)) for every token of sequence i, differentiated through the mean;
    ``sequence_token`` (GSPO-token): log r_t = sg(log s_i) + logp_t - sg(logp_t)."""

    clip_eps_low: float | None = 0.2
    """Lower clip bound 1 - clip_eps_low. None: no lower bound (CISPO's default)."""

    clip_eps_high: float = 0.2
    """Upper clip bound 1 + clip_eps_high (DAPO clip-higher sets it above clip_eps_low)."""

    dual_clip_c: float | None = None
    """None or c > 1: for A < 0 the per-token loss is capped at -c*A (dual-clip PPO)."""

    delta: float | None = None
    """None or a cap > 1 + clip_eps_high on the unclipped ratio (two-sided clipping)."""

    log_ratio_clamp: float | None = 20.0
    """Clamp of logp - old (and of KL / rollout log-ratios) before exp; None: no clamp."""

    clip_gradient: ClipGradient = "zero"
    """``zero``: clipped tokens get no gradient (PPO); ``keep_high``: AEPO's upper bound
    (1+eps_high) * r / sg(r), so clipped positive-advantage tokens keep the gradient
    (1+eps_high) * A * dlogp; ``keep_both``: GPPO, both bounds keep a gradient."""

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

    kl_coef: float = 0.0
    """Weight of the KL penalty, aggregated like the policy term."""

    kl_estimator: KLEstimator = "k3"
    """Schulman's estimators with log x = log p - log q: k1 = -log x, k2 = (log x)^2 / 2,
    k3 = x - 1 - log x (docs/architecture.md, KL conventions)."""

    kl_clamp: float | None = None
    """None, or verl's low-variance clamp: the KL log-ratio is clamped by log_ratio_clamp and
    the estimator's value to [-kl_clamp, kl_clamp] (verl: 10)."""

    kl_reference: KLReference = "ref"
    """``ref``: KL(pi || ref) sampled from pi, log x = ref - logp (GRPO); ``old``: KL(old ||
    pi) sampled from pi_old, log x = logp - old (TRPO penalty / PPO-penalty; 0, with a zero
    gradient, on-policy: old_logprobs=None)."""

    entropy_coef: float = 0.0
    """Entropy bonus: the loss subtracts entropy_coef * aggregated entropy (differentiable)."""

    entropy_advantage_alpha: float | None = None
    """AEPO entropy-aware advantage A * (1 + alpha * z(H)), z standardised (unbiased std, 1 if
    zero) over the batch's valid tokens, detached. None: off."""

    top_entropy_quantile: float | None = None
    """Only tokens whose entropy is in the top fraction rho of the batch's valid tokens
    enter the policy term and the entropy bonus (threshold: the (1 - rho) quantile). None:
    all tokens."""

    rollout_correction: RolloutCorrection | None = None
    """Truncated importance sampling against the inference engine's rollout_logprobs:
    weight min(exp(old - rollout), cap) per token (``token_truncate``), the same zeroed above
    the cap instead (``token_mask``), or the product over the sequence (``sequence_*``).
    Detached; multiplies the policy term only."""

    rollout_cap: float = 2.0
    """Cap C of the rollout correction weights."""

    temperature: float = 1.0
    """Logits are divided by it before the softmax."""

    sapo_tau_pos: float = 1.0
    """SAPO temperature for A > 0."""

    sapo_tau_neg: float = 1.05
    """SAPO temperature for A <= 0."""

    gmpo_clip: float = 0.4
    """GMPO's clip of the token log-ratio, in log space, on the pessimistic side."""

    def __post_init__(self) -> None:
        _check_choice("objective", self.objective, Objective)
        _check_choice("ratio_level", self.ratio_level, RatioLevel)
        _check_choice("clip_gradient", self.clip_gradient, ClipGradient)
        _check_choice("aggregation", self.aggregation, Aggregation)
        _check_choice("kl_estimator", self.kl_estimator, KLEstimator)
        _check_choice("kl_reference", self.kl_reference, KLReference)
        if self.rollout_correction is not None:
            _check_choice("rollout_correction", self.rollout_correction, RolloutCorrection)
        if self.clip_eps_low is not None:
            _check_range("clip_eps_low", self.clip_eps_low, 0.0, 1.0)
        _check_range("clip_eps_high", self.clip_eps_high, 0.0, math.inf)
        if self.dual_clip_c is not None and not self.dual_clip_c > 1.0:
            raise ValueError(f"dual_clip_c must be None or > 1, got {self.dual_clip_c}")
        if self.delta is not None and not self.delta > 1.0 + self.clip_eps_high:
            raise ValueError(f"delta must be None or > 1 + clip_eps_high = "
                             f"{1.0 + self.clip_eps_high}, got {self.delta}")
        for name in ("log_ratio_clamp", "kl_clamp", "normalizer", "rollout_cap", "temperature",
                     "sapo_tau_pos", "sapo_tau_neg", "gmpo_clip"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value}")
        if self.max_length is not None and not self.max_length >= 1:
            raise ValueError(f"max_length must be None or >= 1, got {self.max_length}")
        for name in ("kl_coef", "entropy_coef"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be finite, got {getattr(self, name)}")
        if self.entropy_advantage_alpha is not None:
            _check_range("entropy_advantage_alpha", self.entropy_advantage_alpha, 0.0, math.inf)
        if self.top_entropy_quantile is not None and not 0.0 < self.top_entropy_quantile <= 1.0:
            raise ValueError(f"top_entropy_quantile must be None or in (0, 1], got "
                             f"{self.top_entropy_quantile}")
        if self.objective == "gmpo":
            if self.ratio_level != "sequence":
                raise ValueError("objective='gmpo' is sequence-level: set ratio_level='sequence'")
            if self.rollout_correction in ("token_truncate", "token_mask"):
                raise ValueError("objective='gmpo' takes sequence-level rollout correction only")
            if self.top_entropy_quantile is not None:
                raise ValueError("objective='gmpo' does not take top_entropy_quantile")

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
        return (self.ratio_level == "sequence" or self.objective == "gmpo"
                or self.entropy_advantage_alpha is not None
                or self.top_entropy_quantile is not None
                or self.rollout_correction in ("sequence_truncate", "sequence_mask"))


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
}
