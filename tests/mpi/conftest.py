"""Fixtures for tests that run under mpirun (``-m mpi``): the world communicator and cross-rank assertions.

Run (see .ci/run)::

    mpirun -n 2 --oversubscribe .venv/bin/python -m mpi4py -m pytest -m mpi tests/mpi -q -p no:cacheprovider
    mpirun -n 4 --oversubscribe ...

Every rank runs every test. An assertion that fails on one rank only must not
leave the others waiting in the next collective, so every check goes through
``assert_all_ranks(comm, condition, message)``: an all-gather of the pass flag
and the message, then the same AssertionError (naming the failing ranks) on
every rank. Any *other* exception escaping a test while more than one rank runs
(a bug, or a bare ``assert``) may have happened on one rank only: the plugin below
prints it and aborts the whole job at once instead of letting it hang.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

import numpy as np
import pytest

from parallel.comm import get_world


class AllRanksAssertionError(AssertionError):
    """Raised by ``assert_all_ranks`` on every rank at once: safe to let pytest report."""


def assert_all_ranks(comm, condition, message: str = ""):
    """Assert ``condition`` on every rank of ``comm`` together.

    Every rank must call it (it is a collective). If the condition is False on
    any rank, every rank raises ``AllRanksAssertionError`` listing the failing
    ranks and their messages.
    """
    ok = bool(condition)
    results = comm.allgather((ok, "" if ok else str(message)))
    failed = [(r, m) for r, (passed, m) in enumerate(results) if not passed]
    if failed:
        detail = "; ".join(f"rank {r}: {m}" for r, m in failed)
        raise AllRanksAssertionError(f"failed on rank(s) {[r for r, _ in failed]} of {comm.size}: {detail}")


def shared_folder(comm, prefix: str, fill):
    """A temporary folder for a module's tests: rank 0 makes it and calls ``fill(path)``, every rank gets its
    path (a generator for a fixture: ``yield from shared_folder(...)``), rank 0 removes it at the end."""
    path = tempfile.mkdtemp(prefix=prefix) if comm.rank == 0 else None
    path = comm.bcast(path, root=0)
    if comm.rank == 0:
        fill(path)
    comm.barrier()
    yield path
    comm.barrier()
    if comm.rank == 0:
        shutil.rmtree(path, ignore_errors=True)


#: the words of the small corpora the training tests write (``write_word_corpus``)
WORDS = "the cat sees a dog . my friend likes the moon . a young girl finds the river .".split()


def write_word_corpus(path: str, seed: int) -> None:
    """``path/corpus.txt``: 600 lines of 12 words drawn from ``WORDS`` with ``seed``."""
    r = np.random.default_rng(seed)
    text = "\n".join(" ".join(WORDS[i] for i in r.integers(len(WORDS), size=12)) for _ in range(600))
    with open(os.path.join(path, "corpus.txt"), "w") as f:
        f.write(text + "\n")


@pytest.fixture(scope="session")
def comm():
    """The world communicator (size > 1 under mpirun)."""
    return get_world()


@pytest.fixture(scope="session", name="shared_folder")
def shared_folder_fixture():
    """The ``shared_folder(comm, prefix, fill)`` generator, for a module's ``folder`` fixture."""
    return shared_folder


@pytest.fixture(scope="session", name="write_word_corpus")
def write_word_corpus_fixture():
    """The ``write_word_corpus(path, seed)`` function."""
    return write_word_corpus


@pytest.fixture(name="assert_all_ranks")
def assert_all_ranks_fixture():
    """The ``assert_all_ranks(comm, condition, message)`` function."""
    return assert_all_ranks


@pytest.fixture(autouse=True)
def _fast_flops(monkeypatch):
    """Training runs here skip timing a matrix product for their MFU denominator (a fixed 10 GFLOP/s)."""
    from llm.trainer import trainer as trainer_mod

    monkeypatch.setattr(trainer_mod, "measure_matmul_flops", lambda device="cpu", n=512, seconds=0.5: 1e10)


@pytest.fixture(autouse=True)
def _lockstep(comm):
    """A barrier after every test: all ranks leave a test together (and a desync shows up here, not later)."""
    yield
    comm.barrier()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Abort the job when a test raised something other than a combined assertion on one rank (no hang)."""
    outcome = yield
    report = outcome.get_result()
    if call.when != "call" or not report.failed or call.excinfo is None:
        return
    comm = get_world()
    if comm.size > 1 and not isinstance(call.excinfo.value, AllRanksAssertionError):
        sys.stderr.write(f"\nrank {comm.rank}: {item.nodeid} raised {call.excinfo.typename} outside "
                         f"assert_all_ranks; aborting the MPI job so the other ranks do not hang:\n"
                         f"{report.longreprtext}\n")
        sys.stderr.flush()
        comm.abort(1)
