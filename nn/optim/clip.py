"""Gradient clipping by global norm."""

from __future__ import annotations

import math

import numpy as np

from autograd.backend import get_array_module
from autograd.tensor import Tensor

from ..module import Module


def _grads(parameters):
    """The non-None gradients of Parameters, ``(name, Parameter)`` pairs, or a Module."""
    if isinstance(parameters, Module):
        parameters = parameters.parameters()
    elif isinstance(parameters, Tensor):
        parameters = [parameters]
    grads = []
    for item in parameters:
        p = item[1] if isinstance(item, tuple) else item
        if not isinstance(p, Tensor):
            raise TypeError(f"clip_grad_norm_ takes tensors or (name, tensor) pairs, got {type(p).__name__}")
        if p.grad is not None:
            grads.append(p.grad)
    return grads


def grad_norm(parameters) -> float:
    """The global L2 norm of all gradients, sqrt(sum over every element of every grad of g**2), as a float.

    Each gradient's sum of squares is a float32 dot product (float16 grads are
    cast up first, so they cannot overflow); the per-tensor sums are added in
    float64, with one device synchronisation in all.
    """
    grads = _grads(parameters)
    if not grads:
        return 0.0
    xp = get_array_module(grads[0])
    partial = []
    for g in grads:
        flat = g.ravel()  # (n,)
        if flat.dtype.itemsize < 4:
            flat = flat.astype(np.float32)
        partial.append(xp.asarray(xp.vdot(flat, flat), dtype=np.float64))
    return math.sqrt(float(xp.sum(xp.stack(partial))))


def clip_grad_norm_(parameters, max_norm: float) -> float:
    """Scale all gradients in place so their global L2 norm is at most ``max_norm``; return the norm before.

    ``parameters``: Parameters, ``(name, Parameter)`` pairs (``model.named_parameters()``)
    or a Module; those with ``.grad`` None are skipped. When the norm exceeds
    ``max_norm`` every gradient is multiplied by ``max_norm / (norm + 1e-6)``
    (torch's formula). A NaN or infinite norm is returned as it is and nothing
    is scaled: the caller decides (skip the step, lower the loss scale).
    """
    if max_norm <= 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    parameters = list(parameters.parameters()) if isinstance(parameters, Module) else list(parameters)
    norm = grad_norm(parameters)
    if math.isfinite(norm) and norm > max_norm:
        coef = max_norm / (norm + 1e-6)
        for g in _grads(parameters):
            g *= coef  # a Python float: keeps the gradient's dtype; grads own their memory
    return norm
