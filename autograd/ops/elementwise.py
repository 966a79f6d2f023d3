"""Element-wise functions: exp, log, sqrt, tanh, sigmoid, relu, gelu, silu, abs,
maximum, minimum, where, clip.

Each op saves what its backward needs, preferring the output when the derivative
is cheapest in terms of it (exp, tanh, sigmoid, sqrt). Constants are Python
numbers, which NumPy 2 (NEP 50) and CuPy treat as "weak", so float32 stays
float32 everywhere. Integer and boolean inputs of the smooth functions are
computed in float32, as in PyTorch (NumPy would give float64). The operands of
maximum, minimum, where and clip are promoted by PyTorch's rules
(``conversion.promote``).

Gradients of the binary ops are returned in the broadcast output shape; the
engine sums them back to each input's shape.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from ..backend import get_array_module, is_array
from ..backend import quiet_fp_errors as _quiet
from ..engine import Function
from ..tensor import Tensor, as_tensor
from .. import kernels
from .conversion import astype, promote, result_type
from .special import erf as _erf

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_CUBIC = 0.044715




def _floating(x):
    """``x`` itself if it is floating, else a float32 copy (integer / boolean input of a smooth function)."""
    return x if x.dtype.kind in "fc" else x.astype(np.float32)


def _sigmoid(xp, x):
    """1 / (1 + exp(-x)) without overflow: with e = exp(-|x|) <= 1 it is 1/(1+e) for x >= 0, e/(1+e) below."""
    e = xp.exp(-xp.abs(x))
    den = e + 1
    num = xp.where(x >= 0, 1, e)
    num /= den
    return num


# ---------------------------------------------------------------------------
# unary
# ---------------------------------------------------------------------------


class Exp(Function):
    """y = exp(x);  dy/dx = exp(x) = y, so dx = gy * y (the output is saved, not the input)."""

    def forward(self, x):
        xp = get_array_module(x)
        y = xp.exp(_floating(x))
        self.y = y
        return y

    def backward(self, gy):
        return gy * self.y


class Log(Function):
    """y = log(x);  dy/dx = 1/x, so dx = gy / x.

    As in NumPy, log(0) = -inf and log(x < 0) = nan (NumPy warns in the forward);
    the backward's division by 0 gives inf quietly.
    """

    def forward(self, x):
        xp = get_array_module(x)
        x = _floating(x)
        self.x = x
        return xp.log(x)

    def backward(self, gy):
        with _quiet(get_array_module(gy)):
            return gy / self.x


class Sqrt(Function):
    """y = sqrt(x);  dy/dx = 1 / (2 sqrt(x)) = 1 / (2y), so dx = gy / (2y) (the output is saved).

    At x = 0 the gradient is inf (quietly); negative x gives nan, as in NumPy.
    """

    def forward(self, x):
        xp = get_array_module(x)
        y = xp.sqrt(_floating(x))
        self.y = y
        return y

    def backward(self, gy):
        with _quiet(get_array_module(gy)):
            return gy / (self.y + self.y)


class Tanh(Function):
    """y = tanh(x);  dy/dx = 1 - tanh(x)^2 = 1 - y^2, so dx = gy * (1 - y^2)."""

    def forward(self, x):
        xp = get_array_module(x)
        y = xp.tanh(_floating(x))
        self.y = y
        return y

    def backward(self, gy):
        g = gy * self.y
        g *= self.y
        return gy - g  # gy (1 - y^2)


class Sigmoid(Function):
    """y = 1 / (1 + exp(-x));  dy/dx = exp(-x) / (1 + exp(-x))^2 = y (1 - y), so dx = gy * y * (1 - y).

    The forward never overflows: with e = exp(-|x|) <= 1, y = 1/(1+e) for x >= 0
    and e/(1+e) for x < 0 (the same value, the first form multiplied by e/e).
    """

    def forward(self, x):
        xp = get_array_module(x)
        y = _sigmoid(xp, _floating(x))
        self.y = y
        return y

    def backward(self, gy):
        y = self.y
        g = 1 - y
        g *= y
        g *= gy
        return g


class ReLU(Function):
    """y = max(x, 0);  dy/dx = 1 for x > 0 and 0 for x <= 0 (0 at the kink, as in PyTorch).

    x > 0 exactly where y > 0, so the output is saved and dx = gy * (y > 0).
    """

    def forward(self, x):
        xp = get_array_module(x)
        y = xp.maximum(x, 0)
        self.y = y
        return y

    def backward(self, gy):
        return gy * (self.y > 0)


class SiLU(Function):
    """y = x * s with s = sigmoid(x) (also called swish);
    dy/dx = s + x * s (1 - s) = s (1 + x (1 - s)), so dx = gy * s * (1 + x (1 - s)).
    """

    def forward(self, x):
        xp = get_array_module(x)
        x = _floating(x)
        s = _sigmoid(xp, x)
        self.x, self.s = x, s
        return x * s

    def backward(self, gy):
        s = self.s
        g = 1 - s
        g *= self.x
        g += 1
        g *= s
        g *= gy
        return g


class Abs(Function):
    """y = |x|;  dy/dx = sign(x) (taken as 0 at x = 0, as in PyTorch), so dx = gy * sign(x)."""

    def forward(self, x):
        xp = get_array_module(x)
        self.x = x
        return xp.abs(x)

    def backward(self, gy):
        xp = get_array_module(gy)
        return gy * xp.sign(self.x)


class GELUTanh(Function):
    """GPT-2's GELU:  y = 0.5 x (1 + t),  t = tanh(u),  u = c (x + k x^3),  c = sqrt(2/pi),  k = 0.044715.

    dy/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) du/dx,  du/dx = c (1 + 3 k x^2),
    so dx = gy * (0.5 + 0.5 t + a (1 - t^2)) with a = x (0.5 c + 1.5 c k x^2).

    Only x is saved (the graph holds it anyway); backward recomputes t, which
    costs one tanh but saves keeping a second activation-sized array alive
    from forward to backward (the MLP's widest one). Both passes run in
    cache-sized pieces (``autograd.kernels``), spread over the CPU threads: the
    intermediates stay in small per-thread buffers, and only x, gy and the
    result go through memory.
    """

    def forward(self, x):
        xp = get_array_module(x)
        x = _floating(x)
        xf = xp.ascontiguousarray(x).reshape(-1)  # (n,)
        y = xp.empty_like(xf)

        def piece(sl):
            xs = xf[sl]
            (b,) = kernels.scratch(xp, 1, xs.size, xf.dtype)
            xp.multiply(xs, xs, out=b)
            b *= _SQRT_2_OVER_PI * _GELU_CUBIC
            b += _SQRT_2_OVER_PI
            b *= xs  # u = c x + c k x^3
            xp.tanh(b, out=b)
            b *= 0.5
            b += 0.5  # 0.5 (1 + t)
            xp.multiply(b, xs, out=y[sl])

        kernels.run(kernels.pieces(xp, xf.size), piece)
        self.x, self.shape = xf, x.shape
        return y.reshape(x.shape)

    def backward(self, gy):
        xp = get_array_module(gy)
        xf = self.x
        gf = xp.ascontiguousarray(gy).reshape(-1)  # (n,)
        dx = xp.empty_like(xf)

        def piece(sl):
            xs = xf[sl]
            a, tb, db = kernels.scratch(xp, 3, xs.size, xf.dtype)
            xp.multiply(xs, xs, out=a)  # x^2
            xp.multiply(a, _SQRT_2_OVER_PI * _GELU_CUBIC, out=tb)
            tb += _SQRT_2_OVER_PI
            tb *= xs
            xp.tanh(tb, out=tb)  # t
            a *= 1.5 * _SQRT_2_OVER_PI * _GELU_CUBIC
            a += 0.5 * _SQRT_2_OVER_PI
            a *= xs  # a = x (0.5 c + 1.5 c k x^2)
            xp.multiply(tb, tb, out=db)
            xp.subtract(1, db, out=db)
            db *= a  # a (1 - t^2)
            tb *= 0.5
            db += tb
            db += 0.5  # dy/dx
            xp.multiply(db, gf[sl], out=dx[sl])

        kernels.run(kernels.pieces(xp, xf.size), piece)
        return dx.reshape(self.shape)


class GELUErf(Function):
    """The exact GELU:  y = x Phi(x),  Phi(x) = 0.5 (1 + erf(x / sqrt 2)) the standard normal CDF.

    dy/dx = Phi(x) + x phi(x),  phi(x) = Phi'(x) = exp(-x^2 / 2) / sqrt(2 pi),
    so dx = gy * (Phi(x) + x phi(x)). x and Phi(x) are saved.
    """

    def forward(self, x):
        x = _floating(x)
        cdf = _erf(x * _INV_SQRT_2)
        cdf += 1
        cdf *= 0.5
        self.x, self.cdf = x, cdf
        return x * cdf

    def backward(self, gy):
        xp = get_array_module(gy)
        x = self.x
        g = x * x
        g *= -0.5
        g = xp.exp(g)
        g *= _INV_SQRT_2PI
        g *= x  # x phi(x)
        g += self.cdf
        g *= gy
        return g


# ---------------------------------------------------------------------------
# binary and ternary
# ---------------------------------------------------------------------------


class Maximum(Function):
    """y = maximum(a, b), broadcasting.

    dy/da = 1 where a > b and 0 where a < b; at a tie (a == b) the gradient is
    split equally, gy / 2 to each input, as PyTorch does. Symmetrically for b.
    """

    def forward(self, a, b):
        xp = get_array_module(a, b)
        _check_broadcast("maximum", a, b)
        self.a, self.b = a, b
        return xp.maximum(a, b)

    def backward(self, gy):
        return _pick_grads(self, gy, self.a, self.b)


class Minimum(Function):
    """y = minimum(a, b), broadcasting.

    dy/da = 1 where a < b and 0 where a > b; at a tie (a == b) the gradient is
    split equally, gy / 2 to each input, as PyTorch does. Symmetrically for b.
    """

    def forward(self, a, b):
        xp = get_array_module(a, b)
        _check_broadcast("minimum", a, b)
        self.a, self.b = a, b
        return xp.minimum(a, b)

    def backward(self, gy):
        return _pick_grads(self, gy, self.b, self.a)  # min(a, b) picks a where b > a


def _check_broadcast(op, *arrays, names=("a", "b")):
    """Raise a ValueError naming the shapes when ``arrays`` do not broadcast together."""
    try:
        np.broadcast_shapes(*(a.shape for a in arrays))
    except ValueError:
        shapes = ", ".join(f"{n} {tuple(a.shape)}" for n, a in zip(names, arrays))
        raise ValueError(f"{op}: shapes do not broadcast together: {shapes}; each axis must match or be 1 "
                         "(reshape or unsqueeze one of them)") from None


def _pick_grads(fn, gy, big, small):
    """Gradients of maximum(big, small)-style selection: gy to the winner, gy/2 to each at a tie."""
    xp = get_array_module(gy)
    half = gy * 0.5
    tie = big == small
    ga = xp.where(big > small, gy, xp.where(tie, half, 0)) if fn.needs_input_grad[0] else None
    gb = xp.where(small > big, gy, xp.where(tie, half, 0)) if fn.needs_input_grad[1] else None
    return ga, gb


class Where(Function):
    """y = x where cond else y_, broadcasting all three; cond is a constant boolean array.

    dy/dx = 1 where cond and 0 elsewhere, dy/dy_ the opposite: dx = where(cond, gy, 0),
    dy_ = where(cond, 0, gy). cond gets no gradient.
    """

    def __init__(self, cond):
        self.cond = cond

    def forward(self, x, y):
        xp = get_array_module(x, y)
        _check_broadcast("where", self.cond, x, y, names=("cond", "x", "y"))
        return xp.where(self.cond, x, y)

    def backward(self, gy):
        xp = get_array_module(gy)
        gx = xp.where(self.cond, gy, 0) if self.needs_input_grad[0] else None
        gother = xp.where(self.cond, 0, gy) if self.needs_input_grad[1] else None
        return gx, gother


class Clip(Function):
    """y = min(max(x, lo), hi) with constant bounds (either may be None).

    dy/dx = 1 where lo <= x <= hi (the bounds included, as torch.clamp) and 0
    outside, so dx = gy * mask; the boolean mask is all that is saved.
    """

    def __init__(self, lo, hi):
        self.lo, self.hi = lo, hi

    def forward(self, x):
        xp = get_array_module(x)
        lo, hi = (None if b is None else _bound(xp, b, x.dtype) for b in (self.lo, self.hi))
        y, mask = x, None
        if lo is not None:
            mask = x >= lo
            y = xp.maximum(y, lo)
        if hi is not None:
            below = x <= hi
            mask = below if mask is None else mask & below
            y = xp.minimum(y, hi)
        self.mask = mask
        self.lo = self.hi = None  # backward needs only the mask: drop the bounds (they may be arrays)
        return y

    def backward(self, gy):
        return gy * self.mask


def _bound(xp, b, dtype):
    """A clip bound as an array of ``x``'s library in ``x``'s dtype (``clip`` has promoted ``x`` to hold it)."""
    if isinstance(b, Tensor):
        b = b.data
    return xp.asarray(b, dtype=dtype)


# ---------------------------------------------------------------------------
# public functions
# ---------------------------------------------------------------------------


def exp(x) -> Tensor:
    """e ** x, element-wise."""
    return Exp()(x)


def log(x) -> Tensor:
    """Natural logarithm, element-wise; log(0) = -inf and log(x < 0) = nan, as in NumPy."""
    return Log()(x)


def sqrt(x) -> Tensor:
    """Square root, element-wise; sqrt(x < 0) = nan, as in NumPy."""
    return Sqrt()(x)


def tanh(x) -> Tensor:
    """Hyperbolic tangent, element-wise."""
    return Tanh()(x)


def sigmoid(x) -> Tensor:
    """The logistic function 1 / (1 + exp(-x)), element-wise, stable for any x (no overflow)."""
    return Sigmoid()(x)


def relu(x) -> Tensor:
    """max(x, 0), element-wise; its gradient at 0 is 0."""
    return ReLU()(x)


def silu(x) -> Tensor:
    """x * sigmoid(x) (SiLU, also called swish), element-wise."""
    return SiLU()(x)


def abs(x) -> Tensor:  # noqa: A001 - mirrors torch.abs; ``abs(tensor)`` also works through __abs__
    """|x|, element-wise; its gradient at 0 is 0 (the sign of 0)."""
    return Abs()(x)


_GELU_FORMS = {"tanh": GELUTanh, "none": GELUErf}


def gelu(x, approximate: str = "tanh") -> Tensor:
    """The Gaussian error linear unit x * Phi(x), Phi the standard normal CDF.

    ``approximate="tanh"`` (the default: GPT-2's form) computes
    0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))); ``approximate="none"`` the
    exact 0.5 x (1 + erf(x / sqrt 2)). The names follow ``torch.nn.functional.gelu``.
    """
    form = _GELU_FORMS.get(approximate) if isinstance(approximate, str) else None
    if form is None:
        raise ValueError(f"gelu: approximate must be 'tanh' (GPT-2's form) or 'none' (exact, with erf), "
                         f"got {approximate!r}")
    return form()(x)


def maximum(a, b) -> Tensor:
    """Element-wise maximum of a and b, with broadcasting.

    Where a == b (a tie) the gradient is split equally: each input receives half
    of the output's gradient, as in PyTorch.
    """
    return Maximum()(*promote(a, b))


def minimum(a, b) -> Tensor:
    """Element-wise minimum of a and b, with broadcasting.

    Where a == b (a tie) the gradient is split equally: each input receives half
    of the output's gradient, as in PyTorch.
    """
    return Minimum()(*promote(a, b))


def where(cond, x, y) -> Tensor:
    """x where ``cond`` is True, y elsewhere; cond, x and y broadcast together.

    ``cond`` is a boolean array or Tensor (e.g. ``t > 0``) and gets no gradient;
    x and y are Tensors, arrays or Python scalars, promoted to one dtype by
    PyTorch's rules (a float scalar or 0-d array does not change a float32 branch).
    The gradient flows to x where cond holds and to y elsewhere.
    """
    if isinstance(cond, Tensor):
        cond = cond.data
    like = next((t.data for t in (x, y) if isinstance(t, Tensor)), None)
    if like is None:
        like = next((t for t in (x, y) if is_array(t)), None)
    if not is_array(cond):
        cond = np.asarray(cond)
        if like is not None:
            cond = get_array_module(like).asarray(cond)
    if cond.dtype != np.bool_:
        raise TypeError(f"where: cond must be boolean, got dtype {cond.dtype}; build it with a comparison "
                        "(e.g. x > 0) or cast it (cond.astype(bool))")
    xp = get_array_module(cond)
    if like is not None and get_array_module(like) is not xp:
        raise TypeError(f"where: cond is on {'cpu' if xp is np else 'cuda'} but the values are not; "
                        "move one with .to(device)")
    if like is None:  # two Python scalars: make them arrays where cond lives
        x, y = (Tensor(xp.asarray(as_tensor(v).data)) for v in (x, y))  # float -> float32, int -> int64
    return Where(cond)(*promote(x, y))


def clip(x, min=None, max=None) -> Tensor:  # noqa: A002 - the names of numpy.clip / torch.clamp
    """Limit x to [min, max] element-wise; either bound may be None (not both).

    The bounds are numbers, arrays or Tensors and get no gradient; the result
    has the dtype x and the bounds promote to (PyTorch's rules: an integer x
    clipped at 0.5 gives float32). The gradient w.r.t. x is 1 where
    min <= x <= max (the bounds included, as torch.clamp) and 0 outside.
    """
    if min is None and max is None:
        raise ValueError("clip: give at least one of min= and max= (both are None, so there is nothing to clip)")
    for name, b in (("min", min), ("max", max)):
        if b is not None and not (isinstance(b, (numbers.Number, Tensor)) or is_array(b)):
            raise TypeError(f"clip: {name} must be a number, an array or a Tensor, got {type(b).__name__}")
    x = as_tensor(x)
    return Clip(min, max)(astype(x, result_type(x, min, max)))

