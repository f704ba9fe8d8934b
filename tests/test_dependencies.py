"""Every third-party module the package imports at module level is a declared (non-optional) dependency, so
`pip install -e .` alone runs the quick start; optional extras (segyio, onnx) must be imported inside functions."""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]


def module_level_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:  # top-level statements only: lazy imports are allowed
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_module_level_imports_are_declared_dependencies():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0].lower().replace("_", "-") for d in project["dependencies"]}
    dists = packages_distributions()
    missing = {}
    for path in sorted((REPO / "saltkit").rglob("*.py")):
        for name in module_level_imports(path):
            if name in sys.stdlib_module_names or name in ("saltkit", "__future__"):
                continue
            owners = {d.lower().replace("_", "-") for d in dists.get(name, [name])}
            if not owners & declared:
                missing.setdefault(name, []).append(str(path.relative_to(REPO)))
    assert not missing, f"imported at module level but not in pyproject's dependencies: {missing}"
