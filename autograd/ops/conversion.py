"""Differentiable dtype casts and device moves, and the type promotion of an op's operands."""

from __future__ import annotations

import numpy as np

from .. import backend
from ..engine import Function
from ..promotion import DEFAULT_FLOAT, combined_dtype
from ..tensor import Tensor, as_tensor


class Cast(Function):
    """y = x.astype(dtype);  dx = gy cast back to x's dtype (mixed precision passes through here)."""

    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)

    def forward(self, x):
        self.in_dtype = x.dtype
        return x.astype(self.dtype, copy=False)

    def backward(self, gy):
        return gy.astype(self.in_dtype, copy=False)


class ToDevice(Function):
    """y = x moved to another device;  dx = gy moved back."""

    def __init__(self, device):
        self.device = backend.normalize_device(device)

    def forward(self, x):
        self.in_device = backend.device_of(x)
        return backend.to_device(x, self.device)

    def backward(self, gy):
        return backend.to_device(gy, self.in_device)


def astype(x, dtype) -> Tensor:
    """Cast to ``dtype``; the gradient is cast back. Returns ``x`` itself when nothing changes."""
    if isinstance(x, Tensor) and x.dtype == np.dtype(dtype):
        return x
    return Cast(dtype)(x)


def to_device(x, device) -> Tensor:
    """Move to "cpu" or "cuda"; the gradient moves back. Returns ``x`` itself when it is already there."""
    if isinstance(x, Tensor) and x.device == backend.normalize_device(device).split(":")[0]:
        return x
    return ToDevice(device)(x)


def result_type(*operands) -> np.dtype:
    """The dtype ``operands`` (tensors, arrays, Python or NumPy scalars) combine to, by PyTorch's rules.

    A float32 tensor stays float32 with any scalar or 0-d operand (``np.float64(2.5)``,
    ``np.array(2.5)``); an integer tensor with a float scalar gives float32, with a
    float 0-d array that array's dtype; see ``autograd.promotion``.
    """
    return combined_dtype(*[x.data if isinstance(x, Tensor) else x for x in operands])


_PLAIN_NUMBERS = (float, int)


def _constant(number, like):
    """A Python number as a constant tensor in ``like``'s (floating) dtype and library: it cannot change that dtype."""
    return Tensor._wrap(backend.get_array_module(like).asarray(number, dtype=like.dtype), False)


def promote(*operands, floating: bool = False):
    """``operands`` as tensors (a list or tuple) of their ``result_type`` (float32 for an integer or boolean result when
    ``floating``: true division). A tensor of another dtype is cast with ``astype``, so its gradient
    comes back in its own dtype; scalars and arrays become constants where the first tensor lives.
    """
    if len(operands) == 2 and not floating:  # the common cases first: a tensor with a tensor or a number
        a, b = operands
        if isinstance(a, Tensor):
            if isinstance(b, Tensor):
                if a.data.dtype == b.data.dtype:
                    return operands
            elif type(b) in _PLAIN_NUMBERS and a.data.dtype.kind == "f":
                return a, _constant(b, a.data)
        elif type(a) in _PLAIN_NUMBERS and isinstance(b, Tensor) and b.data.dtype.kind == "f":
            return _constant(a, b.data), b
    dtype = result_type(*operands)
    if floating and dtype.kind in "biu":
        dtype = DEFAULT_FLOAT
    like = next((x for x in operands if isinstance(x, Tensor)), None)
    out = []
    for x in operands:
        if isinstance(x, Tensor):
            out.append(astype(x, dtype))
        elif backend.is_array(x):
            out.append(as_tensor(x, like=like) if x.dtype == dtype else as_tensor(x.astype(dtype), like=like))
        else:  # a number, or Python data
            xp = backend.get_array_module(like.data) if like is not None else np
            out.append(Tensor(xp.asarray(x, dtype=dtype)))
    return out
