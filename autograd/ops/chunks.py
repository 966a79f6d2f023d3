"""Cache-sized pieces for chains of element-wise work on the CPU.

A chain like GELU's (square, scale, add, multiply, tanh, ...) run over a whole
activation makes one pass through memory per step and one fresh temporary per
intermediate. Run piece by piece, the intermediates live in a few small
buffers that stay in the L2 cache and are reused from piece to piece; only
the input and the output travel through memory, and no activation-sized
temporary is allocated (a fresh array costs page faults when the allocator
has handed memory back to the kernel). A piece is 256 Ki elements (1 MiB of
float32, within a core's L2 cache here): the pieces are spread over threads
(below), and smaller ones lose more to handing the GIL back and forth
between threads than they win in cache (64 Ki measured 1.72x on two threads
against 1.84x for 256 Ki; on one thread the two sizes are within 3%; cutting
a 100 Ki-element LayerNorm into four pieces made it 1.8x slower, not faster).

On the GPU (CuPy) every call is a kernel launch, so the whole array is one
piece there.

The pieces of one op are independent, so ``run`` spreads them over the
CPU worker threads (``autograd.threads``); each thread has its own scratch
buffers (``buffers``), kept from call to call.
"""

from __future__ import annotations

import threading

import numpy as np

from .. import threads

#: elements per piece on the CPU (float32: 1 MiB)
CHUNK_ELEMENTS = 1 << 18
#: an array of more than one piece is cut into a multiple of this many, so 2 or 4 threads share it evenly
PIECES_MULTIPLE = 4


def _piece_size(n: int) -> int:
    """Elements per piece for an array of ``n``: at most ``CHUNK_ELEMENTS``, in a multiple of PIECES_MULTIPLE pieces.

    It depends on the size alone, never on the thread count, so the pieces
    (and any sums over them) are the same on any number of threads.
    """
    if n <= CHUNK_ELEMENTS:
        return max(n, 1)
    count = -(-n // CHUNK_ELEMENTS)
    count = -(-count // PIECES_MULTIPLE) * PIECES_MULTIPLE
    return -(-n // count)


def slices(xp, n: int, size: int | None = None):
    """``slice`` objects covering ``range(n)`` in pieces of ``size`` (default ``_piece_size(n)``; one for CuPy)."""
    size = _piece_size(n) if size is None else size
    if xp is not np or n <= size:
        return (slice(0, n),)
    return tuple(slice(i, min(i + size, n)) for i in range(0, n, size))


def row_slices(xp, n_rows: int, row_len: int):
    """Pieces of whole rows of a ``(n_rows, row_len)`` array, sized as ``slices`` would (at least one row)."""
    return slices(xp, n_rows, max(1, -(-_piece_size(n_rows * row_len) // max(1, row_len))))


_scratch = threading.local()  # .arrays: this thread's scratch arrays, by slot


def buffers(xp, k: int, n: int, dtype):
    """``k`` scratch arrays of ``n`` elements (one piece's worth) for the intermediates of a chain.

    On the CPU they are this thread's own, reused by the next call (a piece's
    intermediates never outlive the piece); CuPy gets fresh arrays.
    """
    if xp is not np:
        return [xp.empty(n, dtype=dtype) for _ in range(k)]
    dtype = np.dtype(dtype)
    arrays = getattr(_scratch, "arrays", None)
    if arrays is None:
        arrays = _scratch.arrays = []
    out = []
    for slot in range(k):
        if slot == len(arrays):
            arrays.append(np.empty(0, dtype=np.uint8))
        if arrays[slot].nbytes < n * dtype.itemsize:
            arrays[slot] = np.empty(n * dtype.itemsize, dtype=np.uint8)
        out.append(arrays[slot][:n * dtype.itemsize].view(dtype))  # (n,)
    return out


def run(pieces, body):
    """``body(piece)`` for every piece, spread over the CPU threads (``autograd.threads.run``)."""
    threads.run(len(pieces), lambda i: body(pieces[i]))
