"""Worker threads for the CPU: heavy ops split their work into pieces and run them on every core.

NumPy releases the GIL inside its loops and BLAS calls, so ordinary Python
threads can run NumPy code in parallel. Element-wise NumPy is otherwise
single-threaded: on a 2-core machine half of the machine sits idle during
GELU, LayerNorm, softmax and AdamW, which PyTorch runs on all cores.

``run(n_pieces, work)`` calls ``work(i)`` for every piece, on the calling
thread and ``num_threads() - 1`` workers. Pieces are claimed one at a time
from a shared counter, so a worker that wakes late simply takes fewer pieces.

Two rules keep it simple and reproducible:

- **BLAS runs single-threaded while the pool exists.** Two levels of threads
  fight: after a threaded BLAS call OpenBLAS's idle workers spin on the other
  cores for about a tenth of a second, and a thread of ours there gets
  nothing done. So the ops split their matrix products into pieces too (blocks
  of the output, ``matmul_pieces``), each one a single-threaded BLAS call. Like
  ``torch.set_num_threads``, this takes over the process's BLAS threads:
  ``set_num_threads(1)`` closes the pool and gives BLAS its threads back.
- **Results never depend on which thread ran a piece.** Every piece writes its
  own part of the output, and a sum over pieces goes through a per-piece array
  added up in piece order afterwards; how an op cuts its work into pieces
  depends on the shapes alone, or (matrix products, attention heads) cuts
  along rows or columns that are computed independently. So two threads or eight give
  the same bits (tested on a whole GPT training step). One thread hands each
  whole product to BLAS and its own threads, whose sums can round differently.

The pool size is ``set_num_threads(n)``, by default the cores this process
may run on, divided among the MPI ranks on this machine (``mpirun`` unbound,
``--oversubscribe``), and at most ``OMP_NUM_THREADS`` / ``OPENBLAS_NUM_THREADS``
when they are set. With one thread, ``run`` is a plain loop. CuPy never comes
here: a GPU kernel is parallel already.

What it costs: handing a piece to a sleeping worker takes 17-35 µs (about
100 µs when the core has idled for 10 ms), and two threads trade the GIL at
every NumPy call, so pieces of less than ~50 µs of work gain nothing. The ops
keep small arrays in one piece (``chunks``) and small products in one block.
"""

from __future__ import annotations

import itertools
import os
import queue
import threading

import numpy as np

_lock = threading.Lock()  # guards creating or resizing the pool
_local = threading.local()  # .inside: this thread is running a piece
_pool = None
_num_threads = None


def _default_num_threads() -> int:
    """Cores this process may use, shared with the other MPI ranks on this machine, capped by OMP_NUM_THREADS /
    OPENBLAS_NUM_THREADS when they are set."""
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
    """Use ``n`` threads (the caller included) for the CPU ops from now on; 1 runs everything on the caller."""
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
        self.blas = [(c, c.get_num_threads()) for c in _blas_controllers()]  # to restore in close()
        for c, _ in self.blas:
            c.set_num_threads(1)
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
        for c, n in self.blas:
            c.set_num_threads(n)


def _blas_controllers():
    """threadpoolctl's handles on the BLAS libraries NumPy loaded (to run them single-threaded beside the pool)."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController().select(user_api="blas").lib_controllers


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


#: fewest rows of a matrix product worth a piece of its own
MIN_ROWS_PER_PIECE = 32
#: fewest multiply-adds of a product worth cutting at all: a product of a few rows (a generation step's
#: (B, C) activations) costs less on one core than waking a second one
MIN_MACS_TO_SPLIT = 1 << 22


def _row_bounds(n_rows: int):
    """``(start, stop)`` of one block of rows (or columns) per thread (fewer when one would be under MIN_ROWS_PER_PIECE)."""
    parts = max(1, min(num_threads(), n_rows // MIN_ROWS_PER_PIECE))
    edges = [n_rows * i // parts for i in range(parts + 1)]
    return list(zip(edges[:-1], edges[1:]))


def matmul_pieces(a, b, out, bias=None):
    """The pieces of ``out[...] = a @ b (+ bias)`` for 2-D NumPy arrays: one callable per block of the output.

    The output is cut along its longer side: blocks of rows (of ``a``) or of
    columns (of ``b``). Each block is one single-threaded BLAS call writing
    its part of ``out``, and an entry of a matrix product does not depend on
    the others, so the bits are those of one ``a @ b``. Transposed views
    (``x.T``, ``w.T``) and column blocks go to BLAS as strided operands,
    without a copy. (Cutting a weight gradient ``x.T @ g`` of shape (384, 1152)
    by columns measured 6% faster than by rows.) Give the pieces of several
    products to one ``run`` (``run_all``) to pay for waking the threads once.
    """
    if a.shape[0] >= b.shape[1]:
        def block(r0, r1):
            np.matmul(a[r0:r1], b, out=out[r0:r1])
            if bias is not None:
                out[r0:r1] += bias
    else:
        def block(c0, c1):
            np.matmul(a, b[:, c0:c1], out=out[:, c0:c1])
            if bias is not None:
                out[:, c0:c1] += bias[c0:c1]

    return [lambda i0=i0, i1=i1: block(i0, i1) for i0, i1 in _row_bounds(max(a.shape[0], b.shape[1]))]


def run_all(tasks) -> None:
    """Run argument-less callables (pieces of one or several ops) spread over the threads: ``run`` over a list."""
    run(len(tasks), lambda i: tasks[i]())


def matmul(a, b, bias=None):
    """``a @ b`` (plus ``bias`` on every row) for 2-D ``a`` (M, K) and ``b`` (K, N), in blocks on the threads.

    CuPy arrays, other shapes, one thread and products of fewer than
    ``MIN_MACS_TO_SPLIT`` multiply-adds take plain ``a @ b``.
    """
    if (not isinstance(a, np.ndarray) or num_threads() == 1 or a.ndim != 2 or b.ndim != 2
            or max(a.shape[0], b.shape[1]) < 2 * MIN_ROWS_PER_PIECE  # one block: no thread to wake
            or a.shape[0] * a.shape[1] * b.shape[1] < MIN_MACS_TO_SPLIT):
        out = a @ b
        if bias is not None:
            out += bias
        return out
    out = np.empty((a.shape[0], b.shape[1]), dtype=np.result_type(a.dtype, b.dtype))
    run_all(matmul_pieces(a, b, out, bias))
    return out


def _forget_pool_in_child():
    """A forked child has none of the parent's threads: start a fresh pool there when needed."""
    global _pool, _lock
    _pool, _lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)


__all__ = ["num_threads", "set_num_threads", "run", "run_all", "matmul", "matmul_pieces"]
