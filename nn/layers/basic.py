"""Basic layers: Linear (with its fused op), Embedding, Dropout, GELU, SiLU, Identity.

Layout note: ``Linear`` stores its weight as ``(in_features, out_features)``, so
the forward pass is ``x @ W + b`` with no transpose. PyTorch's ``nn.Linear``
stores ``(out_features, in_features)`` and computes ``x @ W.T + b``; transpose
when loading PyTorch weights. (GPT-2's original checkpoints use ``Conv1D``,
which already stores ``(in, out)``: those load as they are.)
"""

from __future__ import annotations

import numpy as np

import autograd
from autograd import kernels
from autograd.backend import get_array_module, sum_columns_of, sum_in_float32
from autograd.engine import Function
from autograd.tensor import Tensor

from .. import init
from ..module import Module, Parameter


class LinearFunction(Function):
    """y = x @ W + b for x of shape (..., in), W (in, out), b (out,), as one node.

    The leading axes are flattened so every product is one 2-D matrix product
    (dW is never built per batch element and summed). With X = x flattened to
    (N, in) and G = dL/dy flattened to (N, out):

        dL/dx = G @ W^T            (N, in), reshaped back to x's shape
        dL/dW = X^T @ G            (in, out): sum over rows of outer products x_n g_n^T
        dL/db = sum_n G[n]         (out,): b is added to every row

    Each product is cut into blocks of its output for the CPU threads
    (``autograd.kernels.matmul_tasks``; one call on the GPU), and backward
    hands the blocks of dx and dW and the bias sum to the threads in one round.
    """

    def forward(self, x, w, b=None):
        if x.ndim < 1 or w.ndim != 2 or x.shape[-1] != w.shape[0]:
            raise ValueError(f"linear: input of shape {x.shape} does not fit a weight of shape {w.shape} "
                             f"(stored (in_features, out_features)): the input's last axis must be {w.shape[0]}")
        if b is not None and b.shape != (w.shape[1],):
            raise ValueError(f"linear: bias of shape {b.shape} does not match out_features {w.shape[1]}")
        self.lead = x.shape[:-1]
        x2 = x.reshape(-1, w.shape[0])  # (N, in)
        y2 = kernels.matmul(x2, w, bias=b)  # (N, out)
        self.x2, self.w, self.has_bias = x2, w, b is not None
        return y2.reshape(*self.lead, w.shape[1])  # (..., out)

    def backward(self, gy):
        w, x2 = self.w, self.x2
        g2 = gy.reshape(-1, w.shape[1])  # (N, out)
        need_x, need_w = self.needs_input_grad[:2]
        need_b = self.has_bias and self.needs_input_grad[2]
        xp = get_array_module(g2)
        gx = xp.empty((g2.shape[0], w.shape[0]), dtype=np.result_type(g2.dtype, w.dtype)) if need_x else None  # (N, in)
        gw = xp.empty(w.shape, dtype=np.result_type(x2.dtype, g2.dtype)) if need_w else None  # (in, out)
        gb = xp.empty(w.shape[1], dtype=g2.dtype) if need_b else None  # (out,)
        tasks = [lambda: _column_sums(g2, out=gb)] if need_b else []  # the bias sum and both products' blocks:
        tasks += kernels.matmul_tasks(g2, w.T, gx) if need_x else []  # one round of the threads
        tasks += kernels.matmul_tasks(x2.T, g2, gw) if need_w else []
        kernels.run_tasks(tasks, xp)
        if gx is not None:
            gx = gx.reshape(*self.lead, w.shape[0])  # (..., in)
        return (gx, gw, gb) if self.has_bias else (gx, gw)


def _column_sums(g2, out):
    """out[:] = g2.sum(axis=0): through BLAS in float32/float64, accumulated in float32 for half precision."""
    if g2.dtype.itemsize >= 4:
        sum_columns_of(g2, out=out)
    else:
        out[...] = sum_in_float32(g2, axis=0)


def linear(x, weight, bias=None) -> Tensor:
    """``x @ weight + bias`` with weight stored (in_features, out_features), as one fused node."""
    if bias is None:
        return LinearFunction()(x, weight)
    return LinearFunction()(x, weight, bias)


class Linear(Module):
    """A fully connected layer: ``y = x @ weight + bias``, weight of shape ``(in_features, out_features)``.

    (PyTorch stores ``(out, in)`` and transposes in forward; see the module
    docstring.) Initialised the GPT-2 way: weight N(0, ``init_std``), default
    0.02, bias 0. A projection into the residual stream takes
    ``init_std=nn.init.residual_std(n_layer)`` (GPT-2's 0.02 / sqrt(2 n_layer)).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 generator: np.random.Generator | None = None, init_std: float = init.GPT2_STD,
                 dtype=np.float32):
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"Linear needs positive sizes, got in_features={in_features}, out_features={out_features}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.weight = Parameter(np.empty((in_features, out_features), dtype=dtype))
        init.normal_(self.weight, init_std, generator=generator)
        if bias:
            self.bias = Parameter(np.zeros(out_features, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    def forward(self, x):
        return linear(x, self.weight, self.bias)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Embedding(Module):
    """A lookup table: ``forward(ids)`` returns ``weight[ids]``, shape ``ids.shape + (embedding_dim,)``.

    ``weight`` has shape ``(num_embeddings, embedding_dim)``, N(0, ``init_std``)
    (GPT-2: 0.02), and is marked ``no_decay`` so the default GPT parameter
    groups do not decay it.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, generator: np.random.Generator | None = None,
                 init_std: float = init.GPT2_STD, dtype=np.float32):
        super().__init__()
        if num_embeddings < 1 or embedding_dim < 1:
            raise ValueError(f"Embedding needs positive sizes, got {num_embeddings} x {embedding_dim}")
        self.num_embeddings, self.embedding_dim = int(num_embeddings), int(embedding_dim)
        self.weight = Parameter(np.empty((num_embeddings, embedding_dim), dtype=dtype), no_decay=True)
        init.normal_(self.weight, init_std, generator=generator)

    def forward(self, ids):
        return autograd.embedding(self.weight, ids)

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}"


class Dropout(Module):
    """Zero each element with probability ``p`` and scale the rest by 1/(1-p), in training mode only.

    In ``eval()`` mode (or with p == 0) it returns its input unchanged.
    ``generator`` is passed to ``autograd.dropout`` (None: its default stream).
    """

    def __init__(self, p: float = 0.0, generator=None):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"Dropout probability must be in [0, 1], got {p}")
        self.p = float(p)
        self.generator = generator

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        return autograd.dropout(x, self.p, training=True, generator=self.generator)

    def extra_repr(self):
        return f"p={self.p}"


class GELU(Module):
    """The GELU activation; ``approximate="tanh"`` (GPT-2's) or ``"none"`` (the exact erf form)."""

    def __init__(self, approximate: str = "tanh"):
        super().__init__()
        if approximate not in ("tanh", "none"):
            raise ValueError(f"GELU approximate must be 'tanh' or 'none', got {approximate!r}")
        self.approximate = approximate

    def forward(self, x):
        return autograd.gelu(x, approximate=self.approximate)

    def extra_repr(self):
        return f"approximate={self.approximate!r}"


class SiLU(Module):
    """The SiLU (swish) activation: x * sigmoid(x)."""

    def forward(self, x):
        return autograd.silu(x)


class Identity(Module):
    """Returns its input (a placeholder where a layer is switched off)."""

    def forward(self, x):
        return x


__all__ = ["LinearFunction", "linear", "Linear", "Embedding", "Dropout", "GELU", "SiLU", "Identity"]
