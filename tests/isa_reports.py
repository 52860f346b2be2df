"""The compiles the ISA tests share: started once per test session, in parallel subprocesses
(the interpreter that conftest.py turns on cannot compile kernels), read by any test."""

import atexit
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

RUNS = {
    # The budget: the bf16 launches at the vocabularies it names, plus the on-chip regime.
    "sm90_bf16": ["rlhf_fast.isa", "--arch", "90", "--dtype", "bf16", "--vocab", "151936",
                  "--vocab", "50257", "--vocab", "32000", "--vocab", "8192"],
    # fp16 / fp32 where they differ (vector width, conversions), and their spills.
    "sm90_fp16_fp32": ["rlhf_fast.isa", "--arch", "90", "--dtype", "fp16", "--dtype", "fp32",
                       "--vocab", "151936", "--vocab", "8192"],
    # Registers and spills of every kernel on sm_80.
    "sm80_aot": ["rlhf_fast.aot", "--arch", "80"],
}

_started: dict[str, tuple[subprocess.Popen, Path]] = {}
_results: dict[str, object] = {}
_dir = tempfile.mkdtemp(prefix="rlhf_fast_isa_")


def _start_all() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    for name, args in RUNS.items():
        if name in _started:
            continue
        out = Path(_dir) / f"{name}.json"
        log = open(Path(_dir) / f"{name}.log", "w")  # closed when the process ends
        proc = subprocess.Popen([sys.executable, "-m", *args, "--json", str(out)], env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        _started[name] = (proc, out)


@atexit.register
def _stop_unread() -> None:
    """A session that needed only some runs does not leave the others running."""
    for proc, _out in _started.values():
        if proc.poll() is None:
            proc.terminate()


def result(name: str) -> object:
    """The JSON a run wrote (all runs start at the first call); fails with its log."""
    if name not in _results:
        _start_all()
        proc, out = _started[name]
        proc.wait(timeout=1200)
        log = (Path(_dir) / f"{name}.log").read_text()
        assert out.exists(), f"{name} wrote no report (exit {proc.returncode}):\n{log[-5000:]}"
        _results[name] = (json.loads(out.read_text()), log, proc.returncode)
    return _results[name]
