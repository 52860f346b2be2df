"""Data-parallel trainers on the CPU: two gloo ranks (``torch.multiprocessing.spawn``, one
spawn for the whole module, one thread per rank) against the single-process trainer on the
whole batch, for DDP and FSDP2 (``fully_shard`` runs on the CPU with gloo), ARPO / AEPO
with tool calls on the warmed-up ``shop`` model; checkpoints
through ``torch.distributed.checkpoint``; ``torchrun -m rlhf_fast.cli train``; clear errors
instead of hangs. The rank-side code is ``distributed_cases.py``."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import distributed_cases as cases
import pytest
import torch
import torch.multiprocessing as mp
from tiny_setup import warm_shop

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("data_parallel") / "results.pt"
    _, _, shop = warm_shop()      # the ranks load it (built once a session, in the parent)
    os.environ[cases.SHOP_MODEL] = str(next(shop.glob("tiny-shop-*")))
    mp.spawn(cases.worker, args=(WORLD, free_port(), str(out), list(cases.CASES)),
             nprocs=WORLD, join=True)
    return torch.load(out, weights_only=False)


def assert_same_update(r, *, rtol=1e-5):
    """Every optimiser step's gradient, the logged metrics and the final weights."""
    assert len(r["grads"]) == len(r["reference_grads"]) >= 1
    for step, (grads, reference) in enumerate(zip(r["grads"], r["reference_grads"],
                                                  strict=True)):
        total = sum(float(g.norm()) ** 2 for g in reference) ** 0.5
        assert total > 1e-3, f"step {step}: no gradient to compare"
        for g, ref in zip(grads, reference, strict=True):
            assert (g - ref).norm() <= rtol * ref.norm() + 1e-9 * total, \
                (step, float((g - ref).norm() / ref.norm()))
    if "weights" in r:
        for w, ref in zip(r["weights"], r["reference_weights"], strict=True):
            assert torch.allclose(w, ref, rtol=0, atol=1e-5)
    for key, value in r.get("metrics", {}).items():
        assert value == pytest.approx(r["reference_metrics"][key], rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("case", ["grpo_ddp", "grpo_fsdp2"])
def test_grpo_seq_mean_with_kl_equals_one_process(results, case):
    """seq_mean_token_mean + k3 KL to the reference, 2 micro-batches per rank."""
    assert_same_update(results[case])


def test_bnpo_token_mean_over_two_mini_batches_fsdp2(results):
    """token_mean, 2 optimiser steps per rollout (old log-probs, ratio != 1 in the second),
    1-row micro-batches: the k-th global mini-batch is every rank's k-th local one."""
    assert_same_update(results["bnpo_fsdp2"])
    assert len(results["bnpo_fsdp2"]["grads"]) == 2


def test_gspo_sequence_ratio_over_two_epochs(results):
    r = results["gspo_ddp"]
    assert_same_update(r)
    assert r["metrics"]["policy/ratio_max"] > 1.0      # the second epoch is off-policy


@pytest.mark.parametrize("case", ["dr_grpo_ddp", "reinforce_pp_ddp"])
def test_constant_normaliser_and_global_whitening(results, case):
    """Dr. GRPO's B * max_new_tokens; REINFORCE++'s returns whitened over both ranks."""
    assert_same_update(results[case])


@pytest.mark.parametrize("case", ["arpo_ddp", "aepo_fsdp2"])
def test_agentic_update_with_tool_calls_equals_one_process(results, case):
    """ARPO (DDP) / AEPO (FSDP2): rollout trees with executed tool calls, whole trees per
    rank; the update on 2 ranks equals the one-process update on the whole batch (AEPO: its
    entropy-aware advantage from both ranks' token entropies), tool-result tokens sit in the
    batch with loss mask 0, and a data-parallel tool rollout runs (FSDP2: with the gathered
    weights) and logs the same global agent/ metrics on every rank."""
    r = results[case]
    assert_same_update(r)
    assert r["rows"] == 2 * r["local_rows"] == cases.ROWS
    assert r["tool_calls"] >= 2 and r["masked_tokens"] > 0 and r["masked_share"] > 0
    # a data-parallel rollout: every rank logs the global agent/ metrics
    (stats_0, rounds_0, calls_0), (stats_1, rounds_1, calls_1) = r["dp_logged"]
    assert stats_0 == stats_1
    assert stats_0["agent/rounds"] == max(rounds_0, rounds_1)
    assert stats_0["agent/tool_calls"] == pytest.approx((calls_0 + calls_1) / cases.ROWS)


def test_entropy_statistics_are_global(results):
    """AEPO's entropy-aware advantage and the top-entropy mask (quantile 0.5) from both
    ranks' tokens equal the op's statistics over the whole batch."""
    assert_same_update(results["entropy_features_ddp"])


def test_dynamic_sampling_filters_the_global_batch(results):
    r = results["dapo_ddp"]
    assert r["dp_prompts"] == r["single_prompts"]           # the single-process draw, split
    assert r["kept_rows_per_rank"] == [16, 0]               # rank 1's groups all dropped
    assert r["local_rows"] == 8 and r["global_groups"] == 4  # re-dealt evenly
    assert r["same_rows"] and r["constant_groups"] == 0 and r["batches"] >= 2


def test_dpo_step_with_the_global_pair_count(results):
    """linear_dpo_loss, uneven shares (4 and 2 pairs), loss_scale from count_normalizer."""
    r = results["dpo_ddp"]
    assert_same_update(r)
    assert r["loss"] == pytest.approx(r["reference_loss"], rel=1e-6)


@pytest.mark.parametrize("case", ["ppo_ddp", "ppo_penalty_shared_fsdp2"])
def test_ppo_actor_and_critic_updates_equal_one_process(results, case):
    """PPO's actor (through DDP / FSDP2) and critic (a replica whose gradients the trainer
    averages): every optimiser step's gradients and the final weights."""
    r = results[case]
    assert_same_update(r)
    assert_same_update({"grads": r["critic_grads"], "reference_grads": r["reference_critic_grads"],
                        "weights": r["critic_weights"],
                        "reference_weights": r["reference_critic_weights"]})


def test_dpo_trainer_step_equals_one_process(results):
    """DPOTrainer: each rank trains on half the global pairs; gradients, weights, the step's
    DPO metrics and the held-out pair evaluation equal the one-process run."""
    r = results["dpo_trainer_ddp"]
    assert_same_update(r)
    assert r["local_pairs"] == 4 and "eval/pair_accuracy" in r["metrics"]


def test_distributed_checkpoint_resumes_bit_identically(results):
    """FSDP2: 3 steps straight == 1 step, save, a fresh trainer loads, 2 more steps."""
    r = results["checkpoint_fsdp2"]
    assert r["step"] == 3
    for w, ref in zip(r["weights"], r["reference_weights"], strict=True):
        assert torch.equal(w, ref)
    for a, b in zip(r["history"], r["reference_history"], strict=True):
        assert {k: v for k, v in a.items() if not k.startswith("perf/")} == \
            {k: v for k, v in b.items() if not k.startswith("perf/")}
    for w, ref in zip(r["saved_weights"], r["reference_weights"], strict=True):
        assert torch.equal(w, ref)                          # model/ holds the full weights
    assert r["files"] == ["checkpoint-1", "checkpoint-2", "checkpoint-3", "curves.png",
                          "metrics.jsonl"]


def test_bad_world_size_is_a_clear_error(results):
    message = results["bad_world_size"]["error_message"]
    assert message is not None and "3 prompts per step do not split over 2 ranks" in message


def test_a_missing_rank_times_out_instead_of_hanging(results):
    r = results["straggler"]
    assert r["error_type"] is not None and "Timed out" in r["error_message"]


def test_torchrun_cli_trains_and_writes_once(tmp_path):
    """torchrun --nproc-per-node 2 -m rlhf_fast.cli train grpo --data-parallel fsdp2: rank 0
    writes the metrics, the summary and the checkpoint."""
    model, tok = cases.tiny()
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={WORLD}", "-m", "rlhf_fast.cli", "train", "grpo",
               "--model", str(tmp_path / "model"), "--steps", "2", "--group-size", "2",
               "--backend", "torch", "--threads", "1", "--no-progress",
               "--out", str(tmp_path / "run"), "--data-parallel", "fsdp2"]
    done = subprocess.run([*command, "--batch-size", "8"], env=env, capture_output=True,
                          text=True, timeout=300)   # a hung rank fails the test at 300 s
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["data_parallel"] == "fsdp2"
    assert summary["steps"] == 2
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [0, 1, 2]     # written once
    assert sorted(p.name for p in Path(tmp_path / "run" / "checkpoint-2").iterdir()) == \
        ["distributed", "model", "trainer_state.pt"]
