"""How the fused-linear ops cut their tokens into chunks (docs/architecture.md, Fused-linear
chunking): the default chunk size, the chunk plan, and the memory it predicts.

Default chunk (``chunk_tokens=None``), from the device's memory, V, H and the dtype:

    budget = clamp(device memory / 128, 32 MiB, cap)           # LOGITS_BUDGET_*
             cap = 1 GiB on a GPU, 256 MiB on the CPU
    C      = budget // ((V + 2 H) * s)                         # tokens
    C      = max(128, C rounded down to a multiple of 128), and at most N

with ``s`` the bytes of the dtype: a chunk holds its ``[C, V]`` logits (the gradient is
written over them) and its hidden rows and their gradient (``2 H`` per token). Device
memory is the GPU's total
memory, or the machine's RAM for CPU tensors: 1 GiB of logits on a 141 GB H200 (C = 3328 at
V = 151936, H = 4096, bf16), 640 MiB on an 80 GB H100 (C = 2048), 188 MiB on this 24 GiB
development machine (C = 1408 at V = 32768, H = 256, float32). Large enough for the GEMMs
to run near their peak (M >= 2048 on a GPU), small enough that the chunk is a small part of
the memory. The CPU's cap is lower: its GEMMs gain nothing past a few hundred rows, and the
torch backend's sweeps work in cache-sized blocks whatever the chunk.

Everything here is decided from shapes, dtypes and the device's size, never from data: the
plans are the same under ``torch.compile`` and need no host read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

LOGITS_BUDGET_FRACTION = 128
"""The default chunk's budget is the device's memory divided by this."""

LOGITS_BUDGET_MIN = 32 * 2**20
LOGITS_BUDGET_MAX = 2**30
LOGITS_BUDGET_MAX_CPU = 256 * 2**20
"""Bounds of the default chunk's budget, in bytes (the cap on a GPU, and off one)."""

CHUNK_MULTIPLE = 128
"""Default chunks are a multiple of this many tokens (GEMM tiles), and at least this many."""

PER_TOKEN_BYTES = 256
"""Bound on the O(N) per-token state of a fused-linear op (targets, masks, log-probs,
entropies, the stats sweep's three floats, coefficients, weights and the coefficient step's
temporaries), used by ``memory_plan``."""


def device_memory_bytes(device: torch.device) -> int:
    """Total memory of ``device``: the GPU's, or the machine's RAM for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 * 2**30


def logits_budget_bytes(device: torch.device) -> int:
    """Bytes of one chunk by default: ``clamp(memory / 128, 32 MiB, 1 GiB)`` on a GPU, with
    a 256 MiB cap elsewhere."""
    cap = LOGITS_BUDGET_MAX if device.type == "cuda" else LOGITS_BUDGET_MAX_CPU
    budget = device_memory_bytes(device) // LOGITS_BUDGET_FRACTION
    return max(LOGITS_BUDGET_MIN, min(cap, budget))


def chunk_token_bytes(vocab: int, hidden_size: int, dtype: torch.dtype) -> int:
    """Bytes one token of a chunk holds (module docstring)."""
    return (vocab + 2 * hidden_size) * torch.empty((), dtype=dtype).element_size()


def default_chunk_tokens(n_tokens: int, vocab: int, hidden_size: int, dtype: torch.dtype,
                         device: torch.device) -> int:
    """Tokens per chunk when ``chunk_tokens`` is None (module docstring)."""
    per_token = chunk_token_bytes(vocab, hidden_size, dtype)
    tokens = logits_budget_bytes(device) // per_token
    tokens = max(CHUNK_MULTIPLE, tokens // CHUNK_MULTIPLE * CHUNK_MULTIPLE)
    return max(1, min(tokens, n_tokens))


def check_chunk_args(chunk_size: object, chunk_tokens: object, packed: bool) -> None:
    """``chunk_size`` (whole sequences, padded batches) or ``chunk_tokens``, each >= 1."""
    if chunk_size is not None and chunk_tokens is not None:
        raise ValueError("pass chunk_size (sequences per chunk) or chunk_tokens (tokens per "
                         "chunk), not both")
    for name, value in (("chunk_size", chunk_size), ("chunk_tokens", chunk_tokens)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            unit = "sequences" if name == "chunk_size" else "tokens"
            raise ValueError(f"{name} must be >= 1 ({unit} per chunk, an int) or None, got "
                             f"{value!r}")
    if chunk_size is not None and packed:
        raise ValueError("chunk_size counts the sequences of a padded batch; with cu_seqlens "
                         "(packed sequences) pass chunk_tokens")


@dataclass(frozen=True)
class Chunk:
    """Tokens ``start:stop`` of the flattened batch, seen as ``shape`` = (rows, columns):
    ``(b, T)`` for ``b`` whole padded sequences, ``(1, stop - start)`` otherwise."""

    start: int
    stop: int
    shape: tuple[int, int]

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class ChunkPlan:
    """The chunks of one op call. ``whole_sequences``: every chunk is a run of whole padded
    sequences (or the whole batch), so per-sequence statistics complete inside each."""

    chunks: tuple[Chunk, ...]
    whole_sequences: bool

    @property
    def max_size(self) -> int:
        return max((c.size for c in self.chunks), default=0)


def plan_chunks(batch: int, seq_len: int, packed: bool, tokens_per_chunk: int,
                chunk_size: int | None, want_whole_sequences: bool) -> ChunkPlan:
    """Chunks of a padded ``[B, T]`` batch (``packed``: one row of ``T = N`` tokens).

    ``chunk_size`` (legacy): that many whole sequences per chunk. Otherwise one chunk when
    everything fits ``tokens_per_chunk``; runs of whole sequences when asked for and a
    sequence fits (padded only); else chunks of ``tokens_per_chunk`` tokens, which may cut
    sequences."""
    n_tokens = batch * seq_len
    if n_tokens == 0:
        return ChunkPlan((), True)
    if chunk_size is not None or (n_tokens > tokens_per_chunk and want_whole_sequences
                                  and not packed and seq_len <= tokens_per_chunk):
        rows = chunk_size if chunk_size is not None else tokens_per_chunk // seq_len
        chunks = tuple(Chunk(b * seq_len, min(b + rows, batch) * seq_len,
                             (min(b + rows, batch) - b, seq_len))
                       for b in range(0, batch, rows))
        return ChunkPlan(chunks, True)
    if n_tokens <= tokens_per_chunk:
        return ChunkPlan((Chunk(0, n_tokens, (batch, seq_len)),), True)
    chunks = tuple(Chunk(s, min(s + tokens_per_chunk, n_tokens),
                         (1, min(s + tokens_per_chunk, n_tokens) - s))
                   for s in range(0, n_tokens, tokens_per_chunk))
    return ChunkPlan(chunks, False)


def memory_plan(n_tokens: int, hidden_size: int, vocab: int, dtype: torch.dtype,
                device: torch.device | str = "cpu", *, chunk_tokens: int | None = None,
                grads: tuple[bool, bool, bool] = (True, True, False),
                main_grad: bool = False) -> dict[str, int]:
    """Predicted peak extra memory of ``linear_policy_loss`` / ``linear_dpo_loss`` (and of
    ``linear_token_logprobs``' backward), itemised, in bytes:

    - ``chunk_tokens``: the chunk (default rule above, or the given one);
    - ``logits_chunk``: ``[C, V]`` in the dtype (the gradient is written over it);
    - ``upcast_block``: the float32 copy of a block of a chunk's 16-bit gradient that the
      weight-gradient GEMM reads, off CUDA only (``lm_head.UPCAST_BLOCK_BYTES``);
    - ``torch_scratch``: the torch backend's row blocks (CPU);
    - ``hidden_rows``: a chunk's hidden rows copied when ``hidden`` is not one flat view, and
      the weight-gradient cast's block;
    - ``hidden_grad``: ``[N, H]`` in the dtype (an output);
    - ``per_token``: the O(N) state, ``PER_TOKEN_BYTES`` a token;
    - ``weight_grad_accumulator``: ``[V, H]`` float32, reported apart (0 with ``main_grad``:
      the caller's buffer). The gradient in a 16-bit dtype is written into the
      accumulator's own storage (``lm_head.WeightGradAccumulator``): no second copy;
    - ``beyond_accumulator``: the sum of the others (without ``chunk_tokens``).
    """
    device = torch.device(device)
    need_hidden, need_weight, need_bias = grads
    from .lm_head import UPCAST_BLOCK_BYTES

    chunk = chunk_tokens if chunk_tokens is not None else default_chunk_tokens(
        n_tokens, vocab, hidden_size, dtype, device)
    chunk = min(chunk, n_tokens)
    size = torch.empty((), dtype=dtype).element_size()
    items = {
        "logits_chunk": chunk * vocab * size,
        "upcast_block": UPCAST_BLOCK_BYTES + chunk * hidden_size * 4
        if need_weight and dtype != torch.float32 and device.type != "cuda" else 0,
        "torch_scratch": _torch_scratch_bytes() if device.type != "cuda" else 0,
        "hidden_rows": chunk * hidden_size * size + 8 * 2**20 * need_weight,
        "hidden_grad": n_tokens * hidden_size * size if need_hidden else 0,
        "bias_grad": vocab * 4 if need_bias else 0,
        "per_token": n_tokens * PER_TOKEN_BYTES,
    }
    plan = {"chunk_tokens": chunk, **items,
            "weight_grad_accumulator": vocab * hidden_size * 4 if need_weight and not main_grad
            else 0,
            "beyond_accumulator": sum(items.values())}
    return plan


def _torch_scratch_bytes() -> int:
    from ..torch_backend.chunks import WORKING_SET_BYTES

    return WORKING_SET_BYTES
