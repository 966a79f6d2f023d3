"""Activation recomputation: a block keeps only its input, and runs its forward again during backward.

Training keeps every block's intermediate activations from the forward pass
until the backward pass needs them: for a GPT, the attention probabilities,
the MLP's 4x-wide hidden layer and a dozen other arrays per block. With
``recompute(block, x)`` the forward runs without recording a graph and only
``x`` is kept; when backward reaches the block, it runs the block's forward
again on ``x`` with a graph and back-propagates through it at once. Memory
per block drops to its input; compute grows by one forward per block (about
a third of a training step's arithmetic). The gradients are the plain run's:
the same ops on the same inputs.

Dropout draws the same masks both times: the block runs inside
``autograd.random.fork(seed)`` with a seed drawn once per call.

Parameter gradients arrive during the nested backward, as leaves, so the
gradient hooks of data parallelism fire for them as usual.
"""

from __future__ import annotations

from autograd import random as agrandom
from autograd.backend import get_array_module
from autograd.engine import Function, enable_grad, is_grad_enabled, no_grad
from autograd.tensor import Tensor


class Recompute(Function):
    """``y = fn(x)`` computed without a graph; backward recomputes ``fn(x)`` with one and goes through it.

    dL/dx is the gradient that back-propagating ``gy`` through ``fn``'s graph
    leaves on a fresh leaf holding ``x``; the parameters inside ``fn`` get
    theirs in the same nested pass (they are not inputs of this node).
    """

    def __init__(self, fn, seed: int):
        self.fn, self.seed = fn, seed

    def forward(self, x):
        with no_grad(), agrandom.fork(self.seed):
            y = self.fn(Tensor(x))
        self.x = x
        return y.data

    def backward(self, gy):
        x = Tensor(self.x, requires_grad=True)
        with enable_grad(), agrandom.fork(self.seed):
            y = self.fn(x)
        y.backward(gy)
        return x.grad if x.grad is not None else get_array_module(self.x).zeros_like(self.x)


def recompute(fn, x):
    """``fn(x)`` (a block: Tensor in, Tensor out), keeping only ``x`` for the backward pass (see the module doc).

    Without a graph to record (``no_grad``, or an input that needs no
    gradient) it is a plain call, in the same forked random stream, so its
    dropout masks are the ones the recorded call would draw.
    """
    seed = agrandom.draw_seed()
    if not is_grad_enabled() or not (isinstance(x, Tensor) and x.requires_grad):
        with agrandom.fork(seed):
            return fn(x)
    return Recompute(fn, seed)(x)


__all__ = ["Recompute", "recompute"]
