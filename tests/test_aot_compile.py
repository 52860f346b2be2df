"""Every kernel compiles for sm_80 and sm_90 without a GPU, and none spills registers."""

import ast
import json
import os
import pathlib
import subprocess
import sys

import pytest

from rlhf_fast.aot import all_specs

KERNELS_DIR = pathlib.Path(__file__).resolve().parents[1] / "kernels"


def kernels_in_source() -> set[str]:
    """``module:name`` of every ``@triton.jit`` function named ``*_kernel`` in kernels/."""
    found = set()
    for path in KERNELS_DIR.glob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel"):
                found.add(f"rlhf_fast.kernels.{path.stem}:{node.name}")
    return found


def test_every_kernel_has_an_aot_spec():
    covered = {spec.kernel for spec in all_specs()}
    missing = kernels_in_source() - covered
    assert kernels_in_source(), "found no kernels in kernels/"
    assert not missing, f"kernels without an AOT spec (add them to an op's aot_specs): {missing}"


@pytest.mark.parametrize("arch", [80, 90])
def test_compiles_without_spills(arch, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "aot.json"
    proc = subprocess.run(
        [sys.executable, "-m", "rlhf_fast.aot", "--arch", str(arch), "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert out.exists(), f"AOT compile failed:\n{proc.stdout}\n{proc.stderr}"
    rows = json.loads(out.read_text())
    assert len(rows) == len(all_specs())
    failed = [r for r in rows if "error" in r]
    assert not failed, f"compile errors:\n{proc.stdout}"
    spilled = [r for r in rows if r["spills"]]
    assert not spilled, f"register spills:\n{proc.stdout}"
    assert proc.returncode == 0, proc.stdout + proc.stderr
