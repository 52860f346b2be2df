"""The goals of the fused-linear long-sequence work (issue 15), measured on this machine.

Usage (each measurement runs in a fresh child process, so every peak is its own)::

    python benchmarks/fused_linear_goals.py [memory] [long] [step] [cpu-time] [gpu-model]

- ``memory``: peak extra memory of ``linear_policy_loss`` (dapo, gspo) and ``linear_dpo_loss``
  forward + backward at N = 8192 (8 x 1024), H = 256, V = 32768 float32, default arguments
  (the float32 weight gradient included), next to ``rlhf_fast.ops.chunking.memory_plan``.
- ``long``: one sequence of T = 65536 tokens at H = 256, V = 32768 float32 (8 GiB of logits),
  ``linear_policy_loss`` with the gspo and dapo presets: peak extra memory and wall time.
- ``step``: forward + backward from hidden states at N = 8192 (16 x 512), H = 128,
  V = 32000 float32: ``linear_policy_loss`` (dapo) against plain autograd on materialised
  logits (``log_softmax`` + ``gather`` and the clipped surrogate written out), and
  ``linear_token_logprobs`` against ``log_softmax`` + ``gather``: median wall and process
  CPU time of 3 calls after a warm-up, and the peak.
- ``cpu-time``: the bench's ``linear`` and ``dpo`` fused-linear cases at their quick CPU
  shapes (bf16 and float32), ``rlhf_fast`` against ``reference``, as process CPU time on ONE
  thread (median of 3 after a warm-up): the comparison that survives a machine shared with
  other jobs, where the bench's wall times do not.
- ``gpu-model``: the itemised prediction of ``memory_plan`` at N = 32768 (2 x 16384),
  H = 4096, V = 151936 bf16 on an 80 GB H100 and a 141 GB H200 (no GPU needed).

Peak memory: ``rlhf_fast.bench.measure.peak_extra_mib`` (CPU: the resident set's high-water
mark above the level before the call). Prints one JSON object per measurement.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

MIB = 2**20


def _policy_inputs(batch: int, seq_len: int, hidden: int, vocab: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, seq_len, hidden, generator=g).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) / hidden**0.5).requires_grad_()
    y = torch.randint(0, vocab, (batch, seq_len), generator=g)
    mask = torch.ones(batch, seq_len, dtype=torch.bool)
    adv = torch.randn(batch, generator=g)
    return h, w, y, mask, adv


def _timed(fn, reps: int) -> tuple[float, float]:
    """Median wall seconds and median process CPU seconds (all threads) of ``reps`` calls
    after one warm-up. On a machine shared with other jobs the CPU time is the steadier."""
    fn()
    wall, cpu = [], []
    for _ in range(reps):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return sorted(wall)[len(wall) // 2], sorted(cpu)[len(cpu) // 2]


def child_memory(name: str) -> dict:
    import torch
    import torch._dynamo  # imported by the first custom-op call: not the op's memory

    import rlhf_fast
    from rlhf_fast.bench.measure import peak_extra_mib
    from rlhf_fast.ops.chunking import memory_plan

    batch, seq_len, hidden, vocab = 8, 1024, 256, 32768
    h, w, y, mask, adv = _policy_inputs(batch, seq_len, hidden, vocab)

    def run():
        h.grad = w.grad = None
        if name == "dpo":
            ref = -torch.rand(batch) * seq_len
            out = rlhf_fast.linear_dpo_loss(h, w, y, mask, ref_logprobs=ref)
        else:
            out = rlhf_fast.linear_policy_loss(h, w, y, adv, mask, config=name)
        out.loss.backward()

    run()                                     # warm-up: imports, thread pool
    start = time.perf_counter()
    peak = peak_extra_mib(run, torch.device("cpu"))
    plan = memory_plan(batch * seq_len, hidden, vocab, torch.float32, "cpu")
    return {"op": name, "shape": "N=8192 H=256 V=32768 float32", "peak_extra_mib": peak,
            "wall_s": time.perf_counter() - start,
            "predicted_mib": (plan["beyond_accumulator"] + plan["weight_grad_accumulator"]) / MIB,
            "plan_mib": {k: v / MIB for k, v in plan.items() if k != "chunk_tokens"},
            "chunk_tokens": plan["chunk_tokens"]}


def child_long(name: str) -> dict:
    import torch
    import torch._dynamo

    import rlhf_fast
    from rlhf_fast.bench.measure import peak_extra_mib
    from rlhf_fast.ops.chunking import memory_plan

    seq_len, hidden, vocab = 65536, 256, 32768
    h, w, y, mask, adv = _policy_inputs(1, seq_len, hidden, vocab)
    times = []

    def run():
        h.grad = w.grad = None
        start = time.perf_counter()
        rlhf_fast.linear_policy_loss(h, w, y, adv, mask, config=name).loss.backward()
        times.append(time.perf_counter() - start)

    peak = peak_extra_mib(run, torch.device("cpu"))
    plan = memory_plan(seq_len, hidden, vocab, torch.float32, "cpu")
    return {"op": name, "shape": "T=65536 (one sequence) H=256 V=32768 float32",
            "peak_extra_mib": peak, "wall_s": times[-1], "chunk_tokens": plan["chunk_tokens"],
            "predicted_mib": (plan["beyond_accumulator"] + plan["weight_grad_accumulator"]) / MIB,
            "finite_grad": bool(torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all())}


def _plain_policy(h, w, y, adv, mask, old):
    """DAPO on materialised logits, as a plain PyTorch trainer writes it."""
    import torch

    logp = torch.log_softmax(h @ w.T, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    ratio = torch.exp(logp - old)
    a = adv.unsqueeze(-1)
    per_token = -torch.minimum(ratio * a, ratio.clamp(1 - 0.2, 1 + 0.28) * a)
    m = mask.float()
    return (per_token * m).sum() / m.sum()


def child_step(name: str) -> dict:
    import torch
    import torch._dynamo

    import rlhf_fast
    from rlhf_fast.bench.measure import peak_extra_mib

    batch, seq_len, hidden, vocab = 16, 512, 128, 32000
    h, w, y, mask, adv = _policy_inputs(batch, seq_len, hidden, vocab)
    with torch.no_grad():
        old = rlhf_fast.linear_token_logprobs(h, w, y) + 0.01 * torch.randn(batch, seq_len)
    losses = {
        "policy:rlhf_fast": lambda: rlhf_fast.linear_policy_loss(
            h, w, y, adv, mask, old_logprobs=old, config="dapo").loss,
        "policy:plain": lambda: _plain_policy(h, w, y, adv, mask, old),
        "logprobs:rlhf_fast": lambda: rlhf_fast.linear_token_logprobs(h, w, y).sum(),
        "logprobs:plain": lambda: torch.log_softmax(h @ w.T, -1).gather(
            -1, y.unsqueeze(-1)).sum(),
    }

    def run():
        h.grad = w.grad = None
        losses[name]().backward()

    seconds, cpu_seconds = _timed(run, reps=3)
    peak = peak_extra_mib(run, torch.device("cpu"))
    return {"op": name, "shape": "N=8192 H=128 V=32000 float32", "median_s": seconds,
            "median_cpu_s": cpu_seconds, "peak_extra_mib": peak,
            "threads": torch.get_num_threads()}


def child_cpu_time(name: str) -> dict:
    import torch

    from rlhf_fast.bench import dpo_suite, linear_suite

    torch.set_num_threads(1)
    suite_name, mode, dtype = name.split(":")
    suite = {"linear": linear_suite, "dpo": dpo_suite}[suite_name]
    shape = suite.QUICK_SHAPES["cpu"]
    n, h, v = shape[0] if suite_name == "linear" else shape["linear"][0]
    from rlhf_fast.bench.case import Case

    case = Case(n, v, dtype, mode, h)
    inputs = suite.make_inputs(case, torch.device("cpu"))
    row = {"case": f"{suite_name} {mode} N={n} H={h} V={v} {dtype}"}
    for impl in ("rlhf_fast", "reference"):
        step = suite.make_step(case, impl, inputs)
        row[f"{impl}_cpu_ms"] = 1000 * _timed(step, reps=3)[1]
    row["x_ref"] = row["reference_cpu_ms"] / row["rlhf_fast_cpu_ms"]
    return row


def gpu_model() -> list[dict]:
    import torch

    from rlhf_fast.ops.chunking import (
        CHUNK_MULTIPLE,
        LOGITS_BUDGET_FRACTION,
        LOGITS_BUDGET_MAX,
        LOGITS_BUDGET_MIN,
        chunk_token_bytes,
        memory_plan,
    )

    n, hidden, vocab = 32768, 4096, 151936
    rows = []
    for device, total in (("H100 (80 GiB)", 80 * 2**30), ("H200 (141 GB)", 141 * 10**9)):
        budget = max(LOGITS_BUDGET_MIN, min(LOGITS_BUDGET_MAX, total // LOGITS_BUDGET_FRACTION))
        chunk = budget // chunk_token_bytes(vocab, hidden, torch.bfloat16)
        chunk = max(CHUNK_MULTIPLE, chunk // CHUNK_MULTIPLE * CHUNK_MULTIPLE)
        plan = memory_plan(n, hidden, vocab, torch.bfloat16, "cuda", chunk_tokens=chunk)
        rows.append({"device": device, "shape": "N=32768 H=4096 V=151936 bfloat16",
                     **{k: (v if k == "chunk_tokens" else round(v / MIB, 1))
                        for k, v in plan.items()}})
    return rows


CHILDREN = {"memory": (child_memory, ("dapo", "gspo", "dpo")),
            "long": (child_long, ("gspo", "dapo")),
            "step": (child_step, ("policy:rlhf_fast", "policy:plain", "logprobs:rlhf_fast",
                                  "logprobs:plain")),
            "cpu-time": (child_cpu_time, tuple(
                f"{suite}:{mode}:{dtype}" for dtype in ("bfloat16", "float32")
                for suite, modes in (("linear", ("policy", "logprobs", "packed", "long")),
                                     ("dpo", ("linear", "packed", "long")))
                for mode in modes))}


def main(argv: list[str]) -> None:
    if argv[:1] == ["--child"]:
        fn = CHILDREN[argv[1]][0]
        print(json.dumps(fn(argv[2])))
        return
    for what in argv or ["memory", "long", "step", "cpu-time", "gpu-model"]:
        if what == "gpu-model":
            for row in gpu_model():
                print(json.dumps(row), flush=True)
            continue
        for name in CHILDREN[what][1]:
            proc = subprocess.run([sys.executable, __file__, "--child", what, name],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                print(json.dumps({"op": name, "error": proc.stderr[-2000:]}), flush=True)
                continue
            print(proc.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
