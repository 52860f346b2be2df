"""Ahead-of-time compile of every kernel for sm_80 and sm_90, without a GPU.

``python -m rlhf_fast.aot [--arch 80 --arch 90] [--json PATH]`` compiles each variant listed
by the ops' ``aot_specs()`` to a cubin with Triton's bundled ptxas, reads its registers and
local memory with the bundled ``cuobjdump --dump-resource-usage``, prints a table and exits
with status 1 if any variant spills (local memory or stack > 0). The interpreter must be off
(``TRITON_INTERPRET`` unset): it replaces ``@triton.jit`` functions with Python ones.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

from . import gae
from .ops import forward_gradients, policy_loss, row_sweeps
from .ops.launch import KernelSpec

OPS_WITH_KERNELS = (row_sweeps, policy_loss, gae, forward_gradients)


def all_specs() -> list[KernelSpec]:
    return [spec for op in OPS_WITH_KERNELS for spec in op.aot_specs()]


def _cuobjdump() -> str:
    import triton.backends.nvidia as nvidia

    return os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG, STACK, SHARED and LOCAL of the (single) function in a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if found is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{out}")
    return dict(zip(("regs", "stack", "shared", "local"), map(int, found.groups()), strict=True))


def compile_spec(spec: KernelSpec, arch: int) -> dict[str, object]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, name = spec.kernel.split(":")
    fn = getattr(importlib.import_module(module), name)
    signature = {arg: spec.types.get(arg, "constexpr") for arg in fn.arg_names}
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in spec.aligned}
    src = ASTSource(fn=fn, signature=signature, constexprs=dict(spec.constexprs), attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": spec.num_warps})
    usage = resource_usage(compiled.asm["cubin"])
    return {"kernel": spec.label, "arch": f"sm_{arch}", "num_warps": spec.num_warps, **usage,
            "spills": usage["local"] > 0 or usage["stack"] > 0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlhf-fast aot", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, action="append", help="SM version (default 80, 90)")
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: the interpreter cannot compile kernels")
    # Triton 3.9 warns on every compile while this is unset; 1 is its default (fma on).
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    rows = []
    for arch in args.arch or [80, 90]:
        for spec in all_specs():
            try:
                rows.append(compile_spec(spec, arch))
            except Exception as error:  # report every variant, then fail
                message = str(error).strip().splitlines()
                rows.append({"kernel": spec.label, "arch": f"sm_{arch}",
                             "error": message[-1] if message else repr(error)})
    for r in rows:
        if "error" in r:
            print(f"{r['arch']:>6} {r['kernel']:<70} COMPILE ERROR: {r['error']}")
            continue
        flag = "SPILLS" if r["spills"] else "ok"
        print(f"{r['arch']:>6} {r['kernel']:<70} warps={r['num_warps']} regs={r['regs']:>3} "
              f"local={r['local']} stack={r['stack']} {flag}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(summary(rows))
    return 1 if any("error" in r or r["spills"] for r in rows) else 0


def summary(rows: list[dict[str, object]]) -> str:
    """One line: variants compiled per architecture, spills, errors, the register range."""
    archs = ", ".join(dict.fromkeys(str(r["arch"]) for r in rows))
    compiled = [r for r in rows if "error" not in r]
    spilled = sum(1 for r in compiled if r["spills"])
    regs = [int(r["regs"]) for r in compiled]  # type: ignore[call-overload]
    reg_range = f"{min(regs)}-{max(regs)} registers" if regs else "no registers read"
    verdict = "OK" if compiled and not spilled and len(compiled) == len(rows) else "FAILED"
    return (f"{verdict}: {len(compiled)}/{len(rows)} kernel variants compiled for {archs}, "
            f"{spilled} with register spills, {len(rows) - len(compiled)} compile errors, "
            f"{reg_range}")


if __name__ == "__main__":
    sys.exit(main())
