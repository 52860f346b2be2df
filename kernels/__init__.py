"""Device code of rlhf_fast: ``@triton.jit`` kernels and device helpers, no torch glue.

Installed as ``rlhf_fast.kernels``. Modules:

- ``softmax_stats``  the stats sweep: one read of a row gives max, log-sum-exp, the target's
  log-prob, ``1 - p_y`` and the entropy, accurate when ``p_y -> 1``;
- ``softmax_grad``   the gradient sweep: dL/dlogits of a block from two per-token coefficients;
- ``token_logprobs`` the kernels of ``rlhf_fast.token_logprobs`` (forward and backward).
"""
