"""Rewards: Python functions on the decoded text (or token ids), or a reward model.

A reward function follows TRL's convention: it is called with keyword lists, one entry per
completion, and returns one float per completion::

    fn(prompts=[...], completions=[...], completion_ids=[[...], ...], finished=[...],
       **columns) -> list[float] | Tensor   # columns: the prompt dataset's other keys

``finished`` says whether generation stopped by itself. Several functions are summed with
weights (``{"name": (fn, weight)}``). ``RewardModel`` wraps an
``AutoModelForSequenceClassification`` (a local path or an in-memory model) as one more
such function.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

RewardFunction = Callable[..., "Sequence[float] | Tensor"]


def normalize_reward_functions(functions) -> dict[str, tuple[RewardFunction, float]]:
    """``{name: (fn, weight)}`` from a callable, a list of callables, or a mapping of name ->
    callable or (callable, weight)."""
    if callable(functions):
        functions = [functions]
    if isinstance(functions, Mapping):
        items = functions.items()
    elif isinstance(functions, Sequence) and functions:
        items = [(getattr(f, "__name__", type(f).__name__), f) for f in functions]
    else:
        raise TypeError("reward_functions must be a callable, a non-empty list of callables or "
                        "a dict of name -> callable or (callable, weight)")
    out = {}
    for name, entry in items:
        fn, weight = entry if isinstance(entry, tuple) else (entry, 1.0)
        if not callable(fn):
            raise TypeError(f"reward function {name!r} is not callable: {fn!r}")
        out[str(name)] = (fn, float(weight))
    return out


def call_reward(name: str, fn: RewardFunction, size: int, **inputs) -> Tensor:
    """Call one reward function and check it gave ``size`` finite-or-NaN floats."""
    value = fn(**inputs)
    try:
        scores = torch.as_tensor(value, dtype=torch.float32).detach().cpu()
    except (TypeError, ValueError) as error:
        raise TypeError(f"reward function {name!r} must return {size} floats, got "
                        f"{type(value).__name__}") from error
    if tuple(scores.shape) != (size,):
        raise ValueError(f"reward function {name!r} returned shape {tuple(scores.shape)}, "
                         f"expected [{size}] (one float per completion)")
    return scores


class RewardModel:
    """A sequence-classification model as a reward function: the score of ``prompt +
    completion`` is the model's first logit.

    ``model``: a local path or an ``AutoModelForSequenceClassification``; ``tokenizer``: its
    tokenizer (loaded from the path when None). ``batch_size``: texts per forward pass.
    """

    def __init__(self, model, tokenizer=None, *, batch_size: int = 32):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if isinstance(model, str):
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(model)
            model = AutoModelForSequenceClassification.from_pretrained(model)
        if tokenizer is None:
            raise ValueError("RewardModel needs the model's tokenizer")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        check_reward_model(model, tokenizer)
        self.model = model.eval().requires_grad_(False)
        self.tokenizer, self.batch_size = tokenizer, batch_size
        self.__name__ = "reward_model"

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **_) -> Tensor:
        texts = [p + c for p, c in zip(prompts, completions, strict=True)]
        device = next(self.model.parameters()).device
        scores = []
        for s in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[s:s + self.batch_size], return_tensors="pt",
                                 padding=True).to(device)
            scores.append(self.model(**enc).logits[:, 0].float().cpu())
        return torch.cat(scores)


def check_reward_model(model, tokenizer) -> None:
    """A reward model gives one score per text, and its tokenizer must be its own: every id
    inside its embedding, and the padding id the one the model skips when it picks the last
    token's score (``config.pad_token_id``; set from the tokenizer when the config has
    none)."""
    name = type(model).__name__
    config = getattr(model, "config", None)
    labels = getattr(config, "num_labels", None)
    if labels != 1:
        raise ValueError(f"reward model {name} has {labels} outputs (num_labels={labels}); a "
                         "reward model scores each text with 1 (load it with num_labels=1)")
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ValueError(f"the reward model's tokenizer has {len(tokenizer)} tokens but "
                         f"{name}'s embedding has {rows} rows: the tokenizer does not belong "
                         "to the reward model (pass the reward model's own tokenizer; the "
                         "policy's may differ, completions reach the reward model as text)")
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    elif config.pad_token_id != tokenizer.pad_token_id:
        raise ValueError(f"the reward model's tokenizer pads with id {tokenizer.pad_token_id} "
                         f"but {name} skips id {config.pad_token_id} "
                         "(config.pad_token_id) when it picks the last token: the tokenizer "
                         "does not belong to the reward model")
