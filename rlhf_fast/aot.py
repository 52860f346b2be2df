"""Ahead-of-time compile of every kernel for sm_80 and sm_90, without a GPU: registers, spills.

``python -m rlhf_fast.aot [--arch 80 --arch 90] [--vocab V ...] [--json PATH]`` (also
``rlhf-fast aot``) records the specialisations the public ops launch (the stand-in driver of
``rlhf_fast.isa.capture``: every dtype, at vocabularies that give every launch shape: the
widest streaming programs, the widest on-chip one, an unaligned V), compiles each to a cubin
with Triton's bundled ptxas, reads its registers and local memory with the bundled
``cuobjdump --dump-resource-usage``, prints a table and exits with status 1 if any variant
spills (local memory or stack > 0) or fails to compile. ``rlhf-fast isa`` reports the same
compiles' SASS in depth. The interpreter must be off (``TRITON_INTERPRET`` unset): it replaces
``@triton.jit`` functions with Python ones.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

AOT_VOCABS = (151936, 50257, 8192)
"""Vocabularies whose launches cover every launch shape: the widest streaming programs
(151936), an unaligned row (50257) and the widest on-chip program (8192, most registers)."""

DTYPES = ("bf16", "fp16", "fp32")


def compile_all(archs: tuple[int, ...], vocabs: tuple[int, ...] = AOT_VOCABS,
                dtypes: tuple[str, ...] = DTYPES) -> list[dict]:
    """One row per (arch, variant): kernel, switches, warps, registers, spills or error."""
    from .isa.capture import capture
    from .isa.sass import compile_variant

    rows = []
    for arch in archs:
        for variant in capture(arch, vocabs, dtypes):
            name = variant.kernel.split(":")[1]
            names = variant.signature_names()
            switches = {names[p[0]]: getattr(v, "value", v)
                        for p, v in variant.constexprs.items()}
            row = {"kernel": name, "arch": f"sm_{arch}", "dtype": variant.row_dtype,
                   "switches": switches, "num_warps": variant.options.get("num_warps"),
                   "uses": sorted({f"{u.op} {u.dtype} V={u.vocab}" for u in variant.uses})}
            try:
                compiled = compile_variant(variant, arch)
            except Exception as error:  # report every variant, then fail
                message = str(error).strip().splitlines()
                row["error"] = message[-1] if message else repr(error)
            else:
                row.update(regs=compiled.regs, local=compiled.local, stack=compiled.stack,
                           spills=compiled.spills)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlhf-fast aot", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, action="append", choices=[80, 90],
                        help="SM target (default 80 and 90)")
    parser.add_argument("--vocab", type=int, action="append",
                        help=f"vocabulary sizes (default {AOT_VOCABS})")
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args(argv)
    from .backend import triton_interpreted

    if triton_interpreted():
        parser.error("unset TRITON_INTERPRET: the interpreter cannot compile kernels")
    # Triton 3.9 warns on every compile while this is unset; 1 is its default (fma on).
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    rows = compile_all(tuple(args.arch or (80, 90)), tuple(args.vocab or AOT_VOCABS))
    for r in rows:
        label = f"{r['kernel']}[{r['dtype'] or ''}|" + ",".join(
            f"{k}={v}" for k, v in r["switches"].items()) + "]"
        if "error" in r:
            print(f"{r['arch']:>6} {label:<90} COMPILE ERROR: {r['error']}")
            continue
        flag = "SPILLS" if r["spills"] else "ok"
        print(f"{r['arch']:>6} {label:<90} warps={r['num_warps']:>2} regs={r['regs']:>3} "
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
