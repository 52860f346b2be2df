"""Group estimators on groups given by id (not contiguous, of unequal sizes, singletons among
them), the singleton rules and the whitening variance, against the float64 reference loops
and verl 0.9.1's own estimators (which group by a ``uid`` index)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlhf_fast import advantages as adv
from rlhf_fast import reference

# Groups 7 (3 samples), 2 (4), 5 (1: a singleton), 9 (2), interleaved.
IDS = torch.tensor([7, 2, 2, 9, 5, 7, 2, 9, 7, 2])
REWARDS = torch.tensor([1.0, 0.0, 2.0, -1.0, 3.0, 0.5, 0.25, 4.0, -2.0, 1.5])
MASK = torch.arange(6)[None, :] < torch.tensor([4, 6, 1, 3, 5, 2, 6, 6, 4, 3])[:, None]


def close(a, b):
    assert a.dtype == torch.float32
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (a, b)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("singleton", ["zero", "raw"])
@pytest.mark.parametrize("unbiased", [True, False])
def test_group_advantages_by_id(scale, singleton, unbiased):
    kw = dict(scale=scale, singleton=singleton, unbiased=unbiased, eps=1e-6)
    close(adv.group_advantages(REWARDS, None, group_ids=IDS, **kw),
          reference.advantages.group_advantages(REWARDS, None, group_ids=IDS, **kw))


@pytest.mark.parametrize("singleton", ["zero", "raw"])
def test_rloo_winrate_baseline_by_id(singleton):
    ref = reference.advantages
    close(adv.rloo_advantages(REWARDS, None, singleton=singleton, group_ids=IDS),
          ref.rloo_advantages(REWARDS, None, singleton=singleton, group_ids=IDS))
    close(adv.winrate_advantages(REWARDS, None, temperature=0.7, group_ids=IDS),
          ref.winrate_advantages(REWARDS, None, temperature=0.7, group_ids=IDS))
    for unbiased in (True, False):
        kw = dict(singleton=singleton, unbiased=unbiased, group_ids=IDS)
        close(adv.reinforce_pp_baseline_advantages(REWARDS, None, MASK, **kw),
              ref.reinforce_pp_baseline_advantages(REWARDS, None, MASK, **kw))


def test_contiguous_ids_equal_group_size():
    ids = torch.arange(12) // 4
    r = torch.randn(12, generator=torch.Generator().manual_seed(0))
    for fn in (adv.group_advantages, adv.rloo_advantages, adv.winrate_advantages):
        close(fn(r, None, group_ids=ids), fn(r, 4))


def test_singletons_and_unbiased_whitening_with_group_size():
    r = torch.tensor([2.0, -1.0, 0.5])
    mask = torch.ones(3, 4, dtype=torch.bool)
    close(adv.rloo_advantages(r, 1, singleton="raw"), r)
    close(adv.group_advantages(r, 1, scale="none", singleton="raw"), r)
    for unbiased in (True, False):
        close(adv.reinforce_pp_baseline_advantages(r, 1, mask, singleton="raw",
                                                   unbiased=unbiased),
              reference.advantages.reinforce_pp_baseline_advantages(
                  r, 1, mask, singleton="raw", unbiased=unbiased))
        rewards = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
        close(adv.reinforce_pp_advantages(rewards, mask, unbiased=unbiased),
              reference.advantages.reinforce_pp_advantages(rewards, mask, unbiased=unbiased))
    biased = adv.reinforce_pp_advantages(torch.eye(3, 4), mask, unbiased=False)
    assert not torch.allclose(biased, adv.reinforce_pp_advantages(torch.eye(3, 4), mask))


def test_group_ids_errors():
    with pytest.raises(ValueError, match="not both"):
        adv.group_advantages(REWARDS, 2, group_ids=IDS)
    with pytest.raises(ValueError, match="group_ids must be an integer tensor"):
        adv.rloo_advantages(REWARDS, None, group_ids=IDS[:-1])
    with pytest.raises(ValueError, match="group_ids must be an integer tensor"):
        adv.winrate_advantages(REWARDS, None, group_ids=IDS.float())
    with pytest.raises(ValueError, match="group_size"):
        adv.group_advantages(REWARDS, None)
    with pytest.raises(ValueError, match="singleton"):
        adv.rloo_advantages(REWARDS, None, singleton="keep", group_ids=IDS)


LENGTHS = MASK.sum(-1)
COMPONENTS = torch.stack([REWARDS, torch.tensor([0.0, 1, 1, 0, 1, 0, 0, 1, 1, 0]),
                          torch.linspace(-1, 2, 10) ** 2], dim=1)


def test_new_estimators_against_reference():
    ref = reference.advantages
    for kw in (dict(group_ids=IDS), dict(group_size=5)):
        size = kw.get("group_size")
        ids = kw.get("group_ids")
        close(adv.opo_advantages(REWARDS, LENGTHS, size, group_ids=ids),
              ref.opo_advantages(REWARDS, LENGTHS, size, group_ids=ids))
        close(adv.gpg_advantages(REWARDS, size, f_norm=0.5, group_ids=ids),
              ref.gpg_advantages(REWARDS, size, f_norm=0.5, group_ids=ids))
        for scale in ("group", "none"):
            ours = adv.passk_advantages(REWARDS, size, scale=scale, group_ids=ids)
            close(ours, ref.passk_advantages(REWARDS, size, scale=scale, group_ids=ids))
            assert (ours != 0).sum() >= 2
        weights = torch.tensor([1.0, 0.5, 2.0])
        for mask in (None, MASK):
            close(adv.gdpo_advantages(COMPONENTS, size, weights=weights, mask=mask,
                                      group_ids=ids),
                  ref.gdpo_advantages(COMPONENTS, size, weights=weights, mask=mask,
                                      group_ids=ids))
    token_rewards = torch.randn(MASK.shape, generator=torch.Generator().manual_seed(2))
    baselines = torch.randn(10, generator=torch.Generator().manual_seed(3))
    for ours, theirs in zip(adv.remax_advantages(token_rewards, baselines, MASK),
                            ref.remax_advantages(token_rewards, baselines, MASK), strict=True):
        close(ours, theirs)


def test_passk_ties_pick_the_earliest():
    r = torch.tensor([1.0, 3.0, 3.0, 0.0])
    assert adv.passk_advantages(r, 4, scale="none").tolist() == [0.0, 0.0, 0.0, 0.0]
    r = torch.tensor([1.0, 3.0, 2.0, 3.5])
    assert adv.passk_advantages(r, 4, scale="none").tolist() == [0.0, 0.0, 0.0, 0.5]


def test_gdpo_trl_normalize_then_sum():
    # TRL 1.16 GRPOTrainer, multi_objective_aggregation="normalize_then_sum", as written there
    # (contiguous groups of num_generations; nanstd is Bessel's).
    num_generations, weights = 5, torch.tensor([1.0, 0.5, 2.0])
    grouped = COMPONENTS.view(-1, num_generations, 3)
    mean_k = grouped.mean(dim=1, keepdim=True)
    std_k = grouped.std(dim=1, keepdim=True)
    reward_k = ((grouped - mean_k) / (std_k + 1e-4)).view(-1, 3)
    rewards = (reward_k * weights.unsqueeze(0)).sum(dim=1)
    trl = (rewards - rewards.mean()) / (rewards.std() + 1e-4)
    close(adv.gdpo_advantages(COMPONENTS, num_generations, weights=weights, eps=1e-4), trl)


def otb_inputs():
    g = torch.Generator().manual_seed(6)
    token_rewards = torch.randn(MASK.shape, generator=g)
    old = -torch.rand(MASK.shape, generator=g) * 3
    logits = torch.randn(*MASK.shape, 11, generator=g)
    rho = 0.5 + torch.rand(MASK.shape, generator=g)
    return token_rewards, old, adv.sum_pi_squared(logits), rho


def test_optimal_token_baseline_against_reference():
    token_rewards, old, pi2, rho = otb_inputs()
    for kw in (dict(group_ids=IDS, rollout_weights=rho), dict(group_size=5),
               dict(group_ids=IDS, handle_zero_tail=False)):
        ours = adv.optimal_token_baseline_advantages(token_rewards, MASK, old, pi2, **kw)
        theirs = reference.advantages.optimal_token_baseline_advantages(
            token_rewards, MASK, old, pi2, **kw)
        for a, b in zip(ours, theirs, strict=True):
            close(a, b)


# --- verl's estimators on a uid index --------------------------------------------------------

verl_core = pytest.importorskip(
    "verl.trainer.ppo.core_algos",
    reason="verl is optional (installed by .ci/run without its dependencies)")


def verl_inputs():
    token_rewards = torch.zeros(MASK.shape)
    last = MASK.sum(-1) - 1
    token_rewards[torch.arange(10), last] = REWARDS
    index = np.array([f"uid{i}" for i in IDS.tolist()], dtype=object)
    return token_rewards, MASK.float(), index


def test_verl_grpo_by_uid():
    token_rewards, mask, index = verl_inputs()
    for norm in (True, False):
        theirs, _ = verl_core.compute_grpo_outcome_advantage(
            token_rewards, mask, index, epsilon=1e-6, norm_adv_by_std_in_grpo=norm)
        ours = adv.group_advantages(REWARDS, None, group_ids=IDS, preset="verl",
                                    scale="group" if norm else "none")
        close(ours[:, None] * mask, theirs)


def test_verl_rloo_and_reinforce_pp_baseline_by_uid():
    token_rewards, mask, index = verl_inputs()
    theirs, _ = verl_core.compute_rloo_outcome_advantage(token_rewards.clone(), mask, index)
    close(adv.rloo_advantages(REWARDS, None, singleton="raw", group_ids=IDS)[:, None] * mask,
          theirs)
    theirs, _ = verl_core.compute_reinforce_plus_plus_baseline_outcome_advantage(
        token_rewards.clone(), mask, index)
    close(adv.reinforce_pp_baseline_advantages(REWARDS, None, MASK, singleton="raw",
                                               group_ids=IDS), theirs)


# --- GAE with zeroed gaps (OpenRLHF) ----------------------------------------------------------

def openrlhf_gae(values, rewards, action_mask, gamma, lambd):
    """OpenRLHF 0.11's ``get_advantages_and_returns``, as it is written there."""
    lastgaelam = 0
    advantages_reversed = []
    response_length = rewards.size(1)
    values = action_mask * values
    rewards = action_mask * rewards
    for t in reversed(range(response_length)):
        nextvalues = values[:, t + 1] if t < response_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lambd * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    return advantages, advantages + values


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 1.0), (0.9, 0.8)])
def test_gae_zeroed_gaps(backend, gamma, lam):
    from rlhf_fast.gae import gae
    g = torch.Generator().manual_seed(5)
    rewards, values = torch.randn(5, 9, generator=g), torch.randn(5, 9, generator=g)
    mask = torch.rand(5, 9, generator=g) > 0.3
    mask[0, 2:5] = False          # a tool-output gap inside a sequence
    mask[0, :2] = mask[0, 5:] = True
    a, r = gae(rewards, values, mask, gamma, lam, backend=backend, masked_gaps="zero")
    ref_a, ref_r = reference.gae.gae(rewards, values, mask, gamma, lam, masked_gaps="zero")
    peer_a, peer_r = openrlhf_gae(values.double(), rewards.double(), mask.double(), gamma, lam)
    m = mask.double()
    for ours, ref, peer in ((a, ref_a, peer_a), (r, ref_r, peer_r)):
        assert torch.allclose(ours.double(), ref, atol=1e-6, rtol=0)
        assert torch.allclose(ref, peer * m, atol=1e-12, rtol=0)
    skipped, _ = gae(rewards, values, mask, gamma, lam, backend=backend)
    # With gamma = lam = 1 the zeroed gap telescopes away; otherwise it changes what precedes.
    assert torch.allclose(skipped[0, :2], a[0, :2], atol=1e-5) == (gamma * lam == 1)
    with pytest.raises(ValueError, match="masked_gaps"):
        gae(rewards, values, mask, masked_gaps="carry")


def test_verl_remax_opo_gpg_passk():
    token_rewards, mask, index = verl_inputs()
    baselines = torch.randn(10, generator=torch.Generator().manual_seed(4))
    theirs = verl_core.compute_remax_outcome_advantage(token_rewards, baselines, mask)
    for ours, peer in zip(adv.remax_advantages(token_rewards, baselines, MASK), theirs,
                          strict=True):
        close(ours, peer * mask)
    theirs, _ = verl_core.compute_opo_outcome_advantage(token_rewards, mask, index)
    close(adv.opo_advantages(REWARDS, LENGTHS, group_ids=IDS)[:, None] * mask, theirs)
    theirs, _ = verl_core.compute_gpg_outcome_advantage(token_rewards, mask, index, f_norm=0.5)
    close(adv.gpg_advantages(REWARDS, f_norm=0.5, group_ids=IDS)[:, None] * mask, theirs)
    keep = IDS != 5                       # verl's pass@k refuses a group of one
    for norm in (True, False):
        theirs, _ = verl_core.compute_grpo_passk_outcome_advantage(
            token_rewards[keep], mask[keep], index[keep.numpy()],
            config={"norm_adv_by_std_in_grpo": norm})
        ours = adv.passk_advantages(REWARDS[keep], scale="group" if norm else "none",
                                    group_ids=IDS[keep])
        close(ours[:, None] * mask[keep], theirs)


def test_verl_gdpo():
    _, mask, index = verl_inputs()
    weights = [1.0, 0.5, 2.0]
    last = MASK.sum(-1) - 1
    token_rewards = torch.zeros(MASK.shape)
    token_rewards[torch.arange(10), last] = COMPONENTS.sum(-1)
    prompts = torch.zeros(10, 3, dtype=torch.long)
    batch = {"prompts": prompts,
             "attention_mask": torch.cat([torch.ones(10, 3), mask], dim=1).long()}
    non_tensor = {f"r{k}": COMPONENTS[:, k].numpy() for k in range(3)}
    config = {"gdpo_reward_keys": ["r0", "r1", "r2"], "gdpo_reward_weights": weights,
              "norm_adv_by_std_in_grpo": True}
    theirs, _ = verl_core.compute_gdpo_outcome_advantage(
        token_rewards, mask, index, config=config, non_tensor_batch=non_tensor, batch=batch)
    ours = adv.gdpo_advantages(COMPONENTS, weights=torch.tensor(weights), singleton="raw",
                               mask=MASK, group_ids=IDS)
    close(ours, theirs)


def test_verl_optimal_token_baseline():
    _, mask, index = verl_inputs()
    token_rewards, old, pi2, rho = otb_inputs()
    logits = torch.randn(*MASK.shape, 11, generator=torch.Generator().manual_seed(6))
    direct = torch.softmax(logits, -1).pow(2).sum(-1)
    close(adv.sum_pi_squared(logits), direct)
    for weights in (None, rho):
        for tail in (True, False):
            theirs = verl_core.compute_optimal_token_baseline_advantage(
                token_rewards, mask, index, old, pi2, rollout_is_weights=weights,
                handle_zero_tail=tail)
            ours = adv.optimal_token_baseline_advantages(
                token_rewards, MASK, old, pi2, group_ids=IDS, rollout_weights=weights,
                handle_zero_tail=tail)
            close(ours[0], theirs[0])
            close(ours[1], theirs[1] * mask)
