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

DOCUMENTS = ["README.md", "docs/architecture.md"]  # relative to the repository root

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


def _section(text, heading):
    """The Markdown section that starts at ``heading`` and runs to the next heading."""
    start = text.index(heading)
    nxt = re.search(r"^#{1,3} ", text[start + len(heading):], re.MULTILINE)
    return text[start:start + len(heading) + (nxt.start() if nxt else len(text))]


def test_the_cache_section_matches_the_code(tmp_path, monkeypatch):
    """README's "The cache" says where the cache is, what is in it and how to clear it: the code agrees."""
    from llm import corpus
    from llm.train_data import cache_root, corpus_folder, default_tokenizer, prepare_training_data

    section = _section((REPO / "README.md").read_text(encoding="utf-8"), "### The cache")
    monkeypatch.delenv("LLM_FROM_SCRATCH_CACHE", raising=False)
    default = "~/" + str(corpus.cache_dir().relative_to(Path.home()))
    assert default in section and f"rm -rf {default}" in section
    monkeypatch.setenv("LLM_FROM_SCRATCH_CACHE", str(tmp_path / "cache"))
    assert corpus.cache_dir() == tmp_path / "cache" and "$LLM_FROM_SCRATCH_CACHE" in section
    assert corpus._SHAKESPEARE_CACHE_NAME in section and "datasets/" in section
    from llm.eval import datasets as eval_data
    from llm.post import data as post_data
    for name, module in (("eval", eval_data), ("post", post_data)):  # the benchmark and post-training data
        assert module._root(None) == tmp_path / "cache" / name, name
        assert f"{name}/downloads/" in section and f"{name}/v{module.CONVERSION_VERSION}/" in section, name
    # a run's cache has the layout the section draws
    (tmp_path / "a.txt").write_text("the cat sees the moon. a dog likes the river.\n" * 40)
    folder, resolved = corpus_folder([str(tmp_path / "a.txt")])
    assert folder.parent == cache_root() == tmp_path / "cache" / "datasets"
    tok = default_tokenizer(resolved, folder, 270, log=None)
    default_tokenizer(resolved, folder, 2048, log=None)
    _, _, data_dir = prepare_training_data([str(tmp_path / "a.txt")], tok, folder, 8, log=None)
    names = {p.name for p in folder.iterdir()} | {p.name for p in data_dir.iterdir()}
    for name in ("sources.json", "tokenizer-bpe270-gpt4.json", "train_000.bin", "val_000.bin"):
        assert name in names and (name in section or name.startswith("tokenizer-")), name
    assert any(n.endswith("-gpt4-complete.json") for n in names) and '"-complete"' in section
    assert "tokenizer-bpe2048-gpt4.json" in section and data_dir.name.startswith("tokens-")


def test_readme_says_how_long_the_tests_take():
    section = _section((REPO / "README.md").read_text(encoding="utf-8"), "## Quick start")
    assert re.search(r"Run all the tests \(about [\d.]+ minutes on a 2-core machine", section)
