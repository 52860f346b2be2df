"""Every trainer by name: ``ALGORITHMS[name] = (trainer class, config overrides)`` (and
``AGENTIC_ALGORITHMS`` for the tool-calling ones), the names ``rlhf-fast train ALGO``
accepts."""

from __future__ import annotations

from ..config import PolicyLossConfig
from .agentic import AEPOTrainer, ARPOTrainer
from .cispo import CISPOTrainer
from .config import TrainerConfig
from .core import Trainer
from .dapo import DAPOTrainer
from .dpo import DPOTrainer
from .grpo import GRPOTrainer
from .gspo import GSPOTrainer
from .ppo import PPOTrainer
from .reinforce import ReinforceTrainer


def _preset(name: str, **overrides) -> PolicyLossConfig:
    return PolicyLossConfig.preset(name, **overrides)


ALGORITHMS: dict[str, tuple[type[Trainer], dict]] = {
    "grpo": (GRPOTrainer, {}),
    "bnpo": (GRPOTrainer, {"loss": _preset("bnpo")}),
    "dr_grpo": (GRPOTrainer, {"loss": _preset("dr_grpo"), "scale_rewards": "none"}),
    "dapo": (DAPOTrainer, {}),
    "gspo": (GSPOTrainer, {}),
    "gspo_token": (GSPOTrainer, {"loss": _preset("gspo_token")}),
    "gmpo": (GSPOTrainer, {"loss": _preset("gmpo")}),
    "cispo": (CISPOTrainer, {}),
    "sapo": (CISPOTrainer, {"loss": _preset("sapo")}),
    "reinforce_pp": (ReinforceTrainer, {}),
    "reinforce_pp_baseline": (ReinforceTrainer, {"estimator": "reinforce_pp_baseline"}),
    "rloo": (ReinforceTrainer, {"estimator": "rloo",
                                "loss": _preset("ppo", aggregation="seq_mean_token_sum")}),
    "ppo": (PPOTrainer, {}),
    "ppo_penalty": (PPOTrainer, {"loss": _preset("ppo_penalty"), "kl_controller": "adaptive"}),
    "trpo": (PPOTrainer, {"loss": _preset("ppo_penalty"), "kl_controller": "adaptive",
                          "kl_stop": 0.015}),
    "dpo": (DPOTrainer, {}),
}
"""Name -> (trainer class, fields of its config that differ from the class defaults)."""

AGENTIC_ALGORITHMS: dict[str, tuple[type[Trainer], dict]] = {
    "arpo": (ARPOTrainer, {}),
    "aepo": (AEPOTrainer, {}),
}
"""The trainers whose rollouts call tools (``rlhf_fast.agents``): they train on an agentic
task (``rlhf-fast train arpo|aepo`` defaults to the embedded ``shop``)."""


def algorithm(name: str) -> tuple[type[Trainer], dict]:
    table = {**ALGORITHMS, **AGENTIC_ALGORITHMS}
    if name not in table:
        raise ValueError(f"unknown algorithm {name!r}; algorithms: {sorted(table)}")
    return table[name]


def make_config(name: str, **overrides) -> TrainerConfig:
    """The config of algorithm ``name`` with ``overrides`` (any field of its config)."""
    cls, defaults = algorithm(name)
    return cls.config_class().replace(**{**defaults, **overrides})


def make_trainer(name: str, model, tokenizer, prompts, reward_functions, *,
                 config: TrainerConfig | None = None, **kwargs) -> Trainer:
    """The trainer of algorithm ``name`` (``config`` defaults to ``make_config(name)``);
    ``kwargs`` go to the trainer (``eval_prompts``, ``out_dir``, ...)."""
    cls, _ = algorithm(name)
    return cls(model, tokenizer, prompts, reward_functions,
               config if config is not None else make_config(name), **kwargs)
