"""``PolicyLossConfig``: every policy-gradient loss rlhf_fast computes, as one frozen dataclass
of small parts.

The objective and the temperature sit at the top; everything else lives in one part per
concern (``rlhf_fast.policy_config_parts``): ``ratio``, ``clip``, ``soft_clip``,
``aggregation``, ``kl``, ``entropy``, ``cov`` (covariance selection) and ``rollout``
(rollout correction). Read a setting through its part (``config.kl.coef``); set it either
with the part (``kl=KLConfig(coef=0.04)``, or a mapping ``kl={"coef": 0.04}`` that updates
the part) or with its flat keyword (``kl_coef=0.04``, the spelling of the peers' flat configs;
``FLAT_NAMES`` lists them). Presets are data (``PRESETS``), not code paths:
``PolicyLossConfig.preset("dapo")`` is a config like any other, and keyword overrides replace
fields. Formulas: docs/architecture.md, One coefficient per token, and
``rlhf_fast.reference.policy_loss``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .policy_config_parts import (
    FLAT_NAMES,
    AggregationConfig,
    ClipConfig,
    CovSelectionConfig,
    EntropyConfig,
    KLConfig,
    RatioConfig,
    RolloutCorrectionConfig,
    SoftClipConfig,
    check_choice,
    check_positive,
    compact_repr,
)

Objective = Literal["ppo_clip", "pg", "cispo", "sapo", "gmpo", "dppo_tv", "dppo_kl", "vespo"]

KL_WEIGHT_CAP = 10.0
"""Cap of the importance weight min(exp(logp - old), cap) of ``kl_gradient="k2_weighted"``
(OpenRLHF's ``KL_IS_WEIGHT_CLIP``)."""

VESPO_LOG_W_BOUNDS = (math.log(1e-8), 20.0)
"""Bounds of VESPO's sequence log-weight log W (TRL's ``get_gamma_weights``)."""

VESPO_MIN_LAMBDA = 1e-4
"""VESPO's rate lambda is at least this (TRL clamps it)."""

ROLLOUT_NORMALIZE_MIN = 1e-8
"""``rollout_normalize`` divides by the batch mean of the weights only above this (verl)."""

PARTS: dict[str, type] = {
    "ratio": RatioConfig, "clip": ClipConfig, "soft_clip": SoftClipConfig,
    "aggregation": AggregationConfig, "kl": KLConfig, "entropy": EntropyConfig,
    "cov": CovSelectionConfig, "rollout": RolloutCorrectionConfig,
}
"""The parts of a ``PolicyLossConfig``, by attribute name."""

_TOP_LEVEL = ("objective", "temperature")


@dataclass(frozen=True)
class PolicyLossConfig:
    """A policy loss: the objective, the logits' temperature, and one part per concern.

    ``PolicyLossConfig(objective="pg", kl_coef=0.1)`` and
    ``PolicyLossConfig(objective="pg", kl=KLConfig(coef=0.1))`` are the same config. A part
    passed as a mapping updates that part's defaults; a part passed whole cannot be combined
    with flat keywords of the same part (which would win is not obvious)."""

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
    (+ sum_t m log rho_t), log 1e-8, 20), (k, lam) by A >= 0 (``soft_clip.vespo_*``); the
    rollout correction rho enters W instead of multiplying the loss; a non-finite phi is 0."""

    temperature: float = 1.0
    """Logits are divided by it before the softmax."""

    ratio: RatioConfig = field(default_factory=RatioConfig)
    """How the importance ratio is formed (token, sequence, sequence-token; its clamp)."""

    clip: ClipConfig = field(default_factory=ClipConfig)
    """PPO's clip bounds, dual clip, two-sided cap, clip gradient, GMPO / DPPO bounds."""

    soft_clip: SoftClipConfig = field(default_factory=SoftClipConfig)
    """SAPO's gate temperatures and VESPO's gamma-weight shapes and rates."""

    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    """How per-token losses are reduced (mode, max_length, normalizer, empty sequences)."""

    kl: KLConfig = field(default_factory=KLConfig)
    """The KL penalty: coefficient, estimator, gradient, reference, its own aggregation."""

    entropy: EntropyConfig = field(default_factory=EntropyConfig)
    """The entropy bonus, the top-entropy token selection, AEPO's entropy advantage."""

    cov: CovSelectionConfig = field(default_factory=CovSelectionConfig)
    """Clip-Cov / KL-Cov's covariance-selected tokens."""

    rollout: RolloutCorrectionConfig = field(default_factory=RolloutCorrectionConfig)
    """Rollout correction against the inference engine's log-probs, and the OPSM mask."""

    # Defined in the class body, so ``@dataclass`` keeps these two instead of generating its
    # own: the constructor takes flat keywords and mappings, the repr only what differs.
    __repr__ = compact_repr

    def __init__(self, objective: Objective = "ppo_clip", *, temperature: float = 1.0,
                 **settings: Any) -> None:
        parts = _resolve_parts({}, settings)
        object.__setattr__(self, "objective", objective)
        object.__setattr__(self, "temperature", temperature)
        for name, part in parts.items():
            object.__setattr__(self, name, part)
        self.__post_init__()

    def __post_init__(self) -> None:
        check_choice("objective", self.objective, Objective)
        check_positive("temperature", self.temperature)
        self._check_combinations()

    def _check_combinations(self) -> None:
        """Settings of one part that the objective or ratio level would ignore, or cannot
        take (each part checks its own fields)."""
        level, rollout = self.ratio.level, self.rollout.mode
        if self.objective == "gmpo":
            if level != "sequence":
                raise ValueError("objective='gmpo' is sequence-level: set ratio_level='sequence'")
            if rollout not in (None, "sequence_truncate", "sequence_mask"):
                raise ValueError("objective='gmpo' takes sequence-level rollout correction only")
            if self.entropy.top_quantile is not None:
                raise ValueError("objective='gmpo' does not take top_entropy_quantile")
            if self.rollout.off_policy_mask_threshold is not None:
                raise ValueError("objective='gmpo' does not take off_policy_mask_threshold")
        elif self.clip.gmpo_high is not None:
            raise ValueError(f"gmpo_clip_high applies to objective='gmpo' only; objective="
                             f"{self.objective!r} would ignore it")
        if self.objective in ("dppo_tv", "dppo_kl", "vespo") and level != "token":
            raise ValueError(f"objective={self.objective!r} is defined on token ratios: set "
                             f"ratio_level='token'")
        if self.objective in ("dppo_tv", "dppo_kl") and self.clip.eps_low is None:
            raise ValueError(f"objective={self.objective!r} needs clip_eps_low (its threshold "
                             f"for A <= 0)")
        allowed = {"clip_cov": ("ppo_clip",), "kl_cov": ("ppo_clip", "pg")}
        if self.cov.mode is not None:
            if self.objective not in allowed[self.cov.mode]:
                raise ValueError(f"cov_selection={self.cov.mode!r} takes objective in "
                                 f"{allowed[self.cov.mode]}, got {self.objective!r}")
            if level != "token":
                raise ValueError("cov_selection is defined on token ratios: set "
                                 "ratio_level='token'")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> PolicyLossConfig:
        """The named preset (see ``PRESETS``) with ``overrides`` replacing fields."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
        return PRESETS[name].replace(**overrides)

    def replace(self, **overrides: Any) -> PolicyLossConfig:
        """A copy with ``overrides`` replacing settings: ``objective`` / ``temperature``, a
        part (whole, or a mapping that updates this config's part) or flat keywords
        (``kl_coef=...``); unknown names raise ``TypeError``."""
        current = {name: getattr(self, name) for name in PARTS}
        top = {name: overrides.pop(name, getattr(self, name)) for name in _TOP_LEVEL}
        return PolicyLossConfig(top["objective"], temperature=top["temperature"],
                                **_resolve_parts(current, overrides))

    def flat(self) -> dict[str, Any]:
        """Every setting under its flat keyword (``objective``, ``temperature`` and
        ``FLAT_NAMES``): ``PolicyLossConfig(**config.flat()) == config``."""
        values = {name: getattr(self, name) for name in _TOP_LEVEL}
        for flat_name, (part, name) in FLAT_NAMES.items():
            values[flat_name] = getattr(getattr(self, part), name)
        return values

    @property
    def needs_batch_statistics(self) -> bool:
        """True when a token's coefficient depends on other tokens' values."""
        return (self.ratio.level == "sequence" or self.objective in ("gmpo", "vespo")
                or self.entropy.advantage_alpha is not None
                or self.entropy.top_quantile is not None
                or self.cov.mode is not None
                or self.rollout.off_policy_mask_threshold is not None
                or self.rollout.normalize
                or self.rollout.mode in ("sequence_truncate", "sequence_mask",
                                         "sequence_gate"))

    @property
    def needs_whole_batch(self) -> bool:
        """True when a token's coefficient depends on statistics over sequences other than
        its own that a per-chunk aggregation scale cannot carry: the covariance selection,
        the rollout weights' batch mean, counts of the KL or entropy term's own aggregation,
        and sequence counts that include empty sequences. Ops that cut the batch into
        chunks of sequences (``linear_policy_loss``) take these in one chunk."""
        return (self.cov.mode is not None or self.rollout.normalize
                or self.kl.aggregation is not None or self.entropy.aggregation is not None
                or self.aggregation.count_empty_sequences)


def _resolve_parts(current: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """Every part, from ``current`` (missing: the part's defaults) updated by ``settings``:
    parts given whole or as mappings, and flat keywords. A string ``aggregation`` is the flat
    keyword of ``aggregation.mode``."""
    settings = dict(settings)
    if isinstance(settings.get("aggregation"), str):
        settings["aggregation"] = {"mode": settings["aggregation"]}
    unknown = sorted(set(settings) - set(PARTS) - set(FLAT_NAMES))
    if unknown:
        raise TypeError(f"unknown PolicyLossConfig field(s) {unknown}; settings: "
                        f"{sorted(set(_TOP_LEVEL) | set(PARTS) | set(FLAT_NAMES))}")
    flat_updates: dict[str, dict[str, Any]] = {}
    for flat_name, (part, name) in FLAT_NAMES.items():
        if flat_name in settings and flat_name not in PARTS:
            flat_updates.setdefault(part, {})[name] = settings[flat_name]
    parts = {}
    for name, part_type in PARTS.items():
        part = current.get(name) or part_type()
        given = settings.get(name)
        if isinstance(given, part_type):
            if name in flat_updates:
                flat = sorted(k for k, (p, _) in FLAT_NAMES.items() if p == name
                              and k in settings and k != name)
                raise TypeError(f"{name} is given whole and by the flat keyword(s) {flat}: "
                                f"pass one or the other")
            part = given
        elif isinstance(given, Mapping):
            part = dataclasses.replace(part, **given)
        elif given is not None:
            raise TypeError(f"{name} must be a {part_type.__name__} or a mapping of its "
                            f"fields, got {type(given).__name__}")
        if name in flat_updates:
            part = dataclasses.replace(part, **flat_updates[name])
        parts[name] = part
    return parts


_SEQ_MEAN_TOKEN_MEAN = AggregationConfig("seq_mean_token_mean")
_GSPO_CLIP = ClipConfig(eps_low=3e-4, eps_high=4e-4)
_UNCLAMPED = RatioConfig(log_clamp=None)

PRESETS: dict[str, PolicyLossConfig] = {
    # PPO-clip, epsilon 0.2 (Schulman et al. 2017), token-mean as in verl's default.
    "ppo": PolicyLossConfig(),
    # TRPO penalty form / PPO-penalty: r*A - beta*KL(old || pi) with the sampled k3 (unbiased
    # in value and gradient under samples from pi_old); beta = 1 is the PPO paper's start.
    "ppo_penalty": PolicyLossConfig("pg", kl=KLConfig(coef=1.0, estimator="k3", reference="old")),
    # GRPO (DeepSeekMath): clip 0.2, per-sequence token mean, k3 to the reference, beta 0.04.
    "grpo": PolicyLossConfig(aggregation=_SEQ_MEAN_TOKEN_MEAN, kl=KLConfig(coef=0.04)),
    # BNPO (TRL loss_type="bnpo"): GRPO's clip normalised by the batch's token count.
    "bnpo": PolicyLossConfig(aggregation=AggregationConfig("token_mean")),
    # Dr. GRPO: no length normalisation, a constant denominator B * max_length, no KL.
    "dr_grpo": PolicyLossConfig(aggregation=AggregationConfig("seq_mean_token_sum_norm")),
    # DAPO: clip-higher 0.2 / 0.28, token-level mean, no KL.
    "dapo": PolicyLossConfig(clip=ClipConfig(eps_low=0.2, eps_high=0.28)),
    # GSPO: sequence ratio, epsilon 3e-4 / 4e-4, per-sequence token mean.
    "gspo": PolicyLossConfig(ratio=RatioConfig("sequence"), clip=_GSPO_CLIP,
                             aggregation=_SEQ_MEAN_TOKEN_MEAN),
    # GSPO-token: the same with token-wise advantages allowed.
    "gspo_token": PolicyLossConfig(ratio=RatioConfig("sequence_token"), clip=_GSPO_CLIP,
                                   aggregation=_SEQ_MEAN_TOKEN_MEAN),
    # CISPO (MiniMax-M1): clipped IS weight as a constant, no lower bound; upper bound 0.28
    # (Trinity-RFT's default; MiniMax does not publish theirs).
    "cispo": PolicyLossConfig("cispo", clip=ClipConfig(eps_low=None, eps_high=0.28)),
    # SAPO: soft gate, tau 1.0 / 1.05 (verl defaults), per-sequence token mean.
    "sapo": PolicyLossConfig("sapo", aggregation=_SEQ_MEAN_TOKEN_MEAN),
    # GMPO: geometric mean of token ratios, log-space clip 0.4.
    "gmpo": PolicyLossConfig("gmpo", ratio=RatioConfig("sequence"),
                             aggregation=_SEQ_MEAN_TOKEN_MEAN),
    # GPPO (Klear): stop-gradient clipping on both bounds.
    "gppo": PolicyLossConfig(clip=ClipConfig(gradient="keep_both")),
    # AEPO: stop-gradient upper bound, dual clip 3, entropy-aware advantage alpha 0.2.
    "aepo": PolicyLossConfig(clip=ClipConfig(gradient="keep_high", dual_c=3.0),
                             entropy=EntropyConfig(advantage_alpha=0.2)),
    # REINFORCE: objective pg on-policy (old_logprobs=None), token mean. The loss value is
    # -A per token (the ratio is 1 in value); its gradient is -A * dlogp, REINFORCE's.
    "reinforce": PolicyLossConfig("pg"),
    # Clip-Cov (Cui et al. 2025, verl clip_cov): PPO-clip, the loss of 2e-4 of the tokens with
    # covariance in (1, 5) zeroed at random; no log-ratio clamp, as verl.
    "clip_cov": PolicyLossConfig(cov=CovSelectionConfig("clip_cov"), ratio=_UNCLAMPED),
    # KL-Cov (verl kl_cov): -r*A, plus 0.1 * |log r| on the 2e-4 of tokens of top covariance.
    "kl_cov": PolicyLossConfig("pg", cov=CovSelectionConfig("kl_cov"), ratio=_UNCLAMPED),
    # DPPO-Binary-TV / -KL (verl dppo_tv / dppo_kl): verl's defaults, threshold 0.2, cap 3.
    "dppo_tv": PolicyLossConfig("dppo_tv"),
    "dppo_kl": PolicyLossConfig("dppo_kl"),
    # VESPO (TRL loss_type="vespo"): gamma weights k / lambda 2 / 3 (A >= 0) and 3 / 2
    # (A < 0), token mean as TRL normalises it.
    "vespo": PolicyLossConfig("vespo"),
}
