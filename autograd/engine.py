"""The reverse-mode engine: the ``Function`` base class and the backward pass.

A ``Function`` is one node of the graph. ``forward`` and ``backward`` work on
plain arrays (NumPy or CuPy); ``Function.__call__`` wraps them in tensors and
records the node when a gradient is needed.

The backward pass visits nodes in reverse topological order with a heap keyed
by *generation* (a node's generation is one more than its latest input's), the
way Chainer and DeZero do it, so arbitrarily long chains need no recursion.
Gradients are plain arrays; the backward pass builds no graph.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import weakref

import numpy as np

from .backend import get_array_module, is_array, sum_in_float32

# ---------------------------------------------------------------------------
# grad mode
# ---------------------------------------------------------------------------

_grad_enabled = True


def is_grad_enabled() -> bool:
    """Whether new operations record a graph."""
    return _grad_enabled


@contextlib.contextmanager
def set_grad_enabled(mode: bool):
    """Context manager that turns graph recording on or off, restoring the old mode on exit."""
    global _grad_enabled
    previous = _grad_enabled
    _grad_enabled = bool(mode)
    try:
        yield
    finally:
        _grad_enabled = previous


def no_grad():
    """``with no_grad():`` runs operations without recording a graph (inference, optimizer steps)."""
    return set_grad_enabled(False)


def enable_grad():
    """``with enable_grad():`` records a graph even inside ``no_grad()``."""
    return set_grad_enabled(True)


# ---------------------------------------------------------------------------
# broadcasting, undone in one place
# ---------------------------------------------------------------------------


def sum_to(grad, shape):
    """Sum ``grad`` over the axes that broadcasting added or stretched, giving ``shape``.

    If ``y = broadcast_to(x, grad.shape)`` then ``dL/dx = sum_to(dL/dy, x.shape)``:
    every copy of an element of ``x`` passes its gradient back to it.
    """
    shape = tuple(shape)
    if grad.shape == shape:
        return grad
    lead = grad.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        i + lead for i, n in enumerate(shape) if n == 1 and grad.shape[i + lead] != 1
    )
    out = sum_in_float32(grad, axis=axes, keepdims=True) if axes else grad
    if lead:
        out = out.reshape(shape)  # drop the leading broadcast axes
    return out


# ---------------------------------------------------------------------------
# Function
# ---------------------------------------------------------------------------


class Function:
    """One differentiable operation: subclass it and write ``forward`` and ``backward``.

    ``forward(*arrays)`` returns an array (or a tuple of arrays) and saves on
    ``self`` exactly what ``backward`` needs. ``backward(*grad_outputs)`` returns
    one gradient per input (a tuple, or a single array for one input), and may
    return ``None`` for inputs whose ``self.needs_input_grad[i]`` is False, so
    token ids and frozen weights cost nothing. A gradient may have the
    broadcast shape of the output: the engine sums it back to the input's
    shape (``sum_to``), and casts it to the input's dtype where it differs.
    ``backward`` must not modify its grad arguments in place.

    Call an instance on tensors (or arrays / Python scalars) to apply it::

        y = Exp()(x)
    """

    # forward() returns integer/boolean outputs that can never carry a gradient
    differentiable = True

    def __call__(self, *inputs):
        like = None
        for t in inputs:
            if isinstance(t, _Tensor):
                like = t
                break
        tensors = [t if isinstance(t, _Tensor) else _as_tensor(t, like) for t in inputs]
        needs = tuple([t.requires_grad for t in tensors])
        self.needs_input_grad = needs
        outputs = self.forward(*[t.data for t in tensors])
        single = not isinstance(outputs, tuple)
        outputs = (_array(outputs),) if single else tuple([_array(y) for y in outputs])
        record = _grad_enabled and self.differentiable and True in needs
        results = tuple([_Tensor._wrap(y, record) for y in outputs])
        if record:
            self.inputs = tensors
            self.generation = generation = max([t._generation for t in tensors])
            self.n_outputs = len(results)
            self.output_refs = [weakref.ref(r) for r in results]
            if len(results) > 1:  # zeros stand in for outputs that get no gradient
                self.output_meta = [(y.shape, y.dtype) for y in outputs]
            for i, r in enumerate(results):
                r._creator = self
                r._output_index = i
                r._generation = generation + 1
        return results[0] if single else results

    def forward(self, *xs):  # pragma: no cover - abstract
        raise NotImplementedError

    def backward(self, *gys):  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} has no backward")

    def __repr__(self):
        return f"<{type(self).__name__}>"


def _array(y):
    """NumPy returns scalars, not 0-d arrays, from operations on 0-d arrays; make them arrays again."""
    return np.asarray(y) if isinstance(y, np.generic) else y


_tiebreak = itertools.count()

# Tensor and as_tensor, bound by autograd/tensor.py when it is imported (tensor.py imports this module)
_Tensor = None
_as_tensor = None


def bind_tensor_type(tensor_cls, as_tensor_fn):
    """Called once by ``autograd.tensor`` so ``Function.__call__`` can build tensors without an import per call."""
    global _Tensor, _as_tensor
    _Tensor, _as_tensor = tensor_cls, as_tensor_fn


class _Holders:
    """Who else holds each gradient array during one backward pass, so a leaf can keep it without a copy.

    A backward pass may hand one array to several inputs (``Add`` does), or a
    view of it; a leaf's ``.grad`` must own its memory so that in-place updates
    (``p.grad *= clip``, ``+=`` accumulation) touch only that leaf. Two kinds of
    holder: ``kept`` for good (the caller's array, leaves' ``.grad``, retained
    grads) and pending slots, which let go when their node is processed. A
    leaf's array that a slot or a retained grad takes afterwards is ``shared``:
    that leaf must accumulate out of place.
    """

    def __init__(self, caller_grad):
        self.kept = {id(caller_grad)}
        self.in_slots = {}  # id(array) -> number of pending slots holding it
        self.shared = set()  # ids of leaves' arrays that someone else holds too

    def keep(self, array):
        """A retained grad keeps ``array`` for good."""
        if id(array) in self.kept:
            self.shared.add(id(array))
        self.kept.add(id(array))

    def slot_takes(self, array):
        if id(array) in self.kept:
            self.shared.add(id(array))
        self.in_slots[id(array)] = self.in_slots.get(id(array), 0) + 1

    def slot_releases(self, array):
        n = self.in_slots.pop(id(array)) - 1
        if n:
            self.in_slots[id(array)] = n

    def owned(self, array):
        """``array``, or a copy when anyone else holds it (or it is a view); the leaf then keeps it."""
        if id(array) in self.kept or id(array) in self.in_slots or getattr(array, "base", None) is not None:
            array = array.copy()
        self.kept.add(id(array))
        return array


def run_backward(root, grad, retain_graph: bool = False):
    """Propagate ``grad`` (d loss / d root) to every leaf that requires a gradient.

    Leaves accumulate into ``.grad`` (gradients add up across calls until
    zeroed); intermediate gradients live only during this call. Unless
    ``retain_graph`` is set, each node drops its inputs and saved arrays as soon
    as its backward has run, so the graph's memory is freed as the pass proceeds.
    """
    holders = _Holders(grad)
    if root._creator is None:
        if root.requires_grad:
            _accumulate_leaf(root, grad, holders)
        return
    _check_not_freed(root._creator)
    uses = _count_leaf_uses(root) if _hooked_leaves else None
    # pending[node] = list of grad arrays, one per output of that node
    pending = {root._creator: [None] * root._creator.n_outputs}
    pending[root._creator][root._output_index] = grad
    holders.slot_takes(grad)
    heap = [(-root._creator.generation, next(_tiebreak), root._creator)]
    while heap:
        _, _, fn = heapq.heappop(heap)
        _check_not_freed(fn)
        gys = pending.pop(fn)
        for gy in gys:  # the node's slots no longer hold them
            if gy is not None:
                holders.slot_releases(gy)
        if any(gy is None for gy in gys):
            xp = get_array_module(fn.inputs[0].data)
            gys = [gy if gy is not None else xp.zeros(shape, dtype) for gy, (shape, dtype) in zip(gys, fn.output_meta)]
        for i, ref in enumerate(fn.output_refs):
            out = ref()
            if out is not None and out._retains_grad:
                out.grad = gys[i] if out.grad is None else out.grad + gys[i]
                holders.keep(out.grad)
        gxs = fn.backward(*gys)
        if not isinstance(gxs, tuple):
            gxs = (gxs,)
        if len(gxs) != len(fn.inputs):
            raise RuntimeError(f"{type(fn).__name__}.backward returned {len(gxs)} gradients for {len(fn.inputs)} inputs")
        for x, gx, need in zip(fn.inputs, gxs, fn.needs_input_grad):
            if not need:
                continue
            if gx is None:  # a zero gradient, left uncomputed: for a hooked leaf, one edge less to wait for
                if uses is not None and x._creator is None and x._grad_hooks:
                    _edge_done(x, uses)
                continue
            if isinstance(gx, np.generic):
                gx = np.asarray(gx)  # NumPy turns 0-d results into scalars
            elif not is_array(gx):
                raise TypeError(f"{type(fn).__name__}.backward returned {type(gx).__name__}, not an array")
            if gx.shape != x.data.shape:
                gx = sum_to(gx, x.data.shape)
            if gx.dtype is not x.data.dtype and gx.dtype != x.data.dtype:  # every gradient has its input's dtype
                gx = gx.astype(x.data.dtype)
            creator = x._creator
            if creator is None:
                _accumulate_leaf(x, gx, holders)
                if uses is not None and x._grad_hooks:
                    _edge_done(x, uses)
                continue
            slots = pending.get(creator)
            if slots is None:
                slots = pending[creator] = [None] * creator.n_outputs
                heapq.heappush(heap, (-creator.generation, next(_tiebreak), creator))
            j = x._output_index
            if slots[j] is not None:
                holders.slot_releases(slots[j])
                gx = slots[j] + gx  # out of place: both may be held elsewhere
            slots[j] = gx
            holders.slot_takes(gx)
        if not retain_graph:
            fn.__dict__.clear()
            fn._freed = True
    if uses:  # leaves below a node that received no gradient at all: their gradients are final now
        for count, leaf in list(uses.values()):
            if count > 0:
                for hook in leaf._grad_hooks:
                    hook(leaf)


def _check_not_freed(fn):
    if getattr(fn, "_freed", False):
        raise RuntimeError(
            "backward() reached a part of the graph that an earlier backward() already freed; "
            "pass retain_graph=True to the first backward() to go through it twice"
        )


# number of leaves with post-accumulate-grad hooks; while 0, backward skips the counting pre-pass
_hooked_leaves = 0


def register_leaf_hook(t, hook):
    """Implementation of ``Tensor.register_post_accumulate_grad_hook``."""
    global _hooked_leaves
    if t._creator is not None or not t.requires_grad:
        raise RuntimeError("post-accumulate-grad hooks go on leaf tensors that require grad (parameters)")
    if t._grad_hooks is None:
        t._grad_hooks = []
        _hooked_leaves += 1
    t._grad_hooks.append(hook)

    class Handle:
        """``handle.remove()`` unregisters the hook."""

        def remove(self):
            global _hooked_leaves
            if t._grad_hooks and hook in t._grad_hooks:
                t._grad_hooks.remove(hook)
                if not t._grad_hooks:
                    t._grad_hooks = None
                    _hooked_leaves -= 1

    return Handle()


def _edge_done(leaf, uses):
    """One of ``leaf``'s gradient edges has been through; after the last one its hooks fire (the gradient is final)."""
    entry = uses[id(leaf)]
    entry[0] -= 1
    if entry[0] == 0:
        for hook in leaf._grad_hooks:
            hook(leaf)


def _count_leaf_uses(root):
    """For each hooked leaf reachable from ``root``: ``id -> [edges that feed its gradient, the leaf]``.

    A leaf used twice (a tied embedding) gets two contributions; its hook must
    fire after the second. An iterative walk over the nodes, each visited once.
    Edges below a node that never receives a gradient are never run; the
    hooks of leaves still waiting when the pass ends fire then.
    """
    uses = {}
    seen = {id(root._creator)}
    stack = [root._creator]
    while stack:
        fn = stack.pop()
        for x, need in zip(fn.inputs, fn.needs_input_grad):
            if not need:
                continue
            creator = x._creator
            if creator is None:
                if x._grad_hooks:
                    uses.setdefault(id(x), [0, x])[0] += 1
            elif id(creator) not in seen:
                seen.add(id(creator))
                stack.append(creator)
    return uses


def _accumulate_leaf(t, gx, holders):
    """Add ``gx`` into the leaf tensor ``t.grad``, in place only where nobody else holds that array."""
    if t.grad is None:
        t.grad = holders.owned(gx)
    elif id(t.grad) in holders.shared or id(t.grad) in holders.in_slots:
        t.grad = t.grad + gx  # a pending node or a retained grad still reads the old array
        holders.kept.add(id(t.grad))
    else:
        t.grad += gx
