"""No host sync on the hot path: with host reads switched off (as they are for CUDA tensors
and under torch.compile), every op runs forward and backward without one operation that
would make the host wait for a device: no ``.item()`` / ``bool()`` (``_local_scalar_dense``),
no data-dependent shape (``nonzero``, ``masked_select``, boolean indexing), no tensor built
from host data (``lift_fresh``: a host-to-device copy). Checked on the CPU by a dispatch mode
that also looks inside the ops' custom ops."""

import pytest
import torch
from policy_problems import small_op_inputs
from torch.utils._python_dispatch import TorchDispatchMode

import rlhf_fast
from rlhf_fast import validation
from rlhf_fast.advantages import group_advantages, masked_whiten, reinforce_pp_advantages
from rlhf_fast.gae import gae
from rlhf_fast.value import value_loss

aten = torch.ops.aten
SYNCING = {aten._local_scalar_dense.default, aten.nonzero.default,
           aten.masked_select.default, aten.lift_fresh.default, aten.lift_fresh_copy.default,
           aten.is_nonzero.default, aten.equal.default}
CPU = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)


class NoHostReads(TorchDispatchMode):
    """Fails on any op that needs a device value on the host; runs the package's custom ops
    with the mode still active, so their insides are checked too."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        boolean_index = func is aten.index.Tensor and any(
            i is not None and i.dtype == torch.bool for i in args[1])
        if func in SYNCING or boolean_index:
            raise AssertionError(f"{func} reads device data on the host")
        if func.namespace == "rlhf_fast":
            with self:
                return func.redispatch(CPU, *args, **kwargs)
        return func(*args, **kwargs)


B, T, V, H = 4, 3, 24, 8


@pytest.fixture
def p():
    return small_op_inputs(B, T, V, H)


def _logits_ops(p, x, backend):
    yield rlhf_fast.token_logprobs(x, p["targets"], return_entropy=True, backend=backend)[0]
    for config in ("grpo", "gspo", "aepo"):
        yield rlhf_fast.policy_loss(x, p["targets"], p["adv"], p["mask"].float(),
                                    old_logprobs=p["lp"], ref_logprobs=p["lp"], config=config,
                                    top_entropy_quantile=0.5, loss_scale=0.5,
                                    backend=backend).loss
    yield rlhf_fast.policy_loss(x * 1.0, p["targets"], p["adv"], p["mask"], config="dapo",
                                inplace=True, backend=backend).loss
    yield rlhf_fast.dpo_loss(x, p["targets"], p["mask"], ref_logprobs=p["lp"], nll_coef=0.1,
                             loss_scale=0.5, backend=backend).loss


def _linear_ops(p, h, w, backend):
    yield rlhf_fast.linear_token_logprobs(h, w, p["targets"], chunk_size=2, backend=backend)
    for config in ("grpo", "bnpo", "aepo"):
        yield rlhf_fast.linear_policy_loss(h, w, p["targets"], p["adv"], p["mask"],
                                           old_logprobs=p["lp"], ref_hidden=h, ref_weight=w,
                                           config=config, kl_coef=0.1, chunk_size=2,
                                           loss_scale=0.5, backend=backend).loss
    yield rlhf_fast.linear_dpo_loss(h, w, p["targets"], p["mask"], ref_logprobs=p["lp"],
                                    chunk_size=1, backend=backend).loss


def test_every_op_forward_and_backward(p, backend, monkeypatch):
    monkeypatch.setattr(validation, "host_reads_are_free", lambda t: False)
    x = p["logits"].clone().requires_grad_()
    h, w = p["hidden"].clone().requires_grad_(), p["weight"].clone().requires_grad_()
    with NoHostReads():
        losses = [*_logits_ops(p, x, backend), *_linear_ops(p, h, w, backend)]
        total = sum(loss.sum() for loss in losses)
        (total * 0.5).backward()            # grad_output != 1: the rescale runs too
    for leaf in (x, h, w):
        assert torch.isfinite(leaf.grad).all() and leaf.grad.abs().sum() > 0


def test_helpers(p, monkeypatch):
    monkeypatch.setattr(validation, "host_reads_are_free", lambda t: False)
    values = p["lp"].clone().requires_grad_()
    with NoHostReads():
        adv, ret = gae(p["lp"], values, p["mask"], 0.99, 0.95, backend="torch")
        value_loss(values, p["lp"], ret, p["mask"]).loss.backward()
        masked_whiten(adv, p["mask"])
        reinforce_pp_advantages(p["lp"], p["mask"])
        group_advantages(p["adv"], 2)
    assert values.grad is not None


def test_the_mode_catches_host_reads(p):
    """The host paths of the CPU (kept for speed) do read: the mode sees it."""
    with NoHostReads(), pytest.raises(AssertionError, match="reads device data on the host"):
        rlhf_fast.policy_loss(p["logits"], p["targets"], p["adv"], p["mask"], config="dapo",
                              backend="torch")


def test_device_paths_match_the_host_paths(p, backend, monkeypatch):
    """The static-shape paths (every row computed, inactive ones zeroed; checks and rescale
    on the device) give the CPU paths' results, NaN logits in masked rows included."""
    logits = p["logits"].clone()
    logits[~p["mask"]] = float("nan")                 # masked rows are garbage, never used
    targets = torch.where(p["mask"], p["targets"], -100)

    def run():
        x = logits.clone().requires_grad_()
        logp, ent = rlhf_fast.token_logprobs(x, targets, return_entropy=True, backend=backend)
        out = [logp, ent]
        for config in ("dapo", "gspo"):
            res = rlhf_fast.policy_loss(x, p["targets"], p["adv"], p["mask"],
                                        old_logprobs=p["lp"], config=config, entropy_coef=0.1,
                                        backend=backend)
            out += [res.loss, res.logprobs.detach(), res.entropy.detach()]
        res = rlhf_fast.dpo_loss(x, p["targets"], p["mask"], ref_logprobs=p["lp"],
                                 backend=backend)
        out += [res.loss, res.chosen_logprobs.detach()]
        total = sum(o.sum() for o in out if o.requires_grad)
        (total * 0.5).backward()
        return [o.detach() for o in out], x.grad

    host, host_grad = run()
    monkeypatch.setattr(validation, "host_reads_are_free", lambda t: False)
    device, device_grad = run()
    assert torch.isfinite(host_grad).all()
    for a, b in zip(device, host, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(device_grad, host_grad, rtol=1e-6, atol=1e-7)


@pytest.mark.gpu
@pytest.mark.parametrize("grad_output", [1.0, 0.5])
def test_cuda_never_synchronises(p, grad_output):
    """On a GPU: forward and backward of every op under CUDA's sync debug mode, which
    raises on any synchronising CUDA call PyTorch makes (after a warm-up that compiles the
    Triton kernels)."""
    p = {k: v.cuda() for k, v in p.items()}
    x = p["logits"].clone().requires_grad_()
    h, w = p["hidden"].clone().requires_grad_(), p["weight"].clone().requires_grad_()

    def step():
        losses = [*_logits_ops(p, x, "triton"), *_linear_ops(p, h, w, "triton")]
        (sum(loss.sum() for loss in losses) * grad_output).backward()

    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()
