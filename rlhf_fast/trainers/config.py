"""``TrainerConfig``: everything the shared core needs, one frozen dataclass.

Each algorithm file subclasses it, adds its own fields and sets ``loss`` to its paper's
preset (``PolicyLossConfig.preset``). Sizes are in completions (rows), as in TRL:
``batch_size`` rows per step = ``batch_size / group_size`` prompts x ``group_size``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from ..config import PolicyLossConfig
from .generation import SamplingParams


@dataclass(frozen=True)
class TrainerConfig:
    """Rollout, update, optimiser and bookkeeping settings of every trainer."""

    loss: PolicyLossConfig = field(default_factory=lambda: PolicyLossConfig.preset("grpo"))
    """The policy loss (a preset of ``rlhf_fast.PRESETS`` with overrides). Its
    ``temperature`` is replaced by ``temperature`` below and its ``normalizer`` by the
    mini-batch's global count."""

    steps: int = 100
    """Iterations of rollout -> score -> advantages -> update."""

    batch_size: int = 64
    """Completions per step (rows of the rollout batch); a multiple of ``group_size``."""

    group_size: int = 8
    """G: completions per prompt (the group of the group-relative estimators)."""

    mini_batch_size: int | None = None
    """Rows per optimiser step; None: ``batch_size`` (one step per epoch)."""

    micro_batch_size: int | None = None
    """Rows per forward/backward (gradient accumulation); None: ``mini_batch_size``."""

    epochs: int = 1
    """Passes over each rollout batch (PPO's epochs). With more than one pass, or more than
    one mini-batch, the old policy's log-probs are computed before the update."""

    shuffle: bool = True
    """Shuffle the rows before cutting mini-batches (seeded, checkpointed)."""

    lr: float = 1e-6
    """AdamW learning rate."""

    weight_decay: float = 0.0
    """AdamW weight decay."""

    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""

    lr_schedule: str = "constant"
    """``constant``, ``linear`` (to 0) or ``cosine`` (to 0) after the warm-up."""

    warmup_steps: int = 0
    """Optimiser steps of linear learning-rate warm-up."""

    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm (None: no clipping)."""

    max_new_tokens: int = 256
    """Most tokens per completion."""

    temperature: float = 1.0
    """Sampling temperature; the loss and every log-prob use the same one."""

    top_p: float = 1.0
    """Nucleus sampling mass."""

    stop_strings: tuple[str, ...] = ()
    """Completions end after any of these strings."""

    generation_batch_size: int | None = None
    """Prompts per ``generate`` call (None: the whole batch at once)."""

    loss_impl: str = "fused"
    """``fused``: ``linear_policy_loss`` on hidden states + ``lm_head.weight``; ``reference``:
    the autograd formulas on materialised float32 logits (for checks and memory
    comparisons)."""

    backend: str = "auto"
    """rlhf_fast op backend: ``auto``, ``triton`` or ``torch``."""

    gradient_checkpointing: bool = False
    """Recompute the backbone's activations in backward."""

    seed: int = 0
    """Seeds the prompt order, sampling and shuffling."""

    eval_every: int = 0
    """Evaluate on the held-out prompts every this many steps (0: only at start and end)."""

    save_every: int = 0
    """Save a checkpoint every this many steps (0: only at the end, when ``out_dir`` is
    set)."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "group_size", "epochs"):
            if not getattr(self, name) >= 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.group_size:
            raise ValueError(f"group_size={self.group_size} does not divide batch_size="
                             f"{self.batch_size}: a step samples batch_size / group_size "
                             "prompts, each group_size times")
        mini = self.mini_batch_size or self.batch_size
        micro = self.micro_batch_size or mini
        if not (1 <= mini <= self.batch_size and self.batch_size % mini == 0):
            raise ValueError(f"mini_batch_size={mini} must divide batch_size="
                             f"{self.batch_size}")
        if not (1 <= micro <= mini and mini % micro == 0):
            raise ValueError(f"micro_batch_size={micro} must divide mini_batch_size={mini}")
        if self.lr_schedule not in ("constant", "linear", "cosine"):
            raise ValueError(f"lr_schedule must be constant, linear or cosine, got "
                             f"{self.lr_schedule!r}")
        if self.loss_impl not in ("fused", "reference"):
            raise ValueError(f"loss_impl must be 'fused' or 'reference', got "
                             f"{self.loss_impl!r}")
        if not isinstance(self.loss, PolicyLossConfig):
            raise TypeError("loss must be a PolicyLossConfig (PolicyLossConfig.preset(...))")
        SamplingParams(self.max_new_tokens, self.temperature, self.top_p, self.stop_strings)

    @property
    def mini(self) -> int:
        return self.mini_batch_size or self.batch_size

    @property
    def micro(self) -> int:
        return self.micro_batch_size or self.mini

    @property
    def prompts_per_step(self) -> int:
        return self.batch_size // self.group_size

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.max_new_tokens, self.temperature, self.top_p,
                              self.stop_strings)

    def replace(self, **overrides: object):
        """A copy with ``overrides``; unknown names raise ``TypeError`` listing the fields."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown {type(self).__name__} field(s) {unknown}; fields: "
                            f"{sorted(known)}")
        return replace(self, **overrides)
