"""The one place that chooses between NumPy (CPU) and CuPy (GPU).

Every op asks ``get_array_module(x)`` for the array library of its input and
calls it as ``xp``; no other module imports CuPy.
"""

from __future__ import annotations

import numpy as np

try:  # CuPy is an optional extra: `pip install -e ".[cuda12]"`
    import cupy as _cupy
except ImportError:  # pragma: no cover - depends on the machine
    _cupy = None
except Exception:  # a broken CUDA install must not break CPU users
    _cupy = None

CUPY_INSTALL_HINT = (
    'install CuPy with `pip install -e ".[cuda12]"` (CUDA 12 driver) or '
    '`pip install -e ".[cuda13]"` (CUDA 13 driver) on a machine with an NVIDIA GPU'
)


def cupy_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    if _cupy is None:
        return False
    try:
        return _cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def get_array_module(*arrays):
    """Return ``cupy`` if any argument is a CuPy array, else ``numpy``."""
    if _cupy is not None:
        for a in arrays:
            if isinstance(a, _cupy.ndarray):
                return _cupy
    return np


def is_array(x) -> bool:
    """True for a NumPy or CuPy ndarray."""
    return isinstance(x, np.ndarray) or (_cupy is not None and isinstance(x, _cupy.ndarray))


def device_of(array) -> str:
    """``"cuda"`` for a CuPy array, ``"cpu"`` otherwise."""
    return "cuda" if get_array_module(array) is not np else "cpu"


def normalize_device(device: str) -> str:
    """Accept "cpu", "cuda" or "cuda:N"; raise a clear error otherwise."""
    if device == "cpu" or device == "cuda" or (isinstance(device, str) and device.startswith("cuda:")):
        return device
    raise ValueError(f"unknown device {device!r}: use 'cpu' or 'cuda' (or 'cuda:N')")


def require_cupy():
    """Return the cupy module, or raise a RuntimeError that says how to get it."""
    if _cupy is None:
        raise RuntimeError(f"device 'cuda' needs CuPy, which is not installed: {CUPY_INSTALL_HINT}")
    if not cupy_available():
        raise RuntimeError("device 'cuda' asked for, but CuPy sees no CUDA device on this machine; use device='cpu'")
    return _cupy


def to_device(array, device: str):
    """Move an array to ``device`` ("cpu" or "cuda[:N]"); a no-op when it is already there."""
    device = normalize_device(device)
    if device == "cpu":
        if _cupy is not None and isinstance(array, _cupy.ndarray):
            return _cupy.asnumpy(array)
        return np.asarray(array)
    cp = require_cupy()
    index = int(device.split(":")[1]) if ":" in device else None
    if index is None:
        return cp.asarray(array)
    with cp.cuda.Device(index):
        return cp.asarray(array)


def array_module_for_device(device: str):
    """The array library that holds arrays on ``device``."""
    return np if normalize_device(device) == "cpu" else require_cupy()


def scatter_add(target, index, values):
    """``target[index] += values`` in place, adding up repeated indices (NumPy's ``add.at``).

    Plain ``target[index] += values`` keeps only one of several repeated indices;
    backward passes of ``getitem`` and ``embedding`` need every one counted.
    """
    if _cupy is not None and isinstance(target, _cupy.ndarray):
        import cupyx

        cupyx.scatter_add(target, index, values)
    elif (isinstance(index, np.ndarray) and index.ndim == 1 and index.dtype.kind in "iu" and target.ndim == 2
          and values.ndim == 2 and len(index) > 0):
        # Rows by id (the embedding gradient): sort the ids and sum each run of equal ids with
        # add.reduceat, ~8x faster than add.at; each row sum is then added once.
        order = np.argsort(index, kind="stable")
        ids = index[order]
        starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])  # first position of each distinct id
        target[ids[starts]] += np.add.reduceat(values[order], starts, axis=0)
    else:
        np.add.at(target, index, values)


def accumulation_dtype(*dtypes):
    """The dtype to sum in: float32 for half precision (float16, bfloat16), else the inputs' common dtype.

    A float16 sum of 4096 values of 0.01 gives 32.0, not 40.96: reductions
    (softmax, norms, losses, bias and embedding gradients) accumulate in float32
    and cast the result back.
    """
    dtype = np.result_type(*dtypes)
    return np.dtype(np.float32) if dtype.kind == "f" and dtype.itemsize < 4 else np.dtype(dtype)


def sum_rows_of(a, out=None):
    """Sum along the last axis of a float32/float64 ``a`` (..., n) -> (...), as a product with a vector of ones.

    BLAS's matrix-vector product is 3-5x faster than NumPy's own reduction
    over a short last axis (128-1536 numbers: LayerNorm and softmax rows).
    """
    xp = get_array_module(a)
    return xp.matmul(a, xp.ones(a.shape[-1], dtype=a.dtype), out=out)  # (...)


def sum_columns_of(a, out=None):
    """Sum over the rows of a float32/float64 ``a`` (n, C) -> (C,), as ``ones @ a`` (BLAS; ~3x NumPy's ``sum(0)``)."""
    xp = get_array_module(a)
    return xp.matmul(xp.ones(a.shape[0], dtype=a.dtype), a, out=out)  # (C,)


def sum_in_float32(array, axis=None, keepdims=False):
    """``array.sum(...)`` accumulated in at least float32, returned in ``array``'s dtype."""
    acc = accumulation_dtype(array.dtype)
    if acc == array.dtype:
        return array.sum(axis=axis, keepdims=keepdims)
    return array.sum(axis=axis, keepdims=keepdims, dtype=acc).astype(array.dtype)


def quiet_fp_errors(xp):
    """Silence NumPy's floating-point warnings (log of 0, division by 0) for a block; CuPy never warns."""
    import contextlib

    return xp.errstate(divide="ignore", invalid="ignore") if hasattr(xp, "errstate") else contextlib.nullcontext()


def is_dtype_name(s: str) -> bool:
    """True for strings NumPy reads as a dtype ("float16", "f4"), False for others ("cpu", "cuda")."""
    try:
        np.dtype(s)
        return True
    except TypeError:
        return False


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back to the kernel.

    Every training step frees and re-allocates the same activations; by
    default glibc returns large blocks to the kernel and the next step
    page-faults them back in (8-50K faults per step for a 10M-parameter GPT,
    ~20% of a small step). Raising the mmap and trim thresholds keeps them.
    Peak memory is unchanged. Linux with glibc only; returns whether it applied.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))
