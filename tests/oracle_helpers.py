"""Checks that a test problem can tell a right formula from a wrong one."""

import torch

import rlhf_fast


def assert_all_quadrants(p, low=0.7, high=1.3):
    """Valid tokens with A > 0 and with A < 0, each with a ratio above ``high`` and below
    ``low``: every clip bound binds somewhere, so a missing, misplaced or mis-signed bound
    changes the loss or the gradient."""
    logp = rlhf_fast.token_logprobs(p["logits"], p["targets"])
    ratio = torch.exp(logp.cpu() - p["old_logprobs"].cpu())
    adv, valid = p["advantages"].cpu(), p["mask"].cpu()
    adv = adv.unsqueeze(-1).expand_as(ratio) if adv.dim() == 1 else adv
    for sign in (1, -1):
        assert (valid & (sign * adv > 0) & (ratio > high)).any()
        assert (valid & (sign * adv > 0) & (ratio < low)).any()
