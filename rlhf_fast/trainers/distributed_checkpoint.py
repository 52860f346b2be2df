"""Checkpoints of a data-parallel trainer, through the distributed state-dict API.

``checkpoint-N/`` holds:

- ``distributed/``: ``torch.distributed.checkpoint`` (DCP) of ``{"model", "optimizer"}`` from
  ``get_state_dict``, each rank writing its own shards (FSDP2) or rank 0 the replicated
  tensors (DDP); ``set_state_dict`` puts them back;
- ``model/``: rank 0's ``save_pretrained`` of the full weights (gathered with
  ``full_state_dict=True``) and the tokenizer: the same directory a single-process run writes,
  loadable with ``--model PATH``;
- ``trainer_state.pt``: step, LR schedule, algorithm state, config, the world size and every
  rank's RNG states (torch, CUDA, the prompt and shuffle generators);
- what the algorithm adds (``Trainer.save_files``: PPO's critic), written by rank 0.

Resuming (same model, config and world size; the trainer built as at the start) continues
bit-identically on the CPU, as the single-process path does.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from .checkpoint import MODEL_DIR, STATE_FILE, rng_state, set_rng_state

DCP_DIR = "distributed"


def _state_dicts(trainer):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, optimizer = get_state_dict(trainer.policy.model, trainer.optimizer)
    return {"model": model, "optimizer": optimizer}


def save_distributed(trainer, path) -> Path:
    """Collective (every rank calls it): the three parts above under ``path``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    path = Path(path)
    group = trainer.statistics.group
    if trainer.is_main_process:
        path.mkdir(parents=True, exist_ok=True)
    dist.barrier(group=group)
    dcp.save(_state_dicts(trainer), checkpoint_id=str(path / DCP_DIR), process_group=group)
    full = get_model_state_dict(trainer.policy.model,
                                options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    rngs: list = [None] * trainer.world_size
    dist.all_gather_object(rngs, rng_state(trainer.prompt_rng, trainer.shuffle_rng),
                           group=group)
    if trainer.is_main_process:
        trainer.policy.model.save_pretrained(path / MODEL_DIR, state_dict=full)
        if trainer.tokenizer is not None:
            trainer.tokenizer.save_pretrained(path / MODEL_DIR)
        torch.save({"step": trainer.step_count, "scheduler": trainer.scheduler.state_dict(),
                    "rng_per_rank": rngs, "world_size": trainer.world_size,
                    "algorithm": trainer.extra_state(), "config": repr(trainer.config)},
                   path / STATE_FILE)
        trainer.save_files(path)
    dist.barrier(group=group)
    return path


def load_distributed(trainer, path) -> None:
    """Collective: restore ``save_distributed`` into a trainer built as at the start."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    path = Path(path)
    if not (path / STATE_FILE).exists() or not (path / DCP_DIR).is_dir():
        raise FileNotFoundError(f"{path} is not a data-parallel checkpoint (needs {STATE_FILE} "
                                f"and {DCP_DIR}/; a single-process checkpoint's model/ "
                                "directory loads with --model PATH)")
    state = torch.load(path / STATE_FILE, weights_only=False)
    if state["world_size"] != trainer.world_size:
        raise ValueError(f"{path} was saved by {state['world_size']} ranks, this run has "
                         f"{trainer.world_size}: the per-rank RNG streams resume only on the "
                         f"same world size (start a new run from {path / MODEL_DIR} instead)")
    dicts = _state_dicts(trainer)
    dcp.load(dicts, checkpoint_id=str(path / DCP_DIR), process_group=trainer.statistics.group)
    set_state_dict(trainer.policy.model, trainer.optimizer, model_state_dict=dicts["model"],
                   optim_state_dict=dicts["optimizer"])
    trainer.step_count = state["step"]
    trainer.scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng_per_rank"][trainer.rank], trainer.prompt_rng, trainer.shuffle_rng)
    trainer.load_extra_state(state["algorithm"])
    trainer.load_files(path)
