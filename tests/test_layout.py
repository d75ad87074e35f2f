"""The design's one-way dependencies (shared design, "House style"), checked on the source.

``node -> model`` and ``training -> model``; ``model`` imports neither; the
service code in ``node`` never imports ``training``: only the CLI, the
composition root (``node/cli.py`` and ``node/cli_learning.py``, where a training
run's record meets the trainer), wires the three packages together.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _imported_packages(path: Path) -> set[str]:
    """Top-level packages a module imports, wherever the import statement is (inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize(("package", "forbidden", "allowed_modules"), [
    ("model", {"node", "training"}, set()),
    ("training", {"node"}, set()),
    # the composition root: cli.py and the command module where the trainer meets the node's records
    ("node", {"training"}, {"cli.py", "cli_learning.py"}),
])
def test_dependencies_point_one_way(package: str, forbidden: set[str], allowed_modules: set[str]) -> None:
    offenders = {}
    for path in sorted((REPO / package).rglob("*.py")):
        if path.name in allowed_modules and path.parent == REPO / package:
            continue
        bad = _imported_packages(path) & forbidden
        if bad:
            offenders[str(path.relative_to(REPO))] = sorted(bad)
    assert not offenders, f"imports against the design's direction: {offenders}"
