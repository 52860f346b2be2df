"""verl with rlhf_fast: the policy losses in verl's registry and a fused log-prob + entropy head.

Covered: verl 0.9.1 (``verl.trainer.ppo.core_algos``, the FSDP engine's fused-kernel path).
Importing this module registers, additively (no default of verl changes):

- policy losses ``rlhf_fast_<mode>`` for ``mode`` in ``LOSS_MODES`` (``vanilla`` PPO with
  dual clip, ``gspo``, ``gpg``, ``cispo``, ``sapo``, ``geo_mean``, ``dppo_tv``, ``dppo_kl``,
  ``kl_cov``, ``dro``): verl's own loss on the same ``(old_log_prob, log_prob, advantages,
  response_mask, loss_agg_mode, config, rollout_is_weights)``, honouring ``loss_agg_mode``
  and the global token / sequence counts verl puts in ``config.global_batch_info``. The loss
  and ``dL/dlog_prob`` come from rlhf_fast's hand-derived coefficient step
  (``policy_coefficients``): no autograd graph over the ``[B, T]`` temporaries. Select with
  ``actor_rollout_ref.actor.policy_loss.loss_mode=rlhf_fast_vanilla`` (etc.).
- the fused-kernel backend ``rlhf_fast``: ``actor_rollout_ref.model.fused_kernel_options
  .impl_backend=rlhf_fast`` makes verl's patched model forward compute log-probs and
  entropy with ``linear_token_logprobs`` from the final hidden states and ``lm_head``
  weight (float32 out, never the ``[tokens, vocab]`` logits), and turns
  ``use_fused_kernels`` on: that one key is all a verl user sets.

The module is found without any user action: rlhf_fast declares it as a ``verl.plugins``
entry point, which verl imports at ``import verl`` in every process (driver and Ray
workers). Naming it in ``actor_rollout_ref.model.external_lib`` or
``VERL_USE_EXTERNAL_MODULES`` also works.

Batch statistics are verl's: ``kl_cov``'s covariance (and its top-k) is taken over the
micro-batch verl hands to the policy loss, and so is it here; verl's rollout correction
(``rollout_is``, ``rollout_rs``, ``rollout_is_batch_normalize``, all over the training
batch) runs in verl's trainer and reaches the loss as ``rollout_is_weights`` and the response
mask, which are used as given. verl's KL loss (every ``kl_loss_type``, the straight-through
``k1+`` / ``k3+`` / ``low_var_kl+`` / ``abs+`` included) and entropy bonus are computed by verl
itself on the log-probs and entropy of the fused head, outside the policy loss: nothing to
map.

Differences on purpose: the ``gspo`` clamp of log s at 10 (value capped, gradient zeroed) is
not reproduced (the two agree while the sequence log-ratio stays below 10); the fused head's
entropy is float32 where verl's torch backend rounds it to the logits' dtype; an all-empty
micro-batch gives a loss of 0 where verl divides 0 by 0. Refused (``UnsupportedSettingError``,
``REFUSED_MODES`` says why): ``clip_cov`` (random token draw) and ``bypass_mode``; ``dro``
with ``rollout_is_weights`` (verl scales its penalty by them too).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..config import PolicyLossConfig
from ..loss_weights import dppo_keep
from ..ops.linear import linear_token_logprobs
from ..policy_coefficients import policy_coefficients
from .errors import UnsupportedSettingError

LOSS_MODES = ("vanilla", "gspo", "gpg", "cispo", "sapo", "geo_mean", "dppo_tv", "dppo_kl",
              "kl_cov", "dro")
"""verl loss modes with an exact rlhf_fast counterpart; registered as ``rlhf_fast_<mode>``."""

REFUSED_MODES = {
    "clip_cov": "verl draws the high-covariance tokens it zeroes with torch.randperm over the "
                "candidates and rlhf_fast's cov_selection='clip_cov' with per-token torch.rand "
                "priorities: the same distribution, not the same tokens for a seed",
    "bypass_mode": "verl's bypass mode (algorithm.rollout_correction.bypass_mode=True) sets "
                   "policy_loss.loss_mode='bypass_mode' itself (rollout_corr_helper."
                   "apply_bypass_mode), over any rlhf_fast_<mode>: verl's own loss then runs, "
                   "on the fused head's log-probs, so an rlhf_fast_bypass_mode could never be "
                   "selected",
}
"""verl loss modes refused, with the reason (``clip_cov`` is ``PolicyLossConfig.preset(
"clip_cov")`` for users of rlhf_fast's own trainers)."""

BACKEND = "rlhf_fast"
"""``fused_kernel_options.impl_backend`` value that selects the fused head."""

_FORCED_AGGREGATION = {"sapo": "seq-mean-token-mean"}
"""verl's sapo ignores ``loss_agg_mode``; geo_mean is a plain mean over sequences."""


def _refuse(setting: str, value: object, reason: str, remedy: str = "") -> None:
    raise UnsupportedSettingError("verl", setting, value, reason, remedy)


def _clip_bounds(config: Any) -> tuple[float, float]:
    low = config.clip_ratio_low if config.clip_ratio_low is not None else config.clip_ratio
    high = config.clip_ratio_high if config.clip_ratio_high is not None else config.clip_ratio
    return float(low), float(high)


def _aggregation(loss_agg_mode: str, mask: Tensor, info: dict) -> tuple[str, float]:
    """(rlhf_fast aggregation, normaliser) equal to ``core_algos.agg_loss`` with verl's
    ``global_batch_info`` (dp_size, batch_num_tokens, global_batch_size,
    loss_scale_factor): token counts and sequence counts divided by dp_size, because verl
    multiplies by dp_size to cancel the data-parallel gradient average."""
    dp = float(info.get("dp_size") or 1)
    tokens = info.get("batch_num_tokens")
    sequences = info.get("global_batch_size")
    if loss_agg_mode == "token-mean":
        if tokens is None and dp > 1:
            raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
        count = float(tokens) if tokens is not None else float(mask.sum())
        return "token_mean", max(count, 1.0) / dp
    if loss_agg_mode == "token-sum":
        return "token_mean", 1.0 / dp
    if loss_agg_mode in ("seq-mean-token-sum", "seq-mean-token-mean",
                         "seq-mean-token-sum-norm"):
        if sequences is None and dp > 1:
            raise ValueError("global_batch_size is required when dp_size > 1")
        count = float(sequences) if sequences is not None \
            else float((mask.sum(-1) > 0).sum())
        normalizer = max(count, 1.0) / dp
        if loss_agg_mode == "seq-mean-token-mean":
            return "seq_mean_token_mean", normalizer
        if loss_agg_mode == "seq-mean-token-sum-norm":
            scale = info.get("loss_scale_factor")
            normalizer *= float(scale) if scale is not None else float(mask.shape[-1])
        return "seq_mean_token_sum", normalizer
    _refuse("loss_agg_mode", loss_agg_mode, "unknown aggregation")
    raise AssertionError  # unreachable


def verl_policy_config(loss_mode: str, config: Any, loss_agg_mode: str,
                       mask: Tensor) -> PolicyLossConfig:
    """The ``PolicyLossConfig`` reproducing verl's ``loss_mode`` on this micro-batch (the
    normaliser depends on the mask and ``config.global_batch_info``)."""
    if loss_mode in REFUSED_MODES:
        _refuse("policy_loss.loss_mode", loss_mode, REFUSED_MODES[loss_mode],
                f"Use verl's own {loss_mode!r}, or one of the exact modes rlhf_fast_<mode>, "
                f"mode in {LOSS_MODES}.")
    if loss_mode not in LOSS_MODES:
        _refuse("policy_loss.loss_mode", loss_mode, "unknown loss mode")
    low, high = _clip_bounds(config)
    info = dict(getattr(config, "global_batch_info", None) or {})
    if loss_mode == "geo_mean":
        # verl: the log-ratio clamped to [-clip_ratio_low, clip_ratio_high] on the pessimistic
        # side; torch.mean over all rows of the micro-batch, whatever loss_agg_mode says.
        return PolicyLossConfig(objective="gmpo", ratio_level="sequence", gmpo_clip=low,
                                gmpo_clip_high=high, log_ratio_clamp=None,
                                aggregation="seq_mean_token_mean",
                                normalizer=float(max(mask.shape[0], 1)))
    aggregation, normalizer = _aggregation(_FORCED_AGGREGATION.get(loss_mode, loss_agg_mode),
                                           mask, info)
    common = dict(aggregation=aggregation, normalizer=normalizer, log_ratio_clamp=20.0)
    if loss_mode == "vanilla":
        dual = float(config.get("clip_ratio_c", 3.0))
        return PolicyLossConfig(clip_eps_low=low, clip_eps_high=high, dual_clip_c=dual,
                                **common)
    if loss_mode == "gspo":
        return PolicyLossConfig(ratio_level="sequence_token", clip_eps_low=low,
                                clip_eps_high=high, **{**common, "log_ratio_clamp": None})
    if loss_mode == "cispo":
        return PolicyLossConfig(objective="cispo", clip_eps_low=low, clip_eps_high=high,
                                **common)
    if loss_mode == "sapo":
        return PolicyLossConfig(objective="sapo", sapo_tau_pos=float(config.tau_pos),
                                sapo_tau_neg=float(config.tau_neg), **common)
    if loss_mode in ("dppo_tv", "dppo_kl"):
        # clip_ratio_low / high are the trust-region thresholds; clip_ratio_c caps the ratio.
        return PolicyLossConfig(objective=loss_mode, clip_eps_low=low, clip_eps_high=high,
                                dppo_ratio_cap=float(config.get("clip_ratio_c", 20.0)),
                                **common)
    if loss_mode == "dro":
        # -A logp (CISPO's weight clamped to [1, 1]) + dro_beta * k2(logp - old), unclamped.
        beta = config.policy_loss.dro_beta
        if beta is None or beta <= 0:
            raise ValueError("policy_loss.dro_beta must be a positive value when using DRO")
        return PolicyLossConfig(objective="cispo", clip_eps_low=0.0, clip_eps_high=0.0,
                                kl_coef=float(beta), kl_estimator="k2", kl_reference="old",
                                kl_clamp=None, **{**common, "log_ratio_clamp": None})
    if loss_mode == "kl_cov":
        # -A r (no clamp), plus ppo_kl_coef |log r| on the top kl_cov_ratio tokens by covariance.
        policy = config.policy_loss
        ratio = policy.kl_cov_ratio if policy.kl_cov_ratio is not None else 0.0002
        coef = policy.ppo_kl_coef if policy.ppo_kl_coef is not None else 1.0
        return PolicyLossConfig(objective="pg", cov_selection="kl_cov", cov_ratio=float(ratio),
                                cov_kl_coef=float(coef), **{**common, "log_ratio_clamp": None})
    # gpg: -A * logp, which is CISPO's objective at r = 1 (on-policy: no old log-probs).
    return PolicyLossConfig(objective="cispo", clip_eps_low=None, clip_eps_high=0.0, **common)


class _CoefficientLoss(torch.autograd.Function):
    """Loss from ``[B, T]`` log-probs with the hand-derived ``dL/dlogp`` saved in forward."""

    @staticmethod
    def forward(ctx, log_prob, old, advantages, valid, config, rollout_weight):
        logp = log_prob.detach().float()
        coef = policy_coefficients(logp, torch.zeros_like(logp), valid, advantages, old, None,
                                   None, config, rollout_weight=rollout_weight)
        ctx.save_for_backward(coef.c_logp)
        ctx.dtype = log_prob.dtype
        return coef.loss

    @staticmethod
    def backward(ctx, grad_loss):
        (c_logp,) = ctx.saved_tensors
        return (c_logp * grad_loss).to(ctx.dtype), None, None, None, None, None


def _metrics(loss_mode: str, log_prob: Tensor, old: Tensor, adv: Tensor, m: Tensor,
             config: Any, policy: PolicyLossConfig) -> dict[str, float]:
    """verl's metric names and definitions (masked token means)."""
    if loss_mode == "gpg":
        return {}
    with torch.no_grad():
        count = m.sum().clamp(min=1)

        def mean(x: Tensor) -> float:
            return float((x.float() * m).sum() / count)

        delta = log_prob.float() - old
        low, high = _clip_bounds(config)
        if loss_mode == "kl_cov":
            return {"actor/ppo_kl": mean(delta.abs())}
        if loss_mode == "dro":
            return {"actor/ppo_kl": mean(-delta)}
        ppo_kl = mean(-delta.clamp(-20, 20) if loss_mode in ("vanilla", "cispo", "sapo",
                                                              "dppo_tv", "dppo_kl")
                      else -delta)
        clipfrac = clipfrac_lower = 0.0
        if loss_mode in ("vanilla", "gspo"):
            if loss_mode == "gspo":
                seq = (delta * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)
                ratio = torch.exp(seq.clamp(max=10.0)).expand_as(delta)
            else:
                ratio = torch.exp(delta.clamp(-20, 20))
            l1, l2 = -adv * ratio, -adv * ratio.clamp(1 - low, 1 + high)
            clipfrac = mean(l2 > l1)
            if loss_mode == "vanilla":
                cap = -adv * float(config.get("clip_ratio_c", 3.0))
                clipfrac_lower = mean((torch.maximum(l1, l2) > cap) & (adv < 0))
        elif loss_mode == "cispo":
            ratio = torch.exp(delta.clamp(-20, 20))
            clipfrac = mean(ratio != ratio.clamp(1 - low, 1 + high))
        elif loss_mode in ("dppo_tv", "dppo_kl"):
            keep = dppo_keep(log_prob.float(), old, adv, policy)
            cap = float(config.get("clip_ratio_c", 20.0))
            clipfrac = mean(keep == 0)
            clipfrac_lower = mean((torch.exp(delta.clamp(-20, 20)) > cap) & (keep > 0))
        elif loss_mode == "geo_mean":
            clipped = delta != delta.clamp(-low, high)
            clipfrac, clipfrac_lower = mean(clipped & (adv > 0)), mean(clipped & (adv < 0))
    return {"actor/pg_clipfrac": clipfrac, "actor/ppo_kl": ppo_kl,
            "actor/pg_clipfrac_lower": clipfrac_lower}


def compute_policy_loss(loss_mode: str, old_log_prob: Tensor, log_prob: Tensor,
                        advantages: Tensor, response_mask: Tensor,
                        loss_agg_mode: str = "token-mean", config: Any = None,
                        rollout_is_weights: Tensor | None = None
                        ) -> tuple[Tensor, dict[str, float]]:
    """verl's ``loss_mode`` on verl's arguments: ``(pg_loss, metrics)``, differentiable in
    ``log_prob`` ``[B, T]``. ``rollout_is_weights`` (>= 0, detached) multiply the per-token
    policy loss; every mapped objective is positively homogeneous in A, so they scale the
    per-token policy loss (as the op's rollout-correction weights, so that batch statistics
    such as ``kl_cov``'s covariance see the plain advantages); for geo_mean their per-sequence
    geometric mean scales the sequence's loss, as verl does, folded into the advantages (GMPO
    is positively homogeneous in them)."""
    if config is None:
        raise ValueError("config (verl's ActorConfig) is required")
    if loss_mode == "dro" and rollout_is_weights is not None:
        _refuse("algorithm.rollout_correction (rollout_is_weights)", "given", "verl's dro "
                "multiplies its whole per-token loss, penalty included, by the rollout "
                "weights, rlhf_fast's rollout weights scale the policy term only",
                "Use verl's own 'dro' with rollout correction, or rollout_is=None.")
    mask = response_mask.bool()
    c = verl_policy_config(loss_mode, config, loss_agg_mode, mask)
    adv = advantages.float()
    old = old_log_prob.detach().float()
    weight = None
    if rollout_is_weights is not None:
        w = rollout_is_weights.detach().float()
        if loss_mode == "geo_mean":
            m = mask.float()
            adv = adv * torch.exp((torch.log(w + 1e-10) * m).sum(-1, keepdim=True)
                                  / (m.sum(-1, keepdim=True) + 1e-8))
        else:
            weight = w.expand_as(log_prob)
    loss = _CoefficientLoss.apply(log_prob, None if loss_mode == "gpg" else old, adv, mask, c,
                                  weight)
    return loss, _metrics(loss_mode, log_prob, old, advantages.float(), mask.float(), config, c)


def _policy_loss_fn(loss_mode: str):
    def fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
           config=None, rollout_is_weights=None):
        return compute_policy_loss(loss_mode, old_log_prob, log_prob, advantages,
                                   response_mask, loss_agg_mode, config, rollout_is_weights)

    fn.__name__ = f"rlhf_fast_{loss_mode}"
    fn.__doc__ = f"rlhf_fast's exact counterpart of verl's {loss_mode!r} policy loss."
    return fn


def fused_logprobs_and_entropy(hidden_states: Tensor, vocab_weights: Tensor,
                               input_ids: Tensor, temperature: float = 1.0
                               ) -> tuple[Tensor, Tensor]:
    """verl's ``FusedLinearForPPO`` contract: float32 log-probs and entropy of
    ``hidden_states @ vocab_weights.T / temperature`` at ``input_ids``, shaped like
    ``input_ids`` (``[B, T]`` or verl's unpadded ``[1, nnz]``), differentiable w.r.t. the
    hidden states and the weight (entropy included). Every token is its own row, so a chunk
    holds ``CHUNK_BUDGET_BYTES`` of logits whatever the packing."""
    shape = input_ids.shape
    hidden = hidden_states.reshape(-1, 1, hidden_states.shape[-1])
    if vocab_weights.dtype != hidden.dtype:  # autocast: the projection runs in hidden's dtype
        vocab_weights = vocab_weights.to(hidden.dtype)
    logp, entropy = linear_token_logprobs(hidden, vocab_weights, input_ids.reshape(-1, 1).long(),
                                          temperature=float(temperature), return_entropy=True)
    return logp.reshape(shape), entropy.reshape(shape)


def register() -> None:
    """Register the ``rlhf_fast_<mode>`` policy losses and the ``rlhf_fast`` fused-kernel
    backend with verl. Idempotent; nothing of verl's own changes behaviour."""
    from verl.trainer.ppo import core_algos

    for mode in LOSS_MODES:
        core_algos.POLICY_LOSS_REGISTRY.setdefault(f"rlhf_fast_{mode}", _policy_loss_fn(mode))
    _register_backend()


def _register_backend() -> None:
    from verl.models.transformers import monkey_patch
    from verl.utils.experimental import torch_functional
    from verl.workers.config import model as model_config

    base = torch_functional.FusedLinearForPPO
    if getattr(base, "_rlhf_fast", False):
        return

    class FusedLinearForPPO(base):
        """verl's fused head, plus ``impl_backend="rlhf_fast"``."""

        _rlhf_fast = True

        def __init__(self, chunk_size: int = 512, impl_backend: str = "torch"):
            super().__init__(chunk_size, "torch" if impl_backend == BACKEND else impl_backend)
            self.impl_backend = impl_backend

        def forward(self, hidden_states, vocab_weights, input_ids, temperature=1.0):
            if self.impl_backend == BACKEND:
                return fused_logprobs_and_entropy(hidden_states, vocab_weights, input_ids,
                                                  temperature)
            return super().forward(hidden_states, vocab_weights, input_ids, temperature)

    torch_functional.FusedLinearForPPO = FusedLinearForPPO

    patch = monkey_patch.patch_forward_with_backends

    def patch_forward_with_backends(model, use_fused_kernels=False,
                                    fused_kernels_backend=None):
        if fused_kernels_backend != BACKEND:
            return patch(model, use_fused_kernels, fused_kernels_backend)
        patch(model, use_fused_kernels, "torch")  # verl's fused forward, torch flavour ...
        model._verl_fused_kernels_backend = BACKEND  # ... whose head dispatches to us

    monkey_patch.patch_forward_with_backends = patch_forward_with_backends

    post_init = model_config.HFModelConfig.__post_init__

    def __post_init__(self):
        options = self.fused_kernel_options or {}
        if options.get("impl_backend") == BACKEND and not self.use_fused_kernels:
            object.__setattr__(self, "use_fused_kernels", True)  # the one key implies it
        post_init(self)

    model_config.HFModelConfig.__post_init__ = __post_init__


register()
