"""Bundle config keys: the error our checks raise, values as they arrive from the command line, and the check that
every key given on the command line or in an override file is one a config defines (`check_overrides`)."""

from __future__ import annotations

import ast
import difflib
import inspect
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

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


BUNDLE_SEPARATORS = ("::", "#")  # MONAI config id separators (new and old spelling)
# `@id` / `%id` references inside config strings (the top-level key they start with)
REFERENCE = re.compile(r"[@%]([A-Za-z_][A-Za-z0-9_]*)")


# ---------------------------------------------------------------- unknown keys on the command line


def top_key(override_id: str) -> str:
    """'train#dataloader#num_workers' -> 'train' (the top-level config key an override id lands in)."""
    for sep in BUNDLE_SEPARATORS:
        override_id = override_id.split(sep)[0]
    return override_id


def bundle_run_arguments() -> set[str]:
    """Keyword names that `python -m monai.bundle run` consumes itself (everything else overrides config keys)."""
    from monai.bundle import ConfigWorkflow, scripts

    names: set[str] = {"workflow_name", "workflow_type", "properties_path"}
    for fn in (scripts.run, scripts.create_workflow, ConfigWorkflow.__init__):
        names |= {p.name for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names - {"self", "override", "kwargs"}


def config_file_list(value) -> list[str]:
    """The --config_file value as a list: a path, a list, or the string of a Python/JSON list."""
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    text = str(value).strip()
    if text.startswith("["):
        try:
            return [str(v) for v in ast.literal_eval(text)]
        except (ValueError, SyntaxError):
            return [v.strip(" '\"") for v in text.strip("[]").split(",") if v.strip()]
    return [text]


def config_keys(config_files: Iterable[str]) -> set[str]:
    """Top-level keys defined across the given bundle config files (JSON or YAML)."""
    from monai.bundle import ConfigParser

    keys: set[str] = set()
    for f in config_files:
        content = ConfigParser.load_config_file(f)
        if not isinstance(content, Mapping):
            raise ConfigError(f"{f}: a bundle config must be a mapping of keys, got {type(content).__name__}")
        keys |= set(content)
    return keys


def unknown_keys(known: Iterable[str], override_ids: Iterable[str]) -> dict[str, list[str]]:
    """Override ids whose top-level key no config file defines -> {id: close matches among the known keys}."""
    known = set(known)
    return {i: difflib.get_close_matches(top_key(i), sorted(known), n=3)
            for i in override_ids if top_key(i) not in known}


def parse_bundle_argv(argv: Sequence[str]) -> tuple[list[str], list[str]] | None:
    """(config files, override ids) of a `python -m monai.bundle run ...` command line, None for other programs.

    Understands `--key value`, `--key=value` and fire's hyphen spelling (`--max-epochs`); an `--args_file` is read
    for its config_file and override keys too.
    """
    if len(argv) < 2 or Path(argv[0]).parent.name != "bundle" or "run" not in argv[1:3]:
        return None
    run_args = bundle_run_arguments()
    files: list[str] = []
    overrides: list[str] = []
    tokens = list(argv[1:])
    for i, tok in enumerate(tokens):
        if not tok.startswith("--"):
            continue
        name, eq, value = tok[2:].partition("=")
        name = name.replace("-", "_")
        if not eq:
            value = tokens[i + 1] if i + 1 < len(tokens) else ""
        if name == "config_file":
            files += config_file_list(value)
        elif name == "args_file":
            from monai.bundle import ConfigParser

            extra = ConfigParser.load_config_file(value)
            files += config_file_list(extra.get("config_file", []))
            overrides += [k for k in extra if k not in run_args]
        elif name not in run_args:
            overrides.append(name)
    return files, overrides


def referenced_keys(content) -> set[str]:
    """Top-level keys that the `@id` / `%id` references in a config's strings point to (recursively)."""
    if isinstance(content, str):
        return {top_key(m) for m in REFERENCE.findall(content)}
    if isinstance(content, Mapping):
        return set().union(*(referenced_keys(v) for v in content.values()))
    if isinstance(content, (list, tuple)):
        return set().union(*(referenced_keys(v) for v in content))
    return set()


def bundle_keys(folder: Path) -> set[str]:
    """Top-level keys defined by any JSON config of a bundle's config folder (the folder of the first config)."""
    from monai.bundle import ConfigParser

    keys: set[str] = set()
    for f in sorted(folder.glob("*.json")):
        try:
            content = ConfigParser.load_config_file(f)
        except (OSError, ValueError):
            continue
        if isinstance(content, Mapping):
            keys |= set(content)
    return keys


def override_file_typos(files: Sequence[str]) -> dict[str, dict[str, list[str]]]:
    """{file: {unknown key: close matches}} for the override files (all but the first config file).

    A key (the top-level part of an id such as `loss#bce_weight`) is known when another of the files defines or
    references it, or a config of the first file's bundle defines it (`loss_center_crop` in configs/pad.json is a
    training key, harmless when pad.json is merged into swa.json).
    """
    from monai.bundle import ConfigParser

    contents = [ConfigParser.load_config_file(f) for f in files]
    for f, content in zip(files, contents, strict=True):
        if not isinstance(content, Mapping):
            raise ConfigError(f"{f}: a bundle config must be a mapping of keys, got {type(content).__name__}")
    family = bundle_keys(Path(files[0]).parent) if files else set()
    typos: dict[str, dict[str, list[str]]] = {}
    for k in range(1, len(files)):
        others = [c for j, c in enumerate(contents) if j != k]
        known = family.union(*(set(c) | referenced_keys(c) for c in others))
        unknown = unknown_keys(known, contents[k])
        if unknown:
            typos[files[k]] = unknown
    return typos


def stray_words(tokens: Sequence[str]) -> list[tuple[str, str | None]]:
    """(word, the option before it or None) for each word of a `--KEY VALUE ...` list that no option takes.

    `--key value` and `--key=value` take one value each; a `--flag` followed by another option takes none.
    """
    stray, i, previous = [], 0, None
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--"):
            stray.append((tok, previous))
            i += 1
            continue
        takes_value = "=" not in tok and i + 1 < len(tokens) and not tokens[i + 1].startswith("--")
        previous = f"{tok} {tokens[i + 1]}" if takes_value else tok
        i += 2 if takes_value else 1
    return stray


def stray_word_message(word: str, previous: str | None) -> str:
    where = f" after {previous}" if previous else ""
    if word.lower().endswith((".json", ".yaml", ".yml")):
        return (f"config file {word} comes{where}, among the --KEY VALUE options: config files go first "
                "(saltkit train configs/pad.json configs/cpu.json --fold 1), or into --config_file's list")
    return (f"stray word {word!r}{where} on the command line: each --KEY takes exactly one value (quote a value "
            "with spaces); nothing has run")


def check_command_line(argv: Sequence[str] | None = None) -> None:
    """Fail on a word of a `python -m monai.bundle run RUN_ID ...` command line that no option takes.

    MONAI's runner reads such a word as its `init_id` and silently skips the bundle's `initialize` checks (the run
    folder's claim, the fold checks), so each workflow's `run` calls this first too.
    """
    from saltkit.io import clean_up_on_termination

    clean_up_on_termination()  # every workflow's run starts here: SIGTERM and SIGHUP clean up as Ctrl-C does
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or Path(argv[0]).parent.name != "bundle" or argv[1] != "run":
        return
    tokens = argv[3:] if len(argv) > 2 and not argv[2].startswith("-") else argv[2:]
    for word, previous in stray_words(tokens)[:1]:
        raise ConfigError(stray_word_message(word, previous))


def check_overrides(argv: Sequence[str] | None = None) -> None:
    """Fail on an override of a key that no config file defines: on the command line (`--max_epoch 3` for
    max_epochs) or inside an override file merged after the bundle config (`{"max_epoch": 3}`).

    Does nothing when the process is not `python -m monai.bundle run` (e.g. monai.bundle.run called in Python).
    """
    check_command_line(argv)
    parsed = parse_bundle_argv(sys.argv if argv is None else argv)
    if parsed is None:
        return
    files, overrides = parsed
    for f, unknown in override_file_typos(files).items():
        lines = [i + (f" (did you mean {' or '.join(m)}?)" if m else "") for i, m in unknown.items()]
        raise ConfigError(f"{f}: unknown config key(s) {'; '.join(lines)}. No other config file of {files} "
                          "defines them; check the spelling (keys are listed in bundles/saltnet/docs/README.md)")
    unknown = unknown_keys(config_keys(files), overrides)
    if unknown:
        lines = [f"--{i}" + (f" (did you mean {' or '.join(m)}?)" if m else "") for i, m in unknown.items()]
        raise ConfigError(f"unknown config key(s) on the command line: {'; '.join(lines)}. No config file of "
                          f"{files} defines them; check the spelling (keys are listed in bundles/saltnet/docs/README.md)")
