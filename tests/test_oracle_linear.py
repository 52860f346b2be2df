"""Fused-linear chunk normalisers with empty sequences: each chunk sees part of the batch,
so the token and sequence counts must be the whole batch's non-empty ones (an empty
sequence, first or in the middle, counts for nothing), for every aggregation and GMPO."""

import pytest
import torch
from numerics import assert_grad_close
from preference_problems import loss_kwargs
from test_linear import problem, run_linear, run_reference
from test_linear_dpo import compare, pair_problem, run_ours
from test_linear_dpo import run_reference as run_dpo_reference

from rlhf_fast import PolicyLossConfig

CONFIGS = {
    "token_mean": PolicyLossConfig.preset("dapo"),
    "seq_mean_token_mean": PolicyLossConfig.preset("grpo", kl_coef=0.2),
    "seq_mean_token_sum": PolicyLossConfig(aggregation="seq_mean_token_sum"),
    "token_sum_norm": PolicyLossConfig.preset("dr_grpo"),
    "token_sum_norm_max_length": PolicyLossConfig.preset("dr_grpo", max_length=7),
    "gmpo": PolicyLossConfig.preset("gmpo"),
    "gmpo_token_sum": PolicyLossConfig.preset("gmpo", aggregation="seq_mean_token_sum"),
    "aepo": PolicyLossConfig.preset("aepo", entropy_advantage_alpha=1.0),
    "top_entropy": PolicyLossConfig.preset("dapo", top_entropy_quantile=0.4),
}


@pytest.mark.parametrize("chunk_size", [1, 2])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_empty_sequences_across_chunks(name, chunk_size):
    p = problem(batch=5, seq_len=4, seed=3)
    p["mask"][0] = False   # the first chunk holds only an empty sequence
    p["mask"][2] = False   # and one in the middle
    config = CONFIGS[name]
    out, grads = run_linear(p, config, "torch", chunk_size=chunk_size)
    loss, ref_grads, _ = run_reference(p, config)
    assert out.loss.item() == pytest.approx(loss.item(), rel=1e-5, abs=1e-7)
    for got, expected in zip(grads, ref_grads, strict=True):
        assert_grad_close(got, expected, torch.float32)


@pytest.mark.parametrize("chunking", [dict(chunk_size=1), dict(chunk_tokens=3)])
def test_gmpo_with_token_mean(chunking):
    """GMPO's loss is per sequence whatever the aggregation field says (the reference ignores
    it): the fused-linear op, which once refused a token aggregation with GMPO, now takes the
    sequence count from the whole batch and equals the reference, with chunks of whole
    sequences and with token chunks that cut them (the pre-pass)."""
    p = problem(batch=3, seq_len=4, seed=2)
    p["mask"][1] = False
    config = PolicyLossConfig.preset("gmpo", aggregation="token_mean")
    out, grads = run_linear(p, config, "torch", **chunking)
    loss, ref_grads, _ = run_reference(p, config)
    assert out.loss.item() == pytest.approx(loss.item(), rel=1e-5, abs=1e-7)
    for got, expected in zip(grads, ref_grads, strict=True):
        assert_grad_close(got, expected, torch.float32)


@pytest.mark.parametrize("loss_type", ["sigmoid", "orpo", "simpo", "ipo"])
def test_linear_dpo_empty_sequences_across_chunks(loss_type):
    # Pair 0's chosen and pair 1's rejected sequences are empty; chunks of one pair each
    # must still use the whole batch's pair count and chosen-token count.
    p = pair_problem(pairs=3, seed=5)
    p["mask"][0] = False
    p["mask"][4] = False
    kwargs = {**loss_kwargs(loss_type), "nll_coef": 0.25}
    out, grads = run_ours(p, kwargs, "torch", chunk_size=1)
    compare(out, grads, run_dpo_reference(p, kwargs), torch.float32)
