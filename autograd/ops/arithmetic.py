"""Arithmetic: add, sub, mul, div, neg, pow.

Each backward returns gradients in the broadcast shape of the output; the engine
sums them back to each input's shape (``engine.sum_to``). The operands are first
brought to one dtype by PyTorch's rules (``conversion.promote``): a float32 tensor
stays float32 with any scalar or 0-d operand, and true division of integers gives
float32.
"""

from __future__ import annotations

import numbers

import numpy as np

from ..backend import get_array_module
from ..backend import quiet_fp_errors as _quiet
from ..engine import Function
from ..promotion import combined_dtype
from ..tensor import Tensor
from .conversion import astype, promote


class Add(Function):
    """y = a + b;  dy/da = dy/db = 1, so both inputs receive gy itself."""

    def forward(self, a, b):
        return a + b

    def backward(self, gy):
        return gy, gy


class Sub(Function):
    """y = a - b;  da = gy, db = -gy."""

    def forward(self, a, b):
        return a - b

    def backward(self, gy):
        return gy, (-gy if self.needs_input_grad[1] else None)


class Mul(Function):
    """y = a * b;  da = gy * b, db = gy * a."""

    def forward(self, a, b):
        self.a, self.b = a, b
        return a * b

    def backward(self, gy):
        ga = gy * self.b if self.needs_input_grad[0] else None
        gb = gy * self.a if self.needs_input_grad[1] else None
        return ga, gb


class Div(Function):
    """y = a / b;  da = gy / b, db = -gy * a / b**2 = -gy * y / b."""

    def forward(self, a, b):
        self.b = b
        y = a / b
        self.y = y
        return y

    def backward(self, gy):
        ga = gy / self.b if self.needs_input_grad[0] else None
        gb = -gy * self.y / self.b if self.needs_input_grad[1] else None
        return ga, gb


class Neg(Function):
    """y = -x;  dx = -gy."""

    def forward(self, x):
        return -x

    def backward(self, gy):
        return -gy


class PowScalar(Function):
    """y = x ** c for a constant c;  dx = gy * c * x ** (c - 1)."""

    def __init__(self, exponent):
        self.c = exponent

    def forward(self, x):
        self.x = x
        return x ** self.c

    def backward(self, gy):
        c = self.c
        if c == 2:
            return gy * (2 * self.x)
        return gy * (c * self.x ** (c - 1))


class Pow(Function):
    """y = a ** b, both tensors;  da = gy * b * a ** (b - 1),  db = gy * y * log(a).

    ``log(a)`` is undefined for a <= 0; there the gradient w.r.t. the exponent is
    taken as 0 where a == 0 (the limit of a ** b * log a for b > 0) and NaN below 0,
    as in PyTorch.
    """

    def forward(self, a, b):
        y = a ** b
        self.a, self.b, self.y = a, b, y
        return y

    def backward(self, gy):
        xp = get_array_module(gy)
        a, b = self.a, self.b
        ga = gy * b * a ** (b - 1) if self.needs_input_grad[0] else None
        gb = None
        if self.needs_input_grad[1]:
            with _quiet(xp):
                log_a = xp.where(a == 0, xp.zeros_like(a), xp.log(a))
            gb = gy * self.y * log_a
        return ga, gb




def add(a, b) -> Tensor:
    """a + b, with broadcasting."""
    return Add()(*promote(a, b))


def sub(a, b) -> Tensor:
    """a - b, with broadcasting."""
    return Sub()(*promote(a, b))


def mul(a, b) -> Tensor:
    """a * b (element-wise), with broadcasting."""
    return Mul()(*promote(a, b))


def div(a, b) -> Tensor:
    """a / b (true division), with broadcasting; integers and booleans divide in float32."""
    return Div()(*promote(a, b, floating=True))


def neg(x) -> Tensor:
    """-x."""
    return Neg()(x)


def pow(x, exponent) -> Tensor:  # noqa: A001 - mirrors torch.pow
    """x ** exponent: a number (Python or NumPy) uses the cheaper constant-exponent op, a tensor the general one.

    The exponent takes part in type promotion like any operand: ``x ** np.float64(2.5)``
    stays float32, an integer tensor to the power 2.5 is float32.
    """
    if isinstance(x, Tensor) and type(exponent) in (int, float) and x.data.dtype.kind == "f":
        return PowScalar(exponent)(x)  # the common case: a floating tensor keeps its dtype
    if isinstance(x, Tensor) and isinstance(exponent, (numbers.Number, np.generic)):
        dtype = combined_dtype(x.data, exponent)
        # a Python number is "weak" in NumPy's arithmetic: x's dtype is kept
        return PowScalar(exponent.item() if isinstance(exponent, np.generic) else exponent)(astype(x, dtype))
    return Pow()(*promote(x, exponent))
