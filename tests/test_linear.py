"""Fused-linear ops against policy_loss / token_logprobs on materialised logits and against
the float64 reference: values and gradients w.r.t. hidden, weight and bias."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from numerics import GRAD_RTOL, assert_grad_close, rel_err
from policy_problems import loss_scale

import rlhf_fast
from rlhf_fast import PolicyLossConfig, reference


def problem(batch=5, seq_len=4, hidden=16, vocab=70, dtype=torch.float32, seed=0,
            device="cpu"):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, seq_len, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) * 0.5
    b = torch.randn(vocab, generator=g) * 0.1
    targets = torch.randint(0, vocab, (batch, seq_len), generator=g)
    mask = torch.rand(batch, seq_len, generator=g) > 0.2
    mask[0, 0] = True
    adv = torch.randn(batch, generator=g)
    h, w, b = (t.to(dtype) for t in (h, w, b))
    with torch.no_grad():
        lp = reference.token_logprobs((h.double() @ w.double().T + b.double()), targets).float()
    old = lp + 0.15 * torch.randn(batch, seq_len, generator=g)
    ref = lp + 0.15 * torch.randn(batch, seq_len, generator=g)
    return {k: v.to(device) for k, v in dict(h=h, w=w, b=b, targets=targets, mask=mask,
                                               adv=adv, old=old, ref=ref).items()}


def run_linear(p, config, backend, *, bias=True, chunk_size=None, grads=(True, True, True),
               chunk_tokens=None):
    leaves = [t.clone().requires_grad_(need) for t, need in zip((p["h"], p["w"], p["b"]), grads,
                                                                 strict=True)]
    out = rlhf_fast.linear_policy_loss(
        leaves[0], leaves[1], p["targets"], p["adv"], p["mask"],
        bias=leaves[2] if bias else None, old_logprobs=p["old"], ref_logprobs=p["ref"],
        config=config, chunk_size=chunk_size, chunk_tokens=chunk_tokens, backend=backend)
    out.loss.backward()
    return out, [t.grad for t in leaves]


def run_reference(p, config, *, bias=True):
    """float64 reference on the same input values (logits formed exactly in float64)."""
    h, w, b = (t.double().requires_grad_() for t in (p["h"], p["w"], p["b"]))
    logits = h @ w.T + (b if bias else 0)
    loss, _, _, metrics = reference.policy_loss(
        logits, p["targets"], p["adv"].double(), p["mask"], old_logprobs=p["old"].double(),
        ref_logprobs=p["ref"].double(), config=config)
    loss.backward()
    return loss, [h.grad, w.grad, b.grad], metrics


CONFIGS = {
    "dapo": PolicyLossConfig.preset("dapo", entropy_coef=0.01),
    "grpo": PolicyLossConfig.preset("grpo"),
    "dr_grpo": PolicyLossConfig.preset("dr_grpo", max_length=6),
    "gspo": PolicyLossConfig.preset("gspo", clip_eps_low=0.05, clip_eps_high=0.08),
    "gspo_token": PolicyLossConfig.preset("gspo_token", clip_eps_low=0.05, clip_eps_high=0.08),
    "gmpo": PolicyLossConfig.preset("gmpo"),
    "cispo": PolicyLossConfig.preset("cispo"),
    "sapo": PolicyLossConfig.preset("sapo", kl_coef=0.1),
    "aepo": PolicyLossConfig.preset("aepo"),
    "top_entropy": PolicyLossConfig.preset("dapo", top_entropy_quantile=0.5, entropy_coef=0.1),
    "rollout_seq": PolicyLossConfig.preset("grpo", rollout_correction="sequence_truncate"),
}


@pytest.mark.parametrize("chunking", [dict(chunk_size=1), dict(chunk_tokens=3), {}],
                         ids=["sequence", "3-tokens", "default"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_float64_reference(backend, device, name, chunking):
    """Chunks of one whole sequence (one pass); of 3 tokens, which cut the sequences of
    T = 4 (token-level losses: one pass; the others: pre-pass); the default (one chunk)."""
    p = problem(device=device, seed=len(name))
    config = CONFIGS[name]
    if config.rollout.mode is not None:
        config = config.replace(rollout_correction=None)  # rollout tested below
    out, grads = run_linear(p, config, backend, **chunking)
    loss, ref_grads, metrics = run_reference(p, config)
    # Norm-wise (tests/policy_problems.py): a near-cancelling sum against its terms' size.
    scale = loss_scale({"mask": p["mask"], "advantages": p["adv"]}, config, loss.item())
    assert abs(out.loss.item() - loss.item()) <= 1e-5 * scale
    for got, expected in zip(grads, ref_grads, strict=True):
        assert_grad_close(got, expected, torch.float32)
    for key, value in metrics.items():
        assert torch.allclose(out.metrics[key].double(), value.double(), rtol=1e-5,
                              atol=1e-6), key


def test_rollout_and_no_bias(backend, device):
    p = problem(device=device)
    roll = p["old"] + 0.1
    config = CONFIGS["rollout_seq"]
    x = [t.clone().requires_grad_() for t in (p["h"], p["w"])]
    out = rlhf_fast.linear_policy_loss(x[0], x[1], p["targets"], p["adv"], p["mask"],
                                       old_logprobs=p["old"], ref_logprobs=p["ref"],
                                       rollout_logprobs=roll, config=config, chunk_tokens=3,
                                       backend=backend)
    out.loss.backward()
    h, w = (t.double().requires_grad_() for t in (p["h"], p["w"]))
    loss = reference.policy_loss(h @ w.T, p["targets"], p["adv"].double(), p["mask"],
                                 old_logprobs=p["old"].double(),
                                 ref_logprobs=p["ref"].double(),
                                 rollout_logprobs=roll.double(), config=config)[0]
    loss.backward()
    assert abs(out.loss.item() - loss.item()) <= 1e-5 * abs(loss.item())
    assert_grad_close(x[0].grad, h.grad, torch.float32)
    assert_grad_close(x[1].grad, w.grad, torch.float32)


def test_bf16_against_materialised_logits(backend, device):
    """Same bf16-rounded logits both ways; gradients vs float64 within the bf16 contract."""
    p = problem(dtype=torch.bfloat16, device=device, batch=6, seq_len=5, vocab=300)
    config = CONFIGS["dapo"]
    out, grads = run_linear(p, config, backend, chunk_size=4)
    # bf16 logits rounded exactly as the op's GEMM rounds them (bias fused in the addmm).
    logits = torch.addmm(p["b"], p["h"].flatten(0, 1), p["w"].T).view(6, 5, 300).detach()
    mat = rlhf_fast.policy_loss(logits.clone().requires_grad_(), p["targets"], p["adv"],
                                p["mask"], old_logprobs=p["old"], config=config,
                                backend=backend)
    assert abs(out.loss.item() - mat.loss.item()) <= 1e-5 * abs(mat.loss.item())
    xr = logits.double().requires_grad_()
    reference.policy_loss(xr, p["targets"], p["adv"].double(), p["mask"],
                          old_logprobs=p["old"].double(), config=config)[0].backward()
    g = xr.grad
    expected = [(g @ p["w"].double()), (g.flatten(0, 1).T @ p["h"].double().flatten(0, 1)),
                g.sum((0, 1))]
    for got, exp in zip(grads, expected, strict=True):
        assert got.dtype == torch.bfloat16
        assert rel_err(got, exp) <= GRAD_RTOL[torch.bfloat16]


@pytest.mark.parametrize("grads", [(True, False, False), (False, True, True)])
def test_frozen_weight_or_hidden(backend, device, grads):
    p = problem(device=device)
    _, got = run_linear(p, CONFIGS["grpo"], backend, chunk_size=2, grads=grads)
    _, ref_grads, _ = run_reference(p, CONFIGS["grpo"])
    for need, g, expected in zip(grads, got, ref_grads, strict=True):
        if need:
            assert_grad_close(g, expected, torch.float32)
        else:
            assert g is None


def test_reference_model_hidden_states(backend, device):
    p = problem(device=device)
    g = torch.Generator().manual_seed(9)
    ref_h = torch.randn(5, 4, 12, generator=g).to(device)
    ref_w = (torch.randn(70, 12, generator=g) * 0.5).to(device)
    with torch.no_grad():
        ref_lp = rlhf_fast.token_logprobs(ref_h @ ref_w.T, p["targets"])
    config = CONFIGS["grpo"]
    outs = []
    for kwargs in ({"ref_hidden": ref_h, "ref_weight": ref_w}, {"ref_logprobs": ref_lp}):
        h = p["h"].clone().requires_grad_()
        out = rlhf_fast.linear_policy_loss(h, p["w"], p["targets"], p["adv"], p["mask"],
                                           old_logprobs=p["old"], config=config, chunk_size=2,
                                           backend=backend, **kwargs)
        out.loss.backward()
        outs.append((out.loss.item(), h.grad))
    assert outs[0][0] == pytest.approx(outs[1][0], rel=1e-6)
    assert_grad_close(outs[0][1], outs[1][1], torch.float32)


def test_no_grad_and_flat_rows(backend, device):
    p = problem(device=device)
    with torch.no_grad():
        out = rlhf_fast.linear_policy_loss(p["h"], p["w"], p["targets"], p["adv"], p["mask"],
                                           old_logprobs=p["old"], config="dapo",
                                           backend=backend)
    assert out.loss.grad_fn is None
    flat = rlhf_fast.linear_policy_loss(p["h"][0], p["w"], p["targets"][0],
                                        p["adv"][0].expand(4).contiguous(), p["mask"][0],
                                        old_logprobs=p["old"][0], config="dapo",
                                        backend=backend)
    one = rlhf_fast.policy_loss(p["h"][0] @ p["w"].T, p["targets"][0],
                                p["adv"][0].expand(4).contiguous(), p["mask"][0],
                                old_logprobs=p["old"][0], config="dapo", backend=backend)
    assert flat.loss.item() == pytest.approx(one.loss.item(), rel=1e-5)
    assert flat.logprobs.shape == (4,)


@pytest.mark.parametrize("chunk_size", [1, 3, None])
def test_linear_token_logprobs(backend, device, chunk_size):
    p = problem(device=device)
    h, w, b = (t.clone().requires_grad_() for t in (p["h"], p["w"], p["b"]))
    logp, ent = rlhf_fast.linear_token_logprobs(h, w, p["targets"], bias=b, temperature=0.8,
                                                return_entropy=True, chunk_size=chunk_size,
                                                backend=backend)
    c = torch.randn(5, 4, generator=torch.Generator().manual_seed(1)).to(device)
    ((logp * c).sum() + ent.sum()).backward()
    hr, wr, br = (t.double().requires_grad_() for t in (p["h"], p["w"], p["b"]))
    rlogp, rent = reference.token_logprobs(hr @ wr.T + br, p["targets"], temperature=0.8,
                                           return_entropy=True)
    ((rlogp * c.double()).sum() + rent.sum()).backward()
    assert (logp.double() - rlogp).abs().max() <= 1e-5
    assert (ent.double() - rent).abs().max() <= 1e-5
    for got, exp in zip((h.grad, w.grad, b.grad), (hr.grad, wr.grad, br.grad), strict=True):
        assert_grad_close(got, exp, torch.float32)
    with torch.no_grad():
        cheap = rlhf_fast.linear_token_logprobs(p["h"], p["w"], p["targets"], bias=p["b"],
                                                temperature=0.8, backend=backend)
    assert torch.equal(cheap, logp.detach())


@pytest.mark.parametrize("chunk_size", [2, None])
def test_linear_token_logprobs_backward_twice(backend, device, chunk_size):
    """A second backward (``retain_graph=True``) gives the same gradients: one chunk reads the
    logits kept from forward (``chunk_size=None``), several chunks recompute them; neither
    may overwrite what the next backward reads."""
    p = problem(device=device)
    h, w, b = (t.clone().requires_grad_() for t in (p["h"], p["w"], p["b"]))
    logp, ent = rlhf_fast.linear_token_logprobs(h, w, p["targets"], bias=b, temperature=0.8,
                                                return_entropy=True, chunk_size=chunk_size,
                                                backend=backend)
    c = torch.randn(5, 4, generator=torch.Generator().manual_seed(2)).to(device)
    loss = (logp * c).sum() + 0.5 * ent.sum()
    loss.backward(retain_graph=True)
    first = [t.grad.clone() for t in (h, w, b)]
    for t in (h, w, b):
        t.grad = None
    loss.backward()
    for got, exp in zip((h.grad, w.grad, b.grad), first, strict=True):
        assert torch.equal(got, exp)


def test_bad_input():
    p = problem()
    with pytest.raises(ValueError, match=r"weight must be \[V, H\] with H = 16"):
        rlhf_fast.linear_policy_loss(p["h"], p["w"][:, :8], p["targets"], p["adv"], p["mask"],
                                     config="dapo")
    with pytest.raises(TypeError, match="weight dtype"):
        rlhf_fast.linear_policy_loss(p["h"], p["w"].double(), p["targets"], p["adv"],
                                     p["mask"], config="dapo")
    with pytest.raises(ValueError, match="ref_hidden and ref_weight go together"):
        rlhf_fast.linear_policy_loss(p["h"], p["w"], p["targets"], p["adv"], p["mask"],
                                     ref_hidden=p["h"], config="dapo")
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        rlhf_fast.linear_policy_loss(p["h"], p["w"], p["targets"], p["adv"], p["mask"],
                                     config="dapo", chunk_size=0)
    with pytest.raises(ValueError, match="needs ref_logprobs or ref_hidden"):
        rlhf_fast.linear_policy_loss(p["h"], p["w"], p["targets"], p["adv"], p["mask"],
                                     config="grpo")
    with pytest.raises(ValueError, match=r"targets must have shape \(5, 4\)"):
        rlhf_fast.linear_policy_loss(p["h"], p["w"], p["targets"][:, :3], p["adv"], p["mask"],
                                     config="dapo")


MEMORY_CHILD = textwrap.dedent("""
    import json, sys, torch
    import torch._dynamo  # the first custom-op call imports it (~160 MiB): not the op's memory
    import rlhf_fast
    from rlhf_fast.bench.measure import peak_extra_mib
    from rlhf_fast.ops.chunking import memory_plan
    torch.manual_seed(0)
    B, T, H, V = 8, 1024, 256, 32768          # float32 logits: 8192 x 32768 x 4 B = 1 GiB
    h = torch.randn(B, T, H, requires_grad=True)
    w = (torch.randn(V, H) * 0.05).requires_grad_()
    y = torch.randint(0, V, (B, T))
    mask = torch.ones(B, T, dtype=torch.bool)
    adv = torch.randn(B)
    ref = -torch.rand(B) * T
    def policy(config):
        def run():
            h.grad = w.grad = None
            rlhf_fast.linear_policy_loss(h, w, y, adv, mask, config=config,
                                         backend="torch").loss.backward()
        return run
    def dpo():
        h.grad = w.grad = None
        rlhf_fast.linear_dpo_loss(h, w, y, mask, ref_logprobs=ref,
                                  backend="torch").loss.backward()
    def naive():
        # The log-probs through materialised logits, without even a backward: the logits
        # and their log_softmax, 2 GiB. (The float32 reference's forward and backward peak
        # at 6.4 GiB, more than the test suite's 4 GiB budget.)
        with torch.no_grad():
            torch.log_softmax(h @ w.T, -1).gather(-1, y.unsqueeze(-1))
    runs = {"dapo": policy("dapo"), "gspo": policy("gspo"), "dpo": dpo, "naive": naive}
    runs["dapo"]()  # warm-up: the first call's thread pool and allocator arenas are not the op's
    peaks = {name: peak_extra_mib(fn, torch.device("cpu")) for name, fn in runs.items()}
    plan = memory_plan(B * T, H, V, torch.float32, torch.device("cpu"),
                       grads=(True, True, False))
    print(json.dumps({"peaks": peaks, "plan": plan}))
""")


def test_peak_memory_default_chunks(record_property):
    """N=8192, H=256, V=32768 float32, default arguments: the logits alone would be 1 GiB;
    linear_policy_loss (dapo: token chunks; gspo: chunks of whole sequences) and
    linear_dpo_loss (pairs longer than a chunk: the pre-pass) stay within 0.4 GiB, the
    float32 weight gradient included, and within the itemised prediction of
    ``rlhf_fast.ops.chunking.memory_plan``."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", MEMORY_CHILD], capture_output=True,
                          text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    peaks, plan = result["peaks"], result["plan"]
    mib = 2**20
    predicted = (plan["beyond_accumulator"] + plan["weight_grad_accumulator"]) / mib
    for name, peak in peaks.items():
        record_property(f"peak_mib_{name}", peak)
    print(f"peak extra MiB {peaks}; predicted {predicted:.0f} "
          f"(chunk {plan['chunk_tokens']} tokens)")
    for name in ("dapo", "gspo", "dpo"):
        assert peaks[name] <= 0.4 * 1024, f"{name}: {peaks[name]:.0f} MiB > 0.4 GiB"
        assert peaks[name] <= predicted, f"{name}: {peaks[name]:.0f} > {predicted:.0f} MiB"
    assert peaks["naive"] > 1024, "the naive path holds the 1 GiB of logits and their log_softmax"
