"""Reference implementations: the plain formulas in PyTorch, differentiated by autograd.

They are the ground truth of the tests and the baseline of the benchmarks. They hold whole
``[N, V]`` tensors and run in whatever dtype they are given (float64 for the tests).
"""

from .dpo import dpo_loss, dpo_loss_from_logprobs
from .policy_loss import policy_loss
from .token_logprobs import token_logprobs

__all__ = ["dpo_loss", "dpo_loss_from_logprobs", "policy_loss", "token_logprobs"]
