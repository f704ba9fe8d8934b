"""Bundle config values: the error type our checks raise, and values as they arrive from the command line."""

from __future__ import annotations

TRUE_WORDS = ("true", "yes", "1", "on")
FALSE_WORDS = ("false", "no", "0", "off", "none", "null", "")


class ConfigError(ValueError):
    """A bundle config value that cannot work; the message names the key and what was expected."""


def as_bool(value, key: str = "value") -> bool:
    """Config booleans arrive as bools or, from the command line (`--tta false`), as strings (any case)."""
    if isinstance(value, bool) or value is None:
        return bool(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
        return value.strip().lower() in TRUE_WORDS
    raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")


def none_if_null(value):
    """`--pretrained null` arrives as the string 'null'; map 'null' / 'none' / '' to None."""
    return None if isinstance(value, str) and value.strip().lower() in ("null", "none", "") else value
