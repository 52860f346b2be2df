"""PPO's critic: a value head on a causal-LM backbone. It never computes logits.

    V(s_t) = w . h_{P+t-1} + b        h: the backbone's final hidden states (after the norm)

The state before completion token ``t`` is the prompt and ``y_<t``, whose last hidden state is
column ``P + t - 1``: the same column that scores ``targets[:, t]`` in the policy
(``policy.completion_columns``). The head runs in float32 on the backbone's states cast up,
so values are float32 whatever the backbone's dtype.

Two layouts:

- separate (the default, verl / OpenRLHF): its own backbone, a copy of the starting policy's
  backbone, or a given model: a causal LM (its backbone; a fresh zero head), a bare backbone
  (``AutoModel``), or an ``AutoModelForSequenceClassification`` with one output whose
  ``score`` head starts the value head (TRL's value model; a reward model as the critic's
  start, as verl and OpenRLHF do);
- shared: the head on the policy's own backbone; the policy loss and the value head read the
  same hidden states (one backbone pass per micro-batch) and the backbone gets the sum of both
  gradients.

The head's parameters (and a separate backbone's) belong to the critic's own optimiser.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import Tensor, nn

from .policy import Policy, completion_columns, disable_dropout, enable_gradient_checkpointing

CRITIC_FILE = "critic.safetensors"
"""The critic's weights in a checkpoint directory (head, plus the backbone when separate)."""


class Critic(nn.Module):
    """Values ``[b, T]`` float32 of a batch's completion tokens.

    Args:
        head: ``nn.Linear(H, 1)`` (float32).
        backbone: a separate backbone (a Hugging Face base model returning
            ``last_hidden_state``), or None for a head on the policy's backbone (then
            ``values`` needs the policy's hidden states).
    """

    def __init__(self, head: nn.Linear, backbone: nn.Module | None = None):
        super().__init__()
        if head.out_features != 1:
            raise ValueError(f"a value head has 1 output, got {head.out_features}")
        self.head = head
        self.backbone = backbone

    @property
    def shared(self) -> bool:
        return self.backbone is None

    @classmethod
    def build(cls, policy: Policy, model: nn.Module | None = None, *,
              shared: bool = False) -> Critic:
        """The critic of ``policy``: a head on its backbone (``shared``), a copy of its
        backbone, or ``model`` (see the module docstring)."""
        weight = policy.weight
        hidden_size, device = weight.shape[1], weight.device
        if shared:
            if model is not None:
                raise ValueError("critic='shared' puts the value head on the policy's "
                                 "backbone: do not pass critic_model as well")
            return cls(zero_head(hidden_size, device))
        if model is None:
            backbone = copy.deepcopy(policy.backbone)
            head = zero_head(hidden_size, device)
        else:
            backbone, head = split_critic_model(model)
            if head is None:
                head = zero_head(backbone_hidden_size(backbone), device)
        disable_dropout(backbone)
        backbone.requires_grad_(True).eval()
        return cls(head, backbone)

    def enable_gradient_checkpointing(self) -> None:
        if self.backbone is not None:
            enable_gradient_checkpointing(self.backbone)

    def values(self, batch, hidden: Tensor | None = None) -> Tensor:
        """``[b, T]`` float32 values of ``batch``'s completion tokens. ``hidden``: the
        policy's ``completion_hidden(batch)`` (required when shared, ignored otherwise)."""
        if self.backbone is None:
            if hidden is None:
                raise ValueError("a shared critic reads the policy's hidden states: pass "
                                 "hidden=policy.completion_hidden(batch)")
        else:
            device = self.head.weight.device
            out = self.backbone(input_ids=batch.input_ids.to(device),
                                attention_mask=batch.attention_mask.to(device),
                                position_ids=batch.position_ids.to(device), use_cache=False)
            states = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
            hidden = completion_columns(states, batch)                         # [b, T, H]
        w = self.head.weight.float()
        b = self.head.bias.float() if self.head.bias is not None else None
        return nn.functional.linear(hidden.float(), w, b).squeeze(-1)        # [b, T]

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_model

        save_model(self, str(path))

    def load(self, path: str | Path) -> None:
        from safetensors.torch import load_model

        load_model(self, str(path))


def zero_head(hidden_size: int, device: torch.device) -> nn.Linear:
    """``Linear(H, 1)`` in float32 with zero weight and bias: V = 0 everywhere at the start,
    the estimate that assumes nothing."""
    head = nn.Linear(hidden_size, 1, device=device, dtype=torch.float32)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


def backbone_hidden_size(backbone: nn.Module) -> int:
    size = getattr(getattr(backbone, "config", None), "hidden_size", None)
    if size is None:
        raise ValueError(f"cannot tell the hidden size of {type(backbone).__name__} "
                         "(no config.hidden_size)")
    return int(size)


def split_critic_model(model: nn.Module) -> tuple[nn.Module, nn.Linear | None]:
    """(backbone, head or None) of a causal LM, a sequence-classification model with one
    output, or a bare backbone."""
    name = type(model).__name__
    if not hasattr(model, "config"):
        raise TypeError(f"critic_model must be a Hugging Face model, got {name}")
    base = getattr(model, "base_model", model)
    if name.endswith("ForSequenceClassification"):
        head = getattr(model, "score", None)
        if type(head) is not nn.Linear:
            raise ValueError(f"{name}'s classification head is a {type(head).__name__}, not "
                             "a plain nn.Linear 'score' head: load the critic as a causal LM "
                             "or a bare backbone (AutoModel) instead")
        if head.out_features != 1:
            raise ValueError(f"{name} has {head.out_features} outputs (num_labels="
                             f"{head.out_features}); a critic's value head has 1")
        value = nn.Linear(head.in_features, 1, device=head.weight.device, dtype=torch.float32)
        with torch.no_grad():
            value.weight.copy_(head.weight.float())
            if head.bias is not None:
                value.bias.copy_(head.bias.float())
            else:
                value.bias.zero_()
        return base, value
    if hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None:
        if base is model:
            raise ValueError(f"{name} has no separate backbone (base_model)")
        return base, None            # a causal LM: its backbone, a fresh head
    return model, None               # a bare backbone (AutoModel)


def load_critic_model(path: str):
    """A critic's starting model from a local directory: a 1-label sequence classifier with
    its head (``AutoModelForSequenceClassification``), else the backbone alone
    (``AutoModel``: a causal LM's ``lm_head`` is never loaded)."""
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

    from .policy import attention_implementation

    if not Path(path).is_dir():
        raise SystemExit(f"--critic-model must be a local model directory, got {path!r}")
    architectures = AutoConfig.from_pretrained(path).architectures or []
    cuda = torch.cuda.is_available()
    kwargs = {"dtype": torch.bfloat16 if cuda else torch.float32,
              "attn_implementation": attention_implementation()}
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    else:
        model = AutoModel.from_pretrained(path, **kwargs)
    return model.cuda() if cuda else model
