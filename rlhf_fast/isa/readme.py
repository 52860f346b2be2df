"""The README's "What the kernels cost" table, generated from a committed ISA report.

``rlhf-fast isa --readme README.md --from benchmarks/isa/sm90.json`` rewrites the part of
README.md between ``<!-- isa:begin -->`` and ``<!-- isa:end -->``; a test checks that the
committed README matches the committed report.
"""

from __future__ import annotations

import json
from pathlib import Path

BEGIN = "<!-- isa:begin -->"
END = "<!-- isa:end -->"
README_VOCABS = (151936, 50257, 32000, 8192)
README_DTYPE = "bf16"


def _loops(r: dict) -> str:
    parts = []
    for lp in r["loops"]:
        parts.append(f"{lp['role']} {lp['instr_per_elem']:.1f} / {lp['mufu_per_elem']:.2f}")
    return "; ".join(parts) or "-"


def _widths(r: dict) -> str:
    bits = sorted({b for lp in r["loops"] for b in lp["load_bits"] + lp["store_bits"]})
    return "/".join(map(str, bits)) or "-"


def _estimate(r: dict, gpu: str) -> str:
    for e in r["estimates"]:
        if e["gpu"].startswith(gpu):
            return f"{e['binding']} {e['floor_fraction']:.0%}"
    return "-"


WHAT = {
    "token_logprobs_fwd_kernel": "stats sweep (`token_logprobs`, DPO, sequence-level losses)",
    "token_logprobs_bwd_kernel": "gradient sweep (their backward)",
    "token_policy_loss_kernel": "fused token-level policy loss",
    "token_policy_loss_onchip_kernel": "fused policy loss, row in registers",
}


def render(report: dict, source: str) -> str:
    """Markdown table of the row kernels (bf16, the README's vocabularies; of a kernel's
    variants, the one with the entropy term, the most expensive)."""
    chosen: dict[tuple, dict] = {}
    for r in report["kernels"]:
        if r["dtype"] != README_DTYPE or r["vocab"] not in README_VOCABS or not r["loops"]:
            continue
        key = (r["kernel"], r["vocab"])
        cost = sum(lp["instr_per_elem"] for lp in r["loops"])
        if key not in chosen or cost > sum(lp["instr_per_elem"] for lp in chosen[key]["loops"]):
            chosen[key] = r
    rows = sorted(chosen.values(), key=lambda r: (list(WHAT).index(r["kernel"]), -r["vocab"]))
    lines = [
        f"Read from the SASS of the kernels compiled for sm_90 by Triton {report['triton']}, "
        f"bf16, the variant with the entropy term (report: `{source}`, all dtypes and "
        "variants). Per row loop: SASS instructions / MUFU ops per element; the last two "
        "columns are the throughput model's binding limit and fraction of the HBM floor (read "
        "and write once) on an H100 / H200: ESTIMATES, to be checked on a GPU.",
        "",
        "| kernel | V | warps | regs | loop: instr / MUFU per element | access bits | H100 "
        "| H200 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {WHAT[r['kernel']]} | {r['vocab']} | {r['num_warps']} | {r['regs']} | "
            f"{_loops(r)} | {_widths(r)} | {_estimate(r, 'H100')} | {_estimate(r, 'H200')} |")
    return "\n".join(lines)


def update_readme(readme: str, report_path: str) -> bool:
    """Rewrite the README's ISA section from ``report_path``; True when it changed."""
    report = json.loads(Path(report_path).read_text())
    text = Path(readme).read_text()
    head, rest = text.split(BEGIN, 1)
    _old, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{render(report, report_path)}\n{END}{tail}"
    if new != text:
        Path(readme).write_text(new)
    return new != text
