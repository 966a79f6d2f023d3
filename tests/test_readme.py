"""The project's documents show code that runs: every ```python block of each document in DOCUMENTS runs,
as shown, in a fresh interpreter with the repository root as the current folder.

A block is run on its own (a reader copies one block at a time), so each must carry its own imports. To
add a document, add its path to DOCUMENTS; to show code that is not meant to run as it stands (a
fragment, an outline), fence it as ```text instead.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

DOCUMENTS = ["README.md"]  # relative to the repository root; e.g. "docs/architecture.md" once it exists

_FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def python_blocks(path):
    """``[(line number, code)]`` of the ```python blocks of the Markdown file ``path``."""
    text = Path(path).read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in _FENCE.finditer(text)]


def document_blocks(documents=DOCUMENTS):
    """One pytest parameter per block of each document, named ``document:line``."""
    return [pytest.param(doc, code, id=f"{doc}:{line}")
            for doc in documents for line, code in python_blocks(REPO / doc)]


def test_the_extractor_finds_blocks_and_only_python_ones(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("text\n```python\nx = 1\n```\n```bash\necho no\n```\n\n```python\nprint(x)\n```\n")
    assert python_blocks(doc) == [(2, "x = 1\n"), (9, "print(x)\n")]


def test_every_document_has_python_blocks():
    for doc in DOCUMENTS:
        assert python_blocks(REPO / doc), f"{doc} has no ```python block: drop it from DOCUMENTS"


@pytest.mark.parametrize("document, code", document_blocks())
def test_python_block_runs_as_shown(document, code):
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"a ```python block of {document} fails:\n{code}\n{proc.stderr[-3000:]}"


def test_license_file_matches_pyproject():
    """pyproject.toml says MIT; the LICENSE file is the MIT text with the project's copyright line."""
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")  # (tomllib is Python 3.11+; we run on 3.10)
    assert re.search(r'^license = \{ text = "MIT" \}$', pyproject, re.MULTILINE)
    license_path = REPO / "LICENSE"
    assert license_path.is_file(), "LICENSE is missing"
    text = license_path.read_text(encoding="utf-8")
    assert text.startswith("MIT License\n")
    assert "Copyright (c) 2026 the llm-from-scratch authors\n" in text
    assert "Permission is hereby granted, free of charge" in text and 'THE SOFTWARE IS PROVIDED "AS IS"' in text
