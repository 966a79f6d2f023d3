"""Reductions: sum, mean, var, max, min, logsumexp.

Every reduction takes ``axis`` (None for all axes, an int, a negative int, or a
tuple of them) and ``keepdims``, with NumPy's meaning. Each backward first puts
the reduced axes back as size-1 axes (``_keep``), so that the gradient
broadcasts against the input; the result is broadcast to the input's shape.
"""

from __future__ import annotations

import numbers
import operator

from ..backend import accumulation_dtype, get_array_module, sum_in_float32
from ..backend import quiet_fp_errors as _quiet
from ..engine import Function, is_grad_enabled
from ..tensor import Tensor

# ---------------------------------------------------------------------------
# axis helpers (shape.py uses them too)
# ---------------------------------------------------------------------------


def _normalize_axes(axis, ndim: int, op: str, shape=None) -> tuple:
    """``axis`` (None, int or tuple of ints, negatives allowed) as a sorted tuple of axes in ``0..ndim-1``.

    None means every axis. Raises a ValueError naming the op, the axis and the
    valid range when an axis is out of range or repeated.
    """
    if axis is None:
        return tuple(range(ndim))
    items = tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)
    out = []
    for a in items:
        out.append(_normalize_axis(a, ndim, op, shape))
    if len(set(out)) != len(out):
        raise ValueError(f"{op}: axis {axis!r} names the same axis twice; list each axis once")
    return tuple(sorted(out))


def _normalize_axis(a, ndim: int, op: str, shape=None) -> int:
    """One axis as an int in ``0..ndim-1`` (negative counts from the end), or a clear error."""
    if isinstance(a, (bool,)) or not isinstance(a, numbers.Integral):
        raise TypeError(f"{op}: axis must be an int or a tuple of ints, got {a!r} ({type(a).__name__})")
    a = operator.index(a)
    if not -ndim <= a < ndim:
        where = f"shape {tuple(shape)}" if shape is not None else f"{ndim} dimensions"
        valid = f"use {-ndim}..{ndim - 1}" if ndim else "a 0-d tensor has no axes: use axis=None"
        raise ValueError(f"{op}: axis {a} is out of range for a tensor with {where}; {valid}")
    return a % ndim if ndim else a


def _keep_shape(shape, axes) -> tuple:
    """``shape`` with every axis in ``axes`` set to 1 (the keepdims=True result shape)."""
    return tuple(1 if i in axes else n for i, n in enumerate(shape))


def _count(shape, axes) -> int:
    """Number of elements reduced into each output element."""
    n = 1
    for a in axes:
        n *= shape[a]
    return n


class _Reduction(Function):
    """Base for reductions: ``axis`` and ``keepdims`` as given; ``_setup`` normalizes them against the input."""

    op = "reduction"

    def __init__(self, axis=None, keepdims: bool = False):
        self.axis, self.keepdims = axis, bool(keepdims)

    def _setup(self, x):
        """Record the input shape and the normalized, sorted tuple of reduced axes."""
        self.in_shape = x.shape
        self.axes = _normalize_axes(self.axis, x.ndim, self.op, x.shape)

    def _keep(self, gy):
        """gy with the reduced axes restored as size-1 axes, so it broadcasts against the input."""
        return gy.reshape(_keep_shape(self.in_shape, self.axes))  # (in_shape with reduced axes = 1)

    def _out(self, y_keep):
        """The forward result from its keepdims form: drop the reduced axes unless keepdims."""
        if self.keepdims:
            return y_keep
        shape = tuple(n for i, n in enumerate(self.in_shape) if i not in self.axes)
        return y_keep.reshape(shape)  # (in_shape without the reduced axes)


# ---------------------------------------------------------------------------
# sum / mean / var
# ---------------------------------------------------------------------------


class Sum(_Reduction):
    """y = x.sum(axis);  dx = gy broadcast back over the summed axes.

    Each x_i appears once, with coefficient 1, in the output element it is
    summed into: dy_j/dx_i = 1 for that j, so dx_i = gy_j.
    """

    op = "sum"

    def forward(self, x):
        self._setup(x)
        return sum_in_float32(x, axis=self.axes, keepdims=self.keepdims)

    def backward(self, gy):
        xp = get_array_module(gy)
        return xp.broadcast_to(self._keep(gy), self.in_shape)


class Mean(_Reduction):
    """y = x.mean(axis) = sum(x) / N over the N reduced elements;  dx = gy / N broadcast back.

    Each x_i enters its output element with coefficient 1/N.
    """

    op = "mean"

    def forward(self, x):
        self._setup(x)
        acc = accumulation_dtype(x.dtype)  # float16 is averaged in float32
        return x.mean(axis=self.axes, keepdims=self.keepdims, dtype=acc).astype(x.dtype, copy=False)

    def backward(self, gy):
        xp = get_array_module(gy)
        n = _count(self.in_shape, self.axes)
        if n == 0:  # nothing was reduced: the input is empty, and so is its gradient
            return xp.zeros(self.in_shape, dtype=gy.dtype)
        g = self._keep(gy) / gy.dtype.type(n)  # divide the small array, in gy's dtype (no promotion)
        return xp.broadcast_to(g, self.in_shape)


class Var(_Reduction):
    """y = sum((x - m)^2) / (N - ddof), m = mean(x), over the N reduced elements.

    dy/dx_j = 2 (x_j - m) / (N - ddof) - 2 sum_i (x_i - m) / (N - ddof) * dm/dx_j,
    and sum_i (x_i - m) = 0, so dx_j = gy * 2 (x_j - m) / (N - ddof).
    Forward saves d = x - m.
    """

    op = "var"

    def __init__(self, axis=None, keepdims=False, ddof=0):
        super().__init__(axis, keepdims)
        self.ddof = ddof

    def forward(self, x):
        self._setup(x)
        n = _count(x.shape, self.axes)
        if n - self.ddof <= 0:
            raise ValueError(f"var over {n} element(s) with ddof={self.ddof} divides by N - ddof = {n - self.ddof}; "
                             f"reduce over more elements or lower ddof (ddof=0 is the population variance)")
        in_dtype = x.dtype
        x = x.astype(accumulation_dtype(in_dtype), copy=False)  # float16 squares overflow past 256
        d = x - x.mean(axis=self.axes, keepdims=True)
        self.d = d
        self.denom = n - self.ddof
        y = (d * d).sum(axis=self.axes, keepdims=self.keepdims)
        return (y / d.dtype.type(self.denom)).astype(in_dtype, copy=False)

    def backward(self, gy):
        scale = self._keep(gy) * gy.dtype.type(2.0 / self.denom)  # small array: (in_shape with reduced axes = 1)
        return (scale * self.d).astype(gy.dtype, copy=False)


# ---------------------------------------------------------------------------
# max / min
# ---------------------------------------------------------------------------


class _Extreme(_Reduction):
    """Shared code of Max and Min; subclasses set ``op`` ("max" or "min")."""

    op = "max"

    def forward(self, x):
        self._setup(x)
        empty = [a for a in self.axes if x.shape[a] == 0]
        if empty:
            raise ValueError(f"{self.op} over axis {empty[0]} of size 0 (shape {x.shape}) has no value; "
                             f"reduce over non-empty axes")
        y = getattr(x, self.op)(axis=self.axes, keepdims=True)  # (in_shape with reduced axes = 1)
        if self.needs_input_grad[0] and is_grad_enabled():
            mask = x == y
            self.mask = mask
            self.count = mask.sum(axis=self.axes, keepdims=True).astype(x.dtype)  # ties per output element
        return self._out(y)

    def backward(self, gy):
        return (self._keep(gy) / self.count) * self.mask


class Max(_Extreme):
    """y = max of x over the axes;  dx = gy at the maximal elements, 0 elsewhere.

    Ties share the gradient equally (as torch.amax does): if k elements equal the
    maximum, each gets gy / k. So dx = gy * [x == y] / count(x == y).
    """

    op = "max"


class Min(_Extreme):
    """y = min of x over the axes;  dx = gy at the minimal elements, 0 elsewhere.

    Ties share the gradient equally (as torch.amin does): if k elements equal the
    minimum, each gets gy / k. So dx = gy * [x == y] / count(x == y).
    """

    op = "min"


# ---------------------------------------------------------------------------
# logsumexp
# ---------------------------------------------------------------------------


class LogSumExp(_Reduction):
    """y = log(sum(exp(x))), computed as m + log(sum(exp(x - m))) with m = max(x) so exp never overflows.

    dy/dx_i = exp(x_i) / sum_j exp(x_j) = softmax(x)_i, so dx = gy * softmax(x).
    Forward saves s = exp(x - m) and S = sum(s); softmax = s / S, so the backward
    is one multiply: dx = (gy / S) * s.
    """

    op = "logsumexp"

    def forward(self, x):
        xp = get_array_module(x)
        self._setup(x)
        in_dtype = x.dtype
        x = x.astype(accumulation_dtype(in_dtype), copy=False)  # float16: the sum of exps needs float32
        keep = _keep_shape(x.shape, self.axes)
        if x.size == 0:
            m = xp.zeros(keep, dtype=x.dtype)
        else:
            m = x.max(axis=self.axes, keepdims=True)  # (in_shape with reduced axes = 1)
            # where the max is -inf (every x is -inf), +inf or nan, shift by 0 instead (no host sync to check first)
            m = xp.where(xp.isfinite(m), m, xp.zeros((), dtype=m.dtype))
        s = xp.asarray(x - m)  # (NumPy gives a scalar for 0-d inputs; exp(out=) needs an array)
        s = xp.exp(s, out=s) if s.dtype.kind == "f" else xp.exp(s)
        total = s.sum(axis=self.axes, keepdims=True)
        with _quiet(xp):  # log(0) = -inf is the right answer when every x is -inf
            y = xp.log(total) + m
        self.s, self.total = s, total
        return self._out(y).astype(in_dtype, copy=False)

    def backward(self, gy):
        xp = get_array_module(gy)
        with _quiet(xp):
            return ((self._keep(gy) / self.total) * self.s).astype(gy.dtype, copy=False)


# ---------------------------------------------------------------------------
# public functions
# ---------------------------------------------------------------------------


def sum(x, axis=None, keepdims=False) -> Tensor:  # noqa: A001 - mirrors numpy.sum
    """Sum over ``axis`` (None: all axes; an int, negative, or a tuple). float32 stays float32."""
    return Sum(axis, keepdims)(x)


def mean(x, axis=None, keepdims=False) -> Tensor:
    """Mean over ``axis`` (None: all axes; an int, negative, or a tuple), in x's dtype (float32 stays float32)."""
    return Mean(axis, keepdims)(x)


def var(x, axis=None, keepdims=False, ddof=0) -> Tensor:
    """Variance over ``axis``: sum((x - mean)^2) / (N - ddof).

    The default ``ddof=0`` is NumPy's (the population variance, what LayerNorm
    uses); ``ddof=1`` is the unbiased sample variance (torch.var's default).
    """
    if not isinstance(ddof, numbers.Real) or isinstance(ddof, bool):
        raise TypeError(f"var: ddof must be a number, got {ddof!r}")
    return Var(axis, keepdims, ddof)(x)


def max(x, axis=None, keepdims=False) -> Tensor:  # noqa: A001 - mirrors numpy.max
    """Maximum over ``axis``. Backward: ties share the gradient equally among all tied maximal
    elements (k ties get gy / k each), as torch.amax does."""
    return Max(axis, keepdims)(x)


def min(x, axis=None, keepdims=False) -> Tensor:  # noqa: A001 - mirrors numpy.min
    """Minimum over ``axis``. Backward: ties share the gradient equally among all tied minimal
    elements (k ties get gy / k each), as torch.amin does."""
    return Min(axis, keepdims)(x)


def logsumexp(x, axis=None, keepdims=False) -> Tensor:
    """log(sum(exp(x))) over ``axis``, numerically stable (the max is subtracted first).

    Finite for inputs of any magnitude (x around 1000 gives about 1000, not inf);
    -inf where every element is -inf. Backward: gy * softmax(x) over the axes.
    """
    return LogSumExp(axis, keepdims)(x)

