"""AdamW: Adam with decoupled weight decay (Loshchilov & Hutter), exactly as ``torch.optim.AdamW``."""

from __future__ import annotations

import math

from autograd.backend import get_array_module
from autograd import kernels

from .optimizer import Optimizer, _grad_of


#: elements per piece of the CPU update: it bounds the scratch buffer (1 MiB in float32); the update
#: is bound by memory traffic either way, so smaller, cache-sized pieces measured no faster
_PIECE = 1 << 18


class AdamW(Optimizer):
    """AdamW with bias correction; state keyed by parameter name.

    For each parameter with a gradient g, at its step t (counted per parameter):

        p  <- p * (1 - lr * weight_decay)          decoupled decay (not added to g)
        m  <- beta1 * m + (1 - beta1) * g
        v  <- beta2 * v + (1 - beta2) * g * g
        p  <- p - lr * m_hat / (sqrt(v_hat) + eps), m_hat = m / (1 - beta1**t), v_hat = v / (1 - beta2**t)

    computed as torch does: ``p -= (lr / (1 - beta1**t)) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)``.
    The moments and the arithmetic are in the parameter's dtype (float32 or
    float64), in place. A float16 model is trained through float32 master
    weights (``nn.amp.MixedPrecision``), which are what AdamW updates. On the
    CPU a parameter is updated in pieces of at most ``_PIECE`` elements with
    one piece-sized scratch buffer per thread: no temporary as large as the
    parameter (GPT-2's embedding table is 154 MB: allocated and freed every
    step, that is tens of thousands of page faults). The pieces of all
    parameters are spread over the CPU threads together (``autograd.kernels.run``).
    Parameters whose ``.grad`` is None are skipped.
    """

    state_keys = ("exp_avg", "exp_avg_sq")

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.1):
        super().__init__(params, dict(lr=float(lr), betas=tuple(betas), eps=float(eps),
                                      weight_decay=float(weight_decay)))

    def _validate_group(self, group):
        super()._validate_group(group)
        group["betas"] = tuple(float(b) for b in group["betas"])
        b1, b2 = group["betas"]
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"AdamW betas must be in [0, 1), got {group['betas']}")
        if group["eps"] < 0:
            raise ValueError(f"AdamW eps must be >= 0, got {group['eps']}")

    def step(self):
        """One AdamW update of every parameter that has a gradient."""
        self.step_count += 1
        updates = []  # (w, m, v, g, hyper) per piece: run together, spread over the CPU threads
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for name, p in group["params"]:
                if p.grad is None:
                    continue
                xp = get_array_module(p.data)
                dtype = p.dtype
                if dtype.itemsize < 4:
                    raise TypeError(f"AdamW updates float32 (or float64) parameters, but {name!r} is {dtype}: train a "
                                    "half-precision model through float32 master weights, "
                                    "nn.amp.MixedPrecision(model, 'fp16'), and give AdamW mp.master_named_parameters()")
                st = self.state.get(name)
                if st is None:
                    st = self.state[name] = {"step": 0, "exp_avg": xp.zeros(p.shape, dtype=dtype),
                                             "exp_avg_sq": xp.zeros(p.shape, dtype=dtype)}
                st["step"] += 1
                t = st["step"]
                g = _grad_of(name, p, dtype)
                w = p.data
                m, v = st["exp_avg"], st["exp_avg_sq"]
                hyper = (lr, b1, b2, eps, wd, t)
                if w.ndim > 1 and not (w.flags.c_contiguous and m.flags.c_contiguous and v.flags.c_contiguous):
                    updates.append((w, m, v, g, hyper))  # a strided parameter: whole, in place
                else:
                    flat = [a.reshape(-1) for a in (w, m, v)] + [xp.ascontiguousarray(g).reshape(-1)]  # (n,) views
                    for sl in kernels.pieces(xp, w.size, _PIECE):
                        updates.append(tuple(a[sl] for a in flat) + (hyper,))

        def piece(update):
            w, m, v, g, hyper = update
            xp = get_array_module(w)
            (tmp,) = kernels.scratch(xp, 1, w.size, w.dtype)
            adamw_update_(xp, w, m, v, g, tmp.reshape(w.shape), *hyper)

        kernels.run(updates, piece)


def adamw_update_(xp, w, m, v, g, tmp, lr, b1, b2, eps, wd, t):
    """One AdamW update of w, m, v in place from g (any matching shapes), using ``tmp`` as scratch.

    The one transcription of the update rule (ZeRO's shards are updated by ``AdamW`` itself, over their
    master pieces).
    """
    if wd != 0.0:
        w *= 1.0 - lr * wd
    xp.multiply(g, 1.0 - b1, out=tmp)
    m *= b1
    m += tmp
    xp.multiply(g, g, out=tmp)
    tmp *= 1.0 - b2
    v *= b2
    v += tmp
    xp.sqrt(v, out=tmp)
    tmp /= math.sqrt(1.0 - b2 ** t)
    tmp += eps
    xp.divide(m, tmp, out=tmp)
    tmp *= lr / (1.0 - b1 ** t)
    w -= tmp
