"""``rlhf-fast train ALGO``: train a local causal LM (or the embedded tiny model) on an
embedded task, with a progress bar, ``metrics.jsonl``, ``curves.png`` and checkpoints under
``--out``."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

TINY_DEFAULTS = {"steps": 40, "batch_size": 64, "group_size": 8, "lr": 5e-5,
                 "eval_every": 10}
"""Settings of ``--model tiny`` (each one can still be overridden on the command line). The
rest (``max_new_tokens``) comes from the task."""

OPTIONS = {  # flag -> (config field, type, help)
    "--steps": ("steps", int, "iterations (tiny default 40)"),
    "--batch-size": ("batch_size", int, "completions per step (tiny default 64)"),
    "--group-size": ("group_size", int, "completions per prompt (tiny default 8)"),
    "--mini-batch-size": ("mini_batch_size", int, "rows per optimiser step"),
    "--micro-batch-size": ("micro_batch_size", int, "rows per forward/backward"),
    "--epochs": ("epochs", int, "passes over each rollout batch"),
    "--lr": ("lr", float, "AdamW learning rate (tiny default 5e-5, else 1e-6)"),
    "--max-new-tokens": ("max_new_tokens", int, "tokens per completion (default: the task's)"),
    "--temperature": ("temperature", float, "sampling temperature"),
    "--top-p": ("top_p", float, "nucleus sampling mass"),
    "--eval-every": ("eval_every", int, "held-out evaluation every N steps"),
    "--save-every": ("save_every", int, "checkpoint every N steps (always at the end)"),
    "--seed": ("seed", int, "seed of prompts, sampling and shuffling"),
    "--backend": ("backend", str, "rlhf_fast op backend: auto, triton or torch"),
}


def add_parser(sub) -> None:
    from ..tasks import TASKS
    from .registry import ALGORITHMS

    p = sub.add_parser("train", help="train a causal LM with an RL algorithm on a task")
    p.add_argument("algorithm", help=f"one of {', '.join(ALGORITHMS)}")
    p.add_argument("--model", default="tiny",
                   help="'tiny' (the embedded model, warmed up on the task) or a local "
                        "directory with a causal LM and its tokenizer")
    p.add_argument("--task", default="sum3", help=f"embedded task: {', '.join(TASKS)}")
    p.add_argument("--out", help="output directory (default: runs/ALGO-TASK)")
    p.add_argument("--loss", default="fused", choices=["fused", "reference"],
                   help="fused: linear_policy_loss on hidden states; reference: autograd "
                        "formulas on materialised logits")
    p.add_argument("--kl-coef", type=float, help="KL weight (in the loss, or in the reward "
                                                 "for reinforce_pp / rloo)")
    p.add_argument("--reward-model", help="local AutoModelForSequenceClassification directory "
                                          "to score completions instead of the task's rules")
    p.add_argument("--resume", help="checkpoint directory to continue from")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute the backbone's activations in backward (less memory)")
    p.add_argument("--threads", type=int, help="torch CPU threads (tiny default 1: its "
                                               "matrices are too small to gain from more)")
    p.add_argument("--cache-dir", help="where the tiny model's warm-up is cached (default: "
                                       "the system temp dir)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--data-parallel", default="auto", choices=["auto", "ddp", "fsdp2"],
                   help="under torchrun (torchrun --nproc-per-node N -m rlhf_fast.cli train "
                        "...): ddp replicates the model, fsdp2 shards it (fully_shard); "
                        "auto: fsdp2 on CUDA, ddp on the CPU")
    p.add_argument("--param-dtype", choices=["bfloat16", "float16", "float32"],
                   help="fsdp2 mixed precision: the dtype parameters compute in (gradients "
                        "reduce in float32)")
    for flag, (_, kind, text) in OPTIONS.items():
        p.add_argument(flag, type=kind, help=text)


def run(args: argparse.Namespace) -> int:
    from ..tasks import get_task
    from .registry import algorithm

    cls, _ = algorithm(args.algorithm)
    task = get_task(args.task)
    # Under torchrun (WORLD_SIZE set): one process per rank, the data-parallel trainer.
    distributed = "WORLD_SIZE" in os.environ
    rank = 0
    if distributed:
        import torch.distributed as dist

        from .distributed import DataParallelConfig, data_parallel, init_distributed

        init_distributed()
        rank = dist.get_rank()
        parallel = DataParallelConfig(strategy=args.data_parallel, param_dtype=args.param_dtype)
        cls = data_parallel(cls)
    elif args.param_dtype is not None or args.data_parallel != "auto":
        raise SystemExit("--data-parallel / --param-dtype need torchrun: torchrun "
                         "--nproc-per-node N -m rlhf_fast.cli train ...")
    try:
        return _run(args, cls, task, rank, parallel if distributed else None)
    finally:
        if distributed:
            dist.destroy_process_group()


def _run(args, cls, task, rank: int, parallel) -> int:
    import torch

    from ..tasks import warmed_up_tiny_model
    from .policy import load_causal_lm
    from .registry import make_config
    from .rewards import RewardModel

    tiny = args.model == "tiny"
    if args.threads or (tiny and not torch.cuda.is_available()):
        torch.set_num_threads(args.threads or 1)
    overrides = {"max_new_tokens": task.max_new_tokens, "loss_impl": args.loss,
                 "gradient_checkpointing": args.gradient_checkpointing,
                 **(TINY_DEFAULTS if tiny else {})}
    overrides.update({field: getattr(args, flag[2:].replace("-", "_"))
                      for flag, (field, _, _) in OPTIONS.items()
                      if getattr(args, flag[2:].replace("-", "_")) is not None})
    config = make_config(args.algorithm, **overrides)
    if args.kl_coef is not None:
        config = (config.replace(kl_coef=args.kl_coef) if hasattr(config, "kl_coef")
                  else config.replace(loss=config.loss.replace(kl_coef=args.kl_coef)))
    out = Path(args.out or f"runs/{args.algorithm}-{task.name}")
    if tiny:
        cache = args.cache_dir or os.path.join(tempfile.gettempdir(), "rlhf_fast_warmup")
        if parallel is not None:       # rank 0 warms up (once), the others load its cache
            import torch.distributed as dist

            if rank == 0:
                warmed_up_tiny_model(task, cache)
            dist.barrier()
        model, tokenizer = warmed_up_tiny_model(task, cache)
        if torch.cuda.is_available():
            model = model.cuda()
    else:
        if not Path(args.model).is_dir():
            raise SystemExit(f"--model must be 'tiny' or a local model directory, got "
                             f"{args.model!r}")
        model, tokenizer = load_causal_lm(args.model)
    rewards = task.reward_functions
    if args.reward_model:
        rewards = {"reward_model": RewardModel(args.reward_model)}
    extra = {"parallel": parallel} if parallel is not None else {}
    trainer = cls(model, tokenizer, task.train_prompts(10_000, seed=config.seed),
                  rewards, config, eval_prompts=task.eval_prompts(),
                  accuracy_reward=task.accuracy_reward if not args.reward_model else None,
                  out_dir=out, progress=not args.no_progress, **extra)
    if args.resume:
        trainer.load(args.resume)
    start = time.perf_counter()
    history = trainer.train()
    elapsed = time.perf_counter() - start
    evals = [h for h in history if "eval/reward" in h]
    summary = {"algorithm": args.algorithm, "task": task.name, "model": args.model,
               "steps": trainer.step_count, "seconds": round(elapsed, 1),
               "loss": args.loss, "out": str(out)}
    if evals and "eval/accuracy" in evals[0]:
        summary["accuracy_before"] = evals[0]["eval/accuracy"]
        summary["accuracy_after"] = evals[-1]["eval/accuracy"]
    if rank != 0:
        return 0
    if parallel is not None:
        summary["world_size"] = trainer.world_size
        summary["data_parallel"] = parallel.resolved()
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    if "accuracy_after" in summary:
        print(f"held-out accuracy {summary['accuracy_before']:.3f} -> "
              f"{summary['accuracy_after']:.3f}", end="; ")
    print(f"{trainer.step_count} steps in {elapsed:.1f} s; metrics {out / 'metrics.jsonl'}, "
          f"curves {out / 'curves.png'}, checkpoint {out / f'checkpoint-{trainer.step_count}'}")
    return 0
