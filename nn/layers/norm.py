"""Normalisation layers: ``LayerNorm`` (GPT-2) and ``RMSNorm`` (Llama), over the last axis.

Both wrap the fused ops of ``nn.functional.norm``. Their gains (and LayerNorm's
bias) start at 1 (0) and are marked ``no_decay``: weight decay pulling a gain
towards 0 would fight the normalisation, so GPT training leaves them undecayed.
"""

from __future__ import annotations

import numbers

import numpy as np

from ..functional.norm import layer_norm, rms_norm
from ..module import Module, Parameter


def _check_dim(name, dim, eps):
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim < 1:
        raise ValueError(f"{name} needs a positive integer size (the last axis of its input), got dim={dim!r}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or eps < 0:
        raise ValueError(f"{name}: eps must be a non-negative number, got {eps!r}")


class LayerNorm(Module):
    """``(x - mean) / sqrt(var + eps) * weight + bias`` over the last axis of size ``dim``.

    ``weight`` starts at ones and ``bias`` at zeros (``bias=False`` drops it, as
    nanoGPT allows); both are ``no_decay``.
    """

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True, dtype=np.float32):
        super().__init__()
        _check_dim("LayerNorm", dim, eps)
        self.dim, self.eps = int(dim), float(eps)
        self.weight = Parameter(np.ones(dim, dtype=dtype), no_decay=True)
        if bias:
            self.bias = Parameter(np.zeros(dim, dtype=dtype), no_decay=True)
        else:
            self.register_parameter("bias", None)

    def forward(self, x):
        return layer_norm(x, self.weight, self.bias, self.eps)

    def extra_repr(self):
        return f"{self.dim}, eps={self.eps}, bias={self.bias is not None}"


class RMSNorm(Module):
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last axis of size ``dim``; ``weight`` starts at 1, no_decay."""

    def __init__(self, dim: int, eps: float = 1e-6, dtype=np.float32):
        super().__init__()
        _check_dim("RMSNorm", dim, eps)
        self.dim, self.eps = int(dim), float(eps)
        self.weight = Parameter(np.ones(dim, dtype=dtype), no_decay=True)

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self):
        return f"{self.dim}, eps={self.eps}"


__all__ = ["LayerNorm", "RMSNorm"]
