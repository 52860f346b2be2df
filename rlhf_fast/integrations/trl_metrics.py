"""The metrics TRL's ``GRPOTrainer._compute_loss`` logs, from the fused loss's outputs.

The fused op returns the per-token log-probs and entropy (detached, float32), which is all
TRL's metrics are made of: they are recomputed here with TRL 1.16's definitions, on TRL's
tensors (the raw advantages, not those the vLLM ratio was folded into):

- a global masked mean of x: over the valid tokens of all processes, or over all rows when
  x has one value per sequence (``importance_sampling_level="sequence"``, VESPO's phi);
- ``clip_ratio/low_mean``, ``/high_mean``, ``/region_mean``: tokens (or sequences) with
  r < 1 - epsilon and A < 0, r > 1 + epsilon_high and A > 0, either; ``clip_ratio/low_min``
  and ``/high_max``: the least / largest per-sequence mean over all processes (NaN rows,
  with no valid token, skipped);
- ``cispo_clip_ratio``: r > epsilon_high and A > 0; ``vespo/phi_seq_mean``: phi;
- ``kl``: k3 to the reference, times r (or s) with ``use_bias_correction_kl``; ``entropy``;
- with an entropy bonus: ``policy_loss`` (the loss before the bonus, per process, before
  the division by G for grpo / sapo / bnpo / dr_grpo / luspo), and ``entropy_coef`` at the
  optimiser-step boundary.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..config import PolicyLossConfig
from ..loss_weights import rollout_weights, top_entropy_mask, vespo_weights

PER_WINDOW_LOSS_TYPES = ("grpo", "sapo", "bnpo", "dr_grpo", "luspo")
"""TRL logs these loss types' ``policy_loss`` before dividing by the accumulation steps."""


def log_grpo_metrics(trainer: Any, out: Any, mask: Tensor, advantages: Tensor,
                     old: Tensor | None, ref: Tensor | None, rollout: Tensor | None,
                     config: PolicyLossConfig, entropy_coef: float, training: bool) -> None:
    """Append TRL's GRPO metrics for one micro-batch to ``trainer._metrics`` (module
    docstring) but ``entropy_coef`` (logged after the controller's step). ``advantages``:
    TRL's ``[B]`` or ``[B, T]``; old / ref / rollout: the log-probs handed to the op;
    ``config``: the op's config (VESPO's weights); ``entropy_coef``: the bonus coefficient
    the op applied (already divided by G)."""
    mode = "train" if training else "eval"
    m = mask.float()
    logp = out.logprobs.detach()
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    old_ = old.float() if old is not None else logp
    log_ratio = logp - old_
    if trainer.importance_sampling_level == "sequence":
        log_ratio = (log_ratio * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)
    ratio = torch.exp(log_ratio)

    means: dict[str, Tensor] = {"entropy": out.entropy}
    if ref is not None:
        diff = ref.float() - logp
        kl = torch.exp(diff) - diff - 1
        means["kl"] = kl * ratio if trainer.args.use_bias_correction_kl else kl
    loss_type = trainer.loss_type
    per_sequence = {}
    if loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        low = ((ratio < 1 - trainer.epsilon_low) & (adv < 0)).float()
        high = ((ratio > 1 + trainer.epsilon_high) & (adv > 0)).float()
        means.update({"clip_ratio/low_mean": low, "clip_ratio/high_mean": high,
                      "clip_ratio/region_mean": torch.maximum(low, high)})
        per_sequence = {"clip_ratio/low_min": (low, "min"), "clip_ratio/high_max": (high, "max")}
    elif loss_type == "cispo":
        means["cispo_clip_ratio"] = ((ratio > trainer.epsilon_high) & (adv > 0)).float()
    elif loss_type == "vespo":
        token_log_ratio = (logp - old_).clamp(-20.0, 20.0)
        weight = rollout_weights(old_, rollout, m, config)
        phi = vespo_weights(token_log_ratio, adv.expand_as(logp), m, weight, config)
        means["vespo/phi_seq_mean"] = phi[:, :1]

    sums, counts = [], []
    for x in means.values():
        if x.shape[1] == 1:
            sums.append(x.sum())
            counts.append(torch.tensor(float(x.shape[0]), device=x.device))
        else:
            sums.append((x * m).sum())
            counts.append(m.sum())
    totals = trainer.accelerator.reduce(torch.stack(sums + counts).float(), reduction="sum")
    n = len(means)
    for i, name in enumerate(means):
        trainer._metrics[mode][name].append((totals[i] / totals[n + i].clamp(min=1.0)).item())
    for name, (x, extreme) in per_sequence.items():
        seq = x.squeeze(1) if x.shape[1] == 1 else (x * m).sum(-1) / m.sum(-1)
        gathered = trainer.accelerator.gather(seq)
        kept = gathered[~torch.isnan(gathered)]
        value = (kept.min() if extreme == "min" else kept.max()).item() if kept.numel() \
            else float("nan")
        trainer._metrics[mode][name].append(value)

    if getattr(trainer, "_entropy_bonus_enabled", False):
        _log_policy_loss(trainer, out, m, entropy_coef, training, mode)


def _log_policy_loss(trainer: Any, out: Any, m: Tensor, entropy_coef: float, training: bool,
                     mode: str) -> None:
    """TRL's ``policy_loss``: the loss without the entropy bonus (which the op subtracted as
    ``entropy_coef`` times the token mean over the kept tokens)."""
    accumulation = trainer.current_gradient_accumulation_steps if training else 1
    quantile = float(trainer.top_entropy_quantile)
    kept = m * top_entropy_mask(out.entropy, m, quantile if quantile < 1.0 else None)
    entropy_mean = (out.entropy * kept).sum() / kept.sum().clamp(min=1.0)
    policy = out.loss.detach() + entropy_coef * entropy_mean
    if trainer.loss_type in PER_WINDOW_LOSS_TYPES:
        policy = policy * accumulation
    trainer._metrics[mode]["policy_loss"].append(
        trainer.accelerator.gather(policy).nanmean().item())
