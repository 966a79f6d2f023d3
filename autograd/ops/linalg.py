"""Matrix products."""

from __future__ import annotations

from .. import kernels
from ..backend import get_array_module
from ..engine import Function
from ..tensor import Tensor


class MatMul(Function):
    """y = a @ b with NumPy's rules: batched, broadcasting, and the 1-D cases.

    For 2-D operands, da = gy @ b^T and db = a^T @ gy. Batched operands use the
    same formulas on the last two axes (broadcast batch axes are summed back by
    the engine). A 1-D ``a`` acts as a (1, K) row and a 1-D ``b`` as a (K, 1)
    column; we promote them, apply the 2-D rule, and drop the added axis.
    """

    def forward(self, a, b):
        if a.ndim == 0 or b.ndim == 0:
            raise ValueError(f"matmul needs arrays with at least one dimension, got shapes {a.shape} and {b.shape}; "
                             "use * to multiply by a scalar")
        ka = a.shape[-1]
        kb = b.shape[-2] if b.ndim > 1 else b.shape[0]
        if ka != kb:
            raise ValueError(f"matmul shape mismatch: {a.shape} @ {b.shape}: the last axis of the first ({ka}) "
                             f"must equal the {'second-to-last' if b.ndim > 1 else 'only'} axis of the second ({kb})")
        self.a, self.b = a, b
        return kernels.matmul(a, b)

    def backward(self, gy):
        xp = get_array_module(gy)
        a, b = self.a, self.b
        a2 = a[None, :] if a.ndim == 1 else a  # (1, K)
        b2 = b[:, None] if b.ndim == 1 else b  # (K, 1)
        g2 = gy
        if b.ndim == 1:
            g2 = xp.expand_dims(g2, -1)  # (..., M, 1): restore the dropped column axis first
        if a.ndim == 1:
            g2 = xp.expand_dims(g2, -2)  # (..., 1, N): then the dropped row axis
        ga = gb = None
        if self.needs_input_grad[0]:
            ga = kernels.matmul(g2, xp.swapaxes(b2, -1, -2))
            if a.ndim == 1:
                ga = ga.reshape(-1, a.shape[0]).sum(axis=0)  # (K,): sum over any batch axes
        if self.needs_input_grad[1]:
            gb = kernels.matmul(xp.swapaxes(a2, -1, -2), g2)
            if b.ndim == 1:
                gb = gb.reshape(-1, b.shape[0]).sum(axis=0)  # (K,)
        return ga, gb


def matmul(a, b) -> Tensor:
    """a @ b, as ``numpy.matmul`` defines it (batched, broadcasting, 1-D operands)."""
    return MatMul()(a, b)
