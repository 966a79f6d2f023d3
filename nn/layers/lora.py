"""LoRA (Hu et al. 2021): a frozen linear layer plus a trainable low-rank update.

    y = x W + b + (alpha / r) * dropout(x) A B        A: (in, r), B: (r, out)

``A`` starts random (uniform in +-1/sqrt(in), PEFT's Kaiming-uniform bound) and
``B`` at zero, so at the start the layer is exactly the frozen one and the
update grows from there. Only A and B train: ``r * (in + out)`` numbers per
adapted layer instead of ``in * out``. The weights are stored ``(in, out)`` as
``nn.Linear``'s, so the update ``(alpha / r) A B`` has the weight's shape.

Gradients (with s = alpha / r, X the input rows (N, in), H = dropout(X) A (N, r),
G = dL/dy (N, out)); the frozen W and b get none:

    dL/dB = s H^T G            (r, out)
    dL/dA = s dropout'(X)^T (G B^T)     (in, r)
    dL/dX = G W^T + s dropout'(G B^T A^T)

Every one of them comes from the two ``linear`` ops of the forward, which
already carry their derivations (``nn.layers.basic.LinearFunction``).

``apply_lora(model, targets, rank, alpha)`` swaps the chosen ``Linear``
layers of a model for ``LoRALinear`` layers that share their weights, and
freezes every other parameter (no gradient, no optimizer state).
``LoRALinear.merge()`` folds the update into W for inference and keeps the
original array, so ``unmerge()`` restores it bit for bit; ``merged_state_dict``
gives the plain model's weights with the updates folded in, without touching
the model; ``lora_state_dict`` the adapters alone; ``lora_disabled`` runs the
base model (a DPO reference without a second copy of the weights).
"""

from __future__ import annotations

import contextlib
import math
import numbers

import numpy as np

from autograd.backend import get_array_module

from .. import init
from ..module import Module, Parameter
from .basic import Dropout, Linear, linear


class LoRALinear(Linear):
    """A ``Linear`` whose weight and bias are frozen, plus the trainable update ``(alpha / r) A B``.

    Build it from an existing layer, ``LoRALinear(base, rank, alpha, dropout)``: it
    shares ``base``'s weight and bias (the same Parameter objects, so its names
    and checkpoints keep ``weight`` / ``bias``) and adds ``lora_A`` (in, r) and
    ``lora_B`` (r, out). ``enabled = False`` (or ``lora_disabled``) computes the
    base layer alone. ``dropout`` applies to the input of the update only.
    """

    def __init__(self, base: Linear, rank: int, alpha: float, dropout: float = 0.0,
                 generator: np.random.Generator | None = None):
        Module.__init__(self)
        if not isinstance(base, Linear) or isinstance(base, LoRALinear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not alpha > 0 or not math.isfinite(alpha):
            raise ValueError(f"LoRA alpha must be a positive number, got {alpha!r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha = int(rank), float(alpha)
        self.scaling = self.alpha / self.rank
        self.weight = base.weight
        self.weight.requires_grad = False
        if base.bias is not None:
            self.bias = base.bias
            self.bias.requires_grad = False
        else:
            self.register_parameter("bias", None)
        xp = get_array_module(base.weight.data)
        dtype = base.weight.dtype
        self.lora_A = Parameter(xp.zeros((self.in_features, self.rank), dtype=dtype))  # (in, r)
        bound = 1.0 / math.sqrt(self.in_features)
        init.uniform_(self.lora_A, -bound, bound, generator=generator)
        self.lora_B = Parameter(xp.zeros((self.rank, self.out_features), dtype=dtype))  # (r, out): starts at zero
        self.lora_dropout = Dropout(dropout)
        self.enabled = True
        self._unmerged = None  # the original weight array while merged

    @property
    def merged(self) -> bool:
        """Whether the update is folded into ``weight`` (``merge``)."""
        return self._unmerged is not None

    def forward(self, x):
        y = linear(x, self.weight, self.bias)
        if not self.enabled or self.merged:
            return y
        update = linear(linear(self.lora_dropout(x), self.lora_A), self.lora_B)  # (..., r) -> (..., out)
        return y + update * self.scaling  # a Python float keeps the dtype

    def delta(self):
        """The update ``(alpha / r) A B`` as an array of the weight's shape ``(in, out)``."""
        xp = get_array_module(self.lora_A.data)
        return (xp.matmul(self.lora_A.data, self.lora_B.data) * self.scaling).astype(self.weight.dtype, copy=False)

    def merge(self):
        """Fold the update into ``weight`` (W + (alpha / r) A B), keeping the original for ``unmerge``."""
        if self.merged:
            raise RuntimeError("this LoRA layer is already merged; unmerge() it first")
        w = self.weight.data
        self._unmerged = w.copy()
        w += self.delta()

    def unmerge(self):
        """Restore the original ``weight``, bit for bit."""
        if not self.merged:
            raise RuntimeError("this LoRA layer is not merged")
        self.weight.data[...] = self._unmerged
        self._unmerged = None

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha:g}, dropout={self.lora_dropout.p}")


def _matches(name: str, target: str) -> bool:
    """PEFT's rule: a target names a layer by its last name parts (``c_proj`` or ``attn.c_proj``)."""
    return name == target or name.endswith("." + target)


def apply_lora(model: Module, targets, rank: int, alpha: float, dropout: float = 0.0,
               generator: np.random.Generator | None = None) -> list[str]:
    """Put LoRA on the ``Linear`` layers of ``model`` named by ``targets``; freeze everything else.

    ``targets``: names matched against the end of each layer's dotted name
    (``["c_attn", "c_proj"]`` adapts every attention input projection and
    every ``c_proj``, attention's and the MLP's; ``"attn.c_proj"`` only
    attention's). A target that matches no ``Linear`` is a ValueError that
    lists the layers there are. Afterwards only the adapters' ``lora_A`` and
    ``lora_B`` have ``requires_grad``: the optimizer gets nothing else. The A
    matrices are drawn from ``generator`` in the model's layer order. Returns
    the adapted layers' names.
    """
    if isinstance(targets, str):
        targets = [t for t in targets.split(",") if t.strip()]
    targets = [t.strip() for t in targets]
    if not targets:
        raise ValueError("LoRA needs at least one target layer name, e.g. c_attn,c_proj")
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, Linear) and n]
    if any(isinstance(m, LoRALinear) for _, m in linears):
        raise ValueError("this model already has LoRA layers")
    unmatched = [t for t in targets if not any(_matches(n, t) for n, _ in linears)]
    if unmatched:
        kinds = sorted({n.rsplit(".", 1)[-1] for n, _ in linears})
        raise ValueError(f"LoRA target(s) {', '.join(unmatched)} match no linear layer of the model; its linear "
                         f"layers are named {', '.join(kinds)} (e.g. {linears[0][0] if linears else 'none'}); "
                         "pass some of those to --lora-targets")
    model.requires_grad_(False)
    adapted = []
    for name, layer in linears:
        if not any(_matches(name, t) for t in targets):
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        lora = LoRALinear(layer, rank, alpha, dropout, generator=generator)
        parent.register_module(attr, lora)
        adapted.append(name)
    return adapted


def lora_layers(model: Module) -> list[tuple[str, LoRALinear]]:
    """``[(name, LoRALinear)]`` of ``model``, in order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def lora_state_dict(model: Module) -> dict:
    """The adapters alone: ``{"<layer>.lora_A": (in, r), "<layer>.lora_B": (r, out)}`` (live arrays)."""
    out = {}
    for name, layer in lora_layers(model):
        out[f"{name}.lora_A"] = layer.lora_A.data
        out[f"{name}.lora_B"] = layer.lora_B.data
    return out


def merged_state_dict(model: Module) -> dict:
    """The state dict of the model without LoRA: every adapted weight is ``W + (alpha / r) A B``, no adapter keys.

    The model is not changed (new arrays for the adapted weights; the others are the live ones).
    """
    state = dict(model.state_dict())
    for name, layer in lora_layers(model):
        del state[f"{name}.lora_A"], state[f"{name}.lora_B"]
        w = layer.weight.data
        state[f"{name}.weight"] = w.copy() if layer.merged else w + layer.delta()
    return state


@contextlib.contextmanager
def lora_disabled(model: Module):
    """Within the block, every LoRA layer of ``model`` computes its base layer alone (the model before LoRA)."""
    layers = [m for _, m in lora_layers(model)]
    before = [m.enabled for m in layers]
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m, was in zip(layers, before):
            m.enabled = was


__all__ = ["LoRALinear", "apply_lora", "lora_layers", "lora_state_dict", "merged_state_dict", "lora_disabled"]
