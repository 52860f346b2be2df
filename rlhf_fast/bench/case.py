"""One benchmark case: a problem size, a logits dtype and a mode of the suite."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Case:
    n: int          # tokens (rows of the logits)
    v: int          # vocabulary size
    dtype: str      # logits dtype, a torch attribute name ("bfloat16")
    mode: str       # the suite's mode ("fwd", "token", ...)
    h: int = 0      # hidden size (fused-linear suites), 0 otherwise

    @property
    def label(self) -> str:
        hidden = f" H={self.h}" if self.h else ""
        return f"N={self.n}{hidden} V={self.v} {self.dtype}"

    @property
    def logit_bytes(self) -> int:
        """N * V * s: the logits once (s = bytes per logit)."""
        return self.n * self.v * torch.empty((), dtype=getattr(torch, self.dtype)).element_size()
