"""A tiny Qwen2-shaped causal LM built from a config, and its short supervised warm-up.

RL needs a policy that already solves some prompts (a group whose rewards are all equal has
no advantage). ``warm_up`` teacher-forces demonstrations of the task for a few hundred steps.
The demonstrations are imperfect on purpose, like much real fine-tuning data: in
``restate_fraction`` of them the writer restates the result after the answer (``"16=16"``
instead of ``"16"``). The warmed-up model can add, but its greedy answer usually has the
wrong form, so the exact-match reward has something to teach within a few CPU minutes: stop
after the answer. (Improving the arithmetic itself takes far more samples at this scale.)
``warmed_up_tiny_model`` caches the result (``save_pretrained`` + tokenizer) keyed by
everything that determines it, so tests and repeated runs pay for it once.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .tokenizer import char_tokenizer, load_tokenizer


@dataclass(frozen=True)
class TinyModelConfig:
    """Shape of the embedded model (Qwen2: RMSNorm, RoPE, SwiGLU, GQA, tied embeddings)."""

    hidden_size: int = 96
    """Width of the residual stream."""

    num_layers: int = 3
    """Decoder layers."""

    num_heads: int = 4
    """Attention heads (head dim = hidden_size / num_heads)."""

    num_kv_heads: int = 2
    """Key/value heads (grouped-query attention)."""

    intermediate_size: int = 256
    """Width of the SwiGLU MLP."""

    max_positions: int = 64
    """Context length (prompt + completion)."""


@dataclass(frozen=True)
class WarmupConfig:
    """The supervised warm-up: teacher-forced answers, loss on the completion tokens."""

    steps: int = 200
    """Optimiser steps."""

    batch_size: int = 64
    """Examples per step."""

    lr: float = 3e-3
    """AdamW learning rate (cosine decay to 10%)."""

    seed: int = 0
    """Seeds the initial weights and the examples."""

    restate_fraction: float = 0.6
    """Share of demonstrations that restate the result after the answer (``16=16``)."""


def tiny_model(tokenizer, shape: TinyModelConfig = TinyModelConfig(), seed: int = 0):
    """A freshly initialised ``Qwen2ForCausalLM`` for ``tokenizer``'s vocabulary, float32."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size, num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_kv_heads,
        max_position_embeddings=shape.max_positions, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def supervised_batch(tokenizer, examples: list[dict],
                     completions: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Left-padded ``prompt + completion + <eos>`` ids (completion: the answer unless
    given) with labels on the completion and ``<eos>`` only (-100 elsewhere); position ids
    count from the first real token."""
    rows, labels = [], []
    completions = completions or [ex["answer"] for ex in examples]
    for ex, completion in zip(examples, completions, strict=True):
        prompt = tokenizer(ex["prompt"])["input_ids"]
        answer = tokenizer(completion, add_special_tokens=False)["input_ids"]
        rows.append(prompt + answer + [tokenizer.eos_token_id])
        labels.append([-100] * len(prompt) + answer + [tokenizer.eos_token_id])
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    label_ids = torch.tensor([[-100] * (width - len(r)) + r for r in labels])
    attention = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": attention, "position_ids": positions,
            "labels": label_ids}


def demonstration(example: dict, restate: bool) -> str:
    """The demonstrated completion: the answer, or the answer then ``=`` and the answer."""
    return f"{example['answer']}={example['answer']}" if restate else example["answer"]


def demonstration_batch(task, tokenizer, rng: random.Random,
                        config: WarmupConfig) -> dict[str, torch.Tensor]:
    """One warm-up batch: the task's own ``demonstration_batch`` when it has one (the
    agentic task's multi-turn demonstrations), else answers restated in
    ``restate_fraction`` of them."""
    if hasattr(task, "demonstration_batch"):
        return task.demonstration_batch(tokenizer, rng, config)
    examples = task.train_prompts(config.batch_size, seed=rng.randrange(2**31))
    completions = [demonstration(ex, rng.random() < config.restate_fraction)
                   for ex in examples]
    return supervised_batch(tokenizer, examples, completions)


def warm_up(model, tokenizer, task, config: WarmupConfig = WarmupConfig()):
    """Teacher-force demonstrations of ``task`` for ``config.steps`` steps (in place);
    returns the model."""
    import torch.nn.functional as F

    rng = random.Random(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.steps,
                                                          eta_min=config.lr * 0.1)
    model.train()
    for _ in range(config.steps):
        batch = demonstration_batch(task, tokenizer, rng, config)
        labels = batch.pop("labels")
        logits = model(**batch, use_cache=False).logits[:, :-1]     # [B, L-1, V]
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    return model


def _cache_key(task, shape: TinyModelConfig, warmup: WarmupConfig) -> str:
    import transformers

    spec = {"task": repr(task), "shape": asdict(shape), "warmup": asdict(warmup),
            "transformers": transformers.__version__.split(".")[0], "torch": torch.__version__}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def warmed_up_tiny_model(task, cache_dir: str | Path, *,
                         shape: TinyModelConfig | None = None,
                         warmup: WarmupConfig | None = None):
    """(model, tokenizer): the tiny model warmed up on ``task``, built once per cache key.

    The first call builds and trains it (deterministic for a seed on one machine) and saves
    it under ``cache_dir/tiny-<task>-<key>/``; later calls load that directory, which is also
    a valid ``--model PATH``. A task may bring its own ``tokenizer()``, ``tiny_shape``,
    ``warmup_config`` and ``demonstration_batch`` (the agentic task does); ``shape`` and
    ``warmup`` default to the task's, else to ``TinyModelConfig()`` / ``WarmupConfig()``.
    """
    from transformers import AutoModelForCausalLM

    shape = shape or getattr(task, "tiny_shape", TinyModelConfig())
    warmup = warmup or getattr(task, "warmup_config", WarmupConfig())
    path = Path(cache_dir) / f"tiny-{task.name}-{_cache_key(task, shape, warmup)}"
    if (path / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        return model.eval(), load_tokenizer(path)
    tokenizer = task.tokenizer() if hasattr(task, "tokenizer") else char_tokenizer()
    model = warm_up(tiny_model(tokenizer, shape, seed=warmup.seed), tokenizer, task, warmup)
    tmp = path.with_name(path.name + f".tmp{random.randrange(2**31)}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.replace(path) if not path.exists() else None
    return model, tokenizer
