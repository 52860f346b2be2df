"""Hypothesis-drawn shapes, dtypes, temperatures and ignore masks, both backends vs float64."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_token_logprobs import check_against_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@st.composite
def problems(draw):
    batch = draw(st.integers(1, 3))
    seq_len = draw(st.integers(1, 6))
    n_cols = draw(st.one_of(st.integers(2, 300), st.integers(4000, 9000)))
    dtype = draw(st.sampled_from(DTYPES))
    scale = draw(st.sampled_from([0.1, 1.0, 4.0]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, seq_len + 1, n_cols, generator=g) * scale).to(dtype)
    if draw(st.booleans()):
        logits = logits[:, :-1]  # strided slice, read in place
    else:
        logits = logits[:, 1:].contiguous()
    targets = torch.randint(0, n_cols, (batch, seq_len), generator=g)
    ignore = torch.rand(batch, seq_len, generator=g) < draw(st.sampled_from([0.0, 0.3]))
    targets[ignore] = -100
    return dict(
        logits=logits,
        targets=targets,
        temperature=draw(st.sampled_from([0.5, 1.0, 1.3])),
        with_entropy=draw(st.booleans()),
        seed=seed,
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems())
def test_matches_reference_triton(problem):
    check_against_reference(backend="triton", **problem)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems())
def test_matches_reference_torch(problem):
    check_against_reference(backend="torch", **problem)


@st.composite
def preference_problems(draw):
    """Pairs of any count, lengths, vocabulary, dtype and loss hyper-parameters."""
    from preference_problems import make_pairs

    from rlhf_fast.preference_config import LOSS_TYPES, SMOOTHED_LOSSES

    loss_type = draw(st.sampled_from(LOSS_TYPES))
    kwargs = {"loss_type": loss_type, "beta": draw(st.sampled_from([0.05, 0.1, 0.5, 2.0]))}
    if loss_type in SMOOTHED_LOSSES:
        kwargs["label_smoothing"] = draw(st.sampled_from([0.0, 0.2]))
    if loss_type == "simpo":
        kwargs["gamma"] = draw(st.sampled_from([0.0, 0.5]))
    if loss_type not in ("simpo", "orpo"):
        kwargs["average_logprobs"] = draw(st.booleans())
    kwargs["nll_coef"] = draw(st.sampled_from([0.0, 0.3]))
    problem = make_pairs(pairs=draw(st.integers(1, 3)), seq_len=draw(st.integers(2, 6)),
                         n_cols=draw(st.integers(2, 300)),
                         dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])),
                         seed=draw(st.integers(0, 2**16)))
    return problem, kwargs, draw(st.sampled_from(["token", "sequence"]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=preference_problems())
def test_dpo_matches_reference(case):
    from preference_problems import check_dpo

    problem, kwargs, ref_layout = case
    check_dpo(problem, kwargs, "triton", ref_layout=ref_layout)
    check_dpo(problem, kwargs, "torch", ref_layout=ref_layout)
