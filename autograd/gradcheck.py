"""``gradcheck``: compare an op's backward with central finite differences, in float64.

The tool our users check their own ops with. For ``out = fn(*inputs)`` we take a
fixed random cotangent ``v`` and the scalar ``L(x) = sum(v * fn(x))``, whose
gradient the backward pass computes as ``g = backward(v)``.

- ``mode="random"`` (the default) checks one random direction ``d`` over all
  inputs at once: ``(L(x + eps d) - L(x - eps d)) / (2 eps)`` must equal
  ``sum_i <g_i, d_i>``. Two evaluations of ``fn`` check any number of elements,
  so it stays cheap for large tensors.
- ``mode="elementwise"`` perturbs one element at a time: slow, but it points
  at the exact element that is wrong.

When a random-direction check fails, gradcheck narrows it down (one input at a
time, then element by element) so the report names the input, the index and
both values, as Chainer's ``check_backward`` does.
"""

from __future__ import annotations

import numpy as np

from .backend import get_array_module, is_array
from .engine import no_grad
from .tensor import Tensor


class GradcheckError(AssertionError):
    """Raised by ``gradcheck`` when an analytic gradient disagrees with finite differences."""


def gradcheck(fn, *inputs, eps: float = 1e-6, atol: float = 1e-5, rtol: float = 1e-3, mode: str = "random",
              seed: int = 0, n_directions: int = 2, max_elements: int = 4096, raise_exception: bool = True) -> bool:
    """Check the gradients of ``fn(*inputs)`` w.r.t. every input tensor with ``requires_grad=True``.

    Floating inputs are copied to float64 first; other inputs (integer ids,
    boolean masks, Python values) are passed through unchanged. ``fn`` returns a
    Tensor or a tuple of Tensors. A gradient passes when
    ``|analytic - numeric| <= atol + rtol * |numeric|``. Returns True, or raises
    ``GradcheckError`` naming the input, the element and both values (returns
    False instead when ``raise_exception=False``). ``max_elements`` caps the
    elements the element-wise search visits per input.
    """
    if mode not in ("random", "elementwise"):
        raise ValueError(f"gradcheck mode must be 'random' or 'elementwise', got {mode!r}")
    args = [_to_float64(x) for x in inputs]
    checked = [i for i, a in enumerate(args) if isinstance(a, Tensor) and a.requires_grad]
    if not checked:
        raise ValueError("gradcheck: no input has requires_grad=True, so there is nothing to check")
    rng = np.random.default_rng(seed)

    outputs = _as_tuple(fn(*args))
    xp = get_array_module(outputs[0].data)
    cotangents = [xp.asarray(rng.standard_normal(o.shape)) for o in outputs]
    analytic = _analytic_grads(outputs, cotangents, args, checked)

    def loss(values):
        """L at the given replacement values of the checked inputs (float64, no graph)."""
        saved = [args[i].data for i in checked]
        try:
            for i, v in zip(checked, values):
                args[i].data = v
            with no_grad():
                outs = _as_tuple(fn(*args))
            return float(sum(float((o.data.astype(np.float64) * c).sum()) for o, c in zip(outs, cotangents)))
        finally:
            for i, v in zip(checked, saved):
                args[i].data = v

    base = [args[i].data for i in checked]
    failure = None
    if mode == "random":
        for _ in range(n_directions):
            dirs = [xp.asarray(rng.standard_normal(b.shape)) for b in base]
            numeric = (loss([b + eps * d for b, d in zip(base, dirs)])
                       - loss([b - eps * d for b, d in zip(base, dirs)])) / (2 * eps)
            predicted = sum(float((g * d).sum()) for g, d in zip(analytic, dirs))
            if not _close(predicted, numeric, atol, rtol):
                failure = _locate(loss, base, analytic, checked, eps, atol, rtol, max_elements, xp) or (
                    f"gradcheck failed along a random direction over all inputs: analytic {predicted:.8g}, "
                    f"numeric {numeric:.8g}; no single element was found (try mode='elementwise', a larger eps, "
                    f"or max_elements)")
                break
    else:
        failure = _locate(loss, base, analytic, checked, eps, atol, rtol, max_elements, xp, scan_all=True)

    if failure is None:
        return True
    if raise_exception:
        raise GradcheckError(failure)
    return False


def _to_float64(x):
    """A float64 leaf copy of a floating tensor/array (keeping requires_grad); others unchanged."""
    if isinstance(x, Tensor):
        if x.dtype.kind == "f":
            return Tensor(x.data.astype(np.float64), requires_grad=x.requires_grad)
        return x
    if is_array(x) and x.dtype.kind == "f":
        return Tensor(x.astype(np.float64))
    return x


def _as_tuple(out):
    outs = out if isinstance(out, (tuple, list)) else (out,)
    for o in outs:
        if not isinstance(o, Tensor):
            raise TypeError(f"gradcheck: fn must return a Tensor or a tuple of Tensors, got {type(o).__name__}")
    return tuple(outs)


def _analytic_grads(outputs, cotangents, args, checked):
    """Gradients of sum(v * out) w.r.t. the checked inputs, by the engine's backward pass."""
    from .ops.reduction import sum as tsum

    for i in checked:
        args[i].grad = None
    terms = [tsum(o * Tensor(c)) for o, c in zip(outputs, cotangents) if o.requires_grad]
    if terms:
        total = terms[0]
        for t in terms[1:]:
            total = total + t
        total.backward()
    xp = get_array_module(args[checked[0]].data)
    grads = []
    for i in checked:
        g = args[i].grad
        if g is None:
            g = xp.zeros_like(args[i].data)  # no path from this input to the output: the gradient is 0
        elif g.shape != args[i].shape:
            raise GradcheckError(f"input {i}: gradient has shape {g.shape}, but the input has shape {args[i].shape}")
        grads.append(g)
    return grads


def _close(a, n, atol, rtol):
    return abs(a - n) <= atol + rtol * abs(n)


def _locate(loss, base, analytic, checked, eps, atol, rtol, max_elements, xp, scan_all=False):
    """Find the first element whose analytic and numeric gradients disagree; a message, or None."""
    for pos, (i, b, g) in enumerate(zip(checked, base, analytic)):
        flat_count = b.size
        limit = flat_count if scan_all else min(flat_count, max_elements)
        bad, worst = 0, None
        for flat in range(limit):
            idx = np.unravel_index(flat, b.shape)
            bump = xp.zeros_like(b)
            bump[idx] = eps
            values_plus = [v + bump if k == pos else v for k, v in enumerate(base)]
            values_minus = [v - bump if k == pos else v for k, v in enumerate(base)]
            numeric = (loss(values_plus) - loss(values_minus)) / (2 * eps)
            a = float(g[idx])
            if not _close(a, numeric, atol, rtol):
                bad += 1
                if worst is None:
                    worst = (idx, a, numeric)
        if worst is not None:
            idx, a, numeric = worst
            return (f"gradcheck failed for input {i} (shape {tuple(b.shape)}) at index {tuple(int(k) for k in idx)}: "
                    f"analytic {a:.8g}, numeric {numeric:.8g} (|diff| {abs(a - numeric):.3g} > atol {atol} + "
                    f"rtol {rtol} * |numeric|); {bad} of {limit} elements checked disagree")
    return None
