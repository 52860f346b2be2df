"""What each rank of the data-parallel tests runs (``torch.multiprocessing.spawn``, gloo, one
CPU thread per rank). Every case builds the same global rollout batch on every rank with a
single-process trainer, then compares the data-parallel trainer on this rank's share against
the single-process trainer on the whole batch: gradients of every optimiser step (before
clipping), the logged metrics and the final weights. Rank 0 writes the results for the test
module to assert on."""

from __future__ import annotations

import os
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

ROWS = 8          # global completions per step
GROUP = 2         # completions per prompt: 4 prompts, 2 per rank
NEW_TOKENS = 6


def odd_digits(completions, **_):
    """A reward that varies between completions of a random model."""
    return [float(sum(ch in "13579" for ch in c)) for c in completions]


def first_odd(completions, **_):
    """1 when a completion starts with an odd digit: often the same for a whole group."""
    return [float(c[:1] in tuple("13579")) for c in completions]


def first_odd_on_rank_0(completions, **_):
    """``first_odd`` on rank 0, 0 on the others: every group of rank 1 is dropped, so the
    kept groups all sit on rank 0 until the batch is re-dealt."""
    return [r * float(dist.get_rank() == 0) for r in first_odd(completions)]


def tiny():
    from rlhf_fast.tasks.tiny import TinyModelConfig, tiny_model
    from rlhf_fast.tasks.tokenizer import char_tokenizer

    tok = char_tokenizer()
    shape = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                            intermediate_size=64, max_positions=32)
    return tiny_model(tok, shape, seed=0), tok


PROMPTS = [f"{a}+{b}=" for a in range(10) for b in range(10)]


def config(name, **overrides):
    from rlhf_fast.trainers import make_config

    settings = dict(batch_size=ROWS, group_size=GROUP, steps=2, lr=1e-3, backend="torch",
                    max_new_tokens=NEW_TOKENS, seed=3)
    return make_config(name, **{**settings, **overrides})


def capture_gradients(trainer, parallel: bool):
    """Record the full gradient of every optimiser step (before clipping)."""
    grads = []
    clip = trainer.clip_gradients

    def recording():
        full = []
        for p in trainer.parameters:
            g = p.grad
            full.append((g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone())
        grads.append(full)
        return clip()

    trainer.clip_gradients = recording
    return grads


def capture_critic_gradients(trainer):
    """PPO: the critic's gradient of every optimiser step, after the ranks' average."""
    grads = []
    reduce = trainer.reduce_critic_gradients

    def recording():
        reduce()
        grads.append([p.grad.detach().clone() for p in trainer.critic_parameters])

    trainer.reduce_critic_gradients = recording
    return grads


def full_weights(model):
    return [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for p in model.parameters()]


def rows_of(rank, world, size):
    share = size // world
    return torch.arange(rank * share, (rank + 1) * share)


def compare_update(name, strategy, rank, world, *, reorder=None, **overrides):
    """One step's update: data-parallel (this rank's rows) vs single process (all rows)."""
    from rlhf_fast.trainers import make_trainer
    from rlhf_fast.trainers.distributed import DataParallelConfig, make_data_parallel_trainer

    c = config(name, **overrides)
    model, tok = tiny()
    single = make_trainer(name, model, tok, PROMPTS, odd_digits, config=c)
    batch = single.collect()
    local = batch.select(rows_of(rank, world, batch.size))
    single.prepare_logprobs(batch)
    single.compute_advantages(batch)
    reference_grads = capture_gradients(single, False)
    critic = hasattr(single, "critic")
    reference_critic_grads = capture_critic_gradients(single) if critic else None
    if reorder is not None:       # the global mini-batches of the data-parallel run
        batch = batch.select(reorder)
    single_metrics = single.update(batch)

    dp_model, _ = tiny()
    dp = make_data_parallel_trainer(name, dp_model, tok, PROMPTS, odd_digits, config=c,
                                    parallel=DataParallelConfig(strategy=strategy))
    dp.prepare_logprobs(local)
    dp.compute_advantages(local)
    grads = capture_gradients(dp, True)
    critic_grads = capture_critic_gradients(dp) if critic else None
    dp_metrics = dp.update(local)
    extra = {} if not critic else {
        "critic_grads": critic_grads, "reference_critic_grads": reference_critic_grads,
        "critic_weights": [p.detach().clone() for p in dp.critic_parameters],
        "reference_critic_weights": [p.detach().clone() for p in single.critic_parameters]}
    return {**extra,
        "grads": grads, "reference_grads": reference_grads,
        "weights": full_weights(dp_model), "reference_weights": full_weights(model),
        "metrics": dp_metrics, "reference_metrics": single_metrics,
        "advantage_rows": int(local.advantages.shape[0]),
    }


def gspo_wide_clip():
    from rlhf_fast import PolicyLossConfig

    return PolicyLossConfig.preset("gspo", clip_eps_low=0.2, clip_eps_high=0.2)


def interleaved(world, size, mini):
    """Single-process row order whose k-th mini-batch is the union of every rank's k-th
    local mini-batch (the data-parallel trainer's global mini-batches, without shuffle)."""
    share, local = size // world, mini // world
    return torch.tensor([r * share + k + j for k in range(0, share, local)
                         for r in range(world) for j in range(local)])


CASES = {
    # seq_mean_token_mean + k3 KL to the reference; 2 micro-batches per rank (no_sync).
    "grpo_ddp": lambda r, w: compare_update("grpo", "ddp", r, w, micro_batch_size=2),
    # token_mean over 2 optimiser steps per rollout (old log-probs, ratio != 1 in the 2nd).
    "bnpo_fsdp2": lambda r, w: compare_update(
        "bnpo", "fsdp2", r, w, mini_batch_size=4, micro_batch_size=1, shuffle=False,
        reorder=interleaved(w, ROWS, 4)),
    # seq_mean_token_mean + KL, FSDP2, micro-batches.
    "grpo_fsdp2": lambda r, w: compare_update("grpo", "fsdp2", r, w, micro_batch_size=2),
    # GSPO's sequence ratio, 2 epochs (the 2nd off-policy).
    # (GSPO's clip 3e-4 / 4e-4 would clip every sequence after one step at this lr.)
    "gspo_ddp": lambda r, w: compare_update("gspo", "ddp", r, w, epochs=2, shuffle=False,
                                            loss=gspo_wide_clip()),
    # Dr. GRPO: seq_mean_token_sum_norm with its B * max_new_tokens constant.
    "dr_grpo_ddp": lambda r, w: compare_update("dr_grpo", "ddp", r, w),
    # REINFORCE++: KL in the reward, returns whitened over every rank's tokens.
    "reinforce_pp_ddp": lambda r, w: compare_update("reinforce_pp", "ddp", r, w),
    # PPO, separate critic: 2 optimiser steps (the critic's backbone gets a gradient once
    # its zero head has moved), GAE advantages whitened over both ranks. (One epoch: Adam's
    # steps amplify float32 rounding past 1e-5 relative within 8.)
    "ppo_ddp": lambda r, w: compare_update(
        "ppo", "ddp", r, w, epochs=1, mini_batch_size=4, micro_batch_size=1, shuffle=False,
        reorder=interleaved(w, ROWS, 4)),
    # PPO, value head on the policy's sharded backbone, KL(old || pi) penalty.
    "ppo_penalty_shared_fsdp2": lambda r, w: compare_update(
        "ppo_penalty", "fsdp2", r, w, critic="shared", micro_batch_size=2),
}


def entropy_features(rank, world):
    """AEPO's entropy-aware advantage and the top-entropy mask, their statistics over both
    ranks' tokens (folded into the advantages) vs the op's over the whole batch."""
    from rlhf_fast import PolicyLossConfig

    loss = PolicyLossConfig.preset("grpo", kl_coef=0.0, entropy_advantage_alpha=0.5,
                                   top_entropy_quantile=0.5)
    return compare_update("grpo", "ddp", rank, world, loss=loss)


SHOP_MODEL = "RLHF_FAST_TEST_SHOP_MODEL"
"""Environment variable: the directory of the tiny model warmed up on ``shop`` (it calls
tools), saved by the test module before the ranks start."""


def agentic_update(name, strategy, rank, world):
    """ARPO / AEPO on the warmed-up ``shop`` model: the whole batch of rollout trees (tool
    calls executed, their results loss-masked) built on every rank by a single-process
    trainer; the data-parallel trainer on this rank's half (one whole tree per rank)
    vs the single-process update on all of it. AEPO's entropy-aware advantage is folded in
    from entropy statistics over both ranks' trained tokens."""
    from transformers import AutoModelForCausalLM

    from rlhf_fast.agents import get_agent_task
    from rlhf_fast.tasks.tokenizer import load_tokenizer
    from rlhf_fast.trainers import make_config, make_trainer
    from rlhf_fast.trainers.distributed import DataParallelConfig, make_data_parallel_trainer

    task = get_agent_task("shop")
    prompts = task.train_prompts(64, seed=1)
    path = os.environ[SHOP_MODEL]
    tok = load_tokenizer(path)

    def model():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    c = make_config(name, batch_size=ROWS, group_size=GROUP * 2, steps=1, lr=1e-3,
                    backend="torch", max_new_tokens=task.max_new_tokens, seed=3,
                    eval_samples=0)
    single_model = model()
    single = make_trainer(name, single_model, tok, prompts, task.reward_functions, config=c)
    batch = single.collect()
    rows = single.last_tree.rows()
    local = batch.select(rows_of(rank, world, batch.size))
    single.prepare_logprobs(batch)
    single.compute_advantages(batch)
    reference_grads = capture_gradients(single, False)
    single_metrics = single.update(batch)

    dp_model = model()
    dp = make_data_parallel_trainer(name, dp_model, tok, prompts, task.reward_functions,
                                    config=c, parallel=DataParallelConfig(strategy=strategy))
    dp.prepare_logprobs(local)
    dp.compute_advantages(local)
    grads = capture_gradients(dp, True)
    dp_metrics = dp.update(local)
    # a data-parallel rollout (each rank its own trees; under FSDP2 the tool rollout must
    # generate with the gathered weights), its agent/ metrics global
    dp.collect()
    logged: list = [None] * world
    dist.all_gather_object(logged, (dp.rollout_stats, dp.last_tree.rounds,
                                    sum(t.tool_calls for t in dp.last_tree.rows())))
    # a tool result: attention 1, loss mask 0, between trained completion tokens
    completion = local.attention_mask[:, local.prompt_width:].bool()
    return {"grads": grads, "reference_grads": reference_grads,
            "weights": full_weights(dp_model), "reference_weights": full_weights(single_model),
            "metrics": dp_metrics, "reference_metrics": single_metrics,
            "tool_calls": sum(t.tool_calls for t in rows), "rows": len(rows),
            "masked_tokens": int((completion & ~local.loss_mask).sum()),
            "masked_share": single.rollout_stats["agent/masked_share"],
            "local_rows": local.size, "dp_logged": logged}


def dynamic_sampling(rank, world):
    """DAPO under DDP: the filter and the kept-group count are global, the kept batch is
    re-dealt evenly, and the prompts are the single-process draw."""
    from rlhf_fast.trainers import DAPOTrainer, make_trainer
    from rlhf_fast.trainers.distributed import DataParallelConfig, make_data_parallel_trainer

    c = config("dapo", batch_size=16, group_size=4, overlong_cache=0)
    model, tok = tiny()
    dp = make_data_parallel_trainer("dapo", model, tok, PROMPTS, first_odd_on_rank_0,
                                    config=c, parallel=DataParallelConfig(strategy="ddp"))
    kept = DAPOTrainer.collect(dp)          # this rank's kept groups, before re-dealing
    sizes: list = [None] * world
    dist.all_gather_object(sizes, kept.size)
    before = dp.statistics.gather(kept.rewards)
    batch = dp.balance(kept)
    rewards = dp.statistics.gather(batch.rewards).view(-1, c.group_size)
    single = make_trainer("dapo", tiny()[0], tok, PROMPTS, odd_digits, config=c)
    drawn = [single.prompts[i]["prompt"] for i in single.sample_prompts(c.prompts_per_step)]
    first: list = [None] * world
    dp_model, _ = tiny()
    dp2 = make_data_parallel_trainer("dapo", dp_model, tok, PROMPTS, odd_digits, config=c,
                                     parallel=DataParallelConfig(strategy="ddp"))
    local = dp2.sample_prompts(c.prompts_per_step)
    dist.all_gather_object(first, [dp2.prompts[i]["prompt"] for i in local])
    return {"local_rows": batch.size, "global_groups": rewards.shape[0],
            "kept_rows_per_rank": sizes, "same_rows": bool(torch.equal(before, rewards.flatten())),
            "constant_groups": int((rewards == rewards[:, :1]).all(-1).sum()),
            "batches": dp.sampling_stats["dapo/generation_batches"],
            "dp_prompts": [p for share in first for p in share], "single_prompts": drawn}


def dpo_step(rank, world):
    """linear_dpo_loss on a tiny model under DDP: loss_scale = local pairs /
    count_normalizer(local pairs) makes the averaged gradient the global mean's."""
    from rlhf_fast import linear_dpo_loss
    from rlhf_fast.trainers import Policy
    from rlhf_fast.trainers.distributed import (
        DataParallelConfig,
        DistributedStatistics,
        parallelize,
    )

    pairs, length = 6, 5
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 21, (2 * pairs, 4 + length), generator=g)
    mask = torch.ones(2 * pairs, length, dtype=torch.bool)
    mask[:, -1] = torch.rand(2 * pairs, generator=g) < 0.5
    ref = -torch.rand(2 * pairs, generator=g)

    def loss_of(policy, rows, scale):
        # chosen rows, then their rejected partners
        pick = torch.cat([rows, rows + pairs])
        attention = torch.ones_like(ids[pick])
        hidden = policy.hidden_states(ids[pick], attention)[:, 3:3 + length]
        out = linear_dpo_loss(hidden, policy.weight, ids[pick][:, 4:], mask[pick],
                              ref_logprobs=ref[pick], beta=0.1, loss_scale=scale,
                              backend="torch")
        out.loss.backward()
        return float(out.loss.detach())

    model, _ = tiny()
    whole = loss_of(Policy(model), torch.arange(pairs), 1.0)
    reference = [p.grad.clone() for p in model.parameters()]
    dp_model, _ = tiny()
    policy = Policy(dp_model)
    parallelize(policy, DataParallelConfig(strategy="ddp"))
    stats = DistributedStatistics()
    # uneven shares: rank 0 holds 4 pairs, rank 1 holds 2
    rows = torch.arange(0, 4) if rank == 0 else torch.arange(4, pairs)
    scale = rows.numel() / stats.count_normalizer(rows.numel())
    local_loss = loss_of(policy, rows, scale)
    loss = float(stats.all_reduce_sum(torch.tensor(local_loss))) * stats.world_scale
    return {"grads": [[p.grad.clone() for p in dp_model.parameters()]],
            "reference_grads": [reference], "loss": loss, "reference_loss": whole}


def dpo_trainer_step(rank, world):
    """DPOTrainer offline, one step of 8 pairs (RPO's NLL term, 2 micro-batches a rank):
    each rank trains on its 4 of the globally drawn pairs."""
    from rlhf_fast.trainers import DPOTrainer, make_config
    from rlhf_fast.trainers.distributed import DataParallelConfig, data_parallel

    pairs = [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)}
             for a in range(4) for b in range(4)]
    c = make_config("dpo", batch_size=8, micro_batch_size=2, lr=1e-3, steps=1, seed=3,
                    nll_coef=0.5, backend="torch", max_new_tokens=NEW_TOKENS)
    model, tok = tiny()
    single = DPOTrainer(model, tok, pairs, None, c, eval_pairs=pairs[:4])
    reference_grads = capture_gradients(single, False)
    reference_history = single.train()
    dp_model, _ = tiny()
    dp = data_parallel(DPOTrainer)(dp_model, tok, pairs, None, c, eval_pairs=pairs[:4],
                                   parallel=DataParallelConfig(strategy="ddp"))
    grads = capture_gradients(dp, True)
    local_pairs = dp.collect().size
    dp.pair_cursor = 0                  # that batch again, in the step
    history = dp.train()

    def logged(records):          # the DPO metrics and the last evaluation (no timings)
        return {k: v for r in records for k, v in r.items()
                if k.startswith(("dpo/", "eval/")) or k == "policy/loss"}

    return {"grads": grads, "reference_grads": reference_grads,
            "weights": full_weights(dp_model), "reference_weights": full_weights(model),
            "metrics": logged(history), "reference_metrics": logged(reference_history),
            "local_pairs": local_pairs}


def checkpoint_resume(rank, world):
    """FSDP2 GRPO: 3 steps straight == 1 step, save (DCP), a fresh trainer loads, 2 more;
    the saved model/ directory holds the full weights."""
    import tempfile

    from rlhf_fast.trainers.distributed import DataParallelConfig, make_data_parallel_trainer

    c = config("grpo", steps=3, save_every=1, mini_batch_size=4, epochs=2,
               lr_schedule="cosine")
    parallel = DataParallelConfig(strategy="fsdp2")
    shared: list = [tempfile.mkdtemp(prefix="rlhf_fast_dp_") if rank == 0 else None]
    dist.broadcast_object_list(shared)
    root = shared[0]

    def trainer(out):
        model, tok = tiny()
        return model, make_data_parallel_trainer(
            "grpo", model, tok, PROMPTS, odd_digits, config=c, parallel=parallel,
            eval_prompts=PROMPTS[:5], out_dir=f"{root}/{out}")

    model_a, a = trainer("a")
    history_a = a.train()
    model_b, b = trainer("b")
    b.load(f"{root}/a/checkpoint-1")
    history_b = b.train()
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(f"{root}/a/checkpoint-3/model")
    files = sorted(os.listdir(f"{root}/a")) if rank == 0 else []
    return {"weights": full_weights(model_b), "reference_weights": full_weights(model_a),
            "saved_weights": [p.detach().clone() for p in saved.parameters()],
            "history": history_b, "reference_history": history_a[-2:], "files": files,
            "step": b.step_count}


def bad_world_size(rank, world):
    """3 prompts per step over 2 ranks: a clear error on every rank, before any
    collective."""
    from rlhf_fast.trainers.distributed import make_data_parallel_trainer

    model, tok = tiny()
    try:
        make_data_parallel_trainer("grpo", model, tok, PROMPTS, odd_digits,
                                   config=config("grpo", batch_size=6))
    except ValueError as e:
        return {"error_message": str(e)}
    return {"error_message": None}


def straggler(rank, world):
    """Rank 1 never joins a collective: rank 0's fails once the group's timeout passes
    (instead of hanging), with the backend's timeout error."""
    from rlhf_fast.trainers.distributed import DistributedStatistics

    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=3))
    out = {"error_type": None}
    if rank == 0:
        try:
            DistributedStatistics(group).all_reduce_sum(torch.ones(()))
        except Exception as e:
            out = {"error_type": type(e).__name__, "error_message": str(e)}
    dist.barrier()           # rank 1 stays alive (in the default group) meanwhile
    return out


CASES.update({"arpo_ddp": lambda r, w: agentic_update("arpo", "ddp", r, w),
              "aepo_fsdp2": lambda r, w: agentic_update("aepo", "fsdp2", r, w),
              "entropy_features_ddp": entropy_features, "dapo_ddp": dynamic_sampling,
              "dpo_ddp": dpo_step, "dpo_trainer_ddp": dpo_trainer_step,
              "checkpoint_fsdp2": checkpoint_resume,
              "bad_world_size": bad_world_size, "straggler": straggler})


def worker(rank: int, world: int, port: int, out: str, names: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from rlhf_fast.trainers.distributed import init_distributed

    init_distributed("gloo", timeout=timedelta(seconds=60))
    results = {}
    try:
        for name in names:
            try:
                results[name] = CASES[name](rank, world)
            except Exception:
                results[name] = {"error": traceback.format_exc()}
                raise
    finally:
        if rank == 0:
            torch.save(results, out)
        dist.destroy_process_group()
