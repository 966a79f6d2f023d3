"""Seeded randomness for the engine (dropout masks and anything else that draws at random).

One default generator per array library: a NumPy ``np.random.Generator`` for
CPU arrays and, for GPU arrays, the generator that ``xp.random.default_rng``
gives (CuPy's), asked for through the ``xp`` module so that this file never
imports CuPy. ``manual_seed(seed)`` resets them all, so two runs that start
with the same ``manual_seed`` and make the same calls draw bitwise-identical
numbers (the same dropout masks)::

    autograd.random.manual_seed(0)
    y1 = dropout(x, 0.1)
    autograd.random.manual_seed(0)
    y2 = dropout(x, 0.1)          # same mask as y1

Ops that take a ``generator=`` argument use it instead when one is passed.
"""

from __future__ import annotations

import contextlib
import numbers

import numpy as np

_seed: int | None = None  # None until manual_seed: generators then start from OS entropy
_generators: dict[str, object] = {}  # array-library name -> its default generator


def manual_seed(seed: int):
    """Seed the default generators of every array library; returns the NumPy one.

    Generators already handed out by ``default_generator`` are replaced, not
    re-seeded in place: ask ``default_generator(xp)`` again after seeding.
    """
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"manual_seed needs a non-negative integer seed, got {seed!r}")
    global _seed
    _seed = int(seed)
    _generators.clear()
    return default_generator(np)


def initial_seed() -> int | None:
    """The seed of the last ``manual_seed`` call, or None if it was never called."""
    return _seed


def default_generator(xp=np):
    """The default generator for arrays of the library ``xp`` (``numpy``, or ``cupy`` via its module).

    Created on first use from the ``manual_seed`` seed (or from OS entropy if
    none was set) and then reused, so successive calls continue one stream.
    """
    key = getattr(xp, "__name__", str(xp))
    gen = _generators.get(key)
    if gen is None:
        if not hasattr(xp, "random") or not hasattr(xp.random, "default_rng"):
            raise TypeError(f"default_generator needs an array module with random.default_rng (numpy or cupy), "
                            f"got {xp!r}")
        gen = xp.random.default_rng(_seed)
        _generators[key] = gen
    return gen


@contextlib.contextmanager
def fork(seed: int):
    """Inside the block the default generators start afresh from ``seed``; afterwards the outer streams go on.

    Two blocks forked with the same seed draw the same numbers (activation
    recomputation replays a block's dropout masks this way), and neither
    disturbs the streams around them.
    """
    global _seed, _generators
    saved = (_seed, _generators)
    _seed, _generators = int(seed), {}
    try:
        yield
    finally:
        _seed, _generators = saved


def draw_seed() -> int:
    """A seed drawn from the NumPy default generator (advancing it by one draw), e.g. for ``fork``."""
    return int(default_generator(np).integers(0, 2 ** 63 - 1))
