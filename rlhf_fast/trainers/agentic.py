"""ARPO (Dong et al. 2025) and AEPO (Dong et al. 2025): RL for agents that call tools in the
middle of their reasoning.

ARPO, Agentic Reinforced Policy Optimization:

    J(theta) = E [ 1 / sum_j |o_j| * sum_j sum_t min(r_jt A_j, clip(r_jt, 1 - eps, 1 + eps) A_j) ]
    {o_j}, j = 1..M: a rollout tree per prompt, N global samples + branches after tool calls
    branch after a tool call with P = clip(tau + w * (H_t - H_root), 0, 1), tau 0.5, w 0.2
    A_j  = (R_j - mean(R)) / std(R) over the prompt's M trajectories (GRPO, "soft" attribution)

Line by line in this trainer:

- o_j (multi-turn): ``ARPOTrainer.rollout`` runs ``rlhf_fast.agents.ToolRollout``: rounds of
  generation that stop at a tool's closing tag; the tool runs and its result is appended in
  ``<result>...</result>`` as a ``Segment(trainable=False)`` (attention 1, loss mask 0), up
  to ``max_tool_calls`` calls and ``max_new_tokens`` completion tokens;
- the tree: ``initial_rollouts`` (N) root samples per prompt, then after each tool result
  the step entropy of the following tokens (``entropy_tokens`` of them) against the root's
  decides a branch of ``beam_size - 1`` copies that share the prefix and continue from that
  tool result, until the prompt has ``group_size`` (M) trajectories; prompts whose trees
  stop growing get fresh root samples (``rlhf_fast.agents.rollout``);
- A_j: ``GRPOTrainer.compute_advantages`` over each prompt's M rows: branches are trained as
  independent rows ("soft" advantage attribution, the paper's default: a shared token gets
  the sum of its rows' coefficients, which is the hard attribution weighted by |S_t|);
- the loss: ``ppo`` preset with dual clip c = 3, token mean, no KL, no entropy bonus (the
  official scripts; ``linear_policy_loss``); tool-result tokens never enter it (loss mask).

AEPO, Agentic Entropy-Balanced Policy Optimization, on top of ARPO:

- dynamic entropy-balanced rollout: entropy pre-monitoring per prompt (one full rollout
  without branching: H_root from its first round, mean H_tool from the rounds after its
  tool results) splits the budget into m = clip(floor(M sigmoid(beta (H_root - H_tool))) + 1,
  1, M) global samples and M - m for branches; branching is penalised after consecutive
  branching rounds of the same prompt: P = clip(1 - tau / (1 - 0.05 l) + w dH, 0, 1);
- entropy-balanced policy optimisation: the ``aepo`` preset: the upper clip bound
  (1 + eps) * r / sg(r) keeps the gradient of clipped positive-advantage tokens at weight
  1 + eps, dual clip c = 3, and the entropy-aware advantage A_j (1 + 0.2 z(H_jt)), z the
  standardised entropy of the current policy over the mini-batch's trained tokens.

Deviations, on purpose: AEPO's shipped scripts turn the dynamic rollout off and, by
computing the entropy only with an entropy bonus, leave the entropy-aware advantage inert;
here both are on (the paper's method). The pre-monitoring rollout is discarded after it has
set m (it is not one of the M rows). The entropy statistics span the mini-batch (the
official code: the micro-batch); so AEPO needs ``micro_batch_size = mini_batch_size``.
Rollout deviations from ARPO's code are listed in ``rlhf_fast.agents.rollout``.

Metrics (besides the core's): ``agent/tool_calls`` (executed calls per trajectory),
``agent/tool_errors`` (error results per trajectory), ``agent/masked_share`` (share of
completion tokens that are inserted results), ``agent/rounds``, ``agent/branches_per_prompt``,
``agent/top3_branch_share`` (share of a tree's branches taken from its three most-branched
trajectories), ``agent/distinct_per_prompt`` (distinct completions among a prompt's M),
``agent/global_samples`` (root samples started first, per prompt), ``agent/branch_decisions``
(per prompt), ``agent/consecutive_max`` (the largest consecutive-branching-round counter of
the step; AEPO's penalty grows with it). Evaluation adds ``eval/tool_calls`` and
``eval/tool_errors`` (greedy) and ``eval/sampled_reward``, ``eval/sampled_accuracy``,
``eval/sampled_tool_calls`` (``eval_samples`` per prompt at the training temperature).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..agents.branching import global_samples, top_share
from ..agents.rollout import BranchingRule, RolloutTree, ToolRollout
from ..agents.tools import Tool, ToolBox, default_toolbox
from ..config import PolicyLossConfig
from .batch import RolloutBatch, Trajectory
from .core import prompt_rows
from .generation import SamplingParams
from .grpo import GRPOConfig, GRPOTrainer


@dataclass(frozen=True)
class ARPOConfig(GRPOConfig):
    """ARPO: rollout trees that branch after uncertain tool calls; ``group_size`` is the
    budget M of trajectories per prompt."""

    loss: PolicyLossConfig = field(
        default_factory=lambda: PolicyLossConfig.preset("ppo", dual_clip_c=3.0))
    """Clip 0.2 / 0.2, dual clip 3, token mean, no KL (ARPO's scripts)."""

    initial_rollouts: int | None = None
    """N: root samples per prompt before any branching; None: ``group_size // 2`` (ARPO:
    8 of 16)."""

    beam_size: int = 2
    """A branch point yields ``beam_size - 1`` copies."""

    branch_probability: float = 0.5
    """tau: the branch probability at zero entropy change."""

    entropy_weight: float = 0.2
    """w: weight of the entropy change in the branch probability."""

    entropy_tokens: int = 20
    """k: tokens of a round whose entropies (summed, / log|V|) make its step entropy."""

    max_tool_calls: int = 3
    """Tool calls executed per trajectory (ARPO's reasoning scripts: 3)."""

    eval_samples: int = 1
    """Evaluation also samples this many completions of each held-out prompt at the
    training temperature (``eval/sampled_*``); 0: greedy only."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.initial_rollouts is not None and not 1 <= self.initial_rollouts <= \
                self.group_size:
            raise ValueError(f"initial_rollouts must lie in [1, group_size={self.group_size}]"
                             f", got {self.initial_rollouts}")
        if not 0 <= self.branch_probability <= 1:
            raise ValueError(f"branch_probability must lie in [0, 1], got "
                             f"{self.branch_probability}")
        if self.max_tool_calls < 0 or self.eval_samples < 0:
            raise ValueError(f"max_tool_calls and eval_samples must be >= 0, got "
                             f"{self.max_tool_calls}, {self.eval_samples}")
        BranchingRule(self.beam_size, self.branch_probability, self.entropy_weight,
                      self.entropy_tokens)

    @property
    def global_rollouts(self) -> int:
        """N per prompt."""
        return (self.initial_rollouts if self.initial_rollouts is not None
                else max(1, self.group_size // 2))


@dataclass(frozen=True)
class AEPOConfig(ARPOConfig):
    """AEPO: ARPO's rollout with entropy pre-monitoring and the consecutive-branch penalty,
    and the ``aepo`` loss."""

    loss: PolicyLossConfig = field(default_factory=lambda: PolicyLossConfig.preset("aepo"))
    """Stop-gradient upper clip, dual clip 3, entropy-aware advantage alpha 0.2, token
    mean, no KL."""

    dynamic_rollout: bool = True
    """Entropy pre-monitoring sets the global samples per prompt (``initial_rollouts`` is
    then unused); False: ARPO's fixed N."""

    monitor_beta: float = 0.5
    """beta of m = M sigmoid(beta (H_root - H_tool))."""

    consecutive_penalty: float | None = 0.05
    """Penalty per consecutive branching round of a prompt; None: ARPO's rule."""


class ARPOTrainer(GRPOTrainer):
    """ARPO: GRPO's advantage over multi-turn rollout trees with tools (module docstring).

    Extra argument: ``tools``: a ``ToolBox`` or tools (default: ``default_toolbox()``, the
    calculator ``<python>`` and ``<search>`` over the packaged knowledge base). Their tags
    should be single tokens of the tokenizer (``tokenizer.add_tokens(toolbox.tags)``).
    """

    config_class = ARPOConfig

    def __init__(self, model, tokenizer, prompts, reward_functions, config=None, *,
                 tools: ToolBox | Iterable[Tool] | None = None, **kwargs):
        super().__init__(model, tokenizer, prompts, reward_functions, config, **kwargs)
        if tools is None:
            tools = default_toolbox()
        self.toolbox = tools if isinstance(tools, ToolBox) else ToolBox(tools)
        c = self.config
        self.engine = ToolRollout(self.generator, tokenizer, self.toolbox,
                                  max_new_tokens=c.max_new_tokens,
                                  max_tool_calls=c.max_tool_calls,
                                  vocab_size=self.policy.weight.shape[0])
        self.branch_rng = torch.Generator().manual_seed(c.seed + 2)
        self.last_tree: RolloutTree | None = None
        self.rollout_stats: dict[str, float] = {}
        self.monitor_entropies: list[tuple[float, float]] = []
        """(H_root, mean H_tool) of each prompt's last monitoring rollout (AEPO)."""

    # --- rollout ----------------------------------------------------------------------------

    @property
    def branching_rule(self) -> BranchingRule:
        c = self.config
        return BranchingRule(c.beam_size, c.branch_probability, c.entropy_weight,
                             c.entropy_tokens, self.consecutive_penalty)

    consecutive_penalty: float | None = None
    """ARPO branches without AEPO's penalty."""

    def global_rollouts(self, prefixes: list[list[int]]) -> list[int]:
        """N per prompt (AEPO overrides it with pre-monitoring)."""
        return [self.config.global_rollouts] * len(prefixes)

    def rollout(self, indices: Sequence[int], rows: Sequence[dict] | None = None,
                group_size: int | None = None,
                sampling: SamplingParams | None = None) -> RolloutBatch:
        """Training (no ``group_size`` / ``sampling`` given): a rollout tree of
        ``group_size`` trajectories per prompt. Otherwise (evaluation): ``group_size``
        independent multi-turn samples per prompt, no branching."""
        training = group_size is None and sampling is None
        # The trainer's generator as it is now: the data-parallel trainer wraps it after
        # __init__ (FSDP2: ``UnshardedGenerator``, which gathers the sharded weights).
        self.engine.generator = self.generator
        rows = self.prompts if rows is None else rows
        group = group_size or self.config.group_size
        sampling = sampling or self.config.sampling
        prefixes = [self.prompt_ids[i] if rows is self.prompts
                    else self._prompt_ids(rows[i]["prompt"]) for i in indices]
        if training:
            tree = self.engine.run(prefixes, group, sampling,
                                   initial=self.global_rollouts(prefixes),
                                   rule=self.branching_rule, rng=self.branch_rng)
        else:
            tree = self.engine.run(prefixes, group, sampling)
        self.last_tree = tree
        trajectories = tree.rows()
        picked = [rows[indices[t.prompt]] for t in trajectories]
        columns = {k: [r[k] for r in picked] for k in picked[0] if k != "prompt"}
        texts = self.tokenizer.batch_decode([t.completion_ids for t in trajectories],
                                            skip_special_tokens=True)
        pad_id = self.tokenizer.pad_token_id
        return RolloutBatch.from_trajectories(
            [Trajectory(prefixes[t.prompt], t.segments, t.finished) for t in trajectories],
            pad_id=pad_id if pad_id is not None else 0, group_size=group,
            prompts=[r["prompt"] for r in picked], completions=texts, columns=columns)

    def collect(self) -> RolloutBatch:
        batch = super().collect()
        self.rollout_stats = self.tree_metrics(self.last_tree)
        return batch

    # --- metrics ----------------------------------------------------------------------------

    def tree_metrics(self, tree: RolloutTree) -> dict[str, float]:
        """The ``agent/...`` metrics of a rollout (module docstring), through
        ``self.statistics``."""
        stats = self.statistics
        rows = tree.rows()
        per_row = torch.tensor([[t.tool_calls, t.tool_errors, t.inserted, t.length]
                                for t in rows], dtype=torch.float64)
        tokens = stats.all_reduce_sum(per_row[:, 2:].sum(0))
        branches, top3, distinct = [], [], []
        for trajectories in tree.trajectories:
            counts = [t.branches for t in trajectories]
            top, total = top_share(counts)
            branches.append(total)
            top3.append(top)
            distinct.append(len({tuple(t.completion_ids) for t in trajectories}))
        shares = stats.all_reduce_sum(torch.tensor([sum(top3), sum(branches)],
                                                   dtype=torch.float64))
        return {
            "agent/tool_calls": stats.mean(per_row[:, 0]),
            "agent/tool_errors": stats.mean(per_row[:, 1]),
            "agent/masked_share": float(tokens[0] / tokens[1]) if float(tokens[1]) else 0.0,
            "agent/rounds": float(stats.all_reduce_max(torch.tensor(  # the slowest rank's
                tree.rounds, dtype=torch.float64))),
            "agent/branches_per_prompt": stats.mean(torch.tensor(branches, dtype=torch.float64)),
            "agent/top3_branch_share": (float(shares[0] / shares[1]) if float(shares[1])
                                        else 0.0),
            "agent/distinct_per_prompt": stats.mean(torch.tensor(distinct,
                                                                 dtype=torch.float64)),
            "agent/global_samples": stats.mean(torch.tensor(tree.initial,
                                                            dtype=torch.float64)),
            "agent/branch_decisions": stats.mean(torch.tensor(tree.decisions,
                                                              dtype=torch.float64)),
            "agent/consecutive_max": float(stats.all_reduce_max(torch.tensor(
                max(tree.consecutive_max), dtype=torch.float64))),
        }

    def batch_metrics(self, batch: RolloutBatch) -> dict[str, float]:
        return {**super().batch_metrics(batch), **self.rollout_stats}

    @torch.no_grad()
    def evaluate(self, prompts: Sequence[str | Mapping] | None = None) -> dict[str, float]:
        """The core's evaluation (greedy, multi-turn with tools, no branching) plus
        ``eval/tool_calls`` and ``eval/tool_errors`` per trajectory; with ``eval_samples``,
        the same prompts sampled as in training (``eval/sampled_reward``,
        ``eval/sampled_accuracy``, ``eval/sampled_tool_calls``), from a generator seeded
        the same at every evaluation and apart from the training's."""
        out = super().evaluate(prompts)
        if not out:
            return out
        out.update(self._tool_metrics("eval", self.last_tree))
        c = self.config
        if c.eval_samples:
            rows = prompt_rows(prompts) if prompts is not None else self.eval_prompts
            device = self.policy.weight.device
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(c.seed + 3)
                batch = self.rollout(range(len(rows)), rows, group_size=c.eval_samples,
                                     sampling=c.sampling)
            batch.rewards = self.weighted_rewards(batch)
            out["eval/sampled_reward"] = self.statistics.mean(batch.rewards)
            if self.accuracy_reward is not None:
                out["eval/sampled_accuracy"] = self.statistics.mean(
                    batch.reward_terms[self.accuracy_reward])
            out["eval/sampled_tool_calls"] = self._tool_metrics("eval", self.last_tree)[
                "eval/tool_calls"]
        return out

    def _tool_metrics(self, prefix: str, tree: RolloutTree) -> dict[str, float]:
        rows = tree.rows()
        return {f"{prefix}/tool_calls": self.statistics.mean(
                    torch.tensor([float(t.tool_calls) for t in rows])),
                f"{prefix}/tool_errors": self.statistics.mean(
                    torch.tensor([float(t.tool_errors) for t in rows]))}

    # --- checkpoint ---------------------------------------------------------------------

    def extra_state(self) -> dict:
        return {**super().extra_state(), "branch_rng": self.branch_rng.get_state()}

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        self.branch_rng.set_state(state["branch_rng"])


class AEPOTrainer(ARPOTrainer):
    """AEPO: ARPO with entropy pre-monitoring, the consecutive-branch penalty and the
    ``aepo`` loss (module docstring)."""

    config_class = AEPOConfig

    @property
    def consecutive_penalty(self) -> float | None:
        return self.config.consecutive_penalty

    def global_rollouts(self, prefixes: list[list[int]]) -> list[int]:
        """m per prompt from one monitoring rollout each (discarded):
        ``global_samples(M, H_root, mean H_tool)``; a prompt whose monitoring rollout
        made no tool call counts its tool entropy as equal to the root's (m = M / 2 + 1)."""
        c = self.config
        if not c.dynamic_rollout:
            return super().global_rollouts(prefixes)
        monitor = self.engine.run(prefixes, 1, c.sampling, entropy_tokens=c.entropy_tokens)
        out, self.monitor_entropies = [], []
        for (t,) in monitor.trajectories:
            tool = (sum(t.tool_entropies) / len(t.tool_entropies) if t.tool_entropies
                    else t.root_entropy)
            out.append(global_samples(c.group_size, t.root_entropy, tool, c.monitor_beta))
            self.monitor_entropies.append((t.root_entropy, tool))
        return out
