"""Stochastic gradient descent with momentum, dampening, Nesterov and L2 weight decay (``torch.optim.SGD``)."""

from __future__ import annotations

from autograd.backend import get_array_module

from .optimizer import Optimizer, _grad_of


class SGD(Optimizer):
    """SGD, with torch.optim.SGD's update rule; state (the momentum buffer) keyed by parameter name.

    For each parameter with a gradient g:

        d = g + weight_decay * p                                  (L2 decay: added to the gradient)
        b = d                         on the first step,
        b = momentum * b + (1 - dampening) * d                    afterwards          (if momentum != 0)
        d = d + momentum * b  if nesterov  else  b                                   (if momentum != 0)
        p = p - lr * d

    Parameters whose ``.grad`` is None are skipped. float16 parameters are
    updated through a float32 copy (momentum kept in float32).
    """

    state_keys = ("momentum_buffer",)

    def __init__(self, params, lr: float, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False):
        super().__init__(params, dict(lr=float(lr), momentum=float(momentum), dampening=float(dampening),
                                      weight_decay=float(weight_decay), nesterov=bool(nesterov)))

    def _validate_group(self, group):
        super()._validate_group(group)
        if group["momentum"] < 0:
            raise ValueError(f"SGD momentum must be >= 0, got {group['momentum']}")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("Nesterov momentum needs momentum > 0 and dampening = 0")

    def _state_key_required(self, key):
        return False  # without momentum there is no buffer

    def step(self):
        """One SGD update of every parameter that has a gradient."""
        self.step_count += 1
        for group in self.param_groups:
            lr, mom, damp, wd, nesterov = (group["lr"], group["momentum"], group["dampening"],
                                           group["weight_decay"], group["nesterov"])
            for name, p in group["params"]:
                if p.grad is None:
                    continue
                xp = get_array_module(p.data)
                dtype = self._state_dtype(p)
                g = _grad_of(name, p, dtype)  # may be p.grad itself: never modified in place
                low = p.data.dtype != dtype
                w = p.data.astype(dtype) if low else p.data
                d = g + wd * w if wd != 0.0 else g
                if mom != 0.0:
                    st = self.state.setdefault(name, {})
                    buf = st.get("momentum_buffer")
                    if buf is None:
                        buf = st["momentum_buffer"] = xp.array(d, dtype=dtype, copy=True)
                    else:
                        buf *= mom
                        buf += d if damp == 0.0 else (1.0 - damp) * d
                    d = d + mom * buf if nesterov else buf
                w -= lr * d
                if low:
                    p.data[...] = w
