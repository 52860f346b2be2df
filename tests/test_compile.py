"""torch.compile(fullgraph=True) sees token_logprobs as one custom op: no graph break."""

import pytest
import torch
from numerics import assert_grad_close

import rlhf_fast


def loss_fn(logits, targets, coef):
    logp, ent = rlhf_fast.token_logprobs(logits, targets, temperature=0.9, return_entropy=True)
    return -(logp * coef).mean() - 0.01 * ent.mean()


@pytest.mark.parametrize("shape", [(2, 5, 300), (7, 300)])
def test_fullgraph_aot_eager_matches_eager(shape, device):
    torch._dynamo.reset()
    logits = torch.randn(shape, device=device)
    targets = torch.randint(0, shape[-1], shape[:-1], device=device)
    coef = torch.randn(shape[:-1], device=device)
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")

    x = logits.clone().requires_grad_()
    loss = compiled(x, targets, coef)
    loss.backward()
    xe = logits.clone().requires_grad_()
    eager = loss_fn(xe, targets, coef)
    eager.backward()
    assert torch.allclose(loss, eager, rtol=1e-6, atol=0)
    assert_grad_close(x.grad, xe.grad, torch.float32)


def test_new_sequence_length_no_graph_break(device):
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager", dynamic=True)
    for seq_len in (5, 9, 13):
        x = torch.randn(2, seq_len, 64, device=device, requires_grad=True)
        targets = torch.randint(0, 64, (2, seq_len), device=device)
        compiled(x, targets, torch.ones(2, seq_len, device=device)).backward()
        assert x.grad.shape == x.shape


def test_opcheck():
    # torch.library's own consistency checks: schema, fake tensor, autograd registration.
    logits = torch.randn(2, 3, 40, requires_grad=True)
    targets = torch.randint(0, 40, (2, 3))
    torch.library.opcheck(torch.ops.rlhf_fast.token_logprobs.default,
                          (logits, targets, 1.0, -100, True, "auto"))
