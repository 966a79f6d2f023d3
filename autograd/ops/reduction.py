"""Reductions. (Being written: see the foundation issue.)"""
from __future__ import annotations

from ..engine import Function


class Sum(Function):
    """y = x.sum(axis);  dx = gy broadcast back over the summed axes."""

    def __init__(self, axis=None, keepdims=False):
        self.axis, self.keepdims = axis, keepdims

    def forward(self, x):
        self.in_shape = x.shape
        return x.sum(axis=self.axis, keepdims=self.keepdims)

    def backward(self, gy):
        from ..backend import get_array_module
        xp = get_array_module(gy)
        if not self.keepdims and self.axis is not None:
            axes = (self.axis,) if isinstance(self.axis, int) else self.axis
            gy = xp.expand_dims(gy, tuple(a % len(self.in_shape) for a in axes))
        return xp.broadcast_to(gy, self.in_shape)


def sum(x, axis=None, keepdims=False):  # noqa: A001
    return Sum(axis, keepdims)(x)


def _todo(*args, **kwargs):
    raise NotImplementedError("not written yet")


mean = var = max = min = logsumexp = _todo
