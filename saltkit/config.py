"""Bundle config values: the error type our checks raise, and values as they arrive from the command line."""

from __future__ import annotations

TRUE_WORDS = ("true", "1")
FALSE_WORDS = ("false", "0")


class ConfigError(ValueError):
    """A bundle config value that cannot work; the message names the key and what was expected."""


def as_bool(value, key: str = "value") -> bool:
    """A boolean config key's value: true / false (any case), 1 / 0, as a bool, an integer or a string (the command
    line gives `--tta false` as the string "false"). Anything else is a ConfigError naming `key`."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
        return value.strip().lower() in TRUE_WORDS
    raise ConfigError(f"config key '{key}' must be true or false (or 1 / 0), got {value!r}")


def check_booleans(**values) -> None:
    """ConfigError for the first boolean key whose value `as_bool` does not accept: `check_booleans(tta=@tta, ...)`."""
    for key, value in values.items():
        as_bool(value, key)


def require_int(key: str, value, low: int) -> int:
    """`value` when it is an integer >= `low`, else a ConfigError naming `key` (bools are not integers here)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"config key '{key}' must be an integer >= {low}, got {value!r}")
    return value


def none_if_null(value):
    """`--pretrained null` arrives as the string 'null'; map 'null' / 'none' / '' to None."""
    return None if isinstance(value, str) and value.strip().lower() in ("null", "none", "") else value
