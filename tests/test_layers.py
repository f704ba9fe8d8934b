"""The package's layers, in the order data flows: no module imports from a layer above its own.

Every `import saltkit...` / `from saltkit... import` in every module counts, including imports inside functions
(a lazy import is still a dependency). A module not listed in LAYERS fails the test, so a new module gets a place.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "saltkit"

# Lowest first. A module may import from its own layer and any layer below.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("saltkit", "saltkit.config", "saltkit.errors", "saltkit.io", "saltkit.geometry", "saltkit.rle",
                    "saltkit.logs", "saltkit.labels", "saltkit.pictures")),
    ("data", ("saltkit.data", "saltkit.submission")),
    ("transforms", ("saltkit.transforms", "saltkit.augmentation")),
    ("networks", ("saltkit.networks",)),
    ("losses and metrics", ("saltkit.losses", "saltkit.metrics")),
    ("checkpoint format", ("saltkit.checkpoints",)),
    ("training engines and handlers", ("saltkit.handlers", "saltkit.precision", "saltkit.recipe",
                                       "saltkit.finetune", "saltkit.rundir", "saltkit.training")),
    ("inference", ("saltkit.inference", "saltkit.export", "saltkit.swa")),
    ("seismic I/O", ("saltkit.seismic",)),
    ("command line", ("saltkit.cli",)),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    """Index in LAYERS of the longest prefix that names `module` or a package holding it."""
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    if best is None or (best_len == len("saltkit") and module != "saltkit"):
        raise KeyError(module)
    return best


def saltkit_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every saltkit import in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "saltkit"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                node.module.split(".")[0] == "saltkit":
            found.append((node.lineno, node.module))
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    missing = []
    for path in MODULES:
        try:
            layer_of(module_name(path))
        except KeyError:
            missing.append(module_name(path))
    assert not missing, f"add these modules to a layer in LAYERS: {missing}"


@pytest.mark.parametrize("path", MODULES, ids=[module_name(p) for p in MODULES])
def test_no_import_from_a_higher_layer(path):
    own = layer_of(module_name(path))
    upward = [f"line {line}: {target} ({LAYERS[layer_of(target)][0]})"
              for line, target in saltkit_imports(path) if layer_of(target) > own]
    assert not upward, f"{module_name(path)} ({LAYERS[own][0]}) imports from a higher layer: {upward}"


def test_the_check_sees_an_upward_import(tmp_path):
    # the walk finds imports inside functions too, and ranks them
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from saltkit.training import fold_split\n")
    (line, target), = saltkit_imports(source)
    assert line == 2 and layer_of(target) > layer_of("saltkit.data.folds")


def test_no_two_modules_share_a_name():
    # a module's name says what it holds: `images.py` in two folders, or `commands.py`, hid which is which
    names: dict[str, list[str]] = {}
    for path in MODULES:
        names.setdefault(path.name, []).append(module_name(path))
    shared = {name: modules for name, modules in names.items() if len(modules) > 1 and name != "__init__.py"}
    assert not shared, f"modules sharing a file name in different folders: {shared}"
