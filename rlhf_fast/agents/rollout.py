"""Multi-turn tool rollouts, optionally grown as ARPO / AEPO trees.

``ToolRollout.run`` extends every prompt's trajectories round by round:

1. one ``Generator.generate`` call extends every active trajectory until a tool's closing
   tag, the end-of-sequence token or its length budget (``max_new_tokens`` completion tokens
   in all, inserted results included);
2. a round that ended with a closing tag is a tool call: the ``ToolBox`` runs all of them at
   once and each result is appended in the result tags as ``Segment(trainable=False)``
   (attention 1, loss mask 0). Past ``max_tool_calls`` calls the result is an error saying
   so; a result that does not fit the length budget is cut and ends the trajectory;
3. branching (``BranchingRule``; none for a plain rollout): the first round of a root sample
   gives the tree's ``H_root`` (``branching.step_entropy`` of its first ``entropy_tokens``
   tokens); the round that follows a tool result is the probe ``H`` of that point. With
   probability ``p(H - H_root)`` (ARPO, or AEPO with its per-prompt consecutive-branch
   counter) the point branches: ``beam_size - 1`` copies of the trajectory as it stood right
   after that tool result (the same ``Segment`` objects: the prefix is shared) continue from
   there, within the prompt's budget;
4. a prompt with no active trajectory but fewer than ``budget`` gets one fresh root sample
   per round (ARPO's rule), so every prompt ends with exactly ``budget`` trajectories.

Deviations from ARPO's code, on purpose: the branch restarts at the tool result whose
following tokens were uncertain (the paper's description; the code decides at the next tool
call with the entropy of the round that led to it), ``H_root`` is kept per tree and reset
every batch (the code keeps a dictionary keyed by row index across batches), and the entropy
is that of the full distribution (the code reads the top-10 log-probs of vLLM).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from ..trainers.batch import Segment
from ..trainers.generation import Completion, Generator, SamplingParams
from .branching import aepo_branch_probability, arpo_branch_probability, step_entropy
from .tools import ToolBox, ToolCall, ToolOutcome


@dataclass(frozen=True)
class BranchingRule:
    """When a rollout tree branches after a tool call (ARPO; AEPO with ``penalty``)."""

    beam_size: int = 2
    """A branching point yields ``beam_size - 1`` copies (ARPO's beam 2: one copy)."""

    tau: float = 0.5
    """Base branch probability (ARPO's ``branch_probability``)."""

    weight: float = 0.2
    """Weight of the entropy change (ARPO's ``entropy_weight``)."""

    entropy_tokens: int = 20
    """Tokens of a round whose entropies make its step entropy."""

    penalty: float | None = None
    """AEPO's consecutive-branch penalty per round (0.05); None: ARPO's rule."""

    def __post_init__(self) -> None:
        if self.beam_size < 2:
            raise ValueError(f"beam_size must be >= 2 (1 copy per branch), got "
                             f"{self.beam_size}")
        if self.entropy_tokens < 1:
            raise ValueError(f"entropy_tokens must be >= 1, got {self.entropy_tokens}")
        if self.penalty is not None and not self.penalty > 0:
            raise ValueError(f"penalty must be None or > 0, got {self.penalty}")

    def probability(self, delta_entropy: float, consecutive: int) -> float:
        """The branch probability after a tool call."""
        if self.penalty is None:
            return arpo_branch_probability(delta_entropy, self.tau, self.weight)
        return aepo_branch_probability(delta_entropy, consecutive, self.tau, self.weight,
                                       self.penalty)


@dataclass
class AgentTrajectory:
    """One row of a rollout tree while it grows."""

    prompt: int
    """Index of its prompt in the ``run`` call."""
    id: int
    """Creation order within its prompt's tree."""
    parent: int | None = None
    """The trajectory it branched from (None: a root sample)."""
    segments: list[Segment] = field(default_factory=list)
    completion_ids: list[int] = field(default_factory=list)
    """Every completion token so far (generated and inserted)."""
    tool_calls: int = 0
    """Tool calls executed."""
    tool_errors: int = 0
    """Results that were errors (refused input, time-outs, malformed or over-budget calls)."""
    inserted: int = 0
    """Tokens of inserted results (loss mask 0)."""
    finish_reason: str | None = None
    """``eos`` or ``stop`` (a stop string that is no tool's): finished; ``length``: the
    budget ran out; None while active."""
    root_entropy: float | None = None
    """``H_root`` of its tree's root sample (inherited by branches)."""
    tool_entropies: list[float] = field(default_factory=list)
    """Step entropy of each round that followed one of its tool results."""
    branches: int = 0
    """Copies branched from it."""
    awaiting: bool = False
    """Its next round follows a tool result whose branching is undecided."""

    @property
    def length(self) -> int:
        return len(self.completion_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason in ("eos", "stop")

    def append(self, segment: Segment) -> None:
        self.segments.append(segment)
        self.completion_ids.extend(segment.ids)
        if not segment.trainable:
            self.inserted += len(segment.ids)


@dataclass(frozen=True)
class _Snapshot:
    """A trajectory as it stood at the start of a round (right after a tool result)."""

    segments: int
    tokens: int
    tool_calls: int
    tool_errors: int
    inserted: int
    tool_entropies: int


@dataclass
class RolloutTree:
    """What ``ToolRollout.run`` returns."""

    trajectories: list[list[AgentTrajectory]]
    """Per prompt, its ``budget`` trajectories in creation order."""
    initial: list[int]
    """Per prompt, the root samples started first."""
    rounds: int = 0
    """Generation rounds."""
    decisions: list[int] = field(default_factory=list)
    """Per prompt, branch decisions taken (tool results followed by a probe, within the
    budget)."""
    consecutive_max: list[int] = field(default_factory=list)
    """Per prompt, the largest consecutive-branching-round counter reached."""

    def rows(self) -> list[AgentTrajectory]:
        """Every trajectory, prompt by prompt (groups of consecutive rows)."""
        return [t for tree in self.trajectories for t in tree]


class ToolRollout:
    """Multi-turn rollouts with tools (module docstring).

    Args:
        generator: the ``Generator`` (``HFGenerator`` on the policy); branching needs its
            ``Completion.entropies``.
        tokenizer: encodes the inserted results (their tags should be single tokens).
        toolbox: the tools.
        max_new_tokens: completion tokens per trajectory (generated and inserted).
        max_tool_calls: tool calls executed per trajectory.
        vocab_size: |V| of the step entropy's normalisation.
    """

    def __init__(self, generator: Generator, tokenizer, toolbox: ToolBox, *,
                 max_new_tokens: int, max_tool_calls: int, vocab_size: int):
        if max_new_tokens < 1 or max_tool_calls < 0:
            raise ValueError(f"need max_new_tokens >= 1 and max_tool_calls >= 0, got "
                             f"{max_new_tokens}, {max_tool_calls}")
        self.generator, self.tokenizer, self.toolbox = generator, tokenizer, toolbox
        self.max_new_tokens, self.max_tool_calls = max_new_tokens, max_tool_calls
        self.vocab_size = vocab_size

    def run(self, prompt_ids: Sequence[Sequence[int]], budget: int, sampling: SamplingParams,
            *, initial: Sequence[int] | None = None, rule: BranchingRule | None = None,
            rng: torch.Generator | None = None,
            entropy_tokens: int | None = None) -> RolloutTree:
        """``budget`` trajectories per prompt: ``initial[p]`` root samples first (default:
        all of the budget), the rest from branches (``rule``, drawing from ``rng``) or
        fresh roots. Step entropies (``root_entropy``, ``tool_entropies``) are measured
        over ``rule.entropy_tokens`` tokens, or ``entropy_tokens`` without a rule (None:
        not measured)."""
        initial = list(initial) if initial is not None else [budget] * len(prompt_ids)
        if len(initial) != len(prompt_ids) or not all(1 <= n <= budget for n in initial):
            raise ValueError(f"initial must give 1..budget={budget} root samples per prompt "
                             f"({len(prompt_ids)} prompts), got {initial}")
        if rule is not None and rng is None:
            raise ValueError("branching draws from rng: pass a torch.Generator")
        tokens = rule.entropy_tokens if rule is not None else entropy_tokens
        sampling = replace(sampling, stop_strings=tuple(dict.fromkeys(
            (*sampling.stop_strings, *self.toolbox.stop_strings))))
        tree = RolloutTree([[] for _ in prompt_ids], initial, decisions=[0] * len(prompt_ids),
                           consecutive_max=[0] * len(prompt_ids))
        for p, n in enumerate(initial):
            for _ in range(n):
                self._new_root(tree, p)
        consecutive = [0] * len(prompt_ids)
        while active := [t for t in tree.rows() if t.finish_reason is None]:
            tree.rounds += 1
            snapshots = {id(t): self._snapshot(t) for t in active if t.awaiting}
            completions = self._generate(prompt_ids, active, sampling)
            probes = self._extend(active, completions, tokens)
            self._call_tools(active, completions)
            if rule is not None:
                branched = self._branch(tree, probes, snapshots, rule, rng, consecutive,
                                        budget)
                for p in range(len(prompt_ids)):   # AEPO's l: +1 after a branching round
                    consecutive[p] = consecutive[p] + 1 if branched[p] else 0
                    tree.consecutive_max[p] = max(tree.consecutive_max[p], consecutive[p])
            for p, trajectories in enumerate(tree.trajectories):
                if len(trajectories) < budget and all(t.finish_reason is not None
                                                      for t in trajectories):
                    self._new_root(tree, p)
        return tree

    # --- one round ----------------------------------------------------------------------

    @staticmethod
    def _new_root(tree: RolloutTree, prompt: int) -> None:
        tree.trajectories[prompt].append(
            AgentTrajectory(prompt=prompt, id=len(tree.trajectories[prompt])))

    @staticmethod
    def _snapshot(t: AgentTrajectory) -> _Snapshot:
        return _Snapshot(len(t.segments), t.length, t.tool_calls, t.tool_errors, t.inserted,
                         len(t.tool_entropies))

    def _generate(self, prompt_ids, active: list[AgentTrajectory],
                  sampling: SamplingParams) -> list[Completion]:
        """One generation call for every active trajectory, each cut to its own budget."""
        room = [self.max_new_tokens - t.length for t in active]
        prefixes = [list(prompt_ids[t.prompt]) + t.completion_ids for t in active]
        completions = self.generator.generate(
            prefixes, replace(sampling, max_new_tokens=max(room)))
        if len(completions) != len(active):
            raise ValueError(f"the generator returned {len(completions)} completions for "
                             f"{len(active)} prefixes")
        out = []
        for c, n in zip(completions, room, strict=True):
            if len(c.ids) > n:
                c = Completion(c.ids[:n], c.logprobs[:n], "length",
                               c.entropies[:n] if c.entropies is not None else None)
            out.append(c)
        return out

    def _extend(self, active: list[AgentTrajectory], completions: list[Completion],
                tokens: int | None) -> dict[int, float]:
        """Append each round's generated segment; returns the probe step entropy (over
        ``tokens`` tokens; None: not measured) of the trajectories whose round followed an
        undecided tool result (by ``id()``)."""
        probes = {}
        for t, c in zip(active, completions, strict=True):
            if tokens is not None:
                if c.entropies is None:
                    raise ValueError("branching needs the sampler's per-token entropies "
                                     "(Completion.entropies): sample with temperature > 0, "
                                     "with a generator that reports them")
                h = step_entropy(c.entropies, tokens, self.vocab_size)
                if t.root_entropy is None:
                    t.root_entropy = h
                elif t.awaiting:
                    t.tool_entropies.append(h)
                    probes[id(t)] = h
            t.awaiting = False
            t.append(Segment(list(c.ids), list(c.logprobs), trainable=True))
            if c.finish_reason in ("eos", "length"):
                t.finish_reason = c.finish_reason
        return probes

    def _call_tools(self, active: list[AgentTrajectory], completions: list[Completion]) -> None:
        """Run the calls that ended this round; append their results."""
        callers: list[AgentTrajectory] = []
        calls: list[ToolCall] = []
        for t, c in zip(active, completions, strict=True):
            if c.finish_reason != "stop" or t.finish_reason is not None:
                continue
            text = self.tokenizer.decode(c.ids, skip_special_tokens=True)
            call = self.toolbox.find_call(text)
            if call.tool is None:            # a stop string that is no tool's: the end
                t.finish_reason = "stop"
                continue
            callers.append(t)
            calls.append(call)
        over = [t.tool_calls >= self.max_tool_calls for t in callers]
        outcomes = self.toolbox.run([c for c, o in zip(calls, over, strict=True) if not o])
        results = iter(outcomes)
        texts = []
        for t, o in zip(callers, over, strict=True):
            if o:
                texts.append(self.toolbox.wrap(ToolOutcome(
                    f"error: the tool-call budget of {self.max_tool_calls} calls is used up",
                    True)))
                t.tool_errors += 1
                continue
            outcome = next(results)
            t.tool_calls += 1
            t.tool_errors += outcome.error
            texts.append(self.toolbox.wrap(outcome))
        if not texts:
            return
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        for t, ids in zip(callers, encoded, strict=True):
            room = self.max_new_tokens - t.length
            t.append(Segment(list(ids[:room]), None, trainable=False))
            if len(ids) >= room:                 # no room left to answer
                t.finish_reason = "length"
            else:
                t.awaiting = True

    def _branch(self, tree: RolloutTree, probes: dict[int, float],
                snapshots: dict[int, _Snapshot], rule: BranchingRule, rng: torch.Generator,
                consecutive: list[int], budget: int) -> list[bool]:
        """Branch decisions of this round, prompt by prompt in creation order; returns
        whether each prompt branched."""
        branched = [False] * len(tree.trajectories)
        for p, trajectories in enumerate(tree.trajectories):
            for t in list(trajectories):
                if id(t) not in probes or len(trajectories) >= budget:
                    continue
                tree.decisions[p] += 1
                delta = probes[id(t)] - t.root_entropy
                u = float(torch.rand((), generator=rng))
                if u >= rule.probability(delta, consecutive[p]):
                    continue
                copies = min(rule.beam_size - 1, budget - len(trajectories))
                for _ in range(copies):
                    trajectories.append(self._copy(t, snapshots[id(t)], len(trajectories)))
                t.branches += copies
                branched[p] = True
        return branched

    @staticmethod
    def _copy(t: AgentTrajectory, at: _Snapshot, new_id: int) -> AgentTrajectory:
        """A branch: ``t`` as it stood at ``at``, sharing those segments."""
        return AgentTrajectory(
            prompt=t.prompt, id=new_id, parent=t.id, segments=t.segments[:at.segments],
            completion_ids=t.completion_ids[:at.tokens], tool_calls=at.tool_calls,
            tool_errors=at.tool_errors, inserted=at.inserted, root_entropy=t.root_entropy,
            tool_entropies=t.tool_entropies[:at.tool_entropies])
