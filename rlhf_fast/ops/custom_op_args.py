"""What crosses the boundary of the ops' ``torch.library`` custom ops: configs as strings,
metrics as one tensor.

A custom op takes tensors and plain scalars only. ``torch.compile`` traces the public
functions down to the op call and treats the op as one opaque node, so the config travels
as a string built from its fields (traceable, and a constant of the graph) and comes back
as the same frozen dataclass inside the op; the metrics come out as one float32 vector.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
from typing import Any

import torch
from torch import Tensor

_NON_LITERAL_FLOATS = {"inf": float("inf"), "-inf": float("-inf"), "nan": float("nan")}


def encode_config(config: Any) -> str:
    """``"field=repr;part.field=repr;..."`` of a frozen dataclass of plain values and of
    frozen dataclass parts of plain values (one level, as ``PolicyLossConfig``'s)."""
    items = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            items += [f"{f.name}.{g.name}={getattr(value, g.name)!r}"
                      for g in dataclasses.fields(value)]
        else:
            items.append(f"{f.name}={value!r}")
    return ";".join(items)


@functools.lru_cache(maxsize=512)
def decode_config(cls: type, key: str) -> Any:
    """The ``cls`` instance that ``encode_config`` turned into ``key`` (a part's fields are
    passed to ``cls`` as a mapping under the part's name)."""
    fields: dict[str, Any] = {}
    for item in key.split(";"):
        name, _, text = item.partition("=")
        value = _NON_LITERAL_FLOATS[text] if text in _NON_LITERAL_FLOATS \
            else ast.literal_eval(text)
        part, _, sub = name.partition(".")
        if sub:
            fields.setdefault(part, {})[sub] = value
        else:
            fields[name] = value
    return cls(**fields)


def pack_metrics(metrics: dict[str, Tensor], keys: tuple[str, ...]) -> Tensor:
    """float32 ``[len(keys)]`` holding ``metrics[k]`` in the order of ``keys``."""
    return torch.stack([metrics[k].reshape(()).float() for k in keys])


def unpack_metrics(packed: Tensor, keys: tuple[str, ...]) -> dict[str, Tensor]:
    """The dict of 0-dim tensors that ``pack_metrics`` packed."""
    return dict(zip(keys, packed.unbind(0), strict=True))
