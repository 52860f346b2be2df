"""Fused-linear ops with token chunks (sequences cut across chunks: the one-pass token path
and the pre-pass path), packed ``cu_seqlens`` inputs, ``main_grad``, the float32 weight
gradient written in place in 16 bits, and the default chunk rule."""

import pytest
import torch
from numerics import assert_grad_close
from packing import cu_seqlens, lengths_for, pack, unpack
from policy_problems import loss_scale
from test_linear import CONFIGS, problem, run_linear
from test_linear_dpo import compare, pair_problem
from test_linear_dpo import run_reference as run_dpo_reference

import rlhf_fast
from rlhf_fast import PolicyLossConfig, reference
from rlhf_fast.ops import chunking
from rlhf_fast.ops.linear import prepass_kind
from rlhf_fast.ops.lm_head import WeightGradAccumulator
from rlhf_fast.preference_config import preference_config

# --- token chunks against the float64 reference -------------------------------------------


@pytest.mark.parametrize("name", ["gspo", "dapo"])
def test_long_sequence_equals_whole_sequence_chunks(backend, name):
    """Sequences of 40 tokens cut into 12-token chunks (GSPO: pre-pass; DAPO: one pass) give
    the loss and gradients of chunks of whole sequences."""
    g = torch.Generator().manual_seed(5)
    batch, seq_len, hidden, vocab = 2, 40, 16, 50
    h = torch.randn(batch, seq_len, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) * 0.3
    targets = torch.randint(0, vocab, (batch, seq_len), generator=g)
    mask = torch.rand(batch, seq_len, generator=g) > 0.1
    with torch.no_grad():
        old = rlhf_fast.linear_token_logprobs(h, w, targets) \
            + 0.02 * torch.randn(batch, seq_len, generator=g)
    adv = torch.randn(batch, generator=g)
    config = PolicyLossConfig.preset(name)
    results = []
    for chunking_args in (dict(chunk_tokens=12), dict(chunk_size=1)):
        leaves = [h.clone().requires_grad_(), w.clone().requires_grad_()]
        out = rlhf_fast.linear_policy_loss(leaves[0], leaves[1], targets, adv, mask,
                                           old_logprobs=old, config=config, backend=backend,
                                           **chunking_args)
        out.loss.backward()
        results.append((out, [x.grad for x in leaves]))
    (cut, cut_grads), (whole, whole_grads) = results
    torch.testing.assert_close(cut.loss, whole.loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(cut.logprobs, whole.logprobs, rtol=0, atol=1e-6)
    for a, b in zip(cut_grads, whole_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    for key in whole.metrics:
        torch.testing.assert_close(cut.metrics[key], whole.metrics[key], rtol=1e-6, atol=1e-6)


def test_paths():
    """Which losses need the pre-pass when a sequence spans chunks."""
    kinds = {name: prepass_kind(PolicyLossConfig.preset(name), True)
             for name in ("ppo", "grpo", "dapo", "dr_grpo", "cispo", "sapo", "gppo", "gspo",
                          "gspo_token", "gmpo", "aepo")}
    assert kinds == {"ppo": None, "grpo": None, "dapo": None, "dr_grpo": None, "cispo": None,
                     "sapo": None, "gppo": None, "gspo": "sequence", "gspo_token": "sequence",
                     "gmpo": "sequence", "aepo": "batch"}
    rollout = PolicyLossConfig.preset("grpo", rollout_correction="sequence_truncate")
    assert prepass_kind(rollout, True) is None and prepass_kind(rollout, False) == "sequence"
    top = PolicyLossConfig.preset("dapo", top_entropy_quantile=0.2)
    assert prepass_kind(top, True) == "batch"


# --- packed inputs ----------------------------------------------------------------------------

def packed_problem(dtype=torch.float32, seed=0):
    """Padded [5, 4] problem, positions past each length masked; sequence 1 is empty."""
    p = problem(dtype=dtype, seed=seed)
    lengths = lengths_for(5, 4, seed)
    p["mask"] &= torch.arange(4) < lengths[:, None]
    return p, lengths


def _linear_policy(p, config, backend, lengths=None, per_token_adv=False, **kwargs):
    def side(x):
        return x if lengths is None or x is None else pack(x, lengths)

    leaves = [side(t).clone().requires_grad_() if i == 0 else t.clone().requires_grad_()
              for i, t in enumerate((p["h"], p["w"], p["b"]))]
    adv = p["adv"][:, None].expand(5, 4).contiguous() if per_token_adv else p["adv"]
    out = rlhf_fast.linear_policy_loss(
        leaves[0], leaves[1], side(p["targets"]), side(adv) if per_token_adv else adv,
        side(p["mask"]), bias=leaves[2], old_logprobs=side(p["old"]),
        ref_logprobs=side(p["ref"]) if config.kl.reference == "ref" and config.kl.coef
        else None, config=config, backend=backend,
        cu_seqlens=cu_seqlens(lengths) if lengths is not None else None, **kwargs)
    (out.loss * 1.3).backward()
    return out, [t.grad for t in leaves]


PACKED_CONFIGS = {
    **{k: CONFIGS[k] for k in ("dapo", "grpo", "gspo", "gspo_token", "gmpo", "cispo", "aepo",
                               "top_entropy")},
    "dr_grpo": CONFIGS["dr_grpo"],
    "seq_mean_token_sum": PolicyLossConfig.preset("ppo", aggregation="seq_mean_token_sum"),
}


@pytest.mark.parametrize(("name", "chunk_tokens"), [
    *((name, 5) for name in PACKED_CONFIGS), ("dapo", None), ("gspo", None), ("gmpo", None)])
def test_linear_policy_packed_equals_padded(backend, name, chunk_tokens):
    """chunk_tokens=5 cuts the packed sequences (token path, pre-pass path); None is one
    chunk (the whole packed batch in one pass)."""
    p, lengths = packed_problem(seed=len(name))
    config = PACKED_CONFIGS[name]
    padded, padded_grads = _linear_policy(p, config, backend)
    packed, packed_grads = _linear_policy(p, config, backend, lengths,
                                          per_token_adv=name == "cispo",
                                          chunk_tokens=chunk_tokens)
    # Not to the bit: a GEMM's rounding may depend on its row count (the chunk's).
    scale = loss_scale({"mask": p["mask"], "advantages": p["adv"]}, config, padded.loss.item())
    assert abs(packed.loss.item() - padded.loss.item()) <= 1e-5 * scale
    torch.testing.assert_close(packed.logprobs, pack(padded.logprobs, lengths), rtol=0,
                               atol=1e-6)
    for key in padded.metrics:
        torch.testing.assert_close(packed.metrics[key], padded.metrics[key], rtol=1e-5,
                                   atol=1e-6)
    torch.testing.assert_close(packed_grads[0], pack(padded_grads[0], lengths), rtol=1e-5,
                               atol=1e-6)
    for a, b in zip(packed_grads[1:], padded_grads[1:], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["dapo", "gspo", "gmpo", "aepo"])
def test_linear_policy_packed_bf16(backend, name):
    """bf16, sequences cut by the chunks: the packed gradients equal the padded ones to bf16
    rounding, and both meet the bf16 contract against float64 on the same bf16 logits."""
    p, lengths = packed_problem(dtype=torch.bfloat16, seed=7)
    config = PACKED_CONFIGS[name]
    padded, padded_grads = _linear_policy(p, config, backend, chunk_tokens=5)
    packed, packed_grads = _linear_policy(p, config, backend, lengths, chunk_tokens=5)
    torch.testing.assert_close(packed.loss, padded.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(packed.logprobs, pack(padded.logprobs, lengths), rtol=0,
                               atol=1e-5)
    assert_grad_close(unpack(packed_grads[0], lengths, 4).float(), padded_grads[0].float(),
                      torch.bfloat16)
    assert_grad_close(packed_grads[1].float(), padded_grads[1].float(), torch.bfloat16)


def test_linear_token_logprobs_chunks_and_packing(backend):
    p, lengths = packed_problem()
    h, w = p["h"].clone().requires_grad_(), p["w"].clone().requires_grad_()
    hp = pack(p["h"], lengths).clone().requires_grad_()
    wp = p["w"].clone().requires_grad_()
    logp, ent = rlhf_fast.linear_token_logprobs(h, w, p["targets"], return_entropy=True,
                                                chunk_tokens=3, backend=backend)
    plogp, pent = rlhf_fast.linear_token_logprobs(
        hp, wp, pack(p["targets"], lengths), return_entropy=True, chunk_tokens=3,
        cu_seqlens=cu_seqlens(lengths), backend=backend)
    c = torch.randn(5, 4, generator=torch.Generator().manual_seed(2))
    ((logp * c).sum() + ent.sum()).backward()
    ((plogp * pack(c, lengths)).sum() + pent.sum()).backward()
    hr, wr = p["h"].double().requires_grad_(), p["w"].double().requires_grad_()
    rlogp, rent = reference.token_logprobs(hr @ wr.T, p["targets"], return_entropy=True)
    ((rlogp * c.double()).sum() + rent.sum()).backward()
    assert (logp.double() - rlogp).abs().max() <= 1e-5
    assert (plogp.double() - pack(rlogp, lengths)).abs().max() <= 1e-5
    assert_grad_close(h.grad, hr.grad, torch.float32)
    assert_grad_close(w.grad, wr.grad, torch.float32)
    torch.testing.assert_close(hp.grad, pack(h.grad, lengths), rtol=1e-5, atol=1e-7)


# --- linear_dpo_loss: pairs cut by the chunks, packed pairs ---------------------------------

@pytest.mark.parametrize("kwargs", [
    dict(loss_type="sigmoid", nll_coef=0.5), dict(loss_type="ipo"), dict(loss_type="orpo"),
    dict(loss_type="aot"), dict(loss_type="aot_unpaired"), dict(loss_type="sigmoid", ld_alpha=0.3),
    dict(loss_type="sigmoid", nll_coef=0.5, nll_aggregation="sequence_mean")],
    ids=["rpo", "ipo", "orpo", "aot", "aot_unpaired", "ld-dpo", "rpo-sequence-mean"])
def test_linear_dpo_token_chunks(kwargs, backend, device):
    """Chunks of 4 tokens cut the pairs (T = 5): the pre-pass path, against float64."""
    p = pair_problem(seed=11, device=device)
    config = preference_config(**kwargs)
    leaves = [t.clone().requires_grad_() for t in (p["h"], p["w"], p["b"])]
    ref_args = dict(ref_hidden=p["ref_h"], ref_weight=p["ref_w"]) if config.uses_reference \
        else {}
    out = rlhf_fast.linear_dpo_loss(leaves[0], leaves[1], p["targets"], p["mask"],
                                    bias=leaves[2], chunk_tokens=4, backend=backend,
                                    **ref_args, **kwargs)
    (out.loss * -1.5).backward()
    compare(out, [t.grad for t in leaves], run_dpo_reference(p, kwargs, grad_scale=-1.5),
            torch.float32)


@pytest.mark.parametrize("chunk_tokens", [4, None])
def test_linear_dpo_packed_equals_padded(backend, chunk_tokens):
    p = pair_problem(seed=12)
    lengths = torch.tensor([5, 0, 3, 2, 5, 4])
    p["mask"] &= torch.arange(5) < lengths[:, None]

    def run(packed):
        def side(x):
            return pack(x, lengths) if packed else x

        leaves = [side(p["h"]).clone().requires_grad_(), p["w"].clone().requires_grad_()]
        out = rlhf_fast.linear_dpo_loss(
            leaves[0], leaves[1], side(p["targets"]), side(p["mask"]),
            ref_hidden=side(p["ref_h"]), ref_weight=p["ref_w"], nll_coef=0.2,
            chunk_tokens=chunk_tokens if packed else None, backend=backend,
            cu_seqlens=cu_seqlens(lengths) if packed else None)
        out.loss.backward()
        return out, [t.grad for t in leaves]

    (padded, padded_grads), (packed, packed_grads) = run(False), run(True)
    torch.testing.assert_close(packed.loss, padded.loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(packed.chosen_logprobs, padded.chosen_logprobs, rtol=1e-6,
                               atol=1e-6)
    for key in padded.metrics:
        torch.testing.assert_close(packed.metrics[key], padded.metrics[key], rtol=1e-6,
                                   atol=1e-6)
    torch.testing.assert_close(packed_grads[0], pack(padded_grads[0], lengths), rtol=1e-5,
                               atol=1e-7)
    torch.testing.assert_close(packed_grads[1], padded_grads[1], rtol=1e-5, atol=1e-7)


# --- main_grad and the weight gradient's float32 accumulator -------------------------------

def test_main_grad_accumulates_in_forward(backend):
    p = problem()
    config = CONFIGS["grpo"]
    _, grads = run_linear(p, config, backend, chunk_size=2)
    main_grad = torch.full_like(p["w"], 0.5)
    h = p["h"].clone().requires_grad_()
    w = p["w"].clone().requires_grad_()
    for _ in range(2):
        out = rlhf_fast.linear_policy_loss(h, w, p["targets"], p["adv"], p["mask"],
                                           bias=p["b"], old_logprobs=p["old"],
                                           ref_logprobs=p["ref"], config=config,
                                           chunk_tokens=7, main_grad=main_grad,
                                           backend=backend)
        out.loss.backward()
    assert w.grad is None
    torch.testing.assert_close(main_grad, 0.5 + 2 * grads[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad, 2 * grads[0], rtol=1e-5, atol=1e-6)
    out = rlhf_fast.linear_policy_loss(h, w, p["targets"], p["adv"], p["mask"],
                                       old_logprobs=p["old"], ref_logprobs=p["ref"],
                                       config=config, main_grad=main_grad, backend=backend)
    with pytest.raises(RuntimeError, match="main_grad: the weight's gradient was added"):
        (out.loss * 2.0).backward()


def test_main_grad_linear_dpo(backend):
    p = pair_problem(seed=13)
    kwargs = dict(ref_hidden=p["ref_h"], ref_weight=p["ref_w"], loss_type="sigmoid")
    w = p["w"].clone().requires_grad_()
    rlhf_fast.linear_dpo_loss(p["h"], w, p["targets"], p["mask"], backend=backend,
                              **kwargs).loss.backward()
    main_grad = torch.zeros_like(p["w"])
    w2 = p["w"].clone().requires_grad_()
    rlhf_fast.linear_dpo_loss(p["h"], w2, p["targets"], p["mask"], backend=backend,
                              main_grad=main_grad, loss_scale=0.5, **kwargs).loss.backward()
    assert w2.grad is None
    torch.testing.assert_close(main_grad, 0.5 * w.grad, rtol=1e-5, atol=1e-7)


def test_main_grad_errors():
    p = problem()
    args = (p["h"], p["w"], p["targets"], p["adv"], p["mask"])
    with pytest.raises(TypeError, match="main_grad must be a float32 tensor"):
        rlhf_fast.linear_policy_loss(*args, config="dapo", main_grad=p["w"].double())
    with pytest.raises(TypeError, match=r"of the weight's shape \(70, 16\)"):
        rlhf_fast.linear_policy_loss(*args, config="dapo", main_grad=p["w"][:5])
    with pytest.raises(ValueError, match=r"chunk_size .* or chunk_tokens .* not both"):
        rlhf_fast.linear_policy_loss(*args, config="dapo", chunk_size=1, chunk_tokens=8)
    with pytest.raises(ValueError, match="chunk_tokens must be >= 1"):
        rlhf_fast.linear_token_logprobs(p["h"], p["w"], p["targets"], chunk_tokens=0)
    lengths = torch.tensor([4, 4, 4, 4, 4])
    with pytest.raises(ValueError, match=r"with cu_seqlens .* pass chunk_tokens"):
        rlhf_fast.linear_policy_loss(pack(p["h"], lengths), p["w"], pack(p["targets"], lengths),
                                     p["adv"], pack(p["mask"], lengths), config="dapo",
                                     chunk_size=1, cu_seqlens=cu_seqlens(lengths))
    with pytest.raises(ValueError, match=r"hidden must be packed rows \[N, H\]"):
        rlhf_fast.linear_policy_loss(*args, config="dapo", cu_seqlens=cu_seqlens(lengths))


@pytest.mark.parametrize("vocab", [1, 2, 7, 300])
def test_weight_gradient_cast_in_place(vocab):
    """A bf16 weight's gradient: accumulated in two float32 halves, written in bf16 into the
    first half's storage: the values of a plain cast, no third buffer."""
    g = torch.Generator().manual_seed(vocab)
    weight = torch.zeros(vocab, 24, dtype=torch.bfloat16)
    acc = WeightGradAccumulator(weight)
    expected = torch.zeros(vocab, 24, dtype=torch.float64)
    for rows in (5, 9):
        grad = torch.randn(rows, vocab, generator=g).bfloat16()
        hidden = torch.randn(rows, 24, generator=g).bfloat16()
        acc.add(grad, hidden)
        expected += grad.double().T @ hidden.double()
    storages = [part[2].untyped_storage().data_ptr() for part in acc.parts]
    result = acc.result()
    assert result.dtype == torch.bfloat16 and result.shape == (vocab, 24)
    assert result.is_contiguous()
    torch.testing.assert_close(result, expected.float().bfloat16(), rtol=0, atol=0)
    if vocab > 1:
        assert result.untyped_storage().data_ptr() == storages[0]


# --- the default chunk rule ------------------------------------------------------------------

def test_default_chunk_rule(monkeypatch):
    gib = 2**30
    monkeypatch.setattr(chunking, "device_memory_bytes", lambda device: int(139.8 * gib))
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    # 1 GiB of bf16 logits (the GPU cap) at V = 151936, H = 4096: 3352 tokens, down to 3328.
    assert chunking.default_chunk_tokens(32768, 151936, 4096, torch.bfloat16, cuda) == 3328
    assert chunking.default_chunk_tokens(1000, 151936, 4096, torch.bfloat16, cuda) == 1000
    monkeypatch.setattr(chunking, "device_memory_bytes", lambda device: int(79.1 * gib))
    assert chunking.default_chunk_tokens(32768, 151936, 4096, torch.bfloat16, cuda) == 2048
    # The CPU's cap, 256 MiB: V = 32768, H = 256, float32: 2016 tokens, down to 1920.
    assert chunking.default_chunk_tokens(8192, 32768, 256, torch.float32, cpu) == 1920
    monkeypatch.setattr(chunking, "device_memory_bytes", lambda device: 24 * gib)
    # 192 MiB at V = 32768, H = 256, float32: 1512 tokens, down to 1408.
    assert chunking.default_chunk_tokens(8192, 32768, 256, torch.float32, cpu) == 1408
    monkeypatch.setattr(chunking, "device_memory_bytes", lambda device: gib)
    # The 32 MiB floor, and at least 128 tokens whatever the vocabulary.
    assert chunking.default_chunk_tokens(8192, 262144, 8192, torch.float32, cpu) == 128
    plan = chunking.memory_plan(8192, 256, 32768, torch.float32, cpu)
    assert plan["weight_grad_accumulator"] == 32768 * 256 * 4
    assert plan["logits_chunk"] == plan["chunk_tokens"] * 32768 * 4
    assert plan["beyond_accumulator"] == sum(
        v for k, v in plan.items()
        if k not in ("chunk_tokens", "weight_grad_accumulator", "beyond_accumulator"))
    assert chunking.memory_plan(8192, 256, 32768, torch.float32, cpu,
                                main_grad=True)["weight_grad_accumulator"] == 0


def test_chunk_plans():
    plan = chunking.plan_chunks(3, 4, False, 5, None, want_whole_sequences=False)
    assert [(c.start, c.stop, c.shape) for c in plan.chunks] == [
        (0, 5, (1, 5)), (5, 10, (1, 5)), (10, 12, (1, 2))]
    assert not plan.whole_sequences
    plan = chunking.plan_chunks(3, 4, False, 9, None, want_whole_sequences=True)
    assert [(c.start, c.stop, c.shape) for c in plan.chunks] == [(0, 8, (2, 4)),
                                                                  (8, 12, (1, 4))]
    assert plan.whole_sequences
    plan = chunking.plan_chunks(1, 12, True, 5, None, want_whole_sequences=True)
    assert not plan.whole_sequences and len(plan.chunks) == 3
    assert chunking.plan_chunks(3, 4, False, 50, None, True).chunks[0].shape == (3, 4)
    assert chunking.plan_chunks(3, 4, False, 2, 2, False).chunks[0].shape == (2, 4)
    assert chunking.plan_chunks(0, 4, False, 2, None, False).chunks == ()


# --- the peers' settings under token chunks and packing ---------------------------------------

PEERS_CONFIGS = {
    "kl_cov": PolicyLossConfig.preset("dapo", cov_selection="kl_cov", cov_ratio=0.2),
    "rollout_normalize": PolicyLossConfig.preset(
        "grpo", rollout_correction="token_truncate", rollout_floor=0.8, rollout_normalize=True),
    "sequence_normalize": PolicyLossConfig.preset(
        "grpo", rollout_correction="sequence_mask", rollout_normalize=True),
    "sequence_gate": PolicyLossConfig.preset("grpo", rollout_correction="sequence_gate",
                                             rollout_floor=0.5),
    "kl_aggregation": PolicyLossConfig.preset("grpo", kl_aggregation="token_mean"),
    "entropy_aggregation": PolicyLossConfig.preset(
        "dapo", entropy_coef=0.01, entropy_aggregation="seq_mean_token_mean"),
    "count_empty": PolicyLossConfig.preset("grpo", count_empty_sequences=True),
    "off_policy_mask": PolicyLossConfig.preset("grpo", off_policy_mask_threshold=0.0),
    "vespo": PolicyLossConfig(objective="vespo", rollout_correction="token_truncate"),
    "dppo_tv": PolicyLossConfig(objective="dppo_tv", clip_eps_low=0.2),
    "gmpo_clip_high": PolicyLossConfig.preset("gmpo", gmpo_clip_high=0.6),
    "kl_gradient_k2": PolicyLossConfig.preset("grpo", kl_gradient="k2"),
}


@pytest.mark.parametrize("name", sorted(PEERS_CONFIGS))
def test_peers_settings_chunked_and_packed(name):
    """Token chunks of 5 (sequences of 4 cut across chunks, or chunks of whole sequences for
    the sequence-level settings; the whole-batch settings through the pre-pass) and the
    packed layout give the one-chunk padded loss, log-probs and gradients."""
    p, lengths = packed_problem(seed=len(name))
    rollout = p["old"] + 0.3 * torch.randn(p["old"].shape,
                                           generator=torch.Generator().manual_seed(3))
    config = PEERS_CONFIGS[name]
    uses_rollout = config.rollout.mode is not None \
        or config.rollout.off_policy_mask_threshold is not None
    padded_rollout = dict(rollout_logprobs=rollout) if uses_rollout else {}
    packed_rollout = dict(rollout_logprobs=pack(rollout, lengths)) if uses_rollout else {}
    whole, whole_grads = _linear_policy(p, config, "torch", **padded_rollout)
    scale = loss_scale({"mask": p["mask"], "advantages": p["adv"]}, config, whole.loss.item())
    runs = [(_linear_policy(p, config, "torch", chunk_tokens=5, **padded_rollout), None),
            (_linear_policy(p, config, "torch", lengths, chunk_tokens=5, **packed_rollout),
             lengths)]
    for (out, grads), packed_lengths in runs:
        def layout(x, packed_lengths=packed_lengths):
            return pack(x, packed_lengths) if packed_lengths is not None else x
        assert abs(out.loss.item() - whole.loss.item()) <= 1e-5 * scale, name
        torch.testing.assert_close(out.logprobs, layout(whole.logprobs), rtol=0, atol=1e-6)
        torch.testing.assert_close(grads[0], layout(whole_grads[0]), rtol=1e-5, atol=1e-6)
        for a, b in zip(grads[1:], whole_grads[1:], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_peers_paths():
    """The peers' settings that need statistics beyond a token take the sequence or batch
    pre-pass when chunks cut what they need."""
    kinds = {name: prepass_kind(config, True) for name, config in PEERS_CONFIGS.items()}
    assert kinds == {"kl_cov": "batch", "rollout_normalize": "batch",
                     "sequence_normalize": "batch", "sequence_gate": None,
                     "kl_aggregation": "batch", "entropy_aggregation": "batch",
                     "count_empty": "batch", "off_policy_mask": "sequence",
                     "vespo": "sequence", "dppo_tv": None, "gmpo_clip_high": "sequence",
                     "kl_gradient_k2": None}
    assert prepass_kind(PEERS_CONFIGS["sequence_gate"], False) == "sequence"
