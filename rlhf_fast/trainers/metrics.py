"""Metrics: one JSON line per step, a progress bar, and a PNG of the curves at the end.

Keys (every trainer logs the same names; detached float values):

- ``step``: iterations done;
- ``reward/mean``, ``reward/std``: the summed (weighted, shaped) reward of the rollout batch;
  ``reward/<name>``: mean raw score of each reward function;
  ``reward/frac_zero_std_groups``: share of groups whose rewards are all equal (no signal);
- ``policy/loss``: the policy loss, mean over optimiser steps;
- ``policy/kl``: mean per-token value of the loss's KL estimator (its ``kl_estimator``,
  towards ``kl_reference``); 0 without a KL term;
- ``policy/entropy``: mean per-token entropy of the current (tempered) policy;
- ``policy/clip_frac_low``, ``policy/clip_frac_high``, ``policy/clip_frac_dual``: share of
  tokens clipped at each bound (sign-aware, as TRL);
- ``policy/ratio_mean``, ``policy/ratio_min``, ``policy/ratio_max``: the importance ratio
  pi / pi_old over valid tokens;
- ``policy/grad_norm``: global gradient norm before clipping, mean over optimiser steps;
  ``policy/lr``: learning rate of the last optimiser step;
- ``rollout/completion_length``: mean completion tokens; ``rollout/truncated``: share cut at
  ``max_new_tokens``; ``rollout/sampler_logp_diff``: mean abs(old - sampler) log-prob per
  token (when old log-probs exist);
- ``perf/step_s``, ``perf/rollout_s``, ``perf/update_s``: wall time of the step and its
  parts; ``perf/tokens_per_s``: trained completion tokens per second of step time;
- ``eval/reward``, ``eval/<name>``, ``eval/accuracy``: greedy decoding on the held-out
  prompts.

Token metrics are means over valid tokens of the whole batch (never over padding), taken
through the trainer's ``BatchStatistics``. Algorithms add their own keys under their name
(``dapo/...``, ``reinforce/...``); the agentic trainers log theirs under ``agent/...``
(tool calls and errors, masked share, rollout-tree statistics: ``trainers/agentic.py``).

PPO (``ppo.py``) adds:

- ``critic/value_loss``: the clipped value loss (before ``vf_coef``), mean over optimiser
  steps; ``critic/clip_frac``: share of tokens whose clipped term is the larger;
  ``critic/value_mean``: mean value over valid tokens; ``critic/grad_norm``,
  ``critic/lr``: the critic's optimiser;
- ``critic/explained_variance``: ``1 - Var(R - V) / Var(R)`` of the rollout's returns and
  values; ``critic/return_mean``;
- ``ppo/kl_coef``: the controlled beta used this step; ``ppo/kl_measured``: the KL the
  controller saw; ``ppo/kl_ref``, ``ppo/kl_ref_sequence``: KL(old || ref) of the rollout per
  token and per sequence (k3, whatever the penalty's estimator); ``ppo/kl_old``: KL(old ||
  pi) after the update (PPO-penalty, TRPO); ``ppo/approx_kl``: KL(old || pi) in the
  mini-batches' forward passes (k3);
  ``ppo/optimizer_steps``, ``ppo/early_stop``: steps taken, and 1 when ``kl_stop`` ended
  the epochs early.

DPO (``dpo.py``) adds ``dpo/rewards_{chosen,rejected,margin,accuracy}`` (implicit rewards
``beta * (log pi - log pi_ref)``, margin, share of pairs ranked right), ``dpo/logps_*``,
``dpo/nll``, ``dpo/pairs``, ``dpo/{chosen,rejected}_length``, and on held-out pairs
``eval/pair_accuracy`` and ``eval/pair_margin``.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

PROGRESS_KEYS = (("reward/mean", "reward"), ("eval/accuracy", "acc"), ("policy/kl", "kl"),
                 ("policy/entropy", "H"), ("policy/clip_frac_low", "clip_lo"),
                 ("policy/clip_frac_high", "clip_hi"), ("agent/tool_calls", "calls"),
                 ("agent/branches_per_prompt", "branches"))
"""Shown on the progress bar (key, label)."""

PLOT_KEYS = ("reward/mean", "eval/accuracy", "policy/kl", "policy/entropy",
             "policy/clip_frac_high", "rollout/completion_length", "eval/sampled_accuracy",
             "agent/tool_calls", "agent/branches_per_prompt", "agent/distinct_per_prompt",
             "critic/value_loss", "critic/explained_variance", "ppo/kl_coef",
             "dpo/rewards_accuracy", "dpo/rewards_margin", "eval/pair_accuracy")
"""Panels of the PNG."""


class MetricsLog:
    """Appends each step's metrics to ``<out_dir>/metrics.jsonl`` (when ``out_dir`` is set),
    keeps them in ``history``, and draws a progress bar on stderr."""

    def __init__(self, out_dir: str | Path | None = None, *, total: int | None = None,
                 progress: bool = False, start: int = 0):
        self.history: list[dict] = []
        self.path = Path(out_dir) / "metrics.jsonl" if out_dir is not None else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.bar = None
        if progress:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, initial=start, desc="train", file=sys.stderr,
                                dynamic_ncols=True)
            except ImportError:
                self.bar = None

    def log(self, metrics: dict) -> None:
        record = {k: (float(v) if not isinstance(v, int) else v) for k, v in metrics.items()}
        self.history.append(record)
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if self.bar is not None:
            shown = {label: f"{record[k]:.3g}" for k, label in PROGRESS_KEYS if k in record}
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def plot(self, path: str | Path) -> Path:
        """A PNG with one panel per ``PLOT_KEYS`` entry that was logged."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        keys = [k for k in PLOT_KEYS if any(k in r for r in self.history)]
        cols = 3
        rows = max(1, math.ceil(len(keys) / cols))
        fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
        for ax, key in zip(axes.flat, keys, strict=False):
            points = [(r["step"], r[key]) for r in self.history if key in r]
            ax.plot(*zip(*points, strict=True), marker="." if len(points) < 30 else None)
            ax.set_title(key)
            ax.set_xlabel("step")
        for ax in list(axes.flat)[len(keys):]:
            ax.axis("off")
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=80)
        plt.close(fig)
        return path
