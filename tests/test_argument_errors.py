"""No silent argument drops: combinations an op would ignore raise an error naming the
arguments; soft masks are refused; ``inplace=True`` refuses what PyTorch refuses; outputs
that carry no gradient raise when a nonzero one reaches them, and the documented ways to add
an entropy or NLL term do get their gradient."""

import pytest
import torch
from numerics import assert_grad_close
from policy_problems import small_op_inputs

import rlhf_fast
from rlhf_fast import PolicyLossConfig
from rlhf_fast.loss_weights import aggregation_weights

B, T, V, H = 4, 3, 20, 6


@pytest.fixture
def p():
    return small_op_inputs(B, T, V, H)


def policy(p, **kw):
    kw.setdefault("config", "dapo")
    return rlhf_fast.policy_loss(p["logits"], p["targets"], p["adv"], p["mask"],
                                 backend="torch", **kw)


def linear_policy(p, **kw):
    kw.setdefault("config", "dapo")
    return rlhf_fast.linear_policy_loss(p["hidden"], p["weight"], p["targets"], p["adv"],
                                        p["mask"], backend="torch", **kw)


# --- ambiguous or ignored combinations ------------------------------------------------------

def test_reference_from_two_places(p):
    ref_model = dict(ref_hidden=p["hidden"], ref_weight=p["weight"], ref_logprobs=p["lp"])
    with pytest.raises(ValueError, match="pass ref_logprobs or ref_hidden / ref_weight, not"):
        linear_policy(p, config="grpo", **ref_model)
    with pytest.raises(ValueError, match="pass ref_logprobs or ref_hidden / ref_weight, not"):
        rlhf_fast.linear_dpo_loss(p["hidden"], p["weight"], p["targets"], p["mask"],
                                  backend="torch", **ref_model)


def test_reference_the_loss_would_not_read(p):
    with pytest.raises(ValueError, match=r"ref_logprobs are given but kl_reference='old'"):
        policy(p, ref_logprobs=p["lp"], config="ppo_penalty", old_logprobs=p["lp"])
    with pytest.raises(ValueError, match=r"ref_logprobs or ref_hidden / ref_weight are given "
                                         r"but kl_reference='old'"):
        linear_policy(p, ref_hidden=p["hidden"], ref_weight=p["weight"], config="ppo_penalty")
    with pytest.raises(ValueError, match="reference-free: pass no ref_logprobs"):
        rlhf_fast.dpo_loss(p["logits"], p["targets"], p["mask"], ref_logprobs=p["lp"],
                           loss_type="simpo", backend="torch")


def test_reference_without_kl_feeds_the_kl_metric_only(p):
    """Documented meaning: with kl_coef=0, ref_logprobs only feed metrics["kl_mean"]."""
    plain = policy(p, config="grpo", kl_coef=0.0)
    with_ref = policy(p, config="grpo", kl_coef=0.0, ref_logprobs=p["lp"])
    assert torch.equal(plain.loss, with_ref.loss)
    assert plain.metrics["kl_mean"] == 0 and with_ref.metrics["kl_mean"] > 0


def test_rollout_logprobs_without_correction(p):
    with pytest.raises(ValueError, match="rollout_logprobs are given but rollout_correction "
                                         "is None"):
        policy(p, rollout_logprobs=p["lp"])
    with pytest.raises(ValueError, match="rollout_logprobs are given but rollout_correction"):
        linear_policy(p, rollout_logprobs=p["lp"])


@pytest.mark.parametrize("objective, field", [("cispo", {"dual_clip_c": 3.0}),
                                              ("sapo", {"delta": 2.0}),
                                              ("pg", {"clip_gradient": "keep_high"})])
def test_clip_fields_outside_ppo_clip(p, objective, field):
    name = next(iter(field))
    with pytest.raises(ValueError, match=f"{name}=.* applies to objective='ppo_clip' only"):
        policy(p, config=PolicyLossConfig(objective=objective, **field))


def test_discopop_tau_with_another_loss(p):
    with pytest.raises(ValueError, match="discopop_tau is DiscoPOP's temperature"):
        rlhf_fast.dpo_loss(p["logits"], p["targets"], p["mask"], ref_logprobs=p["lp"],
                           discopop_tau=0.1, backend="torch")
    out = rlhf_fast.dpo_loss(p["logits"], p["targets"], p["mask"], ref_logprobs=p["lp"],
                             loss_type="discopop", discopop_tau=0.1, backend="torch")
    assert torch.isfinite(out.loss)


def test_default_preset_kl_message_says_how_to_turn_it_off(p):
    with pytest.raises(ValueError, match=r"needs ref_logprobs .* pass kl_coef=0\.0, or a "
                                         r"preset without KL \(config='dapo'"):
        rlhf_fast.policy_loss(p["logits"], p["targets"], p["adv"], p["mask"], backend="torch")
    out = rlhf_fast.policy_loss(p["logits"], p["targets"], p["adv"], p["mask"], kl_coef=0.0,
                                backend="torch")
    assert torch.isfinite(out.loss)


def test_reinforce_loss_value_is_minus_the_advantage(p):
    """On-policy the ratio is 1 in value: the reinforce preset's loss is the aggregated -A."""
    out = policy(p, config="reinforce")
    w = aggregation_weights(p["mask"].float(), "token_mean")
    expected = -(w * p["adv"][:, None]).sum()
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf")])
def test_loss_scale_value(p, value):
    with pytest.raises(ValueError, match="loss_scale must be finite and > 0"):
        policy(p, loss_scale=value)
    with pytest.raises(ValueError, match="loss_scale must be finite and > 0"):
        rlhf_fast.dpo_loss(p["logits"], p["targets"], p["mask"], ref_logprobs=p["lp"],
                           loss_scale=value, backend="torch")


def test_loss_scale_type(p):
    with pytest.raises(TypeError, match="loss_scale must be a Python float, got Tensor"):
        policy(p, loss_scale=torch.tensor(0.5))


# --- masks select tokens: soft masks are refused --------------------------------------------

def _all_ops(p, mask, backend):
    yield lambda: rlhf_fast.policy_loss(p["logits"], p["targets"], p["adv"], mask,
                                        config="dapo", backend=backend)
    yield lambda: rlhf_fast.dpo_loss(p["logits"], p["targets"], mask, ref_logprobs=p["lp"],
                                     backend=backend)
    yield lambda: rlhf_fast.linear_policy_loss(p["hidden"], p["weight"], p["targets"],
                                               p["adv"], mask, config="dapo", backend=backend)
    yield lambda: rlhf_fast.linear_dpo_loss(p["hidden"], p["weight"], p["targets"], mask,
                                            ref_logprobs=p["lp"], backend=backend)


@pytest.mark.parametrize("soft", [0.5, 2.0, -1.0])
def test_soft_mask_is_refused(p, backend, soft):
    mask = p["mask"].float()
    mask[0, 0] = soft
    for run in _all_ops(p, mask, backend):
        with pytest.raises(ValueError, match=r"mask must be bool or hold only 0 and 1 .*"
                                             rf"found {soft}"):
            run()


def test_zero_one_masks_equal_the_bool_mask(p):
    bool_runs = [run().loss for run in _all_ops(p, p["mask"], "torch")]
    for dtype in (torch.float32, torch.bfloat16, torch.int64, torch.uint8):
        for run, want in zip(_all_ops(p, p["mask"].to(dtype), "torch"), bool_runs,
                             strict=True):
            assert torch.equal(run().loss, want)


# --- inplace=True refuses what autograd refuses ---------------------------------------------

@pytest.mark.parametrize("op", ["policy_loss", "dpo_loss"])
def test_inplace_on_a_leaf_that_requires_grad(p, op):
    def call(logits):
        if op == "policy_loss":
            return rlhf_fast.policy_loss(logits, p["targets"], p["adv"], p["mask"],
                                         config="dapo", inplace=True, backend="torch")
        return rlhf_fast.dpo_loss(logits, p["targets"], p["mask"], ref_logprobs=p["lp"],
                                  inplace=True, backend="torch")

    leaf = p["logits"].clone().requires_grad_()
    with pytest.raises(RuntimeError, match="logits is a leaf tensor that requires grad"):
        call(leaf)
    with pytest.raises(RuntimeError, match="logits is a view of a leaf tensor"):
        call(leaf[:, :])
    assert torch.equal(leaf, p["logits"]), "nothing was written"
    with torch.no_grad():                  # no gradient computed: nothing written, no error
        call(leaf)
    assert torch.equal(leaf, p["logits"])
    call(leaf.clone()).loss.backward()     # a non-leaf: its storage holds the gradient
    assert leaf.grad is not None and leaf.grad.abs().sum() > 0


def test_inplace_over_logits_another_op_saved(p):
    """Logits that another op saved for its backward: the overwrite is caught there."""
    leaf = p["logits"].clone().requires_grad_()
    logits = leaf * 1.0
    squared = logits * logits              # saves logits for its backward
    out = rlhf_fast.policy_loss(logits, p["targets"], p["adv"], p["mask"], config="dapo",
                                inplace=True, backend="torch")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (out.loss + squared.sum()).backward()


# --- outputs that carry no gradient ---------------------------------------------------------

LOGITS_OPS = {
    "policy_loss": (lambda p, x, **kw: rlhf_fast.policy_loss(
        x, p["targets"], p["adv"], p["mask"], config="dapo", backend="torch", **kw),
        ("logprobs", "entropy"), r"entropy_coef=.*rlhf_fast\.token_logprobs\(logits"),
    "dpo_loss": (lambda p, x, **kw: rlhf_fast.dpo_loss(
        x, p["targets"], p["mask"], ref_logprobs=p["lp"], backend="torch", **kw),
        ("chosen_logprobs", "rejected_logprobs"), r"nll_coef=.*rlhf_fast\.token_logprobs"),
}
LINEAR_OPS = {
    "linear_policy_loss": (lambda p, h, w: rlhf_fast.linear_policy_loss(
        h, w, p["targets"], p["adv"], p["mask"], config="dapo", backend="torch"),
        ("logprobs", "entropy"), r"rlhf_fast\.linear_token_logprobs\(hidden"),
    "linear_dpo_loss": (lambda p, h, w: rlhf_fast.linear_dpo_loss(
        h, w, p["targets"], p["mask"], ref_logprobs=p["lp"], backend="torch"),
        ("chosen_logprobs", "rejected_logprobs"), r"nll_coef=.*linear_token_logprobs"),
}


@pytest.mark.parametrize("op", list(LOGITS_OPS) + list(LINEAR_OPS))
def test_gradient_reaching_an_output_raises(p, op):
    run, fields, remedy = {**LOGITS_OPS, **LINEAR_OPS}[op]
    for field in fields:
        leaves = [p["logits"].clone().requires_grad_()] if op in LOGITS_OPS else \
            [p["hidden"].clone().requires_grad_(), p["weight"].clone().requires_grad_()]
        out = run(p, *leaves)
        value = getattr(out, field)
        assert value.requires_grad, f"{field} must carry the guard"
        with pytest.raises(RuntimeError, match=rf"{op}: a nonzero gradient reached "
                                               rf"out\.{field}.*{remedy}"):
            (out.loss + 0.1 * value.sum()).backward()


@pytest.mark.parametrize("op", list(LOGITS_OPS))
def test_zero_gradient_and_logging_pass(p, op):
    """Logging the outputs, detaching them, or a term with a zero weight changes nothing."""
    run, fields, _ = LOGITS_OPS[op]
    x = p["logits"].clone().requires_grad_()
    run(p, x).loss.backward()
    expected = x.grad.clone()
    x.grad = None
    out = run(p, x)
    logged = [getattr(out, f).mean().item() for f in fields]
    assert all(v == v for v in logged)
    (out.loss + 0.0 * getattr(out, fields[0]).sum()
     + getattr(out, fields[1]).detach().sum()).backward()
    assert torch.equal(x.grad, expected)


def test_entropy_term_two_supported_ways(p):
    """An entropy bonus through entropy_coef, or built from token_logprobs: same gradient."""
    coef = 0.3
    x = p["logits"].clone().requires_grad_()
    rlhf_fast.policy_loss(x, p["targets"], p["adv"], p["mask"], config="dapo",
                          entropy_coef=coef, backend="torch").loss.backward()
    y = p["logits"].clone().requires_grad_()
    out = rlhf_fast.policy_loss(y, p["targets"], p["adv"], p["mask"], config="dapo",
                                backend="torch")
    _, entropy = rlhf_fast.token_logprobs(y, p["targets"], return_entropy=True,
                                          backend="torch")
    w = aggregation_weights(p["mask"].float(), "token_mean")
    (out.loss - coef * (w * entropy).sum()).backward()
    assert_grad_close(y.grad, x.grad.double(), torch.float32)


def test_nll_term_two_supported_ways(p):
    """RPO's chosen NLL through nll_coef, or built from token_logprobs: same gradient."""
    coef = 0.5
    x = p["logits"].clone().requires_grad_()
    rlhf_fast.dpo_loss(x, p["targets"], p["mask"], ref_logprobs=p["lp"], nll_coef=coef,
                       backend="torch").loss.backward()
    y = p["logits"].clone().requires_grad_()
    out = rlhf_fast.dpo_loss(y, p["targets"], p["mask"], ref_logprobs=p["lp"], backend="torch")
    logp = rlhf_fast.token_logprobs(y, p["targets"], backend="torch")
    chosen = p["mask"][: B // 2].float()
    nll = -(logp[: B // 2] * chosen).sum() / chosen.sum()
    (out.loss + coef * nll).backward()
    assert_grad_close(y.grad, x.grad.double(), torch.float32)
