"""Generation behind a small interface: token-id prefixes in, completions with the sampler's
log-probs out.

``Generator.generate(prefixes, sampling)`` is all a rollout needs, single- or multi-turn: a
multi-turn (tool-using) rollout calls it again on ``prefix + completion + tool result`` with
a stop string at the tool-call tag. ``HFGenerator`` runs Hugging Face ``model.generate``; a
faster engine (vLLM, SGLang) plugs in by implementing the same method and returning the
log-probs of its processed distribution (after temperature / top-p), and for the agentic
trainers (ARPO / AEPO branch on the policy's uncertainty) that distribution's entropy at each
token (``Completion.entropies``; an engine that only returns top-k log-probs can report the
entropy of those).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    """How completions are sampled."""

    max_new_tokens: int = 16
    """Most tokens generated per call."""

    temperature: float = 1.0
    """Softmax temperature; 0 means greedy decoding."""

    top_p: float = 1.0
    """Nucleus sampling mass (1.0: off)."""

    stop_strings: tuple[str, ...] = ()
    """Generation of a row stops after any of these strings (kept in the completion)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")


@dataclass
class Completion:
    """One generated continuation."""

    ids: list[int]
    """Generated tokens, up to and including the end-of-sequence token or stop string."""
    logprobs: list[float]
    """The sampler's log-prob of each token (its processed distribution; 0 when greedy)."""
    finish_reason: str
    """``"eos"``, ``"stop"`` (a stop string) or ``"length"``."""
    entropies: list[float] | None = None
    """The entropy (nats) of the sampler's distribution at each token, the one the token was
    drawn from (after temperature / top-p); None when the generator does not report it
    (``HFGenerator``: greedy decoding). ARPO / AEPO branch on it."""


class Generator(Protocol):
    """What a rollout calls to extend token-id prefixes."""

    def generate(self, prefixes: Sequence[Sequence[int]],
                 sampling: SamplingParams) -> list[Completion]: ...


class _StopOnStrings:
    """Stopping criterion: a row is done once its decoded tail contains a stop string."""

    def __init__(self, tokenizer, stop_strings: Sequence[str], prompt_width: int):
        self.tokenizer, self.stop_strings, self.prompt_width = tokenizer, stop_strings, \
            prompt_width
        # A string of n characters spans at most n tokens (every token is >= 1 character).
        self.window = max(map(len, stop_strings))

    def __call__(self, input_ids: Tensor, scores: Tensor, **kwargs) -> Tensor:
        tails = input_ids[:, max(self.prompt_width, input_ids.shape[1] - self.window):]
        texts = self.tokenizer.batch_decode(tails, skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stop_strings) for t in texts],
                            device=input_ids.device)


def _truncate(ids: list[int], logprobs: list[float], eos_ids: set[int], tokenizer,
              stop_strings: Sequence[str], entropies: list[float] | None = None) -> Completion:
    """Cut at the first end-of-sequence token or stop string (kept), else ``length``."""
    def cut(n: int, reason: str) -> Completion:
        return Completion(ids[:n], logprobs[:n], reason,
                          entropies[:n] if entropies is not None else None)

    for i, token in enumerate(ids):
        if token in eos_ids:
            return cut(i + 1, "eos")
        if stop_strings:
            text = tokenizer.decode(ids[:i + 1], skip_special_tokens=True)
            if any(text.endswith(s) or s in text for s in stop_strings):
                return cut(i + 1, "stop")
    return cut(len(ids), "length")


class HFGenerator:
    """``Generator`` on Hugging Face ``model.generate`` (sampling with the global torch RNG).

    The sampler log-probs are ``log_softmax`` of ``generate``'s processed scores: the
    distribution after temperature and top-p, renormalised over what top-p kept. top-k and
    every other logits processor of the model's generation config are switched off. (Hugging
    Face keeps the ``[b, V]`` scores of every step until ``generate`` returns; an inference
    engine returns the log-probs directly.) ``batch_size``: prefixes per ``generate`` call
    (None: all at once).
    """

    def __init__(self, model, tokenizer, batch_size: int | None = None):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        eos = tokenizer.eos_token_id
        config_eos = getattr(model.generation_config, "eos_token_id", None)
        ids = {eos} if eos is not None else set()
        if config_eos is not None:
            ids |= set(config_eos) if isinstance(config_eos, list) else {config_eos}
        self.eos_ids = ids
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos

    @torch.no_grad()
    def generate(self, prefixes: Sequence[Sequence[int]],
                 sampling: SamplingParams) -> list[Completion]:
        size = self.batch_size or len(prefixes)
        out: list[Completion] = []
        for s in range(0, len(prefixes), size):
            out.extend(self._generate(prefixes[s:s + size], sampling))
        return out

    def _generate(self, prefixes: Sequence[Sequence[int]],
                  sampling: SamplingParams) -> list[Completion]:
        from transformers import GenerationConfig, StoppingCriteriaList

        device = self.model.device
        width = max(len(p) for p in prefixes)
        input_ids = torch.full((len(prefixes), width), self.pad_id, dtype=torch.int64)
        attention = torch.zeros_like(input_ids)
        for i, p in enumerate(prefixes):
            input_ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.int64)
            attention[i, width - len(p):] = 1
        greedy = sampling.temperature == 0
        config = GenerationConfig(
            max_new_tokens=sampling.max_new_tokens, do_sample=not greedy,
            temperature=None if greedy else sampling.temperature,
            # top_k=0, not None: None falls back to Hugging Face's default of 50.
            top_p=None if greedy else sampling.top_p, top_k=None if greedy else 0,
            pad_token_id=self.pad_id, eos_token_id=sorted(self.eos_ids) or None,
            output_scores=not greedy, return_dict_in_generate=True)
        stopping = StoppingCriteriaList()
        if sampling.stop_strings:
            stopping.append(_StopOnStrings(self.tokenizer, sampling.stop_strings, width))
        was_training = self.model.training
        self.model.eval()
        result = self.model.generate(input_ids=input_ids.to(device),
                                     attention_mask=attention.to(device),
                                     generation_config=config, stopping_criteria=stopping)
        self.model.train(was_training)
        new = result.sequences[:, width:].cpu()                                   # [b, n]
        entropies = None
        if greedy:
            logprobs = torch.zeros(new.shape, dtype=torch.float32)
        else:
            # One step at a time: never a [b, n, V] float32 copy of the scores.
            sampled = result.sequences[:, width:]
            per_step, step_entropy = [], []
            for k, step in enumerate(result.scores):
                logp = torch.log_softmax(step.float(), -1)                          # [b, V]
                per_step.append(logp.gather(-1, sampled[:, k:k + 1]).squeeze(-1))
                # entr(p) = -p log p, 0 where top-p removed a token (p = 0).
                step_entropy.append(torch.special.entr(logp.exp()).sum(-1))
            logprobs = torch.stack(per_step, 1).cpu()                             # [b, n]
            entropies = torch.stack(step_entropy, 1).cpu().tolist()               # [b, n]
        return [_truncate(ids, lps, self.eos_ids, self.tokenizer, sampling.stop_strings,
                          entropies[i] if entropies is not None else None)
                for i, (ids, lps) in enumerate(zip(new.tolist(), logprobs.tolist(),
                                                   strict=True))]
