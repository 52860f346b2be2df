"""The op calls whose kernel launches ``rlhf-fast isa`` records: every path of every op that
sweeps rows of logits, through the public functions, with CPU tensors of real shapes.

Each call is filed under a ``Use`` (op, dtype, V). Output tensors are never read: the stand-in
driver skips the launches, and what the ops compute afterwards on the ``[B, T]`` outputs is
discarded.
"""

from __future__ import annotations

import torch

from .capture import BATCH, SEQ_LEN, Recorder, Use

POLICY_CASES = {
    # token-level: one fused kernel per row (stats, coefficient, gradient)
    "policy_loss[dapo]": ("dapo", {}),
    "policy_loss[grpo+kl+entropy]": ("grpo", {"entropy_coef": 0.01}),
    # sequence-level: stats sweep -> coefficients -> gradient sweep
    "policy_loss[gspo]": ("gspo", {}),
    "policy_loss[gspo+entropy]": ("gspo", {"entropy_coef": 0.01}),
}


def _rows(dtype: torch.dtype, vocab: int, batch: int = BATCH) -> tuple[torch.Tensor, ...]:
    logits = torch.empty((batch, SEQ_LEN, vocab), dtype=dtype)
    targets = torch.zeros((batch, SEQ_LEN), dtype=torch.int64)
    mask = torch.ones((batch, SEQ_LEN), dtype=torch.bool)
    return logits, targets, mask


def launch_every_op(record: Recorder, dtype: torch.dtype, vocab: int) -> None:
    """token_logprobs (forward with / without entropy, backward for each upstream gradient),
    policy_loss (fused token-level paths and the two-sweep path), dpo_loss (and with
    use_weighting, whose stats sweep also sums p^2)."""
    import rlhf_fast

    name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    logits, targets, mask = _rows(dtype, vocab)
    zeros = torch.zeros((BATCH, SEQ_LEN))

    def use(op: str) -> Use:
        return Use(op, name, vocab)

    with torch.no_grad():
        record(use("token_logprobs"),
               lambda: rlhf_fast.token_logprobs(logits, targets, backend="triton"))
        record(use("token_logprobs[entropy]"),
               lambda: rlhf_fast.token_logprobs(logits, targets, return_entropy=True,
                                                backend="triton"))
    for op, logp_grad, entropy_grad in (("token_logprobs.backward[logp]", True, False),
                                        ("token_logprobs.backward[entropy]", False, True),
                                        ("token_logprobs.backward[logp+entropy]", True, True)):
        def backward(logp_grad=logp_grad, entropy_grad=entropy_grad):
            x = logits.detach().requires_grad_()
            logp, entropy = rlhf_fast.token_logprobs(x, targets, return_entropy=True,
                                                     backend="triton")
            outs = [o for o, on in ((logp, logp_grad), (entropy, entropy_grad)) if on]
            return torch.autograd.grad(outs, x, [zeros + 1.0] * len(outs))
        record(use(op), backward)

    old = torch.zeros((BATCH, SEQ_LEN))
    for op, (preset, overrides) in POLICY_CASES.items():
        def policy(preset=preset, overrides=overrides):
            x = logits.detach().requires_grad_()
            return rlhf_fast.policy_loss(x, targets, torch.zeros(BATCH), mask, old_logprobs=old,
                                         ref_logprobs=old, config=preset, backend="triton",
                                         **overrides)
        record(use(op), policy)

    def dpo():
        x = logits.detach().requires_grad_()
        return rlhf_fast.dpo_loss(x, targets, mask, ref_logprobs=torch.zeros(BATCH),
                                  backend="triton")
    record(use("dpo_loss[sigmoid]"), dpo)

    def dpo_weighted():  # WPO: the stats sweep's WITH_SUM_SQ variant
        x = logits.detach().requires_grad_()
        return rlhf_fast.dpo_loss(x, targets, mask, ref_logprobs=torch.zeros(BATCH),
                                  use_weighting=True, backend="triton")
    record(use("dpo_loss[use_weighting]"), dpo_weighted)

    # The backward of the forward-gradient ops when grad_output is not 1 (on a GPU: the saved
    # gradient rescaled in place by a factor read on the device).
    from ..ops.forward_gradients import scale_rows_

    record(use("scale_by_grad_output"), lambda: scale_rows_(logits, torch.ones(())))


def launch_gae(record: Recorder) -> None:
    """GAE over ``[B, T]`` float32 (no logits: V = 0 in its use)."""
    from ..gae import gae

    r = torch.zeros((64, SEQ_LEN))
    record(Use("gae", "fp32", 0), lambda: gae(r, r, r > 0, 1.0, 1.0, backend="triton"))
