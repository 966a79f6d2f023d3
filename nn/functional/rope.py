"""Rotary position embeddings (RoPE; Su et al. 2021), as one fused op with an exact inverse for backward.

Convention: "rotate half", as in GPT-NeoX and Hugging Face's Llama. A head
vector x of size D is split into halves x1 = x[:D/2] and x2 = x[D/2:], and
each pair (x[i], x[i + D/2]) is rotated by the angle

    theta(t, i) = t * base ** (-2 i / D),     i = 0 .. D/2 - 1,

where t is the token's absolute position:

    y[i]       = x[i] cos(theta) - x[i + D/2] sin(theta)
    y[i + D/2] = x[i + D/2] cos(theta) + x[i] sin(theta)

(equivalently y = x * cos + rotate_half(x) * sin with rotate_half(x) =
concat(-x2, x1) and the tables repeated twice along the last axis). GPT-J and
Meta's original Llama code rotate adjacent pairs (2i, 2i + 1) instead: the
same function up to a fixed permutation of each head's channels, so weights
trained with one convention need their q/k projection columns permuted to be
used with the other.

Because q_m and k_n are rotated by angles proportional to m and n, their dot
product depends only on m - n (rotations compose: R(m)^T R(n) = R(n - m)).
Positions are absolute, so with a KV cache a new token at position ``offset``
uses ``rope_tables(D, 1, offset=offset)`` and gets exactly the rotation it
would get inside a full sequence.
"""

from __future__ import annotations

import numbers

import numpy as np

from autograd import backend
from autograd.backend import accumulation_dtype, get_array_module
from autograd.engine import Function
from autograd.tensor import Tensor, as_tensor


def rope_tables(head_dim: int, positions, base: float = 10000.0, dtype=np.float32, offset: int = 0, xp=None):
    """The ``(cos, sin)`` tables for RoPE, each of shape ``(T, head_dim // 2)``.

    ``positions`` is either an int ``T`` (positions ``offset, offset + 1, ...,
    offset + T - 1``; with a KV cache ``offset`` is the number of cached
    positions) or a 1-D sequence/array of integer positions (to which ``offset``
    is added). Angles are computed in float64 on the CPU and then cast to
    ``dtype`` (float32 angles for positions in the thousands lose digits), and
    the tables are put on the device of ``xp`` (``numpy`` by default, or the
    device of ``positions`` when it is a CuPy array).
    """
    if isinstance(head_dim, bool) or not isinstance(head_dim, numbers.Integral) or head_dim < 2 or head_dim % 2:
        raise ValueError(f"rope_tables: head_dim must be a positive even integer (RoPE rotates pairs of channels), "
                         f"got {head_dim!r}")
    if not isinstance(base, numbers.Real) or not base > 0:
        raise ValueError(f"rope_tables: base must be a positive number, got {base!r}")
    if isinstance(offset, bool) or not isinstance(offset, numbers.Integral) or offset < 0:
        raise ValueError(f"rope_tables: offset must be a non-negative integer, got {offset!r}")
    if isinstance(positions, numbers.Integral) and not isinstance(positions, bool):
        if positions < 0:
            raise ValueError(f"rope_tables: the sequence length must be >= 0, got {positions}")
        pos = np.arange(offset, offset + int(positions), dtype=np.float64)
    else:
        if isinstance(positions, Tensor):
            positions = positions.data
        if backend.is_array(positions):
            if xp is None:
                xp = get_array_module(positions)
            positions = backend.to_device(positions, "cpu")
        pos = np.asarray(positions)
        if pos.ndim != 1 or (pos.size and pos.dtype.kind not in "iu"):
            raise ValueError(f"rope_tables: positions must be an int (a length) or a 1-D sequence of integer "
                             f"positions, got {pos.dtype} values of shape {pos.shape}")
        pos = pos.astype(np.float64) + offset
    xp = np if xp is None else xp
    inv_freq = float(base) ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # (D/2,)
    angles = pos[:, None] * inv_freq[None, :]  # (T, D/2)
    cos = np.cos(angles).astype(dtype)
    sin = np.sin(angles).astype(dtype)
    if xp is not np:
        cos, sin = xp.asarray(cos), xp.asarray(sin)
    return cos, sin


class Rotary(Function):
    """y = R(theta) x: each pair (x1_i, x2_i) = (x[..., i], x[..., i + D/2]) rotated by theta (see the module doc).

        y1 = x1 cos - x2 sin
        y2 = x2 cos + x1 sin

    Backward: y = R x is linear with R orthogonal, so dx = R^T gy = R(-theta) gy,
    the inverse rotation (cos is even, sin is odd):

        dx1 =  g1 cos + g2 sin
        dx2 = -g1 sin + g2 cos

    Only the tables are saved (not x). They are constants: no gradient.
    """

    def __init__(self, cos, sin):
        self.cos, self.sin = cos, sin

    def forward(self, x):
        xp = get_array_module(x)
        half = x.shape[-1] // 2
        cd = accumulation_dtype(x.dtype)
        c = self.cos = self.cos.astype(cd, copy=False)
        s = self.sin = self.sin.astype(cd, copy=False)
        x1 = x[..., :half].astype(cd, copy=False)
        x2 = x[..., half:].astype(cd, copy=False)
        y = xp.empty(x.shape, dtype=cd)
        y[..., :half] = x1 * c - x2 * s
        y[..., half:] = x2 * c + x1 * s
        self.in_dtype = x.dtype
        return y.astype(x.dtype, copy=False)

    def backward(self, gy):
        xp = get_array_module(gy)
        half = gy.shape[-1] // 2
        c, s = self.cos, self.sin
        g1 = gy[..., :half].astype(c.dtype, copy=False)
        g2 = gy[..., half:].astype(c.dtype, copy=False)
        dx = xp.empty(gy.shape, dtype=c.dtype)
        dx[..., :half] = g1 * c + g2 * s
        dx[..., half:] = g2 * c - g1 * s
        return dx.astype(self.in_dtype, copy=False)


def _table(t, x, name):
    """A table as an array on x's device."""
    if isinstance(t, Tensor):
        t = t.data
    if not backend.is_array(t):
        t = np.asarray(t)
    if t.dtype.kind != "f":
        raise TypeError(f"apply_rotary: {name} must be a floating-point table, got dtype {t.dtype}")
    return backend.to_device(t, x.device) if backend.device_of(t) != x.device else t


def apply_rotary(x, cos, sin) -> Tensor:
    """Rotate the last axis of ``x`` (e.g. ``(B, H, T, D)``) by the RoPE tables ``cos``/``sin`` of shape ``(T, D/2)``.

    Use ``rope_tables(D, T, offset=...)`` for the tables; any shape that
    broadcasts against ``x[..., :D/2]`` without enlarging it works (e.g.
    ``(B, 1, T, D/2)`` for per-sequence positions). float16 inputs are rotated in
    float32 and returned as float16. See the module docstring for the convention.
    """
    x = as_tensor(x)
    if x.ndim < 1 or x.shape[-1] % 2:
        raise ValueError(f"apply_rotary: the last axis of x (the head size) must be even, got shape {x.shape}")
    if x.dtype.kind != "f":
        raise TypeError(f"apply_rotary needs a floating-point input, got dtype {x.dtype}")
    cos, sin = _table(cos, x, "cos"), _table(sin, x, "sin")
    half_shape = x.shape[:-1] + (x.shape[-1] // 2,)
    if cos.shape != sin.shape:
        raise ValueError(f"apply_rotary: cos and sin must have the same shape, got {cos.shape} and {sin.shape}")
    try:
        ok = np.broadcast_shapes(cos.shape, half_shape) == half_shape
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"apply_rotary: tables of shape {cos.shape} do not fit x of shape {x.shape}: they must "
                         f"broadcast to {half_shape}, i.e. be (T, D/2) = ({x.shape[-2] if x.ndim > 1 else 1}, "
                         f"{x.shape[-1] // 2}); build them with rope_tables(head_dim={x.shape[-1]}, positions=T)")
    return Rotary(cos, sin)(x)


__all__ = ["rope_tables", "apply_rotary", "Rotary"]
