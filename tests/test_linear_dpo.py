"""linear_dpo_loss against the float64 reference on exact logits ``hidden @ weight.T + bias``:
every loss_type, chunks of one pair or more, a reference model given as hidden states,
frozen inputs, bf16, peak memory, errors."""


import pytest
import torch
from numerics import assert_grad_close
from preference_problems import LOSS_TYPES, loss_kwargs, response_mask

import rlhf_fast
from rlhf_fast import reference
from rlhf_fast.preference_config import preference_config


def pair_problem(pairs=3, seq_len=5, hidden=16, vocab=60, dtype=torch.float32, seed=0,
                 device="cpu"):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2 * pairs, seq_len, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) * 0.5
    b = torch.randn(vocab, generator=g) * 0.1
    ref_h = torch.randn(2 * pairs, seq_len, 12, generator=g)
    ref_w = torch.randn(vocab, 12, generator=g) * 0.5
    targets = torch.randint(0, vocab, (2 * pairs, seq_len), generator=g)
    mask = response_mask(2 * pairs, seq_len, g)
    h, w, b, ref_h, ref_w = (t.to(dtype) for t in (h, w, b, ref_h, ref_w))
    p = dict(h=h, w=w, b=b, ref_h=ref_h, ref_w=ref_w, targets=targets, mask=mask)
    return {k: v.to(device) for k, v in p.items()}


def exact_ref_logprobs(p):
    """The reference model's per-token log-probs from its float64 logits."""
    with torch.no_grad():
        return reference.token_logprobs(p["ref_h"].double() @ p["ref_w"].double().T,
                                        p["targets"])


def run_ours(p, kwargs, backend, *, chunk_size=None, bias=True, ref="hidden",
             grads=(True, True, True), grad_scale=1.0):
    leaves = [t.clone().requires_grad_(need)
              for t, need in zip((p["h"], p["w"], p["b"]), grads, strict=True)]
    config = preference_config(**kwargs)
    ref_args = {}
    if config.uses_reference:
        ref_args = (dict(ref_hidden=p["ref_h"], ref_weight=p["ref_w"]) if ref == "hidden"
                    else dict(ref_logprobs=exact_ref_logprobs(p).float()))
    out = rlhf_fast.linear_dpo_loss(leaves[0], leaves[1], p["targets"], p["mask"],
                                    bias=leaves[2] if bias else None, chunk_size=chunk_size,
                                    backend=backend, **ref_args, **kwargs)
    (out.loss * grad_scale).backward()
    return out, [t.grad for t in leaves]


def run_reference(p, kwargs, *, bias=True, grad_scale=1.0):
    config = preference_config(**kwargs)
    h, w, b = (t.double().requires_grad_() for t in (p["h"], p["w"], p["b"]))
    logits = h @ w.T + (b if bias else 0)
    ref = exact_ref_logprobs(p) if config.uses_reference else None
    loss, chosen, rejected, metrics = reference.dpo_loss(logits, p["targets"], p["mask"],
                                                         ref_logprobs=ref, config=config)
    (loss * grad_scale).backward()
    return loss, chosen, rejected, [h.grad, w.grad, b.grad], metrics


def compare(out, grads, expected, dtype, *, loss_rtol=1e-5):
    loss, chosen, rejected, ref_grads, metrics = expected
    err = abs(out.loss.item() - loss.item()) / max(abs(loss.item()), 1e-30)
    assert err <= loss_rtol, f"loss {out.loss.item()} vs {loss.item()} ({err:.2e})"
    assert torch.allclose(out.chosen_logprobs.double(), chosen, rtol=1e-5, atol=1e-5)
    assert torch.allclose(out.rejected_logprobs.double(), rejected, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        if g is not None:
            assert_grad_close(g, r, dtype)
    for key, value in metrics.items():
        assert torch.allclose(out.metrics[key].double(), value.double(), rtol=1e-5,
                              atol=1e-5), key


@pytest.mark.parametrize("chunk_size", [1, None])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_loss_type_matches_reference(loss_type, chunk_size, backend, device):
    p = pair_problem(seed=LOSS_TYPES.index(loss_type), device=device)
    kwargs = loss_kwargs(loss_type)
    out, grads = run_ours(p, kwargs, backend, chunk_size=chunk_size)
    compare(out, grads, run_reference(p, kwargs), torch.float32)


@pytest.mark.parametrize("kwargs", [dict(loss_type="sigmoid", nll_coef=0.5),
                                    dict(loss_type="ipo", average_logprobs=False, beta=0.05),
                                    dict(loss_type="sigmoid", reference_free=True),
                                    dict(loss_type="orpo", temperature=0.8)],
                         ids=["rpo", "ipo-sum", "reference-free", "orpo-temperature"])
def test_options_and_uneven_chunks(kwargs, backend, device):
    p = pair_problem(pairs=5, seed=21, device=device)      # chunks of 2, 2, 1 pairs
    out, grads = run_ours(p, kwargs, backend, chunk_size=2, grad_scale=-1.5)
    compare(out, grads, run_reference(p, kwargs, grad_scale=-1.5), torch.float32)


def test_reference_logprobs_instead_of_reference_model(backend, device):
    p = pair_problem(seed=4, device=device)
    kwargs = {"loss_type": "sigmoid"}
    out, grads = run_ours(p, kwargs, backend, chunk_size=1, ref="logprobs", bias=False)
    compare(out, grads, run_reference(p, kwargs, bias=False), torch.float32)


@pytest.mark.parametrize("grads", [(True, False, False), (False, True, False),
                                   (False, False, True)])
def test_frozen_inputs(grads, backend, device):
    p = pair_problem(seed=6, device=device)
    _, got = run_ours(p, {"loss_type": "apo_zero"}, backend, chunk_size=2, grads=grads)
    expected = run_reference(p, {"loss_type": "apo_zero"})
    for need, g, r in zip(grads, got, expected[3], strict=True):
        assert (g is not None) == need
        if need:
            assert_grad_close(g, r, torch.float32)


@pytest.mark.parametrize("loss_type", ["sigmoid", "simpo"])
def test_bf16(loss_type, backend, device):
    p = pair_problem(dtype=torch.bfloat16, seed=8, device=device)
    kwargs = loss_kwargs(loss_type)
    # Against the float64 reference on the bf16 logits the op itself forms (every fused
    # implementation rounds the logits to bf16 before the softmax).
    out, grads = run_ours(p, kwargs, backend, chunk_size=1, bias=False, ref="logprobs")
    logits = (p["h"] @ p["w"].T).detach()
    x = logits.double().requires_grad_()
    config = preference_config(**kwargs)
    ref = exact_ref_logprobs(p) if config.uses_reference else None
    loss, chosen, _, _ = reference.dpo_loss(x, p["targets"], p["mask"], ref_logprobs=ref,
                                            config=config)
    loss.backward()
    assert abs(out.loss.item() - loss.item()) <= 1e-5 * abs(loss.item())
    assert torch.allclose(out.chosen_logprobs.double(), chosen, rtol=1e-5, atol=1e-5)
    assert_grad_close(grads[0], (x.grad @ p["w"].double()), torch.bfloat16)
    assert_grad_close(grads[1], (x.grad.flatten(0, 1).T @ p["h"].double().flatten(0, 1)),
                      torch.bfloat16)


def test_no_grad_forward(backend, device):
    p = pair_problem(seed=2, device=device)
    with torch.no_grad():
        out = rlhf_fast.linear_dpo_loss(p["h"], p["w"], p["targets"], p["mask"],
                                        ref_hidden=p["ref_h"], ref_weight=p["ref_w"],
                                        chunk_size=1, backend=backend)
    expected = run_reference(p, {"loss_type": "sigmoid"}, bias=False)
    assert out.loss.item() == pytest.approx(expected[0].item(), rel=1e-5)


def test_bad_input():
    p = pair_problem()
    h, w, y, m = p["h"], p["w"], p["targets"], p["mask"]
    with pytest.raises(ValueError, match="must be even"):
        rlhf_fast.linear_dpo_loss(h[:5], w, y[:5], m[:5], reference_free=True)
    with pytest.raises(ValueError, match=r"\[2B, T, \.\.\.\]"):
        rlhf_fast.linear_dpo_loss(h[0], w, y[0], m[0], reference_free=True)
    with pytest.raises(ValueError, match="ref_hidden and ref_weight go together"):
        rlhf_fast.linear_dpo_loss(h, w, y, m, ref_hidden=p["ref_h"])
    with pytest.raises(ValueError, match="not both"):
        rlhf_fast.linear_dpo_loss(h, w, y, m, ref_hidden=p["ref_h"], ref_weight=p["ref_w"],
                                  ref_logprobs=torch.zeros(6))
    with pytest.raises(ValueError, match="ref_hidden must be"):
        rlhf_fast.linear_dpo_loss(h, w, y, m, ref_hidden=p["ref_h"][:4], ref_weight=p["ref_w"])
    with pytest.raises(ValueError, match=r"ref_logprobs .* or ref_hidden"):
        rlhf_fast.linear_dpo_loss(h, w, y, m)
    with pytest.raises(ValueError, match="reference-free"):
        rlhf_fast.linear_dpo_loss(h, w, y, m, loss_type="orpo", ref_hidden=p["ref_h"],
                                  ref_weight=p["ref_w"])
    with pytest.raises(ValueError, match="weight must be"):
        rlhf_fast.linear_dpo_loss(h, w.T, y, m, reference_free=True)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        rlhf_fast.linear_dpo_loss(h, w, y, m, reference_free=True, chunk_size=0)
