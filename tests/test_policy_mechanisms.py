"""What each loss does to individual tokens, micro-batching, edge cases and bad input."""

import math

import pytest
import torch
from numerics import assert_grad_close
from policy_problems import check_policy, make_problem

import rlhf_fast
from rlhf_fast import PolicyLossConfig


def one_sequence(ratios, advantage, device, n_cols=50, seed=0):
    """One sequence whose token ratios pi/pi_old are exactly ``ratios``."""
    g = torch.Generator().manual_seed(seed)
    t = len(ratios)
    logits = (torch.randn(1, t, n_cols, generator=g) * 2).to(device)
    targets = torch.randint(0, n_cols, (1, t), generator=g).to(device)
    with torch.no_grad():
        logp = rlhf_fast.token_logprobs(logits, targets)
    old = logp - torch.log(torch.tensor(ratios, device=device)).unsqueeze(0)
    mask = torch.ones(1, t, dtype=torch.bool, device=device)
    adv = torch.tensor([advantage], device=device)
    return logits, targets, mask, adv, old


def row_grads(config, logits, targets, mask, adv, old, backend):
    x = logits.clone().requires_grad_()
    out = rlhf_fast.policy_loss(x, targets, adv, mask, old_logprobs=old, config=config,
                                backend=backend)
    out.loss.backward()
    return x.grad[0], out


def coefficient_grad(coefs, logits, targets, backend):
    """dL/dlogits when dL/dlogp = coefs (per token) and nothing else."""
    x = logits.clone().requires_grad_()
    logp = rlhf_fast.token_logprobs(x, targets, backend=backend)
    (logp * coefs).sum().backward()
    return x.grad[0]


RATIOS = [1.5, 1.0, 0.5, 1.1, 0.7]  # eps 0.2: clipped above, inside, below, inside, below


def test_ppo_clipped_tokens_get_zero_gradient(backend, device):
    data = one_sequence(RATIOS, advantage=1.0, device=device)
    grad, out = row_grads(PolicyLossConfig.preset("ppo"), *data, backend)
    assert (grad[0] == 0).all(), "A > 0, r > 1 + eps: clipped, no gradient"
    assert (grad[1] != 0).any() and (grad[2] != 0).any() and (grad[3] != 0).any()
    assert out.metrics["clip_frac_high"].item() == pytest.approx(1 / 5)
    data = one_sequence(RATIOS, advantage=-1.0, device=device)
    grad, out = row_grads(PolicyLossConfig.preset("ppo"), *data, backend)
    assert (grad[2] == 0).all() and (grad[4] == 0).all(), "A < 0, r < 1 - eps: clipped"
    assert (grad[0] != 0).any()
    assert out.metrics["clip_frac_low"].item() == pytest.approx(2 / 5)


def test_dual_clip_caps_negative_advantage(backend, device):
    data = one_sequence([4.0, 1.0, 2.5], advantage=-1.0, device=device)
    grad, out = row_grads(PolicyLossConfig(dual_clip_c=3.0), *data, backend)
    assert (grad[0] == 0).all() and (grad[2] != 0).any()
    # Token 0's loss is capped at -c * A = 3: the value counts 3, not r * |A| = 4.
    expected = (3.0 + 1.0 + 2.5) / 3
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert out.metrics["clip_frac_dual"].item() == pytest.approx(1 / 3)


def test_aepo_keeps_boundary_gradient_for_positive_advantages(backend, device):
    advantage, eps_high = 0.8, 0.2
    logits, targets, mask, adv, old = one_sequence(RATIOS, advantage, device)
    config = PolicyLossConfig.preset("aepo", entropy_advantage_alpha=None)
    grad, _ = row_grads(config, logits, targets, mask, adv, old, backend)
    # Clipped positive-advantage token: dL/dlogp = -(1 + eps_high) * A * w, w = 1/5.
    coefs = torch.zeros(1, 5, device=device)
    coefs[0, 0] = -(1 + eps_high) * advantage / 5
    expected = coefficient_grad(coefs, logits, targets, backend)
    assert_grad_close(grad[0], expected[0], torch.float32)
    assert (grad[0] != 0).any()


def test_cispo_keeps_gradient_on_clipped_tokens(backend, device):
    advantage = 1.0
    logits, targets, mask, adv, old = one_sequence(RATIOS, advantage, device)
    grad, out = row_grads(PolicyLossConfig.preset("cispo"), logits, targets, mask, adv, old,
                          backend)
    # Weight sg(min(r, 1 + 0.28)) = 1.28 on the r = 1.5 token: gradient kept.
    coefs = torch.zeros(1, 5, device=device)
    coefs[0, 0] = -1.28 * advantage / 5
    expected = coefficient_grad(coefs, logits, targets, backend)
    assert_grad_close(grad[0], expected[0], torch.float32)
    assert out.metrics["clip_frac_high"].item() == pytest.approx(1 / 5)


def test_gspo_token_equals_gspo_with_sequence_advantages(backend, device):
    problem = make_problem(device=device, spread=0.05)
    results = []
    for preset in ("gspo", "gspo_token"):
        config = PolicyLossConfig.preset(preset, clip_eps_low=0.02, clip_eps_high=0.03)
        x = problem["logits"].clone().requires_grad_()
        out = rlhf_fast.policy_loss(x, problem["targets"], problem["advantages"],
                                    problem["mask"], old_logprobs=problem["old_logprobs"],
                                    config=config, backend=backend)
        out.loss.backward()
        results.append((out.loss, x.grad))
    assert results[0][0].item() == pytest.approx(results[1][0].item(), rel=1e-6)
    assert_grad_close(results[1][1], results[0][1], torch.float32)


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean",
                                         "seq_mean_token_sum", "seq_mean_token_sum_norm"])
def test_normalizer_makes_micro_batches_exact(backend, device, aggregation):
    problem = make_problem(batch=4, seq_len=5, device=device, per_token_adv=True)
    mask = problem["mask"]
    global_count = {
        "token_mean": mask.sum().item(),
        "seq_mean_token_mean": (mask.sum(-1) > 0).sum().item(),
        "seq_mean_token_sum": (mask.sum(-1) > 0).sum().item(),
        "seq_mean_token_sum_norm": 4 * 5,
    }[aggregation]
    config = PolicyLossConfig(aggregation=aggregation, kl_coef=0.1, entropy_coef=0.01)
    kwargs = dict(old_logprobs=problem["old_logprobs"], ref_logprobs=problem["ref_logprobs"])

    x = problem["logits"].clone().requires_grad_()
    full = rlhf_fast.policy_loss(x, problem["targets"], problem["advantages"], mask,
                                 config=config, backend=backend, **kwargs)
    full.loss.backward()

    micro = config.replace(normalizer=float(global_count))
    total = 0.0
    grads = []
    for rows in (slice(0, 3), slice(3, 4)):
        xm = problem["logits"][rows].clone().requires_grad_()
        out = rlhf_fast.policy_loss(
            xm, problem["targets"][rows], problem["advantages"][rows], mask[rows],
            config=micro, backend=backend, **{k: v[rows] for k, v in kwargs.items()})
        out.loss.backward()
        total += out.loss.item()
        grads.append(xm.grad)
    assert total == pytest.approx(full.loss.item(), rel=1e-5)
    assert_grad_close(torch.cat(grads), x.grad, torch.float32)


@pytest.mark.parametrize("preset", ["grpo", "gspo", "gmpo", "sapo", "cispo", "aepo"])
def test_fully_masked_batch_is_zero_not_nan(backend, device, preset):
    problem = make_problem(device=device)
    problem["mask"] = torch.zeros_like(problem["mask"])
    out, grad, _ = check_policy(problem, PolicyLossConfig.preset(preset), backend)
    assert out.loss.item() == 0.0 and (grad == 0).all()
    assert out.metrics["token_count"].item() == 0
    assert all(torch.isfinite(v) for v in out.metrics.values())


def test_all_clipped_and_zero_advantages(backend, device):
    data = one_sequence([1.9, 1.6, 2.0], advantage=1.0, device=device)
    grad, out = row_grads(PolicyLossConfig.preset("ppo"), *data, backend)
    assert (grad == 0).all() and torch.isfinite(out.loss)
    assert out.metrics["clip_frac_high"].item() == 1.0
    problem = make_problem(device=device)
    problem["advantages"] = torch.zeros_like(problem["advantages"])
    for preset in ("ppo", "gspo", "gmpo", "sapo", "aepo"):
        out, grad, _ = check_policy(problem, PolicyLossConfig.preset(preset), backend)
        assert out.loss.item() == 0.0 and (grad == 0).all()


def test_on_policy_ppo_is_reinforce(backend, device):
    problem = make_problem(device=device)
    grads = []
    for config in (PolicyLossConfig.preset("ppo"), PolicyLossConfig.preset("reinforce")):
        x = problem["logits"].clone().requires_grad_()
        rlhf_fast.policy_loss(x, problem["targets"], problem["advantages"], problem["mask"],
                              config=config, backend=backend).loss.backward()
        grads.append(x.grad)
    assert_grad_close(grads[0], grads[1], torch.float32)


def expected_grad(problem, backend, config="dapo"):
    x = problem["logits"].clone().requires_grad_()
    rlhf_fast.policy_loss(x, problem["targets"], problem["advantages"], problem["mask"],
                          old_logprobs=problem["old_logprobs"], config=config,
                          backend=backend).loss.backward()
    return x.grad


def test_inplace_writes_gradient_over_logits(backend, device):
    problem = make_problem(dtype=torch.bfloat16, device=device)
    expected = expected_grad(problem, backend)
    leaf = problem["logits"].clone().requires_grad_()
    buffer = leaf.clone()  # logits computed from a leaf, as a model's are: a non-leaf
    out = rlhf_fast.policy_loss(buffer, problem["targets"], problem["advantages"],
                                problem["mask"], old_logprobs=problem["old_logprobs"],
                                config="dapo", backend=backend, inplace=True)
    assert torch.equal(buffer.detach(), expected), "after forward the logits hold dL/dlogits"
    out.loss.backward()
    assert torch.equal(leaf.grad, expected)


def test_inplace_through_a_strided_slice(backend, device):
    problem = make_problem(device=device)
    expected = expected_grad(problem, backend)
    leaf = torch.cat([problem["logits"], problem["logits"][:, :1]], dim=1).requires_grad_()
    full = leaf.clone()                                   # [B, T + 1, V], a non-leaf
    last = full[:, -1].detach().clone()
    logits = full[:, :-1]
    assert not logits.is_contiguous()
    out = rlhf_fast.policy_loss(logits, problem["targets"], problem["advantages"],
                                problem["mask"], old_logprobs=problem["old_logprobs"],
                                config="dapo", backend=backend, inplace=True)
    out.loss.backward()
    assert torch.equal(full[:, :-1].detach(), expected), \
        "gradient written through the slice's strides"
    assert torch.equal(full[:, -1].detach(), last), "the column outside the slice is untouched"
    assert torch.equal(leaf.grad[:, :-1], expected) and (leaf.grad[:, -1] == 0).all()


def test_grad_output_scaling_and_no_grad(backend, device):
    problem = make_problem(device=device)
    args = (problem["targets"], problem["advantages"], problem["mask"])
    expected = expected_grad(problem, backend)
    x3 = problem["logits"].clone().requires_grad_()
    out = rlhf_fast.policy_loss(x3, *args, old_logprobs=problem["old_logprobs"],
                                config="dapo", backend=backend)
    (3.0 * out.loss).backward()
    assert torch.allclose(x3.grad, 3.0 * expected, rtol=1e-6, atol=0)
    with torch.no_grad():
        out = rlhf_fast.policy_loss(problem["logits"].clone().requires_grad_(), *args,
                                    config="dapo", backend=backend)
    assert out.loss.grad_fn is None and math.isfinite(out.loss.item())


class TestBadInput:
    def setup_method(self):
        self.p = make_problem()
        self.args = (self.p["logits"], self.p["targets"], self.p["advantages"], self.p["mask"])

    def test_unknown_preset(self):
        with pytest.raises(ValueError, match="unknown preset 'ppo2'"):
            rlhf_fast.policy_loss(*self.args, config="ppo2")

    def test_unknown_field(self):
        with pytest.raises(TypeError, match=r"unknown PolicyLossConfig field\(s\) \['eps'\]"):
            rlhf_fast.policy_loss(*self.args, eps=0.2)
        with pytest.raises(TypeError, match="clip must be a ClipConfig or a mapping"):
            rlhf_fast.policy_loss(*self.args, clip=0.2)

    @pytest.mark.parametrize(("field", "value", "message"), [
        ("objective", "ppo", "objective must be one of"),
        ("clip_eps_high", -0.1, "clip_eps_high must lie in"),
        ("dual_clip_c", 0.5, "dual_clip_c must be None or > 1"),
        ("delta", 1.1, "delta must be None or > 1 \\+ clip_eps_high"),
        ("top_entropy_quantile", 0.0, "top_entropy_quantile must be None or in"),
        ("temperature", 0.0, "temperature must be a finite number > 0"),
        ("aggregation", "mean", "aggregation must be one of"),
    ])
    def test_bad_field_values(self, field, value, message):
        with pytest.raises(ValueError, match=message):
            PolicyLossConfig(**{field: value})

    def test_gmpo_needs_sequence_level(self):
        with pytest.raises(ValueError, match=r"gmpo.*ratio_level='sequence'"):
            PolicyLossConfig(objective="gmpo")

    def test_advantages_wrong_size(self):
        with pytest.raises(ValueError, match=r"advantages must have shape \(3,\) or \(3, 6\)"):
            rlhf_fast.policy_loss(*self.args[:2], torch.zeros(4), self.args[3])

    def test_mask_shape(self):
        with pytest.raises(ValueError, match=r"mask must have shape \(3, 6\)"):
            rlhf_fast.policy_loss(*self.args[:3], torch.ones(3, 5, dtype=torch.bool))

    def test_old_logprobs_shape(self):
        with pytest.raises(ValueError, match=r"old_logprobs must have shape \(3, 6\)"):
            rlhf_fast.policy_loss(*self.args, old_logprobs=torch.zeros(3, 7))

    def test_targets_shape(self):
        with pytest.raises(ValueError, match=r"targets must have shape \(3, 6\)"):
            rlhf_fast.policy_loss(self.args[0], torch.zeros(3, 5, dtype=torch.long),
                                  *self.args[2:])

    def test_rollout_correction_needs_rollout_logprobs(self):
        with pytest.raises(ValueError, match="needs rollout_logprobs"):
            rlhf_fast.policy_loss(*self.args, rollout_correction="token_truncate")

    def test_kl_needs_ref(self):
        with pytest.raises(ValueError, match="needs ref_logprobs"):
            rlhf_fast.policy_loss(*self.args, config="grpo")

    def test_inplace_needs_contiguous_vocab(self):
        logits = self.p["logits"].transpose(0, 2).contiguous().transpose(0, 2)
        assert logits.stride(-1) != 1
        with pytest.raises(ValueError, match=r"inplace=True .* contiguous last dimension"):
            rlhf_fast.policy_loss(logits, *self.args[1:], config="dapo", inplace=True)

    def test_config_type(self):
        with pytest.raises(TypeError, match="config must be a preset name"):
            rlhf_fast.policy_loss(*self.args, config=3)
