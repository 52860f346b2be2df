"""Run suites on the current device, derive the ratios, print the table, write reports.

Report schema (``rlhf_fast.bench/1``, JSON Schema in ``rlhf_fast.bench.schema``):

- ``schema``, ``date`` (UTC ISO 8601), ``command`` (argv), ``device`` (name), ``device_type``
  (``cuda`` | ``cpu``), ``driver``, ``python``, ``torch``, ``triton``, ``peers`` (versions of
  the peer libraries, null when absent);
- ``ceilings``: ``copy_gbps`` (device-to-device copy, bytes read + written) and
  ``matmul_tflops`` (bf16 ``n x n`` matmul, 2 n^3 FLOP), both measured in the same run;
- ``records``: one per (case, implementation): ``suite``, ``case`` (n, v, dtype, mode),
  ``label``, ``mode``, ``impl``, ``status`` (``ok`` | ``absent`` | ``error``), ``reason``
  (absent / error), ``median_ms``, ``peak_extra_mib``, errors against the float64 reference
  (logprobs: ``err_logp``, ``err_entropy``, ``err_grad`` for fwd+bwd; policy: ``err_loss``,
  ``err_grad``), ``useful_bytes``, ``bytes_formula``, ``gbps``
  (useful_bytes / median time), ``frac_of_copy`` (gbps / copy_gbps), ``speedup_vs_reference``
  (reference time / this time) and ``memory_vs_reference`` (this peak / reference peak);
  fused-linear cases add ``useful_flops``, ``flops_formula``, ``gemm_tflops`` (the case's
  own GEMMs timed alone just before it), ``tflops`` and ``frac_of_matmul`` (tflops /
  gemm_tflops; reports without gemm_tflops used the square matmul ceiling).

The console table (``format_table``) fits ``WIDTH`` columns: one block per case, a legend,
and the implementations that did not run summarised in one entry.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import textwrap
from collections.abc import Iterable
from dataclasses import asdict

import torch

from .ceilings import copy_bandwidth_gbps, matmul_tflops
from .suites import SUITES, case_label

SCHEMA = "rlhf_fast.bench/1"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"CPU: {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"CPU: {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def driver_version(device: torch.device) -> str | None:
    if device.type != "cuda":
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return None


def _version(module: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict:
    return {
        "schema": SCHEMA,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": [os.path.basename(sys.argv[0]), *sys.argv[1:]],
        "device": device_name(device),
        "device_type": device.type,
        "driver": driver_version(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "peers": {name: _version(name) for name in ("liger-kernel", "cut-cross-entropy")},
    }


def _run_in_child(jobs: list[dict]) -> list[dict]:
    """Run jobs (one suite, every case and implementation) in a fresh process."""
    spec = {"threads": torch.get_num_threads(), "jobs": jobs}
    proc = subprocess.run([sys.executable, "-m", "rlhf_fast.bench.worker", json.dumps(spec)],
                          capture_output=True, text=True)
    if proc.returncode == 0:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return [{"suite": j["suite"], "case": j["case"], "label": j["label"],
             "mode": j["case"]["mode"], "impl": j["impl"], "status": "error",
             "reason": tail[0]} for j in jobs]


def _derive(records: list[dict], copy_gbps: float, matmul_tflops: float | None = None) -> None:
    by_key = {(r["suite"], r["label"], r["mode"], r["impl"]): r for r in records}
    for r in records:
        if r["status"] != "ok":
            continue
        r["gbps"] = r["useful_bytes"] / (r["median_ms"] * 1e-3) / 1e9
        r["frac_of_copy"] = r["gbps"] / copy_gbps
        # The FLOP ceiling: the case's own GEMMs timed alone next to it (gemm_tflops), or
        # else the run's square bf16 matmul (reports written before gemm_tflops existed).
        flop_ceiling = r.get("gemm_tflops") or matmul_tflops
        if r.get("useful_flops") and flop_ceiling:
            r["tflops"] = r["useful_flops"] / (r["median_ms"] * 1e-3) / 1e12
            r["frac_of_matmul"] = r["tflops"] / flop_ceiling
        ref = by_key.get((r["suite"], r["label"], r["mode"], "reference"))
        if ref and ref["status"] == "ok":
            r["speedup_vs_reference"] = ref["median_ms"] / r["median_ms"]
            if ref["peak_extra_mib"] > 0:
                r["memory_vs_reference"] = r["peak_extra_mib"] / ref["peak_extra_mib"]


def case_heading(suite: str, label: str, mode: str) -> str:
    """How a case is named in the progress lines and in the console table alike."""
    return f"{suite} {label} {mode}"


def progress_line(step: int, steps: int, jobs: list[dict]) -> str:
    """``[#####---------------] 2/5 policy N=512 V=32000 bfloat16 token, ... (12 runs)``:
    the cases of the suite about to run, named as the table's headings name them, wrapped to
    ``WIDTH`` columns."""
    done = round(20 * (step - 1) / steps)
    cases = dict.fromkeys(case_heading(j["suite"], j["label"], j["case"]["mode"]) for j in jobs)
    text = (f"[{'#' * done}{'-' * (20 - done)}] {step}/{steps} {', '.join(cases)} "
            f"({len(jobs)} runs)")
    return "\n".join(textwrap.wrap(text, WIDTH, subsequent_indent=" " * 27,
                                    break_on_hyphens=False))


def run(suites: Iterable[str] = ("logprobs",), shapes: str = "quick",
        device: torch.device | None = None, warmup: int | None = None,
        reps: int | None = None, progress: bool = True) -> dict:
    """Run the suites and return the report (see the module docstring for its schema)."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    warmup = warmup if warmup is not None else (5 if on_gpu else 1)
    reps = reps if reps is not None else (20 if on_gpu else 3)
    report = environment(device)
    report["ceilings"] = {"copy_gbps": copy_bandwidth_gbps(device),
                          "matmul_tflops": matmul_tflops(device)}
    # One group per suite (one child process on the CPU): every case and implementation of
    # it. Peak memory is measured against the resident set just before each call, so the
    # cases need no process of their own; a process costs seconds to start (torch, dynamo).
    groups: dict[str, list[dict]] = {}
    for name in suites:
        suite = SUITES[name]
        for case in suite.cases(shapes, device):
            for impl in suite.IMPLS:
                groups.setdefault(name, []).append(
                    {"suite": name, "case": asdict(case), "label": case_label(suite, case),
                     "impl": impl, "device": str(device), "warmup": warmup, "reps": reps})
    records = []
    for i, jobs in enumerate(groups.values(), 1):
        if progress:
            print(progress_line(i, len(groups), jobs), file=sys.stderr, flush=True)
        if on_gpu:
            from .worker import run_job
            for job in jobs:
                records.append(run_job(job))
                torch.cuda.empty_cache()
        else:
            records.extend(_run_in_child(jobs))
    _derive(records, report["ceilings"]["copy_gbps"], report["ceilings"]["matmul_tflops"])
    report["records"] = records
    return report


COLUMNS = [
    ("suite", "suite", "{}"), ("case", "label", "{}"), ("mode", "mode", "{}"),
    ("impl", "impl", "{}"),
    ("ms", "median_ms", "{:.3f}"), ("peak MiB", "peak_extra_mib", "{:.0f}"),
    ("GB/s", "gbps", "{:.1f}"), ("% copy", "frac_of_copy", "{:.0%}"),
    ("TFLOP/s", "tflops", "{:.2f}"), ("% gemm", "frac_of_matmul", "{:.0%}"),
    ("x ref", "speedup_vs_reference", "{:.2f}"), ("mem/ref", "memory_vs_reference", "{:.2f}"),
    ("err logp", "err_logp", "{:.1e}"), ("err loss", "err_loss", "{:.1e}"),
    ("err grad", "err_grad", "{:.1e}"), ("err adv", "err_adv", "{:.1e}"),
]


def table_rows(report: dict) -> list[list[str]]:
    rows = []
    for r in report["records"]:
        if r["status"] != "ok":
            rows.append([r["suite"], r["label"], r["mode"], r["impl"],
                         f"{r['status']}: {r['reason']}"])
            continue
        rows.append([fmt.format(r[key]) if r.get(key) is not None else "-"
                     for _, key, fmt in COLUMNS])
    return rows


WIDTH = 120
"""Columns of the console output (table, legend, progress lines)."""

ERROR_KEYS = ("err_logp", "err_entropy", "err_loss", "err_adv")
"""The output errors a suite may report; the console shows the largest as ``err``."""

CONSOLE_COLUMNS = [
    # (header, width, value of a record or None, format)
    ("ms", 9, lambda r: r.get("median_ms"), "{:.3f}"),
    ("peak MiB", 8, lambda r: r.get("peak_extra_mib"), "{:.0f}"),
    ("x ref", 5, lambda r: r.get("speedup_vs_reference"), "{:.2f}"),
    ("mem/ref", 7, lambda r: r.get("memory_vs_reference"), "{:.2f}"),
    ("GB/s", 7, lambda r: r.get("gbps") if r.get("useful_bytes") else None, "{:.1f}"),
    ("% copy", 6, lambda r: r.get("frac_of_copy") if r.get("useful_bytes") else None, "{:.0%}"),
    ("TFLOP/s", 7, lambda r: r.get("tflops"), "{:.2f}"),
    ("% gemm", 6, lambda r: r.get("frac_of_matmul"), "{:.0%}"),
    ("err", 7, lambda r: max((r[k] for k in ERROR_KEYS if r.get(k) is not None),
                             default=None), "{:.1e}"),
    ("err grad", 8, lambda r: r.get("err_grad"), "{:.1e}"),
]

LEGEND = """\
ms        median wall time of one call (fwd, or fwd+bwd; CUDA events on a GPU); fewer is better
peak MiB  peak memory above what was held before the call (CUDA: allocator; CPU: resident set)
x ref     the eager float32 reference's ms / this ms: above 1 is faster than the reference
mem/ref   this peak MiB / the reference's peak MiB: below 1 is leaner than the reference
GB/s      useful bytes / ms: the logits read once (+ the gradient written once), gae 5*B*T*4 B
% copy    GB/s as a share of the device-to-device copy bandwidth measured at the start of the run
TFLOP/s   useful FLOP / ms of the fused-linear cases: 6*N*H*V (three GEMMs), dpo linear 8*N*H*V
% gemm    TFLOP/s as a share of the rate of the case's own GEMMs run alone, just before the case,
          in the same process: 100% would be an op that is nothing but its GEMMs
err       largest error of the outputs against float64: logp / entropy / advantages (absolute),
          loss (relative)
err grad  norm-wise relative error of the gradient against float64
-         not applicable to this case (or the reference did not run)"""


def header(report: dict) -> str:
    ceilings = report["ceilings"]
    return (f"{report['device']} | torch {report['torch']} | triton {report['triton']} | "
            f"{report['date']}\nceilings measured in this run: copy {ceilings['copy_gbps']:.1f} "
            f"GB/s (bytes read + written), bf16 matmul {ceilings['matmul_tflops']:.2f} TFLOP/s "
            "(square)")


def _wrapped(text: str, indent: int = 4) -> list[str]:
    return textwrap.wrap(text, WIDTH, subsequent_indent=" " * indent, break_on_hyphens=False)


def absent_summary(records: list[dict]) -> str | None:
    """One entry for every implementation that did not run: its count and its reasons."""
    reasons: dict[str, dict[str, None]] = {}
    counts: dict[str, int] = {}
    for r in records:
        if r["status"] == "absent":
            counts[r["impl"]] = counts.get(r["impl"], 0) + 1
            reasons.setdefault(r["impl"], {})[r.get("reason", "?")] = None
    if not counts:
        return None
    parts = [f"{impl} x{counts[impl]} ({' / '.join(reasons[impl])})" for impl in counts]
    return "\n".join(_wrapped("absent: " + "; ".join(parts)))


def format_table(report: dict) -> str:
    """The console report: header, one block per case (suite, case, mode) with a row per
    implementation that ran, the absent implementations in one entry, then the legend.
    Every line fits ``WIDTH`` columns."""
    impl_width = max([len("impl")] + [len(r["impl"]) + 2 for r in report["records"]])
    head = "  ".join([f"{'impl':<{impl_width}}"] + [f"{name:>{width}}" for name, width, _, _
                                                   in CONSOLE_COLUMNS])
    lines = [*header(report).splitlines(), "", head]
    blocks: dict[str, list[dict]] = {}
    for r in report["records"]:
        blocks.setdefault(case_heading(r["suite"], r["label"], r["mode"]), []).append(r)
    for heading, records in blocks.items():
        shown = [r for r in records if r["status"] != "absent"]
        if not shown:
            continue
        lines.append(heading)
        for r in shown:
            name = f"  {r['impl']:<{impl_width - 2}}"
            if r["status"] != "ok":
                lines += _wrapped(f"{name}  {r['status']}: {r.get('reason', '')}",
                                  impl_width + 2)
                continue
            cells = []
            for _, width, value, fmt in CONSOLE_COLUMNS:
                v = value(r)
                cells.append(f"{fmt.format(v) if v is not None else '-':>{width}}")
            lines.append("  ".join([name, *cells]))
    absent = absent_summary(report["records"])
    if absent:
        lines += ["", absent]
    lines += ["", *LEGEND.splitlines()]
    return "\n".join(lines)


def to_markdown(report: dict) -> str:
    names = [c[0] for c in COLUMNS]
    lines = [f"# rlhf-fast bench: {report['device']}", "",
             f"- date: {report['date']}", f"- command: `{' '.join(report['command'])}`",
             f"- torch {report['torch']}, triton {report['triton']}, python {report['python']}, "
             f"driver {report['driver'] or '-'}",
             f"- copy ceiling: {report['ceilings']['copy_gbps']:.1f} GB/s (bytes read + written);"
             f" bf16 matmul ceiling: {report['ceilings']['matmul_tflops']:.2f} TFLOP/s "
             "(2 n^3 FLOP)",
             "- GB/s counts useful bytes (s = bytes per logit): logprobs fwd N*V*s (logits "
             "read once); logprobs fwd+bwd and policy 2*N*V*s (logits read once, gradient "
             "written once); dpo logits 2*N*V*s; gae 5*B*T*4 (three inputs read, two outputs "
             "written); linear: TFLOP/s of 6*N*H*V, dpo linear 8*N*H*V (with the reference "
             "model's GEMM); % gemm: TFLOP/s against the case's own GEMMs timed alone just "
             "before it, in the same process", "",
             "| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    for r in table_rows(report):
        r = r + [""] * (len(names) - len(r))
        lines.append("| " + " | ".join(r) + " |")
    return "\n".join(lines) + "\n"
