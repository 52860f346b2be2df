"""Adapters for the frameworks users already train with: TRL and verl.

``rlhf_fast.integrations.trl`` runs TRL's ``GRPOTrainer`` and ``DPOTrainer`` with the
fused-linear losses; ``rlhf_fast.integrations.verl`` registers the policy losses and a fused
log-prob + entropy head with verl. Each module imports its framework when it is imported
itself: ``import rlhf_fast`` imports neither (install them with the ``trl`` / ``verl``
extras). ``UnsupportedSettingError`` is what both raise for a framework setting they cannot
reproduce exactly.
"""

from .errors import UnsupportedSettingError

__all__ = ["UnsupportedSettingError"]
