"""Every command the user docs show, checked against the code: a renamed module, a removed option, a config key
no config defines or a missing file breaks this test, not the user's first hour.

Commands come from the ```bash blocks of the README, docs/*.md, benchmarks/README.md and the bundle docs
(continuation lines joined, comments dropped, `&&` chains split). Each is checked the way it would run:
- `saltkit NAME ...` and `python -m saltkit.cli ...`: parsed by the real command line (unknown options, missing
  arguments and bad choices fail); a bundle workflow's override files must exist and its keys be defined;
- `python -m monai.bundle run ID --config_file ...`: the files exist, ID and every key are defined in them;
  other `monai.bundle` commands: the files they name exist;
- `torchrun ... -m MODULE ...`: MODULE imports, and its arguments are checked as above;
- `python SCRIPT.py ...`: the script exists and every saltkit name it imports exists;
- a path of this repository (`bundles/`, `configs/`, `saltkit/`, ...) in any command exists.
The quick start's commands are also run for real (the prediction here; the training by tests/test_bundle.py).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", ROOT / "bundles" / "saltnet" / "docs" / "README.md",
        *sorted((ROOT / "docs").glob("*.md"))]
# first words that install, test or view rather than run saltkit, or start another program (dask's cluster)
NOT_CHECKED = {"pip", "tox", "tensorboard", "cd", "export", "ls", "cat", "dask"}
REPO_PREFIXES = ("bundles/", "configs/", "saltkit/", "benchmarks/", "docs/", "tests/")
FENCE = re.compile(r"^```(\w*)\s*$")


def bash_blocks(path: Path) -> list[tuple[int, str]]:
    """(first line number, text) of each ```bash block of a Markdown file."""
    blocks, current, start, lang = [], None, 0, ""
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        fence = FENCE.match(line.strip())
        if fence and current is None:
            current, start, lang = [], number + 1, fence.group(1)
        elif line.strip() == "```" and current is not None:
            if lang in ("bash", "sh", "shell", "console"):
                blocks.append((start, "\n".join(current)))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def commands_of(text: str) -> list[str]:
    """Commands of a shell block: continuation lines joined, comments dropped, `&&` chains split."""
    joined = re.sub(r"\\\n\s*", " ", text)
    out = []
    for line in joined.splitlines():
        # a comment starts at a # that begins a word (a # inside a word is a bundle id: --validate#handlers)
        words = shlex.split(re.sub(r"(^|\s)#.*$", "", line))
        if not words:
            continue
        command: list[str] = []
        for word in words + ["&&"]:
            if word == "&&":
                if command:
                    out.append(shlex.join(command))
                command = []
            else:
                command.append(word)
    return out


def documented_commands() -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        if not doc.exists():
            continue
        for start, block in bash_blocks(doc):
            found += [(f"{doc.relative_to(ROOT)}:{start}", c) for c in commands_of(block)]
    return found


COMMANDS = documented_commands()


def check_repo_paths(words: list[str]) -> None:
    for word in words:
        for part in re.split(r"[\s,'\"\[\]=]+", word):
            if part.startswith(REPO_PREFIXES) and not any(ch in part for ch in "*?<>"):
                assert (ROOT / part).exists(), f"{part} does not exist in the repository"


def check_saltkit(args: list[str]) -> None:
    from saltkit.cli import all_subcommands, build_parser, parse_command_line
    from saltkit.cli.workflows import WORKFLOWS, bundle_argv

    registry = all_subcommands()
    assert args and args[0] in registry, f"saltkit has no command {args[:1]}"
    workflow = next((w for w in WORKFLOWS if w.name == args[0] and registry[args[0]].passthrough), None)
    if workflow is not None:
        check_bundle_run(bundle_argv(workflow, args[1:]))
        return
    try:
        parse_command_line(build_parser(registry), registry, args)
    except SystemExit as e:
        pytest.fail(f"saltkit {shlex.join(args)}: the command line refuses it (exit {e.code})")


def check_bundle_run(argv: list[str]) -> None:
    from saltkit.config import config_keys, parse_bundle_argv, unknown_keys

    parsed = parse_bundle_argv(argv)
    assert parsed is not None, f"not a monai.bundle run command line: {argv}"
    files, overrides = parsed
    missing = [f for f in files if not (ROOT / f).exists()]
    assert not missing, f"config files not found: {missing}"
    keys = config_keys([str(ROOT / f) for f in files])
    run_id = argv[argv.index("run") + 1] if "run" in argv and not argv[argv.index("run") + 1].startswith("-") \
        else "run"
    assert run_id in keys, f"no config of {files} defines the workflow {run_id!r}"
    unknown = unknown_keys(keys, overrides)
    assert not unknown, f"keys no config of {files} defines: {unknown}"


def check_monai_bundle(args: list[str]) -> None:
    """`python -m monai.bundle COMMAND ...` (args after the module name)."""
    import monai.bundle.__main__ as bundle_main

    if args[0] == "run":
        check_bundle_run([bundle_main.__file__, *args])
        return
    from monai.bundle import scripts

    assert hasattr(scripts, args[0]), f"monai.bundle has no command {args[0]!r}"


def check_module(module: str, args: list[str]) -> None:
    if module == "monai.bundle":
        check_monai_bundle(args)
    elif module in ("saltkit", "saltkit.cli"):
        check_saltkit(args)
    else:
        assert importlib.util.find_spec(module) is not None, f"no module {module}"


def saltkit_names(script: Path) -> list[tuple[str, str | None]]:
    """(module, name or None) of every saltkit import of a script, at any depth."""
    found = []
    for node in ast.walk(ast.parse(script.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(a.name, None) for a in node.names if a.name.split(".")[0] == "saltkit"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] == "saltkit":
            found += [(node.module, a.name) for a in node.names]
    return found


def check_script(path: str) -> None:
    script = ROOT / path
    assert script.is_file(), f"{path} does not exist"
    for module, name in saltkit_names(script):
        loaded = importlib.import_module(module)
        if name is not None and not hasattr(loaded, name):
            assert importlib.util.find_spec(f"{module}.{name}") is not None, f"{path}: {module} has no {name}"


def check_command(command: str) -> None:
    words = shlex.split(command)
    check_repo_paths(words)
    first = words[0]
    if first in NOT_CHECKED:
        return
    if first == "saltkit":
        check_saltkit(words[1:])
    elif first in ("python", "python3"):
        if words[1] == "-m":
            check_module(words[2], words[3:])
        else:
            check_script(words[1])
    elif first == "torchrun":
        module_at = words.index("-m")
        check_module(words[module_at + 1], words[module_at + 2:])
    else:
        pytest.fail(f"no rule for documented commands starting with {first!r}: add one to {Path(__file__).name}")


def test_docs_show_commands():
    places = {where.split(":")[0] for where, _ in COMMANDS}
    assert {"README.md", "docs/seismic.md"} <= places
    assert len(COMMANDS) >= 20


@pytest.mark.parametrize("where, command", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_command(where, command):
    check_command(command)


@pytest.mark.parametrize("command", [
    "saltkit predict saltkit/sample_data/sections/mosaic_9_127.png --outt pred/",
    "saltkit train configs/pad.json --max_epoch 2",
    "python -m monai.bundle run training --config_file \"['bundles/saltnet/configs/train.json','configs/pads.json']\"",
    "python bundles/saltnet/docs/make_pictures_gone.py CKPT",
    "python -m saltkit.no_such_module",
    "saltkit export CKPT --format tensorrt",
])
def test_broken_commands_are_caught(command):
    with pytest.raises((AssertionError, pytest.fail.Exception)):
        check_command(command)


def test_script_with_a_renamed_module_is_caught(tmp_path, monkeypatch):
    script = tmp_path / "old.py"
    script.write_text("from saltkit.inference.restore import restore_tiles\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    with pytest.raises(ModuleNotFoundError):
        check_script("old.py")


def test_quick_start_prediction_runs(tmp_path):
    """The README's first prediction, as a user runs it: the shipped model on the sample section."""
    command = next(c for _, c in COMMANDS if c.startswith("saltkit predict saltkit/sample_data/sections/"))
    words = shlex.split(command)
    out = tmp_path / "pred"
    words[words.index("--out") + 1] = str(out)
    result = subprocess.run([sys.executable, "-m", "saltkit.cli", *words[1:]], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "bundles/saltnet/models/model.pt" in result.stderr + result.stdout
    assert (out / "mosaic_9_127_overlay.png").stat().st_size > 10_000
