"""``rlhf-fast isa``: the kernels the ops launch, compiled for sm_90 without a GPU, held to the
ISA budget (rlhf_fast/isa/budget.py); the SASS reader and the model on known inputs; the
committed report and the README table made from it."""

import json
import pathlib

import pytest
from isa_reports import result

from rlhf_fast.isa import model, sass
from rlhf_fast.isa.budget import BUDGET, violations
from rlhf_fast.isa.readme import BEGIN, END, render

ROOT = pathlib.Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "benchmarks" / "isa" / "sm90.json"


def rows(report, kernel=None, vocab=None, dtype=None):
    return [r for r in report["kernels"]
            if (kernel is None or r["kernel"] == kernel) and (vocab is None or r["vocab"] == vocab)
            and (dtype is None or r["dtype"] == dtype)]


# --- the budget, on the kernels the ops launch ---------------------------------------------

@pytest.mark.parametrize("run", ["sm90_bf16", "sm90_fp16_fp32"])
def test_every_kernel_within_budget(run):
    report, log, code = result(run)
    assert report["kernels"], log[-3000:]
    assert report["violations"] == [], "\n".join(report["violations"])
    assert code == 0


def test_every_row_kernel_was_analysed_at_the_budget_vocabularies():
    report, _, _ = result("sm90_bf16")
    for vocab in (151936, 50257, 32000):
        kinds = {r["kind"] for r in rows(report, vocab=vocab)}
        assert {"stats", "grad", "fused"} <= kinds, (vocab, kinds)
        for r in rows(report, vocab=vocab):
            if r["kind"] == "other":  # GAE and the gradient rescale: no row sweep to classify
                assert r["kernel"] in ("gae_kernel", "scale_rows_kernel"), r["kernel"]
                continue
            roles = [lp["role"] for lp in r["loops"]]
            expected = {"stats": ["stats"], "grad": ["gradient"],
                        "fused": ["stats", "gradient"]}[r["kind"]]
            assert roles == expected, (r["kernel"], vocab, roles)
    assert {r["kind"] for r in rows(report, vocab=8192)} >= {"single_pass", "stats", "grad"}


def test_row_accesses_are_128_bit_even_for_an_odd_vocabulary():
    report, _, _ = result("sm90_bf16")
    for r in rows(report, vocab=50257):
        for lp in r["loops"]:
            assert set(lp["load_bits"] + lp["store_bits"]) == {128}, (r["kernel"], lp)
            assert lp["int64"] == 0


def test_fused_kernel_second_read_runs_backwards_with_evict_first_hints():
    report, _, _ = result("sm90_bf16")
    for r in rows(report, kernel="token_policy_loss_kernel"):
        grad = next(lp for lp in r["loops"] if lp["role"] == "gradient")
        assert grad["direction"] == "backward" and grad["evict_first_stores"], r["vocab"]
        h100 = next(e for e in r["estimates"] if e["gpu"] == "H100 SXM")
        assert 0.0 < h100["l2_hit"] <= 1.0 and h100["binding"] == "HBM"


def test_the_budget_check_catches_a_regression():
    report, _, _ = result("sm90_bf16")
    r = json.loads(json.dumps(rows(report, kernel="token_logprobs_fwd_kernel", vocab=151936)[0]))
    assert violations(r) == []
    r["loops"][0]["instr_per_elem"] = BUDGET.stats_instr + 1
    r["loops"][0]["load_bits"] = [64, 64]
    r["spills"], r["local"] = True, 8
    found = violations(r)
    assert any("instr/elem" in v for v in found) and any("narrower" in v for v in found)
    assert any("spills" in v for v in found)


# --- the SASS reader and the model on known inputs -----------------------------------------

LISTING = """
        /*0100*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0110*/                   FMUL R8, R4, R5 ;
        /*0120*/                   MUFU.EX2 R9, R8 ;
        /*0130*/                   FSETP.GEU.AND P0, PT, R8, RZ, PT ;
        /*0140*/                   IADD3 R2, P1, R2, 0x2000, RZ ;
        /*0150*/                   IADD3.X R3, RZ, R3, RZ, P1, !PT ;
        /*0160*/                   ISETP.NE.U32.AND.EX P2, PT, R10, RZ, PT, P2 ;
        /*0170*/              @P2 BRA 0x100 ;
        /*0180*/                   STG.E.U16 desc[UR4][R6.64], R9 ;
        /*0190*/                   EXIT ;
        /*01a0*/                   BRA 0x1a0 ;
"""


def test_sass_loop_reading():
    ins = sass.parse_sass(LISTING)
    loops = [lp for lp in sass.analyse_loops(ins, 2) if lp.instructions > 1]
    assert len(loops) == 1
    lp = loops[0]
    assert lp.instructions == 8 and lp.elements == 8 and lp.role == "stats"
    assert lp.loads == [128] and lp.mufu == 1 and lp.step == 0x2000
    # The carry of the pointer step forms an address; the 64-bit compare is data.
    assert lp.address_int64 == 1 and lp.int64 == 1
    assert lp.pipes["fp32"] == 1 and lp.pipes["xu"] == 1 and lp.pipes["alu"] == 4
    assert sass.access_bits("STG.E.U16") == 16 and sass.access_bits("LDG.E") == 32
    assert not sass.is_int64("SHF.R.U32.HI") and sass.is_int64("IMAD.WIDE.U32")


def test_model_limits():
    h100 = model.GPUS[90][0]
    assert h100.hbm_bytes_per_clock == pytest.approx(14.46, rel=1e-2)
    assert model.ctas_per_sm(h100, regs=64, num_warps=32, shared_bytes=0) == 1
    assert model.ctas_per_sm(h100, regs=32, num_warps=8, shared_bytes=0) == 8
    # Rows in flight well inside L2: every second read hits; far beyond it: few do.
    assert model.second_read_hit_rate(132, 64_000, 50 * 2**20, True, False) == 1.0
    assert model.second_read_hit_rate(1000, 300_000, 50 * 2**20, True, True) < 0.2
    # A forward second read is all or nothing (each column waits half a row's time), a
    # backward one degrades gracefully: rows that just fit favour forwards, rows that
    # over-commit L2 backwards.
    fit = (264, 300_000, 50 * 2**20)
    assert model.second_read_hit_rate(*fit, False, False) == 1.0
    assert 0.3 < model.second_read_hit_rate(*fit, True, False) < 0.6
    over = (264, 300_000, 25 * 2**20)
    assert model.second_read_hit_rate(*over, False, True) < 1e-6
    assert model.second_read_hit_rate(*over, True, True) > 0.1
    cost = model.RowCost(loop={"issue": 40.0}, overhead={})
    slow = model.estimate(h100, cost, 151936, 512, 2, 2.0, 2.0, 32.0)
    assert slow.binding == "issue" and slow.floor_fraction < 0.5
    fast = model.estimate(h100, model.RowCost(loop={"issue": 8.0}, overhead={}), 151936, 512,
                          2, 2.0, 2.0, 32.0)
    assert fast.binding == "HBM" and fast.floor_fraction == pytest.approx(1.0)


# --- the committed report and the README table ---------------------------------------------

def test_committed_report_is_within_budget():
    report = json.loads(COMMITTED.read_text())
    assert report["violations"] == []
    assert {r["dtype"] for r in report["kernels"] if r["dtype"]} == {"bf16", "fp16", "fp32"}
    assert {151936, 128256, 50257, 32000, 8192} <= {r["vocab"] for r in report["kernels"]}
    assert report["model"]["gpus"]["sm_90"] and report["budget"]["stats_instr"] == 15.0
    for r in report["kernels"]:
        assert not r["spills"], r["kernel"]


def test_readme_table_is_generated_from_the_committed_report():
    text = (ROOT / "README.md").read_text()
    section = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    report = json.loads(COMMITTED.read_text())
    assert section == render(report, "benchmarks/isa/sm90.json").strip(), \
        "run: rlhf-fast isa --readme README.md --from benchmarks/isa/sm90.json"
