"""The reference against the formula written out row by row, and autograd's gradcheck."""

import math

import torch

from rlhf_fast import reference


def test_reference_against_explicit_loop():
    torch.manual_seed(0)
    logits = torch.randn(4, 9, dtype=torch.float64)
    targets = torch.tensor([0, 8, -100, 3])
    temperature = 0.8
    logp, ent = reference.token_logprobs(logits, targets, temperature=temperature,
                                         return_entropy=True)
    for i in range(4):
        if targets[i] == -100:
            assert logp[i] == 0 and ent[i] == 0
            continue
        z = [v / temperature for v in logits[i].tolist()]
        lse = math.log(sum(math.exp(v) for v in z))
        p = [math.exp(v - lse) for v in z]
        assert math.isclose(logp[i].item(), z[targets[i]] - lse, rel_tol=1e-12)
        h = -sum(pi * math.log(pi) for pi in p)
        assert math.isclose(ent[i].item(), h, rel_tol=1e-12)


def test_reference_gradcheck():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([1, -100, 6])

    def f(x):
        lp, h = reference.token_logprobs(x, targets, temperature=1.3, return_entropy=True)
        return lp, h

    assert torch.autograd.gradcheck(f, (logits,))


def test_reference_banned_tokens_finite_gradient():
    logits = torch.randn(2, 6, dtype=torch.float64)
    logits[:, 0] = float("-inf")
    x = logits.requires_grad_()
    lp, h = reference.token_logprobs(x, torch.tensor([1, 2]), return_entropy=True)
    (lp.sum() + h.sum()).backward()
    assert torch.isfinite(x.grad).all() and (x.grad[:, 0] == 0).all()
