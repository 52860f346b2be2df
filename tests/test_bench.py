"""The benchmark harness: arithmetic, schema, reports, and a real quick run on this device."""

import json
import os
import pathlib
import subprocess
import sys
import time

import jsonschema
import pytest
import torch

from rlhf_fast.bench import (
    ceilings,
    dpo_suite,
    gae_suite,
    linear_suite,
    logprobs_suite,
    policy_suite,
    runner,
)
from rlhf_fast.bench.case import Case
from rlhf_fast.bench.readme import BEGIN, END, performance_section
from rlhf_fast.bench.rotation import rotating
from rlhf_fast.bench.schema import REPORT_SCHEMA

ROOT = pathlib.Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def test_useful_bytes_formulas():
    assert logprobs_suite.useful_bytes(Case(4, 10, "bfloat16", "fwd")) == 4 * 10 * 2
    assert logprobs_suite.useful_bytes(Case(4, 10, "bfloat16", "fwd+bwd")) == 2 * 4 * 10 * 2
    assert logprobs_suite.useful_bytes(Case(4, 10, "float32", "fwd+bwd")) == 2 * 4 * 10 * 4
    assert policy_suite.useful_bytes(Case(16, 300, "bfloat16", "token")) == 2 * 16 * 300 * 2
    assert gae_suite.useful_bytes(Case(64 * 8, 8, "float32", "fwd")) == 5 * 64 * 8 * 4
    assert linear_suite.useful_flops(Case(8, 300, "bfloat16", "token", 16)) == 6 * 8 * 16 * 300
    assert dpo_suite.useful_bytes(Case(16, 300, "bfloat16", "logits")) == 2 * 16 * 300 * 2
    assert dpo_suite.useful_flops(Case(8, 300, "bfloat16", "linear", 16)) == 8 * 8 * 16 * 300


@pytest.mark.parametrize("mode", ["logits", "linear"])
@pytest.mark.parametrize("impl", ["rlhf_fast", "reference"])
def test_dpo_case(impl, mode):
    case = Case(64, 300, "float32", mode, 16 if mode == "linear" else 0)
    r = dpo_suite.run_case(case, impl, CPU, warmup=0, reps=1)
    assert r["status"] == "ok" and r["median_ms"] > 0
    assert r["err_loss"] < 1e-5 and r["err_grad"] < 1e-5
    assert dpo_suite.run_case(case, "liger", CPU, warmup=0, reps=1)["status"] == "absent"


@pytest.mark.parametrize("mode", linear_suite.MODES)
@pytest.mark.parametrize("impl", ["rlhf_fast", "materialised", "reference"])
def test_linear_case(impl, mode):
    case = Case(32, 300, "float32", mode, 16)
    r = linear_suite.run_case(case, impl, CPU, warmup=0, reps=1)
    assert r["status"] == "ok" and r["useful_flops"] == 6 * 32 * 16 * 300
    assert r["err_loss"] < 1e-5 and r["err_grad"] < 1e-5
    for peer in ("liger", "cce"):
        assert linear_suite.run_case(case, peer, CPU, warmup=0, reps=1)["status"] == "absent"


def test_derived_flops_ratio():
    record = {"suite": "linear", "label": "c", "mode": "token", "impl": "rlhf_fast",
              "status": "ok", "useful_bytes": 0, "useful_flops": 6e12, "median_ms": 10.0,
              "peak_extra_mib": 1.0}
    runner._derive([record], copy_gbps=1.0, matmul_tflops=1000.0)
    assert record["tflops"] == pytest.approx(600.0)        # 6e12 FLOP / 10 ms
    assert record["frac_of_matmul"] == pytest.approx(0.6)


def test_derived_ratios():
    base = {"suite": "logprobs", "label": "c", "mode": "fwd", "status": "ok",
            "useful_bytes": 2e9}
    records = [{**base, "impl": "rlhf_fast", "median_ms": 1.0, "peak_extra_mib": 10.0},
               {**base, "impl": "reference", "median_ms": 4.0, "peak_extra_mib": 40.0},
               {**base, "impl": "reference_compiled", "status": "absent", "reason": "x"}]
    runner._derive(records, copy_gbps=4000.0)
    fast = records[0]
    assert fast["gbps"] == pytest.approx(2000.0)        # 2e9 B / 1 ms
    assert fast["frac_of_copy"] == pytest.approx(0.5)
    assert fast["speedup_vs_reference"] == pytest.approx(4.0)
    assert fast["memory_vs_reference"] == pytest.approx(0.25)
    assert "gbps" not in records[2]


def test_ceiling_arithmetic(monkeypatch):
    monkeypatch.setattr(ceilings, "median_ms", lambda *a, **k: 2.0)
    # 2 * 2^20 bytes moved in 2 ms -> 1.048576 GB/s; 2 * 64^3 FLOP in 2 ms -> 2.62e-7 TFLOP/s.
    assert ceilings.copy_bandwidth_gbps(CPU, n_bytes=2**20) == pytest.approx(2 * 2**20 / 2e-3 / 1e9)
    assert ceilings.matmul_tflops(CPU, size=64) == pytest.approx(2 * 64**3 / 2e-3 / 1e12)


def test_rotation_cycles_copies_on_cuda_only():
    made = []

    def make(i):
        made.append(i)
        return lambda: i

    step = rotating(make, input_bytes=100 * 2**20, device=torch.device("cuda"))
    assert made == [0, 1, 2] and [step() for _ in range(4)] == [0, 1, 2, 0]
    made.clear()
    step = rotating(make, input_bytes=100 * 2**20, device=CPU)
    assert made == [0] and step() == 0


@pytest.mark.parametrize("impl", ["rlhf_fast", "reference"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_logprobs_case(impl, mode):
    r = logprobs_suite.run_case(Case(8, 300, "bfloat16", mode), impl, CPU, warmup=0, reps=1)
    assert r["status"] == "ok" and r["median_ms"] > 0 and r["peak_extra_mib"] >= 0
    assert r["err_logp"] < 1e-5 and r["err_entropy"] < 1e-5
    if mode == "fwd+bwd":
        assert r["err_grad"] < 8e-3


@pytest.mark.parametrize("mode", list(policy_suite.MODES))
def test_policy_case(mode):
    case = Case(n=16, v=300, dtype="bfloat16", mode=mode)
    r = policy_suite.run_case(case, "rlhf_fast", CPU, warmup=0, reps=1)
    assert r["status"] == "ok" and r["err_loss"] < 1e-5 and r["err_grad"] < 8e-3
    assert policy_suite.run_case(case, "liger", CPU, warmup=0, reps=1)["status"] == "absent"


@pytest.mark.parametrize("impl", gae_suite.IMPLS)
def test_gae_case(impl):
    r = gae_suite.run_case(Case(8 * 16, 16, "float32", "fwd"), impl, CPU, warmup=0, reps=1)
    assert r["status"] == "ok" and r["label"] == "B=8 T=16 fp32"
    assert r.get("err_adv", 0.0) < 1e-6


def test_cpu_peak_memory_sees_a_big_allocation():
    from rlhf_fast.bench.measure import peak_extra_mib

    def allocate():
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        return float(x[-1])

    assert peak_extra_mib(allocate, CPU) >= 60


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    """The real thing: ``rlhf-fast bench --suite all --shapes quick`` on this device."""
    out = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, "-m", "rlhf_fast.cli", "bench", "--suite", "all", "--shapes", "quick",
           "--json", str(out / "r.json"), "--markdown", str(out / "r.md"),
           "--plot", str(out / "r.png")]
    # As a user runs it: the test harness's TRITON_INTERPRET must not reach the benchmark.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc.stdout, elapsed


def test_quick_run_under_a_minute_and_valid(quick_report):
    out, table, elapsed = quick_report
    if not torch.cuda.is_available():
        assert elapsed < 60, f"quick CPU bench took {elapsed:.0f} s"
    report = json.loads((out / "r.json").read_text())
    jsonschema.validate(report, REPORT_SCHEMA)
    assert {r["suite"] for r in report["records"]} == set(runner.SUITES)
    assert set(runner.SUITES) == {"logprobs", "policy", "linear", "dpo", "gae", "train"}
    assert all(r["status"] in ("ok", "absent") for r in report["records"])
    assert "x ref" in table and "bf16 matmul" in table
    assert (out / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md_rows = [line for line in (out / "r.md").read_text().splitlines()
               if line.startswith("| ") and "suite" not in line]
    assert len(md_rows) == len(report["records"])


def test_schema_rejects_broken_reports():
    report = json.loads((ROOT / "benchmarks/results/cpu-amd-epyc-2-cores.json").read_text())
    jsonschema.validate(report, REPORT_SCHEMA)
    broken = json.loads(json.dumps(report))
    del broken["records"][0]["median_ms"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, REPORT_SCHEMA)


def test_readme_performance_section_is_generated_from_committed_results():
    paths = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "benchmarks/results").glob("*.json"))
    assert paths, "no committed results"
    reports = [json.loads((ROOT / p).read_text()) for p in paths]
    readme = (ROOT / "README.md").read_text()
    section = readme.split(BEGIN, 1)[1].split(END, 1)[0]
    assert section == "\n" + performance_section(reports, paths), \
        "README is stale: run `rlhf-fast report benchmarks/results/*.json`"
