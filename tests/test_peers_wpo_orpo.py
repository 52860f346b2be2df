"""WPO's pair weights (``use_weighting``) and ORPO's prompt NLL (``nll_mask``) in ``dpo_loss``
and ``linear_dpo_loss``: against the float64 reference on both backends, the stats sweep's
optional ln sum_v p_v^2 output against float64 and TRL's fused head, and TRL's own DPO and
ORPO loss code called alone on the same logits."""

import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from numerics import assert_values_close
from preference_problems import check_dpo, make_pairs, with_prompts

import rlhf_fast
from rlhf_fast.ops.row_sweeps import stats_sweep

WPO_CASES = {
    "sigmoid": dict(loss_type="sigmoid", beta=0.5, use_weighting=True),
    "ipo_temperature": dict(loss_type="ipo", beta=0.5, use_weighting=True, temperature=0.7),
    "mixture_nll": dict(loss_type=("sigmoid", "bco_pair"), loss_weights=(0.8, 0.2), beta=0.5,
                        use_weighting=True, nll_coef=0.7),
    "hinge_nll_sequence_mean": dict(loss_type="hinge", beta=0.5, use_weighting=True,
                                    nll_coef=0.4, nll_aggregation="sequence_mean"),
}
NLL_MASK_CASES = {
    "orpo": dict(loss_type="orpo", beta=0.2),
    "orpo_sequence_mean": dict(loss_type="orpo", beta=0.2, nll_aggregation="sequence_mean"),
    "rpo_wpo": dict(loss_type="sigmoid", beta=0.5, nll_coef=0.6, use_weighting=True),
}


def pairs(device="cpu", seed=13):
    problem = make_pairs(pairs=4, seed=seed, device=device)
    problem["mask"][5] = False      # an empty rejected sequence (WPO: c = 0)
    problem["targets"][0, 0] = -100  # an ignored token, in the prompt of sequence 0
    return problem


@pytest.mark.parametrize("name", list(WPO_CASES))
def test_wpo_against_reference_torch(name):
    check_dpo(pairs(), WPO_CASES[name], "torch")


@pytest.mark.parametrize("name", ["sigmoid", "mixture_nll"])
def test_wpo_against_reference_triton(name, device):
    check_dpo(pairs(device), WPO_CASES[name], "triton")


@pytest.mark.parametrize("name", list(NLL_MASK_CASES))
def test_nll_mask_against_reference_torch(name):
    problem = pairs()
    problem["mask"][1] = False      # an empty chosen response: its prompt still counts
    check_dpo(problem, NLL_MASK_CASES[name], "torch", nll_mask=with_prompts(pairs()))


@pytest.mark.parametrize("name", ["orpo", "rpo_wpo"])
def test_nll_mask_against_reference_triton(name, device):
    problem = pairs(device)
    check_dpo(problem, NLL_MASK_CASES[name], "triton", nll_mask=with_prompts(problem))


def test_weights_change_the_loss_and_prompt_tokens_get_the_nll_gradient_only():
    problem = pairs()
    ref, x = problem["ref"], problem["logits"].clone().requires_grad_()
    common = dict(ref_logprobs=ref, beta=0.5, backend="torch")
    plain = rlhf_fast.dpo_loss(x, problem["targets"], problem["mask"], **common).loss
    weighted = rlhf_fast.dpo_loss(x, problem["targets"], problem["mask"], use_weighting=True,
                                  **common).loss
    assert abs(plain.item() - weighted.item()) > 1e-4
    nll_mask = with_prompts(problem)
    out = rlhf_fast.dpo_loss(x, problem["targets"], problem["mask"], nll_coef=0.5,
                             nll_mask=nll_mask, **common)
    (grad,) = torch.autograd.grad(out.loss, x)
    prompt = nll_mask & ~problem["mask"] & (problem["targets"] != -100)
    chosen_prompt, rejected_prompt = prompt.clone(), prompt.clone()
    chosen_prompt[4:], rejected_prompt[:4] = False, False
    assert chosen_prompt.any() and rejected_prompt.any()
    # A chosen prompt token: -0.5 / n_nll * (onehot - p), nothing from the pair term.
    n = (nll_mask[:4] & (problem["targets"][:4] != -100)).sum()
    b, t = chosen_prompt.nonzero()[0].tolist()
    p = torch.softmax(problem["logits"][b, t].double(), -1)
    onehot = torch.nn.functional.one_hot(problem["targets"][b, t], p.shape[0]).double()
    expected = -0.5 / n * (onehot - p)
    assert torch.allclose(grad[b, t].double(), expected, rtol=1e-5, atol=1e-8)
    assert (grad[rejected_prompt] == 0).all()


def test_linear_dpo_chunkings_match_dpo_loss():
    problem = pairs(seed=14)
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(8, 7, 16, generator=g), torch.randn(50, 16, generator=g)
    nll_mask = with_prompts(problem)
    for kwargs in (dict(loss_type="sigmoid", beta=0.5, use_weighting=True, nll_coef=0.7,
                        ref_logprobs=problem["ref"]),
                   dict(loss_type="orpo", beta=0.2, nll_mask=nll_mask, temperature=0.8)):
        x = (hidden @ weight.T).requires_grad_()
        direct = rlhf_fast.dpo_loss(x, problem["targets"], problem["mask"], backend="torch",
                                    **kwargs)
        direct.loss.backward()
        for chunks in (dict(chunk_size=1), dict(chunk_tokens=4), {}):
            h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
            out = rlhf_fast.linear_dpo_loss(h, w, problem["targets"], problem["mask"],
                                            backend="torch", **chunks, **kwargs)
            out.loss.backward()
            assert torch.allclose(out.loss, direct.loss, rtol=1e-5), chunks
            assert torch.allclose(h.grad, x.grad @ weight, rtol=1e-4, atol=1e-6), chunks
            assert torch.allclose(w.grad, x.grad.reshape(-1, 50).T @ hidden.reshape(-1, 16),
                                  rtol=1e-4, atol=1e-6), chunks
            for key in ("nll", "rewards_margin"):
                assert torch.allclose(out.metrics[key], direct.metrics[key], rtol=1e-5)


def test_linear_dpo_triton_one_chunk_and_packed(device):
    from packing import cu_seqlens, pack

    problem = pairs(device, seed=15)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(8, 7, 16, generator=g).to(device)
    weight = torch.randn(50, 16, generator=g).to(device)
    kwargs = dict(loss_type="orpo", beta=0.2, nll_mask=with_prompts(problem),
                  use_weighting=False)
    x = (hidden @ weight.T).requires_grad_()
    direct = rlhf_fast.dpo_loss(x, problem["targets"], problem["mask"], backend="triton",
                                **kwargs)
    h = hidden.clone().requires_grad_()
    out = rlhf_fast.linear_dpo_loss(h, weight, problem["targets"], problem["mask"],
                                    backend="triton", **kwargs)
    assert torch.allclose(out.loss, direct.loss, rtol=1e-5)
    lengths = torch.full((8,), 7)
    lengths[3] = 5  # the last two positions of a chosen sequence are cut off
    cut = problem["mask"].clone()
    cut[3, 5:] = False
    nll = with_prompts(problem)
    nll[3, 5:] = False
    padded = rlhf_fast.dpo_loss(x.detach(), problem["targets"], cut, backend="triton",
                                loss_type="orpo", beta=0.2, nll_mask=nll)
    packed = rlhf_fast.dpo_loss(pack(x.detach(), lengths), pack(problem["targets"], lengths),
                                pack(cut, lengths), backend="triton", loss_type="orpo",
                                beta=0.2, nll_mask=pack(nll, lengths),
                                cu_seqlens=cu_seqlens(lengths, device))
    assert torch.allclose(packed.loss, padded.loss, rtol=1e-5)
    assert torch.allclose(packed.metrics["nll"], padded.metrics["nll"], rtol=1e-5)


@pytest.mark.parametrize(("n_cols", "dtype"), [(50, torch.float32), (9000, torch.bfloat16)])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_stats_sweep_log_sum_sq(n_cols, dtype, backend, device):
    # On-chip rows (50 columns) and streamed rows (9000), a dominant token, an ignored row and
    # a temperature; the default outputs are the same with or without the extra one.
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 3, n_cols, generator=g) * 3).to(dtype)
    x[0, 0, 7] = 60.0
    x[1, 0, :] = float("-inf")
    x[1, 0, 1] = 0.5  # one finite logit: sum p^2 = 1
    y = torch.randint(0, n_cols, (2, 3), generator=g)
    y[1, 0], y[1, 2] = 1, -100
    x, y = x.to(device), y.to(device)
    out = torch.full((2, 3), 7.0, device=device)
    logp, _, stats = stats_sweep(x, y, 0.7, -100, False, backend, log_sum_sq=out)
    expected = torch.logsumexp(2 * torch.log_softmax(x.double().cpu() / 0.7, -1), -1)
    expected[1, 2] = 0.0
    assert_values_close(out, expected, dtype, "log_sum_sq")
    assert abs(out[1, 0].item()) <= 1e-6 and abs(out[0, 0].item()) <= 1e-6
    logp2, _, stats2 = stats_sweep(x, y, 0.7, -100, False, backend)
    assert torch.equal(logp, logp2) and torch.equal(stats, stats2)


def test_log_sum_sq_matches_trl_fused_head():
    # TRL's chunked log-prob function (its DPO trainer's source of the WPO term), called alone.
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    g = torch.Generator().manual_seed(4)
    hidden, weight = torch.randn(12, 16, generator=g), torch.randn(40, 16, generator=g) * 2
    targets = torch.randint(0, 40, (12,), generator=g)
    trl_out = ChunkedLogProbFunction.apply(hidden, weight, None, targets, 0.8, 16, None, 1.0,
                                           ("log_sum_sq_probs",))
    logits = (hidden @ weight.T).view(1, 12, 40)
    for backend in ("torch", "triton"):
        out = torch.empty(1, 12)
        stats_sweep(logits, targets.view(1, 12), 0.8, -100, False, backend, log_sum_sq=out)
        assert torch.allclose(out.view(-1), trl_out[2], rtol=1e-5, atol=1e-5), backend


def _trl_dpo_loss(hidden, weight, input_ids, completion_mask, ref_chosen, ref_rejected,
                  temperature, **settings):
    """TRL 1.16's DPOTrainer._compute_loss, called with the attributes it reads and a model
    whose fused head is TRL's chunked log-prob function on fixed final hidden states."""
    import trl
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    outputs = ("entropy", "mean_logits", "is_top1", "log_sum_sq_probs")

    def model(input_ids, attention_mask, use_cache, labels, fused_lm_head):
        h, y = hidden[:, :-1], labels[:, 1:]
        mask = y != -100
        per_token = ChunkedLogProbFunction.apply(h.reshape(-1, h.shape[-1]), weight, None,
                                                 y.clamp(min=0).reshape(-1), temperature, 16,
                                                 None, 1.0, outputs)
        lp, ent, lsq, mean_logits, top1 = (t.view(mask.shape).masked_fill(~mask, 0)
                                           for t in per_token)
        return SimpleNamespace(log_probs=lp, entropy=ent, log_sum_sq_probs=lsq,
                               mean_logits=mean_logits, is_top1=top1)

    accelerator = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x,
                                  gather=lambda x: x)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=accelerator, aux_loss_enabled=False,
        precompute_ref_logps=True, ld_alpha=None, f_divergence_type="reverse_kl",
        label_smoothing=0.0, _metrics={"train": defaultdict(list)}, _total_train_tokens=0,
        _tp_size=1, args=SimpleNamespace(discopop_tau=0.05), **settings)
    inputs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                  completion_mask=completion_mask, ref_chosen_logps=ref_chosen,
                  ref_rejected_logps=ref_rejected)
    return trl.DPOTrainer._compute_loss(trainer, model, inputs, False)


@pytest.mark.parametrize("types", [["sigmoid"], ["sigmoid", "apo_zero"]])
def test_wpo_matches_trl_dpo_compute_loss(types):
    # TRL 1.16 weighs per_sequence_loss in place: its "sft" type (an expanded tensor) raises
    # and hinge's relu fails in backward, so neither is compared here; the NLL's weighting by
    # the mean pair weight is checked against the reference.
    g = torch.Generator().manual_seed(5)
    pairs_, seq, width, vocab = 3, 7, 16, 30
    hidden = torch.randn(2 * pairs_, seq, width, generator=g)
    weight = torch.randn(vocab, width, generator=g)
    input_ids = torch.randint(0, vocab, (2 * pairs_, seq), generator=g)
    completion_mask = (torch.arange(seq) >= torch.tensor([2, 3, 2, 4, 2, 3])[:, None]).long()
    completion_mask[4, 5:] = 0
    ref = torch.randn(2 * pairs_, generator=g) - 8.0
    weights = [1.0] + ([0.4] if len(types) == 2 else [])
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    trl_loss = _trl_dpo_loss(h, w, input_ids, completion_mask, ref[:3], ref[3:], 0.9,
                             loss_types=types, loss_weights=weights, beta=0.3,
                             use_weighting=True)
    trl_grads = torch.autograd.grad(trl_loss, (h, w))
    h, w = hidden[:, :-1].clone().requires_grad_(), weight.clone().requires_grad_()
    out = rlhf_fast.linear_dpo_loss(h, w, input_ids[:, 1:], completion_mask[:, 1:],
                                    ref_logprobs=ref, loss_type=types, loss_weights=weights,
                                    beta=0.3, temperature=0.9, use_weighting=True,
                                    backend="torch")
    grads = torch.autograd.grad(out.loss, (h, w))
    assert out.loss.item() == pytest.approx(trl_loss.item(), rel=1e-5)
    assert torch.allclose(grads[0], trl_grads[0][:, :-1], rtol=1e-4, atol=1e-6)
    assert torch.allclose(grads[1], trl_grads[1], rtol=1e-4, atol=1e-6)


def test_orpo_prompt_nll_matches_trl():
    # TRL's ORPOTrainer.get_batch_loss_metrics (decoder-only): the chosen NLL over every
    # attended token, the odds ratio over the labelled (completion) tokens.
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    g = torch.Generator().manual_seed(6)
    pairs_, seq, vocab = 3, 8, 20
    logits = torch.randn(2 * pairs_, seq, vocab, generator=g) * 2
    ids = torch.randint(0, vocab, (2 * pairs_, seq), generator=g)
    attention = (torch.arange(seq) < torch.tensor([8, 6, 7, 8, 5, 7])[:, None]).long()
    prompt = torch.tensor([3, 2, 4, 3, 2, 4])[:, None]
    labels = torch.where((torch.arange(seq) >= prompt) & (attention == 1), ids, -100)
    batch = {}
    for name, rows in (("chosen", slice(0, 3)), ("rejected", slice(3, 6))):
        batch.update({f"{name}_input_ids": ids[rows], f"{name}_attention_mask": attention[rows],
                      f"{name}_labels": labels[rows]})
    x = logits.clone().requires_grad_()
    trainer = SimpleNamespace(
        is_encoder_decoder=False, padding_value=0, aux_loss_enabled=False, beta=0.2,
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda v: v),
        concatenated_inputs=ORPOTrainer.concatenated_inputs,
        get_batch_logps=ORPOTrainer.get_batch_logps)
    trainer.concatenated_forward = lambda m, b: ORPOTrainer.concatenated_forward(trainer, m, b)
    trainer.odds_ratio_loss = lambda a, b: ORPOTrainer.odds_ratio_loss(trainer, a, b)
    trl_loss, metrics = ORPOTrainer.get_batch_loss_metrics(
        trainer, lambda *a, **k: SimpleNamespace(logits=x), batch)
    (trl_grad,) = torch.autograd.grad(trl_loss, x)

    y = x.detach()[:, :-1].clone().requires_grad_()
    out = rlhf_fast.dpo_loss(y, ids[:, 1:], labels[:, 1:] != -100, loss_type="orpo", beta=0.2,
                             nll_mask=attention[:, 1:], backend="torch")
    (grad,) = torch.autograd.grad(out.loss, y)
    assert out.loss.item() == pytest.approx(trl_loss.item(), rel=1e-5)
    assert out.metrics["nll"].item() == pytest.approx(metrics["nll_loss"], rel=1e-5)
    assert torch.allclose(grad, trl_grad[:, :-1], rtol=1e-4, atol=1e-7)
    assert (trl_grad[:, -1] == 0).all()


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    (dict(loss_type="aot", use_weighting=True), ValueError, "use_weighting"),
    (dict(loss_type="orpo", use_weighting=True), ValueError, "use_weighting"),
    (dict(use_weighting=1), TypeError, "use_weighting must be a bool"),
    (dict(nll_mask="prompt"), ValueError, "nll_mask selects the NLL"),
    (dict(nll_coef=0.1, nll_mask="short"), ValueError, r"nll_mask must have shape"),
    (dict(nll_coef=0.1, nll_mask="soft"), ValueError, "0 and 1"),
    (dict(nll_coef=0.1, nll_mask="uncovered"), ValueError, "nll_mask must cover mask"),
])
def test_bad_arguments_are_named(kwargs, error, match):
    problem = pairs()
    kwargs = dict(kwargs)
    masks = {"prompt": with_prompts(problem), "short": with_prompts(problem)[:, :-1],
             "soft": with_prompts(problem).float() * 0.5,
             "uncovered": problem["mask"] & (torch.arange(7) > 4)}
    if isinstance(kwargs.get("nll_mask"), str):
        kwargs["nll_mask"] = masks[kwargs["nll_mask"]]
    ref = None if kwargs.get("loss_type") == "orpo" else problem["ref"]
    with pytest.raises(error, match=match):
        rlhf_fast.dpo_loss(problem["logits"], problem["targets"], problem["mask"],
                           ref_logprobs=ref, backend="torch", **kwargs)


def test_out_of_range_target_in_the_prompt_raises():
    problem = pairs()
    nll_mask = with_prompts(problem)
    prompt = nll_mask & ~problem["mask"] & (problem["targets"] != -100)
    b, t = prompt[:4].nonzero()[0].tolist()
    problem["targets"][b, t] = 50
    kwargs = dict(ref_logprobs=problem["ref"], nll_coef=0.3, backend="torch")
    rlhf_fast.dpo_loss(problem["logits"], problem["targets"], problem["mask"], **kwargs)
    with pytest.raises(ValueError, match="targets"):
        rlhf_fast.dpo_loss(problem["logits"], problem["targets"], problem["mask"],
                           nll_mask=nll_mask, **kwargs)


def test_compiles_without_graph_breaks():
    problem = pairs()
    nll_mask = with_prompts(problem)

    def step(logits):
        return rlhf_fast.dpo_loss(logits, problem["targets"], problem["mask"],
                                  ref_logprobs=problem["ref"], nll_coef=0.3, nll_mask=nll_mask,
                                  use_weighting=True, loss_scale=0.5, backend="torch").loss

    x = problem["logits"].clone().requires_grad_()
    eager = step(x)
    (eager_grad,) = torch.autograd.grad(eager, x)
    compiled = torch.compile(step, fullgraph=True, backend="eager")(x)
    (compiled_grad,) = torch.autograd.grad(compiled, x)
    assert torch.equal(compiled, eager) and torch.equal(compiled_grad, eager_grad)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_host_reads(backend, monkeypatch):
    from test_no_host_sync import NoHostReads

    from rlhf_fast import validation

    problem = pairs()
    nll_mask = with_prompts(problem)
    x = problem["logits"].clone().requires_grad_()
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(8, 7, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    common = dict(ref_logprobs=problem["ref"], nll_coef=0.3, nll_mask=nll_mask,
                  use_weighting=True, loss_scale=0.5, backend=backend)
    monkeypatch.setattr(validation, "host_reads_are_free", lambda t: False)
    with NoHostReads():
        out = rlhf_fast.dpo_loss(x, problem["targets"], problem["mask"], **common)
        out.loss.backward()
        linear = rlhf_fast.linear_dpo_loss(hidden, weight, problem["targets"], problem["mask"],
                                           chunk_tokens=8, **common)
        linear.loss.backward()
    monkeypatch.undo()
    direct = rlhf_fast.dpo_loss((hidden @ weight.T).detach(), problem["targets"],
                                problem["mask"], **common)
    assert torch.isfinite(out.loss) and torch.allclose(linear.loss, direct.loss, rtol=1e-5)
