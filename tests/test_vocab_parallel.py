"""Vocabulary-parallel ops on the CPU: real gloo process groups of 2 and 4 ranks (one
``torch.multiprocessing.spawn`` of four processes for the whole module; the 2-rank cases run on
the groups {0, 1} and {2, 3}), uneven slices (V = 11), both backends. Each rank's loss,
per-token outputs and metrics equal the single-process full-vocabulary result, its gradient
equals its slice of the full gradient, the special rows (dominant target, banned slice and
banned target, NaN logit, ignored row, out-of-range targets) behave as without sharding, and
the bytes every collective sends are exactly the documented ones. The rank-side code is
``vocab_parallel_cases.py``."""

import socket

import pytest
import torch
import torch.multiprocessing as mp
import vocab_parallel_cases as cases
from numerics import GRAD_RTOL, VALUE_TOL, rel_err

from rlhf_fast.ops import vocab_parallel

WORLD = 4
BACKENDS = ("torch", "triton")
LAYOUTS = [(backend, world, rank) for backend in BACKENDS for world in (2, 4)
           for rank in range(world)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("vocab_parallel")
    mp.spawn(cases.worker, args=(WORLD, free_port(), str(out), list(BACKENDS)), nprocs=WORLD,
             join=True)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    # Rank r of a 2-rank group: processes r and r + 2 both ran it; take process r.
    return {(backend, world, rank): ranks[rank][(backend, world)]
            for backend, world, rank in LAYOUTS}


def assert_same(actual, expected, tol, name):
    """Same shape, same NaN and +-inf positions, finite values within ``tol`` (absolute for
    values, relative norm-wise for gradients)."""
    assert actual.shape == expected.shape, name
    assert torch.equal(actual.isnan(), expected.isnan()), f"{name}: NaN positions differ"
    assert torch.equal(actual.isinf(), expected.isinf()), f"{name}: inf positions differ"
    assert torch.equal(actual[actual.isinf()], expected[expected.isinf()]), name
    finite = actual.isfinite()
    a, e = actual[finite].double(), expected[finite].double()
    if tol == "grad":
        assert rel_err(a, e) <= GRAD_RTOL[actual.dtype], (name, rel_err(a, e))
    else:
        assert (a - e).abs().max().item() <= tol if a.numel() else True, \
            (name, (a - e).abs().max().item())


VALUE_CASES = ["token_logprobs_float32", "token_logprobs_bfloat16",
               "token_logprobs_no_entropy_given_offset", "out_of_range_unchecked",
               "token_logprobs_ignore_index_0", "policy_ppo_kl_entropy", "policy_gspo",
               "policy_inplace", "dpo_sigmoid_nll", "dpo_wpo_prompt_nll",
               "linear_token_logprobs", "linear_policy_loss", "linear_dpo_simpo",
               "packed_linear_policy_gspo", "packed_policy_dapo", "packed_linear_dpo_simpo"]


@pytest.mark.parametrize("case", VALUE_CASES)
def test_sharded_equals_full_vocabulary(results, case):
    """Values (loss, per-token outputs, metrics) equal the full-vocabulary ones on every
    rank, and each rank's gradient is its slice of the full gradient."""
    layouts = [layout for layout in LAYOUTS if case in results[layout]]
    assert len(layouts) == (12 if case in cases.TRITON_CASES else 6)
    for layout in layouts:
        record = results[layout][case]
        for name, (actual, expected) in record["values"].items():
            assert_same(actual, expected, VALUE_TOL, f"{layout} {case} {name}")
        for name, (actual, expected) in record["grads"].items():
            assert actual is not None, f"{layout} {case}: no gradient for {name}"
            assert_same(actual, expected, "grad", f"{layout} {case} grad {name}")


def test_special_rows_are_exact(results):
    """The dominant target has logp exactly 0 and zero gradient on every slice; the banned
    target has logp -inf; the NaN row is NaN on every rank (also in the gradient, also on the
    slices without the NaN); the ignored row is 0 with zero gradient."""
    for layout in LAYOUTS:
        record = results[layout]["token_logprobs_float32"]
        logp, entropy = record["values"]["logp"][0], record["values"]["entropy"][0]
        grad = record["grads"]["logits"][0]
        assert logp[0, 0] == 0 and entropy[0, 0] == 0 and (grad[0, 0] == 0).all(), layout
        assert logp[1, 1] == float("-inf"), layout
        assert logp[1, 2].isnan() and entropy[1, 2].isnan() and grad[1, 2].isnan().all()
        assert logp[1, 3] == 0 and entropy[1, 3] == 0 and (grad[1, 3] == 0).all(), layout
        assert torch.isfinite(logp[0, 1]) and torch.isfinite(entropy[0, 1]), layout


def test_out_of_range_target_raises_on_every_rank(results):
    for layout in [layout for layout in LAYOUTS if layout[0] == "torch"]:
        error = results[layout]["out_of_range_error"]["error"]
        assert error is not None and "targets must lie in [0, V)" in error, layout
    nan_rows = results[("torch", 2, 0)]["out_of_range_unchecked"]["values"]["logp"][0]
    assert nan_rows[1, 0].isnan() and nan_rows[1, 4].isnan()


def test_slice_layout_is_gathered_once(results):
    """(offset, widest slice) from one all-gather of 8 bytes, then from the cache."""
    for backend, world, rank in LAYOUTS:
        widths = cases.widths(world)
        first = results[(backend, world, rank)]["layout_first_call"]
        second = results[(backend, world, rank)]["layout_second_call"]
        assert first["layout"] == second["layout"] == (sum(widths[:rank]), max(widths))
        assert first["calls"] == ([("all_gather", 8)] if backend == BACKENDS[0] else [])
        assert second["calls"] == []


BYTE_CASES = ["token_logprobs_float32", "token_logprobs_bfloat16",
              "token_logprobs_no_entropy_given_offset", "policy_ppo_kl_entropy",
              "policy_gspo", "dpo_sigmoid_nll"]


@pytest.mark.parametrize("case", BYTE_CASES)
def test_bytes_per_row(results, case):
    """The forward sends one MAX all-reduce of 4 bytes a row and one SUM all-reduce of 16
    (20 with the entropy) bytes a row, whatever V, P or the dtype; the backward nothing.
    The offset gather happened once per (group, width), before these calls."""
    for layout in [layout for layout in LAYOUTS if case in results[layout]]:
        record = results[layout][case]
        rows = record["rows"]
        sums = 4 * (4 + record["with_entropy"])
        assert record["forward"] == [("all_reduce", 4 * rows), ("all_reduce", sums * rows)], \
            (layout, record["forward"])
        assert sum(size for _, size in record["forward"]) == \
            vocab_parallel.bytes_per_row(record["with_entropy"]) * rows
        assert record.get("backward", []) == [], layout


def test_bytes_per_row_with_wpo_weights(results):
    """WPO's sum of p^2 adds one float32 a row to the SUM all-reduce."""
    for layout in [layout for layout in LAYOUTS if layout[0] == "torch"]:
        record = results[layout]["dpo_wpo_prompt_nll"]
        rows = record["rows"]
        assert record["forward"] == [("all_reduce", 4 * rows), ("all_reduce", 20 * rows)]
        assert sum(size for _, size in record["forward"]) == \
            vocab_parallel.bytes_per_row(False, with_sum_sq=True) * rows


@pytest.mark.parametrize("case", ["linear_token_logprobs", "linear_policy_loss",
                                  "linear_dpo_simpo"])
def test_linear_bytes(results, case):
    """Fused-linear ops: the row statistics as above, per chunk (O(N) in all), plus one
    all-reduce of dL/dhidden ``[B, T, H]``; ``linear_token_logprobs`` sends only that one in
    its backward, the others in their forward (they write gradients there)."""
    for layout in [layout for layout in LAYOUTS if layout[0] == "torch"]:
        record = results[layout][case]
        stats = [c for c in record["forward"] if c[1] != record["hidden_bytes"]]
        assert sum(size for _, size in stats) == \
            vocab_parallel.bytes_per_row(record["with_entropy"]) * record["rows"], layout
        assert all(name == "all_reduce" for name, _ in record["forward"])
        hidden = record["backward"] if "backward" in record else record["forward"]
        assert [c for c in hidden if c[1] == record["hidden_bytes"]] == \
            [("all_reduce", record["hidden_bytes"])], layout


def test_argument_errors():
    """Checked before any data is read or any collective runs (no process group needed)."""
    from rlhf_fast import policy_loss, token_logprobs

    logits, targets = torch.randn(2, 3, 5), torch.randint(0, 5, (2, 3))
    with pytest.raises(ValueError, match=r"vocab_offset .* needs process_group"):
        token_logprobs(logits, targets, vocab_offset=3)
    with pytest.raises(TypeError, match=r"process_group must be a torch\.distributed"):
        token_logprobs(logits, targets, process_group="tp")
    with pytest.raises(TypeError, match=r"process_group must be a torch\.distributed"):
        policy_loss(logits, targets, torch.ones(2), torch.ones(2, 3, dtype=torch.bool),
                    config="dapo", process_group=0)
