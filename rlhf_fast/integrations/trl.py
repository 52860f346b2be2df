"""TRL's ``GRPOTrainer`` and ``DPOTrainer`` with rlhf_fast's fused-linear losses.

Change one import and train as before::

    from rlhf_fast.integrations.trl import GRPOTrainer   # instead of: from trl import ...
    from rlhf_fast.integrations.trl import DPOTrainer

Why subclasses (and mixins for users who already subclass TRL's trainers): TRL >= 1.0 routes
every loss through ``compute_loss``, a public ``Trainer`` hook, and computes per-token
log-probs with a fused LM head it installs on ``model.forward`` (``add_fused_lm_head``,
``fused_lm_head=True``). The loss maths that follows is plain autograd on ``[B, T]``
tensors, with one branch per ``loss_type``. So this module overrides ``compute_loss`` only,
and installs a second forward hook in the same way: ``model(..., rlhf_fast_head=fn)`` runs the
backbone and hands its final hidden states and the output embedding to ``fn``, which calls
``linear_policy_loss`` / ``linear_dpo_loss``. The loss runs inside the (possibly wrapped:
DDP, FSDP, DeepSpeed) model's forward like TRL's own head, the ``[tokens, vocab]`` logits
never exist, and the gradients of the hidden states and the head are computed in the
forward. Everything else is TRL's: generation, rewards, advantages (``scale_rewards``,
``multi_objective_aggregation``), ``mask_truncated_completions`` (already in the completion
mask), the old / reference / vLLM log-probs and importance-sampling ratios, reference-model
syncing, logging, checkpoints. A monkey patch was rejected: it would change every trainer in
the process, and a subclass is what TRL's own documentation suggests for custom losses.

Settings: ``trl_config.grpo_policy_config`` / ``dpo_loss_arguments`` map them and raise
``UnsupportedSettingError`` (naming the TRL setting) at construction for any they cannot
reproduce exactly; the README's migration section has the table.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
import trl
from accelerate.utils import is_peft_model
from torch import Tensor

from ..loss_weights import top_entropy_mask
from ..ops.linear import linear_policy_loss
from ..ops.linear_dpo import linear_dpo_loss
from .errors import UnsupportedSettingError
from .trl_config import dpo_loss_arguments, grpo_entropy_coef, grpo_policy_config, grpo_step_config
from .trl_metrics import log_grpo_metrics

HEAD_KWARG = "rlhf_fast_head"
"""The forward keyword that runs the backbone and hands ``(hidden_states, lm_head)`` to a
callable instead of computing logits."""

_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes",
                    "token_type_ids", "mm_token_type_ids", "image_position_ids")


def install_head_hook(model: torch.nn.Module) -> None:
    """Let ``model(..., rlhf_fast_head=fn)`` return ``fn(last_hidden_state, lm_head)``.

    Without the keyword the forward is the previous one (TRL's fused head, generation), so
    this can be installed on a model TRL already patched. Idempotent. The backbone and the
    head are looked up on each call (FSDP and PEFT replace them after patching).
    """
    if getattr(model, "_rlhf_fast_head_hook", False):
        return
    previous = model.forward

    @functools.wraps(type(model).forward)  # generate() validates kwargs against it
    def forward(self, *args, **kwargs):
        head = kwargs.pop(HEAD_KWARG, None)
        if head is None:
            return previous(*args, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        return head(hidden, self.get_output_embeddings())

    model.forward = types.MethodType(forward, model)
    model._rlhf_fast_head_hook = True


def _head_tensors(hidden: Tensor, lm_head: torch.nn.Module, fp32: bool
                  ) -> tuple[Tensor, Tensor, Tensor | None]:
    """hidden, weight, bias in one dtype, as autocast would run the projection (bf16 hidden ->
    bf16 weight copy, differentiable back to the parameter), or all float32 with TRL's
    ``cast_lm_head_to_fp32``. FSDP2 DTensor heads are gathered, as TRL's head does."""
    weight, bias = lm_head.weight, lm_head.bias
    if hasattr(weight, "full_tensor"):
        weight = weight.full_tensor()
        bias = bias.full_tensor() if bias is not None else None
    dtype = torch.float32 if fp32 else hidden.dtype
    weight = weight.to(dtype)
    bias = bias.to(dtype) if bias is not None else None
    return hidden.to(dtype), weight, bias


def _gather_ctx(lm_head: torch.nn.Module):
    """DeepSpeed ZeRO-3 gathers the head for the fused op, as TRL does for its own."""
    gather = getattr(trl.trainer.utils, "maybe_gather_lm_head_ctx", None)
    return gather(lm_head.weight, lm_head.bias) if gather is not None else nullcontext()


def _run_head(model: torch.nn.Module, model_kwargs: dict, fp32: bool,
              loss_fn: Callable[[Tensor, Tensor, Tensor | None], Any]) -> Any:
    def head(hidden: Tensor, lm_head: torch.nn.Module) -> Any:
        with torch.autocast(hidden.device.type, enabled=False), _gather_ctx(lm_head):
            return loss_fn(*_head_tensors(hidden, lm_head, fp32))

    return model(**model_kwargs, **{HEAD_KWARG: head})


def _refuse_multimodal(inputs: dict) -> None:
    for key in _MULTIMODAL_KEYS:
        if inputs.get(key) is not None:
            raise UnsupportedSettingError("TRL", "input", key, "multimodal batches are not "
                                          "routed through the fused head")


def _hooked_model(trainer: Any) -> torch.nn.Module:
    return trainer.model.get_base_model() if is_peft_model(trainer.model) else trainer.model


class FusedGRPOMixin:
    """Put before ``trl.GRPOTrainer`` (or a subclass of it) in the bases: ``compute_loss`` runs
    ``linear_policy_loss`` on the completion's final hidden states (module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        grpo_policy_config(self)  # refuse unmappable settings before training starts
        install_head_hook(_hooked_model(self))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("The GRPOTrainer does not support returning outputs")
        _refuse_multimodal(inputs)
        completion_ids = inputs["completion_ids"]
        batch, length = completion_ids.shape
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        training = self.model.training
        config = grpo_step_config(self, float(mask.sum()), batch,
                                  inputs.get("num_items_in_batch"), training)
        advantages = inputs["advantages"]
        vllm_is = self.use_vllm and self.vllm_importance_sampling_correction
        if vllm_is and self.loss_type != "vespo":
            # rho >= 0 multiplies the policy term only: folded into A (trl_config docstring).
            advantages = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
            advantages = advantages * inputs["importance_sampling_ratio"]
            advantages = advantages.expand(batch, length)
        old = inputs.get("old_per_token_logps")
        ref = inputs["ref_per_token_logps"] if self.beta != 0.0 else None
        rollout = None
        if (vllm_is and self.loss_type == "vespo") or self.off_policy_mask_threshold is not None:
            # vLLM's log-probs: VESPO's rho and OPSM's behaviour policy (old ones without).
            rollout = inputs.get("sampling_per_token_logps")
            if rollout is not None and old is not None:
                rollout = torch.where(torch.isnan(rollout), old, rollout)  # TRL: rho = 1

        def loss_fn(hidden: Tensor, weight: Tensor, bias: Tensor | None):
            return linear_policy_loss(hidden[:, -length - 1:-1], weight, completion_ids,
                                      advantages, mask, bias=bias, old_logprobs=old,
                                      ref_logprobs=ref, rollout_logprobs=rollout,
                                      config=config)

        model_kwargs = {"input_ids": torch.cat([inputs["prompt_ids"], completion_ids], 1),
                        "attention_mask": torch.cat([inputs["prompt_mask"],
                                                     inputs["completion_mask"]], 1)}
        out = _run_head(model, model_kwargs, self.args.cast_lm_head_to_fp32, loss_fn)
        log_grpo_metrics(self, out, mask, inputs["advantages"], old, ref, rollout, config,
                         grpo_entropy_coef(self, training), training)
        if self.use_adaptive_entropy and training:
            self._step_adaptive_entropy(out.entropy, mask)
        if getattr(self, "_entropy_bonus_enabled", False) and training \
                and self.accelerator.sync_gradients:
            self._metrics["train"]["entropy_coef"].append(self.entropy_coef)
        return out.loss

    def _step_adaptive_entropy(self, entropy: Tensor, mask: Tensor) -> None:
        """TRL's entropy controller (``use_adaptive_entropy``): sum the window's entropy and
        token count; at the optimiser-step boundary, reduce them over processes, move
        ``entropy_coef`` by ``entropy_coef_delta`` towards ``entropy_target`` (within
        ``entropy_coef_min`` / ``_max``) and keep the window's entropy for the next step's
        gate. The tokens are those the bonus acts on: the valid ones, or under
        ``top_entropy_quantile`` the kept ones (the op's top-entropy mask, TRL's definition)."""
        m = mask.float()
        quantile = float(self.top_entropy_quantile)
        m = m * top_entropy_mask(entropy, m, quantile if quantile < 1.0 else None)
        stats = torch.stack([(entropy * m).sum(), m.sum()]).detach()
        window = self._entropy_window_stats
        self._entropy_window_stats = stats if window is None else window + stats
        if not self.accelerator.sync_gradients:
            return
        totals = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
        world = float(totals[0] / totals[1].clamp(min=1.0))
        args = self.args
        if world <= args.entropy_target:
            self.entropy_coef = min(self.entropy_coef + args.entropy_coef_delta,
                                    args.entropy_coef_max)
        else:
            self.entropy_coef = max(self.entropy_coef - args.entropy_coef_delta,
                                    args.entropy_coef_min)
        self._last_world_entropy = world
        self._entropy_window_stats = None


def _ld_sums_as_tokens(sums: Tensor, mask: Tensor, ld_alpha: float) -> Tensor:
    """Per-token reference log-probs ``[2B, T]`` whose LD-DPO-weighted sum (what the op forms
    with ``ld_alpha``) is TRL's LD-weighted reference sum ``[2B]``: each sequence's sum sits
    on its first valid token, whose weight is 1, or ld_alpha when its pair shares no token
    (TRL's sum is then ld_alpha times the tail: 0 when ld_alpha is 0)."""
    lengths = mask.sum(-1)
    half = lengths.shape[0] // 2
    shared = torch.minimum(lengths[:half], lengths[half:]).repeat(2)
    first_weight = torch.where(shared > 0, 1.0, ld_alpha).to(sums.dtype)
    value = torch.where(first_weight > 0, sums / first_weight.clamp(min=1e-30),
                        torch.zeros_like(sums))
    tokens = torch.zeros(mask.shape, dtype=sums.dtype, device=sums.device)
    rows = torch.arange(mask.shape[0], device=mask.device)
    tokens[rows, mask.float().argmax(-1)] = torch.where(lengths > 0, value, 0.0)
    return tokens


class FusedDPOMixin:
    """Put before ``trl.DPOTrainer`` (or a subclass of it) in the bases: ``compute_loss`` runs
    ``linear_dpo_loss`` on the policy's final hidden states; the reference sequence log-probs
    come from TRL's own no-grad pass (its fused head, PEFT adapters, or precomputed). The
    op weighs the loss types itself (``loss_weights``), and with ``use_weighting`` forms the
    WPO weights from its own sum_v p_v^2 per token (``dpo_loss_arguments``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        dpo_loss_arguments(self)  # refuse unmappable settings before training starts
        install_head_hook(_hooked_model(self))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise UnsupportedSettingError("TRL", "return_outputs", True, "the fused loss "
                                          "never builds the logits TRL would return")
        kwargs = dpo_loss_arguments(self)
        completion_mask = inputs["completion_mask"]
        if self.precompute_ref_logps:
            ref = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]])
        else:
            ref = torch.cat(self.compute_ref_log_probs(
                self.ref_model if self.ref_model is not None else model, inputs))
        targets = inputs["input_ids"][:, 1:]
        mask = completion_mask[:, 1:].bool()
        if "ld_alpha" in kwargs:
            ref = _ld_sums_as_tokens(ref.float(), mask, kwargs["ld_alpha"])
        # Columns where no sequence has a completion token need no GEMM: start at the first.
        first = int(mask.any(0).float().argmax()) if mask.any() else 0

        ref_logprobs = ref.float() if ref.dim() == 1 else ref[:, first:].float()

        def loss_fn(hidden: Tensor, weight_: Tensor, bias: Tensor | None):
            return linear_dpo_loss(hidden[:, first:-1], weight_, targets[:, first:],
                                   mask[:, first:], bias=bias, ref_logprobs=ref_logprobs,
                                   **kwargs)

        skip = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}
        model_kwargs = {k: v for k, v in inputs.items() if k not in skip}
        out = _run_head(model, model_kwargs, False, loss_fn)
        self._log_fused_dpo_metrics(out, inputs, self.model.training)
        return out.loss

    def _log_fused_dpo_metrics(self, out, inputs: dict, training: bool) -> None:
        mode = "train" if training else "eval"
        m = out.metrics
        pairs = m["pair_count"]
        names = {"rewards/chosen": "rewards_chosen", "rewards/rejected": "rewards_rejected",
                 "rewards/accuracies": "rewards_accuracy", "rewards/margins": "rewards_margin",
                 "logps/chosen": "logps_chosen", "logps/rejected": "logps_rejected"}
        local = torch.stack([m[k] * pairs for k in names.values()] + [pairs])
        totals = self.accelerator.reduce(local, reduction="sum")
        for name, total in zip(names, totals[:-1], strict=True):
            self._metrics[mode][name].append((total / totals[-1].clamp(min=1.0)).item())
        if training:
            tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum()
            self._total_train_tokens += int(tokens.item()) // getattr(self, "_tp_size", 1)
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]


class GRPOTrainer(FusedGRPOMixin, trl.GRPOTrainer):
    """``trl.GRPOTrainer`` with the fused-linear policy loss; same constructor."""


class DPOTrainer(FusedDPOMixin, trl.DPOTrainer):
    """``trl.DPOTrainer`` with the fused-linear preference loss; same constructor."""
