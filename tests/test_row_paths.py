"""The row kernels' launch paths, on both sides of each switch, against the float64
reference: rows held in registers (V <= 8192) or streamed, rows peeled to a 16-byte boundary
(odd V, strided slices, gradients of another alignment, in place), rows shorter than one
16-byte vector, and the fused kernel's backward second sweep over long rows."""

import pytest
import torch
from numerics import assert_grad_close
from policy_problems import check_policy, make_problem, policy_inputs
from test_policy_paths import run
from test_token_logprobs import check_against_reference, make_logits, make_targets

import rlhf_fast
from rlhf_fast import PolicyLossConfig, reference
from rlhf_fast.ops.launch import ON_CHIP_MAX_COLUMNS, row_launch

CUT = ON_CHIP_MAX_COLUMNS


def test_cut_off_is_where_the_launches_switch():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert row_launch(CUT, dtype).on_chip
        assert not row_launch(CUT + 1, dtype).on_chip
        # The whole row fits the program's registers.
        launch = row_launch(CUT, dtype)
        assert launch.unroll * launch.threads * launch.vec >= CUT


@pytest.mark.parametrize("n_cols", [CUT, CUT + 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_policy_loss_both_sides_of_the_cut_off(device, dtype, n_cols):
    config = PolicyLossConfig.preset("grpo", entropy_coef=0.02)
    problem = make_problem(batch=2, seq_len=3, n_cols=n_cols, dtype=dtype, device=device,
                           spread=0.4, per_token_adv=True)
    check_policy(problem, config, "triton")


@pytest.mark.parametrize("n_cols", [CUT, CUT + 1])
def test_token_logprobs_both_sides_of_the_cut_off(device, n_cols):
    logits = make_logits((2, 3, n_cols), torch.bfloat16, device)
    check_against_reference(logits, make_targets((2, 3), n_cols, device), "triton")


@pytest.mark.parametrize("n_cols", [CUT - 5, CUT + 7])
def test_fused_and_two_pass_stay_bit_identical(device, monkeypatch, n_cols):
    """Log-probs and entropies of both policy_loss paths are the same bits on either side of
    the cut-off (the stats sweep runs the fused kernel's launch)."""
    problem = make_problem(batch=2, seq_len=3, n_cols=n_cols, dtype=torch.bfloat16,
                           device=device, spread=0.4, per_token_adv=True)
    config = PolicyLossConfig.preset("dapo", entropy_coef=0.01)
    fused, g_fused = run(problem, config, True, monkeypatch)
    split, g_split = run(problem, config, False, monkeypatch)
    assert torch.equal(fused.logprobs, split.logprobs)
    assert torch.equal(fused.entropy, split.entropy)
    assert_grad_close(g_fused, g_split.float(), torch.bfloat16)


def test_fused_second_read_over_many_trips(device):
    """The backward second read over a row of many tiles (the masked trip comes first)."""
    config = PolicyLossConfig.preset("grpo", entropy_coef=0.02)
    for dtype in (torch.float32, torch.bfloat16):
        problem = make_problem(batch=2, seq_len=2, n_cols=3 * CUT + 11, dtype=dtype,
                               device=device, spread=0.4, per_token_adv=True)
        check_policy(problem, config, "triton")


@pytest.mark.parametrize("n_cols", [1, 3, 7, 9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_shorter_than_a_vector(device, dtype, n_cols):
    """Fewer columns than one 16-byte vector (8 bf16, 4 fp32): only the peeled edges."""
    config = PolicyLossConfig.preset("ppo", entropy_coef=0.05)
    problem = make_problem(batch=2, seq_len=4, n_cols=n_cols, dtype=dtype, device=device,
                           spread=0.3, per_token_adv=True)
    check_policy(problem, config, "triton")
    logits = make_logits((3, 5, n_cols), dtype, device)
    check_against_reference(logits, make_targets((3, 5), n_cols, device), "triton")


@pytest.mark.parametrize("n_cols", [1001, CUT + 13])
def test_odd_vocab_strided_slice(device, n_cols):
    """logits[:, :-1] of an odd V: every row starts at a different offset modulo 8, and the
    gradient (contiguous) has another alignment than the logits; fused and two-pass paths."""
    full = make_logits((2, 4, n_cols), torch.bfloat16, device)
    logits = full[:, :-1]
    targets = make_targets((2, 3), n_cols, device)
    check_against_reference(logits, targets, "triton")
    mask = torch.ones(2, 3, dtype=torch.bool, device=device)
    adv = torch.tensor([0.7, -1.2], device=device)
    for config in (PolicyLossConfig.preset("grpo", kl_coef=0.0, entropy_coef=0.03),
                   PolicyLossConfig.preset("gspo")):
        x = logits.detach().clone().requires_grad_()
        out = rlhf_fast.policy_loss(x, targets, adv, mask, config=config, backend="triton")
        out.loss.backward()
        xr = logits.detach().double().requires_grad_()
        loss = reference.policy_loss(xr, targets, adv.double(), mask, config=config)[0]
        loss.backward()
        assert abs(out.loss.item() - loss.item()) <= 1e-5 * max(1.0, abs(loss.item()))
        assert_grad_close(x.grad, xr.grad, torch.bfloat16)


@pytest.mark.parametrize("n_cols", [997, CUT + 13])
def test_inplace_odd_vocab(device, n_cols):
    """The gradient written over the logits: each tile read before it is overwritten, the
    target's logit read before the sweep."""
    problem = make_problem(batch=2, seq_len=3, n_cols=n_cols, dtype=torch.float32,
                           device=device, spread=0.4, per_token_adv=True)
    config = PolicyLossConfig.preset("grpo", entropy_coef=0.02)
    _, expected, _ = check_policy(problem, config, "triton")
    leaf = problem["logits"].clone().requires_grad_()
    x = leaf.clone()  # a non-leaf, as a model's logits are: it may be overwritten
    rlhf_fast.policy_loss(x, problem["targets"], problem["advantages"],
                          problem["mask"], config=config, backend="triton", inplace=True,
                          **policy_inputs(problem, config)).loss.backward()
    assert_grad_close(x.detach(), expected, torch.float32)
    assert_grad_close(leaf.grad, expected, torch.float32)


@pytest.mark.parametrize("n_cols", [CUT - 3, CUT + 3])
def test_special_rows_on_both_paths(device, n_cols):
    """A dominant target, a dominant other token, banned (-inf) columns, a NaN row, a masked
    row: same outputs as the reference (NaN where the reference is NaN)."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, n_cols, generator=g, dtype=torch.float64) * 2
    targets = torch.tensor([3, 4, 5, 6, 7])
    others = logits.clone()
    others[0, 3] = float("-inf")
    logits[0, 3] = torch.logsumexp(others[0], -1) + 19.0          # p_y = 1 - 6e-9
    logits[1, 9] = torch.logsumexp(logits[1], -1) + 14.0          # another token dominates
    logits[2, ::3] = float("-inf")                                # banned columns
    logits[2, 5] = 1.0
    logits[3, n_cols // 2] = float("nan")
    mask = torch.tensor([[True, True, True, True, False]])
    x = logits.float().unsqueeze(0).to(device).requires_grad_()
    config = PolicyLossConfig.preset("grpo", kl_coef=0.0, entropy_coef=0.1)
    adv = torch.tensor([[1.0, -0.5, 0.8, 0.3, 2.0]], device=device)
    out = rlhf_fast.policy_loss(x, targets.unsqueeze(0).to(device), adv, mask.to(device),
                                config=config, backend="triton")
    xr = logits.unsqueeze(0).clone().requires_grad_()
    _, logp, ent, _ = reference.policy_loss(xr, targets.unsqueeze(0), adv.double().cpu(), mask,
                                            config=config)
    for name, actual, expected in (("logp", out.logprobs, logp), ("entropy", out.entropy, ent)):
        actual = actual.double().cpu()
        assert (actual[~mask] == 0).all(), f"{name} at the masked row"
        ok = torch.isfinite(expected) & mask
        bad = ~torch.isfinite(expected) & mask
        assert torch.isnan(actual[bad]).all(), name
        rel = (actual[ok] - expected[ok]).abs() / expected[ok].abs().clamp_min(1e-30)
        assert (rel <= 1e-5).all(), (name, rel)
    out.loss.backward()
    grad = x.grad[0].cpu()
    assert torch.isnan(grad[3]).any() and torch.isfinite(grad[[0, 1, 2]]).all()
    assert (grad[4] == 0).all() and (grad[2, ::3] == 0).all()
    # Rows without NaN against the reference gradient of the loss restricted to them.
    keep = [0, 1, 2]
    x2 = logits[keep].float().unsqueeze(0).to(device).requires_grad_()
    m2 = mask[:, keep]
    out2 = rlhf_fast.policy_loss(x2, targets[keep].unsqueeze(0).to(device), adv[:, keep],
                                 m2.to(device), config=config, backend="triton")
    out2.loss.backward()
    xr2 = logits[keep].unsqueeze(0).clone().requires_grad_()
    reference.policy_loss(xr2, targets[keep].unsqueeze(0), adv[:, keep].double().cpu(), m2,
                          config=config)[0].backward()
    for row in range(3):
        assert_grad_close(x2.grad[0, row], xr2.grad[0, row], torch.float32)
