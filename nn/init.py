"""Weight initialisation, reproducible from a seed.

Every layer takes ``generator`` (a ``numpy.random.Generator``); without one it
draws from this module's default generator (``manual_seed`` resets it). Values
are always drawn on the CPU with NumPy in float32, then cast to the tensor's
dtype and copied to its device, so a CPU run and a GPU run from the same seed
start from bitwise identical weights, and two models built from the same seed
are bitwise identical.

The GPT-2 scheme (Radford et al. 2019; nanoGPT's ``_init_weights``):

- every matrix-product weight and every embedding: N(0, 0.02);
- every bias: 0; LayerNorm gains 1 and biases 0;
- the projections that write into the residual stream (the attention output
  projection and the MLP's ``c_proj``): N(0, 0.02 / sqrt(2 * n_layer)), because
  each of the ``2 * n_layer`` residual branches adds its output to the stream,
  and scaling by 1/sqrt(number of additions) keeps the stream's variance from
  growing with depth.

Layers apply this at construction (``Linear(..., init_std=residual_std(n_layer))``
for the residual projections).
"""

from __future__ import annotations

import math

import numpy as np

from autograd import backend
from autograd.tensor import Tensor

#: standard deviation of GPT-2's weights and embeddings
GPT2_STD = 0.02

_default_generator = np.random.default_rng(0)


def manual_seed(seed: int) -> np.random.Generator:
    """Reset the default generator (used by layers built without ``generator=``) to ``seed``; returns it."""
    global _default_generator
    _default_generator = np.random.default_rng(seed)
    return _default_generator


def default_generator() -> np.random.Generator:
    """The generator layers draw from when given none."""
    return _default_generator


def _resolve(generator) -> np.random.Generator:
    if generator is None:
        return _default_generator
    if isinstance(generator, (int, np.integer)):
        raise TypeError("generator= takes a numpy.random.Generator, not a seed: pass np.random.default_rng(seed)")
    if not isinstance(generator, np.random.Generator):
        raise TypeError(f"generator= takes a numpy.random.Generator, got {type(generator).__name__}")
    return generator


def _fill(tensor: Tensor, values: np.ndarray) -> Tensor:
    """Write CPU ``values`` into ``tensor.data`` (cast to its dtype, on its device), in place."""
    if not isinstance(tensor, Tensor):
        raise TypeError(f"init functions take a Tensor/Parameter, got {type(tensor).__name__}")
    target = tensor.data
    values = backend.to_device(values.astype(target.dtype, copy=False), backend.device_of(target))
    if getattr(getattr(target, "flags", None), "writeable", True):
        target[...] = values
    else:
        tensor.data = values
    return tensor


def normal_(tensor: Tensor, std: float = 1.0, mean: float = 0.0, generator: np.random.Generator | None = None):
    """Fill ``tensor`` in place with N(mean, std**2) samples drawn in float32 on the CPU; returns it."""
    if std < 0:
        raise ValueError(f"normal_: std must be >= 0, got {std}")
    gen = _resolve(generator)
    values = gen.standard_normal(tensor.shape, dtype=np.float32)  # float32 draws: identical on every device
    values *= np.float32(std)
    if mean:
        values += np.float32(mean)
    return _fill(tensor, values)


def uniform_(tensor: Tensor, low: float = 0.0, high: float = 1.0, generator: np.random.Generator | None = None):
    """Fill ``tensor`` in place with U(low, high) samples drawn in float32 on the CPU; returns it."""
    gen = _resolve(generator)
    values = gen.random(tensor.shape, dtype=np.float32)
    values *= np.float32(high - low)
    values += np.float32(low)
    return _fill(tensor, values)


def constant_(tensor: Tensor, value: float):
    """Fill ``tensor`` in place with ``value``; returns it."""
    return _fill(tensor, np.full(tensor.shape, value, dtype=np.float32))


def zeros_(tensor: Tensor):
    """Fill ``tensor`` in place with 0; returns it."""
    return constant_(tensor, 0.0)


def ones_(tensor: Tensor):
    """Fill ``tensor`` in place with 1; returns it."""
    return constant_(tensor, 1.0)


def residual_std(n_layer: int, std: float = GPT2_STD) -> float:
    """GPT-2's std for projections into the residual stream: ``std / sqrt(2 * n_layer)``."""
    if n_layer < 1:
        raise ValueError(f"residual_std needs n_layer >= 1, got {n_layer}")
    return std / math.sqrt(2 * n_layer)


