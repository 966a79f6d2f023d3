"""``Communicator``: one object for every collective and point-to-point message, over mpi4py.

    >>> from parallel import get_world
    >>> comm = get_world()            # the MPI world under mpirun, a size-1 stand-in otherwise
    >>> total = comm.allreduce(3, op="sum")

The same training code runs at world size 1 with no mpirun (and without mpi4py
installed): ``get_world()`` then returns a stand-in whose collectives are copies
and whose sends to itself are queued for its own receives.

Arrays travel as buffers (mpi4py's upper-case methods, no pickling); small
Python objects (numbers, lists, dicts) travel pickled (the lower-case methods).
Rules shared by every method:

- Arrays are NumPy or CuPy. A CuPy array goes to MPI directly when the MPI
  library is CUDA-aware (detected with Open MPI's ``MPIX_Query_cuda_support``, or
  forced with the environment variable ``LLM_CUDA_AWARE_MPI=1``/``0``); otherwise
  it is staged through host memory: the current CUDA stream is synchronised (the
  kernels that wrote the array must have finished), the array is copied to the
  host, MPI runs on the host copy, and the result is copied back. The staging
  path cannot be tested on a machine without a GPU.
- ``Communicator(..., nccl=True)`` runs collectives on CuPy arrays through NCCL
  (``cupy.cuda.nccl``; the unique id is broadcast over MPI when the first CuPy
  collective is called). Point-to-point messages always use MPI.
- Reductions of float16 (and bfloat16) are done in float32: cast up, reduce, cast
  down. Broadcasts, gathers and messages move raw bytes, so any dtype works.
- Reductions: ``op`` is "sum", "mean" (the sum divided by the size; floating
  arrays only), "max" or "min".
- MPI matches collectives by the order in which each rank calls them: every rank
  of a communicator must call the same collectives in the same order (non-blocking
  ones included).
"""

from __future__ import annotations

import collections
import ctypes
import os
import sys
from dataclasses import dataclass

import numpy as np

from autograd.backend import get_array_module, is_array

OPS = ("sum", "mean", "max", "min")

# environment variables that a launcher (Open MPI, MPICH/Hydra, PMIx, Slurm's PMI) sets for every rank
_LAUNCHER_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")
_LAUNCHER_VARS = _LAUNCHER_SIZE_VARS + ("PMIX_RANK", "PMI_RANK")

MPI_INSTALL_HINT = ('install the MPI extra with `pip install -e ".[mpi]"` (mpi4py and the PyPI build of Open MPI, '
                    "which provides mpirun)")


def launched_by_mpirun() -> bool:
    """True when this process was started by an MPI launcher (mpirun, mpiexec, srun)."""
    return any(k in os.environ for k in _LAUNCHER_VARS)


def local_rank() -> int:
    """This process's index among the ranks on its own machine (0 without a launcher): pick the GPU with it.

    ``cupy.cuda.Device(local_rank() % n_gpus).use()`` before building models (and
    before the first NCCL collective) gives each rank of a node its own GPU.
    """
    for k in ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID", "PMI_LOCAL_RANK"):
        if k in os.environ:
            try:
                return int(os.environ[k])
            except ValueError:
                pass
    return 0


def launcher_world_size() -> int | None:
    """The world size the launcher announced in the environment, or None when there is none."""
    for k in _LAUNCHER_SIZE_VARS:
        if k in os.environ:
            try:
                return int(os.environ[k])
            except ValueError:
                pass
    return None


def _import_mpi():
    """Import ``mpi4py.MPI`` (initialising MPI), or raise a RuntimeError that says how to get it."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise RuntimeError(f"this needs mpi4py, which is not installed ({e}): {MPI_INSTALL_HINT}") from None
    return MPI


# ---------------------------------------------------------------------------
# requests
# ---------------------------------------------------------------------------


class Request:
    """A non-blocking operation in flight: ``wait()`` completes it and returns its result.

    ``wait()`` may be called more than once (later calls return the same result).
    ``test()`` says, without blocking, whether the operation has finished (it
    completes it when it has). Keep the request (and so the buffers it holds)
    alive until it is waited for.
    """

    __slots__ = ("_req", "_finish", "_result", "_done", "_keep")

    def __init__(self, mpi_request=None, finish=None, result=None, keep=None):
        self._req = mpi_request
        self._finish = finish
        self._result = result
        self._done = False
        self._keep = keep  # buffers MPI still reads or writes: alive until the wait

    def wait(self):
        """Block until the operation has completed; return its result (the array, or None for a send)."""
        if not self._done:
            if self._req is not None:
                self._req.Wait()
            self._complete()
        return self._result

    def test(self) -> bool:
        """True when the operation has completed (it is then finished as by ``wait()``); never blocks."""
        if self._done:
            return True
        if self._req is not None and not self._req.Test():
            return False
        self._complete()
        return True

    def _complete(self):
        if self._finish is not None:
            self._result = self._finish()
        self._done = True
        self._req = self._finish = self._keep = None

    @staticmethod
    def wait_all(requests) -> list:
        """Wait for every request (in order); return their results."""
        return [r.wait() for r in requests]


# ---------------------------------------------------------------------------
# transports: the raw byte/number movers under a Communicator
# ---------------------------------------------------------------------------


class _SelfTransport:
    """World size 1 without MPI: collectives are identities, messages to rank 0 go through a mailbox."""

    rank, size = 0, 1
    name = "single process"

    def __init__(self):
        self._mailbox = collections.defaultdict(collections.deque)  # tag -> payloads sent to ourselves

    # buffers are already in place: every collective over one rank leaves them as they are
    def allreduce(self, buf, op, nonblocking=False):
        return None

    def bcast(self, buf, root):
        _check_root(root, 1)

    def allgather(self, send, recv):
        recv.reshape(-1)[...] = send.reshape(-1)  # (n,) into (size * n,) with size 1

    def reduce_scatter_block(self, send, recv, op):
        recv[...] = send

    def barrier(self):
        pass

    def _check_peer(self, peer, what):
        if peer != 0:
            raise ValueError(f"{what} rank {peer} does not exist: the world has one process (rank 0)")

    def send(self, buf, dest, tag):
        self._check_peer(dest, "send to")
        self._mailbox[tag].append(buf.copy())

    def isend(self, buf, dest, tag):
        self.send(buf, dest, tag)
        return None

    def recv(self, buf, source, tag):
        self._check_peer(source, "recv from")
        box = self._mailbox.get(tag)
        if not box:
            raise RuntimeError(f"recv(source=0, tag={tag}) in a one-process world with no matching send: "
                               "this would wait forever (send before you receive)")
        msg = box.popleft()
        if msg.nbytes != buf.nbytes:
            raise ValueError(f"recv buffer of {buf.nbytes} bytes for a message of {msg.nbytes} bytes (tag {tag})")
        buf[...] = msg.view(buf.dtype).reshape(buf.shape)  # bytes back to the buffer's shape

    def irecv(self, buf, source, tag):
        self._check_peer(source, "recv from")
        return _Deferred(lambda: self.recv(buf, source, tag))

    # pickled Python objects
    def allreduce_obj(self, value, op):
        return value

    def bcast_obj(self, obj, root):
        _check_root(root, 1)
        return obj

    def allgather_obj(self, obj):
        return [obj]

    def send_obj(self, obj, dest, tag):
        self._check_peer(dest, "send to")
        self._mailbox[("obj", tag)].append(obj)

    def recv_obj(self, source, tag):
        self._check_peer(source, "recv from")
        box = self._mailbox.get(("obj", tag))
        if not box:
            raise RuntimeError(f"recv(source=0, tag={tag}) in a one-process world with no matching send")
        return box.popleft()

    def split(self, color, key):
        return None if color is None else _SelfTransport()

    def dup(self):
        return _SelfTransport()

    def free(self):
        pass

    def abort(self, code):
        sys.stderr.flush()
        os._exit(code)


class _Deferred:
    """A request-like object whose work runs at ``Wait()`` (the stand-in's irecv)."""

    def __init__(self, fn):
        self._fn = fn

    def Wait(self):
        if self._fn is not None:
            fn, self._fn = self._fn, None
            fn()

    def Test(self):
        self.Wait()
        return True


class _MPITransport:
    """An mpi4py communicator: upper-case methods on contiguous buffers, lower-case ones on objects."""

    name = "MPI"

    def __init__(self, mpi_comm):
        self.MPI = _import_mpi()
        self.comm = mpi_comm
        self.rank = mpi_comm.Get_rank()
        self.size = mpi_comm.Get_size()

    def _op(self, op):
        MPI = self.MPI
        return {"sum": MPI.SUM, "mean": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}[op]

    def allreduce(self, buf, op, nonblocking=False):
        if nonblocking:
            return self.comm.Iallreduce(self.MPI.IN_PLACE, buf, op=self._op(op))
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self._op(op))
        return None

    def bcast(self, buf, root):
        _check_root(root, self.size)
        self.comm.Bcast(_bytes(buf), root=root)

    def allgather(self, send, recv):
        self.comm.Allgather(_bytes(send), _bytes(recv))

    def reduce_scatter_block(self, send, recv, op):
        self.comm.Reduce_scatter_block(send, recv, op=self._op(op))

    def barrier(self):
        self.comm.Barrier()

    def send(self, buf, dest, tag):
        self.comm.Send(_bytes(buf), dest=dest, tag=tag)

    def isend(self, buf, dest, tag):
        return self.comm.Isend(_bytes(buf), dest=dest, tag=tag)

    def recv(self, buf, source, tag):
        self.comm.Recv(_bytes(buf), source=source, tag=tag)

    def irecv(self, buf, source, tag):
        return self.comm.Irecv(_bytes(buf), source=source, tag=tag)

    def allreduce_obj(self, value, op):
        return self.comm.allreduce(value, op=self._op(op))

    def bcast_obj(self, obj, root):
        _check_root(root, self.size)
        return self.comm.bcast(obj, root=root)

    def allgather_obj(self, obj):
        return self.comm.allgather(obj)

    def send_obj(self, obj, dest, tag):
        self.comm.send(obj, dest=dest, tag=tag)

    def recv_obj(self, source, tag):
        return self.comm.recv(source=source, tag=tag)

    def split(self, color, key):
        sub = self.comm.Split(self.MPI.UNDEFINED if color is None else int(color), key)
        if sub == self.MPI.COMM_NULL:
            return None
        return _MPITransport(sub)

    def dup(self):
        return _MPITransport(self.comm.Dup())

    def free(self):
        if self.comm not in (self.MPI.COMM_WORLD, self.MPI.COMM_SELF, self.MPI.COMM_NULL):
            self.comm.Free()

    def abort(self, code):
        sys.stderr.flush()
        sys.stdout.flush()
        self.MPI.COMM_WORLD.Abort(code)


def _bytes(buf):
    """The array's memory as a flat uint8 array (a view): what byte-moving calls send."""
    return buf.reshape(-1).view(np.uint8)  # (nbytes,)


def _check_root(root, size):
    if not 0 <= root < size:
        raise ValueError(f"root rank {root} does not exist in a communicator of size {size}")


def _reduction_dtype(dtype) -> np.dtype:
    """The dtype a reduction runs in: float32 for half-precision floats, the dtype itself otherwise."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f" and dtype.itemsize < 4:
        return np.dtype(np.float32)
    if dtype.name == "bfloat16":  # ml_dtypes' type on NumPy
        return np.dtype(np.float32)
    return dtype


# ---------------------------------------------------------------------------
# CUDA-aware MPI detection
# ---------------------------------------------------------------------------

_cuda_aware_cache = None


def cuda_aware_mpi() -> bool:
    """Whether MPI can read and write CuPy (device) buffers directly.

    ``LLM_CUDA_AWARE_MPI=1`` (or ``0``) in the environment decides; otherwise
    Open MPI's ``MPIX_Query_cuda_support()`` is asked through ctypes (Open MPI
    built with CUDA answers 1; the PyPI build answers 0). Other MPI libraries:
    False (staging through the host is always correct, only slower).
    """
    global _cuda_aware_cache
    env = os.environ.get("LLM_CUDA_AWARE_MPI")
    if env is not None:
        return env.strip().lower() in ("1", "true", "yes")
    if _cuda_aware_cache is None:
        _cuda_aware_cache = False
        try:
            _import_mpi()
            with open("/proc/self/maps") as f:
                libs = sorted({line.split()[-1] for line in f if "libmpi.so" in line})
            for path in libs:
                query = getattr(ctypes.CDLL(path), "MPIX_Query_cuda_support", None)
                if query is not None:
                    _cuda_aware_cache = bool(query())
                    break
        except Exception:
            _cuda_aware_cache = False
    return _cuda_aware_cache


# ---------------------------------------------------------------------------
# the communicator
# ---------------------------------------------------------------------------


class Communicator:
    """A group of processes (ranks 0..size-1) and the collectives and messages between them.

    Build one with ``Communicator.world()`` / ``get_world()``, or from another
    with ``split(color, key)``. ``Communicator(mpi_comm)`` wraps an mpi4py
    communicator; ``Communicator()`` is the one-process stand-in.

    ``nccl=True``: collectives on CuPy arrays go through NCCL (see the module
    docstring); NumPy arrays and point-to-point messages still use MPI.
    """

    def __init__(self, mpi_comm=None, nccl: bool = False):
        self._t = _SelfTransport() if mpi_comm is None else _MPITransport(mpi_comm)
        self.rank = self._t.rank
        self.size = self._t.size
        self.use_nccl = bool(nccl)
        self._nccl = None  # cupy.cuda.nccl.NcclCommunicator, made at the first CuPy collective

    @classmethod
    def _from_transport(cls, transport, nccl):
        obj = cls.__new__(cls)
        obj._t = transport
        obj.rank, obj.size = transport.rank, transport.size
        obj.use_nccl = nccl
        obj._nccl = None
        return obj

    @classmethod
    def world(cls, nccl: bool = False) -> "Communicator":
        """The world communicator (cached): MPI's COMM_WORLD under mpirun, else the size-1 stand-in.

        MPI is used when a launcher's environment variables are present or
        ``mpi4py.MPI`` is already imported (``python -m mpi4py`` imports it).
        Under mpirun with more than one process and no mpi4py: a RuntimeError
        that says how to install it.
        """
        global _WORLD
        if _WORLD is None or _WORLD.use_nccl != bool(nccl):
            _WORLD = _make_world(nccl)
        return _WORLD

    # -- facts -----------------------------------------------------------------
    @property
    def is_mpi(self) -> bool:
        """True when this communicator runs over MPI (False for the one-process stand-in)."""
        return isinstance(self._t, _MPITransport)

    @property
    def mpi_comm(self):
        """The underlying mpi4py communicator (None for the stand-in)."""
        return self._t.comm if self.is_mpi else None

    def __repr__(self):
        return f"Communicator(rank={self.rank}, size={self.size}, {self._t.name}{', nccl' if self.use_nccl else ''})"

    # -- groups ----------------------------------------------------------------
    def split(self, color, key: int | None = None) -> "Communicator | None":
        """Split into sub-communicators: ranks that pass the same ``color`` form one (a collective call).

        Within a new communicator ranks are ordered by ``key`` (default: the
        rank here). ``color=None`` takes this rank out of every group and returns None.
        """
        t = self._t.split(color, self.rank if key is None else int(key))
        return None if t is None else Communicator._from_transport(t, self.use_nccl)

    def dup(self) -> "Communicator":
        """A new communicator over the same ranks, whose messages never mix with this one's (a collective call)."""
        return Communicator._from_transport(self._t.dup(), self.use_nccl)

    def free(self):
        """Release a communicator made by ``split`` or ``dup`` (the world is never freed)."""
        self._t.free()

    def barrier(self):
        """Wait until every rank has called ``barrier()``."""
        self._t.barrier()

    def abort(self, code: int = 1):
        """End every process of the job now (MPI_Abort on the world), with exit status ``code``."""
        self._t.abort(code)

    # -- buffer plumbing ---------------------------------------------------------
    def _stage(self, a):
        """Return ``(buffer for MPI, copy_back)``: the array itself, or a host copy of a CuPy array.

        A CuPy array: the current stream is synchronised first (MPI knows nothing
        of CUDA streams, so the kernels writing ``a`` must be done). Without
        CUDA-aware MPI the data goes through a NumPy copy; ``copy_back()`` puts
        what MPI wrote there back on the device.
        """
        xp = get_array_module(a)
        if xp is np:
            return a, None
        xp.cuda.get_current_stream().synchronize()
        if cuda_aware_mpi():
            return a, None
        host = xp.asnumpy(a)

        def copy_back():
            a.set(host)

        return host, copy_back

    def _nccl_comm(self, xp):
        """The NCCL communicator for CuPy collectives, made on first use (its id broadcast over MPI)."""
        if self._nccl is None:
            nccl = _nccl_module()
            uid = nccl.get_unique_id() if self.rank == 0 else None
            uid = self._t.bcast_obj(uid, 0)
            self._nccl = nccl.NcclCommunicator(self.size, uid, self.rank)
        return self._nccl

    def _uses_nccl(self, a) -> bool:
        return self.use_nccl and self.size > 1 and get_array_module(a) is not np

    @staticmethod
    def _check_array(a, what, writable=False):
        if not is_array(a):
            raise TypeError(f"{what} needs a NumPy or CuPy array, got {type(a).__name__}")
        if writable and not a.flags.c_contiguous:
            raise ValueError(f"{what} writes into its argument, which must be C-contiguous: pass "
                             "xp.ascontiguousarray(a) and read the result from the returned array")

    @staticmethod
    def _check_op(op, dtype=None):
        if op not in OPS:
            raise ValueError(f"unknown reduction op {op!r}: use one of {OPS}")
        if op == "mean" and dtype is not None and np.dtype(dtype).kind != "f":
            raise TypeError(f"op='mean' needs a floating array, got dtype {dtype}: reduce with 'sum' and divide")

    # -- all-reduce ----------------------------------------------------------------
    def allreduce(self, x, op: str = "sum", inplace: bool = False):
        """Combine ``x`` over all ranks with ``op``; every rank gets the result.

        ``x`` is an array (the result is a new array, or ``x`` itself, overwritten,
        with ``inplace=True``) or a Python/NumPy number or bool (the result is a
        number; pickled). float16 is reduced in float32 and cast back.
        """
        if not is_array(x):
            self._check_op(op, np.asarray(x).dtype if op == "mean" else None)
            out = self._t.allreduce_obj(x, op)
            return out / self.size if op == "mean" else out
        return self.iallreduce(x, op, inplace=inplace, _blocking=True).wait()

    def iallreduce(self, x, op: str = "sum", inplace: bool = True, _blocking: bool = False) -> Request:
        """Start an all-reduce of array ``x``; ``wait()`` on the returned request gives the result.

        In place by default (``x`` is overwritten with the result when the
        request completes; do not touch it before). ``inplace=False`` leaves
        ``x`` as it is and the request's result is a new array.
        """
        self._check_array(x, "allreduce", writable=inplace)
        self._check_op(op, x.dtype)
        work_dtype = _reduction_dtype(x.dtype)
        if work_dtype != x.dtype:
            work = x.astype(work_dtype)  # cast up: half-precision sums are done in float32
        else:
            work = x if inplace else x.copy()
        work = work if work.flags.c_contiguous else get_array_module(work).ascontiguousarray(work)
        size = self.size

        if self._uses_nccl(work):
            xp = get_array_module(work)
            nc = self._nccl_comm(xp)
            stream = xp.cuda.get_current_stream()
            nc.allReduce(work.data.ptr, work.data.ptr, work.size, _nccl_dtype(xp, work.dtype),
                         _nccl_op(xp, op), stream.ptr)
            req, copy_back, keep = None, None, None  # ordered on the stream: later kernels see the result
        elif size == 1:
            req, copy_back, keep = None, None, None  # one rank: the sum is the array itself
        else:
            buf, copy_back = self._stage(work)
            req = self._t.allreduce(buf, op, nonblocking=not _blocking)
            keep = buf

        def finish():
            if copy_back is not None:
                copy_back()
            if op == "mean" and size > 1:
                work.__itruediv__(size)  # a Python int keeps the dtype
            if work is x:
                return x
            if inplace:
                x[...] = work  # cast back down into the caller's array
                return x
            return work.astype(x.dtype) if work.dtype != x.dtype else work

        return Request(req, finish, keep=keep)

    # -- broadcast -------------------------------------------------------------------
    def bcast(self, x, root: int = 0):
        """Rank ``root``'s value on every rank.

        An array is broadcast in place (every rank passes a C-contiguous array of
        the same shape and dtype; it is returned). Anything else is pickled: pass
        the object on the root (others may pass None) and use the returned value.
        """
        if not is_array(x):
            return self._t.bcast_obj(x, root)
        self._check_array(x, "bcast", writable=True)
        if self.size == 1:
            _check_root(root, 1)
            return x
        if self._uses_nccl(x):
            xp = get_array_module(x)
            nc = self._nccl_comm(xp)
            flat = _bytes(x)
            nc.bcast(flat.data.ptr, flat.size, _nccl_module().NCCL_UINT8, root, xp.cuda.get_current_stream().ptr)
            return x
        buf, copy_back = self._stage(x)
        self._t.bcast(buf, root)
        if copy_back is not None:
            copy_back()
        return x

    # -- all-gather ------------------------------------------------------------------
    def allgather(self, x, out=None):
        """Every rank's ``x``, stacked: an array of shape ``(size, *x.shape)`` on every rank.

        Every rank passes an array of the same shape and dtype (raw bytes move,
        so any dtype works). ``out``: a C-contiguous array of ``size * x.size``
        elements of ``x``'s dtype to write into (any shape; it is returned as it
        is). A non-array ``x`` is pickled: the result is a list, one entry per rank.
        """
        if not is_array(x):
            return self._t.allgather_obj(x)
        xp = get_array_module(x)
        x = xp.ascontiguousarray(x)
        if out is None:
            out = xp.empty((self.size,) + x.shape, dtype=x.dtype)
            result = out
        else:
            self._check_array(out, "allgather(out=...)", writable=True)
            if out.dtype != x.dtype or out.size != self.size * x.size:
                raise ValueError(f"allgather out= needs {self.size} x {x.size} elements of {x.dtype}, got "
                                 f"{out.size} of {out.dtype}")
            result = out
        if self.size == 1:
            out.reshape(-1)[...] = x.reshape(-1)  # (n,): one rank gathers itself
            return result
        if self._uses_nccl(x):
            nc = self._nccl_comm(xp)
            send, recv = _bytes(x), _bytes(out)
            nc.allGather(send.data.ptr, recv.data.ptr, send.size, _nccl_module().NCCL_UINT8,
                         xp.cuda.get_current_stream().ptr)
            return result
        send, _ = self._stage(x)
        recv, copy_back = self._stage(out)
        self._t.allgather(send, recv)
        if copy_back is not None:
            copy_back()
        return result

    # -- reduce-scatter ------------------------------------------------------------
    def chunk_size(self, n: int) -> int:
        """Elements per rank when ``n`` elements are split into ``size`` equal chunks: ceil(n / size)."""
        return -(-int(n) // self.size)

    def reduce_scatter(self, x, op: str = "sum", out=None):
        """Reduce ``x`` over all ranks and give rank r the r-th of ``size`` equal chunks of the result.

        ``x`` is read flat (C order). Chunks have ``chunk_size(x.size)`` =
        ceil(n / size) elements; when ``n`` is not a multiple of ``size`` the flat
        input is padded with zeros at the end, so the last rank's chunk ends with
        padding (zeros for "sum" and "mean"; its values are meaningless for
        "max"/"min" and should be ignored). Pass a padded array (a multiple of
        ``size`` long) to avoid the copy. ``out``: a C-contiguous array of the
        chunk's size and ``x``'s dtype to write into. float16 is reduced in float32.
        """
        self._check_array(x, "reduce_scatter")
        self._check_op(op, x.dtype)
        xp = get_array_module(x)
        n = x.size
        chunk = self.chunk_size(n)
        work_dtype = _reduction_dtype(x.dtype)
        flat = x.reshape(-1)  # (n,)
        if chunk * self.size != n or work_dtype != x.dtype or not flat.flags.c_contiguous:
            padded = xp.zeros(chunk * self.size, dtype=work_dtype)  # (size * chunk,)
            padded[:n] = flat
            flat = padded
        if out is not None:
            self._check_array(out, "reduce_scatter(out=...)", writable=True)
            if out.size != chunk or out.dtype != x.dtype:
                raise ValueError(f"reduce_scatter out= needs {chunk} elements of {x.dtype}, "
                                 f"got {out.size} of {out.dtype}")
        direct = out is not None and out.dtype == work_dtype  # reduce straight into the caller's array
        recv = out.reshape(-1) if direct else xp.empty(chunk, dtype=work_dtype)  # (chunk,)
        if self.size == 1:
            recv[...] = flat
        elif self._uses_nccl(flat):
            nc = self._nccl_comm(xp)
            nc.reduceScatter(flat.data.ptr, recv.data.ptr, chunk, _nccl_dtype(xp, work_dtype),
                             _nccl_op(xp, op), xp.cuda.get_current_stream().ptr)
        else:
            send, _ = self._stage(flat)
            rbuf, copy_back = self._stage(recv)
            self._t.reduce_scatter_block(send, rbuf, op)
            if copy_back is not None:
                copy_back()
        if op == "mean" and self.size > 1:
            recv /= self.size
        if out is None:
            return recv if recv.dtype == x.dtype else recv.astype(x.dtype)
        if not direct:
            out.reshape(-1)[...] = recv  # (chunk,), cast back down
        return out

    # -- point to point --------------------------------------------------------------
    def send(self, x, dest: int, tag: int = 0):
        """Send ``x`` to rank ``dest`` (blocking). An array goes as raw bytes; anything else is pickled.

        Blocking sends of more than the eager limit (a few KB) wait for the
        matching receive: order sends and receives so that pairs meet (or use
        ``isend``/``irecv``).
        """
        if not is_array(x):
            self._t.send_obj(x, dest, tag)
            return
        x = get_array_module(x).ascontiguousarray(x)
        buf, _ = self._stage(x)
        self._t.send(buf, dest, tag)

    def recv(self, out=None, source: int = 0, tag: int = 0):
        """Receive from rank ``source`` (blocking) into array ``out`` (C-contiguous, the sent size) and return it.

        ``out=None`` receives a pickled object sent with ``send(obj)`` and returns it.
        """
        if out is None:
            return self._t.recv_obj(source, tag)
        self._check_array(out, "recv", writable=True)
        buf, copy_back = self._stage(out)
        self._t.recv(buf, source, tag)
        if copy_back is not None:
            copy_back()
        return out

    def isend(self, x, dest: int, tag: int = 0) -> Request:
        """Start sending array ``x`` to ``dest``; ``wait()`` the request before changing ``x``."""
        self._check_array(x, "isend")
        x = get_array_module(x).ascontiguousarray(x)
        buf, _ = self._stage(x)
        return Request(self._t.isend(buf, dest, tag), keep=buf)

    def irecv(self, out, source: int = 0, tag: int = 0) -> Request:
        """Start receiving into array ``out`` from ``source``; ``wait()`` returns ``out``, filled."""
        self._check_array(out, "irecv", writable=True)
        buf, copy_back = self._stage(out)
        req = self._t.irecv(buf, source, tag)

        def finish():
            if copy_back is not None:
                copy_back()
            return out

        return Request(req, finish, keep=buf)


def _nccl_module():
    """``cupy.cuda.nccl``, imported on first use (only ever reached with CuPy arrays)."""
    import importlib

    return importlib.import_module("cupy.cuda.nccl")


def _nccl_dtype(xp, dtype):
    nccl = _nccl_module()
    table = {np.dtype(np.float32): nccl.NCCL_FLOAT32, np.dtype(np.float64): nccl.NCCL_FLOAT64,
             np.dtype(np.float16): nccl.NCCL_FLOAT16, np.dtype(np.int32): nccl.NCCL_INT32,
             np.dtype(np.int64): nccl.NCCL_INT64, np.dtype(np.uint8): nccl.NCCL_UINT8}
    try:
        return table[np.dtype(dtype)]
    except KeyError:
        raise TypeError(f"NCCL cannot reduce dtype {dtype}; use float32/float64/int32/int64") from None


def _nccl_op(xp, op):
    nccl = _nccl_module()
    return {"sum": nccl.NCCL_SUM, "mean": nccl.NCCL_SUM, "max": nccl.NCCL_MAX, "min": nccl.NCCL_MIN}[op]


# ---------------------------------------------------------------------------
# the world, and a data x pipeline grid
# ---------------------------------------------------------------------------

_WORLD: Communicator | None = None


def _make_world(nccl: bool = False) -> Communicator:
    """Build (not cache) the world communicator; see ``Communicator.world``."""
    if launched_by_mpirun() or "mpi4py.MPI" in sys.modules:
        try:
            MPI = _import_mpi()
        except RuntimeError:
            n = launcher_world_size()
            if n is not None and n > 1:
                raise RuntimeError(f"this process was started by mpirun with {n} processes, but mpi4py is not "
                                   f"installed, so the ranks cannot talk to each other: {MPI_INSTALL_HINT}") from None
            return Communicator(nccl=nccl)
        return Communicator(MPI.COMM_WORLD, nccl=nccl)
    return Communicator(nccl=nccl)


def get_world(nccl: bool = False) -> Communicator:
    """``Communicator.world()``: the MPI world under mpirun, the one-process stand-in otherwise."""
    return Communicator.world(nccl=nccl)


@dataclass
class Grid:
    """A ``dp x pp`` layout of the world: ``dp`` replicas of a ``pp``-stage pipeline.

    World rank = ``stage * dp + dp_rank`` (data-parallel peers are neighbours,
    as in Megatron-LM). ``dp_comm`` joins the ranks that hold the same stage
    (gradients are averaged over it); ``pp_comm`` joins the stages of one replica
    (activations travel along it, rank in ``pp_comm`` = stage).
    """

    world: Communicator
    dp: int
    pp: int
    dp_rank: int
    stage: int
    dp_comm: Communicator
    pp_comm: Communicator


def make_grid(comm: Communicator, dp: int, pp: int) -> Grid:
    """Split ``comm`` into data-parallel and pipeline-parallel groups (a collective call); see ``Grid``."""
    if dp < 1 or pp < 1 or dp * pp != comm.size:
        raise ValueError(f"a {dp} x {pp} (dp x pp) grid needs {dp * pp} ranks, but the communicator has {comm.size}: "
                         f"choose dp and pp with dp * pp == {comm.size}")
    stage, dp_rank = divmod(comm.rank, dp)
    dp_comm = comm.split(color=stage, key=dp_rank)
    pp_comm = comm.split(color=dp_rank, key=stage)
    return Grid(comm, dp, pp, dp_rank, stage, dp_comm, pp_comm)


__all__ = ["Communicator", "Request", "Grid", "get_world", "make_grid", "cuda_aware_mpi", "launched_by_mpirun",
           "local_rank", "OPS"]
