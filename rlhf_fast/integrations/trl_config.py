"""TRL's GRPO / DPO settings mapped onto rlhf_fast's loss arguments, or refused.

Pure functions of a trainer's attributes (duck-typed: nothing here imports TRL), so the
mapping is one readable table. Checked against TRL 1.16 (``GRPOTrainer._compute_loss`` and
``DPOTrainer._compute_loss``).

GRPO, per token with r = exp(logp - old) (or the sequence ratio s for
``importance_sampling_level="sequence"``):

    grpo / bnpo / dr_grpo / dapo / luspo   -min(min(r, delta) A, clip(r, 1-eps, 1+eps_high) A)
    cispo                                  -sg(min(r, epsilon_high)) A logp
    sapo                                   -(4/tau) sigmoid(tau (r - 1)) A
    vespo                                  -sg(phi(W)) A logp  (gamma weight of the sequence
                                           weight W = prod_t r_t rho_t, objective="vespo")

times the vLLM importance-sampling ratio rho (except vespo, where rho enters W), the
top-entropy mask and the off-policy sequence mask (``off_policy_mask_threshold``), plus beta
* k3 KL to the reference (times r, or s, with ``use_bias_correction_kl``; neither mask nor
rho), minus the entropy bonus ``entropy_coef`` * (token mean of the entropy over the kept
tokens) / G, summed with weights that depend on ``loss_type``:

    grpo, sapo   sum_b [sum_t m L / max(|y_b|, 1)] / (B G)          -> seq_mean_token_mean, B G
    bnpo         sum m L / (max(sum m, 1) G)                         -> token_mean, max(sum m,1) G
    dr_grpo      sum m L / (B max_completion_length G)               -> seq_mean_token_sum_norm
    dapo, cispo, vespo   sum m L / (N_gen / P * G / steps_per_generation)  -> token_mean
    luspo        sum m L / (B G)                                     -> seq_mean_token_sum, B G

with G the gradient-accumulation steps (1 in eval), N_gen the generation batch's completion
tokens over all P processes (``num_items_in_batch``). rho >= 0 multiplies the policy term
only, and every policy objective above but vespo is positively homogeneous in A, so rho is
folded into the advantages: rho * L(A) = L(rho * A) in value and gradient. For vespo, TRL's
token ratio rho = band(exp(old - sampling)) is rebuilt by the op's rollout correction
(``token_truncate`` / ``token_mask`` between ``vllm_importance_sampling_clip_min`` and
``_max``) from the vLLM log-probs (a NaN one, which TRL gives rho = 1, is replaced by the old
log-prob).

Statistics over the batch are the micro-batch's, as in TRL on one process: the top-entropy
quantile (refused across processes: TRL's is global) and the off-policy sequence mean (per
sequence). Differences on purpose: with vespo, log r is clamped to +-20 (VESPO's clamp) also
where ``use_bias_correction_kl`` multiplies the KL by r, which TRL leaves unclamped; a vLLM
token without a sampling log-prob (NaN) enters the off-policy mean as old - logp where TRL
counts 0.
"""

from __future__ import annotations

from typing import Any

from ..config import PolicyLossConfig
from ..preference_config import MIXABLE_LOSSES
from .errors import UnsupportedSettingError

GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo")
"""TRL ``loss_type`` values that map exactly."""

NO_ROLLOUT_CAP = 1e30
"""``rollout_cap`` standing for TRL's ``vllm_importance_sampling_clip_max=None`` (no upper
bound): above any weight the op forms (its log-weights are clamped to +-20)."""

DPO_LOSS_TYPES = {
    # TRL loss_type -> (rlhf_fast loss_type, average_logprobs)
    "sigmoid": ("sigmoid", False),
    "sigmoid_norm": ("sigmoid", True),
    "hinge": ("hinge", False),
    "ipo": ("ipo", True),
    "exo_pair": ("exo_pair", False),
    "nca_pair": ("nca_pair", False),
    "robust": ("robust", False),
    "bco_pair": ("bco_pair", False),
    "sppo_hard": ("sppo_hard", False),
    "apo_zero": ("apo_zero", False),
    "apo_down": ("apo_down", False),
    "discopop": ("discopop", False),
    "aot": ("aot", False),
    "aot_unpaired": ("aot_unpaired", False),
}
"""TRL DPO loss types that map exactly ("sft" maps onto ``nll_coef``). aot / aot_unpaired sort
the micro-batch's pairs, as TRL's ``_compute_loss`` does with the same micro-batch."""

_SMOOTHED = ("robust", "exo_pair", "aot", "aot_unpaired")
"""TRL (>= 0.29) applies ``label_smoothing`` to these only (not to sigmoid)."""

_ALPHA_LIMIT = 1e-6
"""TRL's alpha_divergence with |alpha - 1| below this is reverse_kl (its limit)."""


def _refuse(setting: str, value: object, reason: str, remedy: str = "") -> None:
    raise UnsupportedSettingError("TRL", setting, value, reason, remedy)


def grpo_policy_config(trainer: Any) -> PolicyLossConfig:
    """The ``PolicyLossConfig`` of a ``GRPOTrainer`` (everything but what changes per
    micro-batch, see ``grpo_step_config``), or ``UnsupportedSettingError``."""
    args = trainer.args
    loss_type = trainer.loss_type
    if loss_type not in GRPO_LOSS_TYPES:
        _refuse("loss_type", loss_type, "unknown loss type", f"Supported: {GRPO_LOSS_TYPES}.")
    level = trainer.importance_sampling_level
    if level not in ("token", "sequence"):
        _refuse("importance_sampling_level", level, "only 'token' and 'sequence' exist in TRL")
    if getattr(trainer, "aux_loss_enabled", False):
        _refuse("router_aux_loss_coef", trainer.router_aux_loss_coef,
                "the MoE load-balancing loss needs the router logits of the fused forward",
                "Set router_aux_loss_coef=0.0.")
    beta = float(trainer.beta)
    ratio_weighted_kl = beta != 0.0 and bool(getattr(args, "use_bias_correction_kl", False))
    quantile = float(trainer.top_entropy_quantile)
    if quantile < 1.0 and trainer.accelerator.num_processes > 1:
        _refuse("top_entropy_quantile", quantile, "TRL takes the entropy quantile over all "
                "processes; rlhf_fast takes it over the local batch",
                "Use one process or top_entropy_quantile=1.0.")
    bonus = bool(getattr(trainer, "_entropy_bonus_enabled", False))

    fields: dict[str, Any] = dict(
        ratio_level=level, log_ratio_clamp=None, kl_clamp=None,   # TRL clamps nothing
        kl_coef=beta, kl_estimator="k3", kl_reference="ref",
        kl_ratio_weighted=ratio_weighted_kl,
        top_entropy_quantile=quantile if quantile < 1.0 else None,
        off_policy_mask_threshold=trainer.off_policy_mask_threshold,
        temperature=float(trainer.temperature),
    )
    if bonus:  # a token mean over the kept tokens whatever the loss_type (grpo_step_config)
        fields["entropy_aggregation"] = "token_mean"
    eps_low, eps_high = float(trainer.epsilon_low), float(trainer.epsilon_high)
    if loss_type == "cispo":
        # TRL's epsilon_high is an absolute cap on r; rlhf_fast's bound is 1 + clip_eps_high.
        if eps_high < 1.0:
            _refuse("epsilon_high", eps_high, "with loss_type='cispo' TRL caps the IS weight "
                    "at epsilon_high itself; a cap below 1 is not a clip bound rlhf_fast takes",
                    "MiniMax-M1 / TRL recommend epsilon_high=5.0 for cispo.")
        fields.update(objective="cispo", clip_eps_low=None, clip_eps_high=eps_high - 1.0)
    elif loss_type == "sapo":
        fields.update(objective="sapo", sapo_tau_pos=float(args.sapo_temperature_pos),
                      sapo_tau_neg=float(args.sapo_temperature_neg))
    elif loss_type == "vespo":
        _vespo_fields(trainer, fields, ratio_weighted_kl)
    else:
        delta = args.delta
        if delta is not None and not delta > 1.0 + eps_high:
            _refuse("delta", delta, f"the two-sided cap must exceed 1 + epsilon_high = "
                    f"{1.0 + eps_high} (below it, it replaces the clip)")
        fields.update(objective="ppo_clip", clip_eps_low=eps_low, clip_eps_high=eps_high,
                      delta=float(delta) if delta is not None else None)
    fields["aggregation"] = {
        "grpo": "seq_mean_token_mean", "sapo": "seq_mean_token_mean", "bnpo": "token_mean",
        "dr_grpo": "seq_mean_token_sum_norm", "dapo": "token_mean", "cispo": "token_mean",
        "vespo": "token_mean", "luspo": "seq_mean_token_sum",
    }[loss_type]
    try:
        return PolicyLossConfig(**fields)
    except ValueError as error:
        _refuse("epsilon / epsilon_high", (eps_low, eps_high), str(error))
        raise  # unreachable: _refuse raises


def _vespo_fields(trainer: Any, fields: dict[str, Any], ratio_weighted_kl: bool) -> None:
    """VESPO: its gamma weights, TRL's +-20 clamp of log r, and the vLLM IS ratio as the
    op's rollout correction (it enters the sequence weight W instead of scaling the loss)."""
    args = trainer.args
    if ratio_weighted_kl and trainer.importance_sampling_level == "sequence":
        _refuse("use_bias_correction_kl", True, "with loss_type='vespo' and "
                "importance_sampling_level='sequence' TRL weights the KL by the sequence ratio, "
                "while rlhf_fast's VESPO is defined on token ratios",
                "Use importance_sampling_level='token' (VESPO ignores it otherwise).")
    fields.update(objective="vespo", ratio_level="token", log_ratio_clamp=20.0,
                  vespo_k_pos=float(args.vespo_k_pos), vespo_k_neg=float(args.vespo_k_neg),
                  vespo_lambda_pos=float(args.vespo_lambda_pos),
                  vespo_lambda_neg=float(args.vespo_lambda_neg))
    if not (trainer.use_vllm and trainer.vllm_importance_sampling_correction):
        return
    mode = trainer.vllm_importance_sampling_mode
    low = trainer.vllm_importance_sampling_clip_min
    high = trainer.vllm_importance_sampling_clip_max
    if mode not in ("token_truncate", "token_mask"):
        _refuse("vllm_importance_sampling_mode", mode, "TRL's VESPO takes token modes only")
    if (low is not None and low > 1.0) or (high is not None and high < 1.0):
        _refuse("vllm_importance_sampling_clip_min / _max", (low, high), "TRL's VESPO sums "
                "log rho over padding positions too, where rho is the band's image of 1: "
                "only a band holding 1 makes those terms 0 as in rlhf_fast's masked sum")
    fields.update(rollout_correction=mode,
                  rollout_cap=float(high) if high is not None else NO_ROLLOUT_CAP,
                  rollout_floor=float(low) if low is not None else None)


def grpo_step_config(trainer: Any, mask_sum: float, batch: int, num_items_in_batch: Any,
                     training: bool) -> PolicyLossConfig:
    """``grpo_policy_config`` with what depends on the micro-batch and the trainer's state:
    TRL's normaliser (``grpo_normalizer``) and the entropy bonus (``grpo_entropy_coef``)."""
    config = grpo_policy_config(trainer)
    normalizer = grpo_normalizer(trainer, mask_sum, batch, num_items_in_batch, training)
    if not getattr(trainer, "_entropy_bonus_enabled", False):
        return config.replace(normalizer=normalizer)
    return config.replace(normalizer=normalizer,
                          entropy_coef=grpo_entropy_coef(trainer, training))


def grpo_entropy_coef(trainer: Any, training: bool) -> float:
    """The op's ``entropy_coef``: TRL divides the bonus's token mean by the accumulation steps
    G; the adaptive controller's coefficient applies while the last window's entropy is at
    most ``entropy_target``, else none."""
    if not getattr(trainer, "_entropy_bonus_enabled", False):
        return 0.0
    coef = float(trainer.entropy_coef)
    if trainer.use_adaptive_entropy and \
            not trainer._last_world_entropy <= trainer.args.entropy_target:
        coef = 0.0
    accumulation = trainer.current_gradient_accumulation_steps if training else 1
    return coef / accumulation


def grpo_normalizer(trainer: Any, mask_sum: float, batch: int, num_items_in_batch: Any,
                    training: bool) -> float:
    """The denominator TRL divides the summed per-token loss by (module docstring table):
    ``mask_sum`` is the micro-batch's completion-token count, ``batch`` its rows."""
    accumulation = trainer.current_gradient_accumulation_steps if training else 1
    loss_type = trainer.loss_type
    if loss_type in ("grpo", "sapo", "luspo"):
        return float(batch * accumulation)
    if loss_type == "bnpo":
        return max(mask_sum, 1.0) * accumulation
    if loss_type == "dr_grpo":
        return float(batch * trainer.max_completion_length * accumulation)
    normalizer = max(float(num_items_in_batch), 1.0) / trainer.accelerator.num_processes
    if training:
        normalizer = normalizer * accumulation / trainer.args.steps_per_generation
    return normalizer


def dpo_loss_arguments(trainer: Any) -> dict[str, Any]:
    """Keyword arguments of ``linear_dpo_loss`` for a ``DPOTrainer``, or
    ``UnsupportedSettingError``.

    TRL's loss is sum_k w_k * (pair mean of L_k) over its ``loss_type`` list with
    ``loss_weights`` w_k; the op's ``loss_type`` (one type, or a list of distinct types whose
    repeated TRL entries are merged, their weights added) with ``loss_weights`` is the same
    sum, and "sft" (plus ``rpo_alpha``) maps onto ``nll_coef`` = w_sft + rpo_alpha. TRL's
    f-divergence scores, LD-DPO weights (its reference sums arrive LD-weighted already), aot
    sorting and WPO's ``use_weighting`` map onto the op's own settings.

    ``use_weighting`` (TRL 1.16: each pair's loss of every type times the constant
    w = exp(c_w + c_l), unclamped; refused with aot / aot_unpaired, as TRL refuses it): exact
    for every other type but two, where TRL's own step fails
    and the adapter takes the op's documented behaviour, TRL's evident intent. A weighted
    "sft" raises in TRL's forward (it multiplies the broadcast NLL in place); the op weighs
    the NLL by the batch mean of w, the pair mean of w * NLL TRL means to take. A weighted
    "hinge" raises in TRL's backward (the in-place product overwrites the relu output that
    relu's gradient reads); the op's forward value is TRL's, its gradient that of the same
    formula."""
    args = trainer.args
    losses = list(trainer.loss_types)
    weights = [float(w) for w in trainer.loss_weights]
    sft_weight = sum(w for name, w in zip(losses, weights, strict=True) if name == "sft")
    merged: dict[str, float] = {}
    for name, w in zip(losses, weights, strict=True):
        if name != "sft":
            merged[name] = merged.get(name, 0.0) + w
    if not merged:
        _refuse("loss_type", losses, "the fused op computes a preference loss, and 'sft' alone "
                "is none", "Add a preference loss type, or use TRL's SFTTrainer.")
    for name in merged:
        if name not in DPO_LOSS_TYPES:
            _refuse("loss_type", name, "unknown loss type",
                    f"Supported: {sorted(DPO_LOSS_TYPES)} and 'sft'.")
    if getattr(trainer, "aux_loss_enabled", False):
        _refuse("router_aux_loss_coef", trainer.router_aux_loss_coef,
                "the MoE load-balancing loss needs the router logits of the fused forward")
    rpo = float(getattr(args, "rpo_alpha", None) or 0.0)
    weighting = bool(trainer.use_weighting)
    sorted_types = [n for n in merged if n in ("aot", "aot_unpaired")]
    if weighting and sorted_types:
        _refuse("use_weighting", True, f"{sorted_types} sort the pairs across the batch, which "
                "misaligns the per-pair WPO weights (TRL refuses it too)")
    if weighting and rpo != 0.0:
        _refuse("use_weighting", True, "with rpo_alpha (TRL < 0.29) TRL clamps the WPO weight "
                "at 1 and leaves the RPO NLL unweighted; rlhf_fast takes TRL 1.16's unclamped "
                "weight", "Use loss_type=[..., 'sft'] with loss_weights instead of rpo_alpha.")
    names = list(merged)
    averaged = [name for name in names if DPO_LOSS_TYPES[name][1]]   # ipo, sigmoid_norm
    if len(names) == 1:
        (name, weight), = merged.items()
        loss_type, average = DPO_LOSS_TYPES[name]
        kwargs: dict[str, Any] = dict(loss_type=loss_type, loss_weights=[weight],
                                      average_logprobs=average)
    else:
        unmixable = [n for n in names if DPO_LOSS_TYPES[n][0] not in MIXABLE_LOSSES]
        if unmixable:
            _refuse("loss_type", losses, f"a weighted sum of loss types takes losses on the "
                    f"summed sequence scores, and {unmixable} average them by length (ipo, "
                    f"sigmoid_norm) or sort them across the batch (aot)",
                    f"Mix only {MIXABLE_LOSSES} (plus 'sft'), or use one loss type.")
        kwargs = dict(loss_type=[DPO_LOSS_TYPES[n][0] for n in names],
                      loss_weights=[merged[n] for n in names], average_logprobs=False)
    smoothed = [n for n in names if n in _SMOOTHED]
    eps = float(trainer.label_smoothing) if smoothed else 0.0
    if eps != 0.0 and "sigmoid" in names:
        _refuse("label_smoothing", eps, f"TRL smooths {smoothed} but not 'sigmoid', while "
                "rlhf_fast's one label_smoothing smooths every smoothable loss of a mixture",
                "Mix sigmoid only with losses that take no label_smoothing.")
    kwargs.update(beta=float(trainer.beta), label_smoothing=eps, nll_coef=sft_weight + rpo,
                  use_weighting=weighting)
    if "discopop" in names:  # the op refuses a temperature that its loss would ignore
        kwargs["discopop_tau"] = float(getattr(args, "discopop_tau", 0.05))
    divergence = trainer.f_divergence_type
    alpha = float(trainer.f_alpha_divergence_coef)
    if divergence == "alpha_divergence" and abs(alpha - 1.0) < _ALPHA_LIMIT:
        divergence = "reverse_kl"
    if divergence != "reverse_kl":
        if averaged:
            _refuse("f_divergence_type", divergence, f"TRL divides the f-divergence scores "
                    f"by the length for {averaged}; rlhf_fast's f_divergence is defined on "
                    f"the summed log-ratios", "Use f_divergence_type='reverse_kl' with "
                    "ipo / sigmoid_norm, or the loss 'sigmoid' instead of 'sigmoid_norm'.")
        kwargs["f_divergence"] = divergence
        if divergence == "alpha_divergence":
            kwargs["f_alpha"] = alpha
    if trainer.ld_alpha is not None:
        kwargs["ld_alpha"] = float(trainer.ld_alpha)
    return kwargs
