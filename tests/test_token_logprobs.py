"""token_logprobs, both backends, against the float64 reference: values AND gradients."""

import pytest
import torch
from numerics import assert_grad_close, assert_values_close

import rlhf_fast
from rlhf_fast import reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_logits(shape, dtype, device, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)


def make_targets(shape, n_cols, device, seed=1, ignore_every=0, ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, n_cols, shape, generator=g)
    if ignore_every:
        t.view(-1)[::ignore_every] = ignore_index
    return t.to(device)


def check_against_reference(logits, targets, backend, *, temperature=1.0, ignore_index=-100,
                            with_entropy=True, grad_logp=True, grad_entropy=True, seed=2,
                            grad_scale=1.0):
    """Run the op and the float64 reference on the same values; compare outputs and grads.

    ``grad_scale`` multiplies the upstream coefficients (loss scaling, for fp16 gradients
    that would otherwise be below fp16's normal range)."""
    dtype = logits.dtype
    x = logits.detach().clone().requires_grad_()
    out = rlhf_fast.token_logprobs(x, targets, temperature=temperature,
                                   return_entropy=with_entropy, ignore_index=ignore_index,
                                   backend=backend)
    xr = logits.detach().double().requires_grad_()
    ref = reference.token_logprobs(xr, targets, temperature=temperature,
                                   return_entropy=with_entropy, ignore_index=ignore_index)
    logp, ent = out if with_entropy else (out, None)
    rlogp, rent = ref if with_entropy else (ref, None)
    assert logp.shape == targets.shape
    assert_values_close(logp, rlogp, dtype, "logp")
    if with_entropy:
        assert ent.shape == targets.shape
        assert_values_close(ent, rent, dtype, "entropy")

    g = torch.Generator().manual_seed(seed)
    loss = torch.zeros((), dtype=torch.float64, device=logits.device)
    ref_loss = torch.zeros((), dtype=torch.float64, device=logits.device)
    if grad_logp:
        c = (torch.randn(targets.shape, generator=g) * grad_scale).to(logits.device)
        loss = loss + (logp * c).sum()
        ref_loss = ref_loss + (rlogp * c.double()).sum()
    if with_entropy and grad_entropy:
        c_h = (torch.randn(targets.shape, generator=g) * grad_scale).to(logits.device)
        loss = loss + (ent * c_h).sum()
        ref_loss = ref_loss + (rent * c_h.double()).sum()
    loss.backward()
    ref_loss.backward()
    assert x.grad.dtype == dtype and x.grad.shape == logits.shape
    assert_grad_close(x.grad, xr.grad, dtype)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_batched(backend, device, dtype):
    logits = make_logits((3, 7, 1000), dtype, device)
    check_against_reference(logits, make_targets((3, 7), 1000, device), backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flat_rows_odd_vocab(backend, device, dtype):
    # 50257 = GPT-2's vocabulary: 12 full blocks of 4096 and a ragged tail.
    logits = make_logits((5, 50257), dtype, device)
    check_against_reference(logits, make_targets((5,), 50257, device), backend)


@pytest.mark.parametrize("n_cols", [1, 2, 3, 17, 4095, 4096, 4097, 8193])
def test_vocab_sizes(backend, device, n_cols):
    logits = make_logits((2, 3, n_cols), torch.float32, device)
    check_against_reference(logits, make_targets((2, 3), n_cols, device), backend)


@pytest.mark.parametrize("temperature", [0.25, 0.7, 1.6])
def test_temperature(backend, device, temperature):
    logits = make_logits((2, 5, 777), torch.float32, device)
    check_against_reference(logits, make_targets((2, 5), 777, device), backend,
                            temperature=temperature)


def test_strided_slice_read_in_place(backend, device):
    # logits[:, :-1] of a longer sequence: batch stride != T * row stride.
    full = make_logits((3, 9, 515), torch.bfloat16, device)
    logits = full[:, :-1]
    assert not logits.is_contiguous()
    check_against_reference(logits, make_targets((3, 8), 515, device), backend)


def test_row_stride_wider_than_vocab(backend, device):
    # Columns [0, V) of a wider buffer: row stride 640 != V = 600.
    wide = make_logits((4, 640), torch.float32, device)
    logits = wide[:, :600]
    check_against_reference(logits, make_targets((4,), 600, device), backend)


def test_non_unit_column_stride(backend, device):
    logits = make_logits((300, 6), torch.float32, device).t()  # [6, 300], column stride 6
    check_against_reference(logits, make_targets((6,), 300, device), backend)


def test_ignore_index_rows(backend, device):
    logits = make_logits((2, 6, 333), torch.bfloat16, device)
    targets = make_targets((2, 6), 333, device, ignore_every=3)
    logp, ent = check_against_reference(logits, targets, backend)
    ignored = targets == -100
    assert (logp[ignored] == 0).all() and (ent[ignored] == 0).all()
    x = logits.clone().requires_grad_()
    lp, h = rlhf_fast.token_logprobs(x, targets, return_entropy=True, backend=backend)
    (lp.sum() + h.sum()).backward()
    assert (x.grad[ignored] == 0).all()


def test_custom_ignore_index(backend, device):
    logits = make_logits((2, 4, 50), torch.float32, device)
    targets = make_targets((2, 4), 50, device, ignore_every=2, ignore_index=-1)
    check_against_reference(logits, targets, backend, ignore_index=-1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_confident_rows(backend, device, dtype):
    """p_y -> 1: 1 - p_y ~ 1e-8 must survive in logp and in the target's gradient."""
    n_cols = 3000
    logits = make_logits((4, n_cols), torch.float64, device, scale=1.0)
    targets = make_targets((4,), n_cols, device)
    rows = torch.arange(4, device=device)
    others = logits.clone()
    others[rows, targets] = float("-inf")
    # Put the target 18..21 nats above the log-sum-exp of the rest: 1 - p_y = 1e-8 .. 1e-9.
    margin = torch.tensor([18.0, 19.0, 20.0, 21.0], dtype=torch.float64, device=device)
    logits[rows, targets] = torch.logsumexp(others, -1) + margin
    logits = logits.to(dtype)
    # Gradients here are ~1e-8: fp16 needs loss scaling to hold them, as in fp16 training.
    scale = 2.0**20 if dtype == torch.float16 else 1.0
    check_against_reference(logits, targets, backend, grad_scale=scale)
    # Only the log-prob's gradient: its norm is ~1 - p_y, nothing else to hide an error.
    check_against_reference(logits, targets, backend, with_entropy=False, grad_scale=scale)


def test_banned_tokens_minus_inf(backend, device):
    logits = make_logits((3, 4, 200), torch.float32, device)
    logits[..., ::7] = float("-inf")
    targets = make_targets((3, 4), 200, device)
    targets[targets % 7 == 0] += 1
    check_against_reference(logits, targets, backend)


def test_all_but_target_banned(backend, device):
    logits = torch.full((2, 64), float("-inf"), device=device)
    targets = torch.tensor([5, 63], device=device)
    logits[0, 5] = 3.0
    logits[1, 63] = -2.0
    x = logits.clone().requires_grad_()
    logp, ent = rlhf_fast.token_logprobs(x, targets, return_entropy=True, backend=backend)
    assert (logp == 0).all() and (ent == 0).all()
    (logp.sum() + ent.sum()).backward()
    assert (x.grad == 0).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_logit_poisons_only_its_row(backend, device, bad):
    logits = make_logits((3, 100), torch.float32, device)
    logits[1, 42] = bad
    targets = torch.tensor([1, 2, 3], device=device)
    x = logits.clone().requires_grad_()
    logp, ent = rlhf_fast.token_logprobs(x, targets, return_entropy=True, backend=backend)
    assert torch.isnan(logp[1]) and torch.isnan(ent[1])
    assert torch.isfinite(logp[[0, 2]]).all() and torch.isfinite(ent[[0, 2]]).all()
    (logp.sum() + ent.sum()).backward()
    assert torch.isnan(x.grad[1]).any()
    assert torch.isfinite(x.grad[[0, 2]]).all()


def test_nan_at_target_column(backend, device):
    logits = make_logits((2, 100), torch.float32, device)
    targets = torch.tensor([7, 8], device=device)
    logits[0, 7] = float("nan")
    logp = rlhf_fast.token_logprobs(logits, targets, backend=backend)
    assert torch.isnan(logp[0]) and torch.isfinite(logp[1])


def test_entropy_gradient_only(backend, device):
    logits = make_logits((2, 3, 300), torch.float32, device)
    check_against_reference(logits, make_targets((2, 3), 300, device), backend,
                            grad_logp=False)


def test_logp_gradient_only_with_entropy_returned(backend, device):
    logits = make_logits((2, 3, 300), torch.bfloat16, device)
    check_against_reference(logits, make_targets((2, 3), 300, device), backend,
                            grad_entropy=False)


def test_zero_upstream_gradient_rows(backend, device):
    logits = make_logits((4, 100), torch.float32, device)
    targets = make_targets((4,), 100, device)
    x = logits.clone().requires_grad_()
    logp = rlhf_fast.token_logprobs(x, targets, backend=backend)
    (logp * torch.tensor([1.0, 0.0, -2.0, 0.0], device=device)).sum().backward()
    assert (x.grad[[1, 3]] == 0).all()
    assert (x.grad[[0, 2]] != 0).any(dim=-1).all()


def test_int32_targets(backend, device):
    logits = make_logits((2, 3, 64), torch.float32, device)
    targets = make_targets((2, 3), 64, device).int()
    check_against_reference(logits, targets, backend)


def test_no_grad_saves_nothing(backend, device):
    logits = make_logits((2, 3, 64), torch.float32, device).requires_grad_()
    targets = make_targets((2, 3), 64, device)
    with torch.no_grad():
        logp, ent = rlhf_fast.token_logprobs(logits, targets, return_entropy=True,
                                             backend=backend)
    assert logp.grad_fn is None and ent.grad_fn is None
    assert not logp.requires_grad
    ref_logp, ref_ent = reference.token_logprobs(logits.double(), targets, return_entropy=True)
    assert_values_close(logp, ref_logp, torch.float32)
    assert_values_close(ent, ref_ent, torch.float32)


def test_empty_batch(backend, device):
    for shape in [(0, 5, 32), (3, 0, 32)]:
        x = make_logits(shape, torch.float32, device).requires_grad_()
        targets = torch.zeros(shape[:2], dtype=torch.long, device=device)
        logp, ent = rlhf_fast.token_logprobs(x, targets, return_entropy=True, backend=backend)
        assert logp.shape == shape[:2] and ent.shape == shape[:2]
        (logp.sum() + ent.sum()).backward()
        assert x.grad.shape == shape


def test_out_of_range_target_raises(backend, device):
    logits = make_logits((2, 3, 10), torch.float32, device)
    for bad in (10, -1, -101):
        targets = make_targets((2, 3), 10, device)
        targets[1, 2] = bad
        with pytest.raises(ValueError, match=r"targets must lie in \[0, 10\)"):
            rlhf_fast.token_logprobs(logits, targets, backend=backend)


def test_out_of_range_target_is_nan_when_unchecked(backend, device, monkeypatch):
    monkeypatch.setenv("RLHF_FAST_CHECK_TARGETS", "0")
    logits = make_logits((3, 10), torch.float32, device)
    targets = torch.tensor([3, 10, -5], device=device)
    x = logits.clone().requires_grad_()
    logp, ent = rlhf_fast.token_logprobs(x, targets, return_entropy=True, backend=backend)
    assert torch.isfinite(logp[0]) and torch.isnan(logp[1:]).all() and torch.isnan(ent[1:]).all()
    (logp.sum() + ent.sum()).backward()
    assert torch.isfinite(x.grad[0]).all() and torch.isnan(x.grad[1:]).all()


def test_grad_after_double_backward_graph(backend, device):
    # Outputs used twice in the graph: gradients accumulate like any autograd op.
    logits = make_logits((2, 50), torch.float32, device)
    targets = make_targets((2,), 50, device)
    x = logits.clone().requires_grad_()
    logp = rlhf_fast.token_logprobs(x, targets, backend=backend)
    (logp.sum() + (logp ** 2).sum()).backward()
    xr = logits.double().requires_grad_()
    rl = reference.token_logprobs(xr, targets)
    (rl.sum() + (rl ** 2).sum()).backward()
    assert_grad_close(x.grad, xr.grad, torch.float32)


@pytest.mark.parametrize("n_cols", [2, 3, 5000])
def test_other_token_dominates(backend, device, n_cols):
    """p_k -> 1 for a token k != target: entropy ~1e-3..1e-8 and log_s ~ 1e-8 must keep
    their relative accuracy (log(1 + tiny) in float32 would lose it)."""
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(4, n_cols, generator=g, dtype=torch.float64)
    targets = torch.tensor([1, 0, 1, 0]) % n_cols
    dominant = (targets + 1) % n_cols
    rows = torch.arange(4)
    others = logits.clone()
    others[rows, dominant] = float("-inf")
    logits[rows, dominant] = torch.logsumexp(others, -1) + torch.tensor([8.0, 12.0, 16.0, 19.0],
                                                                        dtype=torch.float64)
    logits = logits.float().to(device)
    x = logits.clone().requires_grad_()
    logp, ent = rlhf_fast.token_logprobs(x, targets.to(device), return_entropy=True,
                                         backend=backend)
    xr = logits.double().requires_grad_()
    rlogp, rent = reference.token_logprobs(xr, targets.to(device), return_entropy=True)
    assert ((ent.double() - rent).abs() / rent).max() <= 1e-5
    assert ((logp.double() - rlogp).abs() / rlogp.abs()).max() <= 1e-5
    ent.sum().backward()
    rent.sum().backward()
    assert_grad_close(x.grad, xr.grad, torch.float32)
