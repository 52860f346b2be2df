"""TRL adapters against TRL itself: a tiny Qwen2 built from a config (float32, CPU) and a
word-level tokenizer built locally (no downloads).

For each mapped setting, one step of ``rlhf_fast.integrations.trl.GRPOTrainer`` /
``DPOTrainer`` gives the loss and parameter gradients of TRL's own ``compute_loss`` on the
same batch (1e-5 relative); settings that cannot be mapped raise ``UnsupportedSettingError``
naming the TRL setting; a short ``trainer.train()`` runs end to end. TRL is in the ``test``
extra and imported plainly: these tests fail, not skip, without it.
"""

from __future__ import annotations

import datasets
import pytest
import torch
import transformers
import trl  # in the test extra: a missing TRL fails here instead of skipping
from trl.trainer.utils import add_fused_lm_head

from rlhf_fast.integrations import UnsupportedSettingError
from rlhf_fast.integrations.trl import DPOTrainer, GRPOTrainer

WORDS = ["red", "green", "blue", "cat", "dog", "runs", "sits", "the", "a", "big", "small",
         "sky", "sea", "tree", "is", "and"]
REL = 1e-5


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer Qwen2 (hidden 32, vocab 20) and its word-level tokenizer, saved locally."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, "<bos>": 3}
    vocab.update({w: i + 4 for i, w in enumerate(WORDS)})
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
        bos_token="<bos>")
    config = transformers.Qwen2Config(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=3,
        initializer_range=0.3)  # large enough that attention is not uniform
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny_qwen2")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _tokenizer(path):
    return transformers.PreTrainedTokenizerFast.from_pretrained(path)


def _length_reward(completions, **kwargs):
    """A reward that varies across a group: longer completions score higher."""
    return [float(len(c.split())) for c in completions]


def _grpo_trainer(path, tmp_path, **overrides):
    prompts = ["the cat", "a big dog", "the sky is", "small tree and"] * 2
    fields = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                  max_completion_length=6, max_steps=2, learning_rate=1e-3, report_to=[],
                  use_cpu=True, logging_steps=1, save_strategy="no", seed=0,
                  temperature=1.0, bf16=False, use_bias_correction_kl=False)
    fields.update(overrides)
    args = trl.GRPOConfig(**fields)
    return GRPOTrainer(model=path, reward_funcs=[_length_reward], args=args,
                       train_dataset=datasets.Dataset.from_dict({"prompt": prompts}),
                       processing_class=_tokenizer(path))


@pytest.fixture(scope="module")
def grpo(tiny_model_dir, tmp_path_factory):
    """A fused GRPO trainer with a reference model, and one generated, scored batch whose
    old / reference / vLLM log-probs are perturbed so that ratios, clips and KL all bind."""
    trainer = _grpo_trainer(tiny_model_dir, tmp_path_factory.mktemp("grpo"), beta=0.04)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 2  # set by train(); G divides the loss
    inputs = trainer._prepare_inputs(batch)
    gen = torch.Generator().manual_seed(1)
    mask = inputs["completion_mask"]
    # A short completion and one dropped whole, as mask_truncated_completions does (the tiny
    # model rarely samples EOS within max_completion_length).
    mask[0, 3:] = 0
    mask[1] = 0
    shape = inputs["completion_ids"].shape
    with torch.no_grad():
        logp = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
            torch.cat([inputs["prompt_mask"], mask], 1), shape[1])[0]
    inputs["old_per_token_logps"] = logp + 0.3 * torch.randn(shape, generator=gen)
    inputs["ref_per_token_logps"] = logp + 0.5 * torch.randn(shape, generator=gen)
    inputs["advantages"] = torch.randn(shape[0], generator=gen)
    inputs["importance_sampling_ratio"] = torch.rand(shape, generator=gen) * 2
    inputs["sampling_per_token_logps"] = logp + 0.4 * torch.randn(shape, generator=gen)
    inputs["num_items_in_batch"] = mask.sum() * 2
    trainer._test_logp = logp  # the current log-probs, for the checks that settings bind
    assert mask.sum() > shape[0] and (mask.sum(-1) < shape[1]).any(), "want padded rows"
    return trainer, inputs


def _loss_and_grads(trainer, compute, inputs):
    trainer.model.zero_grad(set_to_none=True)
    loss = compute(trainer, trainer.model, dict(inputs))
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()
             if p.grad is not None}
    return loss.detach(), grads


def _last_metrics(trainer):
    """The metrics one compute_loss logged (and clear them)."""
    mode = "train" if trainer.model.training else "eval"
    logged = {name: values[-1] for name, values in trainer._metrics[mode].items() if values}
    trainer._metrics[mode].clear()
    return logged


def _assert_same_step(trainer, inputs):
    """Our compute_loss vs TRL's own, on the same trainer, batch and weights: loss,
    gradients and every metric TRL logs in its loss (clip ratios, kl, entropy, phi,
    policy_loss, entropy_coef). VESPO's loss
    -phi A logp sums terms of both signs to far less than their size, so its loss is held to
    1e-5 of the mean term size |A logp| (phi <= 1.25) instead of its own value."""
    _last_metrics(trainer)
    ref_loss, ref_grads = _loss_and_grads(trainer, trl.GRPOTrainer.compute_loss, inputs)
    ref_metrics = _last_metrics(trainer)
    loss, grads = _loss_and_grads(trainer, GRPOTrainer.compute_loss, inputs)
    metrics = _last_metrics(trainer)
    assert metrics.keys() == ref_metrics.keys()
    for name, value in ref_metrics.items():
        assert metrics[name] == pytest.approx(value, rel=1e-5, abs=1e-6, nan_ok=True), name
    atol = 0.0
    if trainer.loss_type == "vespo":
        m = inputs["completion_mask"].float()
        terms = inputs["advantages"].abs().reshape(-1, 1) * trainer._test_logp.abs() * m
        atol = REL * float(terms.sum() / m.sum())
    torch.testing.assert_close(loss, ref_loss, rtol=REL, atol=atol)
    _assert_same_grads(grads, ref_grads)


def _assert_same_grads(grads, ref_grads):
    """Norm-wise 1e-5 over all parameters, and 1e-5 per parameter against its own norm.
    A parameter whose gradient is below 1% of the total is compared to 1% of the total
    instead: the tiny model's attention q / k gradients are ~1e-8 next to ~1e-1 for the
    rest, float32 rounding of the large terms they are summed from."""
    assert grads.keys() == ref_grads.keys()
    total = torch.cat([g.flatten() for g in ref_grads.values()]).norm()
    diff = torch.cat([(grads[n] - g).flatten() for n, g in ref_grads.items()]).norm()
    assert diff / total < REL, f"gradient off by {diff / total:.2e} (norm-wise, all params)"
    for name, g in grads.items():
        ref = ref_grads[name]
        err = (g - ref).norm() / torch.maximum(ref.norm(), 1e-2 * total)
        assert err < REL, f"{name}: gradient off by {err:.2e} (norm-wise)"


OPSM_ADVANTAGES = (-0.5, 0.7, -0.6, 0.9)
OPSM_THRESHOLD = 0.1
"""Two negative-advantage sequences, one of which the off-policy mask drops."""

GRPO_SETTINGS = {
    "grpo": dict(loss_type="grpo"),
    "bnpo": dict(loss_type="bnpo"),
    "dr_grpo": dict(loss_type="dr_grpo"),
    "dapo": dict(loss_type="dapo", epsilon_high=0.28),
    "luspo": dict(loss_type="luspo", importance_sampling_level="sequence"),
    "cispo": dict(loss_type="cispo", epsilon_high=5.0),
    "sapo": dict(loss_type="sapo"),
    "gspo": dict(loss_type="grpo", importance_sampling_level="sequence",
                 epsilon_low=3e-4, epsilon_high=4e-4),
    "delta": dict(loss_type="dapo", delta=1.5),
    "kl": dict(loss_type="grpo", beta=0.04),
    "vllm_is": dict(loss_type="dapo", use_vllm=True, vllm_importance_sampling_correction=True),
    "vllm_is_gspo": dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.04,
                         use_vllm=True, vllm_importance_sampling_correction=True),
    "top_entropy": dict(loss_type="dapo", top_entropy_quantile=0.5),
    "on_policy": dict(loss_type="bnpo", old=None),
    "eval": dict(loss_type="dapo", train=False),
    # Settings that used to be refused. VESPO with the ratio-weighted KL (TRL's default
    # use_bias_correction_kl=True), and with vLLM's token ratio in its sequence weight:
    "vespo_kl": dict(loss_type="vespo", beta=0.04, use_bias_correction_kl=True),
    "vespo_vllm_truncate": dict(loss_type="vespo", use_vllm=True, nan_sampling=True,
                                vllm_importance_sampling_correction=True,
                                vllm_mode=("token_truncate", None, 1.5)),
    "vespo_vllm_mask_opsm": dict(loss_type="vespo", use_vllm=True,
                                 off_policy_mask_threshold=OPSM_THRESHOLD,
                                 advantages=OPSM_ADVANTAGES,
                                 vllm_importance_sampling_correction=True,
                                 vllm_mode=("token_mask", 0.5, 2.0)),
    "opsm_vllm_is": dict(loss_type="grpo", off_policy_mask_threshold=OPSM_THRESHOLD,
                         advantages=OPSM_ADVANTAGES, use_vllm=True,
                         vllm_importance_sampling_correction=True),
    "kl_bias_entropy_top": dict(loss_type="grpo", beta=0.04, use_bias_correction_kl=True,
                                entropy_coef=0.05, top_entropy_quantile=0.5),
    "kl_bias_gspo": dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.04,
                         use_bias_correction_kl=True, epsilon_low=3e-4, epsilon_high=4e-4),
    "kl_bias_entropy_on_policy": dict(loss_type="bnpo", beta=0.04, use_bias_correction_kl=True,
                                      entropy_coef=0.05, old=None),
}


def _configure(trainer, setting):
    """Point the one trainer at a setting (TRL reads these attributes in compute_loss)."""
    s = dict(setting)
    trainer.args.delta = s.pop("delta", None)
    trainer.loss_type = s.pop("loss_type")
    trainer.epsilon_low = s.pop("epsilon_low", 0.2)
    trainer.epsilon_high = s.pop("epsilon_high", 0.2)
    trainer.beta = s.pop("beta", 0.0)
    trainer.importance_sampling_level = s.pop("importance_sampling_level", "token")
    trainer.top_entropy_quantile = s.pop("top_entropy_quantile", 1.0)
    trainer.use_vllm = s.pop("use_vllm", False)
    trainer.vllm_importance_sampling_correction = s.pop("vllm_importance_sampling_correction",
                                                       False)
    mode, low, high = s.pop("vllm_mode", ("token_truncate", None, 3.0))
    trainer.vllm_importance_sampling_mode = mode
    trainer.vllm_importance_sampling_clip_min, trainer.vllm_importance_sampling_clip_max = low, high
    trainer.off_policy_mask_threshold = s.pop("off_policy_mask_threshold", None)
    trainer.args.use_bias_correction_kl = s.pop("use_bias_correction_kl", False)
    trainer.entropy_coef = s.pop("entropy_coef", 0.0)
    trainer.use_adaptive_entropy = s.pop("use_adaptive_entropy", False)
    trainer._entropy_bonus_enabled = trainer.entropy_coef != 0.0 or trainer.use_adaptive_entropy
    trainer.model.train(s.pop("train", True))
    return s


def _vllm_ratio(trainer, inputs):
    """TRL's token importance-sampling ratio from the old and vLLM log-probs (written from its
    definition): exp((old - sampling) * mask), 1 where vLLM gave no log-prob, then clamped to
    [clip_min, clip_max] (token_truncate) or zeroed outside it (token_mask)."""
    low, high = trainer.vllm_importance_sampling_clip_min, trainer.vllm_importance_sampling_clip_max
    diff = (inputs["old_per_token_logps"] - inputs["sampling_per_token_logps"])
    rho = torch.exp(torch.nan_to_num(diff * inputs["completion_mask"], nan=0.0))
    if trainer.vllm_importance_sampling_mode == "token_truncate":
        return rho.clamp(min=low, max=high)
    inside = (rho >= (low if low is not None else -float("inf"))) & (
        rho <= (high if high is not None else float("inf")))
    return torch.where(inside, rho, torch.zeros_like(rho))


@pytest.mark.parametrize("name", list(GRPO_SETTINGS))
def test_grpo_step_matches_trl(grpo, name):
    trainer, inputs = grpo
    rest = _configure(trainer, GRPO_SETTINGS[name])
    if "old" in rest:
        inputs = {k: v for k, v in inputs.items() if k != "old_per_token_logps"}
    if "advantages" in rest:
        inputs = dict(inputs, advantages=torch.tensor(rest["advantages"]))
    if rest.get("nan_sampling"):  # a token vLLM could not score: TRL gives it rho = 1
        inputs = dict(inputs, sampling_per_token_logps=inputs["sampling_per_token_logps"].clone())
        inputs["sampling_per_token_logps"][2, 1] = float("nan")
        assert inputs["completion_mask"][2, 1] == 1
    if not (trainer.use_vllm and trainer.vllm_importance_sampling_correction):
        # TRL adds the ratio only then (VESPO reads it whenever it is there).
        inputs = {k: v for k, v in inputs.items() if k != "importance_sampling_ratio"}
    elif "vllm_mode" in GRPO_SETTINGS[name]:
        inputs = dict(inputs, importance_sampling_ratio=_vllm_ratio(trainer, inputs))
    try:
        _assert_same_step(trainer, inputs)
    finally:
        trainer.model.train()


def test_grpo_new_settings_bind(grpo):
    """The batch makes the off-policy mask drop some but not all negative-advantage
    sequences, and the vLLM ratio leave both VESPO bands (else the equalities above would
    not test them)."""
    trainer, inputs = grpo
    mask = inputs["completion_mask"].float()
    divergence = ((inputs["sampling_per_token_logps"] - trainer._test_logp) * mask).sum(-1) \
        / mask.sum(-1).clamp(min=1)
    negative = torch.tensor(OPSM_ADVANTAGES) < 0
    assert (negative & (divergence > OPSM_THRESHOLD)).any()
    assert (negative & (divergence <= OPSM_THRESHOLD) & (mask.sum(-1) > 0)).any()
    rho = torch.exp((inputs["old_per_token_logps"] - inputs["sampling_per_token_logps"])
                    * mask)[mask.bool()]
    assert (rho > 2.0).any() and (rho < 0.5).any() and ((rho > 1.5) & (rho <= 2.0)).any()


def test_grpo_adaptive_entropy_matches_trl(grpo):
    """``use_adaptive_entropy``: the bonus is applied (last window's entropy below the
    target), and the controller moves entropy_coef and records the entropy of the kept
    tokens (top_entropy_quantile) as TRL's does."""
    trainer, inputs = grpo
    _configure(trainer, dict(loss_type="dapo", use_adaptive_entropy=True,
                             top_entropy_quantile=0.5))
    states = []
    try:
        for compute in (trl.GRPOTrainer.compute_loss, GRPOTrainer.compute_loss):
            trainer.entropy_coef, trainer._last_world_entropy = 0.1, 0.0
            trainer._entropy_window_stats = None
            _last_metrics(trainer)
            loss, grads = _loss_and_grads(trainer, compute, inputs)
            states.append((loss, grads, trainer.entropy_coef, trainer._last_world_entropy,
                           _last_metrics(trainer)))
    finally:
        trainer.use_adaptive_entropy, trainer._entropy_bonus_enabled = False, False
        trainer.entropy_coef, trainer._last_world_entropy = 0.0, float("inf")
        trainer._entropy_window_stats = None
    (ref_loss, ref_grads, ref_coef, ref_world, ref_metrics), \
        (loss, grads, coef, world, metrics) = states
    torch.testing.assert_close(loss, ref_loss, rtol=REL, atol=0)
    assert metrics.keys() == ref_metrics.keys() and "policy_loss" in metrics
    for name, value in ref_metrics.items():
        assert metrics[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    _assert_same_grads(grads, ref_grads)
    assert coef == pytest.approx(ref_coef) and coef != 0.1
    assert world == pytest.approx(ref_world, rel=1e-5)


def test_grpo_metrics_are_logged_and_clips_bind(grpo):
    """The batch exercises the clip (else the equality tests would not test it), and the
    fused path logs TRL's metric names."""
    trainer, inputs = grpo
    _configure(trainer, GRPO_SETTINGS["kl"])
    trainer._metrics["train"].clear()
    GRPOTrainer.compute_loss(trainer, trainer.model, dict(inputs)).backward()
    logged = trainer._metrics["train"]
    assert {"entropy", "kl", "clip_ratio/low_mean", "clip_ratio/high_mean"} <= set(logged)
    assert logged["clip_ratio/region_mean"][-1] > 0 and logged["kl"][-1] > 0


GRPO_REFUSALS = {
    # setting named in the error: the trainer's configuration
    "epsilon_high": dict(loss_type="cispo", epsilon_high=0.28),   # an absolute cap below 1
    "delta": dict(loss_type="dapo", delta=1.1),                   # not above 1 + epsilon_high
    "use_bias_correction_kl": dict(loss_type="vespo", beta=0.04, use_bias_correction_kl=True,
                                   importance_sampling_level="sequence"),
    "vllm_importance_sampling_clip_min": dict(loss_type="vespo", use_vllm=True,
                                              vllm_importance_sampling_correction=True,
                                              vllm_mode=("token_mask", 1.2, 3.0)),
    "vllm_importance_sampling_mode": dict(loss_type="vespo", use_vllm=True,
                                          vllm_importance_sampling_correction=True,
                                          vllm_mode=("sequence_mask", None, 3.0)),
    "loss_type": dict(loss_type="gspo_like"),
}


@pytest.mark.parametrize("setting", list(GRPO_REFUSALS))
def test_grpo_refuses_unmappable_settings(grpo, setting):
    from rlhf_fast.integrations.trl_config import grpo_policy_config

    trainer, _ = grpo
    rest = _configure(trainer, GRPO_REFUSALS[setting])
    assert not rest
    try:
        with pytest.raises(UnsupportedSettingError, match=setting):
            grpo_policy_config(trainer)
    finally:
        _configure(trainer, GRPO_SETTINGS["grpo"])


def test_grpo_refuses_at_construction(tiny_model_dir, tmp_path):
    with pytest.raises(UnsupportedSettingError, match="use_bias_correction_kl=True"):
        _grpo_trainer(tiny_model_dir, tmp_path, loss_type="vespo", beta=0.04,
                      use_bias_correction_kl=True, importance_sampling_level="sequence")


def test_grpo_train_end_to_end(tiny_model_dir, tmp_path):
    """Two optimiser steps of generation, scoring and the fused loss on the CPU."""
    trainer = _grpo_trainer(tiny_model_dir, tmp_path, loss_type="dapo", beta=0.0)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    result = trainer.train()
    assert trainer.state.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    moved = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])]
    assert "lm_head.weight" in moved and len(moved) == len(before)
    assert "entropy" in trainer.state.log_history[0]


# ----------------------------------------------------------------------------------- DPO

PAIRS = [("the cat", " runs and sits", " sky"), ("a big dog", " sits", " the sea is big red"),
         ("the sky is", " blue", " a cat"), ("small tree and", " a big tree", " dog runs runs")]
"""(prompt, chosen, rejected): TRL joins prompt and completion without a space."""


def _dpo_trainer(path, tmp_path, **overrides):
    prompt, chosen, rejected = (list(x) for x in zip(*PAIRS, strict=True))
    fields = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2,
                  learning_rate=1e-3, report_to=[], use_cpu=True, logging_steps=1,
                  save_strategy="no", seed=0, bf16=False, max_length=16)
    fields.update(overrides)
    return DPOTrainer(model=path, args=trl.DPOConfig(**fields),
                      train_dataset=datasets.Dataset.from_dict(
                          {"prompt": prompt, "chosen": chosen, "rejected": rejected}),
                      processing_class=_tokenizer(path))


@pytest.fixture(scope="module")
def dpo(tiny_model_dir, tmp_path_factory):
    """A fused DPO trainer whose policy is moved away from its reference (so the log-ratios
    are not all 0) and one collated batch."""
    trainer = _dpo_trainer(tiny_model_dir, tmp_path_factory.mktemp("dpo"))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    return trainer, batch


DPO_SETTINGS = {
    "sigmoid": dict(loss_type=["sigmoid"], beta=0.1),
    "sigmoid_norm": dict(loss_type=["sigmoid_norm"], beta=0.5),
    "hinge": dict(loss_type=["hinge"], beta=0.1),
    "ipo": dict(loss_type=["ipo"], beta=0.5),
    "exo_pair": dict(loss_type=["exo_pair"], beta=0.1, label_smoothing=1e-3),
    "nca_pair": dict(loss_type=["nca_pair"], beta=0.1),
    "robust": dict(loss_type=["robust"], beta=0.1, label_smoothing=0.2),
    "bco_pair": dict(loss_type=["bco_pair"], beta=0.1),
    "sppo_hard": dict(loss_type=["sppo_hard"], beta=0.5),
    "apo_zero": dict(loss_type=["apo_zero"], beta=0.1),
    "apo_down": dict(loss_type=["apo_down"], beta=0.1),
    "discopop": dict(loss_type=["discopop"], beta=0.1),
    "sigmoid_plus_sft": dict(loss_type=["sigmoid", "sft"], loss_weights=[2.0, 0.5], beta=0.1),
    "smoothing_ignored_by_sigmoid": dict(loss_type=["sigmoid"], beta=0.1, label_smoothing=0.3),
    "precomputed_ref": dict(loss_type=["sigmoid"], beta=0.1, precompute=True),
    # Settings that used to be refused: weighted sums (MPO's sigmoid + bco_pair + sft; a
    # repeated type, smoothing and an f-divergence), aot, f-divergences, LD-DPO.
    "mpo_list": dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0],
                     beta=0.1),
    "list_js_smoothed": dict(loss_type=["robust", "hinge", "robust"], beta=0.1,
                             loss_weights=[0.5, 1.0, 0.25], label_smoothing=0.2,
                             f_divergence_type="js_divergence"),
    "aot_smoothed": dict(loss_type=["aot"], beta=0.1, label_smoothing=0.1),
    "aot_unpaired": dict(loss_type=["aot_unpaired", "sft"], loss_weights=[2.0, 0.5], beta=0.1),
    "alpha_divergence": dict(loss_type=["sigmoid"], beta=0.1,
                             f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3),
    "ld_alpha": dict(loss_type=["sigmoid", "sft"], beta=0.1, ld_alpha=0.5),
    # WPO (TRL 1.16: w = exp(c_w + c_l), unclamped): one weighted length-averaged loss, and
    # a list with a repeated type. (aot_unpaired above: one weighted loss with the op's
    # loss_weights, which aot ignored before.)
    "wpo_sigmoid_norm": dict(loss_type=["sigmoid_norm"], loss_weights=[2.0], beta=0.5,
                             use_weighting=True),
    "wpo_list": dict(loss_type=["sigmoid", "bco_pair", "sigmoid"], loss_weights=[0.5, 0.3, 0.4],
                     beta=0.1, use_weighting=True),
}


def _configure_dpo(trainer, setting, batch):
    s = dict(setting)
    trainer.loss_types = s["loss_type"]
    trainer.loss_weights = s.get("loss_weights", [1.0] * len(s["loss_type"]))
    trainer.beta = s["beta"]
    trainer.label_smoothing = s.get("label_smoothing", 0.0)
    trainer.precompute_ref_logps = s.get("precompute", False)
    trainer.f_divergence_type = s.get("f_divergence_type", "reverse_kl")
    trainer.f_alpha_divergence_coef = s.get("f_alpha_divergence_coef", 1.0)
    trainer.ld_alpha = s.get("ld_alpha")
    trainer.use_weighting = s.get("use_weighting", False)
    if trainer.use_weighting and not getattr(trainer, "_test_sum_sq_head", False):
        # TRL's head computes ln sum p^2 only when built with use_weighting: rebuild it so
        # (our hook, below it, still answers the fused forward's keyword).
        add_fused_lm_head(trainer.model, outputs=("log_probs", "entropy", "mean_logits",
                                                  "is_top1", "log_sum_sq_probs"))
        trainer._test_sum_sq_head = True
    inputs = dict(batch)
    if trainer.precompute_ref_logps:
        chosen, rejected = trainer.compute_ref_log_probs(trainer.ref_model, batch)
        inputs.update(ref_chosen_logps=chosen, ref_rejected_logps=rejected)
    return inputs


@pytest.mark.parametrize("name", list(DPO_SETTINGS))
def test_dpo_step_matches_trl(dpo, name):
    trainer, batch = dpo
    inputs = _configure_dpo(trainer, DPO_SETTINGS[name], batch)
    ref_loss, ref_grads = _loss_and_grads(trainer, trl.DPOTrainer.compute_loss, inputs)
    loss, grads = _loss_and_grads(trainer, DPOTrainer.compute_loss, inputs)
    torch.testing.assert_close(loss, ref_loss, rtol=REL, atol=0)
    _assert_same_grads(grads, ref_grads)


def test_dpo_weighted_hinge_and_sft_where_trl_fails(dpo, monkeypatch):
    """TRL 1.16 fails on two weighted terms, and the adapter takes their evident intent.
    A weighted hinge fails in TRL's backward (its in-place weighting overwrites the relu
    output relu's gradient reads): its forward is the loss, and the gradient is TRL's once
    relu is computed as clamp(min=0) (the same values). A weighted "sft" fails in TRL's
    forward (it weighs the broadcast scalar NLL in place): the adapter takes the pair mean of
    w * NLL = mean(w) * NLL, with w from TRL's own fused head. So the adapter's step is TRL's
    weighted hinge step plus w_sft * mean(w) times TRL's unweighted sft step."""
    trainer, batch = dpo
    setting = dict(loss_type=["hinge", "sft"], loss_weights=[1.0, 0.7], beta=0.5,
                   use_weighting=True)
    inputs = _configure_dpo(trainer, setting, batch)
    try:
        with pytest.raises(RuntimeError, match="memory location"):
            trl.DPOTrainer.compute_loss(trainer, trainer.model, dict(inputs))
        loss, grads = _loss_and_grads(trainer, DPOTrainer.compute_loss, inputs)
        _configure_dpo(trainer, dict(setting, loss_type=["hinge"], loss_weights=[1.0]), batch)
        trainer.model.zero_grad(set_to_none=True)
        hinge_loss = trl.DPOTrainer.compute_loss(trainer, trainer.model, dict(inputs))
        with pytest.raises(RuntimeError, match="inplace"):
            hinge_loss.backward()
        monkeypatch.setattr(torch, "relu", lambda x: torch.clamp(x, min=0))
        intended_loss, hinge_grads = _loss_and_grads(trainer, trl.DPOTrainer.compute_loss,
                                                     inputs)
        torch.testing.assert_close(intended_loss, hinge_loss.detach(), rtol=0, atol=0)
        with torch.no_grad():
            out = trainer.model(input_ids=inputs["input_ids"],
                                attention_mask=inputs["attention_mask"], use_cache=False,
                                labels=inputs["input_ids"].masked_fill(
                                    inputs["completion_mask"] == 0, -100), fused_lm_head=True)
        _configure_dpo(trainer, dict(loss_type=["sft"], beta=0.5), batch)
        sft_loss, sft_grads = _loss_and_grads(trainer, trl.DPOTrainer.compute_loss, inputs)
        mask = inputs["completion_mask"][:, 1:].float()
        aligned = ((out.log_probs - out.log_sum_sq_probs) * mask).sum(1) / mask.sum(1).clamp(min=1)
        chosen, rejected = torch.exp(aligned).chunk(2)
        scale = 0.7 * (chosen * rejected).mean()
        assert abs(scale / 0.7 - 1) > 1e-3          # the weights are not all 1
        torch.testing.assert_close(loss, intended_loss + scale * sft_loss, rtol=REL, atol=0)
        _assert_same_grads(grads, {n: g + scale * sft_grads[n]
                                   for n, g in hinge_grads.items()})
    finally:
        _configure_dpo(trainer, DPO_SETTINGS["sigmoid"], batch)


@pytest.mark.parametrize("ld_alpha", [0.0, 0.5])
def test_ld_reference_sums_as_tokens_keep_trls_weighted_sums(ld_alpha):
    """TRL hands LD-weighted reference sums; the op weighs per-token reference log-probs
    itself: the tokens the adapter builds give back TRL's sums, also for a pair sharing no
    token (an empty sequence) and for a pair of unequal lengths."""
    from rlhf_fast.integrations.trl import _ld_sums_as_tokens
    from rlhf_fast.preference_config import preference_config
    from rlhf_fast.reference.dpo import dpo_loss_from_logprobs

    gen = torch.Generator().manual_seed(5)
    lengths = torch.tensor([0, 4, 3, 5, 2, 3])          # pairs (0, 5), (4, 2), (3, 3)
    valid = torch.arange(6)[None, :] >= (6 - lengths)[:, None]   # left padding
    logp = -torch.rand(6, 6, generator=gen, dtype=torch.float64)
    sums = -torch.rand(6, generator=gen, dtype=torch.float64) * 3
    sums[0] = 0.0                                        # an empty sequence sums to 0
    if ld_alpha == 0.0:
        sums[3] = 0.0                    # its partner is empty: TRL's sum is 0 * the tail
    config = preference_config(beta=0.1, ld_alpha=ld_alpha)
    tokens = _ld_sums_as_tokens(sums, valid, ld_alpha)
    by_tokens = dpo_loss_from_logprobs(logp, valid, tokens, config)
    by_sums = dpo_loss_from_logprobs(logp, valid, sums, config)
    torch.testing.assert_close(by_tokens[0], by_sums[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(by_tokens[3]["rewards_margin"], by_sums[3]["rewards_margin"],
                               rtol=1e-12, atol=0)


def test_dpo_aot_sorting_binds(dpo):
    """aot pairs the i-th smallest policy margin with the i-th smallest reference margin:
    on this batch that is not the identity pairing (else the aot equality tests no sort)."""
    trainer, batch = dpo
    _configure_dpo(trainer, DPO_SETTINGS["sigmoid"], batch)
    policy = trainer.compute_ref_log_probs(trainer.model, batch)
    ref = trainer.compute_ref_log_probs(trainer.ref_model, batch)
    policy_order = torch.argsort(policy[0] - policy[1])
    assert not torch.equal(policy_order, torch.argsort(ref[0] - ref[1]))
    assert not torch.equal(policy_order, torch.argsort(ref[0] - policy[1] + policy[0] - ref[1]))


DPO_REFUSALS = {
    # setting named in the error: the trainer's configuration
    "loss_type": dict(loss_type=["sigmoid", "ipo"], beta=0.1),        # ipo averages by length
    "label_smoothing": dict(loss_type=["sigmoid", "robust"], beta=0.1, label_smoothing=0.2),
    "f_divergence_type": dict(loss_type=["ipo"], beta=0.1, f_divergence_type="js_divergence"),
    "use_weighting": dict(loss_type=["aot"], beta=0.1, use_weighting=True),   # TRL refuses it
}


@pytest.mark.parametrize("setting", list(DPO_REFUSALS))
def test_dpo_refuses_unmappable_settings(dpo, setting):
    from rlhf_fast.integrations.trl_config import dpo_loss_arguments

    trainer, batch = dpo
    _configure_dpo(trainer, DPO_REFUSALS[setting], batch)
    try:
        with pytest.raises(UnsupportedSettingError, match=setting):
            dpo_loss_arguments(trainer)
    finally:
        _configure_dpo(trainer, DPO_SETTINGS["sigmoid"], batch)


def test_dpo_refuses_weighting_with_rpo_alpha(dpo, monkeypatch):
    """TRL < 0.29's rpo_alpha came with a WPO weight clamped at 1 and an unweighted NLL (the
    attribute is gone in TRL 1.16, so it is set by hand here)."""
    from rlhf_fast.integrations.trl_config import dpo_loss_arguments

    trainer, batch = dpo
    monkeypatch.setattr(trainer.args, "rpo_alpha", 0.5, raising=False)
    _configure_dpo(trainer, DPO_SETTINGS["sigmoid"], batch)
    assert dpo_loss_arguments(trainer)["nll_coef"] == 0.5
    _configure_dpo(trainer, DPO_SETTINGS["wpo_sigmoid_norm"], batch)
    try:
        with pytest.raises(UnsupportedSettingError, match=r"use_weighting.*rpo_alpha"):
            dpo_loss_arguments(trainer)
    finally:
        _configure_dpo(trainer, DPO_SETTINGS["sigmoid"], batch)


def test_dpo_train_end_to_end(tiny_model_dir, tmp_path):
    trainer = _dpo_trainer(tiny_model_dir, tmp_path, loss_type=["ipo"], beta=0.5)
    before = trainer.model.lm_head.weight.detach().clone()
    result = trainer.train()
    assert trainer.state.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(before, trainer.model.lm_head.weight)
    assert "rewards/margins" in trainer.state.log_history[0]


def test_importing_rlhf_fast_imports_neither_trl_nor_verl():
    import subprocess
    import sys

    code = ("import sys, rlhf_fast, rlhf_fast.integrations; "
            "bad = [m for m in ('trl', 'verl', 'transformers', 'accelerate') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
