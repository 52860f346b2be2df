"""Reference implementations: the plain formulas in PyTorch, differentiated by autograd.

They are the ground truth of the tests and the baseline of the benchmarks. They hold whole
``[N, V]`` tensors and run in whatever dtype they are given (float64 for the tests).

Independence: nothing here imports the implementation except its config dataclasses
(``rlhf_fast.config``, ``rlhf_fast.preference_config``), so a wrong formula in the fused ops,
their coefficient steps or their weights cannot also be in the ground truth
(``tests/test_reference_independence.py`` checks it).

Modules: ``token_logprobs``, ``policy_loss``, ``dpo`` (the losses); ``aggregation``,
``entropy``, ``rollout``, ``kl`` (their parts); ``advantages``, ``gae``, ``value``,
``shaping`` (around the loss).
"""

from . import advantages, aggregation, entropy, gae, kl, rollout, shaping, value
from .dpo import dpo_loss, dpo_loss_from_logprobs
from .policy_loss import policy_loss, policy_loss_from_logprobs
from .token_logprobs import token_logprobs

__all__ = ["advantages", "aggregation", "dpo_loss", "dpo_loss_from_logprobs", "entropy", "gae",
           "kl", "policy_loss", "policy_loss_from_logprobs", "rollout", "shaping",
           "token_logprobs", "value"]
