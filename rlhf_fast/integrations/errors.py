"""The error the adapters raise for a framework setting they cannot reproduce exactly."""

from __future__ import annotations


class UnsupportedSettingError(ValueError):
    """A framework setting that rlhf_fast cannot map onto its ops without changing the
    numbers. The message names the framework's setting, its value, why, and what to do."""

    def __init__(self, framework: str, setting: str, value: object, reason: str,
                 remedy: str = "") -> None:
        self.framework, self.setting, self.value = framework, setting, value
        message = f"rlhf_fast cannot run {framework} with {setting}={value!r}: {reason}."
        if remedy:
            message += f" {remedy}"
        super().__init__(message)
