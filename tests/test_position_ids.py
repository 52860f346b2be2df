"""``rlhf_fast.packing``: ``cu_seqlens`` from ``position_ids`` and per-token sequence ids, against
a plain reference (offsets = 0 then the running sum of the lengths), Hugging Face's
``DataCollatorWithFlattening`` output, and one op's packed result equal to its padded one."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from packing import cu_seqlens, pack
from transformers import DataCollatorWithFlattening

import rlhf_fast
from rlhf_fast.packing import cu_seqlens_from_position_ids, cu_seqlens_from_sequence_ids

DTYPES = [torch.int32, torch.int64]


def offsets(lengths: list[int]) -> list[int]:
    """The reference: 0, then each sequence's end."""
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out


def positions_of(lengths: list[int], start: int = 0) -> list[int]:
    return [start + j for n in lengths for j in range(n)]


def ids_of(lengths: list[int]) -> list[int]:
    return [i for i, n in enumerate(lengths) for _ in range(n)]


def shaped(values: list[int], dtype: torch.dtype, row: bool) -> torch.Tensor:
    t = torch.tensor(values, dtype=dtype)
    return t[None] if row else t


@settings(max_examples=60)
@given(lengths=st.lists(st.integers(1, 6), max_size=8), dtype=st.sampled_from(DTYPES),
       row=st.booleans(), start=st.sampled_from([0, 2]))
def test_position_ids_match_reference(lengths, dtype, row, start):
    cu = cu_seqlens_from_position_ids(shaped(positions_of(lengths, start), dtype, row),
                                      start=start)
    assert cu.dtype == torch.int32 and cu.tolist() == offsets(lengths)


@settings(max_examples=60)
@given(lengths=st.lists(st.integers(0, 5), max_size=8), dtype=st.sampled_from(DTYPES),
       row=st.booleans())
def test_sequence_ids_match_reference(lengths, dtype, row):
    """Empty sequences included: the count of sequences is passed."""
    cu = cu_seqlens_from_sequence_ids(shaped(ids_of(lengths), dtype, row),
                                      num_sequences=len(lengths))
    assert cu.dtype == torch.int32 and cu.tolist() == offsets(lengths)


@pytest.mark.parametrize("lengths", [[7], [1], [1, 1, 1, 1], [1, 3, 1], [], [4, 1]])
def test_edge_cases(lengths):
    """One sequence, only length-1 sequences, length-1 first / last, no token."""
    pos = torch.tensor(positions_of(lengths), dtype=torch.int64)
    assert cu_seqlens_from_position_ids(pos).tolist() == offsets(lengths)
    ids = torch.tensor(ids_of(lengths), dtype=torch.int32)
    assert cu_seqlens_from_sequence_ids(ids).tolist() == offsets(lengths)


def test_sequence_ids_empty_sequences_default_count():
    # Indices 1 and 3 have no token: empty sequences; the count defaults to max + 1.
    ids = torch.tensor([0, 0, 2, 4, 4])
    assert cu_seqlens_from_sequence_ids(ids).tolist() == [0, 2, 2, 3, 3, 5]
    assert cu_seqlens_from_sequence_ids(ids, num_sequences=7).tolist() == \
        [0, 2, 2, 3, 3, 5, 5, 5]
    assert cu_seqlens_from_sequence_ids(torch.zeros(0, dtype=torch.int64)).tolist() == [0]


@pytest.mark.parametrize(("values", "kwargs", "error", "match"), [
    ([0.0, 1.0], {}, TypeError, r"position_ids must be an int32 \(or int64\) tensor"),
    ([[0, 1], [0, 1]], {}, ValueError, r"position_ids must be one packed row \[N\] or \[1, N\]"),
    ([1, 2, 0], {}, ValueError, r"position_ids must start at 0.*got 1 at index 0"),
    ([0, 1, -1, 0], {}, ValueError, r"position_ids\[2\] = -1 neither restarts"),
    ([0, 1, 3, 0], {}, ValueError, r"position_ids\[2\] = 3 neither restarts .* previous "
                                   r"position 1 by \+1"),
    ([0, 1, 1], {}, ValueError, r"position_ids\[2\] = 1 neither restarts"),
    ([0, 1, 0], {"start": 2}, ValueError, "position_ids must start at 2"),
])
def test_position_ids_errors(values, kwargs, error, match):
    dtype = torch.float32 if isinstance(values[0], float) else torch.int64
    with pytest.raises(error, match=match):
        cu_seqlens_from_position_ids(torch.tensor(values, dtype=dtype), **kwargs)


def test_position_ids_errors_not_a_tensor():
    with pytest.raises(TypeError, match=r"position_ids must be an int32.*got list"):
        cu_seqlens_from_position_ids([0, 1, 2])


@pytest.mark.parametrize(("values", "kwargs", "error", "match"), [
    (torch.tensor([0, 1], dtype=torch.int16), {}, TypeError,
     r"sequence_ids must be an int32 \(or int64\) tensor"),
    (torch.zeros(1, 1, 3, dtype=torch.int64), {}, ValueError, r"got shape \(1, 1, 3\)"),
    (torch.tensor([-1, 0]), {}, ValueError, "sequence_ids must be >= 0, got -1 at index 0"),
    (torch.tensor([0, 2, 1]), {}, ValueError, "never decrease.*got 2 then 1 at index 2"),
    (torch.tensor([0, 1, 3]), {"num_sequences": 3}, ValueError,
     "holds index 3 but num_sequences = 3"),
    (torch.tensor([0, 1]), {"num_sequences": -1}, ValueError, "num_sequences must be"),
])
def test_sequence_ids_errors(values, kwargs, error, match):
    with pytest.raises(error, match=match):
        cu_seqlens_from_sequence_ids(values, **kwargs)


def test_hf_collator_output():
    """DataCollatorWithFlattening's position_ids and seq_idx give its own flash-attention
    cu_seq_lens; its position_ids_start is the helper's start."""
    lengths = [3, 1, 5, 2]
    features = [{"input_ids": list(range(10, 10 + n))} for n in lengths]
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True,
                                       return_seq_idx=True)(features)
    assert batch["position_ids"].shape == (1, sum(lengths))
    want = batch["cu_seq_lens_q"].tolist()
    assert want == offsets(lengths)
    assert cu_seqlens_from_position_ids(batch["position_ids"]).tolist() == want
    assert cu_seqlens_from_sequence_ids(batch["seq_idx"]).tolist() == want
    shifted = DataCollatorWithFlattening(position_ids_start=2)(features)
    assert cu_seqlens_from_position_ids(shifted["position_ids"], start=2).tolist() == want


def test_policy_loss_with_helper_equals_padded():
    """policy_loss (torch backend) on a packed batch whose cu_seqlens come from position_ids
    equals the padded layout: loss and logits gradient."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([5, 1, 3, 6])
    S, T, V = len(lengths), 6, 24
    logits = torch.randn(S, T, V, generator=g)
    targets = torch.randint(0, V, (S, T), generator=g)
    mask = torch.arange(T) < lengths[:, None]
    adv, old = torch.randn(S, generator=g), torch.randn(S, T, generator=g) - 3.0
    position_ids = torch.cat([torch.arange(n) for n in lengths.tolist()])[None]
    cu = cu_seqlens_from_position_ids(position_ids)
    assert torch.equal(cu, cu_seqlens(lengths))

    def run(x, y, m, o, **kw):
        x = x.clone().requires_grad_()
        out = rlhf_fast.policy_loss(x, y, adv, m, old_logprobs=o, config="grpo", kl_coef=0.0,
                                    backend="torch", **kw)
        out.loss.backward()
        return out.loss, x.grad

    loss, grad = run(logits, targets, mask, old)
    packed_loss, packed_grad = run(*(pack(t, lengths) for t in (logits, targets, mask, old)),
                                   cu_seqlens=cu)
    torch.testing.assert_close(packed_loss, loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(packed_grad, pack(grad, lengths), rtol=1e-6, atol=1e-7)
