"""docs/gradients.md shows code that runs: every ```python block, and every command of its ```bash blocks.

Python blocks run as shown, each in a fresh interpreter with the repository root as the current folder
(as the README's are tested). The commands run in order in one scratch folder that sees the repository's
``benchmarks/`` (so the runs they write land there, not in the repository), with ``.venv/bin/python``
standing for this interpreter. Two documented commands take tens of minutes: they run with the
reductions in ``SHORTENED`` appended (the same code path on smaller sizes), and the test fails if the
guide's long commands are not exactly those, so none can hide.
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GUIDE = REPO / "docs" / "gradients.md"

#: the guide's long commands -> what is appended to run them here
SHORTENED = {
    ".venv/bin/python benchmarks/deep_norms.py --plots docs/images/deep_norms": "--quick",
    ".venv/bin/python benchmarks/grad_stats.py": "--steps 1",
}


def blocks(language):
    """``[(line number, code)]`` of the ```language blocks of the guide."""
    text = GUIDE.read_text(encoding="utf-8")
    fence = re.compile(rf"^```{language}[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in fence.finditer(text)]


def commands():
    """Every command line of the ```bash blocks, in order, comments stripped."""
    out = []
    for _, code in blocks("bash"):
        for line in code.splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


def test_the_guide_has_python_blocks_and_commands():
    assert len(blocks("python")) >= 3 and len(commands()) >= 3


@pytest.mark.slow
@pytest.mark.parametrize("line, code", [pytest.param(line, code, id=f"gradients.md:{line}")
                                        for line, code in blocks("python")])
def test_python_block_runs_as_shown(line, code):
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"the ```python block at line {line} fails:\n{code}\n{proc.stderr[-3000:]}"


@pytest.mark.slow
def test_commands_run_as_shown(tmp_path):
    """Each command of the guide, in order, in a scratch folder (the long ones shortened, see SHORTENED)."""
    (tmp_path / "benchmarks").symlink_to(REPO / "benchmarks")
    long_ones = [c for c in commands() if c in SHORTENED]
    assert long_ones == list(SHORTENED), f"the guide's long commands changed: {long_ones}; update SHORTENED"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for command in commands():
        argv = shlex.split(command) + shlex.split(SHORTENED.get(command, ""))
        assert argv[0] == ".venv/bin/python", f"a command of the guide does not start with .venv/bin/python: {command}"
        proc = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=900)
        assert proc.returncode == 0, f"`{command}` fails:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
