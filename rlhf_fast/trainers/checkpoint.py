"""Checkpoints: the model (``save_pretrained``, loadable with ``--model PATH``) and
``trainer_state.pt`` (step, optimiser, LR schedule, every RNG, algorithm state such as a KL
controller). Resuming = build the trainer as at the start (same model and config, so the
reference model is the starting one), then ``trainer.load(path)``: on the CPU the run then
continues bit-identically.
"""

from __future__ import annotations

from pathlib import Path

import torch

STATE_FILE = "trainer_state.pt"
MODEL_DIR = "model"


def save_model(model, tokenizer, path: Path) -> None:
    """``save_pretrained`` of the model (a PEFT model saves its adapter) and tokenizer."""
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def load_model_weights(model, path: Path) -> None:
    """Load weights saved by ``save_model`` into ``model`` in place (tied weights, which
    ``save_pretrained`` stores once, stay tied)."""
    from safetensors.torch import load_file

    from .policy import is_peft_model

    if is_peft_model(model):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(path / "adapter_model.safetensors")))
        return
    if (path / "model.safetensors.index.json").exists():
        from transformers.modeling_utils import load_sharded_checkpoint

        load_sharded_checkpoint(model, str(path), strict=False)
        return
    state = load_file(str(path / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set()
    for key in missing:
        owner = key.rsplit(".", 1)[0]
        if model.get_submodule(owner) is model.get_output_embeddings():
            tied.add(key)
    if unexpected or set(missing) - tied:
        raise ValueError(f"checkpoint {path} does not match the model: missing "
                         f"{sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}")


def rng_state(*generators: torch.Generator) -> dict:
    """The global torch RNGs (CPU, CUDA) and the trainer's own generators."""
    state = {"torch": torch.get_rng_state(), "own": [g.get_state() for g in generators]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, *generators: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for g, s in zip(generators, state["own"], strict=True):
        g.set_state(s)
