"""``rlhf-fast isa``: what the row kernels cost on an SM, read from their SASS, without a GPU.

    rlhf-fast isa [--arch 90 --arch 80] [--vocab 151936 ...] [--dtype bf16 ...] [--json PATH]
                  [--kernel SUBSTRING] [--check]
    rlhf-fast isa --readme README.md --from benchmarks/isa/sm90.json

Records the specialisations the public ops launch (``capture.py``), compiles each for the
target with ``triton.compile``, reads the SASS (``sass.py``) and prints, per kernel, vocabulary
and loop: SASS instructions, MUFU, ALU and FP32 ops per element, load / store widths, 64-bit
integer ops (on data; and forming addresses), registers, spills, programs per SM, bytes in
flight per SM, and the model's binding limit and fraction of the HBM floor on each GPU of the
target (``model.py``; its constants are printed after the table and written to the JSON).
``--check`` exits with status 1 when an sm_90 kernel breaks the budget (``budget.py``) or any
kernel spills; ``--readme`` regenerates README.md's table from a saved report (``readme.py``).
The interpreter must be off (``TRITON_INTERPRET`` unset).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from dataclasses import asdict

DEFAULT_VOCABS = (151936, 128256, 50257, 32000, 8192)
DEFAULT_DTYPES = ("bf16", "fp16", "fp32")


def build_report(archs: tuple[int, ...], vocabs: tuple[int, ...], dtypes: tuple[str, ...],
                 kernel_filter: str = "", with_gae: bool = True,
                 progress: bool = False) -> dict:
    """Capture, compile and analyse; returns the JSON-ready report."""
    import torch
    import triton

    from . import model
    from .analysis import analyse
    from .budget import BUDGET, violations
    from .capture import capture
    from .row_kernels import ROW_KERNELS
    from .sass import compile_variant

    kernels = []
    for arch in archs:
        variants = capture(arch, vocabs, dtypes, with_gae=with_gae)
        for i, variant in enumerate(variants):
            if kernel_filter and kernel_filter not in variant.kernel:
                continue
            if progress:
                print(f"[sm_{arch} {i + 1}/{len(variants)}] {variant.kernel}", file=sys.stderr,
                      flush=True)
            row = ROW_KERNELS.get(variant.kernel.split(":")[1])
            on_chip = row is not None and row.on_chip(variant)
            compiled = compile_variant(variant, arch, keep_sass=on_chip)
            row_lengths = None
            if on_chip:
                # Straight-line code: its per-element cost is its growth with the row.
                row_lengths = [(compiled, int(variant.constexpr("UNROLL")))]
                for slices in straight_line_points(row_lengths[0][1]):
                    other = compile_variant(variant.with_constexpr("UNROLL", slices), arch,
                                            keep_sass=True)
                    row_lengths.append((other, slices))
            merged: dict[tuple, dict] = {}
            for use in variant.uses:
                report = analyse(variant, compiled, use, row_lengths)
                key = (use.dtype, use.vocab)
                if key in merged:
                    merged[key]["ops"].append(use.op)
                else:
                    report["ops"] = [use.op]
                    merged[key] = report
            kernels.extend(merged.values())
    found = []
    for r in kernels:
        r["op"] = ", ".join(r.pop("ops"))
        if r["arch"] == "sm_90":
            r["violations"] = violations(r)
        else:
            r["violations"] = [v for v in violations(r) if "spills" in v]
        found.extend(r["violations"])
    kernels.sort(key=lambda r: (r["arch"], r["kernel"], r["dtype"], -r["vocab"], r["op"]))
    return {
        "command": "rlhf-fast isa " + " ".join(
            [f"--arch {a}" for a in archs] + [f"--vocab {v}" for v in vocabs]
            + [f"--dtype {d}" for d in dtypes]),
        "date": datetime.date.today().isoformat(),
        "triton": triton.__version__, "torch": torch.__version__.split("+")[0],
        "note": "SASS read without a GPU; times and fractions are ESTIMATES of the model",
        "model": model.constants(),
        "budget": asdict(BUDGET),
        "kernels": kernels,
        "violations": found,
    }


def straight_line_points(slices: int) -> list[int]:
    """Other row lengths (vectors per thread) to compile an on-chip kernel at: two shorter
    ones where possible, else longer ones."""
    shorter = [s for s in (slices // 2, slices // 4) if s >= 1]
    longer = [slices * 2, slices * 4][: 2 - len(shorter)]
    return shorter + longer


def _widths(bits: list[int]) -> str:
    return "/".join(str(b) for b in sorted(set(bits))) or "-"


def format_table(report: dict) -> str:
    """One line per kernel, vocabulary and row loop."""
    head = (f"{'kernel':<26} {'dtype':<5} {'V':>6} {'arch':<5} {'warps':>5} {'regs':>4} "
            f"{'CTA/SM':>6} {'spill':>5} {'loop':<11} {'instr/el':>8} {'MUFU/el':>7} "
            f"{'ALU/el':>6} {'FP32/el':>7} {'LDG':>4} {'STG':>4} {'i64 d/a':>7} "
            f"{'inflight':>8}  estimates (binding, fraction of the HBM floor)")
    lines = [head, "-" * len(head)]
    for r in report["kernels"]:
        common = (f"{r['kernel']:<26} {r['dtype']:<5} {r['vocab']:>6} {r['arch']:<5} "
                  f"{r['num_warps']:>5} {r['regs']:>4} {r['ctas_per_sm']:>6} "
                  f"{'YES' if r['spills'] else 'no':>5}")
        ests = "  ".join(
            f"{e['gpu'].split()[0]}: {e['binding']} {e['floor_fraction']:.0%}"
            + (f" (L2 hit {e['l2_hit']:.2f})" if e.get("l2_hit") is not None else "")
            for e in r.get("estimates", []))
        loops = r.get("loops") or [None]
        for i, lp in enumerate(loops):
            lead = common if i == 0 else " " * len(common)
            if lp is None:
                lines.append(f"{lead} {'-':<11}")
                continue
            inflight = f"{r.get('bytes_in_flight_per_sm', 0) / 1024:.0f} KB" if i == 0 else ""
            lines.append(
                f"{lead} {lp['role']:<11} {lp['instr_per_elem']:>8.2f} "
                f"{lp['mufu_per_elem']:>7.3f} {lp['alu_per_elem']:>6.2f} "
                f"{lp['fp32_per_elem']:>7.2f} {_widths(lp['load_bits']):>4} "
                f"{_widths(lp['store_bits']):>4} {lp['int64']:>3}/{lp['address_int64']:<3} "
                f"{inflight:>8}  {ests if i == 0 else ''}")
        lines.append(f"{'':<26} ops: {r['op']}; {r.get('overhead_instructions', 0)} SASS "
                     f"instructions outside the loops")
    return "\n".join(lines)


def format_model(report: dict) -> str:
    m = report["model"]
    lines = ["Model (estimates; " + report["note"] + "):"]
    lines += [f"  - {a}" for a in m["assumptions"]]
    for arch, gpus in m["gpus"].items():
        for g in gpus:
            lines.append(
                f"  {arch} {g['name']}: {g['sms']} SMs at {g['clock_ghz']} GHz, "
                f"{g['hbm_tb_s']} TB/s = {g['hbm_bytes_per_clock_per_sm']:.1f} B/clk/SM, "
                f"L2 {g['l2_mb']} MB; per SM per clock: issue {g['issue']}, FP32 {g['fp32']}, "
                f"ALU {g['alu']}, IMAD {g['imad']}, MUFU {g['xu']}, SHFL {g['shfl']}; "
                f"latency {g['latency_ns']:.0f} ns -> {g['bytes_in_flight_needed'] / 1024:.1f}"
                f" KB in flight needed per SM")
    b = report["budget"]
    lines.append(
        f"Budget (sm_90): stats loop <= {b['stats_instr']} instr/elem and <= {b['stats_mufu']} "
        f"MUFU/elem; gradient loop <= {b['grad_instr']} ({b['grad_entropy_instr']} with the "
        f"entropy term); {b['access_bits']}-bit row accesses; {b['int64_ops']} 64-bit integer "
        f"ops on data; no spills; HBM binding on {b['hbm_bound_gpu']} at V in "
        f"{tuple(b['hbm_bound_vocab'])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlhf-fast isa", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, action="append", choices=[80, 90],
                        help="SM target (default: 90 and 80)")
    parser.add_argument("--vocab", type=int, action="append",
                        help=f"vocabulary sizes (default: {DEFAULT_VOCABS})")
    parser.add_argument("--dtype", action="append", choices=list(DEFAULT_DTYPES),
                        help="logits dtypes (default: all)")
    parser.add_argument("--kernel", default="", help="only kernels whose name contains this")
    parser.add_argument("--json", help="write the report to this file")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if a kernel breaks the budget or spills")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    parser.add_argument("--readme", help="rewrite this README's table from --from's report")
    parser.add_argument("--from", dest="source", help="a saved report (JSON)")
    args = parser.parse_args(argv)
    if args.readme:
        from .readme import update_readme

        if not args.source:
            parser.error("--readme needs --from REPORT.json")
        changed = update_readme(args.readme, args.source)
        print(f"{args.readme}: {'updated' if changed else 'already up to date'}")
        return 0
    from ..backend import triton_interpreted

    if triton_interpreted():
        parser.error("unset TRITON_INTERPRET: the interpreter cannot compile kernels")
    report = build_report(tuple(args.arch or (90, 80)), tuple(args.vocab or DEFAULT_VOCABS),
                          tuple(args.dtype or DEFAULT_DTYPES), args.kernel,
                          progress=not args.quiet)
    print(format_table(report))
    print()
    print(format_model(report))
    if report["violations"]:
        print("\nBudget violations:")
        print("\n".join(f"  {v}" for v in report["violations"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
    return 1 if args.check and report["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
