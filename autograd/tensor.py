"""``Tensor``: one array, its gradient, and the node that created it.

The operator overloads and math methods (``x @ w + b``, ``x.sum()``, ``x[..., :3]``)
are attached in one place, ``autograd/overloads.py``; this module holds only the
data, the conversions and the entry to the backward pass.
"""

from __future__ import annotations

import numbers

import numpy as np

from . import backend
from .backend import is_dtype_name
from . import engine
from .engine import run_backward
from .promotion import combined_dtype, default_array


class Tensor:
    """An n-dimensional array (NumPy or CuPy) that can take part in automatic differentiation.

    ``data`` is the array; ``grad`` is None or a plain array of the same shape
    holding d(loss)/d(self), accumulated by ``backward()`` until it is reset to
    None. Arrays are used as they are (no copy); Python numbers and lists become
    float32 / int64 arrays, as in PyTorch.
    """

    __slots__ = ("data", "grad", "requires_grad", "name", "_creator", "_output_index", "_generation",
                 "_retains_grad", "_grad_hooks", "__weakref__")

    # NumPy defers to our reflected operators: `np_array * tensor` gives a Tensor
    __array_ufunc__ = None

    def __init__(self, data, requires_grad: bool = False, dtype=None, device: str | None = None, name=None):
        if isinstance(data, Tensor):
            data = data.data
        if backend.is_array(data):
            if dtype is not None and data.dtype != np.dtype(dtype):
                data = data.astype(dtype)
        else:
            data = default_array(data, dtype)
        if device is not None:
            data = backend.to_device(data, device)
        if requires_grad and data.dtype.kind not in "fc":
            raise TypeError(f"only floating-point tensors can require gradients, got dtype {data.dtype}; "
                            "cast first, e.g. Tensor(x, dtype=np.float32, requires_grad=True)")
        self._set(data, bool(requires_grad), name)

    def _set(self, data, requires_grad: bool, name=None):
        """Every slot's starting value, in one place for both constructors."""
        self.data = data
        self.grad = None
        self.requires_grad = requires_grad
        self.name = name
        self._creator = None
        self._output_index = 0
        self._generation = 0
        self._retains_grad = False
        self._grad_hooks = None

    @classmethod
    def _wrap(cls, array, requires_grad: bool) -> "Tensor":
        """The engine's fast constructor: an op's output array, trusted as it is (no checks, no conversion)."""
        t = object.__new__(cls)
        t._set(array, requires_grad)
        return t

    # -- array facts ---------------------------------------------------------
    @property
    def shape(self):
        return self.data.shape

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def size(self) -> int:
        """Number of elements (NumPy's meaning)."""
        return self.data.size

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def device(self) -> str:
        """"cpu" or "cuda"."""
        return backend.device_of(self.data)

    @property
    def is_leaf(self) -> bool:
        """True for tensors made by the user rather than by an op."""
        return self._creator is None

    @property
    def grad_fn(self):
        """The Function that created this tensor, or None for a leaf."""
        return self._creator

    def __len__(self):
        return len(self.data)

    def __repr__(self):
        body = np.array2string(backend.to_device(self.data, "cpu"), separator=", ", prefix="Tensor(")
        extra = ", requires_grad=True" if self.requires_grad else ""
        dev = ", device='cuda'" if self.device == "cuda" else ""
        return f"Tensor({body}, dtype={self.dtype}{dev}{extra})"

    def __bool__(self):
        if self.data.size != 1:
            raise ValueError(f"the truth value of a tensor of shape {self.shape} is ambiguous; use .any() or .all() on .data")
        return bool(self.data)

    def __hash__(self):  # tensors are graph nodes: identity hashing, like PyTorch
        return id(self)

    # -- conversions ---------------------------------------------------------
    def numpy(self) -> np.ndarray:
        """A NumPy array of the data (a copy from the GPU, the array itself on the CPU)."""
        return backend.to_device(self.data, "cpu")

    def item(self):
        """The single element as a Python number."""
        if self.data.size != 1:
            raise ValueError(f"item() needs a tensor with one element, got shape {self.shape}")
        return self.data.item()

    def tolist(self):
        return self.numpy().tolist()

    def detach(self) -> "Tensor":
        """A new leaf tensor sharing this data, cut from the graph."""
        return Tensor(self.data)

    def retain_grad(self):
        """Keep ``.grad`` on this non-leaf tensor after ``backward()`` (leaves always keep theirs)."""
        self._retains_grad = True
        return self

    def register_post_accumulate_grad_hook(self, hook):
        """Call ``hook(tensor)`` once per ``backward()``, when this leaf's ``.grad`` has received its last
        contribution of that pass (PyTorch's name). Data parallelism starts a gradient bucket's
        all-reduce from here, overlapping communication with the rest of the backward pass.
        Returns a handle whose ``remove()`` unregisters the hook.
        """
        return engine.register_leaf_hook(self, hook)

    def to(self, target) -> "Tensor":
        """Move to a device ("cpu", "cuda") or cast to a dtype; differentiable either way."""
        from .ops.conversion import astype, to_device

        if isinstance(target, str) and not is_dtype_name(target):
            return to_device(self, target)
        return astype(self, target)

    def cpu(self) -> "Tensor":
        return self.to("cpu")

    def cuda(self) -> "Tensor":
        return self.to("cuda")

    # -- backward ------------------------------------------------------------
    def backward(self, grad=None, retain_graph: bool = False):
        """Compute d(self)/d(leaf) for every leaf that requires a gradient, adding it to ``leaf.grad``.

        ``grad`` is d(loss)/d(self); it may be omitted only for a tensor with one
        element (a scalar loss). The graph is freed afterwards unless
        ``retain_graph=True``.
        """
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad: no input of the computation "
                               "had requires_grad=True (or it ran under no_grad())")
        xp = backend.get_array_module(self.data)
        if grad is None:
            if self.data.size != 1:
                raise RuntimeError(
                    f"backward() without grad= works only on a scalar, but this tensor has shape {self.shape}: "
                    f"pass grad= an array of shape {self.shape} (d loss / d this tensor, e.g. ones), "
                    "or reduce to a scalar first (e.g. .sum())")
            grad = xp.ones(self.shape, dtype=self.dtype)
        else:
            if isinstance(grad, Tensor):
                grad = grad.data
            grad = xp.asarray(grad, dtype=self.dtype)
            if grad.shape != self.shape:
                raise ValueError(f"backward(grad=...) got shape {grad.shape}, but the tensor has shape {self.shape}")
        run_backward(self, grad, retain_graph=retain_graph)



def as_tensor(x, like: Tensor | None = None) -> Tensor:
    """Wrap ``x`` in a Tensor; a Python or NumPy scalar takes the dtype it combines with ``like`` to.

    This is what keeps float32 float32: ``x * 2.0`` multiplies by a float32 2,
    never a float64 one; an integer ``like`` with a float scalar gives float32
    (``autograd.promotion``).
    """
    if isinstance(x, Tensor):
        return x
    if like is not None and isinstance(x, (numbers.Number, np.generic)):
        xp = backend.get_array_module(like.data)
        return Tensor(xp.asarray(x, dtype=combined_dtype(like.data, x)))
    if backend.is_array(x):
        if like is not None and backend.get_array_module(x) is not backend.get_array_module(like.data):
            raise TypeError(f"cannot combine an array on {backend.device_of(x)} with a tensor on {like.device}; "
                            "move one with .to(device)")
        return Tensor(x)
    if like is not None:
        xp = backend.get_array_module(like.data)
        return Tensor(xp.asarray(default_array(x)))
    return Tensor(x)


engine.bind_tensor_type(Tensor, as_tensor)
