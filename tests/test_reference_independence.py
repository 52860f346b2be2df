"""The reference shares no code with what it checks: it imports nothing from the
implementation except the config dataclasses (a wrong weight or coefficient in the
implementation would otherwise be in the ground truth too, and no comparison could see it)."""

import ast
import subprocess
import sys
from pathlib import Path

import rlhf_fast

REFERENCE = Path(rlhf_fast.__file__).parent / "reference"
ALLOWED = {"rlhf_fast", "rlhf_fast.config", "rlhf_fast.policy_config_parts",
           "rlhf_fast.preference_config",
           "rlhf_fast.reference"}
"""Implementation modules the reference may load: the package itself (its ``__init__`` runs
on any import of a submodule) and the config dataclasses."""
CONFIG_DEPENDENCIES = {"rlhf_fast.validation"}
"""Modules the config dataclasses themselves import (checked against the config, not the
reference: importing the configs loads them too)."""


def test_reference_files_import_only_config_dataclasses():
    files = sorted(REFERENCE.glob("*.py"))
    assert len(files) >= 10, files
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                # Relative: ``from . import x`` / ``from .x`` stay inside the reference;
                # ``from ..x`` leaves it and must name a config module.
                if node.level == 1:
                    continue
                target = "rlhf_fast." + (node.module or "")
                assert target in ALLOWED, f"{path.name} imports {target}"
            elif isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith("rlhf_fast") or \
                    node.module in ALLOWED or node.module.startswith("rlhf_fast.reference"), \
                    f"{path.name} imports {node.module}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith("rlhf_fast"), \
                        f"{path.name} imports {alias.name}"


def test_importing_the_reference_loads_no_implementation_module():
    # A fresh interpreter with an empty ``rlhf_fast`` package object (its __init__, which
    # imports the public ops, does not run): whatever implementation module ends up in
    # sys.modules was pulled in by the reference itself. The references are then run once,
    # so lazy imports inside functions are caught too.
    code = f"""
import sys, types
import torch
package = types.ModuleType("rlhf_fast")
package.__path__ = [{str(REFERENCE.parent)!r}]
sys.modules["rlhf_fast"] = package
from rlhf_fast import reference as ref
from rlhf_fast.config import PolicyLossConfig
from rlhf_fast.preference_config import PreferenceLossConfig
logits = torch.randn(2, 3, 5, dtype=torch.float64)
targets = torch.randint(0, 5, (2, 3))
mask = torch.ones(2, 3, dtype=torch.bool)
for preset in ("grpo", "gmpo", "aepo"):
    config = PolicyLossConfig.preset(preset, top_entropy_quantile=None, kl_coef=0.1,
                                     rollout_correction="sequence_truncate")
    ref.policy_loss(logits, targets, torch.ones(2), mask, ref_logprobs=torch.zeros(2, 3),
                    rollout_logprobs=torch.zeros(2, 3), config=config)
ref.policy_loss(logits, targets, torch.ones(2), mask,
                config=PolicyLossConfig(top_entropy_quantile=0.5))
ref.dpo_loss(logits, targets, mask, ref_logprobs=torch.zeros(2),
             config=PreferenceLossConfig(loss_type="orpo"))
ref.advantages.reinforce_pp_baseline_advantages(torch.ones(2), 2, mask)
ref.gae.gae(torch.ones(2, 3), torch.ones(2, 3), mask)
ref.value.value_loss(torch.ones(2, 3), torch.ones(2, 3), torch.ones(2, 3), mask)
ref.kl.kl_penalized_rewards(torch.ones(2), torch.zeros(2, 3), torch.zeros(2, 3), mask, 0.1)
ref.shaping.overlong_penalty(torch.tensor([3, 9]), 8, 4)
print("\\n".join(sorted(m for m in sys.modules if m.startswith("rlhf_fast"))))
"""
    loaded = set(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                text=True).stdout.split())
    assert "rlhf_fast.reference.policy_loss" in loaded
    implementation = {m for m in loaded if not m.startswith("rlhf_fast.reference")}
    assert implementation <= ALLOWED | CONFIG_DEPENDENCIES, \
        f"the reference loads {sorted(implementation - ALLOWED - CONFIG_DEPENDENCIES)}"
