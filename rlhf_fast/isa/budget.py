"""The ISA budget every row kernel is held to (sm_90), and the check against it.

Why these numbers: on an H100 one bf16 element of a row is 2 bytes of HBM traffic per pass,
14.5 B per SM clock, so a pass that issues more than about 17 thread-instructions (128 per
clock) or 1.1 MUFU ops (16 per clock) per element is slower than memory. The budget leaves
margin for the code outside the loops and for the H200 (4.8 TB/s: about 12 per pass).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Budget:
    """Limits per row loop, compiled for sm_90.

    stats_instr / stats_mufu: SASS instructions and MUFU ops per element of a stats loop;
    grad_instr / grad_entropy_instr: instructions per element of a gradient loop without /
    with the entropy term; single_pass_*: a loop that does both from one read; access_bits:
    width of every global load and store of a row loop; int64_ops: 64-bit integer ops on data
    (addresses excluded: the row pointers' 64-bit steps) per row loop; hbm_bound_vocab /
    hbm_bound_gpu: vocabularies at which the model must find HBM the binding limit, on that
    GPU.
    """

    stats_instr: float = 15.0
    stats_mufu: float = 1.15
    grad_instr: float = 8.0
    grad_entropy_instr: float = 13.0
    access_bits: int = 128
    int64_ops: int = 0
    hbm_bound_vocab: tuple[int, ...] = (151936, 32000)
    hbm_bound_gpu: str = "H100 SXM"

    def loop_limits(self, role: str, entropy: bool) -> tuple[float, float | None]:
        """(instructions per element, MUFU per element or None) for a loop of ``role``."""
        grad = self.grad_entropy_instr if entropy else self.grad_instr
        if role == "stats":
            return self.stats_instr, self.stats_mufu
        if role == "gradient":
            return grad, None
        if role == "single_pass":
            return self.stats_instr + grad, self.stats_mufu + 1.0
        raise ValueError(f"no budget for a {role!r} loop")


BUDGET = Budget()


def violations(report: dict, budget: Budget = BUDGET) -> list[str]:
    """What in one kernel report (``rlhf_fast.isa.analysis.analyse``, sm_90) breaks the
    budget; empty when it holds. Loops: instructions and MUFU per element, access widths,
    64-bit ops; every kernel: spills; at ``hbm_bound_vocab``: the binding limit."""
    where = f"{report['kernel']} [{report['op']} {report['dtype']} V={report['vocab']}]"
    found = []
    if report["spills"]:
        found.append(f"{where}: spills (local {report['local']} B, stack {report['stack']} B)")
    if report.get("kind") in (None, "other"):
        return found
    loops = report["loops"]
    if not loops:
        found.append(f"{where}: no row loop found in the SASS")
    for lp in loops:
        limit, mufu_limit = budget.loop_limits(lp["role"], report["entropy"])
        tag = f"{where} {lp['role']} loop"
        # A row held in registers has no loop: its per-element cost is a fit across row
        # lengths (about +-1.5 instr/elem from one Triton version to the next), reported
        # (``over_budget``) but not held to the loop budget.
        lp["over_budget"] = bool(lp["instr_per_elem"] > limit or (
            mufu_limit is not None and lp["mufu_per_elem"] > mufu_limit))
        if not lp.get("straight_line"):
            if lp["instr_per_elem"] > limit:
                found.append(f"{tag}: {lp['instr_per_elem']:.2f} instr/elem > {limit}")
            if mufu_limit is not None and lp["mufu_per_elem"] > mufu_limit:
                found.append(f"{tag}: {lp['mufu_per_elem']:.3f} MUFU/elem > {mufu_limit}")
        narrow = [w for w in lp["load_bits"] + lp["store_bits"] if w < budget.access_bits]
        if narrow:
            found.append(f"{tag}: {len(narrow)} accesses narrower than {budget.access_bits} "
                         f"bits ({sorted(set(narrow))})")
        if lp["int64"] > budget.int64_ops:
            found.append(f"{tag}: {lp['int64']} 64-bit integer ops on data")
    if report["vocab"] in budget.hbm_bound_vocab:
        for est in report["estimates"]:
            if est["gpu"] == budget.hbm_bound_gpu and est["binding"] != "HBM":
                found.append(f"{where}: bound by {est['binding']} on {est['gpu']}, not HBM")
    return found
