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


# --- every public op under torch.compile(fullgraph=True), against eager ---------------------
# Tiny shapes, one compile per (op, compiler). Each op runs its data-dependent steps inside a
# torch.library custom op, so the traced graph holds a few nodes and compiles in seconds.

B, T, V, H = 4, 3, 24, 8
GRAD_OUTPUT = 0.75   # != 1: the compiled backward's rescale is exercised


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0, 0] = True
    return dict(logits=torch.randn(B, T, V, generator=g),
                hidden=torch.randn(B, T, H, generator=g),
                weight=torch.randn(V, H, generator=g) * 0.5,
                targets=torch.randint(0, V, (B, T), generator=g),
                mask=mask, advantages=torch.randn(B, generator=g),
                old=torch.randn(B, T, generator=g) * 0.1 - 3.0,
                ref=torch.randn(B, T, generator=g) * 0.1 - 3.0,
                ref_seq=torch.randn(B, generator=g))


def _policy(p, logits, backend):
    out = rlhf_fast.policy_loss(logits, p["targets"], p["advantages"], p["mask"],
                                old_logprobs=p["old"], ref_logprobs=p["ref"], config="grpo",
                                entropy_coef=0.01, loss_scale=0.5, backend=backend)
    return out.loss, out.logprobs, out.entropy, out.metrics["clip_frac_high"]


def _policy_inplace(p, hidden, weight, backend):
    logits = hidden @ weight.T  # a non-leaf the op may overwrite with its gradient
    out = rlhf_fast.policy_loss(logits, p["targets"], p["advantages"], p["mask"],
                                old_logprobs=p["old"], config="dapo", inplace=True,
                                backend=backend)
    return out.loss, out.logprobs, out.entropy


def _dpo(p, logits, backend):
    out = rlhf_fast.dpo_loss(logits, p["targets"], p["mask"], ref_logprobs=p["ref_seq"],
                             nll_coef=0.1, loss_scale=0.5, backend=backend)
    return out.loss, out.chosen_logprobs, out.rejected_logprobs, out.metrics["rewards_margin"]


def _token_logprobs(p, logits, backend):
    logp, entropy = rlhf_fast.token_logprobs(logits, p["targets"], return_entropy=True,
                                             backend=backend)
    return (logp * p["mask"]).sum() - 0.1 * entropy.sum(), logp, entropy


def _linear_token_logprobs(p, hidden, weight, backend):
    logp, entropy = rlhf_fast.linear_token_logprobs(hidden, weight, p["targets"],
                                                    return_entropy=True, chunk_size=2,
                                                    backend=backend)
    return (logp * p["mask"]).sum() - 0.1 * entropy.sum(), logp, entropy


def _linear_policy(p, hidden, weight, backend):
    out = rlhf_fast.linear_policy_loss(hidden, weight, p["targets"], p["advantages"],
                                       p["mask"], old_logprobs=p["old"], ref_logprobs=p["ref"],
                                       config="grpo", loss_scale=0.5, chunk_size=2,
                                       backend=backend)
    return out.loss, out.logprobs, out.entropy, out.metrics["kl_mean"]


def _linear_dpo(p, hidden, weight, backend):
    out = rlhf_fast.linear_dpo_loss(hidden, weight, p["targets"], p["mask"],
                                    ref_logprobs=p["ref"], loss_type="ipo", loss_scale=0.5,
                                    chunk_size=1, backend=backend)
    return out.loss, out.chosen_logprobs, out.rejected_logprobs


OPS = {
    "token_logprobs": (_token_logprobs, ("logits",)),
    "policy_loss": (_policy, ("logits",)),
    "policy_loss_inplace": (_policy_inplace, ("hidden", "weight")),
    "dpo_loss": (_dpo, ("logits",)),
    "linear_token_logprobs": (_linear_token_logprobs, ("hidden", "weight")),
    "linear_policy_loss": (_linear_policy, ("hidden", "weight")),
    "linear_dpo_loss": (_linear_dpo, ("hidden", "weight")),
}


def _run(fn, p, leaves, backend):
    xs = [p[name].clone().requires_grad_() for name in leaves]
    outputs = fn(p, *xs, backend)
    (outputs[0] * GRAD_OUTPUT).backward()
    return outputs, [x.grad for x in xs]


def _compare(got, want):
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("op", list(OPS))
def test_op_fullgraph_matches_eager(op):
    """aot_eager: AOTAutograd traces forward and backward, where a graph break or a
    data-dependent shape would fail; loss, per-token outputs and gradients equal eager."""
    torch._dynamo.reset()
    fn, leaves = OPS[op]
    p = _inputs()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got, got_grads = _run(compiled, p, leaves, "torch")
    want, want_grads = _run(fn, p, leaves, "torch")
    _compare(got, want)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in want_grads)
    _compare(got_grads, want_grads)


INDUCTOR_OPS = ("policy_loss", "policy_loss_inplace", "linear_policy_loss")


def _inductor_graph(p, logits, hidden, weight, backend):
    outputs = []
    for name in INDUCTOR_OPS:
        fn, leaves = OPS[name]
        outputs += fn(p, *((logits,) if leaves == ("logits",) else (hidden, weight)), backend)
    values = hidden[..., 0]
    helpers = _helpers(p["old"], values, p["mask"], p["ref"], p["advantages"], p["ref"])
    return [*outputs, helpers[2], *helpers[:2], *helpers[4:6]]   # value loss, GAE, whitening


def test_fullgraph_inductor_matches_eager():
    """inductor (C++ codegen on the CPU), compiled once (its first compile in a process
    costs seconds of set-up): a functional op, the in-place one (functionalised, then
    re-inplaced), a fused-linear one, GAE (a custom op), the value loss and masked_whiten in
    one graph. The other ops share the same structure; the fake tensors inductor plans with
    are checked for every custom op by ``test_custom_op_registrations``."""
    torch._dynamo.reset()
    p = _inputs()
    compiled = torch.compile(_inductor_graph, fullgraph=True, backend="inductor")
    results = []
    for fn in (compiled, _inductor_graph):
        leaves = [p[k].clone().requires_grad_() for k in ("logits", "hidden", "weight")]
        outputs = fn(p, *leaves, "torch")
        losses = [o for o in outputs if o.dim() == 0 and o.requires_grad]
        (sum(losses) * GRAD_OUTPUT).backward()
        results.append((outputs, [t.grad for t in leaves]))
    _compare(results[0][0], results[1][0])
    _compare(results[0][1], results[1][1])


def _custom_op_cases():
    import rlhf_fast.gae  # registers rlhf_fast::gae
    from rlhf_fast.ops.custom_op_args import encode_config
    from rlhf_fast.preference_config import preference_config

    p = _inputs()
    policy = encode_config(rlhf_fast.PolicyLossConfig.preset("grpo"))
    pref = encode_config(preference_config())
    logits = p["logits"].requires_grad_()
    hidden, weight = p["hidden"].requires_grad_(), p["weight"].requires_grad_()
    args = (p["targets"], p["advantages"], p["mask"], p["old"], p["ref"], None)
    return {
        "policy_loss": (torch.ops.rlhf_fast.policy_loss.default,
                        (logits.detach(), *args, policy, "torch", 0.5, True)),
        "policy_loss_inplace": (torch.ops.rlhf_fast.policy_loss_inplace.default,
                                (logits.detach().clone(), *args, policy, "torch", 0.5)),
        "dpo_loss": (torch.ops.rlhf_fast.dpo_loss.default,
                     (logits.detach(), p["targets"], p["mask"], p["ref_seq"], pref, "torch",
                      1.0, True)),
        "dpo_loss_inplace": (torch.ops.rlhf_fast.dpo_loss_inplace.default,
                             (logits.detach().clone(), p["targets"], p["mask"], p["ref_seq"],
                              pref, "torch", 1.0)),
        "linear_policy_loss": (torch.ops.rlhf_fast.linear_policy_loss.default,
                               (hidden.detach(), weight.detach(), None, *args, None, None,
                                policy, "torch", 2, 1.0, True, True, False)),
        "linear_dpo_loss": (torch.ops.rlhf_fast.linear_dpo_loss.default,
                            (hidden.detach(), weight.detach(), None, p["targets"], p["mask"],
                             p["ref"], None, None, pref, "torch", 1, 1.0, True, True, False)),
        "linear_token_logprobs": (torch.ops.rlhf_fast.linear_token_logprobs.default,
                                  (hidden, weight, None, p["targets"], 1.0, -100, True, "torch",
                                   2)),
        "gae": (torch.ops.rlhf_fast.gae.default,
                (p["old"], p["ref"], p["mask"].float(), 0.9, 0.8, "torch")),
    }


@pytest.mark.parametrize("op", ["policy_loss", "policy_loss_inplace", "dpo_loss",
                                "dpo_loss_inplace", "linear_policy_loss", "linear_dpo_loss",
                                "linear_token_logprobs", "gae"])
def test_custom_op_registrations(op):
    """torch.library's checks of each custom op: schema, fake tensors (shapes, dtypes,
    strides that torch.compile plans with) and autograd registration."""
    fn, args = _custom_op_cases()[op]
    torch.library.opcheck(fn, args, test_utils=("test_schema", "test_faketensor",
                                                "test_autograd_registration"))


def _helpers(rewards, values, mask, token_rewards, seq_rewards, old_values):
    from rlhf_fast.advantages import (
        group_advantages,
        masked_whiten,
        reinforce_pp_advantages,
        reinforce_pp_baseline_advantages,
        rloo_advantages,
        winrate_advantages,
    )
    from rlhf_fast.gae import gae
    from rlhf_fast.value import value_loss

    adv, ret = gae(rewards, values, mask, 0.99, 0.95)
    vl = value_loss(values, old_values, ret, mask, clip=0.2)
    return (adv, ret, vl.loss, vl.clip_frac, masked_whiten(adv, mask),
            masked_whiten(adv, mask, shift_mean=False, unbiased=False),
            group_advantages(seq_rewards, 2), group_advantages(seq_rewards, 2, scale="batch"),
            rloo_advantages(seq_rewards, 2), winrate_advantages(seq_rewards, 2),
            reinforce_pp_advantages(token_rewards, mask),
            reinforce_pp_baseline_advantages(seq_rewards, 2, mask))


def test_helpers_fullgraph_match_eager():
    """GAE, the value loss and the advantage estimators trace as one graph (GAE as a custom
    op; masked_whiten picks its cases on the device); inductor: see above."""
    compiler = "aot_eager"
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0, 0] = True
    args = (torch.randn(B, T, generator=g), torch.randn(B, T, generator=g), mask,
            torch.randn(B, T, generator=g), torch.randn(B, generator=g),
            torch.randn(B, T, generator=g))
    values = args[1].clone().requires_grad_()
    got = torch.compile(_helpers, fullgraph=True, backend=compiler)(
        args[0], values, *args[2:])
    got[2].backward()
    values_eager = args[1].clone().requires_grad_()
    want = _helpers(args[0], values_eager, *args[2:])
    want[2].backward()
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(values.grad, values_eager.grad, rtol=1e-6, atol=1e-7)
    # One valid position: whitening falls back to centring, decided on the device.
    one = torch.zeros(B, T, dtype=torch.bool)
    one[1, 2] = True
    compiled_whiten = torch.compile(
        lambda x, m: rlhf_fast.advantages.masked_whiten(x, m), fullgraph=True,
        backend=compiler)
    torch.testing.assert_close(compiled_whiten(args[0], one),
                               rlhf_fast.advantages.masked_whiten(args[0], one))


def test_data_checks_run_inside_the_compiled_op():
    """Out-of-range targets and soft masks raise the eager errors under compile too: the
    checks run inside the custom op, on the data."""
    torch._dynamo.reset()
    p = _inputs()
    compiled = torch.compile(_policy, fullgraph=True, backend="aot_eager")
    bad_targets = {**p, "targets": p["targets"].clone()}
    bad_targets["targets"][1, 1] = V
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 24\)"):
        compiled(bad_targets, p["logits"], "torch")
    soft = {**p, "mask": p["mask"].float() * 0.5}
    with pytest.raises(ValueError, match="mask must be bool or hold only 0 and 1"):
        compiled(soft, p["logits"], "torch")


def test_output_gradient_guard_under_compile():
    """A term built from out.logprobs raises in the compiled backward as in eager."""
    torch._dynamo.reset()
    p = _inputs()

    def loss_with_logprob_term(logits):
        out = rlhf_fast.policy_loss(logits, p["targets"], p["advantages"], p["mask"],
                                    config="dapo", backend="torch")
        return out.loss + 0.1 * out.logprobs.sum()

    compiled = torch.compile(loss_with_logprob_term, fullgraph=True, backend="aot_eager")
    x = p["logits"].clone().requires_grad_()
    with pytest.raises(RuntimeError, match=r"nonzero gradient reached out\.logprobs"):
        compiled(x).backward()
