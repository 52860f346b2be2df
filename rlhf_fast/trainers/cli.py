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

AGENTIC_TINY_DEFAULTS = {"steps": 30, "batch_size": 64, "group_size": 8,
                         "mini_batch_size": 16, "lr": 5e-5, "eval_every": 10}
"""``--model tiny`` settings of ``arpo`` / ``aepo`` (8 prompts x a budget of 8 trajectories,
4 of them global samples; four optimiser steps per rollout, so the clip bounds engage)."""

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
    # PPO / PPO-penalty / TRPO
    "--critic": ("critic", str, "ppo: 'separate' critic backbone or 'shared' with the policy"),
    "--critic-lr": ("critic_lr", float, "ppo: critic learning rate (default 10 x --lr)"),
    "--vf-coef": ("vf_coef", float, "ppo: weight of the value loss"),
    "--gamma": ("gamma", float, "ppo: GAE discount"),
    "--lam": ("lam", float, "ppo: GAE lambda"),
    "--kl-placement": ("kl_placement", str, "ppo: reference KL in the 'reward' or the 'loss'"),
    "--kl-controller": ("kl_controller", str, "ppo: fixed, adaptive or proportional"),
    "--kl-target": ("kl_target", float, "ppo: the controller's target KL per token"),
    "--kl-stop": ("kl_stop", float, "ppo/trpo: stop the epochs when KL(old || pi) exceeds it"),
    # DPO
    "--beta": ("beta", float, "dpo: beta of the implicit reward"),
    "--loss-type": ("loss_type", str, "dpo: sigmoid, ipo, hinge, robust, ..., simpo, orpo"),
    "--label-smoothing": ("label_smoothing", float, "dpo: label smoothing epsilon"),
    "--nll-coef": ("nll_coef", float, "dpo: RPO's weight of the chosen completions' NLL"),
    "--reference-logprobs": ("reference_logprobs", str,
                             "dpo: 'precompute' once, or 'per_batch' from the reference model"),
    "--initial-rollouts": ("initial_rollouts", int, "arpo / aepo: global samples per prompt "
                                                    "(default half the group)"),
    "--max-tool-calls": ("max_tool_calls", int, "arpo / aepo: tool calls per trajectory "
                                                "(default 3)"),
}


def add_parser(sub) -> None:
    from ..agents import AGENT_TASKS
    from ..tasks import TASKS
    from .registry import AGENTIC_ALGORITHMS, ALGORITHMS

    p = sub.add_parser("train", help="train a causal LM with an RL algorithm on a task")
    p.add_argument("algorithm", help=f"one of {', '.join([*ALGORITHMS, *AGENTIC_ALGORITHMS])}")
    p.add_argument("--model", default="tiny",
                   help="'tiny' (the embedded model, warmed up on the task) or a local "
                        "directory with a causal LM and its tokenizer")
    p.add_argument("--task", help=f"embedded task: {', '.join(TASKS)} (default sum3); for "
                                  f"{', '.join(AGENTIC_ALGORITHMS)}: {', '.join(AGENT_TASKS)}")
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
    p.add_argument("--critic-model", help="ppo: local directory of the critic's starting model "
                                          "(a causal LM, a backbone or a 1-label "
                                          "sequence classifier; default: the policy's copy)")
    p.add_argument("--pairs", help="dpo: JSONL file of {prompt, chosen, rejected} pairs "
                                   "(default: pairs of the embedded task)")
    p.add_argument("--online", action="store_true",
                   help="dpo: iterative online DPO on sampled pairs ranked by the reward")
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
    from .registry import AGENTIC_ALGORITHMS, algorithm

    cls, _ = algorithm(args.algorithm)
    agentic = args.algorithm in AGENTIC_ALGORITHMS
    task = _task(args.task, agentic)
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
        return _run(args, cls, task, agentic, rank, parallel if distributed else None)
    finally:
        if distributed:
            dist.destroy_process_group()


def _run(args, cls, task, agentic: bool, rank: int, parallel) -> int:
    import torch

    from ..tasks import warmed_up_tiny_model
    from .policy import load_causal_lm
    from .registry import make_config
    from .rewards import RewardModel

    tiny = args.model == "tiny"
    if args.threads or (tiny and not torch.cuda.is_available()):
        torch.set_num_threads(args.threads or 1)
    defaults = (AGENTIC_TINY_DEFAULTS if agentic else TINY_DEFAULTS) if tiny else {}
    overrides = {"max_new_tokens": task.max_new_tokens, "loss_impl": args.loss,
                 "gradient_checkpointing": args.gradient_checkpointing, **defaults}
    overrides.update({field: getattr(args, flag[2:].replace("-", "_"))
                      for flag, (field, _, _) in OPTIONS.items()
                      if getattr(args, flag[2:].replace("-", "_")) is not None})
    if args.online:
        overrides["online"] = True
    if args.mini_batch_size is None and overrides.get("mini_batch_size") and \
            overrides["batch_size"] % overrides["mini_batch_size"]:
        del overrides["mini_batch_size"]   # the tiny default does not divide --batch-size
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
    data, extra = training_inputs(cls, task, args, config)
    if parallel is not None:
        extra["parallel"] = parallel
    trainer = cls(model, tokenizer, data,
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
    if evals and "eval/pair_accuracy" in evals[0]:
        summary["pair_accuracy_before"] = evals[0]["eval/pair_accuracy"]
        summary["pair_accuracy_after"] = evals[-1]["eval/pair_accuracy"]
    if evals and "eval/sampled_accuracy" in evals[0]:
        summary["sampled_accuracy_before"] = evals[0]["eval/sampled_accuracy"]
        summary["sampled_accuracy_after"] = evals[-1]["eval/sampled_accuracy"]
    steps = [h for h in history if "reward/mean" in h]
    if agentic and steps:   # rollout trees: the first and last steps, and means over all
        summary["reward_first_step"] = steps[0]["reward/mean"]
        summary["reward_last_step"] = steps[-1]["reward/mean"]
        summary["agent_means"] = {k: sum(h[k] for h in steps) / len(steps)
                                  for k in steps[0] if k.startswith("agent/")}
    if rank != 0:
        return 0
    if parallel is not None:
        summary["world_size"] = trainer.world_size
        summary["data_parallel"] = parallel.resolved()
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    if "accuracy_after" in summary:
        print(f"held-out accuracy {summary['accuracy_before']:.3f} -> "
              f"{summary['accuracy_after']:.3f}", end="; ")
    if "pair_accuracy_after" in summary:
        print(f"held-out pair reward accuracy {summary['pair_accuracy_before']:.3f} -> "
              f"{summary['pair_accuracy_after']:.3f}", end="; ")
    if "sampled_accuracy_after" in summary:
        print(f"sampled {summary['sampled_accuracy_before']:.3f} -> "
              f"{summary['sampled_accuracy_after']:.3f}", end="; ")
    print(f"{trainer.step_count} steps in {elapsed:.1f} s; metrics {out / 'metrics.jsonl'}, "
          f"curves {out / 'curves.png'}, checkpoint {out / f'checkpoint-{trainer.step_count}'}")
    return 0


def training_inputs(cls, task, args: argparse.Namespace, config) -> tuple[object, dict]:
    """What the trainer trains on, and its extra keyword arguments: the task's prompts; for
    offline DPO, pairs (``--pairs``, or the task's pairs with its held-out pairs for
    evaluation); for PPO, the critic's starting model (``--critic-model``)."""
    from .critic import load_critic_model
    from .dpo import DPOTrainer
    from .pairs import arithmetic_pairs, load_pairs
    from .ppo import PPOTrainer

    extra: dict = {}
    if args.critic_model:
        if not issubclass(cls, PPOTrainer):
            raise SystemExit("--critic-model is for the PPO trainers (ppo, ppo_penalty, trpo)")
        extra["critic_model"] = load_critic_model(args.critic_model)
    if args.pairs and not issubclass(cls, DPOTrainer):
        raise SystemExit("--pairs is for dpo")
    if not issubclass(cls, DPOTrainer) or config.online:
        return task.train_prompts(10_000, seed=config.seed), extra
    if args.pairs:
        return load_pairs(args.pairs), extra
    extra["eval_pairs"] = arithmetic_pairs(task, held_out=True, seed=config.seed)
    # One pass over fresh pairs: the reference runs once over exactly the pairs trained on.
    return arithmetic_pairs(task, config.steps * config.batch_size, seed=config.seed), extra


def _task(name: str | None, agentic: bool):
    """The embedded task ``name`` (default: ``shop`` for the agentic algorithms, else
    ``sum3``); an agentic algorithm needs an agentic task and the others an arithmetic one."""
    from ..agents import AGENT_TASKS, get_agent_task
    from ..tasks import TASKS, get_task

    if name is None:
        return get_agent_task("shop") if agentic else get_task("sum3")
    if agentic and name in TASKS:
        raise ValueError(f"task {name!r} has no tools: arpo / aepo train on an agentic task "
                         f"({', '.join(AGENT_TASKS)})")
    if not agentic and name in AGENT_TASKS:
        raise ValueError(f"task {name!r} needs tool calls: train it with arpo or aepo")
    return get_agent_task(name) if agentic else get_task(name)
