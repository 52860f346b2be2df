"""What each rank of the vocabulary-parallel tests runs (``torch.multiprocessing.spawn``, gloo,
four processes, one thread each): every case on the 4-rank world group and on two 2-rank
groups ({0, 1} and {2, 3}), with uneven vocabulary slices. Each rank computes the sharded
result on its slice and the single-process full-vocabulary result of the same inputs, counts
the bytes every collective sends, and saves both for ``test_vocab_parallel.py`` to compare.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import torch.distributed as dist

V = 11
"""Vocabulary: 6 + 5 columns on two ranks, 3 + 3 + 3 + 2 on four."""

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast",
               "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single",
               "send", "recv", "reduce", "gather", "scatter")
"""Every point-to-point and collective call of ``torch.distributed`` a case could make."""


class Traffic:
    """Bytes each collective call sends from this rank, by kind, while ``counting``."""

    def __init__(self):
        self.calls: list[tuple[str, int]] = []

    @contextmanager
    def counting(self):
        self.calls = []
        originals = {name: getattr(dist, name) for name in COLLECTIVES}

        def wrap(name, fn):
            def counted(*args, **kwargs):
                tensors = [a for a in args if isinstance(a, torch.Tensor)]
                lists = [a for a in args if isinstance(a, list)]
                if name == "all_gather" and lists:     # output list first, then the input
                    tensors = tensors[-1:]
                size = sum(t.numel() * t.element_size() for t in tensors)
                self.calls.append((name, size))
                return fn(*args, **kwargs)
            return counted

        for name, fn in originals.items():
            setattr(dist, name, wrap(name, fn))
        try:
            yield self
        finally:
            for name, fn in originals.items():
                setattr(dist, name, fn)


def widths(world: int) -> list[int]:
    return [V // world + (1 if r < V % world else 0) for r in range(world)]


def special_logits(batch: int, seq_len: int, dtype: torch.dtype, seed: int) -> tuple:
    """Logits ``[B, T, V]`` with the rows the exactness contract names, and their targets:
    (0, 0) a dominant target (p_y rounds to 1), (0, 1) columns 0-5 banned (-inf: whole
    slices on both layouts), (1, 1) a banned target, (1, 2) a NaN logit, (1, 3) ignored."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, seq_len, V, generator=g) * 2
    targets = torch.randint(0, V, (batch, seq_len), generator=g)
    logits[0, 0, 4] = 1e4
    targets[0, 0] = 4
    logits[0, 1, :6] = float("-inf")
    targets[0, 1] = 8
    logits[1, 1, 9] = float("-inf")
    targets[1, 1] = 9
    logits[1, 2, 7] = float("nan")
    targets[1, 3] = -100
    return logits.to(dtype), targets


def policy_inputs(batch: int, seq_len: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, seq_len, generator=g) > 0.2
    mask[:, 0] = True
    return dict(advantages=torch.randn(batch, generator=g), mask=mask,
                old_logprobs=-torch.rand(batch, seq_len, generator=g) * 3,
                ref_logprobs=-torch.rand(batch, seq_len, generator=g) * 3)


TRITON_CASES = ("token_logprobs_float32", "policy_ppo_kl_entropy")
"""The cases also run on the Triton backend (its kernels run in the interpreter, about half a
second a launch): the special rows, and the two-sweep path of the policy losses. The other
ops reach the same sweeps."""


def run_cases(group, rank: int, world: int, traffic: Traffic, backend: str) -> dict:
    """The cases of ``backend`` on ``group`` (``world`` ranks, this one ``rank`` in it):
    {case: record}."""
    from rlhf_fast import (
        dpo_loss,
        linear_dpo_loss,
        linear_policy_loss,
        linear_token_logprobs,
        policy_loss,
        token_logprobs,
    )

    off = sum(widths(world)[:rank])
    cols = slice(off, off + widths(world)[rank])
    out = {}

    def wanted(case: str) -> bool:
        return backend == "torch" or case in TRITON_CASES

    def sharded(x):
        return x[..., cols].clone().requires_grad_()

    # The slice layout: gathered at the first call, cached for the later ones.
    from rlhf_fast.ops.vocab_parallel import slice_layout
    for name in ("layout_first_call", "layout_second_call"):
        with traffic.counting():
            layout = slice_layout(group, widths(world)[rank], torch.device("cpu"))
        out[name] = dict(calls=list(traffic.calls), layout=layout)

    # token_logprobs, every special row, float32 and bfloat16, forward and backward apart.
    for dtype in (torch.float32, torch.bfloat16):
        if not wanted(f"token_logprobs_{str(dtype)[6:]}"):
            continue
        logits, targets = special_logits(2, 5, dtype, seed=1)
        g = torch.Generator().manual_seed(2)
        g_logp, g_ent = torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g)
        full = logits.clone().requires_grad_()
        lp, ent = token_logprobs(full, targets, temperature=0.7, return_entropy=True,
                                 backend=backend)
        torch.autograd.backward([lp, ent], [g_logp, g_ent])
        part = sharded(logits)
        with traffic.counting():
            lp_s, ent_s = token_logprobs(part, targets, temperature=0.7, return_entropy=True,
                                         backend=backend, process_group=group)
        forward = list(traffic.calls)
        with traffic.counting():
            torch.autograd.backward([lp_s, ent_s], [g_logp, g_ent])
        out[f"token_logprobs_{str(dtype)[6:]}"] = dict(
            values={"logp": (lp_s, lp), "entropy": (ent_s, ent)},
            grads={"logits": (part.grad, full.grad[..., cols])},
            forward=forward, backward=list(traffic.calls), rows=10, with_entropy=True,
            dtype=dtype)

    # policy_loss: token-level PPO clip with KL and entropy; sequence-level ratio (GSPO).
    logits = torch.randn(3, 6, V, generator=torch.Generator().manual_seed(5)) * 2
    targets = torch.randint(0, V, (3, 6), generator=torch.Generator().manual_seed(6))
    logits[0, 0, targets[0, 0]] = 1e4
    logits[1, 1, :6] = float("-inf")
    targets[1, 1] = 9
    side = policy_inputs(3, 6, seed=7)
    for name, kwargs in (("policy_ppo_kl_entropy", dict(config="grpo", entropy_coef=0.01,
                                                        loss_scale=0.5)),
                         ("policy_gspo", dict(config="gspo", kl_coef=0.0,
                                              ref_logprobs=None))):
        if not wanted(name):
            continue
        args = {**side, **kwargs}
        full = logits.clone().requires_grad_()
        ref = policy_loss(full, targets, backend=backend, **args)
        ref.loss.backward()
        part = sharded(logits)
        with traffic.counting():
            res = policy_loss(part, targets, backend=backend, process_group=group, **args)
        forward = list(traffic.calls)
        with traffic.counting():
            res.loss.backward()
        out[name] = dict(
            values={"loss": (res.loss, ref.loss), "logprobs": (res.logprobs, ref.logprobs),
                    "entropy": (res.entropy, ref.entropy),
                    **{f"metrics.{k}": (v, ref.metrics[k]) for k, v in res.metrics.items()}},
            grads={"logits": (part.grad, full.grad[..., cols])},
            forward=forward, backward=list(traffic.calls), rows=18, with_entropy=True,
            dtype=torch.float32)

    if backend != "torch":
        return out

    # no entropy: one float fewer; the offset given instead of gathered.
    logits, targets = special_logits(2, 5, torch.float32, seed=3)
    full = logits.clone().requires_grad_()
    lp = token_logprobs(full, targets, backend=backend)
    lp.backward(torch.ones_like(lp))
    part = sharded(logits)
    with traffic.counting():
        lp_s = token_logprobs(part, targets, backend=backend, process_group=group,
                              vocab_offset=off)
    forward = list(traffic.calls)
    lp_s.backward(torch.ones_like(lp_s))
    out["token_logprobs_no_entropy_given_offset"] = dict(
        values={"logp": (lp_s, lp)}, grads={"logits": (part.grad, full.grad[..., cols])},
        forward=forward, rows=10, with_entropy=False, dtype=torch.float32)

    # ignore_index=0 while targets sit on the first column of a slice (local column 0).
    logits, targets = special_logits(2, 5, torch.float32, seed=13)
    targets[1, 3] = 0
    targets[0, 2], targets[0, 3] = 6, 3
    full = logits.clone().requires_grad_()
    lp, ent = token_logprobs(full, targets, ignore_index=0, return_entropy=True,
                             backend=backend)
    (lp.nan_to_num() + ent.nan_to_num()).sum().backward()
    part = sharded(logits)
    lp_s, ent_s = token_logprobs(part, targets, ignore_index=0, return_entropy=True,
                                 backend=backend, process_group=group)
    (lp_s.nan_to_num() + ent_s.nan_to_num()).sum().backward()
    out["token_logprobs_ignore_index_0"] = dict(
        values={"logp": (lp_s, lp), "entropy": (ent_s, ent)},
        grads={"logits": (part.grad, full.grad[..., cols])})

    # policy_loss writing its gradient over the (non-leaf) logits slice.
    logits = torch.randn(3, 6, V, generator=torch.Generator().manual_seed(14))
    targets = torch.randint(0, V, (3, 6), generator=torch.Generator().manual_seed(15))
    side = policy_inputs(3, 6, seed=16)
    full = logits.clone().requires_grad_()
    ref = policy_loss(full, targets, backend=backend, config="ppo", **side)
    ref.loss.backward()
    part = sharded(logits)
    res = policy_loss(part * 1.0, targets, backend=backend, config="ppo", inplace=True,
                      process_group=group, **side)
    res.loss.backward()
    out["policy_inplace"] = dict(
        values={"loss": (res.loss, ref.loss), "logprobs": (res.logprobs, ref.logprobs)},
        grads={"logits": (part.grad, full.grad[..., cols])})

    # Out-of-range targets: an error on every rank; with the check off, NaN rows.
    logits, targets = special_logits(2, 5, torch.float32, seed=4)
    targets[1, 0] = V
    try:
        token_logprobs(logits[..., cols], targets, backend=backend, process_group=group)
        out["out_of_range_error"] = dict(error=None)
    except ValueError as e:
        out["out_of_range_error"] = dict(error=str(e))
    os.environ["RLHF_FAST_CHECK_TARGETS"] = "0"
    try:
        targets[1, 4] = -3
        lp = token_logprobs(logits, targets, backend=backend)
        lp_s = token_logprobs(logits[..., cols], targets, backend=backend,
                              process_group=group)
    finally:
        del os.environ["RLHF_FAST_CHECK_TARGETS"]
    out["out_of_range_unchecked"] = dict(values={"logp": (lp_s, lp)}, grads={})

    # dpo_loss with per-token reference log-probs.
    logits = torch.randn(4, 5, V, generator=torch.Generator().manual_seed(8)) * 2
    targets = torch.randint(0, V, (4, 5), generator=torch.Generator().manual_seed(9))
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[:, 0] = False
    ref_lp = -torch.rand(4, 5, generator=torch.Generator().manual_seed(10)) * 3
    full = logits.clone().requires_grad_()
    ref = dpo_loss(full, targets, mask, ref_logprobs=ref_lp, backend=backend, nll_coef=0.3)
    ref.loss.backward()
    part = sharded(logits)
    with traffic.counting():
        res = dpo_loss(part, targets, mask, ref_logprobs=ref_lp, backend=backend, nll_coef=0.3,
                       process_group=group)
    forward = list(traffic.calls)
    res.loss.backward()
    out["dpo_sigmoid_nll"] = dict(
        values={"loss": (res.loss, ref.loss), "chosen": (res.chosen_logprobs,
                                                         ref.chosen_logprobs),
                "rejected": (res.rejected_logprobs, ref.rejected_logprobs),
                **{f"metrics.{k}": (v, ref.metrics[k]) for k, v in res.metrics.items()}},
        grads={"logits": (part.grad, full.grad[..., cols])},
        forward=forward, rows=20, with_entropy=False, dtype=torch.float32)

    # WPO's weights (the slices' sums of p^2 combined) and an NLL over the prompts too.
    nll_mask = torch.ones(4, 5, dtype=torch.bool)
    kwargs = dict(ref_logprobs=ref_lp, backend=backend, nll_coef=0.3, use_weighting=True,
                  nll_mask=nll_mask)
    full = logits.clone().requires_grad_()
    ref = dpo_loss(full, targets, mask, **kwargs)
    ref.loss.backward()
    part = sharded(logits)
    with traffic.counting():
        res = dpo_loss(part, targets, mask, process_group=group, **kwargs)
    forward = list(traffic.calls)
    res.loss.backward()
    out["dpo_wpo_prompt_nll"] = dict(
        values={"loss": (res.loss, ref.loss),
                **{f"metrics.{k}": (v, ref.metrics[k]) for k, v in res.metrics.items()}},
        grads={"logits": (part.grad, full.grad[..., cols])},
        forward=forward, rows=20, with_entropy=False, dtype=torch.float32)

    # Fused-linear ops: weight and bias rows sharded, hidden replicated.
    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(4, 5, 8, generator=g)
    weight = torch.randn(V, 8, generator=g)
    bias = torch.randn(V, generator=g)
    targets = torch.randint(0, V, (4, 5), generator=g)

    def head(sharded_head: bool):
        h = hidden.clone().requires_grad_()
        w = (weight[cols] if sharded_head else weight).clone().requires_grad_()
        b = (bias[cols] if sharded_head else bias).clone().requires_grad_()
        return h, w, b

    def linear_record(res, ref, heads, forward, rows, with_entropy, values):
        (h, w, b), (h_ref, w_ref, b_ref) = heads
        return dict(values=values, grads={"hidden": (h.grad, h_ref.grad),
                                          "weight": (w.grad, w_ref.grad[cols]),
                                          "bias": (b.grad, b_ref.grad[cols])},
                    forward=forward, rows=rows, with_entropy=with_entropy,
                    dtype=torch.float32, hidden_bytes=hidden.numel() * 4)

    h_ref, w_ref, b_ref = head(False)
    lp, ent = linear_token_logprobs(h_ref, w_ref, targets, bias=b_ref, return_entropy=True,
                                    backend=backend, chunk_size=2)
    torch.autograd.backward([lp, ent], [torch.ones_like(lp), 0.5 * torch.ones_like(ent)])
    h, w, b = head(True)
    with traffic.counting():
        lp_s, ent_s = linear_token_logprobs(h, w, targets, bias=b, return_entropy=True,
                                            backend=backend, chunk_size=2, process_group=group)
    forward = list(traffic.calls)
    with traffic.counting():
        torch.autograd.backward([lp_s, ent_s],
                                [torch.ones_like(lp_s), 0.5 * torch.ones_like(ent_s)])
    record = linear_record(lp_s, lp, ((h, w, b), (h_ref, w_ref, b_ref)), forward, 20, True,
                           {"logp": (lp_s, lp), "entropy": (ent_s, ent)})
    record["backward"] = list(traffic.calls)
    out["linear_token_logprobs"] = record

    side = policy_inputs(4, 5, seed=12)
    heads = head(True), head(False)
    ref = linear_policy_loss(heads[1][0], heads[1][1], targets, bias=heads[1][2],
                             backend=backend, chunk_size=2, entropy_coef=0.02, **side)
    ref.loss.backward()
    with traffic.counting():
        res = linear_policy_loss(heads[0][0], heads[0][1], targets, bias=heads[0][2],
                                 backend=backend, chunk_size=2, entropy_coef=0.02,
                                 process_group=group, **side)
    forward = list(traffic.calls)
    res.loss.backward()
    out["linear_policy_loss"] = linear_record(
        res, ref, heads, forward, 20, True,
        {"loss": (res.loss, ref.loss), "logprobs": (res.logprobs, ref.logprobs),
         "entropy": (res.entropy, ref.entropy)})

    mask = torch.ones(4, 5, dtype=torch.bool)
    heads = head(True), head(False)
    ref = linear_dpo_loss(heads[1][0], heads[1][1], targets, mask, bias=heads[1][2],
                          loss_type="simpo", backend=backend, chunk_size=1)
    ref.loss.backward()
    with traffic.counting():
        res = linear_dpo_loss(heads[0][0], heads[0][1], targets, mask, bias=heads[0][2],
                              loss_type="simpo", backend=backend, chunk_size=1,
                              process_group=group)
    forward = list(traffic.calls)
    res.loss.backward()
    out["linear_dpo_simpo"] = linear_record(
        res, ref, heads, forward, 20, False,
        {"loss": (res.loss, ref.loss), "chosen": (res.chosen_logprobs, ref.chosen_logprobs),
         "rejected": (res.rejected_logprobs, ref.rejected_logprobs)})

    # Packed (cu_seqlens) and sharded together: three sequences of 5, 0 and 7 tokens (12
    # rows) with token chunks of 5 that cut sequences (GSPO: the pre-pass), and pairs.
    cu = torch.tensor([0, 5, 5, 12], dtype=torch.int32)
    packed_hidden = hidden.reshape(-1, 8)[:12]
    packed_targets = targets.reshape(-1)[:12]
    g = torch.Generator().manual_seed(17)
    side = dict(advantages=torch.randn(3, generator=g), mask=torch.rand(12, generator=g) > 0.2,
                old_logprobs=-torch.rand(12, generator=g) * 3)

    def packed_head(sharded_head: bool):
        _, w, b = head(sharded_head)
        return packed_hidden.clone().requires_grad_(), w, b

    heads = packed_head(True), packed_head(False)
    ref = linear_policy_loss(heads[1][0], heads[1][1], packed_targets, bias=heads[1][2],
                             config="gspo", kl_coef=0.0, backend=backend, chunk_tokens=5,
                             cu_seqlens=cu, **side)
    ref.loss.backward()
    res = linear_policy_loss(heads[0][0], heads[0][1], packed_targets, bias=heads[0][2],
                             config="gspo", kl_coef=0.0, backend=backend, chunk_tokens=5,
                             cu_seqlens=cu, process_group=group, **side)
    res.loss.backward()
    out["packed_linear_policy_gspo"] = linear_record(
        res, ref, heads, [], 12, True,
        {"loss": (res.loss, ref.loss), "logprobs": (res.logprobs, ref.logprobs)})

    packed_logits = torch.randn(12, V, generator=g) * 2
    full = packed_logits.clone().requires_grad_()
    ref = policy_loss(full, packed_targets, config="dapo", backend=backend, cu_seqlens=cu,
                      **side)
    ref.loss.backward()
    part = sharded(packed_logits)
    res = policy_loss(part, packed_targets, config="dapo", backend=backend, cu_seqlens=cu,
                      process_group=group, **side)
    res.loss.backward()
    out["packed_policy_dapo"] = dict(
        values={"loss": (res.loss, ref.loss), "logprobs": (res.logprobs, ref.logprobs)},
        grads={"logits": (part.grad, full.grad[..., cols])})

    pair_cu = torch.tensor([0, 3, 7, 10, 12], dtype=torch.int32)  # chosen 3, 4; rejected 3, 2
    pair_mask = torch.ones(12, dtype=torch.bool)
    heads = packed_head(True), packed_head(False)
    ref = linear_dpo_loss(heads[1][0], heads[1][1], packed_targets, pair_mask,
                          bias=heads[1][2], loss_type="simpo", backend=backend,
                          chunk_tokens=5, cu_seqlens=pair_cu)
    ref.loss.backward()
    res = linear_dpo_loss(heads[0][0], heads[0][1], packed_targets, pair_mask,
                          bias=heads[0][2], loss_type="simpo", backend=backend,
                          chunk_tokens=5, cu_seqlens=pair_cu, process_group=group)
    res.loss.backward()
    out["packed_linear_dpo_simpo"] = linear_record(
        res, ref, heads, [], 12, False,
        {"loss": (res.loss, ref.loss), "chosen": (res.chosen_logprobs, ref.chosen_logprobs),
         "rejected": (res.rejected_logprobs, ref.rejected_logprobs)})
    return out


def detached(x):
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: detached(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(detached(v) for v in x)
    return x


def worker(rank: int, world: int, port: int, out_dir: str, backends: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        pair = pairs[rank // 2]
        traffic = Traffic()
        results = {}
        for backend in backends:
            results[(backend, 4)] = run_cases(dist.group.WORLD, rank, 4, traffic, backend)
            results[(backend, 2)] = run_cases(pair, rank % 2, 2, traffic, backend)
        torch.save(detached(results), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
