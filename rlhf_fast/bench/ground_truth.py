"""The float64 reference result of the case being measured, computed once for all of its
implementations (a worker runs a case's implementations back to back)."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TypeVar

T = TypeVar("T")

_latest: tuple[Hashable, object] | None = None


def float64_reference(key: Hashable, compute: Callable[[], T]) -> T:
    """``compute()`` for a new ``key``, the stored result for the same key as the last call.
    Only the latest result is kept: a case's float64 gradient can be hundreds of MiB."""
    global _latest
    if _latest is None or _latest[0] != key:
        _latest = None  # free the previous case's result before computing this one
        _latest = (key, compute())
    return _latest[1]  # type: ignore[return-value]
