"""Device code of rlhf_fast: ``@triton.jit`` kernels and device helpers, no torch glue.

Installed as ``rlhf_fast.kernels``. Modules:

- ``row_tiles``       how a row is cut into 16-byte vectors and tiles, peeled to an aligned
  boundary;
- ``softmax_stats``   the stats sweep: one read of a row gives max, log-sum-exp, the target's
  log-prob, ``1 - p_y`` and the entropy, accurate when ``p_y -> 1``; also from a row held in
  registers;
- ``softmax_grad``    the gradient sweep: dL/dlogits of a row from two per-token coefficients;
- ``token_logprobs``  the kernels of ``rlhf_fast.token_logprobs`` (forward and backward);
- ``policy_coefficient``, ``policy_loss``  the fused token-level policy loss (streaming, and
  rows held in registers);
- ``gae``             generalised advantage estimation.

``rlhf-fast isa`` reports what each kernel costs per element on an SM, from its SASS.
"""
