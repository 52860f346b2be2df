"""The benchmark harness: ratio arithmetic, tables, a small case in process and in a child."""

import json

import pytest
import torch

from rlhf_fast import cli
from rlhf_fast.bench import logprobs_suite, policy_suite, runner
from rlhf_fast.bench.case import Case

TINY = Case(n=8, v=300, dtype="bfloat16", mode="fwd+bwd")


def test_useful_bytes_formula():
    assert logprobs_suite.useful_bytes(Case(4, 10, "bfloat16", "fwd")) == 4 * 10 * 2
    assert logprobs_suite.useful_bytes(Case(4, 10, "bfloat16", "fwd+bwd")) == 2 * 4 * 10 * 2
    assert logprobs_suite.useful_bytes(Case(4, 10, "float32", "fwd+bwd")) == 2 * 4 * 10 * 4
    assert policy_suite.useful_bytes(Case(16, 300, "bfloat16", "token")) == 2 * 16 * 300 * 2


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
    assert records[1]["speedup_vs_reference"] == pytest.approx(1.0)
    assert "gbps" not in records[2]


@pytest.mark.parametrize("impl", ["rlhf_fast", "reference"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_run_case_in_process(impl, mode):
    case = Case(n=8, v=300, dtype="bfloat16", mode=mode)
    r = logprobs_suite.run_case(case, impl, torch.device("cpu"), warmup=0, reps=1)
    assert r["status"] == "ok" and r["median_ms"] > 0 and r["peak_extra_mib"] >= 0
    assert r["err_logp"] < 1e-5 and r["err_entropy"] < 1e-5
    if mode == "fwd+bwd":
        assert r["err_grad"] < 8e-3


def test_compiled_reference_absent_on_cpu():
    r = logprobs_suite.run_case(TINY, "reference_compiled", torch.device("cpu"), warmup=0, reps=1)
    assert r["status"] == "absent" and "CPU" in r["reason"]


def test_child_process_measurement():
    r = runner._run_in_child(logprobs_suite, TINY, "rlhf_fast", torch.device("cpu"), 0, 1)
    assert r["status"] == "ok", r
    assert r["label"] == TINY.label and r["impl"] == "rlhf_fast"


def test_cpu_peak_memory_sees_a_big_allocation():
    from rlhf_fast.bench.measure import peak_extra_mib

    def allocate():
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        return float(x[-1])

    assert peak_extra_mib(allocate, torch.device("cpu")) >= 60


def test_cli_bench_writes_reports(monkeypatch, tmp_path, capsys):
    tiny = {"cpu": [(8, 300)], "cuda": [(8, 300)]}
    monkeypatch.setattr(logprobs_suite, "QUICK_SHAPES", tiny)
    monkeypatch.setattr(policy_suite, "QUICK_SHAPES", tiny)
    monkeypatch.setattr(runner, "copy_bandwidth_gbps", lambda device: 10.0)
    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    code = cli.main(["bench", "--reps", "1", "--warmup", "0",
                     "--json", str(out_json), "--markdown", str(out_md)])
    assert code == 0
    report = json.loads(out_json.read_text())
    assert report["schema"] == runner.SCHEMA
    assert report["device_type"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert {r["suite"] for r in report["records"]} == {"logprobs", "policy"}
    assert len(report["records"]) == (2 * len(logprobs_suite.IMPLS)
                                      + len(policy_suite.MODES) * len(policy_suite.IMPLS))
    assert all(r["status"] in ("ok", "absent") for r in report["records"])
    table = capsys.readouterr().out
    assert "N=8 V=300 bfloat16" in table and "x ref" in table
    md_rows = [line for line in out_md.read_text().splitlines() if "N=8 V=300" in line]
    assert len(md_rows) == len(report["records"])


@pytest.mark.parametrize("mode", list(policy_suite.MODES))
def test_policy_suite_case(mode):
    case = Case(n=16, v=300, dtype="bfloat16", mode=mode)
    r = policy_suite.run_case(case, "rlhf_fast", torch.device("cpu"), warmup=0, reps=1)
    assert r["status"] == "ok" and r["err_loss"] < 1e-5 and r["err_grad"] < 8e-3
    peer = policy_suite.run_case(case, "liger", torch.device("cpu"), warmup=0, reps=1)
    assert peer["status"] == "absent"
