"""PPO with a critic (Schulman et al. 2017; the RLHF recipe of Ziegler et al. 2019 and
Ouyang et al. 2022): four models, the actor, the critic, the reward and the frozen reference.
PPO-penalty (adaptive beta) and a TRPO-style trust region are presets of the same trainer.

    r_t  = -beta * KL_t  (+ R(x, y) on the last valid token)     KL_t = log pi_old - log pi_ref
    d_t  = r_t + gamma V(s_{t+1}) - V(s_t),   A_t = d_t + gamma lam A_{t+1},   R_t = A_t + V(s_t)
    L    = token-mean of -min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t)       (actor, ppo)
         + vf_coef * 1/2 token-mean of max((V - R)^2, (V_old + clip(V - V_old, +-c) - R)^2)
    rho_t = pi_theta / pi_old

Line by line in this trainer:

- pi_old samples y: ``Trainer.rollout``; R(x, y): the reward functions or a ``RewardModel``
  (a local ``AutoModelForSequenceClassification``), summed with weights;
- log pi_old, log pi_ref: ``prepare_logprobs`` through ``linear_token_logprobs`` (no logits);
  V_old: the critic on the same rows (``critic.py``: a value head on a backbone);
- r_t: ``kl_penalized_rewards`` (``kl_placement="reward"``), or only R on the last token and
  ``beta * KL`` as a term of the loss (``kl_placement="loss"``, the loss's ``kl_coef``);
- A_t, R_t: ``rlhf_fast.gae.gae`` (the kernel on CUDA), then ``masked_whiten`` of A over the
  whole batch's valid tokens (gathered through ``BatchStatistics``);
- the actor's term: ``linear_policy_loss`` on the backbone's hidden states (the ``ppo``
  preset; dual clip ``dual_clip_c`` and the entropy bonus ``entropy_coef`` are fields of the
  loss config); the critic's: ``rlhf_fast.value.value_loss`` with the same aggregation and
  the same global normaliser, so micro-batches add up exactly;
- ``epochs`` passes over shuffled mini-batches, each one optimiser step of both models.

KL control (``kl_controller``): ``fixed``, ``adaptive`` (the PPO paper's rule: halve beta when
the measured KL < target / 1.5, double it above 1.5 * target) or ``proportional`` (Ziegler et
al.). It steers the loss's penalty towards the old policy when the loss has one (PPO-penalty,
TRPO: measured after the update, ``ppo/kl_old``), else the reference KL's beta (measured on
the rollout, ``ppo/kl_ref``, or by the loss in ``kl_placement="loss"``). Measured KLs are
token means of the k3 estimator (non-negative, unbiased). Its state is checkpointed.

Presets (registry names): ``ppo`` (clip 0.2, KL to the reference in the reward, beta 0.05
fixed); ``ppo_penalty`` (the PPO paper's KL-penalty objective: rho A - beta KL(old || pi),
no clip, adaptive beta with target 0.01); ``trpo`` (the same penalty and controller, and the
trust region as a hard bound: the epoch loop stops before any optimiser step whose
mini-batch has already moved more than ``kl_stop`` = 0.015 from pi_old, as Stable-Baselines3's
``target_kl``).

Deviations: TRPO proper takes one natural-gradient step with a line search; here the
penalty form plus the early stop stands for it (the paper's own practical variant). The
measured KLs are sampled estimates, not full-vocabulary KLs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from ..advantages import masked_whiten
from ..config import PolicyLossConfig
from ..gae import gae
from ..kl_control import (
    AdaptiveKLController,
    FixedKLController,
    ProportionalKLController,
    kl_penalized_rewards,
    token_kl,
)
from ..value import value_loss
from .batch import RolloutBatch
from .config import TrainerConfig
from .core import Trainer
from .critic import CRITIC_FILE, Critic
from .losses import micro_batch_loss, sequence_logprobs

KL_CONTROLLERS = ("fixed", "adaptive", "proportional")


@dataclass(frozen=True)
class PPOConfig(TrainerConfig):
    """PPO with a critic; PPO-penalty and TRPO-style presets."""

    loss: PolicyLossConfig = field(default_factory=lambda: PolicyLossConfig.preset("ppo"))
    """The actor's loss: ``ppo`` (clip 0.2, token mean) or ``ppo_penalty`` (rho A - beta
    KL(old || pi), k3). Dual clip: ``dual_clip_c``; entropy bonus: ``entropy_coef``."""

    epochs: int = 4
    """Passes over each rollout batch (TRL's ``num_ppo_epochs``)."""

    critic: str = "separate"
    """``separate``: the critic has its own backbone (a copy of the starting policy's, or
    ``critic_model``); ``shared``: a value head on the policy's backbone."""

    critic_lr: float | None = None
    """Learning rate of the critic's AdamW; None: 10 x ``lr`` (verl's 1e-5 against 1e-6)."""

    vf_coef: float = 0.1
    """Weight of the value loss (TRL's 0.1). With a separate critic it only scales the
    critic's gradient; with a shared backbone it weighs the two losses on the backbone."""

    value_clip: float | None = 0.2
    """c of the clipped value loss, around the rollout's values (TRL 0.2, verl 0.5); None:
    plain squared error."""

    gamma: float = 1.0
    """Discount of GAE (1 in every LLM framework)."""

    lam: float = 0.95
    """lambda of GAE (TRL 0.95; verl 1)."""

    whiten_advantages: bool = True
    """Whiten the GAE advantages over the batch's valid tokens (mean 0, variance 1)."""

    kl_coef: float = 0.05
    """beta of the KL to the reference (TRL's 0.05); 0: no reference model at all. Its
    starting value when ``kl_controller`` steers it."""

    kl_placement: str = "reward"
    """``reward``: -beta * KL_t in every token's reward (the RLHF recipe); ``loss``: only the
    score in the rewards and beta * KL as a term of the loss (GRPO's placement)."""

    kl_estimator: str | None = None
    """Estimator of the reference KL: ``k1``, ``k2``, ``k3``; None: k1 in the reward (TRL,
    OpenRLHF), k3 in the loss (k1's gradient vanishes in expectation as a loss term)."""

    kl_controller: str = "fixed"
    """``fixed``, ``adaptive`` (halve / double around ``kl_target``) or ``proportional``
    (Ziegler et al.). Steers the loss's KL to the old policy when there is one, else the
    reference KL's beta."""

    kl_target: float = 0.01
    """Target of the controller: mean KL per token (the PPO paper's d_targ)."""

    kl_horizon: float = 10_000.0
    """Horizon of the proportional controller, in completions."""

    kl_stop: float | None = None
    """TRPO-style bound: the update stops before an optimiser step whose mini-batch's KL(old
    || pi) (token mean, k3, measured in its forward pass) exceeds it. None: no bound."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, value, choices in (("critic", self.critic, ("separate", "shared")),
                                     ("kl_placement", self.kl_placement, ("reward", "loss")),
                                     ("kl_controller", self.kl_controller, KL_CONTROLLERS)):
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        if self.kl_estimator not in (None, "k1", "k2", "k3"):
            raise ValueError(f"kl_estimator must be None, k1, k2 or k3, got "
                             f"{self.kl_estimator!r}")
        for name in ("gamma", "lam"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        for name in ("critic_lr", "value_clip", "kl_stop"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be None or > 0, got {value}")
        if not self.kl_target > 0 or not self.kl_horizon > 0:
            raise ValueError(f"kl_target and kl_horizon must be > 0, got {self.kl_target}, "
                             f"{self.kl_horizon}")
        if self.vf_coef < 0 or self.kl_coef < 0:
            raise ValueError(f"vf_coef and kl_coef must be >= 0, got {self.vf_coef}, "
                             f"{self.kl_coef}")
        loss = self.loss
        if loss.kl.coef != 0 and loss.kl.reference == "ref":
            raise ValueError("the reference KL of PPO is set by kl_coef (and kl_placement), "
                             "not by the loss's kl_coef: leave loss.kl_coef = 0 or use "
                             "kl_reference='old' (PPO-penalty)")
        if self.kl_placement == "loss" and self.kl_coef != 0 and loss.kl.coef != 0:
            raise ValueError("the loss holds one KL term and it penalises KL(old || pi) here "
                             "(PPO-penalty / TRPO): put the reference KL in the reward "
                             "(kl_placement='reward') or set kl_coef=0")

    @property
    def penalizes_old(self) -> bool:
        """The loss penalises KL(old || pi) (PPO-penalty, TRPO)."""
        return self.loss.kl.reference == "old" and self.loss.kl.coef != 0

    @property
    def reference_estimator(self) -> str:
        if self.kl_estimator is not None:
            return self.kl_estimator
        return "k1" if self.kl_placement == "reward" else "k3"


def make_kl_controller(kind: str, value: float, target: float, horizon: float):
    """The controller ``kind`` starting at ``value``."""
    if kind == "fixed":
        return FixedKLController(value)
    if kind == "adaptive":
        return AdaptiveKLController(value, target)
    return ProportionalKLController(value, target, horizon)


class PPOTrainer(Trainer):
    """Actor-critic PPO; see the module docstring. ``critic_model``: the separate critic's
    starting model (default: a copy of the policy's backbone with a zero value head)."""

    config_class = PPOConfig

    def __init__(self, model, tokenizer, prompts, reward_functions,
                 config: PPOConfig | None = None, *, critic_model=None, **kwargs):
        super().__init__(model, tokenizer, prompts, reward_functions, config, **kwargs)
        c = self.config
        self.critic = Critic.build(self.policy, critic_model, shared=c.critic == "shared")
        if c.gradient_checkpointing:
            self.critic.enable_gradient_checkpointing()
        self.critic_parameters = [p for p in self.critic.parameters() if p.requires_grad]
        self.critic_optimizer = torch.optim.AdamW(
            self.critic_parameters, lr=c.critic_lr if c.critic_lr is not None else 10 * c.lr,
            betas=c.adam_betas, weight_decay=c.weight_decay)
        self.critic_scheduler = torch.optim.lr_scheduler.LambdaLR(self.critic_optimizer,
                                                                  self._lr_factor)
        start = c.loss.kl.coef if c.penalizes_old else c.kl_coef
        self.kl_controller = make_kl_controller(c.kl_controller, start, c.kl_target,
                                                c.kl_horizon)
        self.critic_parts: list[dict] = []
        self.optimizer_steps = 0
        self.rollout_kl = 0.0

    # --- which log-probs a step needs ------------------------------------------------------

    @property
    def needs_reference(self) -> bool:
        return self.config.kl_coef != 0 or super().needs_reference

    @property
    def needs_old_logprobs(self) -> bool:
        c = self.config
        in_reward = c.kl_coef != 0 and c.kl_placement == "reward"
        return in_reward or c.kl_stop is not None or super().needs_old_logprobs

    @property
    def reference_beta(self) -> float:
        """beta of the reference KL now (the controller's value when it steers it)."""
        c = self.config
        return c.kl_coef if c.penalizes_old else self.kl_controller.value

    # --- 2. log-probs and values -----------------------------------------------------------

    @torch.no_grad()
    def prepare_logprobs(self, batch: RolloutBatch) -> None:
        """Old and reference log-probs as in the core, and the critic's values ``[B, T]``;
        a shared critic reads the hidden states of the old log-probs' pass."""
        c = self.config
        if not self.critic.shared:
            super().prepare_logprobs(batch)
            values = [self.critic.values(m).cpu() for m in batch.split(c.micro)]
            batch.values = torch.cat(values) * batch.loss_mask
            return
        olds, values, refs = [], [], []
        with self._model_mode(train=False):
            for m in batch.split(c.micro):
                hidden = self.policy.completion_hidden(m)                      # [b, T, H]
                values.append(self.critic.values(m, hidden).cpu())
                if self.needs_old_logprobs:
                    olds.append(sequence_logprobs(self.policy, m, c.temperature,
                                                  mode=c.loss_impl, backend=c.backend,
                                                  hidden=hidden).cpu())
                if self.reference is not None:
                    refs.append(sequence_logprobs(self.reference, m, c.temperature,
                                                  mode=c.loss_impl, backend=c.backend).cpu())
        batch.values = torch.cat(values) * batch.loss_mask
        batch.old_logprobs = torch.cat(olds) if olds else None
        batch.ref_logprobs = torch.cat(refs) if refs else None

    # --- 3. rewards per token, GAE, whitening --------------------------------------------

    def compute_advantages(self, batch: RolloutBatch) -> None:
        c, stats = self.config, self.statistics
        mask = batch.loss_mask                                                 # [B, T]
        zeros = torch.zeros(mask.shape)
        old = batch.old_logprobs if batch.old_logprobs is not None else batch.sampler_logprobs
        ref = batch.ref_logprobs
        # Measured (controller, metrics) with k3: non-negative and unbiased, whatever the
        # penalty's estimator (k1's token mean can come out negative).
        kl = token_kl(old, ref, "k3") * mask if ref is not None else zeros
        # r_t = -beta KL_t on every token (reward placement), + R on the last valid token
        beta = self.reference_beta if c.kl_placement == "reward" and ref is not None else 0.0
        rewards, _ = kl_penalized_rewards(batch.rewards, old, ref if ref is not None else old,
                                          mask, beta, estimator=c.reference_estimator)
        # A_t = sum_l (gamma lam)^l d_{t+l},  R_t = A_t + V_t  (masked tokens transparent),
        # on the policy's device (the Triton kernel on CUDA)
        device = self.policy.weight.device
        advantages, returns = gae(rewards.to(device), batch.values.to(device),
                                  mask.to(device), c.gamma, c.lam, backend=c.backend)
        if c.whiten_advantages:
            advantages = stats.local(masked_whiten(stats.gather(advantages),
                                                   stats.gather(mask.to(device))))
        batch.advantages, batch.returns = advantages.cpu(), returns.cpu()
        self.rollout_kl = stats.mean(kl[mask])             # token mean of KL(old || ref)
        self.rollout_kl_sequence = stats.mean(kl.sum(-1))

    # --- 4. update: actor + critic per micro-batch -----------------------------------------

    def loss_config_for(self, mini_batch: RolloutBatch) -> PolicyLossConfig:
        c = self.config
        config = super().loss_config_for(mini_batch)
        if c.penalizes_old:
            return config.replace(kl_coef=self.kl_controller.value)
        if c.kl_placement == "loss" and c.kl_coef != 0:
            return config.replace(kl_coef=self.reference_beta, kl_reference="ref",
                                  kl_estimator=c.reference_estimator)
        return config

    def micro_batch_losses(self, micro: RolloutBatch, config: PolicyLossConfig):
        """The actor's loss and ``vf_coef`` x the critic's clipped value loss, aggregated
        with the actor's normaliser; a shared critic reads the actor's hidden states."""
        c = self.config
        hidden = self.policy.completion_hidden(micro) if self.critic.shared else None
        # The reference's log-probs feed the loss only when its KL term is to the reference
        # (else they are in the rewards already; the op refuses ignored inputs).
        actor_rows = micro if config.kl.reference == "ref" else replace(micro, ref_logprobs=None)
        out = micro_batch_loss(self.policy, actor_rows, config, mode=c.loss_impl,
                               backend=c.backend, hidden=hidden)
        values = self.critic.values(micro, hidden)                             # [b, T]
        device = values.device
        mask = micro.loss_mask.to(device)
        critic = value_loss(values, micro.values.to(device), micro.returns.to(device), mask,
                            clip=c.value_clip, aggregation=config.aggregation.mode,
                            normalizer=config.aggregation.normalizer,
                            max_length=config.aggregation.max_length)
        m = mask.double()
        tokens = m.sum().cpu()
        part = {"value_loss": critic.loss.detach().double().cpu(),
                "clip_frac": critic.clip_frac.double().cpu(), "tokens": tokens,
                "value_mean": ((values.detach().double() * m).sum() / tokens.clamp(min=1)).cpu(),
                "approx_kl": torch.zeros((), dtype=torch.float64)}
        if micro.old_logprobs is not None:
            # KL(old || pi) sampled from old, k3 with x = pi / pi_old (>= 0, unbiased)
            log_x = (out.logprobs.detach().double() - micro.old_logprobs.to(device).double())
            log_x = log_x.clamp(-20, 20)
            k3 = (torch.exp(log_x) - 1 - log_x) * m
            part["approx_kl"] = (k3.sum() / m.sum().clamp(min=1)).cpu()
        self.critic_parts.append(part)
        return out, c.vf_coef * critic.loss

    def backward(self, mini_batch: RolloutBatch) -> dict[str, float]:
        self.critic_optimizer.zero_grad(set_to_none=True)
        self.critic_parts = []
        critic_mode = Trainer._Mode(self.critic, self.config.gradient_checkpointing)
        with critic_mode:
            metrics = super().backward(mini_batch)
        stats, parts = self.statistics, self.critic_parts
        counts = torch.stack([p["tokens"] for p in parts])
        # Each rank's micro-batch losses share the global normaliser times world_scale.
        metrics["critic/value_loss"] = float(stats.all_reduce_sum(
            torch.stack([p["value_loss"] for p in parts]).sum())) * stats.world_scale
        for key in ("clip_frac", "value_mean"):
            metrics[f"critic/{key}"] = stats.mean(torch.stack([p[key] for p in parts]), counts)
        metrics["ppo/approx_kl"] = stats.mean(torch.stack([p["approx_kl"] for p in parts]),
                                              counts)
        return metrics

    def stop_update(self, metrics: dict[str, float]) -> bool:
        bound = self.config.kl_stop
        return bound is not None and metrics["ppo/approx_kl"] > bound

    def reduce_critic_gradients(self) -> None:
        """Data-parallel: average the critic's accumulated gradients over the ranks (DDP /
        FSDP2 wrap the policy only; the critic is a replica on every rank), in one
        all-reduce. Each rank's value loss carries ``1 / world_scale`` as the actor's does,
        so the average is the global batch's gradient. Nothing on one process."""
        stats = self.statistics
        if self.world_size == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p)
                 for p in self.critic_parameters]
        flat = stats.all_reduce_sum(torch.cat([g.reshape(-1).float() for g in grads]))
        flat = flat * stats.world_scale
        offset = 0
        for p, g in zip(self.critic_parameters, grads, strict=True):
            p.grad = flat[offset:offset + g.numel()].view_as(g).to(g.dtype)
            offset += g.numel()

    def apply_gradients(self) -> dict[str, float]:
        metrics = super().apply_gradients()
        self.reduce_critic_gradients()
        max_norm = self.config.max_grad_norm
        norm = torch.nn.utils.clip_grad_norm_(
            self.critic_parameters, max_norm if max_norm is not None else float("inf"))
        metrics["critic/grad_norm"] = float(norm)
        metrics["critic/lr"] = self.critic_optimizer.param_groups[0]["lr"]
        self.critic_optimizer.step()
        self.critic_scheduler.step()
        self.optimizer_steps += 1
        return metrics

    def update(self, batch: RolloutBatch) -> dict[str, float]:
        c = self.config
        self.optimizer_steps = 0
        metrics = super().update(batch)
        mini = self.local_mini_batch_size
        planned = c.epochs * (batch.size // mini + (batch.size % mini > 0))
        metrics["ppo/optimizer_steps"] = float(self.optimizer_steps)
        metrics["ppo/early_stop"] = float(self.optimizer_steps < planned)
        if c.penalizes_old:
            metrics["ppo/kl_old"] = self.kl_to_old(batch)
        return metrics

    @torch.no_grad()
    def kl_to_old(self, batch: RolloutBatch) -> float:
        """Token mean of KL(old || pi) after the update (k3 on the rollout's tokens): the
        adaptive penalty's measured d."""
        c = self.config
        with self._model_mode(train=False):
            new = torch.cat([sequence_logprobs(self.policy, m, c.temperature,
                                               mode=c.loss_impl, backend=c.backend).cpu()
                             for m in batch.split(c.micro)])
        kl = token_kl(batch.old_logprobs, new, "k3")          # log x = new - old
        return self.statistics.mean(kl[batch.loss_mask])

    # --- after the step: the KL controller, metrics, state -------------------------------

    def after_step(self, batch: RolloutBatch, metrics: dict) -> dict[str, float]:
        c = self.config
        beta = self.kl_controller.value
        if c.penalizes_old:
            measured = metrics["ppo/kl_old"]
        elif c.kl_placement == "loss":
            measured = metrics["policy/kl"]
        else:
            measured = self.rollout_kl
        self.kl_controller.update(measured, batch.size)
        return {"ppo/kl_coef": beta, "ppo/kl_measured": measured,
                "ppo/kl_ref": self.rollout_kl, "ppo/kl_ref_sequence": self.rollout_kl_sequence}

    def batch_metrics(self, batch: RolloutBatch) -> dict[str, float]:
        out = super().batch_metrics(batch)
        stats, mask = self.statistics, batch.loss_mask
        returns, values = batch.returns[mask], batch.values[mask]
        var_returns = stats.mean(returns**2) - stats.mean(returns) ** 2
        error = returns - values
        var_error = stats.mean(error**2) - stats.mean(error) ** 2
        # 1 - Var(R - V) / Var(R): 1 = the critic predicts the returns, 0 = no better than
        # their mean, < 0 = worse.
        out["critic/explained_variance"] = (1.0 - var_error / var_returns
                                            if var_returns > 0 else 0.0)
        out["critic/return_mean"] = stats.mean(returns)
        return out

    def extra_state(self) -> dict:
        return {"kl_controller": asdict(self.kl_controller),
                "critic_optimizer": self.critic_optimizer.state_dict(),
                "critic_scheduler": self.critic_scheduler.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        for key, value in state["kl_controller"].items():
            setattr(self.kl_controller, key, value)
        self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        self.critic_scheduler.load_state_dict(state["critic_scheduler"])

    def save_files(self, path: Path) -> None:
        """``critic.safetensors`` next to the core's checkpoint (the value head, and the
        critic's backbone when separate; single-process or data-parallel)."""
        self.critic.save(Path(path) / CRITIC_FILE)

    def load_files(self, path: Path) -> None:
        self.critic.load(Path(path) / CRITIC_FILE)
