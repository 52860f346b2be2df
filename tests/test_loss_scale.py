"""``loss_scale``: the ops that write their gradient in the forward multiply the loss and every
gradient there, exactly as the reference scaled by the same factor; a ``grad_output`` other
than 1 is applied on top of it by backward, without a host sync (on CUDA by an in-place
kernel that reads the factor on the device, exercised here under the Triton interpreter)."""

import pytest
import torch
from numerics import assert_grad_close
from policy_problems import loss_scale as policy_norm
from policy_problems import make_problem
from preference_problems import loss_scale as preference_norm
from preference_problems import make_pairs

import rlhf_fast
from rlhf_fast import PolicyLossConfig, reference, validation
from rlhf_fast.ops import forward_gradients
from rlhf_fast.preference_config import preference_config

CASES = [(1 / 3, 1.0), (0.25, -2.0)]   # (loss_scale, grad_output)


def _close(actual: float, expected: float, norm: float) -> None:
    err = abs(actual - expected) / max(norm, 1e-30)
    assert err <= 1e-5, f"{actual} vs {expected} (norm-wise rel {err:.2e})"


@pytest.mark.parametrize("preset", ["dapo", "gspo"])  # one-kernel path / two-pass path
def test_policy_loss(backend, device, preset):
    config = PolicyLossConfig.preset(preset, kl_coef=0.1, entropy_coef=0.01)
    p = make_problem(device=device, per_token_adv=True)
    args = (p["targets"], p["advantages"], p["mask"])
    for scale, grad_output in CASES:
        x = p["logits"].clone().requires_grad_()
        out = rlhf_fast.policy_loss(x, *args, old_logprobs=p["old_logprobs"],
                                    ref_logprobs=p["ref_logprobs"], config=config,
                                    loss_scale=scale, backend=backend)
        (out.loss * grad_output).backward()
        xr = p["logits"].double().requires_grad_()
        loss, _, _, metrics = reference.policy_loss(
            xr, p["targets"], p["advantages"].double(), p["mask"],
            old_logprobs=p["old_logprobs"].double(), ref_logprobs=p["ref_logprobs"].double(),
            config=config)
        (loss * scale * grad_output).backward()
        _close(out.loss.item(), scale * loss.item(), scale * policy_norm(p, config, loss.item()))
        assert_grad_close(x.grad, xr.grad, torch.float32)
        for key, value in metrics.items():  # statistics, never scaled
            torch.testing.assert_close(out.metrics[key].double(), value.double(), rtol=1e-5,
                                       atol=1e-6)


@pytest.mark.parametrize("loss_type", ["sigmoid", "orpo"])
def test_dpo_loss(backend, device, loss_type):
    p = make_pairs(device=device)
    kwargs = {"loss_type": loss_type, "nll_coef": 0.2}
    config = preference_config(**kwargs)
    ref = p["ref"] if config.uses_reference else None
    for scale, grad_output in CASES:
        x = p["logits"].clone().requires_grad_()
        out = rlhf_fast.dpo_loss(x, p["targets"], p["mask"], ref_logprobs=ref,
                                 loss_scale=scale, backend=backend, **kwargs)
        (out.loss * grad_output).backward()
        xr = p["logits"].double().requires_grad_()
        loss, chosen, _, _ = reference.dpo_loss(
            xr, p["targets"], p["mask"], ref_logprobs=ref.double() if ref is not None else None,
            config=config)
        (loss * scale * grad_output).backward()
        _close(out.loss.item(), scale * loss.item(), scale * preference_norm(p, config, ref))
        assert_grad_close(x.grad, xr.grad, torch.float32)
        torch.testing.assert_close(out.chosen_logprobs.double(), chosen.detach(), rtol=1e-5,
                                   atol=1e-5)


def _head(device, batch=6, seq_len=4, hidden=8, vocab=40, seed=3):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, seq_len, generator=g) > 0.3
    mask[0, 0] = True
    mask[-1] = False                                      # an empty sequence
    t = dict(h=torch.randn(batch, seq_len, hidden, generator=g),
             w=torch.randn(vocab, hidden, generator=g) * 0.5,
             b=torch.randn(vocab, generator=g) * 0.1,
             targets=torch.randint(0, vocab, (batch, seq_len), generator=g), mask=mask,
             adv=torch.randn(batch, generator=g))
    logits = t["h"].double() @ t["w"].double().T + t["b"].double()
    logp = reference.token_logprobs(logits, t["targets"]).float()
    t["old"] = logp + 0.2 * torch.randn(batch, seq_len, generator=g)
    t["ref"] = logp + 0.2 * torch.randn(batch, seq_len, generator=g)
    return {k: v.to(device) for k, v in t.items()}


LINEAR_CONFIGS = {
    "grpo": PolicyLossConfig.preset("grpo"),                        # count of sequences
    "bnpo": PolicyLossConfig.preset("bnpo", entropy_coef=0.02),     # count of tokens
    "dr_grpo": PolicyLossConfig.preset("dr_grpo"),                  # B * max_length
    "normalizer": PolicyLossConfig.preset("dapo", normalizer=9.0),  # given constant
    "gmpo": PolicyLossConfig.preset("gmpo"),                        # per-sequence loss
}


# Every denominator on the torch backend; on Triton the token-level losses, which take the
# device-side count into the one-kernel path (the denominators are backend-independent).
LINEAR_CASES = [("torch", name) for name in LINEAR_CONFIGS] + [("triton", "grpo"),
                                                               ("triton", "bnpo")]


@pytest.mark.parametrize("backend, name", LINEAR_CASES)
def test_linear_policy_loss(backend, device, name):
    """The batch's token / sequence count, kept on the device, scales every chunk."""
    config = LINEAR_CONFIGS[name]
    p = _head(device)
    ref = p["ref"] if config.kl.coef != 0 else None
    for scale, grad_output in CASES:
        leaves = [p[k].clone().requires_grad_() for k in ("h", "w", "b")]
        out = rlhf_fast.linear_policy_loss(
            leaves[0], leaves[1], p["targets"], p["adv"], p["mask"], bias=leaves[2],
            old_logprobs=p["old"], ref_logprobs=ref, config=config, chunk_size=2,
            loss_scale=scale, backend=backend)
        (out.loss * grad_output).backward()
        exact = [p[k].double().requires_grad_() for k in ("h", "w", "b")]
        loss = reference.policy_loss(
            exact[0] @ exact[1].T + exact[2], p["targets"], p["adv"].double(), p["mask"],
            old_logprobs=p["old"].double(),
            ref_logprobs=ref.double() if ref is not None else None, config=config)[0]
        (loss * scale * grad_output).backward()
        problem = {"mask": p["mask"], "advantages": p["adv"]}
        _close(out.loss.item(), scale * loss.item(),
               scale * policy_norm(problem, config, loss.item()))
        for got, want in zip((t.grad for t in leaves), (t.grad for t in exact), strict=True):
            assert_grad_close(got, want, torch.float32)


def test_linear_dpo_loss(backend, device):
    p = _head(device, batch=6)
    config = preference_config(loss_type="sigmoid", nll_coef=0.3)
    for scale, grad_output in CASES:
        leaves = [p[k].clone().requires_grad_() for k in ("h", "w")]
        out = rlhf_fast.linear_dpo_loss(leaves[0], leaves[1], p["targets"], p["mask"],
                                        ref_logprobs=p["ref"], nll_coef=0.3, chunk_size=1,
                                        loss_scale=scale, backend=backend)
        (out.loss * grad_output).backward()
        exact = [p[k].double().requires_grad_() for k in ("h", "w")]
        loss = reference.dpo_loss(exact[0] @ exact[1].T, p["targets"], p["mask"],
                                  ref_logprobs=p["ref"].double(), config=config)[0]
        (loss * scale * grad_output).backward()
        _close(out.loss.item(), scale * loss.item(), scale * max(abs(loss.item()), 1.0))
        for got, want in zip((t.grad for t in leaves), (t.grad for t in exact), strict=True):
            assert_grad_close(got, want, torch.float32)


def test_power_of_two_scale_is_exact(backend, device):
    """A power-of-two loss_scale gives exactly the scaled loss and gradients: the scale is
    folded into the coefficients (and through them into the GEMMs), no pass rounds again."""
    p = make_problem(device=device)
    h = _head(device)
    runs = []
    for scale in (1.0, 0.125):
        x = p["logits"].clone().requires_grad_()
        a = rlhf_fast.policy_loss(x, p["targets"], p["advantages"], p["mask"],
                                  old_logprobs=p["old_logprobs"], config="dapo",
                                  entropy_coef=0.01, loss_scale=scale, backend=backend)
        a.loss.backward()
        leaves = [h[k].clone().requires_grad_() for k in ("h", "w")]
        b = rlhf_fast.linear_policy_loss(leaves[0], leaves[1], h["targets"], h["adv"],
                                         h["mask"], old_logprobs=h["old"], config="grpo",
                                         kl_coef=0.0, chunk_size=2, loss_scale=scale,
                                         backend=backend)
        b.loss.backward()
        runs.append((a.loss, x.grad, b.loss, *(t.grad for t in leaves)))
    for one, eighth in zip(*runs, strict=True):
        assert torch.equal(eighth, one * 0.125)


# --- backward's rescale ---------------------------------------------------------------------

def test_grad_output_one_returns_the_saved_gradient():
    """grad_output == 1 (CPU, eager): the saved gradients come back as they are."""
    g = (torch.randn(3, 4), None)
    assert forward_gradients.scale_by_grad_output(object(), g, torch.tensor(1.0)) is g
    scaled = forward_gradients.scale_by_grad_output(object(), g, torch.tensor(-0.5))
    assert torch.equal(scaled[0], g[0] * -0.5) and scaled[1] is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scale_kernel(dtype):
    """kernels/grad_scale.py: factor 1 leaves the tensor as it is; another factor scales it
    in float32, through any batch / row strides, for 1-, 2- and 3-dim tensors."""
    full = torch.randn(3, 6, 40).to(dtype)
    for t in (full[:, 1:5], full[0], full[1, 2]):    # strided [B, T, C], [T, C], [C]
        before = full.clone()
        assert forward_gradients.scale_rows_(t, torch.tensor(1.0))
        assert torch.equal(full, before)
        expected = full.clone()
        expected_view = expected[:, 1:5] if t.dim() == 3 else expected[0] if t.dim() == 2 \
            else expected[1, 2]
        expected_view.copy_((expected_view.float() * 2.5).to(dtype))
        assert forward_gradients.scale_rows_(t, torch.tensor(2.5))
        if dtype == torch.float32:
            assert torch.equal(full, expected), "only the view's elements are scaled, exactly"
        else:  # the interpreter rounds float32 -> bf16 toward zero, a GPU to nearest
            torch.testing.assert_close(full, expected, rtol=2**-7, atol=0)  # one ulp
            untouched = torch.ones_like(full, dtype=torch.bool)
            (untouched[:, 1:5] if t.dim() == 3 else untouched[0] if t.dim() == 2
             else untouched[1, 2]).fill_(False)
            assert torch.equal(full[untouched], before[untouched])


def test_in_place_rescale_through_a_retained_graph(monkeypatch):
    """The device path (kernel, in place, no host read): two backwards through a retained
    graph with grad_output 2 then 3 accumulate 5 times the gradient."""
    monkeypatch.setattr(validation, "host_reads_are_free", lambda t: False)
    p = make_problem()
    x = p["logits"].clone().requires_grad_()
    out = rlhf_fast.policy_loss(x, p["targets"], p["advantages"], p["mask"], config="dapo",
                                backend="torch")
    xe = p["logits"].clone().requires_grad_()
    rlhf_fast.policy_loss(xe, p["targets"], p["advantages"], p["mask"], config="dapo",
                          backend="torch").loss.backward()
    out.loss.backward(torch.tensor(2.0), retain_graph=True)
    torch.testing.assert_close(x.grad, 2 * xe.grad, rtol=1e-6, atol=0)
    out.loss.backward(torch.tensor(3.0))
    torch.testing.assert_close(x.grad, 5 * xe.grad, rtol=1e-6, atol=0)
    h = _head("cpu")
    leaves = [h[k].clone().requires_grad_() for k in ("h", "w")]
    lin = rlhf_fast.linear_policy_loss(leaves[0], leaves[1], h["targets"], h["adv"], h["mask"],
                                       config="dapo", chunk_size=2, backend="torch")
    lin.loss.backward(torch.tensor(1.0), retain_graph=True)
    once = [t.grad.clone() for t in leaves]
    lin.loss.backward(torch.tensor(-1.0))
    for t, g in zip(leaves, once, strict=True):
        assert g.abs().sum() > 0 and t.grad.abs().max() <= 1e-6 * g.abs().max()
