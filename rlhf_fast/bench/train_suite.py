"""The ``train`` suite: one full GRPO or PPO training step, fused loss against the reference
loss.

A step here is everything a trainer does after generation and scoring, which do not depend
on the loss: the reference model's log-probs (GRPO's KL term), the group advantages, then
one optimiser step (backbone forward, policy loss, backward, gradient clipping, AdamW).
The ``ppo step`` mode is the four-model step of ``PPOTrainer``: old and reference
log-probs, the critic's values (a separate backbone copy with a value head), the KL-penalised
token rewards, GAE, then one optimiser step of the actor and the critic.
``rlhf_fast`` runs it with ``linear_policy_loss`` / ``linear_token_logprobs`` on hidden
states (the ``[tokens, vocab]`` logits never exist); ``reference`` runs the same trainer
with ``loss_impl="reference"``: the autograd formulas on materialised float32 logits, as a
plain PyTorch trainer does. Same model (a Qwen2-shaped causal LM built from a config: two
layers, tied embeddings), same batch, same seed.

The shapes are where the logits dominate: a large vocabulary and long completions on a
small backbone. A step also runs the backbone, so no hardware ceiling is claimed for it: the
figures that matter are the fused step's time and peak memory against the reference's.
"""

from __future__ import annotations

from dataclasses import asdict

import torch

from .case import Case
from .measure import median_ms, peak_extra_mib

SUITE = "train"
IMPLS = ("rlhf_fast", "reference")
MODES = ("grpo step", "ppo step")
PROMPT_LEN = 16
GROUP = 2
# (sequences, completion tokens, hidden size, vocabulary, dtype)
QUICK_SHAPES = {"cpu": [(2, 256, 64, 32000, "float32")],
                "cuda": [(8, 1024, 896, 151936, "bfloat16")]}
FULL_SHAPES = {"cpu": [(8, 512, 64, 65536, "float32")],
               "cuda": [(16, 2048, 1536, 151936, "bfloat16"),
                        (32, 4096, 1536, 151936, "bfloat16")]}
TINY_SHAPES = [(2, 16, 64, 512, "float32")]
"""``--shapes tiny``: the harness end to end in seconds (tests); the timings mean nothing."""


def useful_bytes(case: Case) -> int:
    return 0


def cases(shapes: str, device: torch.device) -> list[Case]:
    grid = {"quick": QUICK_SHAPES[device.type], "full": FULL_SHAPES[device.type],
            "tiny": TINY_SHAPES}[shapes]
    return [Case(b * t, v, dtype, mode, h) for mode in MODES for b, t, h, v, dtype in grid]


class _Tokens:
    """The tokenizer surface the trainer touches when it is handed ready-made batches."""

    padding_side, pad_token_id, eos_token_id = "left", 0, 2

    def __call__(self, text: str) -> dict:
        return {"input_ids": list(range(1, PROMPT_LEN + 1))}


def make_trainer(case: Case, impl: str, device: torch.device):
    """(trainer, batch): a GRPO (or PPO) trainer on a fresh model and a synthetic rollout
    batch of ``case.n / T`` completions with lengths between T/2 and T."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from ..trainers import (
        GRPOConfig,
        GRPOTrainer,
        PPOConfig,
        PPOTrainer,
        RolloutBatch,
        Segment,
        Trajectory,
    )

    dtype = getattr(torch, case.dtype)
    grids = QUICK_SHAPES[device.type] + FULL_SHAPES[device.type] + TINY_SHAPES
    sequences = next(b for b, t, h, v, d in grids
                     if b * t == case.n and h == case.h and v == case.v)
    seq_len = case.n // sequences
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=case.v, hidden_size=case.h, intermediate_size=4 * case.h,
                         num_hidden_layers=2, num_attention_heads=max(1, case.h // 64),
                         num_key_value_heads=1, max_position_embeddings=PROMPT_LEN + seq_len,
                         tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config).to(device=device, dtype=dtype)
    loss_impl = "fused" if impl == "rlhf_fast" else "reference"
    if case.mode == "ppo step":     # one epoch, KL to the reference in the reward
        cls, settings = PPOTrainer, PPOConfig(batch_size=sequences, group_size=GROUP,
                                              max_new_tokens=seq_len, lr=1e-6, epochs=1,
                                              loss_impl=loss_impl)
    else:
        cls, settings = GRPOTrainer, GRPOConfig(batch_size=sequences, group_size=GROUP,
                                                max_new_tokens=seq_len, lr=1e-6,
                                                loss_impl=loss_impl)
    trainer = cls(model, _Tokens(), ["p"], lambda completions, **_: [0.0] * len(
        completions), settings)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(seq_len // 2, seq_len + 1, (sequences,), generator=g).tolist()
    rows = [Trajectory(list(range(1, PROMPT_LEN + 1)),
                       [Segment(torch.randint(3, case.v, (n,), generator=g).tolist(),
                                [0.0] * n)], finished=True) for n in lengths]
    batch = RolloutBatch.from_trajectories(rows, pad_id=0, group_size=GROUP,
                                           prompts=[""] * sequences,
                                           completions=[""] * sequences)
    batch.rewards = torch.randn(sequences, generator=g)
    return trainer, batch


def make_step(trainer, batch):
    def step():
        trainer.prepare_logprobs(batch)
        trainer.compute_advantages(batch)
        return trainer.update(batch)
    return step


def run_case(case: Case, impl: str, device: torch.device, *, warmup: int, reps: int) -> dict:
    record = {"suite": SUITE, "case": asdict(case), "label": case.label, "mode": case.mode,
              "impl": impl, "useful_bytes": 0, "bytes_formula": "-"}
    try:
        import transformers  # noqa: F401
    except ImportError:
        return {**record, "status": "absent", "reason": "transformers is not installed "
                "(pip install rlhf-fast[train])"}
    trainer, batch = make_trainer(case, impl, device)
    step = make_step(trainer, batch)
    record["median_ms"] = median_ms(step, device, warmup=max(1, warmup), reps=reps)
    record["peak_extra_mib"] = peak_extra_mib(step, device)
    return {**record, "status": "ok"}
