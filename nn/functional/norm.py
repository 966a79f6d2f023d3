"""Fused normalisation ops: ``layer_norm`` and ``rms_norm``, each one node with a hand-derived backward.

Both normalise over the last axis. Following llm.c, forward saves only the
per-row statistics (``mean`` and ``rstd`` for LayerNorm, ``rstd`` for RMSNorm,
shape ``(..., 1)``) besides the input it already holds; backward works from
x, mean and rstd instead of keeping a second activation-sized array.

Precision: float16 inputs (mixed precision) are normalised in float32 (a float16
sum of squares over thousands of channels loses digits) and the result is
returned as float16. float32 and float64 stay as they are. Each gradient comes
back in the dtype of its input.
"""

from __future__ import annotations

import numbers

from autograd import kernels
from autograd.backend import accumulation_dtype, get_array_module, sum_columns_of, sum_rows_of
from autograd.engine import Function
from autograd.tensor import Tensor, as_tensor


_compute_dtype = accumulation_dtype  # statistics of half-precision inputs are computed in float32


def _check_eps(eps, name):
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps >= 0:
        raise ValueError(f"{name}: eps must be a non-negative number, got {eps!r}")
    return float(eps)


def _check_inputs(name, x, weight, bias):
    """Clear errors for the shapes and dtypes a normalisation accepts."""
    if x.ndim < 1:
        raise ValueError(f"{name} normalises the last axis, so it needs an input with at least one dimension, "
                         f"got a 0-d array")
    if x.dtype.kind != "f":
        raise TypeError(f"{name} needs a floating-point input, got dtype {x.dtype}; cast first, "
                        "e.g. x.astype(np.float32)")
    c = x.shape[-1]
    for label, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(p.shape) != (c,):
            raise ValueError(f"{name}: {label} has shape {tuple(p.shape)}, but the input's last axis has size {c}; "
                             f"{label} must have shape ({c},)")


def _normalise_rows(x2, weight, bias, eps: float, center: bool, cd):
    """Forward of LayerNorm (``center``) or RMSNorm over the rows of ``x2`` (N, C), in blocks on the CPU threads.

    Returns ``(y, mean, rstd)``: y (N, C) in ``cd``, the row means (N, 1) (None
    without centring) and ``rstd`` (N, 1), 1 / sqrt(var + eps) or
    1 / sqrt(mean(x^2) + eps).
    """
    xp = get_array_module(x2)
    N, C = x2.shape
    w = weight.astype(cd, copy=False) if weight is not None else None
    b = bias.astype(cd, copy=False) if bias is not None else None
    mean = xp.empty((N, 1), dtype=cd) if center else None
    rstd = xp.empty((N, 1), dtype=cd)
    y = xp.empty((N, C), dtype=cd)  # becomes xhat, then y, in place

    def piece(sl):  # a block of rows
        xs, ys, r = x2[sl].astype(cd, copy=False), y[sl], rstd[sl]
        (sq,) = kernels.scratch(xp, 1, ys.size, cd)
        if center:
            mu = mean[sl]
            sum_rows_of(xs, out=mu[:, 0])
            mu *= cd.type(1.0 / C)  # (n, 1)
            xp.subtract(xs, mu, out=ys)
        else:
            ys[...] = xs
        sum_rows_of(xp.multiply(ys, ys, out=sq.reshape(ys.shape)), out=r[:, 0])  # (n, 1): sums of squares
        r *= cd.type(1.0 / C)  # variances (mean squares without centring)
        r += cd.type(eps)
        xp.sqrt(r, out=r)
        xp.reciprocal(r, out=r)  # 1 / sqrt(var + eps)
        ys *= r
        if w is not None:
            ys *= w
        if b is not None:
            ys += b

    kernels.run(kernels.row_pieces(xp, N, C), piece)
    return y, mean, rstd


def _normalise_rows_backward(g2, x2, weight, mean, rstd, need_x: bool, need_w: bool, need_b: bool):
    """Backward of ``_normalise_rows``: ``(dx, dw, db)`` (each None where not needed), dx in rstd's dtype.

    Works from the centred input xc = x - mean (x itself without centring)
    rather than xhat = xc * rstd, which saves a pass over the block: every sum
    that needs xhat takes rstd as weights in a BLAS product instead. With
    g = gy * w (see LayerNormFunction for the derivation):

        dw  = sum_rows(gy * xhat)        = (gy * xc)^T @ rstd
        s1  = sum_j(g_j xc_j)            = (gy * xc) @ w
        s2  = sum_j(g_j)                 = gy @ w
        dx  = rstd * (g - xhat * mean(g xhat) - mean(g))
            = rstd * g - (rstd^3 s1 / C) * xc - rstd s2 / C

    dw and db are summed per block, then over the blocks in order, so the bits
    do not depend on the number of threads.
    """
    xp = get_array_module(g2)
    cd = rstd.dtype
    N, C = x2.shape
    w = weight.astype(cd, copy=False) if weight is not None else None
    dx = xp.empty((N, C), dtype=cd) if need_x else None
    inv_n = cd.type(1.0 / C)
    pieces = list(enumerate(kernels.row_pieces(xp, N, C)))
    dw_parts = xp.empty((len(pieces), C), dtype=cd) if need_w else None
    db_parts = xp.empty((len(pieces), C), dtype=cd) if need_b else None

    def piece(block):  # (index, slice) of a cache-sized block of rows
        i, sl = block
        n = sl.stop - sl.start
        xc, gx = (a.reshape(n, C) for a in kernels.scratch(xp, 2, n * C, cd))  # (n, C) each
        gs, xs, r = g2[sl].astype(cd, copy=False), x2[sl].astype(cd, copy=False), rstd[sl]
        if mean is not None:
            xp.subtract(xs, mean[sl], out=xc)
        else:
            xc = xs  # read only
        xp.multiply(gs, xc, out=gx)  # gy * xc
        if need_w:
            xp.matmul(r[:, 0], gx, out=dw_parts[i])  # (C,): rows weighted by rstd, i.e. sum_rows(gy * xhat)
        if need_b:
            sum_columns_of(gs, out=db_parts[i])
        if not need_x:
            return
        s1 = gx @ w if w is not None else sum_rows_of(gx)  # (n,)
        a = (s1[:, None] * r) * r * r * inv_n  # (n, 1): rstd^3 s1 / C, the factor of xc
        d = dx[sl]
        if w is not None:
            xp.multiply(gs, w, out=gx)  # g = gy * w (gx is scratch from here on)
            xp.multiply(gx, r, out=d)
        else:
            xp.multiply(gs, r, out=d)  # rstd * g
        d -= xp.multiply(xc, a, out=gx)
        if mean is not None:
            s2 = gs @ w if w is not None else sum_rows_of(gs)  # (n,)
            d -= (s2[:, None] * r) * inv_n  # rstd * mean(g)

    kernels.run(pieces, piece)
    dw = dw_parts.sum(axis=0) if need_w else None
    db = db_parts.sum(axis=0) if need_b else None
    return dx, dw, db


class LayerNormFunction(Function):
    """y = xhat * w + b with xhat = (x - mean) * rstd, rstd = 1 / sqrt(var + eps), over the last axis (size N).

    Forward saves x (already held by the graph), ``mean`` and ``rstd`` (one
    number per row), as llm.c does; backward works from x - mean and rstd
    without rebuilding xhat (``_normalise_rows_backward`` has the rearranged
    formula). Both run in cache-sized blocks of rows (``autograd.kernels``) spread over
    the CPU threads, with small per-thread buffers (shared with RMSNorm); dw
    and db are summed per block, then over the blocks in order. Row and column
    sums are BLAS products with a vector (of ones, of w, or of rstd).

    Backward. Let g = gy * w (g = gy without a weight). Along one row,
    d xhat_j / d x_i = rstd * (delta_ij - 1/N - xhat_i xhat_j / N)
    (the 1/N from d mean/dx_i, the xhat_i xhat_j / N from d rstd/dx_i =
    -rstd^3 (x_i - mean) / N). Contracting with g:

        dx_i = sum_j g_j d xhat_j/d x_i = rstd * (g_i - mean_j(g_j) - xhat_i * mean_j(g_j xhat_j))

    and, since w and b act on every row, dw = sum_rows(gy * xhat), db = sum_rows(gy).
    """

    def __init__(self, eps: float, has_weight: bool, has_bias: bool):
        self.eps, self.has_weight, self.has_bias = eps, has_weight, has_bias

    def forward(self, x, *params):
        weight = params[0] if self.has_weight else None
        bias = params[-1] if self.has_bias else None
        _check_inputs("layer_norm", x, weight, bias)
        cd = _compute_dtype(x.dtype, *(p.dtype for p in params))
        x2 = x.reshape(-1, x.shape[-1])  # (N, C)
        y, self.mean, self.rstd = _normalise_rows(x2, weight, bias, self.eps, True, cd)
        self.x2, self.weight = x2, weight
        self.param_dtypes = [p.dtype for p in params]
        return y.astype(x.dtype, copy=False).reshape(x.shape)

    def backward(self, gy):
        need_w = self.has_weight and self.needs_input_grad[1]
        need_b = self.has_bias and self.needs_input_grad[-1]
        dx, dw, db = _normalise_rows_backward(gy.reshape(self.x2.shape), self.x2, self.weight, self.mean, self.rstd,
                                              self.needs_input_grad[0], need_w, need_b)  # (N, C) gradient in
        grads = [dx.astype(self.x2.dtype, copy=False).reshape(gy.shape) if dx is not None else None]
        if self.has_weight:
            grads.append(dw.astype(self.param_dtypes[0], copy=False) if need_w else None)
        if self.has_bias:
            grads.append(db.astype(self.param_dtypes[-1], copy=False) if need_b else None)
        return tuple(grads)


class RMSNormFunction(Function):
    """y = x * rstd * w with rstd = 1 / sqrt(mean(x^2) + eps) over the last axis (size N); no centring.

    Forward saves x (already held by the graph) and ``rstd`` (one number per
    row); both passes are LayerNorm's blocked ones without the mean terms.

    Backward. Let xhat = x * rstd and g = gy * w. d rstd / d x_i = -rstd^3 x_i / N, so

        dx_i = g_i rstd + sum_j g_j x_j (-rstd^3 x_i / N) = rstd * (g_i - xhat_i * mean_j(g_j xhat_j))

    (LayerNorm's formula without the mean terms), and dw = sum_rows(gy * xhat).
    """

    def __init__(self, eps: float, has_weight: bool):
        self.eps, self.has_weight = eps, has_weight

    def forward(self, x, *params):
        weight = params[0] if self.has_weight else None
        _check_inputs("rms_norm", x, weight, None)
        cd = _compute_dtype(x.dtype, *(p.dtype for p in params))
        x2 = x.reshape(-1, x.shape[-1])  # (N, C)
        y, _, self.rstd = _normalise_rows(x2, weight, None, self.eps, False, cd)
        self.x2, self.weight = x2, weight
        return y.astype(x.dtype, copy=False).reshape(x.shape)

    def backward(self, gy):
        need_w = self.has_weight and self.needs_input_grad[1]
        dx, dw, _ = _normalise_rows_backward(gy.reshape(self.x2.shape), self.x2, self.weight, None, self.rstd,
                                             self.needs_input_grad[0], need_w, False)  # (N, C) gradient in
        gx = dx.astype(self.x2.dtype, copy=False).reshape(gy.shape) if dx is not None else None
        if self.weight is None:
            return gx
        return gx, (dw.astype(self.weight.dtype, copy=False) if need_w else None)


def _tensor_args(x, *params):
    """x as a Tensor and the non-None parameters, wrapped like x."""
    x = as_tensor(x)
    return x, [p if isinstance(p, Tensor) else as_tensor(p, like=x) for p in params if p is not None]


def layer_norm(x, weight=None, bias=None, eps: float = 1e-5) -> Tensor:
    """LayerNorm over the last axis: ``(x - mean) / sqrt(var + eps) * weight + bias``, as one fused node.

    ``weight`` and ``bias`` have shape ``(C,)`` for an input ``(..., C)``; either
    may be None (no scale / no shift). float16 inputs are normalised in float32
    and returned as float16.
    """
    eps = _check_eps(eps, "layer_norm")
    x, params = _tensor_args(x, weight, bias)
    return LayerNormFunction(eps, weight is not None, bias is not None)(x, *params)


def rms_norm(x, weight=None, eps: float = 1e-6) -> Tensor:
    """RMSNorm over the last axis (Llama): ``x / sqrt(mean(x^2) + eps) * weight``, as one fused node.

    ``weight`` has shape ``(C,)`` for an input ``(..., C)``, or is None. float16
    inputs are normalised in float32 and returned as float16.
    """
    eps = _check_eps(eps, "rms_norm")
    x, params = _tensor_args(x, weight)
    return RMSNormFunction(eps, weight is not None)(x, *params)


__all__ = ["LayerNormFunction", "RMSNormFunction", "layer_norm", "rms_norm"]
