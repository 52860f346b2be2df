"""What each row kernel does with a row: the facts the model and the budgets need.

``kind``:
- ``"stats"``: reads each row once (stats sweep);
- ``"grad"``: reads each row once and writes its gradient (gradient sweep);
- ``"fused"``: reads each row, reads it again and writes its gradient, in one program (the
  second read may hit L2);
- ``"single_pass"``: reads each row once into registers and writes its gradient from there.

``entropy_switch``: the compile-time switch that adds the entropy term to the kernel's
gradient loop (its budget is then the larger one). ``on_chip_switch``: the switch that makes
the kernel hold its row in registers (straight-line code, no row loop); ``"single_pass"``
kernels always do. A kernel of ``rlhf_fast.kernels`` that is
not listed here is not a row kernel (GAE): only its registers and spills are checked.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RowKernel:
    """kind: how the kernel moves a row (see the module docstring); entropy_switch: the
    constexpr that turns on the gradient's entropy term (None: the kernel writes none);
    on_chip_switch: the constexpr that makes it hold the row in registers."""

    kind: str
    entropy_switch: str | None
    on_chip_switch: str | None = None

    def on_chip(self, variant) -> bool:
        """True when ``variant`` holds its row in registers (no row loop)."""
        return self.kind == "single_pass" or bool(
            self.on_chip_switch and variant.constexpr(self.on_chip_switch))

    @property
    def reads(self) -> int:
        """Reads of the row from memory (before any L2 hit)."""
        return 2 if self.kind == "fused" else 1

    @property
    def writes(self) -> int:
        return 0 if self.kind == "stats" else 1


ROW_KERNELS = {
    "token_logprobs_fwd_kernel": RowKernel("stats", None, on_chip_switch="ON_CHIP"),
    "token_logprobs_bwd_kernel": RowKernel("grad", "HAS_GRAD_ENTROPY"),
    "token_policy_loss_kernel": RowKernel("fused", "HAS_ENTROPY_COEF"),
    "token_policy_loss_onchip_kernel": RowKernel("single_pass", "HAS_ENTROPY_COEF"),
}
