"""Every kernel compiles for sm_80 and sm_90 without a GPU, and none spills registers.

The variants are the ones the public ops launch (``rlhf_fast.isa.capture``), every dtype; sm_90
is compiled by the ISA report (``tests/test_isa.py``), sm_80 by ``python -m rlhf_fast.aot``.
"""

import ast
import pathlib

from isa_reports import result

KERNELS_DIR = pathlib.Path(__file__).resolve().parents[1] / "kernels"


def kernels_in_source() -> set[str]:
    """Name of every ``@triton.jit`` function named ``*_kernel`` in kernels/."""
    found = set()
    for path in KERNELS_DIR.glob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel"):
                found.add(node.name)
    return found


def test_every_kernel_is_launched_by_the_ops():
    rows, _, _ = result("sm80_aot")
    launched = {r["kernel"] for r in rows}
    assert kernels_in_source(), "found no kernels in kernels/"
    missing = kernels_in_source() - launched
    assert not missing, f"kernels no op launches (add a call to rlhf_fast.isa.launch_plan): " \
                        f"{missing}"


def test_sm80_compiles_without_spills():
    rows, log, code = result("sm80_aot")
    failed = [r for r in rows if "error" in r]
    assert not failed, f"compile errors:\n{log[-5000:]}"
    spilled = [r for r in rows if r["spills"]]
    assert not spilled, f"register spills:\n{spilled}"
    assert {r["dtype"] for r in rows if r["dtype"]} == {"bf16", "fp16", "fp32"}
    assert code == 0, log[-5000:]


def test_sm90_compiles_without_spills():
    for name in ("sm90_bf16", "sm90_fp16_fp32"):
        report, _, _ = result(name)
        spilled = [(r["kernel"], r["dtype"], r["vocab"]) for r in report["kernels"]
                   if r["spills"]]
        assert not spilled, f"register spills on sm_90: {spilled}"
