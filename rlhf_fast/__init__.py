"""rlhf_fast: fused Triton kernels for the loss side of LLM reinforcement learning.

Public API (see DESIGN.md section 2):

- ``token_logprobs(logits, targets, *, temperature, return_entropy, ignore_index)``:
  log-prob of each target and the entropy of each row, in one read of the logits.
- ``rlhf_fast.reference``: the plain-PyTorch ground truth of every op (autograd, float64).
"""

from .ops.token_logprobs import token_logprobs

__version__ = "0.1.0"

__all__ = ["__version__", "token_logprobs"]
