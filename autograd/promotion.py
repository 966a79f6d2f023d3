"""Which dtype arrays and scalars combine to: PyTorch's type promotion, over NumPy dtypes.

Categories rank bool < integer < floating < complex. Operands rank in three tiers:
arrays with at least one axis, 0-d arrays, and scalars (Python numbers and NumPy
scalars). Each tier's dtypes combine by ``promote_types``; then a lower tier changes
the result only when it is of a higher category than every tier above it:

    float32 (3,) * np.float64(2.5)   -> float32   (a scalar of the same category)
    float32 (3,) + float64 0-d       -> float32   (a 0-d array of the same category)
    int64 (3,)   * 2.5               -> float32   (a float scalar counts as float32)
    int64 (3,)   * float64 0-d       -> float64   (a 0-d array keeps its own precision)
    int32 (3,)   * 2                 -> int32

A scalar counts as its category's default type, whatever its precision: float32
for floats (np.float64 and np.float16 included), int64 for integers, complex64.
NumPy (NEP 50) treats only Python numbers this way, so ``float32 * np.float64(2)``
would be float64 there; here, as in PyTorch, it is float32.

This module knows arrays and scalars only; ``autograd.ops.conversion.promote``
applies it to tensors.
"""

from __future__ import annotations

import numbers

import numpy as np

_BOOL, _INT, _FLOAT, _COMPLEX = 0, 1, 2, 3
# dtype.kind -> category; other kinds ("V": ml_dtypes' bfloat16) are floating
_CATEGORY = {"b": _BOOL, "u": _INT, "i": _INT, "f": _FLOAT, "c": _COMPLEX}

DEFAULT_FLOAT = np.dtype(np.float32)
DEFAULT_INT = np.dtype(np.int64)
_SCALAR_DTYPES = {_BOOL: np.dtype(np.bool_), _INT: DEFAULT_INT, _FLOAT: DEFAULT_FLOAT,
                  _COMPLEX: np.dtype(np.complex64)}


def default_array(data, dtype=None):
    """Python data (numbers, lists) as a NumPy array: floats become float32 and ints int64, as in PyTorch."""
    array = np.asarray(data, dtype=dtype)
    if dtype is None:
        if array.dtype == np.float64:
            array = array.astype(np.float32)
        elif array.dtype.kind in "iu" and array.dtype != np.int64:
            array = array.astype(np.int64)
    return array


def _category(dtype) -> int:
    return _CATEGORY.get(dtype.kind, _FLOAT)


def promote_types(a, b) -> np.dtype:
    """The smallest dtype both ``a`` and ``b`` fit in (``torch.promote_types``).

    As ``np.promote_types``, except that an integer or boolean meeting a floating
    (or complex) dtype gives that dtype: int64 and float32 give float32, where
    NumPy says float64.
    """
    a, b = np.dtype(a), np.dtype(b)
    if a == b:
        return a
    ca, cb = _category(a), _category(b)
    if ca >= _FLOAT > cb:
        return a
    if cb >= _FLOAT > ca:
        return b
    return np.promote_types(a, b)


def _combine(higher, lower):
    """A higher tier's dtype, unless the lower tier's is of a higher category (PyTorch's combine_categories)."""
    if higher is None:
        return lower
    if lower is None:
        return higher
    ch, cl = _category(higher), _category(lower)
    if cl <= ch:
        return higher
    if ch == _FLOAT:  # a complex 0-d or scalar operand with a floating array: complex of the array's precision
        return np.result_type(higher, np.complex64)
    return promote_types(higher, lower)


def scalar_dtype(x):
    """The dtype a Python number or NumPy scalar counts as in promotion, or None when ``x`` is not one."""
    if isinstance(x, (bool, np.bool_)):
        return _SCALAR_DTYPES[_BOOL]
    if isinstance(x, numbers.Integral):
        return DEFAULT_INT
    if isinstance(x, numbers.Real):
        return DEFAULT_FLOAT
    if isinstance(x, numbers.Complex):
        return _SCALAR_DTYPES[_COMPLEX]
    return None


def combined_dtype(*values) -> np.dtype:
    """The dtype that ``values`` (arrays, Python numbers, NumPy scalars; None is skipped) compute in.

    Anything else (a list) counts as the array ``default_array`` makes of it.
    """
    dims = zeros = scalars = None
    for x in values:
        if x is None:
            continue
        dtype = scalar_dtype(x)
        if dtype is not None:
            scalars = dtype if scalars is None else promote_types(scalars, dtype)
            continue
        if not hasattr(x, "dtype"):
            x = default_array(x)
        if x.ndim:
            dims = x.dtype if dims is None else promote_types(dims, x.dtype)
        else:
            zeros = x.dtype if zeros is None else promote_types(zeros, x.dtype)
    result = _combine(dims, _combine(zeros, scalars))
    if result is None:
        raise TypeError("combined_dtype needs at least one array or number")
    return result
