"""Worker threads for the CPU: the pieces of a fused op (``autograd.kernels``) run on every core.

NumPy releases the GIL inside its loops and BLAS calls, so ordinary Python
threads can run NumPy code in parallel. Element-wise NumPy is otherwise
single-threaded: on a 2-core machine half of the machine sits idle during
GELU, LayerNorm, softmax and AdamW, which PyTorch runs on all cores.

``run(n_pieces, work)`` calls ``work(i)`` for every piece, on the calling
thread and ``num_threads() - 1`` workers. Pieces are claimed one at a time
from a shared counter, so a worker that wakes late simply takes fewer pieces.
Which thread runs a piece never changes what it computes: how the work is cut
is decided by ``autograd.kernels`` from the shapes alone, so a step gives the
same bits on 1, 2 or 8 threads (tested on a whole GPT training step, under
several OpenBLAS kernels).

**BLAS runs single-threaded.** Two levels of threads fight: after a threaded
BLAS call OpenBLAS's idle workers spin on the other cores for about a tenth of
a second, and a thread of ours there gets nothing done; and a BLAS that splits
one product over its own threads may round differently with another thread
count. So importing autograd sets the BLAS libraries NumPy loaded to one
thread (``claim_blas``, through threadpoolctl), for good: the kernels cut
their products into blocks themselves, each one single-threaded BLAS call.
Like ``torch.set_num_threads``, autograd takes over the process's CPU threads.

The pool size is ``set_num_threads(n)``, by default the cores this process
may run on, divided among the MPI ranks on this machine (``mpirun`` unbound,
``--oversubscribe``), and at most ``OMP_NUM_THREADS`` when it is set (the one
variable to set: it caps this pool, and NumPy's BLAS reads it too). With one
thread, ``run`` is a plain loop over the same pieces. CuPy never comes here: a
GPU kernel is parallel already.

What it costs: handing a piece to a sleeping worker takes 17-35 µs (about
100 µs when the core has idled for 10 ms), and two threads trade the GIL at
every NumPy call, so pieces of less than ~50 µs of work gain nothing. The
kernels keep small arrays in one piece and small products in one block.
"""

from __future__ import annotations

import itertools
import os
import queue
import threading

_lock = threading.Lock()  # guards creating or resizing the pool
_local = threading.local()  # .inside: this thread is running a piece
_pool = None
_num_threads = None


def _default_num_threads() -> int:
    """Cores this process may use, shared with the other MPI ranks on this machine, capped by OMP_NUM_THREADS
    (or OPENBLAS_NUM_THREADS) when it is set."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    local_ranks = os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE", "").strip()  # set by Open MPI's mpirun
    if local_ranks.isdigit() and int(local_ranks) > 1 and n > 1:
        n = max(1, n // int(local_ranks))
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        value = os.environ.get(var, "").strip()
        if value.isdigit() and int(value) > 0:
            n = min(n, int(value))
    return max(1, n)


def num_threads() -> int:
    """Threads ``run`` uses (the caller included)."""
    global _num_threads
    if _num_threads is None:
        _num_threads = _default_num_threads()
    return _num_threads


def set_num_threads(n: int) -> None:
    """Use ``n`` threads (the caller included) for the CPU ops from now on; 1 runs every piece on the caller.

    The results are the same bits whatever ``n`` is (see the module doc).
    """
    global _num_threads, _pool
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"set_num_threads needs a positive whole number of threads, got {n!r}")
    with _lock:
        if _pool is not None and _pool.size != n:
            _pool.close()
            _pool = None
        _num_threads = n


class _Job:
    """One call of ``run``: the pieces still to claim, the count done, the first error."""

    def __init__(self, n_pieces, work):
        self.n_pieces, self.work = n_pieces, work
        self.next_piece = itertools.count()  # next() on it is atomic under the GIL
        self.done = 0
        self.error = None
        self.lock = threading.Lock()
        self.finished = threading.Lock()  # held until the last piece is done (a Lock wakes faster than an Event)
        self.finished.acquire()

    def run_pieces(self):
        """Claim and run pieces until none are left."""
        _local.inside = True
        try:
            while True:
                i = next(self.next_piece)
                if i >= self.n_pieces:
                    return
                try:
                    self.work(i)
                except BaseException as e:  # handed to the caller of run
                    with self.lock:
                        self.error = self.error or e
                with self.lock:
                    self.done += 1
                    if self.done == self.n_pieces:
                        self.finished.release()
        finally:
            _local.inside = False


class _Pool:
    """``size - 1`` daemon threads that wait for a job, take pieces of it, and wait again."""

    def __init__(self, size: int):
        self.size = size
        self.jobs = [queue.SimpleQueue() for _ in range(size - 1)]  # one inbox per worker; None closes it
        self.busy = threading.Lock()  # one job at a time; a second caller runs its pieces itself
        self.threads = [threading.Thread(target=self._serve, args=(inbox,), name=f"autograd-worker-{i}", daemon=True)
                        for i, inbox in enumerate(self.jobs)]
        for t in self.threads:
            t.start()

    @staticmethod
    def _serve(inbox):
        while True:
            job = inbox.get()
            if job is None:
                return
            job.run_pieces()

    def run(self, n_pieces, work):
        job = _Job(n_pieces, work)
        for inbox in self.jobs[:n_pieces - 1]:
            inbox.put(job)
        job.run_pieces()
        job.finished.acquire()
        if job.error is not None:
            raise job.error

    def close(self):
        for inbox in self.jobs:
            inbox.put(None)


_blas_claimed = False


def claim_blas() -> None:
    """Set the BLAS libraries NumPy loaded to one thread (once per process; see the module doc)."""
    global _blas_claimed
    if _blas_claimed:
        return
    from threadpoolctl import ThreadpoolController

    for controller in ThreadpoolController().select(user_api="blas").lib_controllers:
        controller.set_num_threads(1)
    _blas_claimed = True


def run(n_pieces: int, work) -> None:
    """Call ``work(i)`` for ``i`` in ``range(n_pieces)``, spread over ``num_threads()`` threads; return when all are done.

    Each piece must write only its own part of the output (see the module
    doc). The first exception a piece raises is re-raised here after every
    piece has finished. Called from inside a piece, or with one thread or one
    piece, it is a plain loop on the calling thread.
    """
    global _pool
    if n_pieces <= 0:
        return
    if n_pieces == 1 or num_threads() == 1 or getattr(_local, "inside", False):
        for i in range(n_pieces):
            work(i)
        return
    with _lock:
        if _pool is None:
            _pool = _Pool(num_threads())
        pool = _pool
    if not pool.busy.acquire(blocking=False):  # another thread of the program is using the pool
        for i in range(n_pieces):
            work(i)
        return
    try:
        pool.run(n_pieces, work)
    finally:
        pool.busy.release()


def _forget_pool_in_child():
    """A forked child has none of the parent's threads: start a fresh pool there when needed (BLAS stays claimed)."""
    global _pool, _lock
    _pool, _lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)

claim_blas()  # before any op runs: every BLAS call of a run sees the same single thread


__all__ = ["num_threads", "set_num_threads", "run", "claim_blas"]
