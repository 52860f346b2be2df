"""The policy as the fused-linear ops need it: backbone hidden states (after the final norm)
and the ``lm_head`` weight, never the logits.

``Policy`` wraps any Hugging Face causal LM, or a PEFT model around one. It refuses, with the
reason, a model the ops cannot reproduce from ``hidden @ lm_head.weight.T (+ bias)``: one
without an output head, an adapter on the head, or logits that the model post-processes
(Gemma-2's ``final_logit_softcapping``, Cohere's ``logit_scale``, Granite's
``logits_scaling``, ...). Besides reading those config fields it checks the equality itself
on a probe of four tokens, so an unknown post-processing is caught too.

The reference policy is a frozen copy of the starting model, or for a PEFT model the same
model with its adapter disabled (no copy at all).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util

import torch
from torch import Tensor, nn

POST_PROCESSING_FIELDS = {
    "final_logit_softcapping": None,   # Gemma-2/3: c * tanh(z / c)
    "logit_softcapping": None,
    "logit_scale": 1.0,                # Cohere: z * logit_scale
    "logits_scaling": 1.0,             # Granite: z / logits_scaling
    "output_multiplier_scale": 1.0,
    "lm_head_multiplier": 1.0,         # Falcon-H1
}
"""Config fields that post-process the logits, with the value that means "off"."""


def is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


def disable_dropout(model: nn.Module) -> None:
    """Dropout off everywhere (TRL does the same): old, reference and current log-probs of
    the same weights must agree, in train mode too (gradient checkpointing needs it)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


class Policy:
    """Hidden states and output head of a causal LM (optionally a PEFT model)."""

    def __init__(self, model: nn.Module, *, check_logits: bool = True):
        self.model = model
        self.causal_lm = model.get_base_model() if is_peft_model(model) else model
        name = type(self.causal_lm).__name__
        if not hasattr(self.causal_lm, "get_output_embeddings"):
            raise TypeError(f"model must be a Hugging Face causal LM (PreTrainedModel), got "
                            f"{name}")
        head = self.causal_lm.get_output_embeddings()
        if head is None:
            raise ValueError(f"{name} has no output head (lm_head): load it with "
                             "AutoModelForCausalLM, not AutoModel")
        if type(head) is not nn.Linear:
            raise ValueError(f"{name}'s output head is a {type(head).__name__}, not a plain "
                             "nn.Linear: the fused-linear loss reads lm_head.weight directly "
                             "(an adapter on lm_head is not supported: leave it out of "
                             "target_modules)")
        self.head: nn.Linear = head
        backbone = getattr(self.causal_lm, "base_model", None)
        if backbone is None or backbone is self.causal_lm:
            raise ValueError(f"{name} has no separate backbone (base_model) to take hidden "
                             "states from")
        self.backbone = backbone
        config = self.causal_lm.config
        for field_name, off in POST_PROCESSING_FIELDS.items():
            value = getattr(config, field_name, off)
            if value is not None and value != off:
                raise ValueError(
                    f"{name} post-processes its logits ({field_name}={value}): the fused "
                    f"loss computes hidden @ lm_head.weight.T and would not match the model")
        if check_logits:
            self._check_plain_logits()

    def _check_plain_logits(self) -> None:
        """logits == head(backbone hidden states) on a probe of four tokens."""
        device = self.head.weight.device
        probe = torch.arange(4, device=device).remainder(self.head.weight.shape[0])[None]
        with torch.no_grad():
            logits = self.causal_lm(input_ids=probe, use_cache=False).logits.float()
            ours = self.head(self.hidden_states(probe, torch.ones_like(probe))).float()
        scale = logits.abs().max().clamp(min=1.0)
        if not torch.allclose(logits, ours, rtol=0, atol=1e-3 * float(scale)):
            raise ValueError(
                f"{type(self.causal_lm).__name__}'s logits are not lm_head(final hidden "
                f"states) (max difference {float((logits - ours).abs().max()):.3g}): the model "
                "post-processes them, which the fused loss cannot reproduce")

    @property
    def weight(self) -> Tensor:
        """``[V, H]``: the head weight (the embedding when tied)."""
        return self.head.weight

    @property
    def bias(self) -> Tensor | None:
        return self.head.bias

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor,
                      position_ids: Tensor | None = None) -> Tensor:
        """``[B, L, H]`` final hidden states (after the final norm) of the backbone."""
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids, use_cache=False)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def completion_hidden(self, batch) -> Tensor:
        """``[B, T, H]``: the hidden states that score ``batch.targets`` (columns ``P - 1 ...
        P + T - 2``)."""
        device = self.weight.device
        hidden = self.hidden_states(batch.input_ids.to(device),
                                    batch.attention_mask.to(device),
                                    batch.position_ids.to(device))
        return completion_columns(hidden, batch)


def completion_columns(hidden: Tensor, batch) -> Tensor:
    """``[B, T, H]`` of full-row states ``[B, P + T, H]``: the columns ``P - 1 ... P + T - 2``,
    whose states score (or, for a critic, value the state before) ``batch.targets``."""
    p, t = batch.prompt_width, batch.targets.shape[1]
    return hidden[:, p - 1:p + t - 1]


class ReferencePolicy:
    """The reference model: a frozen copy of the starting policy, or the PEFT policy with its
    adapter disabled. ``completion_hidden`` and ``weight`` as in ``Policy``."""

    def __init__(self, policy: Policy, model: nn.Module | None = None):
        if model is not None:                       # an explicit reference model
            model.requires_grad_(False).eval()
            self.policy, self.context = Policy(model), contextlib.nullcontext
        elif is_peft_model(policy.model):           # same weights, adapter off
            self.policy, self.context = policy, policy.model.disable_adapter
        else:                                       # a frozen copy of the start
            frozen = copy.deepcopy(policy.model).requires_grad_(False).eval()
            self.policy = Policy(frozen, check_logits=False)
            self.context = contextlib.nullcontext

    @property
    def weight(self) -> Tensor:
        return self.policy.weight

    @property
    def bias(self) -> Tensor | None:
        return self.policy.bias

    def completion_hidden(self, batch) -> Tensor:
        with self.context():
            return self.policy.completion_hidden(batch)


def enable_gradient_checkpointing(causal_lm) -> None:
    """Non-reentrant activation checkpointing of every decoder layer (the method's name
    changed in transformers 5)."""
    kwargs = {"use_reentrant": False}
    if hasattr(causal_lm, "activation_checkpointing_enable"):
        causal_lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def attention_implementation() -> str:
    """``flash_attention_2`` when CUDA and the ``flash-attn`` package are there, else
    ``sdpa``."""
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_causal_lm(path: str, dtype: torch.dtype | None = None):
    """(model, tokenizer) from a local directory: bf16 on CUDA (float32 on the CPU) unless
    ``dtype`` is given, flash-attention 2 when installed."""
    from transformers import AutoModelForCausalLM

    from ..tasks.tokenizer import load_tokenizer

    cuda = torch.cuda.is_available()
    dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=attention_implementation())
    if cuda:
        model = model.cuda()
    tokenizer = load_tokenizer(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer
