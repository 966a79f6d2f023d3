"""Operator overloads and tensor methods, registered in one place.

``x @ w + b``, ``-x``, ``x ** 2``, ``2 * x``, ``np_array * x``, ``x[..., :3]``
and ``x.sum(axis=1)`` all route to the op functions in ``autograd.ops``.
"""

from __future__ import annotations

from .ops import arithmetic as A
from .ops import elementwise as E
from .ops import linalg as L
from .ops import nn_ops as N
from .ops import reduction as R
from .ops import shape as S
from .ops.conversion import promote
from .tensor import Tensor


def _swap(fn):
    """The reflected form of a binary op: ``other OP self`` (the op converts and promotes ``other``)."""
    return lambda self, other: fn(other, self)


def _compare(op):
    """A comparison: a boolean tensor, outside the graph (it has no gradient), computed in the dtype
    both sides promote to, so a float32 tensor equals np.float64(0.1) where it holds float32 0.1."""

    def method(self, other):
        a, b = promote(self.detach(), other)
        return Tensor(op(a.data, b.data))

    return method


def _reshape(self, *shape):
    return S.reshape(self, shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape)


def _permute(self, *axes):
    return S.permute(self, axes[0] if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else axes)


def _transpose(self, *axes):
    if not axes:
        return S.transpose(self)
    if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
        axes = tuple(axes[0])
    if len(axes) == 2 and self.ndim != 2:  # torch style: transpose(dim0, dim1) swaps two axes
        return S.swapaxes(self, *axes)
    return S.transpose(self, axes)


_METHODS = {
    # arithmetic
    "__add__": A.add, "__radd__": _swap(A.add),
    "__sub__": A.sub, "__rsub__": _swap(A.sub),
    "__mul__": A.mul, "__rmul__": _swap(A.mul),
    "__truediv__": A.div, "__rtruediv__": _swap(A.div),
    "__neg__": A.neg,
    "__pow__": A.pow, "__rpow__": _swap(A.pow),
    "__matmul__": L.matmul, "__rmatmul__": _swap(L.matmul),
    "__getitem__": S.getitem,
    "__lt__": _compare(lambda a, b: a < b), "__le__": _compare(lambda a, b: a <= b),
    "__gt__": _compare(lambda a, b: a > b), "__ge__": _compare(lambda a, b: a >= b),
    "__eq__": _compare(lambda a, b: a == b), "__ne__": _compare(lambda a, b: a != b),
    # element-wise
    "exp": E.exp, "log": E.log, "sqrt": E.sqrt, "tanh": E.tanh, "sigmoid": E.sigmoid, "relu": E.relu,
    "gelu": E.gelu, "silu": E.silu, "abs": E.abs, "__abs__": E.abs, "clip": E.clip,
    "maximum": E.maximum, "minimum": E.minimum,
    # reductions
    "sum": R.sum, "mean": R.mean, "var": R.var, "max": R.max, "min": R.min, "logsumexp": R.logsumexp,
    # shapes
    "reshape": _reshape, "view": _reshape, "transpose": _transpose, "permute": _permute,
    "swapaxes": S.swapaxes, "broadcast_to": S.broadcast_to, "squeeze": S.squeeze, "unsqueeze": S.unsqueeze,
    "flatten": S.flatten, "split": S.split, "triu": S.triu, "tril": S.tril,
    "matmul": L.matmul,
    # neural-net ops
    "softmax": N.softmax, "log_softmax": N.log_softmax,
}

for _name, _fn in _METHODS.items():
    setattr(Tensor, _name, _fn)

Tensor.T = property(lambda self: S.transpose(self))
Tensor.__eq__.__doc__ = "Element-wise ==, a boolean tensor (tensors hash by identity)."
Tensor.astype = lambda self, dtype: self.to(dtype)
Tensor.zero_grad = lambda self: setattr(self, "grad", None)


