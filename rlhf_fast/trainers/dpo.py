"""DPO (Rafailov et al. 2023) and the preference-loss family, offline on pairs or online on
pairs the policy samples and the reward functions rank.

    L(theta) = -E_{(x, y_w, y_l)} log sigma(beta [log pi(y_w|x)/pi_ref(y_w|x)
                                                 - log pi(y_l|x)/pi_ref(y_l|x)])
    log pi(y|x) = sum_t log pi(y_t | x, y_<t)                (over the completion and <eos>)

Line by line in this trainer:

- (x, y_w, y_l): ``pairs.py`` (a JSONL file, a ``datasets`` dataset or dicts; for the
  embedded tasks ``arithmetic_pairs``: the answer against a wrong one), tokenized once,
  drawn in a seeded order that is reshuffled at each pass over the data; or, with
  ``online=True``, ``group_size`` samples of each prompt scored by the reward functions, the
  best against the worst (groups whose rewards all tie give no pair: more prompts are
  sampled, up to ``max_generation_batches`` rounds);
- log pi_ref: ``reference_logprobs="precompute"`` runs the frozen reference once over the
  whole dataset at the first step (``linear_token_logprobs``) and frees it (online: once per
  sampled batch); ``"per_batch"`` keeps it and feeds its hidden states to the loss, which
  computes its log-probs chunk by chunk (``ref_hidden``): the same numbers either way;
- the loss, with beta, ``loss_type`` (every type of ``rlhf_fast.dpo_loss``: sigmoid, ipo,
  hinge, robust, exo_pair, nca_pair, bco_pair, sppo_hard, apo_zero, apo_down, discopop,
  simpo, orpo), label smoothing and RPO's NLL term (``nll_coef``):
  ``linear_dpo_loss`` on the backbone's hidden states of the stacked ``[chosen; rejected]``
  rows, so the ``[2B, T, V]`` logits never exist.

Exact mini-batches: a mini-batch is one optimiser step; each micro-batch's call is scaled by
its share of the mini-batch's pairs (``loss_scale``), and RPO's NLL weight by its share of the
chosen tokens, both counted through ``BatchStatistics`` (every rank), so micro-batches add
up to the one-call gradient.

Metrics (``dpo/...``): the implicit rewards ``beta * (log pi - log pi_ref)`` of chosen and
rejected, their margin and the reward accuracy (share of pairs with chosen above rejected),
the sequence log-probs and the NLL; ``eval/pair_accuracy`` and ``eval/pair_margin`` on
held-out pairs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .. import reference
from ..config import PolicyLossConfig
from ..ops.dpo import PreferenceLossOutput
from ..ops.linear_dpo import linear_dpo_loss
from ..preference_config import PreferenceLossConfig, preference_config
from .config import TrainerConfig
from .core import Trainer
from .losses import sequence_logprobs
from .pairs import PairBatch, TokenizedPair, load_pairs, tokenize_pair

PAIR_METRICS = ("rewards_chosen", "rewards_rejected", "rewards_margin", "rewards_accuracy",
                "logps_chosen", "logps_rejected")


@dataclass(frozen=True)
class DPOConfig(TrainerConfig):
    """DPO and the preference losses. Sizes are in pairs, except ``batch_size`` online."""

    loss: PolicyLossConfig = field(default_factory=lambda: PolicyLossConfig.preset("ppo"))
    """Not used by DPO (the policy-gradient loss of the RL trainers); the preference loss is
    set by ``beta``, ``loss_type`` and the fields below."""

    batch_size: int = 64
    """Pairs per step (offline); online: completions sampled per step, ``batch_size /
    group_size`` prompts, each giving at most one pair."""

    group_size: int = 1
    """Online: completions per prompt (>= 2), ranked by reward; unused offline."""

    lr: float = 1e-6
    """AdamW learning rate (TRL's DPO default)."""

    beta: float = 0.1
    """beta: scale of the implicit reward (the KL strength)."""

    loss_type: str = "sigmoid"
    """Any ``rlhf_fast.dpo_loss`` loss type (sigmoid = DPO)."""

    label_smoothing: float = 0.0
    """Conservative DPO / robust / EXO / SimPO epsilon."""

    average_logprobs: bool | None = None
    """Per-token mean instead of sum of the sequence log-probs; None: the loss type's
    default (True for ipo, simpo, orpo)."""

    nll_coef: float = 0.0
    """RPO's alpha: weight of the chosen completions' NLL (token mean) added to the loss."""

    simpo_gamma: float = 0.0
    """SimPO's target margin gamma (``loss_type="simpo"`` only)."""

    discopop_tau: float = 0.05
    """DiscoPOP's temperature (``loss_type="discopop"`` only)."""

    reference_free: bool = False
    """Drop the reference model (its log-probs are 0)."""

    reference_logprobs: str = "precompute"
    """``precompute``: the reference's sequence log-probs once over the whole dataset at the
    first step, then the reference model is freed (online: once per sampled batch);
    ``per_batch``: keep the reference model, the loss computes its log-probs from its hidden
    states in every micro-batch."""

    online: bool = False
    """Iterative online DPO: pairs from the policy's own samples, ranked by the reward
    functions."""

    max_generation_batches: int = 10
    """Online: sampling rounds allowed per step to find ``batch_size / group_size`` pairs."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.preference  # noqa: B018  (checks the preference-loss fields)
        if self.reference_logprobs not in ("precompute", "per_batch"):
            raise ValueError(f"reference_logprobs must be 'precompute' or 'per_batch', got "
                             f"{self.reference_logprobs!r}")
        if self.online and self.group_size < 2:
            raise ValueError(f"online DPO ranks group_size >= 2 samples of each prompt, got "
                             f"group_size={self.group_size}")
        if self.max_generation_batches < 1:
            raise ValueError("max_generation_batches must be >= 1")

    @property
    def preference(self) -> PreferenceLossConfig:
        """The checked preference-loss hyper-parameters (at the sampling temperature)."""
        return preference_config(beta=self.beta, loss_type=self.loss_type,
                                 label_smoothing=self.label_smoothing,
                                 average_logprobs=self.average_logprobs,
                                 nll_coef=self.nll_coef, gamma=self.simpo_gamma,
                                 reference_free=self.reference_free,
                                 temperature=self.temperature,
                                 discopop_tau=self.discopop_tau)


def pair_loss(policy, ref_policy, batch: PairBatch, config: PreferenceLossConfig, *,
              loss_scale: float = 1.0, mode: str = "fused",
              backend: str = "auto") -> PreferenceLossOutput:
    """The preference loss of one micro-batch of pairs (differentiable w.r.t. the policy).

    The reference enters as ``batch.ref_logprobs`` when precomputed, else from
    ``ref_policy``: its hidden states into ``linear_dpo_loss`` (fused), or its materialised
    logits (reference mode). ``mode="reference"``: ``rlhf_fast.reference.dpo_loss`` on the
    policy's materialised float32 logits, times ``loss_scale``.
    """
    device = policy.weight.device
    rows = batch.rows
    hidden = policy.completion_hidden(rows)                                 # [2b, T, H]
    targets, mask = rows.targets.to(device), rows.loss_mask.to(device)     # [2b, T]
    ref = batch.ref_logprobs.to(device) if batch.ref_logprobs is not None else None
    needs_ref = config.uses_reference and ref is None
    if mode == "fused":
        ref_hidden = ref_weight = None
        if needs_ref and ref_policy.bias is None:
            with torch.no_grad():
                ref_hidden, ref_weight = ref_policy.completion_hidden(rows), ref_policy.weight
        elif needs_ref:            # the fused reference path has no head bias: log-probs
            ref = reference_sums(ref_policy, rows, config.temperature, backend=backend)
        return linear_dpo_loss(
            hidden, policy.weight, targets, mask, bias=policy.bias,
            ref_logprobs=ref if config.uses_reference else None, ref_hidden=ref_hidden,
            ref_weight=ref_weight, beta=config.beta, loss_type=config.loss_type,
            label_smoothing=config.label_smoothing, average_logprobs=config.average_logprobs,
            nll_coef=config.nll_coef, gamma=config.gamma,
            reference_free=config.reference_free, temperature=config.temperature,
            discopop_tau=config.discopop_tau if config.loss_type == "discopop" else None,
            loss_scale=loss_scale, backend=backend)
    if mode != "reference":
        raise ValueError(f"loss mode must be 'fused' or 'reference', got {mode!r}")
    if needs_ref:
        ref = reference_sums(ref_policy, rows, config.temperature, mode="reference")
    logits = torch.nn.functional.linear(hidden, policy.weight, policy.bias)   # [2b, T, V]
    loss, chosen, rejected, metrics = reference.dpo_loss(
        logits.float(), targets, mask, ref_logprobs=ref, config=config)
    return PreferenceLossOutput(loss * loss_scale, chosen, rejected, metrics)


def reference_sums(ref_policy, rows, temperature: float, *, mode: str = "fused",
                   backend: str = "auto") -> Tensor:
    """``[2b]`` float32 reference log-probs of the rows' completions, summed."""
    return sequence_logprobs(ref_policy, rows, temperature, mode=mode,
                             backend=backend).sum(-1)


class DPOTrainer(Trainer):
    """DPO on pairs (``data``: see ``pairs.load_pairs``) or, with ``config.online``, on
    sampled pairs of ``data``'s prompts ranked by ``reward_functions``.

    ``eval_pairs``: held-out pairs whose reward accuracy and margin ``evaluate`` logs;
    ``eval_prompts`` / ``accuracy_reward`` as in the core (greedy decoding scored by the
    reward functions).
    """

    config_class = DPOConfig

    def __init__(self, model, tokenizer, data, reward_functions=None,
                 config: DPOConfig | None = None, *, eval_pairs=None, **kwargs):
        config = config if config is not None else DPOConfig()
        if isinstance(config, DPOConfig) and config.online:
            if not reward_functions:
                raise ValueError("online DPO ranks sampled completions by reward: pass "
                                 "reward_functions")
            self.pairs, prompts = None, data
        else:
            self.pairs = load_pairs(data)
            prompts = [{"prompt": p["prompt"]} for p in self.pairs]
        super().__init__(model, tokenizer, prompts, reward_functions or {}, config, **kwargs)
        self.preference = self.config.preference
        context = getattr(self.policy.causal_lm.config, "max_position_embeddings", None)
        self.tokenized = ([tokenize_pair(tokenizer, p, i, context, self.prompt_ids[i])
                           for i, p in enumerate(self.pairs)] if self.pairs else [])
        self.eval_pairs = load_pairs(eval_pairs) if eval_pairs is not None else None
        self.eval_tokenized = ([tokenize_pair(tokenizer, p, i, context)
                                for i, p in enumerate(self.eval_pairs)]
                               if self.eval_pairs else [])
        self.reference_cache: dict[str, Tensor] | None = None
        self.pair_order = torch.zeros(0, dtype=torch.int64)
        self.pair_cursor = 0
        self.sampling_stats: dict[str, float] = {}

    @property
    def needs_reference(self) -> bool:
        return self.config.preference.uses_reference

    @property
    def evaluates(self) -> bool:
        return self.eval_prompts is not None or self.eval_pairs is not None

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else 0

    # --- 1. pairs ------------------------------------------------------------------------

    def collect(self) -> PairBatch:
        """The step's pairs: the next ``batch_size`` of the dataset, or sampled online."""
        if self.config.online:
            return self.sample_pairs()
        c = self.config
        picked = []
        while len(picked) < c.batch_size:
            if self.pair_cursor >= len(self.pair_order):       # a new pass over the data
                self.pair_order = torch.randperm(len(self.tokenized),
                                                 generator=self.prompt_rng)
                self.pair_cursor = 0
            take = min(c.batch_size - len(picked), len(self.pair_order) - self.pair_cursor)
            picked += self.pair_order[self.pair_cursor:self.pair_cursor + take].tolist()
            self.pair_cursor += take
        # Data-parallel: every rank draws the same global pairs and keeps its share.
        share = c.batch_size // self.world_size
        picked = picked[self.rank * share:(self.rank + 1) * share]
        return PairBatch.collate([self.tokenized[i] for i in picked], picked, pad_id=self.pad_id)

    def sample_pairs(self) -> PairBatch:
        """Online: ``group_size`` samples per prompt; in each group whose rewards differ,
        the highest-scored completion is chosen and the lowest rejected. Data-parallel: each
        rank samples its share of the prompts and wants its share of the pairs; every rank
        samples as many rounds as the one that needs most."""
        c, stats = self.config, self.statistics
        want, pairs, rewards, rounds = c.prompts_per_step // self.world_size, [], [], 0

        def fewest() -> int:          # the fewest pairs any rank holds
            return -int(stats.all_reduce_max(torch.tensor(-len(pairs), dtype=torch.int64)))

        while fewest() < want:
            if rounds == c.max_generation_batches:
                raise RuntimeError(f"online DPO found {fewest()} of {want} pairs in "
                                   f"{rounds} sampling rounds: every group's rewards tied "
                                   "(raise group_size or temperature, or check the reward)")
            rounds += 1
            batch = self.rollout(self.sample_prompts(c.prompts_per_step))
            self.score(batch)
            rewards.append(batch.rewards)
            grouped = batch.rewards.view(-1, c.group_size)                  # [prompts, G]
            ids, prompt_ids = batch.completion_ids(), self._prompt_rows(batch)
            for g in range(grouped.shape[0]):
                if len(pairs) == want or grouped[g].max() == grouped[g].min():
                    continue
                best = g * c.group_size + int(grouped[g].argmax())
                worst = g * c.group_size + int(grouped[g].argmin())
                pairs.append(TokenizedPair(prompt_ids[best], ids[best], ids[worst]))
        scores = torch.cat(rewards)
        self.sampling_stats = {"reward/mean": self.statistics.mean(scores),
                               "dpo/sampling_rounds": float(rounds)}
        return PairBatch.collate(pairs, [-1] * len(pairs), pad_id=self.pad_id)

    @staticmethod
    def _prompt_rows(batch) -> list[list[int]]:
        """Each row's prompt ids (without the left padding)."""
        prompt = batch.input_ids[:, :batch.prompt_width]
        real = batch.attention_mask[:, :batch.prompt_width].bool()
        return [row[keep].tolist() for row, keep in zip(prompt, real, strict=True)]

    # --- 2. reference log-probs ----------------------------------------------------------

    @torch.no_grad()
    def prepare_logprobs(self, batch: PairBatch) -> None:
        """``precompute``: the batch's reference sums from the dataset-wide cache (built at
        the first call, then the reference model is freed) or, online, computed now;
        ``per_batch``: nothing (the loss reads the reference model)."""
        c = self.config
        if not self.preference.uses_reference or c.reference_logprobs != "precompute":
            return
        if c.online:
            batch.ref_logprobs = self._reference_sums(batch)
            return
        if self.reference_cache is None:
            self.reference_cache = {"train": self._dataset_sums(self.tokenized),
                                    "eval": self._dataset_sums(self.eval_tokenized)}
            self.reference = None       # its log-probs are all known now: free the copy
        sums = self.reference_cache["train"]                                  # [N, 2]
        batch.ref_logprobs = torch.cat([sums[batch.index, 0], sums[batch.index, 1]])

    def _reference_sums(self, batch: PairBatch) -> Tensor:
        """``[2B]`` reference sums of a pair batch, micro-batch by micro-batch."""
        c = self.config
        parts = [reference_sums(self.reference, m.rows, c.temperature, mode=c.loss_impl,
                                backend=c.backend).cpu() for m in batch.split(c.micro)]
        chosen = torch.cat([p[:len(p) // 2] for p in parts])
        rejected = torch.cat([p[len(p) // 2:] for p in parts])
        return torch.cat([chosen, rejected])

    def _dataset_sums(self, tokenized: list[TokenizedPair]) -> Tensor:
        """``[N, 2]`` reference sums (chosen, rejected) of every pair."""
        out = torch.zeros(len(tokenized), 2)
        for s in range(0, len(tokenized), self.config.micro):
            index = list(range(s, min(s + self.config.micro, len(tokenized))))
            batch = PairBatch.collate([tokenized[i] for i in index], index, pad_id=self.pad_id)
            sums = self._reference_sums(batch)
            out[s:s + len(index)] = sums.view(2, -1).T
        return out

    def compute_advantages(self, batch: PairBatch) -> None:
        """DPO has no advantages: the pairs' preference is the signal."""

    # --- 3. update -------------------------------------------------------------------------

    def backward(self, mini_batch: PairBatch) -> dict[str, float]:
        """Accumulate the mini-batch's gradient: each micro-batch's loss is scaled by its
        share of the (global) pairs, RPO's NLL weight by its share of the chosen tokens."""
        c, stats, pref = self.config, self.statistics, self.preference
        pairs = float(stats.all_reduce_sum(torch.tensor(float(mini_batch.size),
                                                        dtype=torch.float64)))
        pairs *= stats.world_scale
        tokens = float(stats.all_reduce_sum(mini_batch.chosen_tokens.double()))
        tokens = max(tokens, 1.0) * stats.world_scale
        losses, parts = [], []
        with self._model_mode(train=c.gradient_checkpointing):
            for micro in mini_batch.split(c.micro):
                scale = micro.size / pairs
                config = pref
                if pref.nll_weight != 0:
                    weight = pref.nll_weight * (float(micro.chosen_tokens) / tokens) / scale
                    config = self._with_nll_weight(weight)
                out = pair_loss(self.policy, self.reference, micro, config, loss_scale=scale,
                                mode=c.loss_impl, backend=c.backend)
                out.loss.backward()
                losses.append(out.loss.detach().double().cpu())
                parts.append({**{k: v.detach().double().cpu() for k, v in out.metrics.items()},
                              "pairs": torch.tensor(float(micro.size), dtype=torch.float64),
                              "tokens": micro.chosen_tokens.double()})
        counts = torch.stack([p["pairs"] for p in parts])
        metrics = {"policy/loss": float(stats.all_reduce_sum(torch.stack(losses).sum()))
                   * stats.world_scale}
        for key in PAIR_METRICS:
            metrics[f"dpo/{key}"] = stats.mean(torch.stack([p[key] for p in parts]), counts)
        metrics["dpo/nll"] = stats.mean(torch.stack([p["nll"] for p in parts]),
                                        torch.stack([p["tokens"] for p in parts]))
        return metrics

    def _with_nll_weight(self, weight: float) -> PreferenceLossConfig:
        """The preference config whose NLL weight inside one call is ``weight``."""
        pref = self.preference
        nll_coef = weight - (pref.nll_weight - pref.nll_coef)   # orpo's own weight is 1
        if nll_coef < 0:
            raise ValueError(
                f"loss_type={pref.loss_type!r} ties its NLL weight to the pair term inside one "
                "loss call, which a micro-batch cannot rescale separately: set "
                "micro_batch_size = mini_batch_size")
        return preference_config(
            beta=pref.beta, loss_type=pref.loss_type, label_smoothing=pref.label_smoothing,
            average_logprobs=pref.average_logprobs, nll_coef=nll_coef, gamma=pref.gamma,
            reference_free=pref.reference_free, temperature=pref.temperature,
            discopop_tau=pref.discopop_tau)

    # --- metrics, evaluation, state ------------------------------------------------------

    def batch_metrics(self, batch: PairBatch) -> dict[str, float]:
        stats, b = self.statistics, batch.size
        lengths = batch.loss_mask.sum(-1).float()
        return {"dpo/pairs": float(stats.all_reduce_sum(torch.tensor(float(b)))),
                "dpo/chosen_length": stats.mean(lengths[:b]),
                "dpo/rejected_length": stats.mean(lengths[b:]), **self.sampling_stats}

    @torch.no_grad()
    def evaluate(self, prompts=None) -> dict[str, float]:
        """The core's greedy evaluation (with ``eval_prompts``), plus the held-out pairs'
        reward accuracy and margin (with ``eval_pairs``)."""
        out = super().evaluate(prompts)
        if not self.eval_tokenized:
            return out
        c, stats = self.config, self.statistics
        sums = self.reference_cache["eval"] if self.reference_cache is not None else None
        accuracy, margin, counts = [], [], []
        with self._model_mode(train=False):
            for s in range(0, len(self.eval_tokenized), c.micro):
                index = list(range(s, min(s + c.micro, len(self.eval_tokenized))))
                batch = PairBatch.collate([self.eval_tokenized[i] for i in index], index,
                                          pad_id=self.pad_id)
                if sums is not None:
                    batch.ref_logprobs = torch.cat([sums[index, 0], sums[index, 1]])
                elif self.preference.uses_reference and c.reference_logprobs == "precompute":
                    batch.ref_logprobs = self._reference_sums(batch)
                m = pair_loss(self.policy, self.reference, batch, self.preference,
                              mode=c.loss_impl, backend=c.backend).metrics
                accuracy.append(m["rewards_accuracy"].double().cpu())
                margin.append(m["rewards_margin"].double().cpu())
                counts.append(torch.tensor(float(len(index)), dtype=torch.float64))
        weights = torch.stack(counts)
        out["eval/pair_accuracy"] = stats.mean(torch.stack(accuracy), weights)
        out["eval/pair_margin"] = stats.mean(torch.stack(margin), weights)
        return out

    def extra_state(self) -> dict:
        return {"pair_order": self.pair_order, "pair_cursor": self.pair_cursor}

    def load_extra_state(self, state: dict) -> None:
        self.pair_order, self.pair_cursor = state["pair_order"], state["pair_cursor"]

