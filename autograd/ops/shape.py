"""Shape ops: reshape, transpose, broadcasting, indexing, joining, splitting, padding, triangles.

None of these computes anything: each moves elements around, so each backward
moves the gradient back to where the elements came from (a reshape back, the
inverse permutation, a sum over broadcast copies, a scatter-add into zeros).
Forward results may be views of the input (as NumPy's are); the engine never
writes into forward outputs.
"""

from __future__ import annotations

import numbers
import operator

import numpy as np

from .. import backend
from ..backend import get_array_module, is_array
from ..engine import Function
from ..tensor import Tensor, as_tensor
from .reduction import _normalize_axes, _normalize_axis


def _shape_arg(shape, op: str) -> tuple:
    """A shape given as an int or a sequence of ints, as a tuple of Python ints."""
    if isinstance(shape, numbers.Integral) and not isinstance(shape, bool):
        return (operator.index(shape),)
    try:
        return tuple(operator.index(n) for n in shape)
    except TypeError:
        raise TypeError(f"{op}: shape must be an int or a tuple of ints, got {shape!r}") from None


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# ---------------------------------------------------------------------------
# reshape family: reshape, squeeze, unsqueeze, flatten
# ---------------------------------------------------------------------------


class Reshape(Function):
    """y = x.reshape(shape);  dx = gy.reshape(x.shape).

    A reshape keeps every element and its order (row-major), only relabels
    positions, so the gradient of each element is carried back by the inverse
    relabelling: the reshape back.
    """

    def __init__(self, shape):
        self.shape = tuple(shape)

    def forward(self, x):
        self.in_shape = x.shape
        return x.reshape(self.shape)  # (self.shape)

    def backward(self, gy):
        return gy.reshape(self.in_shape)  # (x's shape)


def _resolve_shape(in_shape, shape) -> tuple:
    """``shape`` with its -1 filled in for an input of ``in_shape``, or a ValueError naming both shapes."""
    n = _numel(in_shape)
    unknown = [i for i, s in enumerate(shape) if s == -1]
    bad = [s for s in shape if s < -1]
    if bad or len(unknown) > 1:
        raise ValueError(f"reshape: invalid target shape {shape}: sizes must be >= 0, with at most one -1 "
                         "(the size inferred from the others)")
    known = _numel(s for s in shape if s != -1)
    if unknown:
        if known == 0 or n % known:
            raise ValueError(f"cannot reshape a tensor of shape {tuple(in_shape)} ({n} elements) into shape {shape}: "
                             f"{n} is not a multiple of {known}, the product of the other sizes")
        shape = tuple(n // known if s == -1 else s for s in shape)
    elif known != n:
        raise ValueError(f"cannot reshape a tensor of shape {tuple(in_shape)} ({n} elements) into shape {shape} "
                         f"({known} elements); the number of elements must stay the same")
    return shape


def reshape(x, shape) -> Tensor:
    """x with a new ``shape`` (a tuple of ints, at most one -1 to infer); the elements keep their row-major order."""
    x = as_tensor(x)
    return Reshape(_resolve_shape(x.shape, _shape_arg(shape, "reshape")))(x)


def squeeze(x, axis=None) -> Tensor:
    """Remove size-1 axes: all of them (axis=None) or the given int / tuple of axes, each of which must have size 1."""
    x = as_tensor(x)
    if axis is None:
        axes = tuple(i for i, n in enumerate(x.shape) if n == 1)
    else:
        axes = _normalize_axes(axis, x.ndim, "squeeze", x.shape)
        wide = [a for a in axes if x.shape[a] != 1]
        if wide:
            raise ValueError(f"squeeze: axis {wide[0]} of a tensor of shape {x.shape} has size {x.shape[wide[0]]}, "
                             "not 1; only size-1 axes can be removed")
    return Reshape(tuple(n for i, n in enumerate(x.shape) if i not in axes))(x)


def unsqueeze(x, axis) -> Tensor:
    """Insert a size-1 axis at position ``axis`` of the result (``-1`` appends one at the end), as torch.unsqueeze."""
    x = as_tensor(x)
    a = _normalize_axis(axis, x.ndim + 1, "unsqueeze")
    shape = x.shape[:a] + (1,) + x.shape[a:]
    return Reshape(shape)(x)


def flatten(x, start_axis=0, end_axis=-1) -> Tensor:
    """Merge axes ``start_axis..end_axis`` (inclusive, negatives allowed) into one, as torch.flatten.

    A 0-d tensor becomes a 1-element 1-d tensor.
    """
    x = as_tensor(x)
    if x.ndim == 0:
        return Reshape((1,))(x)
    start = _normalize_axis(start_axis, x.ndim, "flatten", x.shape)
    end = _normalize_axis(end_axis, x.ndim, "flatten", x.shape)
    if start > end:
        raise ValueError(f"flatten: start_axis {start_axis} comes after end_axis {end_axis} for a tensor of shape "
                         f"{x.shape}; give start_axis <= end_axis")
    shape = x.shape[:start] + (_numel(x.shape[start:end + 1]),) + x.shape[end + 1:]
    return Reshape(shape)(x)


# ---------------------------------------------------------------------------
# transpose family
# ---------------------------------------------------------------------------


class Transpose(Function):
    """y = x.transpose(axes): axis i of y is axis axes[i] of x;  dx = gy.transpose(inverse(axes)).

    The inverse permutation ``argsort(axes)`` puts every axis back where it came from.
    """

    def __init__(self, axes):
        self.axes = tuple(axes)

    def forward(self, x):
        return x.transpose(self.axes)  # (x.shape permuted by axes)

    def backward(self, gy):
        inverse = tuple(int(i) for i in np.argsort(self.axes))
        return gy.transpose(inverse)  # (x's shape)


def _permutation(axes, ndim, op, shape) -> tuple:
    """``axes`` as a permutation of ``0..ndim-1`` (negatives allowed), or a clear error."""
    try:
        axes = tuple(axes)
    except TypeError:
        raise TypeError(f"{op}: axes must be a sequence of ints, got {axes!r}") from None
    norm = tuple(_normalize_axis(a, ndim, op, shape) for a in axes)
    if sorted(norm) != list(range(ndim)):
        raise ValueError(f"{op}: axes {axes} are not a permutation of the {ndim} axes of a tensor of shape {shape}; "
                         f"name each of 0..{ndim - 1} exactly once")
    return norm


def transpose(x, axes=None) -> Tensor:
    """Permute the axes, with NumPy's semantics: ``axes=None`` reverses them (the matrix transpose for 2-D)."""
    x = as_tensor(x)
    if axes is None:
        axes = tuple(reversed(range(x.ndim)))
    return Transpose(_permutation(axes, x.ndim, "transpose", x.shape))(x)


def permute(x, axes) -> Tensor:
    """Permute the axes: axis i of the result is axis ``axes[i]`` of x (torch.permute)."""
    x = as_tensor(x)
    return Transpose(_permutation(axes, x.ndim, "permute", x.shape))(x)


def swapaxes(x, axis1, axis2) -> Tensor:
    """Exchange two axes (numpy.swapaxes; torch's ``transpose(dim0, dim1)``)."""
    x = as_tensor(x)
    a = _normalize_axis(axis1, x.ndim, "swapaxes", x.shape)
    b = _normalize_axis(axis2, x.ndim, "swapaxes", x.shape)
    axes = list(range(x.ndim))
    axes[a], axes[b] = b, a
    return Transpose(axes)(x)


# ---------------------------------------------------------------------------
# broadcast_to
# ---------------------------------------------------------------------------


class BroadcastTo(Function):
    """y = broadcast_to(x, shape);  dx = sum of gy over every copy of each element.

    Each x_i is copied to several y_j with coefficient 1, so dx_i = sum_j gy_j.
    The backward returns gy as it is: the engine's ``sum_to`` does that sum for
    every op in one place.
    """

    def __init__(self, shape):
        self.shape = tuple(shape)

    def forward(self, x):
        xp = get_array_module(x)
        return xp.broadcast_to(x, self.shape)

    def backward(self, gy):
        return gy


def broadcast_to(x, shape) -> Tensor:
    """x repeated (as a read-only view) to ``shape``, with NumPy's broadcasting rules."""
    x = as_tensor(x)
    shape = _shape_arg(shape, "broadcast_to")
    ok = len(shape) >= x.ndim and all(n == m or n == 1 for n, m in zip(x.shape[::-1], shape[::-1]))
    if not ok or any(s < 0 for s in shape):
        raise ValueError(f"cannot broadcast a tensor of shape {x.shape} to shape {shape}: aligned from the right, "
                         "every size must equal the target's or be 1, and the target needs at least as many axes")
    return BroadcastTo(shape)(x)


# ---------------------------------------------------------------------------
# getitem
# ---------------------------------------------------------------------------


class GetItem(Function):
    """y = x[index], for NumPy's basic and advanced indexing.

    Every y_j is a copy of one x_i, so dx_i = sum of gy_j over the j that read x_i:
    start from zeros and scatter-add gy into the indexed positions. A repeated
    integer index reads x_i twice and so receives both gradients (NumPy's
    ``add.at``). A basic index (ints, slices, None, Ellipsis) never repeats an
    element, so a plain assignment ``gx[index] = gy`` is enough.
    """

    def __init__(self, index, basic: bool):
        self.index, self.basic = index, basic

    def forward(self, x):
        self.in_shape = x.shape
        try:
            return x[self.index]
        except IndexError as e:
            raise IndexError(f"cannot index a tensor of shape {x.shape} with {_describe(self.index)}: {e}") from None

    def backward(self, gy):
        xp = get_array_module(gy)
        gx = xp.zeros(self.in_shape, dtype=gy.dtype)
        if self.basic:
            gx[self.index] = gy
        else:
            backend.scatter_add(gx, self.index, gy)
        return gx


def _describe(index) -> str:
    """A short description of an index for error messages (arrays by dtype and shape, not contents)."""
    items = index if isinstance(index, tuple) else (index,)
    parts = [f"{a.dtype} array of shape {a.shape}" if is_array(a) else repr(a) for a in items]
    return "[" + ", ".join(parts) + "]"


def _prepare_index(index, device: str):
    """The index as a tuple that NumPy / CuPy accept on ``device``, and whether it is basic-only.

    Tensors are unwrapped to their arrays; lists and nested tuples become
    arrays (NumPy 2 treats them as integer or boolean arrays); arrays move to
    the indexed tensor's device.
    """
    items = index if isinstance(index, tuple) else (index,)
    out, basic = [], True
    for it in items:
        if isinstance(it, Tensor):
            it = it.data
        if it is None or it is Ellipsis or isinstance(it, slice):
            out.append(it)
            continue
        if isinstance(it, (bool, np.bool_)):
            basic = False  # x[True] adds an axis: advanced indexing in NumPy's terms
            out.append(bool(it))
            continue
        if isinstance(it, numbers.Integral):
            out.append(operator.index(it))
            continue
        if isinstance(it, (list, tuple)):
            it = np.asarray(it)
            if it.size == 0:
                it = it.astype(np.intp)  # x[[]] selects nothing
        if not is_array(it):
            raise TypeError(f"cannot index a tensor with {it!r} ({type(it).__name__}): use ints, slices, None, "
                            "Ellipsis, integer or boolean arrays (or Tensors), lists of ints, or a tuple of these")
        if it.dtype.kind not in "iub":
            raise TypeError(f"cannot index a tensor with a {it.dtype} array: index arrays must be integer or boolean; "
                            "cast with .astype(np.int64)")
        out.append(backend.to_device(it, device))
        basic = False
    return tuple(out), basic


def getitem(x, index) -> Tensor:
    """x[index] with everything NumPy's indexing supports: ints, slices (with steps), None, Ellipsis,
    integer arrays / lists / integer Tensors, boolean masks (arrays or bool Tensors), and tuples mixing them.

    The gradient counts repeated indices: ``x[[0, 0]]`` sends both gradients to x[0].
    """
    x = as_tensor(x)
    index, basic = _prepare_index(index, x.device)
    return GetItem(index, basic)(x)


# ---------------------------------------------------------------------------
# concatenate / stack / split
# ---------------------------------------------------------------------------


def _tensors(tensors, op):
    """A non-empty list of Tensors on one device (arrays and numbers are wrapped like the first tensor)."""
    if isinstance(tensors, Tensor) or is_array(tensors):
        raise TypeError(f"{op} takes a sequence of tensors, e.g. {op}([a, b]), not a single tensor")
    tensors = list(tensors)
    if not tensors:
        raise ValueError(f"{op} needs at least one tensor")
    like = next((t for t in tensors if isinstance(t, Tensor)), None)
    return [as_tensor(t, like=like) for t in tensors]


class Concatenate(Function):
    """y = concatenate([x_0, x_1, ...], axis);  dx_k = the slice of gy that x_k filled.

    Each element of y is a copy of one element of one input, so gy is split
    back at the same boundaries (cast back to each input's dtype, in case the
    inputs had different dtypes and the forward promoted them).
    """

    def __init__(self, axis: int):
        self.axis = axis

    def forward(self, *xs):
        xp = get_array_module(*xs)
        self.sizes = [x.shape[self.axis] for x in xs]
        self.dtypes = [x.dtype for x in xs]
        return xp.concatenate(xs, axis=self.axis)

    def backward(self, gy):
        bounds = np.cumsum(self.sizes)[:-1].tolist()
        start = 0
        grads = []
        for k, (stop, need) in enumerate(zip(bounds + [None], self.needs_input_grad)):
            if need:
                index = (slice(None),) * self.axis + (slice(start, stop),)
                grads.append(gy[index].astype(self.dtypes[k], copy=False))
            else:
                grads.append(None)
            start = stop
        return tuple(grads)


def concatenate(tensors, axis=0) -> Tensor:
    """Join a sequence of tensors along an existing ``axis``; the other sizes must match."""
    tensors = _tensors(tensors, "concatenate")
    first = tensors[0]
    if any(t.ndim == 0 for t in tensors):
        raise ValueError("concatenate: 0-d tensors have no axis to join along; use stack, or unsqueeze them first")
    shapes = [t.shape for t in tensors]
    a = _normalize_axis(axis, first.ndim, "concatenate", first.shape)
    others = [s[:a] + s[a + 1:] for s in shapes]  # every shape without the joined axis
    if any(t.ndim != first.ndim for t in tensors) or any(o != others[0] for o in others):
        raise ValueError(f"concatenate along axis {axis} needs the same number of axes and the same sizes on every "
                         f"other axis, got shapes {', '.join(str(s) for s in shapes)}")
    return Concatenate(a)(*tensors)


class Stack(Function):
    """y = stack([x_0, x_1, ...], axis): a new axis, with y[..., k, ...] = x_k;  dx_k = gy[..., k, ...]."""

    def __init__(self, axis: int):
        self.axis = axis

    def forward(self, *xs):
        xp = get_array_module(*xs)
        self.dtypes = [x.dtype for x in xs]
        return xp.stack(xs, axis=self.axis)

    def backward(self, gy):
        grads = []
        for k, need in enumerate(self.needs_input_grad):
            index = (slice(None),) * self.axis + (k,)
            grads.append(gy[index].astype(self.dtypes[k], copy=False) if need else None)
        return tuple(grads)


def stack(tensors, axis=0) -> Tensor:
    """Join tensors of one shape along a new ``axis`` (negative counts from the end of the result)."""
    tensors = _tensors(tensors, "stack")
    shapes = [t.shape for t in tensors]
    if any(s != shapes[0] for s in shapes):
        raise ValueError(f"stack needs tensors of one shape, got shapes {', '.join(str(s) for s in shapes)}")
    a = _normalize_axis(axis, tensors[0].ndim + 1, "stack")
    return Stack(a)(*tensors)


class Split(Function):
    """(y_0, y_1, ...) = split(x, boundaries, axis), y_k = x[b_k:b_{k+1}] along the axis.

    One node with several outputs. Each y_k is a slice of x, so dx is the
    y_k-gradients put back at their positions: their concatenation when the
    pieces tile the axis in order (the usual case); the engine hands zeros for
    outputs that got no gradient. Pieces that overlap (NumPy allows decreasing
    split indices) are added into zeros instead.
    """

    def __init__(self, bounds, axis: int):
        self.bounds, self.axis = bounds, axis  # bounds: [(start, stop), ...] in slice form

    def forward(self, x):
        self.in_shape = x.shape
        lead = (slice(None),) * self.axis
        return tuple(x[lead + (slice(s, e),)] for s, e in self.bounds)

    def backward(self, *gys):
        xp = get_array_module(gys[0])
        n = self.in_shape[self.axis]
        starts = [s for s, _ in self.bounds]
        stops = [e for _, e in self.bounds]
        tiles = (starts[0] == 0 and stops[-1] == n and all(e >= s for s, e in self.bounds)
                 and starts[1:] == stops[:-1])
        if tiles:
            return xp.concatenate(gys, axis=self.axis)
        gx = xp.zeros(self.in_shape, dtype=gys[0].dtype)
        lead = (slice(None),) * self.axis
        for (s, e), g in zip(self.bounds, gys):
            gx[lead + (slice(s, e),)] += g  # gx is our own fresh array
        return gx


def split(x, indices_or_sections, axis=0) -> tuple:
    """Split x along ``axis`` into a tuple of tensors, with numpy.split's semantics.

    An int ``n`` gives n equal sections (the axis size must be divisible by n);
    a list of indices gives the pieces x[:i0], x[i0:i1], ..., x[i_last:].
    """
    x = as_tensor(x)
    if x.ndim == 0:
        raise ValueError("split: a 0-d tensor has no axis to split")
    a = _normalize_axis(axis, x.ndim, "split", x.shape)
    n = x.shape[a]
    if isinstance(indices_or_sections, numbers.Integral) and not isinstance(indices_or_sections, bool):
        sections = operator.index(indices_or_sections)
        if sections <= 0:
            raise ValueError(f"split: the number of sections must be positive, got {sections}")
        if n % sections:
            raise ValueError(f"split: axis {axis} of size {n} (shape {x.shape}) does not divide into {sections} equal "
                             f"sections; pass a size that divides {n}, or a list of split indices")
        step = n // sections
        bounds = [(k * step, (k + 1) * step) for k in range(sections)]
    else:
        try:
            points = [operator.index(i) for i in indices_or_sections]
        except TypeError:
            raise TypeError(f"split: indices_or_sections must be an int or a sequence of ints, "
                            f"got {indices_or_sections!r}") from None
        edges = [0] + points + [n]
        bounds = [slice(s, e).indices(n)[:2] for s, e in zip(edges[:-1], edges[1:])]
    return Split(bounds, a)(x)


# ---------------------------------------------------------------------------
# pad
# ---------------------------------------------------------------------------


class Pad(Function):
    """y = x surrounded by ``value`` (numpy.pad's constant mode);  dx = the interior slice of gy.

    Each x_i lands at one y_j (the padding comes from a constant), so dx_i = gy_j.
    """

    def __init__(self, pad_width, value):
        self.pad_width, self.value = pad_width, value  # pad_width: ((before, after), ...) one pair per axis

    def forward(self, x):
        xp = get_array_module(x)
        shape = tuple(n + b + a for n, (b, a) in zip(x.shape, self.pad_width))
        self.interior = tuple(slice(b, b + n) for n, (b, _) in zip(x.shape, self.pad_width))
        y = xp.full(shape, self.value, dtype=x.dtype)
        y[self.interior] = x
        return y

    def backward(self, gy):
        return gy[self.interior]


def pad(x, pad_width, value=0.0) -> Tensor:
    """Pad with the constant ``value``; ``pad_width`` as numpy.pad takes it: an int (every side),
    a (before, after) pair (every axis), or one (before, after) pair per axis."""
    x = as_tensor(x)
    try:
        widths = np.asarray(pad_width)
        ok = widths.dtype.kind in "iu"
        widths = np.broadcast_to(widths, (x.ndim, 2)) if ok else widths
    except ValueError:
        ok = False
    if not ok or (widths < 0).any():
        raise ValueError(f"pad: pad_width {pad_width!r} does not fit a tensor of shape {x.shape}: give a non-negative "
                         f"int, a (before, after) pair, or {x.ndim} such pairs, one per axis")
    return Pad(tuple((int(b), int(a)) for b, a in widths), value)(x)


# ---------------------------------------------------------------------------
# triu / tril
# ---------------------------------------------------------------------------


class _Triangle(Function):
    """Shared code of Triu and Tril: keep the entries where a mask over the last two axes is True."""

    def __init__(self, k: int):
        self.k = k

    def _mask(self, xp, n, m):  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x):
        xp = get_array_module(x)
        self.keep = self._mask(xp, *x.shape[-2:])  # (n, m), broadcast over the batch axes
        return xp.where(self.keep, x, xp.zeros((), dtype=x.dtype))

    def backward(self, gy):
        xp = get_array_module(gy)
        return xp.where(self.keep, gy, xp.zeros((), dtype=gy.dtype))


class Triu(_Triangle):
    """y = x with the entries below diagonal k zeroed (on the last two axes);  dx = gy with the same entries zeroed.

    y_ij = x_ij where j - i >= k, else 0: a constant 0/1 mask times x, so the
    gradient is the same mask times gy.
    """

    def _mask(self, xp, n, m):
        return ~xp.tri(n, m, k=self.k - 1, dtype=bool)  # j - i >= k


class Tril(_Triangle):
    """y = x with the entries above diagonal k zeroed (on the last two axes);  dx = gy with the same entries zeroed.

    y_ij = x_ij where j - i <= k, else 0: a constant 0/1 mask times x, so the
    gradient is the same mask times gy.
    """

    def _mask(self, xp, n, m):
        return xp.tri(n, m, k=self.k, dtype=bool)  # j - i <= k


def _check_triangle(x, k, op):
    x = as_tensor(x)
    if x.ndim < 2:
        raise ValueError(f"{op} needs at least 2 axes (it works on the last two), got shape {x.shape}")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"{op}: k must be an int (the diagonal offset), got {k!r}")
    return x, operator.index(k)


def triu(x, k=0) -> Tensor:
    """Upper triangle of the last two axes (batched): keep x[..., i, j] where j - i >= k, zero the rest."""
    x, k = _check_triangle(x, k, "triu")
    return Triu(k)(x)


def tril(x, k=0) -> Tensor:
    """Lower triangle of the last two axes (batched): keep x[..., i, j] where j - i <= k, zero the rest."""
    x, k = _check_triangle(x, k, "tril")
    return Tril(k)(x)
