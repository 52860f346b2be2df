"""CUDA-only checks the interpreter cannot make: grid limits, 64-bit offsets, recompilation."""

import pytest
import torch
from numerics import assert_grad_close, assert_values_close

import rlhf_fast
from rlhf_fast import reference

pytestmark = pytest.mark.gpu


def test_more_than_65535_rows():
    n, v = 70_000, 1000
    logits = torch.randn(n, v, device="cuda").mul_(3).bfloat16()
    targets = torch.randint(0, v, (n,), device="cuda")
    x = logits.clone().requires_grad_()
    logp, ent = rlhf_fast.token_logprobs(x, targets, return_entropy=True, backend="triton")
    (logp.sum() + ent.sum()).backward()
    xr = logits.double().requires_grad_()
    rlogp, rent = reference.token_logprobs(xr, targets, return_entropy=True)
    (rlogp.sum() + rent.sum()).backward()
    assert_values_close(logp, rlogp, torch.bfloat16, "logp")
    assert_values_close(ent, rent, torch.bfloat16, "entropy")
    assert_grad_close(x.grad, xr.grad, torch.bfloat16)


def test_offsets_beyond_2_pow_31():
    # 16400 x 131072 bf16 = 2.15e9 elements: the last rows start past 2^31.
    n, v = 16_400, 131_072
    assert n * v > 2**31
    logits = torch.randn(n, v, device="cuda", dtype=torch.bfloat16)
    targets = torch.randint(0, v, (n,), device="cuda")
    x = logits.requires_grad_()
    logp, ent = rlhf_fast.token_logprobs(x, targets, return_entropy=True, backend="triton")
    tail = slice(n - 8, n)
    (logp[tail].sum() + ent[tail].sum()).backward()
    xr = logits[tail].detach().double().requires_grad_()
    rlogp, rent = reference.token_logprobs(xr, targets[tail], return_entropy=True)
    (rlogp.sum() + rent.sum()).backward()
    assert_values_close(logp[tail], rlogp, torch.bfloat16, "logp")
    assert_values_close(ent[tail], rent, torch.bfloat16, "entropy")
    assert_grad_close(x.grad[tail], xr.grad, torch.bfloat16)
    assert (x.grad[: n - 8] == 0).all()


def test_new_sequence_length_does_not_recompile():
    from rlhf_fast.kernels.token_logprobs import token_logprobs_fwd_kernel

    v = 32000
    device = torch.cuda.current_device()
    sizes = []
    for seq_len in (17, 32, 100, 513):
        logits = torch.randn(3, seq_len + 1, v, device="cuda", dtype=torch.bfloat16)[:, :-1]
        targets = torch.randint(0, v, (3, seq_len), device="cuda")
        with torch.no_grad():
            rlhf_fast.token_logprobs(logits, targets, backend="triton")
        torch.cuda.synchronize()
        sizes.append(len(token_logprobs_fwd_kernel.device_caches[device][0]))
    assert sizes[-1] == sizes[0], f"compiled variants grew with T: {sizes}"


def test_linear_dpo_bf16_weight_gradient_accumulates_in_float32():
    """The cuBLAS path of the float32 weight-gradient accumulation (bf16 GEMMs writing into a
    float32 buffer), chunk by chunk, against the float64 reference on the same bf16 logits."""
    from rlhf_fast.preference_config import preference_config

    g = torch.Generator(device="cuda").manual_seed(0)
    pairs, seq_len, hidden, vocab = 4, 64, 256, 32000
    h = torch.randn(2 * pairs, seq_len, hidden, device="cuda", generator=g).bfloat16()
    w = (torch.randn(vocab, hidden, device="cuda", generator=g) / 16).bfloat16()
    y = torch.randint(0, vocab, (2 * pairs, seq_len), device="cuda", generator=g)
    mask = torch.ones(2 * pairs, seq_len, dtype=torch.bool, device="cuda")
    ref = -torch.rand(2 * pairs, device="cuda", generator=g) * seq_len * 10
    hl, wl = h.clone().requires_grad_(), w.clone().requires_grad_()
    out = rlhf_fast.linear_dpo_loss(hl, wl, y, mask, ref_logprobs=ref, chunk_size=1)
    out.loss.backward()
    # The same bf16 logits the op forms: one GEMM per pair of rows (i, B + i), as it chunks.
    x = torch.empty(2 * pairs, seq_len, vocab, device="cuda", dtype=torch.bfloat16)
    for i in range(pairs):
        rows = torch.tensor([i, pairs + i], device="cuda")
        x[rows] = (h.index_select(0, rows).flatten(0, 1) @ w.t()).view(2, seq_len, vocab)
    x = x.double().requires_grad_()
    loss = reference.dpo_loss(x, y, mask, ref_logprobs=ref.double(),
                              config=preference_config())[0]
    loss.backward()
    assert abs(out.loss.item() - loss.item()) <= 1e-5 * abs(loss.item())
    assert_grad_close(hl.grad, x.grad.float() @ w.float(), torch.bfloat16)
    assert_grad_close(wl.grad, x.grad.flatten(0, 1).T.float() @ h.flatten(0, 1).float(),
                      torch.bfloat16)
