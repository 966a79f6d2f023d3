"""Cache-sized pieces for chains of element-wise work on the CPU.

A chain like GELU's (square, scale, add, multiply, tanh, ...) run over a whole
activation makes one pass through memory per step and one fresh temporary per
intermediate. Run piece by piece, the intermediates live in a few small
buffers that stay in the L2 cache and are reused from piece to piece; only
the input and the output travel through memory, and no activation-sized
temporary is allocated (a fresh array costs page faults when the allocator
has handed memory back to the kernel). A piece of 64 Ki float32 elements
(256 KiB) measured best: smaller pieces pay NumPy's per-call cost (about a
microsecond per ufunc call) too often, larger ones fall out of the cache.

On the GPU (CuPy) every call is a kernel launch, so the whole array is one
piece there.

(Spreading the pieces over threads, which NumPy allows since it releases
the GIL inside its loops, was measured and dropped: in a training step each
element-wise op follows a matrix product, after which OpenBLAS's idle
workers keep spinning on the other cores for a while, and a second thread
bought nothing.)
"""

from __future__ import annotations

import numpy as np

#: elements per piece on the CPU (float32: 256 KiB)
CHUNK_ELEMENTS = 1 << 16


def slices(xp, n: int, size: int | None = None, start: int = 0):
    """``slice`` objects covering ``range(start, n)`` in pieces of ``size`` (default ``CHUNK_ELEMENTS``;
    one piece for CuPy)."""
    size = CHUNK_ELEMENTS if size is None else size
    if xp is not np or n - start <= size:
        return (slice(start, n),)
    return tuple(slice(i, min(i + size, n)) for i in range(start, n, size))


def row_slices(xp, n_rows: int, row_len: int):
    """Pieces of whole rows of a ``(n_rows, row_len)`` array, about ``CHUNK_ELEMENTS`` each (at least one row)."""
    return slices(xp, n_rows, max(1, CHUNK_ELEMENTS // max(1, row_len)))


def buffers(xp, k: int, n: int, dtype):
    """``k`` scratch arrays of ``n`` elements (one piece's worth) for the intermediates of a chain."""
    return [xp.empty(n, dtype=dtype) for _ in range(k)]
