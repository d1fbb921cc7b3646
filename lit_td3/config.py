"""Configuration errors: every bad value is reported with its field path and value, before any env is built."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the field, the value and what is expected."""


def check(field: str, value: Any, ok: bool, expected: str) -> None:
    """Raises ``ConfigError("field=value: expected ...")`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{field}={value!r}: expected {expected}")
