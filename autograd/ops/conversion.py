"""Differentiable dtype casts and device moves."""

from __future__ import annotations

import numpy as np

from .. import backend
from ..engine import Function
from ..tensor import Tensor


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
