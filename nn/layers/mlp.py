"""Feed-forward blocks: GPT-2's MLP and Llama's SwiGLU.

Both end in a projection back into the residual stream (``c_proj`` / ``w2``),
initialised with GPT-2's ``0.02 / sqrt(2 * n_layer)`` when ``n_layer`` is given.
"""

from __future__ import annotations

import numpy as np

import autograd

from .. import init
from ..module import Module
from .basic import GELU, Dropout, Linear


def _proj_std(n_layer):
    return init.GPT2_STD if n_layer is None else init.residual_std(n_layer)


class MLP(Module):
    """GPT-2's MLP: ``dropout(c_proj(gelu_tanh(c_fc(x))))``, hidden size ``4 * dim`` by default.

    Parameters are named ``c_fc.weight``, ``c_fc.bias``, ``c_proj.weight``,
    ``c_proj.bias`` as in GPT-2's checkpoints (weights stored (in, out)).
    """

    def __init__(self, dim: int, hidden_dim: int | None = None, dropout: float = 0.0, bias: bool = True,
                 n_layer: int | None = None, generator: np.random.Generator | None = None, dtype=np.float32):
        super().__init__()
        hidden_dim = 4 * dim if hidden_dim is None else int(hidden_dim)
        self.c_fc = Linear(dim, hidden_dim, bias=bias, generator=generator, dtype=dtype)
        self.gelu = GELU(approximate="tanh")
        self.c_proj = Linear(hidden_dim, dim, bias=bias, generator=generator, init_std=_proj_std(n_layer),
                             dtype=dtype)
        self.dropout = Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


def llama_hidden_dim(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """Llama's SwiGLU hidden size: 2/3 of ``4 * dim`` (same parameter count as a 4x GELU MLP),
    times ``ffn_dim_multiplier`` if given, rounded up to a multiple of ``multiple_of``."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class SwiGLU(Module):
    """Llama's feed-forward: ``w2(silu(x @ w1) * (x @ w3))``, then dropout (0 by default).

    ``w1`` (gate) and ``w3`` (up) map ``dim -> hidden_dim``, ``w2`` (down) maps
    back; no biases by default, as in Llama. ``hidden_dim`` defaults to
    ``llama_hidden_dim(dim, multiple_of)``. Assigned in Llama's order w1, w2, w3
    so names and order match its checkpoints (weights here are stored (in, out):
    transpose Llama's (out, in) matrices when loading them).
    """

    def __init__(self, dim: int, hidden_dim: int | None = None, multiple_of: int = 256, bias: bool = False,
                 dropout: float = 0.0, n_layer: int | None = None, generator: np.random.Generator | None = None,
                 dtype=np.float32):
        super().__init__()
        hidden_dim = llama_hidden_dim(dim, multiple_of) if hidden_dim is None else int(hidden_dim)
        self.hidden_dim = hidden_dim
        self.w1 = Linear(dim, hidden_dim, bias=bias, generator=generator, dtype=dtype)
        self.w2 = Linear(hidden_dim, dim, bias=bias, generator=generator, init_std=_proj_std(n_layer),
                         dtype=dtype)
        self.w3 = Linear(dim, hidden_dim, bias=bias, generator=generator, dtype=dtype)
        self.dropout = Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.w2(autograd.silu(self.w1(x)) * self.w3(x)))
