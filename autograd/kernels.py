"""The kernel API that fused ops call: how work is cut into pieces, and running the pieces on every core.

A fused op (GELU, LayerNorm, attention, Linear, AdamW's update) describes its
work as pieces and hands them here; it never asks which device it runs on or
how many threads there are. On the CPU the pieces run on autograd's worker
threads (``autograd.threads``); on the GPU (CuPy) an array is one piece and
one call, since a kernel is parallel already.

**The pieces depend on the shapes alone.** How an array, a block of rows or
a matrix product is cut is a function of its size, never of the thread count
or the device's mood, so a given step computes exactly the same sums in the
same order on 1, 2 or 8 threads: the same bits, on any BLAS. (Two BLAS calls
that cut one product differently need not agree bitwise: kernels differ by
CPU and by ``OPENBLAS_CORETYPE``. So nothing here ever compares a cut product
with an uncut one, and nothing cuts differently for a different thread count.)
Threads only decide *who* computes a piece, and every piece writes its own
part of the output; sums over pieces go through per-piece arrays added in
piece order.

The parts:

- ``pieces(xp, n)`` / ``row_pieces(xp, n_rows, row_len)``: slices of a flat
  array or of whole rows, about ``CHUNK_ELEMENTS`` elements each, in a multiple
  of ``PIECES_MULTIPLE`` when there is more than one; ``grid_pieces`` cuts a
  (batch, heads) grid for attention.
- ``scratch(xp, k, n, dtype)``: per-thread buffers for a piece's intermediates.
- ``run(pieces, body)``: ``body(piece)`` for every piece, over the threads.
- ``matmul(a, b, bias)``, ``matmul_tasks(a, b, out, bias)`` and ``run_tasks``:
  2-D matrix products cut into blocks of the output (``product_blocks``).

Why pieces at all: a chain like GELU's run over a whole activation makes one
pass through memory per step and one fresh temporary per intermediate; run
piece by piece, the intermediates live in small per-thread buffers that stay
in the L2 cache, and only the input and the output travel through memory. A
piece is 256 Ki elements (1 MiB of float32): smaller ones lose more to
handing the GIL between threads than they win in cache (64 Ki measured 1.72x
on two threads against 1.84x for 256 Ki; cutting a 100 Ki-element LayerNorm
into four pieces made it 1.8x slower).
"""

from __future__ import annotations

import threading

import numpy as np

from . import threads
from .backend import get_array_module as _xp

#: elements per piece on the CPU (float32: 1 MiB)
CHUNK_ELEMENTS = 1 << 18
#: an array of more than one piece is cut into a multiple of this many, so 2 or 4 threads share it evenly
PIECES_MULTIPLE = 4
#: fewest rows (or columns) of a matrix product's output block
MIN_BLOCK = 32
#: multiply-adds per block of a matrix product: a block is big enough that its BLAS call's fixed costs
#: (packing the shared operand, the call itself) stay small next to its arithmetic
BLOCK_WORK = 1 << 21
#: most blocks a matrix product is cut into
MAX_BLOCKS = 4


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _piece_size(n: int) -> int:
    """Elements per piece for an array of ``n``: at most ``CHUNK_ELEMENTS``, in a multiple of PIECES_MULTIPLE pieces."""
    if n <= CHUNK_ELEMENTS:
        return max(n, 1)
    count = _ceil_div(_ceil_div(n, CHUNK_ELEMENTS), PIECES_MULTIPLE) * PIECES_MULTIPLE
    return _ceil_div(n, count)


def pieces(xp, n: int, size: int | None = None) -> tuple:
    """``slice`` objects covering ``range(n)`` in pieces of ``size`` (default: about CHUNK_ELEMENTS); one for CuPy."""
    size = _piece_size(n) if size is None else size
    if xp is not np or n <= size:
        return (slice(0, n),)
    return tuple(slice(i, min(i + size, n)) for i in range(0, n, size))


def row_pieces(xp, n_rows: int, row_len: int) -> tuple:
    """Pieces of whole rows of a ``(n_rows, row_len)`` array, sized as ``pieces`` would (at least one row)."""
    return pieces(xp, n_rows, max(1, _ceil_div(_piece_size(n_rows * row_len), max(1, row_len))))


def grid_pieces(xp, n_outer: int, n_inner: int, cost_per_outer: int, target: int) -> list:
    """``(outer slice, inner slice)`` pieces of an ``(n_outer, n_inner)`` grid of independent jobs.

    All of it is one piece when its whole cost is at most ``target`` (and on
    CuPy). Otherwise runs of whole outer entries of about ``target`` cost each,
    at least PIECES_MULTIPLE of them; when there are fewer outer entries than
    that, single (outer, inner) cells. (Attention: outer = batch elements,
    inner = kv heads, cost = scores.) Shape-only, like every cut here.
    """
    if xp is not np or n_outer * cost_per_outer <= target:
        return [(slice(None), slice(None))]
    if n_outer < PIECES_MULTIPLE and n_inner > 1:
        return [(slice(b, b + 1), slice(h, h + 1)) for b in range(n_outer) for h in range(n_inner)]
    per_piece = max(1, min(target // max(1, cost_per_outer), _ceil_div(n_outer, PIECES_MULTIPLE)))
    return [(slice(b, min(b + per_piece, n_outer)), slice(None)) for b in range(0, n_outer, per_piece)]


_scratch = threading.local()  # .arrays: this thread's scratch arrays, by slot


def scratch(xp, k: int, n: int, dtype) -> list:
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


def run(work_pieces, body) -> None:
    """``body(piece)`` for every piece, spread over the CPU threads; returns when all are done."""
    threads.run(len(work_pieces), lambda i: body(work_pieces[i]))


def run_tasks(tasks, xp=np) -> None:
    """Run argument-less callables (pieces of one or several ops) over the threads; in order on the GPU."""
    if xp is not np:
        for task in tasks:
            task()
        return
    threads.run(len(tasks), lambda i: tasks[i]())


# ---------------------------------------------------------------------------
# matrix products
# ---------------------------------------------------------------------------


def product_blocks(m: int, k: int, n: int) -> list:
    """``(start, stop)`` of each block of a product's output (M, N) = (M, K) @ (K, N), along its longer side.

    At most MAX_BLOCKS blocks of at least MIN_BLOCK rows (or columns) and about
    BLOCK_WORK multiply-adds each, in a multiple of PIECES_MULTIPLE when there
    are several. Shape-only: the same cut on any number of threads.
    """
    length = max(m, n)
    count = min(MAX_BLOCKS, length // MIN_BLOCK, _ceil_div(m * k * n, BLOCK_WORK))
    if count > 1:
        count = min(_ceil_div(count, PIECES_MULTIPLE) * PIECES_MULTIPLE, length // MIN_BLOCK)
    count = max(1, count)
    edges = [length * i // count for i in range(count + 1)]
    return list(zip(edges[:-1], edges[1:]))


def matmul_tasks(a, b, out, bias=None) -> list:
    """The pieces of ``out[...] = a @ b (+ bias)`` for 2-D arrays: one callable per block of the output.

    The output is cut along its longer side (``product_blocks``): blocks of
    rows (of ``a``) or of columns (of ``b``), each one single-threaded BLAS
    call writing its part of ``out``. Transposed views (``x.T``, ``w.T``) and
    column blocks go to BLAS as strided operands, without a copy. (Cutting a
    weight gradient ``x.T @ g`` of shape (384, 1152) by columns measured 6%
    faster than by rows.) CuPy: one call. Give the tasks of several products
    to one ``run_tasks`` to pay for waking the threads once.
    """
    if not isinstance(out, np.ndarray):
        return [lambda: _matmul_into(a, b, out, bias)]
    if a.shape[0] >= b.shape[1]:
        def block(r0, r1):
            _matmul_into(a[r0:r1], b, out[r0:r1], bias)
    else:
        def block(c0, c1):
            _matmul_into(a, b[:, c0:c1], out[:, c0:c1], None if bias is None else bias[c0:c1])

    return [lambda i0=i0, i1=i1: block(i0, i1) for i0, i1 in product_blocks(a.shape[0], a.shape[1], b.shape[1])]


def _matmul_into(a, b, out, bias):
    """``out[...] = a @ b (+ bias)`` with the array library of ``out``."""
    _xp(out).matmul(a, b, out=out)
    if bias is not None:
        out += bias


def matmul(a, b, bias=None):
    """``a @ b`` (plus ``bias`` on every row), cut into blocks on the CPU threads for 2-D operands.

    Other shapes (batched products, vectors) and CuPy arrays take one plain
    ``a @ b``: NumPy's batched product is one BLAS call per matrix, the same
    whichever thread makes it.
    """
    if not isinstance(a, np.ndarray) or a.ndim != 2 or b.ndim != 2:
        out = a @ b
        if bias is not None:
            out += bias
        return out
    out = np.empty((a.shape[0], b.shape[1]), dtype=np.result_type(a.dtype, b.dtype))
    run_tasks(matmul_tasks(a, b, out, bias))
    return out


__all__ = ["CHUNK_ELEMENTS", "PIECES_MULTIPLE", "pieces", "row_pieces", "grid_pieces", "scratch", "run", "run_tasks",
           "product_blocks", "matmul_tasks", "matmul"]
