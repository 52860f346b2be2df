"""The trainer core: rollout -> score -> advantages -> update, shared by every algorithm.

One ``Trainer.step()`` is, in order:

1. ``collect``: sample ``batch_size / group_size`` prompts, ``rollout`` G completions of each
   through the ``Generator`` (sampler log-probs kept), ``score`` them with the reward
   functions (``shape_rewards`` hook: DAPO's overlong penalty);
2. ``prepare_logprobs``: old-policy log-probs (only when the update runs several epochs or
   mini-batches, or the algorithm reads them) and reference log-probs (only when a KL term
   needs them), through ``linear_token_logprobs``;
3. ``compute_advantages``: the algorithm's estimator, from ``rlhf_fast.advantages``;
4. ``update``: epochs x mini-batches; each mini-batch is one optimiser step whose loss
   normaliser is the mini-batch's global count, and whose micro-batches each call
   ``linear_policy_loss`` on the backbone's final hidden states and ``lm_head.weight``.

Seams for the trainers that build on this one:

- generation: ``Generator`` (``generation.py``); a multi-turn rollout overrides ``rollout``
  and builds rows with ``RolloutBatch.from_trajectories`` (inserted segments get loss mask
  0);
- the batch: ``RolloutBatch`` fields (``batch.py``), ``loss_mask`` separate from
  ``attention_mask``;
- statistics: ``self.statistics`` (``BatchStatistics``), the one place for normalisers,
  gathered advantage inputs and logged means (a distributed subclass all-reduces);
- the loss: ``loss_config_for(mini_batch)``, ``micro_batch_losses(micro, config)`` (a critic
  adds its value loss there) and ``backward(mini_batch)``; ``apply_gradients`` (a second
  optimiser steps there) and ``stop_update`` (a KL bound ends the epoch loop);
- checkpoint state: ``extra_state`` / ``load_extra_state`` (KL controllers, counters),
  ``save_files`` / ``load_files`` (files beside the model: a critic's weights);
- metrics: the keys in ``metrics.py``, algorithm keys under the algorithm's name.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from ..config import PolicyLossConfig
from ..ops.policy_loss import PolicyLossOutput
from .batch import RolloutBatch, Segment, Trajectory
from .checkpoint import (
    MODEL_DIR,
    STATE_FILE,
    load_model_weights,
    rng_state,
    save_model,
    set_rng_state,
)
from .config import TrainerConfig
from .generation import Generator, HFGenerator, SamplingParams
from .losses import micro_batch_loss, sequence_logprobs
from .metrics import MetricsLog
from .policy import Policy, ReferencePolicy, disable_dropout, enable_gradient_checkpointing
from .rewards import call_reward, normalize_reward_functions
from .statistics import BatchStatistics

POLICY_METRICS = ("clip_frac_low", "clip_frac_high", "clip_frac_dual", "kl_mean",
                  "entropy_mean", "ratio_mean")


def prompt_rows(prompts: Sequence[str | Mapping]) -> list[dict]:
    """Each prompt as a dict with a ``"prompt"`` string (plus dataset columns)."""
    rows = []
    for i, p in enumerate(prompts):
        row = {"prompt": p} if isinstance(p, str) else dict(p)
        if not isinstance(row.get("prompt"), str):
            raise TypeError(f"prompt {i} must be a string or a dict with a 'prompt' string, "
                            f"got {p!r}")
        rows.append(row)
    if not rows:
        raise ValueError("prompts is empty")
    return rows


class Trainer:
    """Base of every critic-free trainer; subclasses implement ``compute_advantages``.

    Args:
        model: a Hugging Face causal LM (or a PEFT model around one). It is trained in place.
        tokenizer: its tokenizer (left padding is set).
        prompts: strings, or dicts with a ``"prompt"`` string and columns handed to the
            reward functions (e.g. ``"answer"``); sampled with replacement, seeded.
        reward_functions: a callable, a list of callables or ``{name: fn or (fn, weight)}``
            (``rewards.py``); a ``RewardModel`` is one such callable.
        config: the algorithm's config (``config_class``).
        eval_prompts: held-out prompts for ``evaluate`` (greedy decoding).
        accuracy_reward: the reward name whose held-out mean is logged as
            ``eval/accuracy``.
        reference_model: an explicit reference model (default: a frozen copy of ``model``
            at the start, or the PEFT model with its adapter disabled).
        generator: a ``Generator`` (default: ``HFGenerator`` on ``model``).
        statistics: a ``BatchStatistics`` (default: single process).
        out_dir: where metrics, the curves PNG and checkpoints go (None: nowhere).
        progress: show a progress bar on stderr.
    """

    config_class: type[TrainerConfig] = TrainerConfig

    is_main_process: bool = True
    """Whether this process writes the metrics log, the curves and the progress bar (under
    torchrun: rank 0 only; every rank still calls ``save``)."""

    rank: int = 0
    """This process's data-parallel rank (0 outside torchrun)."""

    world_size: int = 1
    """Data-parallel processes (1 outside torchrun); a ``DataParallelTrainer`` sets both."""

    def __init__(self, model, tokenizer, prompts, reward_functions,
                 config: TrainerConfig | None = None, *, eval_prompts=None,
                 accuracy_reward: str | None = None, reference_model=None,
                 generator: Generator | None = None,
                 statistics: BatchStatistics | None = None,
                 out_dir: str | Path | None = None, progress: bool = False):
        config = config if config is not None else self.config_class()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} takes a {self.config_class.__name__}, got "
                            f"{type(config).__name__}")
        self.config = c = config
        self.tokenizer = tokenizer
        tokenizer.padding_side = "left"
        disable_dropout(model)
        self.policy = Policy(model)
        if c.gradient_checkpointing:
            enable_gradient_checkpointing(self.policy.causal_lm)
        self.reward_functions = normalize_reward_functions(reward_functions)
        if accuracy_reward is not None and accuracy_reward not in self.reward_functions:
            raise ValueError(f"accuracy_reward {accuracy_reward!r} is not one of the reward "
                             f"functions {sorted(self.reward_functions)}")
        self.accuracy_reward = accuracy_reward
        self.prompts = prompt_rows(prompts)
        self.prompt_ids = [self._prompt_ids(r["prompt"]) for r in self.prompts]
        self.eval_prompts = prompt_rows(eval_prompts) if eval_prompts is not None else None
        if self.eval_prompts is not None:
            for r in self.eval_prompts:
                self._prompt_ids(r["prompt"])
        self.loss_config = self._loss_config(c.loss)
        self.statistics = statistics or BatchStatistics()
        self.generator = generator or HFGenerator(model, tokenizer,
                                                  batch_size=c.generation_batch_size)
        self.reference = (ReferencePolicy(self.policy, reference_model)
                          if self.needs_reference else None)
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        if not self.parameters:
            raise ValueError("the model has no trainable parameters")
        self.optimizer = torch.optim.AdamW(self.parameters, lr=c.lr, betas=c.adam_betas,
                                           weight_decay=c.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.step_count = 0
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.progress = progress
        torch.manual_seed(c.seed)                       # sampling uses the global RNG
        self.prompt_rng = torch.Generator().manual_seed(c.seed)
        self.shuffle_rng = torch.Generator().manual_seed(c.seed + 1)

    # --- set-up ---------------------------------------------------------------------------

    def _prompt_ids(self, text: str) -> list[int]:
        ids = self.tokenizer(text)["input_ids"]
        if not ids:
            raise ValueError(f"prompt {text!r} encodes to no tokens")
        context = getattr(self.policy.causal_lm.config, "max_position_embeddings", None)
        if context is not None and len(ids) + self.config.max_new_tokens > context:
            raise ValueError(
                f"prompt {text[:40]!r} has {len(ids)} tokens; with max_new_tokens="
                f"{self.config.max_new_tokens} that is {len(ids) + self.config.max_new_tokens}"
                f" > the model's context of {context} (max_position_embeddings)")
        return ids

    def _loss_config(self, loss: PolicyLossConfig) -> PolicyLossConfig:
        """The loss at the sampling temperature; Dr. GRPO's constant is the generation
        budget."""
        overrides: dict = {"temperature": self.config.temperature}
        agg = loss.aggregation
        if agg.mode == "seq_mean_token_sum_norm" and agg.max_length is None:
            overrides["max_length"] = self.config.max_new_tokens
        if (loss.entropy.advantage_alpha is not None or loss.entropy.top_quantile is not None) \
                and self.config.micro < self.config.mini:
            raise ValueError("entropy_advantage_alpha / top_entropy_quantile take batch "
                             "entropy statistics inside one loss call: set micro_batch_size = "
                             "mini_batch_size")
        return loss.replace(**overrides)

    @property
    def needs_reference(self) -> bool:
        """A reference model is built only when a KL term reads its log-probs."""
        loss = self.config.loss
        return loss.kl.coef != 0 and loss.kl.reference == "ref"

    @property
    def needs_old_logprobs(self) -> bool:
        """Old log-probs are computed only when the ratio can differ from 1 (several
        optimiser steps per rollout) or something else reads them."""
        c = self.config
        return (c.epochs > 1 or c.mini < c.batch_size or c.loss.kl.reference == "old"
                or c.loss.rollout.mode is not None)

    def _lr_factor(self, step: int) -> float:
        c = self.config
        total = c.steps * c.epochs * (c.batch_size // c.mini)
        if step < c.warmup_steps:
            return (step + 1) / (c.warmup_steps + 1)
        if c.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - c.warmup_steps) / max(1, total - c.warmup_steps))
        if c.lr_schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    # --- 1. rollout and score -------------------------------------------------------------

    def sample_prompts(self, n: int) -> list[int]:
        """Indices of ``n`` prompts, drawn with replacement from the seeded generator."""
        return torch.randint(len(self.prompts), (n,), generator=self.prompt_rng).tolist()

    def rollout(self, indices: Sequence[int], rows: Sequence[dict] | None = None,
                group_size: int | None = None,
                sampling: SamplingParams | None = None) -> RolloutBatch:
        """``group_size`` completions of each prompt (``rows`` default to the training
        prompts), as one batch whose groups are consecutive rows."""
        rows = self.prompts if rows is None else rows
        group = group_size or self.config.group_size
        sampling = sampling or self.config.sampling
        prefixes = [self.prompt_ids[i] if rows is self.prompts
                    else self._prompt_ids(rows[i]["prompt"])
                    for i in indices for _ in range(group)]
        completions = self.generator.generate(prefixes, sampling)
        trajectories = [Trajectory(p, [Segment(c.ids, c.logprobs)], c.finish_reason != "length")
                        for p, c in zip(prefixes, completions, strict=True)]
        picked = [rows[i] for i in indices for _ in range(group)]
        columns = {k: [r[k] for r in picked] for k in picked[0] if k != "prompt"}
        texts = self.tokenizer.batch_decode([c.ids for c in completions],
                                            skip_special_tokens=True)
        pad_id = self.tokenizer.pad_token_id
        return RolloutBatch.from_trajectories(
            trajectories, pad_id=pad_id if pad_id is not None else 0, group_size=group,
            prompts=[r["prompt"] for r in picked], completions=texts, columns=columns)

    def score(self, batch: RolloutBatch) -> None:
        """``batch.reward_terms`` (each function's score) and ``batch.rewards`` (their
        weighted sum, then ``shape_rewards``)."""
        batch.rewards = self.shape_rewards(batch, self.weighted_rewards(batch))

    def weighted_rewards(self, batch: RolloutBatch) -> Tensor:
        """Call every reward function: fills ``batch.reward_terms``, returns the weighted
        sum ``[B]``."""
        inputs = dict(prompts=batch.prompts, completions=batch.completions,
                      completion_ids=batch.completion_ids(), finished=batch.finished.tolist(),
                      **batch.columns)
        total = torch.zeros(batch.size)
        for name, (fn, weight) in self.reward_functions.items():
            term = call_reward(name, fn, batch.size, **inputs)
            if not torch.isfinite(term).all():
                raise ValueError(f"reward function {name!r} returned a non-finite value")
            batch.reward_terms[name] = term
            total += weight * term
        return total

    def shape_rewards(self, batch: RolloutBatch, rewards: Tensor) -> Tensor:
        """Hook: reward shaping on top of the reward functions (identity here)."""
        return rewards

    def collect(self) -> RolloutBatch:
        """One rollout batch, scored (DAPO overrides it with dynamic sampling)."""
        batch = self.rollout(self.sample_prompts(self.config.prompts_per_step))
        self.score(batch)
        return batch

    # --- 2. log-probs of the old and reference policies -------------------------------------

    def prepare_logprobs(self, batch: RolloutBatch) -> None:
        """``batch.old_logprobs`` / ``batch.ref_logprobs`` where needed, micro-batch by
        micro-batch, without gradients."""
        c = self.config
        chunks = batch.split(c.micro)
        if self.needs_old_logprobs:
            with self._model_mode(train=False):
                batch.old_logprobs = torch.cat([
                    sequence_logprobs(self.policy, m, c.temperature, mode=c.loss_impl,
                                      backend=c.backend).cpu() for m in chunks])
        if self.reference is not None:
            batch.ref_logprobs = torch.cat([
                sequence_logprobs(self.reference, m, c.temperature, mode=c.loss_impl,
                                  backend=c.backend).cpu() for m in chunks])

    # --- 3. advantages ----------------------------------------------------------------------

    def compute_advantages(self, batch: RolloutBatch) -> None:
        """Set ``batch.advantages`` (``[B]`` or ``[B, T]``): the algorithm's estimator."""
        raise TypeError(f"{type(self).__name__} must define compute_advantages")

    # --- 4. update --------------------------------------------------------------------------

    @property
    def local_mini_batch_size(self) -> int:
        """Rows of one optimiser step held by this process (``mini_batch_size``; a
        data-parallel trainer: its rank's share)."""
        return self.config.mini

    def loss_config_for(self, mini_batch: RolloutBatch) -> PolicyLossConfig:
        """The loss with its normaliser taken over the whole mini-batch (every micro-batch,
        every rank): micro-batch losses then add up to the mini-batch loss."""
        normalizer = self.statistics.normalizer(mini_batch.loss_mask, self.loss_config)
        return self.loss_config.replace(normalizer=normalizer)

    def micro_batch_losses(self, micro: RolloutBatch, config: PolicyLossConfig
                           ) -> tuple[PolicyLossOutput, Tensor | None]:
        """The policy loss of one micro-batch and a term added to it before backward (None:
        nothing; a critic returns its weighted value loss)."""
        c = self.config
        return micro_batch_loss(self.policy, micro, config, mode=c.loss_impl,
                                backend=c.backend), None

    def backward(self, mini_batch: RolloutBatch) -> dict[str, float]:
        """Accumulate the mini-batch's gradient micro-batch by micro-batch; returns its loss
        and token-weighted policy metrics."""
        c = self.config
        config = self.loss_config_for(mini_batch)
        losses, parts = [], []
        with self._model_mode(train=c.gradient_checkpointing):
            for micro in mini_batch.split(c.micro):
                out, extra = self.micro_batch_losses(micro, config)
                (out.loss if extra is None else out.loss + extra).backward()
                losses.append(out.loss.detach().double())
                parts.append(out.metrics)
        stats = self.statistics
        counts = torch.stack([p["token_count"].double().cpu() for p in parts])
        # Each rank's loss carries the 1 / world_scale that cancels DDP's gradient averaging.
        metrics = {"policy/loss": float(stats.all_reduce_sum(torch.stack(losses).sum()))
                   * stats.world_scale}
        for key in POLICY_METRICS:
            values = torch.stack([p[key].double().cpu() for p in parts])
            metrics[f"policy/{key.removesuffix('_mean')}"] = stats.mean(values, counts)
        ratio_max = torch.stack([p["ratio_max"].double().cpu() for p in parts]).max()
        ratio_min = torch.stack([p["ratio_min"].double().cpu() for p in parts]).min()
        metrics["policy/ratio_max"] = float(stats.all_reduce_max(ratio_max))
        metrics["policy/ratio_min"] = -float(stats.all_reduce_max(-ratio_min))
        return metrics

    def optimizer_step(self, mini_batch: RolloutBatch) -> dict[str, float] | None:
        """zero_grad, ``backward``, then (unless ``stop_update`` says so: None) clip, AdamW
        step, LR schedule step."""
        self.optimizer.zero_grad(set_to_none=True)
        metrics = self.backward(mini_batch)
        if self.stop_update(metrics):
            self.optimizer.zero_grad(set_to_none=True)
            self.stopped_metrics = metrics
            return None
        metrics.update(self.apply_gradients())
        return metrics

    def apply_gradients(self) -> dict[str, float]:
        """Clip the accumulated gradients (``clip_gradients``), AdamW step, LR schedule step;
        returns the norm and the learning rate."""
        metrics = {"policy/grad_norm": self.clip_gradients(),
                   "policy/lr": self.optimizer.param_groups[0]["lr"]}
        self.optimizer.step()
        self.scheduler.step()
        return metrics

    def clip_gradients(self) -> float:
        """Clip the global gradient norm to ``max_grad_norm``; returns the norm before
        clipping (a sharded trainer overrides it to reduce the norm over shards)."""
        max_norm = self.config.max_grad_norm
        norm = torch.nn.utils.clip_grad_norm_(self.parameters,
                                              max_norm if max_norm is not None else math.inf)
        return float(norm)

    def stop_update(self, metrics: dict[str, float]) -> bool:
        """Hook, after a mini-batch's backward and before its optimiser step: True drops
        that step and ends the update's epoch loop (a KL bound, TRPO-style)."""
        return False

    def update(self, batch: RolloutBatch) -> dict[str, float]:
        """``epochs`` passes of mini-batch optimiser steps over the rollout batch (fewer
        when ``stop_update`` ends them); metrics are means over the optimiser steps taken
        (the LR: the last one's)."""
        c = self.config
        mini = self.local_mini_batch_size
        steps = []
        for _ in range(c.epochs):
            shuffle = c.shuffle and (c.epochs > 1 or mini < batch.size)
            order = (torch.randperm(batch.size, generator=self.shuffle_rng) if shuffle
                     else torch.arange(batch.size))
            for s in range(0, batch.size, mini):
                metrics = self.optimizer_step(batch.select(order[s:s + mini]))
                if metrics is None:
                    break
                steps.append(metrics)
            else:
                continue
            break
        if not steps:      # stopped before the first step: its metrics, nothing applied
            steps = [{**self.stopped_metrics, "policy/grad_norm": 0.0,
                      "policy/lr": self.optimizer.param_groups[0]["lr"]}]
        metrics = {k: sum(m[k] for m in steps) / len(steps) for k in steps[0]}
        metrics["policy/lr"] = steps[-1]["policy/lr"]
        return metrics

    # --- one iteration ----------------------------------------------------------------------

    def step(self) -> dict[str, float]:
        """Rollout -> score -> log-probs -> advantages -> update; returns the step's
        metrics."""
        start = time.perf_counter()
        batch = self.collect()
        rolled = time.perf_counter()
        self.prepare_logprobs(batch)
        self.compute_advantages(batch)
        metrics = self.update(batch)
        done = time.perf_counter()
        self.step_count += 1
        metrics.update(self.batch_metrics(batch))
        metrics.update(self.after_step(batch, metrics))
        tokens = float(self.statistics.all_reduce_sum(batch.loss_mask.sum().double()))
        metrics.update({"step": self.step_count, "perf/step_s": done - start,
                        "perf/rollout_s": rolled - start, "perf/update_s": done - rolled,
                        "perf/tokens_per_s": tokens / max(done - start, 1e-9)})
        return metrics

    def after_step(self, batch: RolloutBatch, metrics: dict) -> dict[str, float]:
        """Hook after the update (KL controllers); returns extra metrics."""
        return {}

    def batch_metrics(self, batch: RolloutBatch) -> dict[str, float]:
        stats, g = self.statistics, batch.group_size
        rewards = batch.rewards
        out = {"reward/mean": stats.mean(rewards),
               "reward/std": math.sqrt(max(0.0, stats.mean(rewards**2)
                                           - stats.mean(rewards) ** 2)),
               "rollout/completion_length": stats.mean(batch.completion_lengths.float()),
               "rollout/truncated": stats.mean((~batch.finished).float())}
        for name, term in batch.reward_terms.items():
            out[f"reward/{name}"] = stats.mean(term)
        grouped = rewards.view(-1, g)
        out["reward/frac_zero_std_groups"] = stats.mean(
            (grouped == grouped[:, :1]).all(-1).float())
        if batch.old_logprobs is not None:
            diff = (batch.old_logprobs - batch.sampler_logprobs).abs()
            out["rollout/sampler_logp_diff"] = stats.mean(diff[batch.loss_mask])
        return out

    # --- evaluation, training loop, checkpoints -------------------------------------------

    @property
    def evaluates(self) -> bool:
        """Whether ``evaluate`` has something to measure (held-out prompts here)."""
        return self.eval_prompts is not None

    @torch.no_grad()
    def evaluate(self, prompts: Sequence[str | Mapping] | None = None) -> dict[str, float]:
        """Greedy completions of the held-out prompts, scored by every reward function
        (without shaping): ``eval/reward``, ``eval/<name>`` and ``eval/accuracy``."""
        rows = prompt_rows(prompts) if prompts is not None else self.eval_prompts
        if rows is None:
            return {}
        sampling = SamplingParams(self.config.max_new_tokens, 0.0, 1.0,
                                  self.config.stop_strings)
        batch = self.rollout(range(len(rows)), rows, group_size=1, sampling=sampling)
        batch.rewards = self.weighted_rewards(batch)
        out = {"eval/reward": self.statistics.mean(batch.rewards)}
        for name, term in batch.reward_terms.items():
            out[f"eval/{name}"] = self.statistics.mean(term)
        if self.accuracy_reward is not None:
            out["eval/accuracy"] = out[f"eval/{self.accuracy_reward}"]
        return out

    def train(self, steps: int | None = None) -> list[dict]:
        """Run until ``steps`` (default ``config.steps``) iterations are done; evaluates at
        the start, every ``eval_every`` steps and at the end; returns the logged history."""
        c = self.config
        steps = steps if steps is not None else c.steps
        log_dir = self.out_dir if self.is_main_process else None
        log = MetricsLog(log_dir, total=steps, progress=self.progress and self.is_main_process,
                         start=self.step_count)
        try:
            if self.step_count == 0 and self.evaluates:
                log.log({"step": 0, **self.evaluate()})
            while self.step_count < steps:
                metrics = self.step()
                n = self.step_count
                if n == steps or (c.eval_every and n % c.eval_every == 0):
                    metrics.update(self.evaluate())
                log.log(metrics)
                if self.out_dir is not None and (n == steps or (c.save_every
                                                               and n % c.save_every == 0)):
                    self.save(self.out_dir / f"checkpoint-{n}")
        finally:
            log.close()
        if log_dir is not None and log.history:
            log.plot(log_dir / "curves.png")
        return log.history

    def extra_state(self) -> dict:
        """Hook: algorithm state to checkpoint (a KL controller, counters)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        """Hook: restore ``extra_state``."""

    def save(self, path: str | Path) -> Path:
        """The model (``save_pretrained``) under ``path/model`` and ``trainer_state.pt``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_model(self.policy.model, self.tokenizer, path / MODEL_DIR)
        torch.save({"step": self.step_count, "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "rng": rng_state(self.prompt_rng, self.shuffle_rng),
                    "algorithm": self.extra_state(), "config": repr(self.config)},
                   path / STATE_FILE)
        self.save_files(path)
        return path

    def save_files(self, path: Path) -> None:
        """Hook: files an algorithm adds to a checkpoint directory (a critic's weights),
        written by the main process after the model and ``trainer_state.pt``."""

    def load_files(self, path: Path) -> None:
        """Hook: restore ``save_files`` (every process)."""

    def load(self, path: str | Path) -> None:
        """Restore a ``save``: weights, optimiser, schedule, step, RNGs, algorithm state."""
        path = Path(path)
        if not (path / STATE_FILE).exists():
            raise FileNotFoundError(f"{path} is not a checkpoint (no {STATE_FILE})")
        load_model_weights(self.policy.model, path / MODEL_DIR)
        state = torch.load(path / STATE_FILE, weights_only=False)
        self.step_count = state["step"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"], self.prompt_rng, self.shuffle_rng)
        self.load_extra_state(state["algorithm"])
        self.load_files(path)

    class _Mode:
        def __init__(self, model, train: bool):
            self.model, self.train, self.was = model, train, model.training

        def __enter__(self):
            self.model.train(self.train)

        def __exit__(self, *exc):
            self.model.train(self.was)

    def _model_mode(self, train: bool) -> _Mode:
        """Train mode only where gradient checkpointing needs it (dropout is off anyway)."""
        return Trainer._Mode(self.policy.model, train)
