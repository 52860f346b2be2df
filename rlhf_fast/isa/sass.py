"""Compile a recorded variant for an sm target and read its SASS: loops, opcodes, widths.

Compiles with ``triton.compile`` (Triton's bundled ptxas), disassembles the cubin with the
bundled ``cuobjdump -sass`` and reads registers / stack / local memory with
``cuobjdump --dump-resource-usage``. A loop is a backward branch of the listing; a row loop is
one that loads or stores the row (LDG / STG of the logits' element type). Per loop: the
instructions of its body, their pipes, the global access widths, MUFU ops and 64-bit integer
ops; per trip each thread handles ``bytes of its row loads / element size`` elements (``ptxas``
may unroll: the ratio stays per element).
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field

from .capture import Variant

ELEMENT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}

_INSTRUCTION = re.compile(
    r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")

# Pipes of sm_80 / sm_90 (CUDA C Programming Guide, "Arithmetic Instructions" throughput table);
# their per-SM throughputs are in ``model.Gpu``: FP32 add / mul / fma; ALU (compare, select,
# min / max, integer add, logic, shift); IMAD; XU (MUFU: ex2, lg2, rcp, rsq; conversions);
# shuffles.
FP32_OPS = {"FFMA", "FMUL", "FADD", "FFMA32I", "FMUL32I", "FADD32I", "HFMA2", "HMUL2", "HADD2",
            "FMUL2", "FADD2", "FFMA2"}
IMAD_OPS = {"IMAD", "IMUL"}
XU_OPS = {"MUFU", "I2F", "F2I", "I2FP", "F2IP", "FRND", "F2F", "POPC", "FLO", "BREV"}
SHFL_OPS = {"SHFL"}
MEM_OPS = {"LDG", "STG", "LDS", "STS", "LDGSTS", "LD", "ST", "ATOM", "ATOMG", "RED", "LDC",
           "LDSM", "ULDC", "LDL", "STL"}
CONTROL_OPS = {"BRA", "EXIT", "BSYNC", "BSSY", "BAR", "NOP", "WARPSYNC", "PLOP3", "S2R", "S2UR",
               "CS2R", "RET", "CALL", "YIELD", "DEPBAR", "MEMBAR", "ERRBAR", "CCTL", "BMOV",
               "VOTE", "VOTEU", "MATCH", "NANOSLEEP", "WARPGROUP", "ELECT", "ENDCOLLECTIVE"}
INT_OPS = ("IADD3", "IMAD", "LEA", "ISETP", "SHF", "LOP3", "IADD", "IMNMX", "SEL", "IABS",
           "IMUL", "VIADD", "VIMNMX")


def pipe_of(opcode: str) -> str:
    """Pipe of an opcode: fp32, imad, xu (MUFU and conversions), shfl, mem, uniform, ctrl,
    or alu (compare, select, min/max, integer add / logic / shift, moves, packing)."""
    base = opcode.split(".")[0]
    if base in FP32_OPS:
        return "fp32"
    if base in IMAD_OPS:
        return "imad"
    if base in XU_OPS:
        return "xu"
    if base in SHFL_OPS:
        return "shfl"
    if base in MEM_OPS:
        return "mem"
    if base in CONTROL_OPS:
        return "ctrl"
    if base.startswith("U"):
        return "uniform"  # the uniform datapath: one issue per warp, off the vector pipes
    return "alu"


def is_int64(opcode: str) -> bool:
    """A 64-bit integer operation, or one half of one: carries (``.X``: the high word of a
    64-bit add), 64-bit compares (``.EX``), wide and high multiplies (``IMAD.WIDE``,
    ``IMAD.HI``), the high word of a 64-bit left shift (``SHF.L.U64.HI``). Not counted:
    ``SHF.R.U64`` / ``SHF.R.*.HI``, the funnel shifts ptxas also uses to extract 16-bit fields
    and for plain 32-bit shifts, and ``LEA.HI`` without carry."""
    base, *mods = opcode.split(".")
    if base not in INT_OPS:
        return False
    if "X" in mods or "EX" in mods or "WIDE" in mods:
        return True
    if base == "IMAD" and "HI" in mods:
        return True
    return base == "SHF" and "L" in mods and ("U64" in mods or "S64" in mods)


def access_bits(opcode: str) -> int:
    """Width in bits of a global load / store (LDG.E.128 -> 128, LDG.E.U16 -> 16, LDG.E -> 32)."""
    widths = {"128": 128, "64": 64, "U16": 16, "S16": 16, "16": 16, "U8": 8, "S8": 8}
    for m in reversed(opcode.split(".")[1:]):
        if m in widths:
            return widths[m]
    return 32


STORE_OPS = {"STG", "STS", "ST", "STL", "RED", "ATOM", "ATOMG", "BRA", "EXIT", "BAR", "RET",
             "CALL", "WARPSYNC", "BSYNC", "BSSY", "NOP", "DEPBAR", "MEMBAR", "YIELD"}
_REGISTER = re.compile(r"\bR(\d+)(\.64)?\b")
_ADDRESS = re.compile(r"\[([^\]]*)\]")


def _registers(text: str) -> set[int]:
    found = set()
    for number, wide in _REGISTER.findall(text):
        found.add(int(number))
        if wide:
            found.add(int(number) + 1)
    return found


@dataclass(frozen=True)
class Instruction:
    address: int
    predicate: str
    opcode: str
    operands: str

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]

    def address_registers(self) -> set[int]:
        """Registers of the memory address operands (``[R16.64+0x10]`` -> {16, 17})."""
        return set().union(*(_registers(a) for a in _ADDRESS.findall(self.operands)))

    def destinations(self) -> set[int]:
        """Registers written (the first operand, except for stores and control)."""
        if self.base in STORE_OPS or not self.operands:
            return set()
        first = self.operands.split(",")[0]
        regs = _registers(first)
        if self.base == "LDG" and regs:  # vector loads fill consecutive registers
            start = min(regs)
            regs = set(range(start, start + max(1, access_bits(self.opcode) // 32)))
        if self.opcode.startswith("IMAD.WIDE") and regs:  # a register pair
            regs.add(min(regs) + 1)
        return regs

    def sources(self) -> set[int]:
        if self.base in STORE_OPS:
            return _registers(self.operands)
        rest = self.operands.split(",", 1)[1] if "," in self.operands else ""
        regs = _registers(rest)
        if self.opcode.startswith("IMAD.WIDE"):  # its addend is a register pair
            last = _REGISTER.findall(rest)
            if last:
                regs.add(int(last[-1][0]) + 1)
        return regs


def parse_sass(text: str) -> list[Instruction]:
    out = []
    for line in text.splitlines():
        m = _INSTRUCTION.search(line)
        if m:
            out.append(Instruction(int(m.group(1), 16), (m.group(2) or "").strip(), m.group(3),
                                   m.group(4).strip()))
    return out


@dataclass
class Loop:
    """One loop of a SASS listing: body ``[start, end]`` (addresses, end = the backward
    branch), its instruction count per pipe, memory accesses and derived per-element costs."""

    start: int
    end: int
    instructions: int
    pipes: dict[str, int]
    opcodes: dict[str, int]
    loads: list[int]           # LDG widths in bits
    stores: list[int]          # STG widths in bits
    mufu: int
    int64: int                 # 64-bit integer ops on data (compares, multiplies, shifts)
    address_int64: int         # 64-bit ops forming addresses (pointer steps and offsets)
    step: int                  # byte step of the row pointers per trip (< 0: backwards)
    evict_first_stores: bool   # every store carries the evict-first hint (STG.E.EF)
    innermost: bool
    elements: float = 0.0      # elements a thread handles per trip (0: not a row loop)
    role: str = "other"        # stats | gradient | fill | other (incl. loops over rows)

    def per_element(self, count: float) -> float:
        return count / self.elements if self.elements else float("nan")


def find_loops(ins: list[Instruction]) -> list[tuple[int, int]]:
    """``(target, branch)`` address pairs of the backward branches, one per target (the last
    branch back to it), outermost first."""
    last: dict[int, int] = {}
    for x in ins:
        if x.base == "BRA":
            m = re.search(r"0x([0-9a-f]+)", x.operands)
            if m and int(m.group(1), 16) <= x.address:
                target = int(m.group(1), 16)
                last[target] = max(last.get(target, 0), x.address)
    return sorted(last.items())


def address_slice(body: list[Instruction]) -> set[int]:
    """Addresses of the instructions that only compute memory addresses: the backward slice
    of the LDG / STG address registers through the loop body, taken twice around the loop
    (pointer induction variables are loop-carried)."""
    wanted: set[int] = set()
    marked: set[int] = set()
    for _ in range(2):
        for x in reversed(body):
            if x.base in ("LDG", "STG", "LDS", "STS", "LD", "ST", "RED", "ATOM", "ATOMG"):
                wanted |= x.address_registers()
                continue
            written = x.destinations()
            if written & wanted:
                marked.add(x.address)
                wanted -= written
                wanted |= x.sources()
    return marked


def pointer_step(body: list[Instruction], addressing: set[int]) -> int:
    """Signed byte step of the loop's pointer induction variables (0 when none found): the
    immediate of the low-half adds (``IADD3 R, P, R, imm``) of the address slice."""
    steps = []
    for x in body:
        if x.address in addressing and x.base in ("IADD3", "VIADD", "IADD") \
                and not is_int64(x.opcode):
            parts = [p.strip() for p in x.operands.split(",")]
            for p in parts[1:]:
                m = re.fullmatch(r"(-?)0x([0-9a-f]+)", p)
                if m and parts[0] in parts[1:] + [q.split(".")[0] for q in parts[1:]]:
                    steps.append(int(m.group(2), 16) * (-1 if m.group(1) else 1))
    return max(steps, key=abs) if steps else 0


def analyse_loops(ins: list[Instruction], element_bytes: int | None) -> list[Loop]:
    spans = find_loops(ins)
    loops = []
    for start, end in spans:
        inner = [(s, e) for s, e in spans if (s, e) != (start, end) and start <= s and e <= end]
        body = [x for x in ins if start <= x.address <= end
                and not any(s <= x.address <= e for s, e in inner)]
        pipes = collections.Counter(pipe_of(x.opcode) for x in body)
        opcodes = collections.Counter(x.base for x in body)
        loads = [access_bits(x.opcode) for x in body if x.base == "LDG"]
        stores = [access_bits(x.opcode) for x in body if x.base == "STG"]
        addressing = address_slice(body)
        wide = [x for x in body if is_int64(x.opcode)]
        loop = Loop(start, end, len(body), dict(pipes), dict(opcodes), loads, stores,
                    opcodes["MUFU"], sum(x.address not in addressing for x in wide),
                    sum(x.address in addressing for x in wide),
                    pointer_step(body, addressing),
                    bool(stores) and all(".EF" in x.opcode for x in body if x.base == "STG"),
                    not inner)
        if element_bytes and not inner:  # an outer loop (over rows) is per-row work
            moved = sum(loads) if loads else sum(stores)
            loop.elements = moved / 8 / element_bytes
            if loads and stores:
                loop.role = "gradient"
            elif loads:
                loop.role = "stats"
            elif stores:
                loop.role = "fill"
        loops.append(loop)
    return loops


@dataclass
class Compiled:
    """A variant compiled for ``sm_<arch>``: resources and the loops of its SASS."""

    arch: int
    regs: int
    stack: int
    local: int
    shared: int                 # bytes of shared memory per CTA (static + Triton's scratch)
    num_warps: int
    instructions: int
    loops: list[Loop] = field(default_factory=list)
    outside: dict[str, int] = field(default_factory=dict)  # pipe -> instructions outside loops
    sass: str = ""

    @property
    def spills(self) -> bool:
        return self.local > 0 or self.stack > 0


def _nvidia_tool(name: str) -> str:
    from triton import knobs

    tool = getattr(knobs.nvidia, name, None)
    if tool is not None and getattr(tool, "path", None):
        return tool.path
    import triton.backends.nvidia as nvidia

    return os.path.join(os.path.dirname(nvidia.__file__), "bin", name)


def read_cubin(cubin: bytes) -> tuple[str, dict[str, int]]:
    """(SASS listing, {regs, stack, shared, local}) of a single-kernel cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        tool = _nvidia_tool("cuobjdump")
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    if found is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{usage}")
    keys = ("regs", "stack", "shared", "local")
    return sass, dict(zip(keys, map(int, found.groups()), strict=True))


def compile_variant(variant: Variant, arch: int, keep_sass: bool = False) -> Compiled:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(variant.fn, variant.signature, variant.constexprs, variant.attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(variant.options))
    sass, usage = read_cubin(kernel.asm["cubin"])
    ins = parse_sass(sass)
    dtype = variant.row_dtype
    loops = analyse_loops(ins, ELEMENT_BYTES.get(dtype) if dtype else None)
    shared = max(usage["shared"], int(getattr(kernel.metadata, "shared", 0) or 0))
    return Compiled(arch, usage["regs"], usage["stack"], usage["local"], shared,
                    int(variant.options.get("num_warps", 4)), len(ins), loops,
                    outside_loops(ins, [lp for lp in loops if lp.innermost]),
                    sass if keep_sass else "")


def outside_loops(ins: list[Instruction], loops: list[Loop]) -> dict[str, int]:
    """Instructions per pipe outside the given (innermost) loops, up to the last EXIT: the code
    a program runs once per row (in a loop over rows, if any), plus the branches for masked /
    invalid rows."""
    exits = [x.address for x in ins if x.base == "EXIT"]
    end = max(exits) if exits else (ins[-1].address if ins else 0)
    inside = [(lp.start, lp.end) for lp in loops]
    counts: dict[str, int] = collections.Counter(
        pipe_of(x.opcode) for x in ins
        if x.address <= end and not any(s <= x.address <= e for s, e in inside))
    return dict(counts)
