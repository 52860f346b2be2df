"""The stats and gradient sweeps on one small batch of rows that visits every branch at once:
two blocks and a ragged tail, a dominant target, a dominant other token tied with a second
maximum, banned (-inf) tokens, a row where all but the target are banned, the maximum in the
tail block, a temperature. Values and gradients of both outputs against the reference."""

import torch
from test_token_logprobs import check_against_reference

from rlhf_fast.ops.launch import ON_CHIP_MAX_COLUMNS

BLOCK = ON_CHIP_MAX_COLUMNS
"""Just above it the rows stream (the on-chip path holds at most this many columns)."""
V = BLOCK + 37


def rows():
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(7, V, generator=g) * 3
    targets = torch.randint(0, V, (7,), generator=g)
    targets[1], targets[2], targets[3] = 5, V - 3, 40
    logits[1, 5] += 40.0                      # the target dominates
    logits[2, 9] = logits[2, 10] = 45.0       # two other tokens tie for the maximum
    logits[3, 100:3000] = float("-inf")       # banned tokens across the block boundary
    logits[4] = float("-inf")                 # all but the target banned
    logits[4, targets[4]] = 0.5
    logits[5, V - 1] += 30.0                  # the maximum sits in the ragged tail
    logits[6, :BLOCK] -= 20.0                 # the bulk far below the tail
    return logits, targets


def test_every_branch_in_one_batch(device, backend):
    logits, targets = rows()
    for temperature in (1.0, 0.7):
        check_against_reference(logits.to(device), targets.to(device), backend,
                                temperature=temperature)


def test_banned_target_has_minus_inf_logp_and_a_finite_entropy(device, backend):
    import rlhf_fast
    from rlhf_fast import reference

    logits, targets = rows()
    logits[:, 7] = float("-inf")
    targets[:] = 7
    x = logits.clone().to(device).requires_grad_()
    logp, ent = rlhf_fast.token_logprobs(x, targets.to(device), return_entropy=True,
                                         backend=backend)
    xr = logits.detach().double().requires_grad_()
    _, ref_ent = reference.token_logprobs(xr, targets, return_entropy=True)
    assert (logp == float("-inf")).all()
    assert torch.allclose(ent.double().cpu(), ref_ent.detach(), rtol=1e-5, atol=1e-5)
    g = torch.linspace(-1, 1, 7)
    (ent * g.to(device)).sum().backward()
    (ref_ent * g.double()).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert torch.allclose(x.grad.double().cpu(), xr.grad, rtol=1e-4, atol=1e-6)


def test_sum_of_squared_probabilities_in_the_same_sweep(device, backend):
    # WPO's ln sum_v p_v^2 from the stats sweep's WITH_SUM_SQ variant, streaming (rows()) and
    # on chip (its first 300 columns), against the float64 formula
    # logsumexp(2 z) - 2 logsumexp(z) with z = x / temperature.
    from numerics import assert_values_close

    from rlhf_fast.ops.row_sweeps import stats_sweep

    logits, targets = rows()
    short, short_targets = logits[:, :300].clone(), targets.clamp(max=299)
    short[4, 7], short_targets[4] = 0.5, 7    # row 4 keeps its one finite logit
    for x, y in ((logits, targets), (short, short_targets)):
        for temperature in (1.0, 0.7):
            z = x.double() / temperature
            expected = torch.logsumexp(2 * z, -1) - 2 * torch.logsumexp(z, -1)
            got = torch.empty(1, x.shape[0], device=device)
            stats_sweep(x[None].to(device), y[None].to(device), temperature, -100, True,
                        backend, log_sum_sq=got)
            assert_values_close(got[0].cpu(), expected, torch.float32, "log_sum_sq")


def test_row_of_only_minus_inf_gives_nan(device, backend):
    # No finite logit: log p_y and the entropy are NaN, as torch.log_softmax gives (not -inf:
    # a row without a finite maximum takes the plain s - 1 = -1 branch, log1p(-1) = -inf).
    import rlhf_fast

    for n_cols in (300, V):
        x = torch.randn(2, n_cols, generator=torch.Generator().manual_seed(3))
        x[1] = float("-inf")
        targets = torch.tensor([[3, 5]], device=device)
        logp, ent = rlhf_fast.token_logprobs(x[None].to(device), targets, return_entropy=True,
                                             backend=backend)
        assert torch.isnan(torch.log_softmax(x[1].double(), -1)[5])
        assert torch.isnan(logp[0, 1]) and torch.isnan(ent[0, 1])
        assert torch.isfinite(logp[0, 0]) and torch.isfinite(ent[0, 0])
