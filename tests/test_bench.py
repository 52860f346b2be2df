"""The benchmark harness: arithmetic, schema, reports, and a real quick run on this device."""

import argparse
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jsonschema
import pytest
import torch

import rlhf_fast
from rlhf_fast import aot, cli
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


@pytest.mark.parametrize("mode", ["logits", *dpo_suite.LINEAR_MODES])
@pytest.mark.parametrize("impl", ["rlhf_fast", "reference"])
def test_dpo_case(impl, mode):
    case = Case(64, 300, "float32", mode, 0 if mode == "logits" else 16)
    r = dpo_suite.run_case(case, impl, CPU, warmup=0, reps=1)
    assert r["status"] == "ok" and r["median_ms"] > 0
    assert r["err_loss"] < 1e-5 and r["err_grad"] < 1e-5
    assert dpo_suite.run_case(case, "liger", CPU, warmup=0, reps=1)["status"] == "absent"


@pytest.mark.parametrize("mode", linear_suite.MODES)
@pytest.mark.parametrize("impl", ["rlhf_fast", "materialised", "reference"])
def test_linear_case(impl, mode):
    case = Case(32, 300, "float32", mode, 16)
    r = linear_suite.run_case(case, impl, CPU, warmup=0, reps=1)
    # packed: only the real tokens (lengths T/2..T) are run, and counted
    tokens = linear_suite.make_inputs(case, CPU)["packed_hidden"].shape[0] \
        if mode == "packed" else 32
    assert mode != "packed" or 16 <= tokens < 32
    assert r["status"] == "ok" and r["useful_flops"] == 6 * tokens * 16 * 300
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


def test_derived_flops_ratio_against_the_case_gemms():
    """With the case's own GEMM rate measured, % gemm is against it, not the square matmul."""
    record = {"suite": "linear", "label": "c", "mode": "token", "impl": "rlhf_fast",
              "status": "ok", "useful_bytes": 0, "useful_flops": 6e12, "median_ms": 10.0,
              "peak_extra_mib": 1.0, "gemm_tflops": 800.0}
    runner._derive([record], copy_gbps=1.0, matmul_tflops=1000.0)
    assert record["frac_of_matmul"] == pytest.approx(0.75)


def test_case_gemm_ceiling_is_a_rate_of_the_case_shapes(monkeypatch):
    calls = []

    def fake_best_ms(fn, device, *, warmup, reps):
        calls.append(tuple(fn().shape))
        return 1.0
    monkeypatch.setattr(ceilings, "best_ms", fake_best_ms)
    # 6 * 8 * 4 * 10 FLOP in 3 ms (three GEMMs of 1 ms each).
    assert ceilings.linear_gemm_tflops(8, 4, 10, "bfloat16", CPU) == pytest.approx(
        6 * 8 * 4 * 10 / 3e-3 / 1e12)
    assert calls == [(8, 10), (8, 4), (10, 4)]   # logits, grad_hidden, grad_weight


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
def tiny_report(tmp_path_factory):
    """The real thing, as a user runs it, at toy shapes: ``rlhf-fast bench --suite all
    --shapes tiny`` on this device, every suite in its own process. Only validity is
    checked: timings are the benchmark's business, never a test's."""
    out = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, "-m", "rlhf_fast.cli", "bench", "--suite", "all", "--shapes", "tiny",
           "--warmup", "0", "--reps", "1",
           "--json", str(out / "r.json"), "--markdown", str(out / "r.md"),
           "--plot", str(out / "r.png")]
    # As a user runs it: the test harness's TRITON_INTERPRET must not reach the benchmark.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc.stdout, proc.stderr


def test_tiny_run_is_valid(tiny_report):
    out, table, _ = tiny_report
    report = json.loads((out / "r.json").read_text())
    jsonschema.validate(report, REPORT_SCHEMA)
    assert {r["suite"] for r in report["records"]} == set(runner.SUITES)
    assert set(runner.SUITES) == {"logprobs", "policy", "linear", "dpo", "gae", "train"}
    assert all(r["status"] in ("ok", "absent") for r in report["records"])
    ok = [r for r in report["records"] if r["status"] == "ok"]
    assert all(r["median_ms"] > 0 and r["peak_extra_mib"] >= 0 for r in ok)
    assert all(r["gemm_tflops"] > 0 for r in ok if r.get("useful_flops"))
    assert "x ref" in table and "bf16 matmul" in table
    assert (out / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md_rows = [line for line in (out / "r.md").read_text().splitlines()
               if line.startswith("| ") and "suite" not in line]
    assert len(md_rows) == len(report["records"])


def test_console_output_fits_120_columns(tiny_report):
    _, table, progress = tiny_report
    for line in table.splitlines() + progress.splitlines():
        assert len(line) <= runner.WIDTH, f"{len(line)} columns: {line!r}"


def test_console_legend_explains_every_column(tiny_report):
    _, table, _ = tiny_report
    legend = table.split("\n\n")[-1].splitlines()
    explained = {line.split("  ")[0] for line in legend if not line.startswith(" ")}
    assert {name for name, *_ in runner.CONSOLE_COLUMNS} <= explained
    header = next(line for line in table.splitlines() if line.startswith("impl "))
    assert header.split() == ["impl", *" ".join(n for n, *_ in runner.CONSOLE_COLUMNS).split()]


def test_absent_implementations_in_one_entry(tiny_report):
    out, table, _ = tiny_report
    report = json.loads((out / "r.json").read_text())
    absent = [r for r in report["records"] if r["status"] == "absent"]
    assert absent, "the CPU run has absent peers (they need CUDA)"
    entries = [line for line in table.splitlines() if line.startswith("absent:")]
    assert len(entries) == 1
    assert not any("absent" in line for line in table.splitlines() if line.startswith("  "))
    summary = " ".join(runner.absent_summary(report["records"]).split())
    for impl in {r["impl"] for r in absent}:
        count = sum(r["impl"] == impl for r in absent)
        assert f"{impl} x{count} (" in summary


def test_progress_names_cases_as_the_table_does(tiny_report):
    out, table, progress = tiny_report
    report = json.loads((out / "r.json").read_text())
    headings = dict.fromkeys(runner.case_heading(r["suite"], r["label"], r["mode"])
                             for r in report["records"])
    progress = " ".join(progress.split())
    lines = table.splitlines()
    for heading in headings:
        assert heading in lines, heading
        assert heading in progress, heading


def test_console_table_of_a_report_with_an_error():
    base = {"suite": "linear", "label": "N=8 H=4 V=10 bfloat16", "mode": "policy"}
    report = {"device": "CPU: test", "torch": "t", "triton": "t", "date": "d",
              "ceilings": {"copy_gbps": 10.0, "matmul_tflops": 1.0},
              "records": [
                  {**base, "impl": "rlhf_fast", "status": "ok", "median_ms": 2.0,
                   "peak_extra_mib": 1.0, "useful_bytes": 0, "useful_flops": 6 * 8 * 4 * 10,
                   "gemm_tflops": 1e-6, "err_loss": 1e-7, "err_grad": 2e-3},
                  {**base, "impl": "materialised", "status": "error",
                   "reason": "RuntimeError: " + "x" * 300},
                  {**base, "impl": "liger", "status": "absent", "reason": "needs CUDA"}]}
    runner._derive(report["records"], copy_gbps=10.0, matmul_tflops=1.0)
    table = runner.format_table(report)
    lines = table.splitlines()
    assert all(len(line) <= runner.WIDTH for line in lines)
    row = next(line for line in lines if line.startswith("  rlhf_fast"))
    assert row.split()[1:] == ["2.000", "1", "-", "-", "-", "-", "0.00", "96%", "1.0e-07",
                               "2.0e-03"]
    assert any(line.startswith("  materialised") and "error: RuntimeError" in line
               for line in lines)
    assert "absent: liger x1 (needs CUDA)" in lines


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["--version"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"rlhf-fast {rlhf_fast.__version__} (torch {torch.__version__}")


def _actions(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action._choices_actions
            for sub in action.choices.values():
                yield from _actions(sub)
        else:
            yield action


def test_every_option_has_help_text():
    undocumented = [action.dest for action in _actions(cli.build_parser())
                    if not (action.help and action.help.strip())]
    assert not undocumented


def test_plot_without_matplotlib_fails_before_running(monkeypatch, tmp_path, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a))

    def must_not_run(*args, **kwargs):
        raise AssertionError("the benchmark ran before the missing dependency was reported")
    monkeypatch.setattr(runner, "run", must_not_run)
    assert cli.main(["bench", "--suite", "gae", "--plot", str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err
    assert "--plot needs matplotlib" in err and "pip install" in err


def test_missing_output_folder_fails_before_running(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(runner, "run", lambda *a, **k: pytest.fail("the benchmark ran"))
    assert cli.main(["bench", "--json", str(tmp_path / "no" / "r.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_aot_summary_line():
    rows = [{"kernel": "k[a]", "arch": "sm_80", "num_warps": 4, "regs": 40, "local": 0,
             "stack": 0, "spills": False},
            {"kernel": "k[b]", "arch": "sm_90", "num_warps": 4, "regs": 56, "local": 0,
             "stack": 0, "spills": False}]
    assert aot.summary(rows) == ("OK: 2/2 kernel variants compiled for sm_80, sm_90, 0 with "
                                 "register spills, 0 compile errors, 40-56 registers")
    rows.append({"kernel": "k[c]", "arch": "sm_90", "error": "boom"})
    assert aot.summary(rows).startswith("FAILED: 2/3 kernel variants")


def test_aot_command_prints_summary_and_no_fp_fusion_warning():
    """``rlhf-fast aot`` as a user runs it: no TRITON_* variables set beforehand."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "TRITON_DEFAULT_FP_FUSION")}
    proc = subprocess.run([sys.executable, "-m", "rlhf_fast.cli", "aot", "--arch", "90"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[-1].startswith("OK: ")
    assert "TRITON_DEFAULT_FP_FUSION" not in proc.stdout + proc.stderr


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
