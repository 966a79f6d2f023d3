"""DESIGN.md's import direction, checked on the source: llm and parallel may import nn and autograd; nn only
autograd; autograd only NumPy, the standard library and threadpoolctl (CuPy in backend.py alone)."""

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PROJECT = {"autograd", "nn", "llm", "parallel"}
ALLOWED = {  # project packages each package may import
    "autograd": {"autograd"},
    "nn": {"autograd", "nn"},
    "parallel": {"autograd", "nn", "parallel"},
    "llm": {"autograd", "nn", "parallel", "llm"},
}
AUTOGRAD_THIRD_PARTY = {"numpy", "threadpoolctl"}


def _imports(path: Path):
    """Top-level package names imported anywhere in the file (lazy imports inside functions included)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.split(".")[0], node.lineno
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0], node.lineno


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_flow_one_way(package):
    wrong = []
    for path in sorted((REPO / package).rglob("*.py")):
        for name, line in _imports(path):
            if name in PROJECT and name not in ALLOWED[package]:
                wrong.append(f"{path.relative_to(REPO)}:{line} imports {name}")
            if package == "autograd" and name not in PROJECT and name not in AUTOGRAD_THIRD_PARTY \
                    and name not in sys.stdlib_module_names:
                if not (name == "cupy" or name == "cupyx") or path.name != "backend.py":
                    wrong.append(f"{path.relative_to(REPO)}:{line} imports {name}")
    assert not wrong, "imports against DESIGN.md's direction:\n" + "\n".join(wrong)
