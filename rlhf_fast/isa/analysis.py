"""One report per kernel launch: the row loops read from SASS, occupancy, and the model's
estimate on each GPU of the target (``model.GPUS``)."""

from __future__ import annotations

import collections

from .capture import Use, Variant
from .model import GPUS, PIPES, RowCost, ctas_per_sm, estimate, second_read_hit_rate
from .row_kernels import ROW_KERNELS
from .sass import (
    ELEMENT_BYTES,
    Compiled,
    Loop,
    access_bits,
    address_slice,
    is_int64,
    parse_sass,
    pipe_of,
)

ROW_ROLES = ("stats", "gradient", "single_pass")


def _loop_dict(lp: Loop) -> dict:
    per = lp.per_element
    return {
        "role": lp.role,
        "instructions": lp.instructions,
        "elements_per_trip": lp.elements,
        "instr_per_elem": round(per(lp.instructions), 3),
        "mufu_per_elem": round(per(lp.mufu), 3),
        "alu_per_elem": round(per(lp.pipes.get("alu", 0)), 3),
        "fp32_per_elem": round(per(lp.pipes.get("fp32", 0)), 3),
        "imad_per_elem": round(per(lp.pipes.get("imad", 0)), 3),
        "load_bits": lp.loads,
        "store_bits": lp.stores,
        "int64": lp.int64,
        "address_int64": lp.address_int64,
        "direction": "backward" if lp.step < 0 else "forward",
        "evict_first_stores": lp.evict_first_stores,
        "straight_line": lp.start == lp.end == 0,
    }


def _per_element(lp: Loop) -> dict[str, float]:
    counts = dict(lp.pipes)
    counts["issue"] = lp.instructions
    counts["xu"] = counts.get("xu", 0)
    return {p: counts.get(p, 0) / lp.elements for p in PIPES}


def straight_line_row(points: list[tuple[Compiled, int]], vec: int, role: str) -> Loop:
    """The per-element cost of a kernel that holds its row in registers (no loop), from the
    same kernel compiled at several row lengths (``(compiled, vectors per thread)``): the
    least-squares slope of each opcode's count (outside loops) against the columns a thread
    holds. Widths: those of the row accesses that grow with the row."""

    def census(compiled: Compiled) -> collections.Counter:
        ins = parse_sass(compiled.sass)
        spans = [(lp.start, lp.end) for lp in compiled.loops]
        straight = [x for x in ins if not any(s <= x.address <= e for s, e in spans)]
        addressing = address_slice(straight)
        counts = collections.Counter(x.opcode for x in straight)
        counts["<int64 data>"] = sum(is_int64(x.opcode) and x.address not in addressing
                                     for x in straight)
        return counts

    xs = [slices * vec for _c, slices in points]
    counts = [census(c) for c, _s in points]
    mean_x = sum(xs) / len(xs)
    var_x = sum((x - mean_x) ** 2 for x in xs)

    def slope(key: str) -> float:
        ys = [c.get(key, 0) for c in counts]
        mean_y = sum(ys) / len(ys)
        return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / var_x

    opcodes = {op for c in counts for op in c if op != "<int64 data>"}
    per = {op: slope(op) for op in opcodes}
    pipes = collections.Counter()
    for opcode, v in per.items():
        pipes[pipe_of(opcode)] += v
    grows = [op for op, v in per.items() if v > 0.01]
    loads = [access_bits(op) for op in grows if op.startswith("LDG")]
    stores = [access_bits(op) for op in grows if op.startswith("STG")]
    return Loop(0, 0, sum(per.values()), dict(pipes),
                {op.split(".")[0]: v for op, v in per.items()}, loads, stores,
                sum(v for op, v in per.items() if op.startswith("MUFU")),
                round(max(0.0, slope("<int64 data>"))),
                round(sum(v for op, v in per.items() if is_int64(op))), 0,
                all(".EF" in op for op in grows if op.startswith("STG")), True,
                elements=1.0, role=role)


def analyse(variant: Variant, compiled: Compiled, use: Use,
            row_lengths: list[tuple[Compiled, int]] | None = None) -> dict:
    """The report of ``variant`` compiled for its target, launched by ``use``.
    ``row_lengths``: for a kernel holding its row in registers, the same kernel compiled at
    several row lengths (see ``straight_line_row``)."""
    name = variant.kernel.split(":")[1]
    row = ROW_KERNELS.get(name)
    report = {
        "kernel": name, "op": use.op, "dtype": use.dtype, "vocab": use.vocab,
        "arch": f"sm_{compiled.arch}", "num_warps": compiled.num_warps,
        "threads": 32 * compiled.num_warps, "regs": compiled.regs, "local": compiled.local,
        "stack": compiled.stack, "spills": compiled.spills, "shared": compiled.shared,
        "kind": row.kind if row else "other",
        "switches": {str(k): v for k, v in sorted(
            (variant.signature_names()[p[0]], getattr(c, "value", c))
            for p, c in variant.constexprs.items())},
    }
    gpus = GPUS[compiled.arch]
    report["ctas_per_sm"] = ctas_per_sm(gpus[0], compiled.regs, compiled.num_warps,
                                        compiled.shared)
    if row is None:
        report.update(loops=[], estimates=[], entropy=False)
        return report
    loops = [lp for lp in compiled.loops if lp.role in ROW_ROLES and lp.elements]
    outside = dict(compiled.outside)
    on_chip = row.on_chip(variant)
    if on_chip:
        slices = int(variant.constexpr("UNROLL"))
        vec = int(variant.constexpr("VEC"))
        row_loop = straight_line_row(row_lengths, vec,
                                     "single_pass" if row.kind == "single_pass" else "stats")
        loops = [row_loop]
        # The code outside loops less the part that grows with the row is per-row work.
        per_thread_elements = slices * vec
        for pipe, n in row_loop.pipes.items():
            outside[pipe] = max(0.0, outside.get(pipe, 0) - n * per_thread_elements)
    report["entropy"] = bool(row.entropy_switch and variant.constexpr(row.entropy_switch))
    report["loops"] = [_loop_dict(lp) for lp in loops]
    report["overhead_instructions"] = int(sum(outside.values()))
    size = ELEMENT_BYTES[variant.row_dtype]
    n_cols = use.vocab
    threads = report["threads"]
    cost = RowCost(loop={p: 0.0 for p in PIPES},
                   overhead={p: float(outside.get(p, 0)) for p in PIPES})
    cost.overhead["issue"] = float(sum(outside.values()))
    for lp in loops:
        for pipe, value in _per_element(lp).items():
            cost.loop[pipe] += value
    first = loops[0] if loops else None
    in_flight_per_thread = sum(first.loads) / 8 if first else 0.0
    if on_chip:  # the whole row is requested at once
        in_flight_per_thread = n_cols * ELEMENT_BYTES[variant.row_dtype] / threads
    report["bytes_in_flight_per_sm"] = int(report["ctas_per_sm"] * threads
                                           * in_flight_per_thread)
    gradient = next((lp for lp in loops if lp.role == "gradient"), None)
    estimates = []
    for gpu in gpus:
        ctas = ctas_per_sm(gpu, compiled.regs, compiled.num_warps, compiled.shared)
        floor = size * (1 + row.writes)
        hit = None
        moved = size * (row.reads + row.writes)
        if row.kind == "fused" and gradient is not None:
            rates = [second_read_hit_rate(gpu.sms * ctas, n_cols * size, l2 * 2**20,
                                          reverse=gradient.step < 0,
                                          stores_allocate=not gradient.evict_first_stores)
                     for l2 in (gpu.l2_mb, gpu.l2_mb / 2)]
            hit = min(rates)
            moved = size * (2 + (1 - hit))
        est = estimate(gpu, cost, n_cols, threads, ctas, moved, floor, in_flight_per_thread,
                       hit, phases_overlap=not on_chip or ctas > 1).as_dict()
        if hit is not None:
            est["l2_hit_range"] = [round(min(rates), 3), round(max(rates), 3)]
        estimates.append(est)
    report["estimates"] = estimates
    return report
