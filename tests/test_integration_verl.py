"""verl adapters against verl's own functions (verl 0.9.1, installed without its heavy
dependencies by ``.ci/run``; see the README's migration section).

Every mapped loss mode x aggregation (x global normalisers, x rollout IS weights) equals
``core_algos``' function in loss, gradient w.r.t. ``log_prob`` and metrics; the refused modes
raise ``UnsupportedSettingError``; the ``rlhf_fast`` fused head equals verl's torch
``FusedLinearForPPOFunction`` in log-probs, entropy and gradients, and is what verl's
patched model forward calls once ``impl_backend="rlhf_fast"`` is set.
"""

from __future__ import annotations

import pytest
import torch

core_algos = pytest.importorskip(
    "verl.trainer.ppo.core_algos",
    reason="verl is optional (`pip install rlhf-fast[verl]`, or `pip install --no-deps verl` "
           "plus its import dependencies as .ci/run does); CI installs it")

from verl.workers.config import ActorConfig  # noqa: E402
from verl.workers.config.actor import PolicyLossConfig as VerlPolicyLossConfig  # noqa: E402

from rlhf_fast.integrations import UnsupportedSettingError  # noqa: E402
from rlhf_fast.integrations import verl as adapter  # noqa: E402

REL = 1e-5
AGG_MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
             "seq-mean-token-sum-norm"]


def _actor_config(**overrides):
    fields = dict(strategy="fsdp", ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=2,
                  rollout_n=1, clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28,
                  clip_ratio_c=3.0,
                  # kl_cov: 20% of the valid tokens (5 of 25) get the |log r| penalty.
                  policy_loss=VerlPolicyLossConfig(kl_cov_ratio=0.2, ppo_kl_coef=0.5,
                                                   dro_beta=0.5))
    fields.update(overrides)
    return ActorConfig(**fields)


def _problem(seed=0, batch=6, length=9):
    """Log-probs spread so that clips, the dual clip and empty / padded rows all occur."""
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(batch, length, generator=gen, dtype=torch.float64) * 3
    old = logp + 0.4 * torch.randn(batch, length, generator=gen, dtype=torch.float64)
    old[0, :3] = logp[0, :3] - 2.0          # ratio e^2 > clip_ratio_c: dual clip binds
    adv = torch.randn(batch, generator=gen).unsqueeze(-1).expand(batch, length).clone()
    adv[0] = -1.0
    lengths = torch.tensor([9, 5, 1, 0, 7, 3])[:batch]
    mask = torch.arange(length) < lengths.unsqueeze(-1)
    weights = torch.rand(batch, length, generator=gen) * 2
    return logp.float(), old.float(), adv.float(), mask, weights.float()


def _run(fn, logp, old, adv, mask, agg, config, weights):
    x = logp.clone().requires_grad_(True)
    loss, metrics = fn(old_log_prob=old, log_prob=x, advantages=adv, response_mask=mask,
                       loss_agg_mode=agg, config=config, rollout_is_weights=weights)
    loss.backward()
    return loss.detach(), x.grad, metrics


def _assert_same(mode, agg, config, weights=True, seed=0):
    logp, old, adv, mask, w = _problem(seed)
    w = w if weights else None
    try:
        ref = _run(core_algos.get_policy_loss_fn(mode), logp, old, adv, mask, agg, config, w)
    except ValueError as error:  # verl refuses (e.g. local counts with dp_size > 1): so do we
        with pytest.raises(ValueError, match=str(error)[:20]):
            _run(core_algos.get_policy_loss_fn(f"rlhf_fast_{mode}"), logp, old, adv, mask, agg,
                 config, w)
        return None
    ref = _run(core_algos.get_policy_loss_fn(mode), logp, old, adv, mask, agg, config, w)
    ours = _run(core_algos.get_policy_loss_fn(f"rlhf_fast_{mode}"), logp, old, adv, mask, agg,
                config, w)
    torch.testing.assert_close(ours[0], ref[0], rtol=REL, atol=1e-7)
    err = (ours[1] - ref[1]).norm() / ref[1].norm().clamp(min=1e-12)
    assert err < REL, f"dL/dlog_prob off by {err:.2e}"
    assert ours[2].keys() == ref[2].keys()
    for key, value in ref[2].items():
        assert ours[2][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    return ref


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("mode", ["vanilla", "gspo", "gpg", "cispo", "dppo_tv", "dppo_kl",
                                  "kl_cov", "dro"])
def test_loss_modes_match_verl_per_aggregation(mode, agg):
    _assert_same(mode, agg, _actor_config(), weights=mode != "dro")


@pytest.mark.parametrize("mode", adapter.LOSS_MODES)
def test_loss_modes_match_verl_with_global_normalisers(mode):
    """The new engine's global token / sequence counts, dp_size and loss_scale_factor."""
    config = _actor_config(clip_ratio_low=0.3, clip_ratio_high=0.3)
    for agg, info in [("token-mean", dict(dp_size=4, batch_num_tokens=97)),
                      ("seq-mean-token-mean", dict(dp_size=2, global_batch_size=11)),
                      ("seq-mean-token-sum-norm", dict(dp_size=2, global_batch_size=11,
                                                       loss_scale_factor=64))]:
        config.global_batch_info.clear()
        config.global_batch_info.update(info)
        _assert_same(mode, agg, config, weights=mode != "dro")
    config.global_batch_info.clear()


@pytest.mark.parametrize("mode", ["sapo", "geo_mean"])
def test_modes_with_a_fixed_aggregation_match_verl(mode):
    for agg in ("token-mean", "seq-mean-token-sum"):
        for weights in (True, False):
            _assert_same(mode, agg, _actor_config(clip_ratio_low=0.4, clip_ratio_high=0.4),
                         weights=weights)


@pytest.mark.parametrize("weights", [True, False])
def test_geo_mean_with_asymmetric_verl_bounds_matches_verl(weights):
    """clip_ratio_low != clip_ratio_high: gmpo_clip (low) and gmpo_clip_high (high)."""
    ref = _assert_same("geo_mean", "token-mean", _actor_config(clip_ratio_low=0.1,
                                                                clip_ratio_high=0.3),
                       weights=weights)
    assert ref[2]["actor/pg_clipfrac"] > 0 and ref[2]["actor/pg_clipfrac_lower"] > 0


def test_the_problem_exercises_the_clips():
    """Otherwise the equality above would not test them: the dual clip, DPPO's trust region
    on both sides and its ratio cap, and a KL-Cov selection that changes the loss."""
    _, _, metrics = _assert_same("vanilla", "token-mean", _actor_config())
    assert metrics["actor/pg_clipfrac"] > 0 and metrics["actor/pg_clipfrac_lower"] > 0
    for mode in ("dppo_tv", "dppo_kl"):
        _, _, metrics = _assert_same(mode, "token-mean", _actor_config(clip_ratio_low=0.05,
                                                                         clip_ratio_high=0.05))
        assert 0 < metrics["actor/pg_clipfrac"] < 1 and metrics["actor/pg_clipfrac_lower"] > 0
    logp, old, adv, mask, _ = _problem()
    without = _run(core_algos.get_policy_loss_fn("rlhf_fast_kl_cov"), logp, old, adv, mask,
                   "token-mean", _actor_config(policy_loss=VerlPolicyLossConfig(
                       kl_cov_ratio=0.2, ppo_kl_coef=0.0)), None)
    with_penalty = _assert_same("kl_cov", "token-mean", _actor_config(), weights=False)
    assert with_penalty[0] > without[0]


def test_dro_refuses_rollout_weights_and_needs_its_beta():
    """verl scales DRO's penalty by the rollout weights too; rlhf_fast's scale the policy
    term only. Without dro_beta verl raises, and so does the adapter."""
    logp, old, adv, mask, weights = _problem()
    with pytest.raises(UnsupportedSettingError, match="rollout_is_weights"):
        adapter.compute_policy_loss("dro", old, logp, adv, mask, config=_actor_config(),
                                    rollout_is_weights=weights)
    _assert_same("dro", "token-mean", _actor_config(policy_loss=VerlPolicyLossConfig()),
                 weights=False)


@pytest.mark.parametrize("mode", sorted(adapter.REFUSED_MODES))
def test_refused_modes_name_the_setting(mode):
    logp, old, adv, mask, _ = _problem()
    with pytest.raises(UnsupportedSettingError, match=f"policy_loss.loss_mode='{mode}'"):
        adapter.compute_policy_loss(mode, old, logp, adv, mask, config=_actor_config())


def _head_problem(dtype=torch.float32, tokens=(2, 7), hidden=24, vocab=50, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(*tokens, hidden, generator=gen).to(dtype)
    w = (torch.randn(vocab, hidden, generator=gen) * 0.3).to(dtype)
    ids = torch.randint(0, vocab, tokens, generator=gen)
    return h, w, ids


@pytest.mark.parametrize("tokens", [(2, 7), (1, 13)])   # padded batch, verl's unpadded rows
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_head_matches_verl_torch_path(tokens, temperature):
    from verl.utils.experimental.torch_functional import FusedLinearForPPOFunction

    h, w, ids = _head_problem(tokens=tokens)
    g_logp = torch.randn(tokens, generator=torch.Generator().manual_seed(3))
    g_ent = torch.randn(tokens, generator=torch.Generator().manual_seed(4))
    results = []
    for fn in (lambda *a: FusedLinearForPPOFunction.apply(*a, 4),
               adapter.fused_logprobs_and_entropy):
        hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        logp, entropy = fn(hh, ww, ids, temperature)
        ((logp * g_logp).sum() + (entropy * g_ent).sum()).backward()
        results.append((logp.detach(), entropy.detach(), hh.grad, ww.grad))
    for ours, ref in zip(results[1], results[0], strict=True):
        assert ours.shape == ref.shape
        assert ((ours - ref).norm() / ref.norm()) < REL


def test_impl_backend_key_routes_verl_forward_to_the_fused_head():
    """verl's own monkey patch + dense forward, with only impl_backend="rlhf_fast" set."""
    import transformers
    from verl.models.transformers import monkey_patch

    config = transformers.Qwen2Config(vocab_size=40, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config)
    original_forward = type(model).forward
    try:
        monkey_patch.patch_forward_with_backends(model, use_fused_kernels=True,
                                                 fused_kernels_backend="rlhf_fast")
        ids = torch.randint(0, 40, (2, 6))
        out = model(input_ids=ids, return_dict=True, temperature=0.8)
    finally:
        type(model).forward = original_forward
    hidden = model.model(input_ids=ids).last_hidden_state
    logits = (hidden @ model.lm_head.weight.T).double() / 0.8
    logp = torch.log_softmax(logits, -1)
    labels = torch.roll(ids, -1, -1)
    expected = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    torch.testing.assert_close(out.log_probs.double(), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.entropy.double(), entropy, rtol=0, atol=1e-5)


def test_impl_backend_key_turns_on_fused_kernels():
    from verl.workers.config.model import HFModelConfig

    config = object.__new__(HFModelConfig)
    object.__setattr__(config, "fused_kernel_options", {"impl_backend": "rlhf_fast"})
    object.__setattr__(config, "use_fused_kernels", False)
    with pytest.raises(Exception):  # noqa: B017 - the rest of __post_init__ needs a model path
        config.__post_init__()
    assert config.use_fused_kernels


def test_registration_is_additive_and_idempotent():
    before = dict(core_algos.POLICY_LOSS_REGISTRY)
    adapter.register()
    assert core_algos.POLICY_LOSS_REGISTRY == before
    assert core_algos.POLICY_LOSS_REGISTRY["vanilla"] is core_algos.compute_policy_loss_vanilla
