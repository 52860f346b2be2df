"""The README's performance section, generated from committed benchmark reports.

``rlhf-fast report --readme README.md benchmarks/results/*.json`` rewrites the text between
``<!-- performance:begin -->`` and ``<!-- performance:end -->``; a test checks that the
committed README matches the committed results.
"""

from __future__ import annotations

import json
from pathlib import Path

BEGIN = "<!-- performance:begin -->"
END = "<!-- performance:end -->"


def _fmt(value, spec: str) -> str:
    return spec.format(value) if value is not None else "-"


def _ceiling(record: dict) -> str:
    if record.get("frac_of_matmul") is not None:
        formula = record.get("flops_formula", "6*N*H*V")
        if record.get("gemm_tflops"):  # against the case's own GEMMs timed alone
            return f"{record['frac_of_matmul']:.1%} of its GEMMs alone ({formula} FLOP)"
        return f"{record['frac_of_matmul']:.1%} of bf16 matmul ({formula} FLOP)"
    return f"{record['frac_of_copy']:.1%} of copy ({record['bytes_formula']} B)"


def performance_section(reports: list[dict], sources: list[str]) -> str:
    """Markdown: per report, its device, date, versions and command, then one row per
    (suite, case, mode) comparing rlhf_fast with the reference and the best peer."""
    lines = []
    for report, source in zip(reports, sources, strict=True):
        c = report["ceilings"]
        lines += [
            f"**{report['device']}**, {report['date'][:10]}: torch {report['torch']}, triton "
            f"{report['triton']}; copy {c['copy_gbps']:.1f} GB/s, bf16 matmul "
            f"{c['matmul_tflops']:.2f} TFLOP/s measured in the same run. Command: "
            f"`{' '.join(report['command'])}`; raw numbers: `{source}`.",
            "",
            "| suite | case | mode | rlhf_fast ms | reference ms | speed-up | peak MiB "
            "(ours / ref) | fraction of the ceiling |",
            "|---|---|---|---|---|---|---|---|",
        ]
        ours = [r for r in report["records"] if r["impl"] == "rlhf_fast" and r["status"] == "ok"]
        by_key = {(r["suite"], r["label"], r["mode"], r["impl"]): r
                  for r in report["records"] if r["status"] == "ok"}
        for r in ours:
            ref = by_key.get((r["suite"], r["label"], r["mode"], "reference"), {})
            lines.append(
                f"| {r['suite']} | {r['label']} | {r['mode']} | {r['median_ms']:.3f} | "
                f"{_fmt(ref.get('median_ms'), '{:.3f}')} | "
                f"{_fmt(r.get('speedup_vs_reference'), '{:.2f}x')} | "
                f"{r['peak_extra_mib']:.0f} / {_fmt(ref.get('peak_extra_mib'), '{:.0f}')} | "
                f"{_ceiling(r)} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def update_readme(readme: str, result_paths: list[str]) -> bool:
    """Rewrite the README's performance section; True when it changed."""
    paths = sorted(result_paths)
    reports = [json.loads(Path(p).read_text()) for p in paths]
    text = Path(readme).read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{performance_section(reports, paths)}{END}{tail}"
    if new != text:
        Path(readme).write_text(new)
    return new != text
