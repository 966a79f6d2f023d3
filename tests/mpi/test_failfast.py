"""parallel.launch under mpirun: output from rank 0 only, and what the fail-fast hooks do on a real rank.

The hooks are driven with a stand-in whose ``abort`` only records the call (a
real abort would end this test job); the end-to-end check, a nested mpirun in
which rank 1 raises, is in tests/test_parallel_local.py.
"""

import sys
import threading

import pytest

from parallel import abort_on_error, install_excepthook, is_rank0, rank0_print

pytestmark = pytest.mark.mpi


class RecordingComm:
    """The rank and size of a real communicator; ``abort`` records its code instead of ending the job."""

    def __init__(self, comm):
        self.rank, self.size = comm.rank, comm.size
        self.aborted = []

    def abort(self, code=1):
        self.aborted.append(code)


def test_rank0_print_and_is_rank0(comm, assert_all_ranks, capsys):
    rank0_print("step 1", "loss 2.5", comm=comm)
    out = capsys.readouterr().out
    want = "step 1 loss 2.5\n" if comm.rank == 0 else ""
    assert_all_ranks(comm, out == want, f"printed {out!r}")
    flags = comm.allgather(is_rank0(comm))
    assert_all_ranks(comm, flags == [True] + [False] * (comm.size - 1), f"is_rank0 on each rank: {flags}")


def test_excepthook_prefixes_rank_and_aborts(comm, assert_all_ranks, capsys):
    rec = RecordingComm(comm)
    saved_hook, saved_thread_hook = sys.excepthook, threading.excepthook
    try:
        install_excepthook(rec, code=3)
        try:
            raise RuntimeError(f"boom on rank {comm.rank}")
        except RuntimeError as e:
            sys.excepthook(type(e), e, e.__traceback__)
        thread_hook_installed = threading.excepthook is not saved_thread_hook
    finally:
        sys.excepthook, threading.excepthook = saved_hook, saved_thread_hook
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert_all_ranks(comm, rec.aborted == [3], f"abort calls: {rec.aborted}")
    assert_all_ranks(comm, lines and all(line.startswith(f"rank {comm.rank}: ") for line in lines),
                     f"unprefixed traceback lines: {lines}")
    assert_all_ranks(comm, f"rank {comm.rank}: RuntimeError: boom on rank {comm.rank}" in err, err)
    assert_all_ranks(comm, thread_hook_installed, "threads' exceptions are not covered")


def test_abort_on_error_block(comm, assert_all_ranks, capsys):
    rec = RecordingComm(comm)
    with abort_on_error(rec):
        pass  # no exception: nothing happens
    clean = rec.aborted == []
    with abort_on_error(rec):
        raise ValueError("inside the block")
    err = capsys.readouterr().err
    assert_all_ranks(comm, clean and rec.aborted == [1], f"abort calls: {rec.aborted}")
    assert_all_ranks(comm, f"rank {comm.rank}: ValueError: inside the block" in err, err)
