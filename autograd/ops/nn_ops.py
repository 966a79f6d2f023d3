"""Neural-network ops with hand-written (fused) backward passes.

``softmax``, ``log_softmax``, ``cross_entropy``, ``embedding`` and ``dropout``.
Each is one ``Function`` over raw arrays, not a composition of smaller ops: the
backward pass is the closed form derived in its docstring, which needs fewer
temporaries and fewer graph nodes than the composition would.

Precision: float16 inputs to the normalising ops (softmax, log-softmax,
cross-entropy) are computed in float32 internally, since a float16 sum over a
vocabulary loses digits and ``exp`` overflows above ~11; mixed-precision
training relies on this.
"""

from __future__ import annotations

import numbers

import numpy as np

from .. import backend
from ..backend import get_array_module
from ..backend import quiet_fp_errors as _quiet
from ..engine import Function
from ..tensor import Tensor, as_tensor

# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


_compute_dtype = backend.accumulation_dtype  # half precision is computed in float32


def _check_float(x, name):
    if x.dtype.kind != "f":
        raise TypeError(f"{name} needs a floating-point input, got dtype {x.dtype}; cast first, "
                        "e.g. x.astype(np.float32)")


def _normalize_axis(axis, ndim, name):
    """A valid non-negative axis, or a clear error."""
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"{name}: axis must be an integer, got {axis!r}")
    if ndim == 0:
        raise ValueError(f"{name} needs an input with at least one dimension, got a 0-d array")
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name}: axis {axis} is out of range for an input with {ndim} dimensions "
                         f"(use -{ndim} .. {ndim - 1})")
    return int(axis) % ndim




def _index_array(ids, like):
    """Class ids / token ids as an array on ``like``'s device (a Tensor's data, an array, or Python ints)."""
    if isinstance(ids, Tensor):
        return ids.data
    if backend.is_array(ids):
        return ids
    xp = get_array_module(like.data) if isinstance(like, Tensor) else np
    return xp.asarray(np.asarray(ids))


def _check_integer(ids, name, fix):
    if ids.dtype.kind not in "iu":
        raise TypeError(f"{name} must be integer ids, got dtype {ids.dtype}; {fix}")


# ---------------------------------------------------------------------------
# softmax / log_softmax
# ---------------------------------------------------------------------------


class Softmax(Function):
    """y = exp(x - max(x)) / sum(exp(x - max(x))) along ``axis`` (subtracting the max changes nothing
    mathematically and keeps ``exp`` from overflowing).

    Backward: dy_i/dx_j = y_i (delta_ij - y_j), so
    dx_j = sum_i gy_i y_i (delta_ij - y_j) = y_j gy_j - y_j sum_i gy_i y_i
         = y_j (gy_j - sum_i gy_i y_i).
    Only ``y`` is saved. float16 is computed in float32 and returned as float16.
    """

    def __init__(self, axis=-1):
        self.axis = axis

    def forward(self, x):
        _check_float(x, "softmax")
        xp = get_array_module(x)
        axis = self.axis = _normalize_axis(self.axis, x.ndim, "softmax")
        in_dtype = x.dtype
        x = x.astype(_compute_dtype(in_dtype), copy=False)
        e = x - x.max(axis=axis, keepdims=True)  # a fresh array: exponentiate and normalise it in place
        xp.exp(e, out=e)
        e /= e.sum(axis=axis, keepdims=True)
        y = e.astype(in_dtype, copy=False)
        self.y = y
        return y

    def backward(self, gy):
        cd = _compute_dtype(self.y.dtype)
        y = self.y.astype(cd, copy=False)
        g = gy.astype(cd, copy=False)
        dx = g - (g * y).sum(axis=self.axis, keepdims=True)
        dx *= y
        return dx.astype(self.y.dtype, copy=False)


class LogSoftmax(Function):
    """y = x - logsumexp(x) = (x - m) - log(sum(exp(x - m))) along ``axis``, with m = max(x).

    Backward: dy_i/dx_j = delta_ij - softmax(x)_j, so
    dx_j = gy_j - softmax(x)_j sum_i gy_i = gy_j - exp(y_j) sum_i gy_i.
    Only ``y`` is saved (softmax is recovered as exp(y)). float16 is computed in
    float32 and returned as float16.
    """

    def __init__(self, axis=-1):
        self.axis = axis

    def forward(self, x):
        _check_float(x, "log_softmax")
        xp = get_array_module(x)
        axis = self.axis = _normalize_axis(self.axis, x.ndim, "log_softmax")
        in_dtype = x.dtype
        cd = _compute_dtype(in_dtype)
        x = x.astype(cd, copy=False)
        z = x - x.max(axis=axis, keepdims=True)  # fresh: becomes the output in place
        lse = xp.log(xp.exp(z).sum(axis=axis, keepdims=True))
        z -= lse
        y = z.astype(in_dtype, copy=False)
        self.y = y
        return y

    def backward(self, gy):
        xp = get_array_module(gy)
        cd = _compute_dtype(self.y.dtype)
        g = gy.astype(cd, copy=False)
        dx = xp.exp(self.y.astype(cd, copy=False))  # softmax(x), a fresh array
        dx *= -g.sum(axis=self.axis, keepdims=True)
        dx += g
        return dx.astype(self.y.dtype, copy=False)


def softmax(x, axis: int = -1) -> Tensor:
    """Softmax along ``axis`` (numerically stable; float16 in -> computed in float32 -> float16 out)."""
    return Softmax(axis)(x)


def log_softmax(x, axis: int = -1) -> Tensor:
    """log(softmax(x)) along ``axis``, computed stably as x - logsumexp(x) (float16 computed in float32)."""
    return LogSoftmax(axis)(x)


# ---------------------------------------------------------------------------
# cross-entropy
# ---------------------------------------------------------------------------

_REDUCTIONS = ("mean", "sum", "none")


class CrossEntropy(Function):
    """Softmax cross-entropy with integer targets, fused: loss_n = logsumexp(x_n) - x_n[t_n].

    Forward, per row n of the logits (N, V) flattened from (..., V):
    m_n = max_v x_nv, lse_n = m_n + log(sum_v exp(x_nv - m_n)), and the loss is the
    target's entry of log_softmax, -(x_n[t_n] - lse_n); only the (N,) vector lse is
    saved (the logits are kept alive by the graph anyway), not an (N, V) softmax.

    Backward: d loss_n / d x_nv = softmax(x_n)_v - [v == t_n], so with the row
    weight w_n = d L / d loss_n (gy / count for "mean", gy for "sum", gy_n for
    "none", and 0 at ignored rows):
    dx_nv = w_n (exp(x_nv - lse_n) - [v == t_n]).
    The one-hot term is never materialised: recompute p = exp(x - lse) into a
    fresh array, subtract 1 at (n, t_n) by fancy indexing, scale rows by w.

    Targets equal to ``ignore_index`` contribute neither loss nor gradient.
    "mean" divides by the number of non-ignored targets; when every target is
    ignored that is 0/0 and the loss is NaN while the gradients are 0, exactly
    as PyTorch does. float16 logits are computed in float32 and the loss is
    float32 (the gradient w.r.t. the logits keeps float16).
    """

    def __init__(self, ignore_index=-100, reduction="mean"):
        if reduction not in _REDUCTIONS:
            raise ValueError(f"cross_entropy: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
            raise TypeError(f"cross_entropy: ignore_index must be an integer, got {ignore_index!r}")
        self.ignore_index = int(ignore_index)
        self.reduction = reduction

    def forward(self, logits, targets):
        _check_float(logits, "cross_entropy (logits)")
        _check_integer(targets, "cross_entropy targets", "pass class ids, e.g. targets.astype(np.int64)")
        if logits.ndim == 0 or logits.shape[:-1] != targets.shape:
            raise ValueError(
                f"cross_entropy: logits of shape {logits.shape} need targets of shape {logits.shape[:-1]} "
                f"(the logits' shape without the last, class axis), got targets of shape {targets.shape}; "
                "flatten both consistently, e.g. logits.reshape(-1, V) with targets.reshape(-1)")
        xp = get_array_module(logits)
        V = logits.shape[-1]
        if V == 0:
            raise ValueError(f"cross_entropy: logits of shape {logits.shape} have no classes (last axis is 0)")
        cd = _compute_dtype(logits.dtype)
        t = targets.reshape(-1)  # (N,)
        N = t.shape[0]
        valid = t != self.ignore_index  # (N,)
        bad = valid & ((t < 0) | (t >= V))
        if N and bool(bad.any()):  # one host sync on the GPU
            first = int(bad.argmax())
            pos = tuple(int(i) for i in np.unravel_index(first, targets.shape))
            raise ValueError(
                f"target id {int(t[first])} at position {pos} is outside the vocabulary of {V} logits; "
                f"targets must be in [0, {V}) or equal ignore_index={self.ignore_index} "
                "(check the tokenizer's vocab_size against the model's)")
        t_safe = xp.where(valid, t, 0)  # ignored rows point at class 0; their weight is 0
        x = logits.reshape(N, V)  # (N, V)
        rows = xp.arange(N)
        m = x.max(axis=1).astype(cd, copy=False)  # (N,)
        if x.dtype == cd:
            e = x - m[:, None]  # (N, V), a fresh array
        else:  # float16: one float32 copy, shifted in place
            e = x.astype(cd)  # (N, V)
            e -= m[:, None]
        xp.exp(e, out=e)
        lse = m + xp.log(e.sum(axis=1))  # (N,)
        del e
        picked = x[rows, t_safe].astype(cd, copy=False)  # (N,)
        losses = xp.where(valid, lse - picked, xp.zeros((), cd))  # (N,)
        self.x, self.t, self.valid, self.lse, self.rows = x, t_safe, valid, lse, rows
        self.in_shape, self.cd = logits.shape, cd
        if self.reduction == "none":
            return losses.reshape(targets.shape)  # (...) like targets
        total = losses.sum()
        if self.reduction == "sum":
            return total
        self.count = valid.sum().astype(cd)
        with _quiet(xp):
            return total / self.count  # NaN when every target is ignored, as in PyTorch

    def backward(self, gy):
        if not self.needs_input_grad[0]:
            return None, None
        xp = get_array_module(gy)
        cd, N = self.cd, self.lse.shape[0]
        gy = gy.astype(cd, copy=False)
        zero = xp.zeros((), cd)
        if self.reduction == "mean":
            with _quiet(xp):
                w = xp.where(self.valid, gy / self.count, zero)  # (N,); 0 at ignored rows even when count == 0
        elif self.reduction == "sum":
            w = xp.where(self.valid, gy, zero)  # (N,)
        else:
            w = xp.where(self.valid, gy.reshape(N), zero)  # (N,)
        p = self.x.astype(cd)  # (N, V), a fresh array that becomes the gradient in place
        p -= self.lse[:, None]
        xp.exp(p, out=p)  # softmax
        p[self.rows, self.t] -= 1  # minus the one-hot, without building it (rows are distinct)
        p *= w[:, None]
        dx = p.reshape(self.in_shape)  # (..., V)
        return dx.astype(self.x.dtype, copy=False), None


def cross_entropy(logits, targets, ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """Softmax cross-entropy between ``logits`` (..., V) and integer ``targets`` (...).

    ``targets`` is an integer array, an integer Tensor, or Python ints; entries
    equal to ``ignore_index`` are skipped. ``reduction``: "mean" over the
    non-ignored targets (NaN if all are ignored, as in PyTorch; the gradient is
    then 0), "sum", or "none" (per-position losses shaped like ``targets``, 0 at
    ignored positions). Out-of-range ids raise a ValueError naming the id, its
    position and V. float16 logits give a float32 loss.
    """
    ce = CrossEntropy(ignore_index, reduction)
    return ce(logits, _index_array(targets, logits))


# ---------------------------------------------------------------------------
# embedding
# ---------------------------------------------------------------------------


class Embedding(Function):
    """y = weight[ids]: row lookup, y has shape ids.shape + (C,).

    Backward: each output row y[k] is a copy of weight[ids[k]], so
    dweight[v] = sum over k with ids[k] == v of gy[k]: a scatter-add of the rows
    of gy into zeros (V, C). Repeated ids must all count, hence
    ``backend.scatter_add`` (``np.add.at``), not ``dw[ids] += gy``. The ids get no
    gradient.
    """

    def forward(self, weight, ids):
        if weight.ndim != 2:
            raise ValueError(f"embedding: weight must be a (V, C) matrix, got shape {weight.shape}")
        _check_integer(ids, "embedding ids", "pass token ids, e.g. ids.astype(np.int64)")
        V = weight.shape[0]
        if ids.size:
            bad = (ids < 0) | (ids >= V)
            if bool(bad.any()):  # one host sync on the GPU
                flat = int(bad.reshape(-1).argmax())
                pos = tuple(int(i) for i in np.unravel_index(flat, ids.shape))
                raise ValueError(
                    f"embedding: id {int(ids.reshape(-1)[flat])} at position {pos} is outside the table of "
                    f"{V} rows; ids must be in [0, {V}) (check the tokenizer's vocab_size against the model's)")
        self.ids, self.V = ids, V
        return weight[ids]  # ids.shape + (C,)

    def backward(self, gy):
        if not self.needs_input_grad[0]:
            return None, None
        xp = get_array_module(gy)
        C = gy.shape[-1]
        gw = xp.zeros((self.V, C), dtype=backend.accumulation_dtype(gy.dtype))  # frequent ids sum many rows
        backend.scatter_add(gw, self.ids.reshape(-1), gy.reshape(-1, C))  # (n_ids,), (n_ids, C)
        return gw.astype(gy.dtype, copy=False), None


def embedding(weight, ids) -> Tensor:
    """Look up rows of ``weight`` (V, C) at integer ``ids`` (any shape): output ids.shape + (C,)."""
    return Embedding()(weight, _index_array(ids, weight))


# ---------------------------------------------------------------------------
# dropout
# ---------------------------------------------------------------------------


class Dropout(Function):
    """y = x * mask, with mask = keep / (1 - p) (inverted dropout: E[y] = x, so eval needs no rescale).

    Backward: y is linear in x with the fixed mask, so dx = gy * mask. The
    mask is stored once, already scaled, in x's dtype.
    """

    def __init__(self, mask):
        self.mask = mask

    def forward(self, x):
        return x * self.mask

    def backward(self, gy):
        return gy * self.mask


def dropout(x, p: float = 0.5, training: bool = True, generator=None) -> Tensor:
    """Inverted dropout: zero each element with probability ``p`` and scale the rest by 1/(1-p).

    The identity (the same tensor) when ``training`` is False or p == 0; zeros
    when p == 1. The mask is drawn from ``generator`` (a NumPy or CuPy
    ``Generator``) or from ``autograd.random.default_generator``, so
    ``autograd.random.manual_seed`` makes masks reproducible.
    """
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"dropout probability must be a number in [0, 1], got {p!r}")
    p = float(p)
    x = x if isinstance(x, Tensor) else as_tensor(x)
    if not training or p == 0.0:
        return x
    _check_float(x.data, "dropout")
    xp = get_array_module(x.data)
    dtype = x.dtype
    if p == 1.0:
        mask = xp.zeros(x.shape, dtype=dtype)
    else:
        if generator is None:
            from .. import random as _random

            generator = _random.default_generator(xp)
        u = generator.random(x.shape, dtype=np.float32)  # uniform [0, 1)
        if get_array_module(u) is not xp:
            u = backend.to_device(u, x.device)  # a CPU generator for a GPU tensor (or the reverse)
        mask = (u >= np.float32(p)).astype(dtype)  # keep with probability 1 - p
        mask *= dtype.type(1.0 / (1.0 - p))
    return Dropout(mask)(x)
