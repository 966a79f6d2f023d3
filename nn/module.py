"""``Parameter`` and ``Module``: the containers every layer is built from.

A ``Module`` registers the ``Parameter``\\ s, child modules and buffers assigned
to it, in the order they are assigned, so that ``named_parameters()`` and
``state_dict()`` give the same dotted names (``h.0.attn.c_attn.weight``) in the
same order on every run and every rank. Optimizers key their state by those
names, and data-parallel code walks parameters in that order.

Traversal order is PyTorch's: a module's own parameters first (in assignment
order), then each child module's, depth first, children in assignment order.

    >>> import numpy as np
    >>> from nn import Module, Parameter
    >>> class Affine(Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.scale = Parameter(np.ones(3, dtype=np.float32))
    ...     def forward(self, x):
    ...         return x * self.scale
    >>> [name for name, _ in Affine().named_parameters()]
    ['scale']
"""

from __future__ import annotations

from collections import OrderedDict, namedtuple

import numpy as np

from autograd.backend import is_dtype_name
from autograd import backend
from autograd.tensor import Tensor


class Parameter(Tensor):
    """A leaf ``Tensor`` that a ``Module`` registers as a trainable weight.

    ``requires_grad`` is True by default. ``no_decay=True`` marks a parameter
    that weight decay should skip (``nn.optim.param_groups_for_gpt`` reads it);
    layers set it on embeddings and norm gains, so grouping never depends on
    matching names.
    """

    __slots__ = ("no_decay",)

    def __init__(self, data, requires_grad: bool = True, dtype=None, no_decay: bool = False, name=None):
        super().__init__(data, requires_grad=requires_grad, dtype=dtype, name=name)
        self.no_decay = bool(no_decay)

    def __repr__(self):
        dev = ", device='cuda'" if self.device == "cuda" else ""
        extra = "" if self.requires_grad else ", requires_grad=False"
        return f"Parameter(shape={tuple(self.shape)}, dtype={self.dtype}{dev}{extra})"


IncompatibleKeys = namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])
IncompatibleKeys.__doc__ = "What ``load_state_dict(strict=False)`` skipped: keys the model has and the state lacks, and the reverse."


class Module:
    """Base class of every layer and model: subclass it, assign parts in ``__init__``, write ``forward``.

    Assigning a ``Parameter`` or a ``Module`` to an attribute registers it (call
    ``super().__init__()`` first). ``module(x)`` calls ``forward(x)``.
    ``self.training`` (True after construction) is what dropout reads;
    ``train()`` and ``eval()`` set it on the whole tree.
    """

    # children are also plain attributes (fast lookup in forward); ModuleDict turns this off so that a
    # key such as "keys" or "update" cannot shadow its methods
    _children_are_attributes = True

    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_non_persistent", set())
        object.__setattr__(self, "training", True)

    # -- registration --------------------------------------------------------
    def __setattr__(self, name, value):
        d = self.__dict__
        if "_parameters" not in d:
            raise AttributeError(f"cannot assign {name!r} before Module.__init__() ran: "
                                 f"call super().__init__() at the start of {type(self).__name__}.__init__")
        params, modules, buffers = d["_parameters"], d["_modules"], d["_buffers"]
        if isinstance(value, Parameter):
            self._forget(name, keep=params)
            params[name] = value
        elif isinstance(value, Module):
            self._forget(name, keep=modules)
            modules[name] = value
        elif name in params:
            if value is not None:
                raise TypeError(f"cannot assign a {type(value).__name__} to parameter {name!r} of "
                                f"{type(self).__name__}: wrap it in nn.Parameter(...), or `del module.{name}` first")
            params[name] = None
        elif name in modules:
            if value is not None:
                raise TypeError(f"cannot assign a {type(value).__name__} to submodule {name!r} of "
                                f"{type(self).__name__}: assign a Module, or `del module.{name}` first")
            modules[name] = None
        elif name in buffers:
            if value is not None and not backend.is_array(value):
                raise TypeError(f"buffer {name!r} must be a NumPy/CuPy array or None, got {type(value).__name__}")
            buffers[name] = value
        object.__setattr__(self, name, value)

    def __delattr__(self, name):
        d = self.__dict__
        found = False
        for registry in (d["_parameters"], d["_modules"], d["_buffers"]):
            found = registry.pop(name, False) is not False or found
        d["_non_persistent"].discard(name)
        if name in d:
            object.__delattr__(self, name)
        elif not found:
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def _forget(self, name, keep):
        """Drop ``name`` from the registries other than ``keep`` (an attribute changes kind)."""
        d = self.__dict__
        for registry in (d["_parameters"], d["_modules"], d["_buffers"]):
            if registry is not keep:
                registry.pop(name, None)
        d["_non_persistent"].discard(name)

    def register_parameter(self, name: str, param: Parameter | None):
        """Register ``param`` (or None, a placeholder that is skipped) under ``name``; same as assigning it."""
        if param is not None and not isinstance(param, Parameter):
            raise TypeError(f"register_parameter({name!r}) needs an nn.Parameter or None, got {type(param).__name__}")
        if param is None:
            self._forget(name, keep=self._parameters)
            self._parameters[name] = None
            object.__setattr__(self, name, None)
        else:
            setattr(self, name, param)

    def register_module(self, name: str, module: "Module | None"):
        """Register a child module under ``name`` (use this for names that are not identifiers, like "0")."""
        if module is not None and not isinstance(module, Module):
            raise TypeError(f"register_module({name!r}) needs a Module or None, got {type(module).__name__}")
        self._forget(name, keep=self._modules)
        self._modules[name] = module
        if self._children_are_attributes:
            object.__setattr__(self, name, module)

    add_module = register_module

    def register_buffer(self, name: str, array, persistent: bool = True):
        """Register a non-trainable array (e.g. a causal mask, RoPE tables) that moves with ``to()``.

        Persistent buffers are part of ``state_dict()``; non-persistent ones are
        rebuilt by the module and not saved.
        """
        if array is not None and not backend.is_array(array):
            raise TypeError(f"register_buffer({name!r}) needs a NumPy/CuPy array or None, got {type(array).__name__}; "
                            "for a trainable weight assign an nn.Parameter instead")
        if "." in name or not name:
            raise ValueError(f"buffer name {name!r} must be non-empty and contain no '.'")
        self._forget(name, keep=self._buffers)
        self._buffers[name] = array
        if not persistent:
            self._non_persistent.add(name)
        object.__setattr__(self, name, array)

    # -- calling -------------------------------------------------------------
    def forward(self, *args, **kwargs):
        """The computation; every subclass defines it."""
        raise NotImplementedError(f"{type(self).__name__} has no forward(): define forward() in the subclass")

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    # -- traversal -----------------------------------------------------------
    def named_modules(self, prefix: str = "", memo: set | None = None):
        """Yield ``(dotted_name, module)`` for this module (name ``prefix``) and every descendant, pre-order.

        A module reachable along two paths is yielded once, under its first name.
        """
        memo = set() if memo is None else memo
        if id(self) in memo:
            return
        memo.add(id(self))
        yield prefix, self
        for name, child in self._modules.items():
            if child is not None:
                yield from child.named_modules(f"{prefix}.{name}" if prefix else name, memo)

    def modules(self):
        """Every module in the tree, this one first (pre-order)."""
        for _, m in self.named_modules():
            yield m

    def named_children(self):
        """Yield ``(name, child)`` for the direct children, in assignment order."""
        for name, child in self._modules.items():
            if child is not None:
                yield name, child

    def get_submodule(self, target: str) -> "Module":
        """The descendant at dotted path ``target`` ("" is this module), e.g. ``"h.0.attn"``."""
        mod = self
        if target == "":
            return mod
        for part in target.split("."):
            child = mod._modules.get(part)
            if child is None:
                raise AttributeError(f"{type(mod).__name__} has no submodule {part!r} (looking up {target!r})")
            mod = child
        return mod

    def children(self):
        """The direct child modules, in assignment order."""
        for _, child in self.named_children():
            yield child

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        """Yield ``(dotted_name, parameter)``: own parameters first, then each child's, depth first.

        A parameter shared by two modules (tied weights) is yielded once, under
        its first name, unless ``remove_duplicate=False``.
        """
        seen = set()
        mods = self.named_modules(prefix) if recurse else [(prefix, self)]
        for mod_name, mod in mods:
            for name, p in mod._parameters.items():
                if p is None or (remove_duplicate and id(p) in seen):
                    continue
                seen.add(id(p))
                yield (f"{mod_name}.{name}" if mod_name else name), p

    def parameters(self, recurse: bool = True):
        """The parameters, in ``named_parameters()`` order."""
        for _, p in self.named_parameters(recurse=recurse):
            yield p

    def named_buffers(self, prefix: str = "", recurse: bool = True, persistent_only: bool = False):
        """Yield ``(dotted_name, array)`` for registered buffers (skipping None), in traversal order."""
        mods = self.named_modules(prefix) if recurse else [(prefix, self)]
        for mod_name, mod in mods:
            for name, b in mod._buffers.items():
                if b is None or (persistent_only and name in mod._non_persistent):
                    continue
                yield (f"{mod_name}.{name}" if mod_name else name), b

    def buffers(self, recurse: bool = True):
        """The buffer arrays, in ``named_buffers()`` order."""
        for _, b in self.named_buffers(recurse=recurse):
            yield b

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Number of scalar weights (shared parameters counted once); only trainable ones if asked."""
        return int(sum(p.size for p in self.parameters() if p.requires_grad or not trainable_only))

    # -- modes ---------------------------------------------------------------
    def train(self, mode: bool = True):
        """Set ``training`` on this module and all descendants (dropout is active in training); returns self."""
        for m in self.modules():
            object.__setattr__(m, "training", bool(mode))
        return self

    def eval(self):
        """``train(False)``: dropout off. (Gradient recording is a separate switch: ``autograd.no_grad()``.)"""
        return self.train(False)

    def requires_grad_(self, requires_grad: bool = True):
        """Freeze (False) or unfreeze (True) every parameter; returns self."""
        for p in self.parameters():
            p.requires_grad = bool(requires_grad)
        return self

    def zero_grad(self):
        """Reset every parameter's ``.grad`` to None (the next backward writes fresh arrays)."""
        for p in self.parameters():
            p.grad = None

    def apply(self, fn):
        """Call ``fn(module)`` on every descendant (children first) and then on this module; returns self."""
        for child in self.children():
            child.apply(fn)
        fn(self)
        return self

    # -- devices and dtypes ----------------------------------------------------
    def to(self, target):
        """Move parameters and buffers to a device ("cpu", "cuda") or cast floating ones to a dtype; returns self.

        Parameter objects stay the same objects (only their ``.data`` and
        ``.grad`` arrays are replaced), so an optimizer built before the move
        still holds them. Moving is a no-op for arrays already on the device.
        """
        if isinstance(target, str) and not is_dtype_name(target):
            device = backend.normalize_device(target)

            def convert(a):
                return backend.to_device(a, device)
        else:
            dtype = np.dtype(target)
            if dtype.kind != "f":
                raise ValueError(f"Module.to() casts only to floating dtypes, got {dtype}")

            def convert(a):
                return a.astype(dtype) if a.dtype.kind == "f" and a.dtype != dtype else a
        for p in self.parameters():
            p.data = convert(p.data)
            if p.grad is not None:
                p.grad = convert(p.grad)
        for mod in self.modules():
            for name, b in list(mod._buffers.items()):
                if b is not None:
                    new = convert(b)
                    mod._buffers[name] = new
                    object.__setattr__(mod, name, new)
        return self

    def cpu(self):
        """``to("cpu")``."""
        return self.to("cpu")

    def cuda(self):
        """``to("cuda")``."""
        return self.to("cuda")

    # -- state ---------------------------------------------------------------
    def state_dict(self) -> "OrderedDict[str, object]":
        """An ordered dict ``dotted_name -> array``: every parameter's data, then persistent buffers per module.

        Order follows the module tree (each module's parameters, then its
        buffers, then its children). Tied parameters appear under every name,
        as in PyTorch. The arrays are the live ones, not copies: take
        ``{k: v.copy() for k, v in sd.items()}`` for a snapshot that training
        will not change.
        """
        out = OrderedDict()
        for mod_name, mod in self.named_modules():
            dot = f"{mod_name}." if mod_name else ""
            for name, p in mod._parameters.items():
                if p is not None:
                    out[dot + name] = p.data
            for name, b in mod._buffers.items():
                if b is not None and name not in mod._non_persistent:
                    out[dot + name] = b
        return out

    def _state_slots(self):
        """``dotted_name -> (module, attribute, kind)`` for every entry of ``state_dict()``."""
        slots = OrderedDict()
        for mod_name, mod in self.named_modules():
            dot = f"{mod_name}." if mod_name else ""
            for name, p in mod._parameters.items():
                if p is not None:
                    slots[dot + name] = (mod, name, "parameter")
            for name, b in mod._buffers.items():
                if b is not None and name not in mod._non_persistent:
                    slots[dot + name] = (mod, name, "buffer")
        return slots

    def load_state_dict(self, state, strict: bool = True) -> IncompatibleKeys:
        """Copy arrays from ``state`` (name -> array) into the parameters and buffers, exactly.

        Values are cast to each parameter's dtype and moved to its device, then
        copied into the existing array (so views of it and optimizers holding
        the parameter stay valid). With ``strict=True`` any missing or
        unexpected key is an error; a wrongly shaped value always is. The
        ValueError lists every missing, unexpected and wrongly shaped key at
        once. Returns ``(missing_keys, unexpected_keys)``. Nothing is copied
        when an error is raised.
        """
        if not hasattr(state, "keys"):
            raise TypeError(f"load_state_dict needs a mapping name -> array (e.g. from state_dict()), "
                            f"got {type(state).__name__}")
        slots = self._state_slots()
        missing = [k for k in slots if k not in state]
        unexpected = [k for k in state if k not in slots]
        mismatched = []
        values = {}
        for key, (mod, name, kind) in slots.items():
            if key not in state:
                continue
            value = state[key]
            if isinstance(value, Tensor):
                value = value.data
            if not backend.is_array(value):
                value = np.asarray(value)
            target = mod._parameters[name].data if kind == "parameter" else mod._buffers[name]
            if tuple(value.shape) != tuple(target.shape):
                mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(target.shape)}")
            else:
                values[key] = value
        if mismatched or (strict and (missing or unexpected)):
            lines = [f"load_state_dict failed for {type(self).__name__}:"]
            if missing:
                lines.append(f"  missing keys ({len(missing)}): " + ", ".join(missing))
            if unexpected:
                lines.append(f"  unexpected keys ({len(unexpected)}): " + ", ".join(unexpected))
            if mismatched:
                lines.append(f"  wrongly shaped keys ({len(mismatched)}): " + "; ".join(mismatched))
            if not mismatched:
                lines.append("  (pass strict=False to load only the keys both have)")
            raise ValueError("\n".join(lines))
        for key, value in values.items():
            mod, name, kind = slots[key]
            if kind == "parameter":
                p = mod._parameters[name]
                p.data = _copy_into(p.data, value)
            else:
                new = _copy_into(mod._buffers[name], value)
                mod._buffers[name] = new
                object.__setattr__(mod, name, new)
        return IncompatibleKeys(missing, unexpected)

    # -- printing ------------------------------------------------------------
    def extra_repr(self) -> str:
        """The text inside this module's parentheses in ``repr`` (layers override it: sizes, options)."""
        return ""

    def __repr__(self):
        lines = []
        for name, child in self._modules.items():
            body = repr(child).replace("\n", "\n  ")
            lines.append(f"  ({name}): {body}")
        extra = self.extra_repr()
        if not lines:
            return f"{type(self).__name__}({extra})"
        head = f"{type(self).__name__}({extra}" if extra else f"{type(self).__name__}("
        return head + "\n" + "\n".join(lines) + "\n)"



def _copy_into(target, value):
    """Copy ``value`` into ``target`` exactly (cast to its dtype, moved to its device); returns the array to keep.

    Writes in place when ``target`` is writable, so views of it stay valid;
    otherwise returns a fresh array.
    """
    value = backend.to_device(value, backend.device_of(target))
    xp = backend.get_array_module(target)
    value = xp.asarray(value).astype(target.dtype, copy=False)
    writeable = getattr(getattr(target, "flags", None), "writeable", True)
    if writeable:
        target[...] = value
        return target
    return value.copy()


def functional_call(module: Module, tensors: dict, *args, **kwargs):
    """Run ``module(*args, **kwargs)`` with some parameters replaced by the given tensors, then restore them.

    ``tensors`` maps dotted parameter names to Tensors (any Tensor, not only
    Parameters); gradients then flow to those tensors. This is how a gradient
    check reaches a layer's weights::

        gradcheck(lambda x, w: nn.functional_call(layer, {"weight": w}, x), x, layer.weight)
    """
    slots = []
    for name, t in tensors.items():
        path, _, attr = name.rpartition(".")
        mod = module.get_submodule(path)
        if attr not in mod._parameters:
            raise KeyError(f"functional_call: {type(module).__name__} has no parameter {name!r}")
        if not isinstance(t, Tensor):
            raise TypeError(f"functional_call: {name!r} must be a Tensor, got {type(t).__name__}")
        slots.append((mod, attr, mod._parameters[attr]))
        mod._parameters[attr] = t
        object.__setattr__(mod, attr, t)
    try:
        return module(*args, **kwargs)
    finally:
        for mod, attr, original in reversed(slots):
            mod._parameters[attr] = original
            object.__setattr__(mod, attr, original)


# ---------------------------------------------------------------------------
# containers
# ---------------------------------------------------------------------------


class ModuleList(Module):
    """A list of modules, registered as children named "0", "1", ... (so names read ``h.0.attn...``).

    Index it, iterate it, ``append``/``extend`` it; it has no ``forward`` of its own.
    """

    def __init__(self, modules=None):
        super().__init__()
        if modules is not None:
            self.extend(modules)

    def _check(self, module):
        if not isinstance(module, Module):
            raise TypeError(f"ModuleList holds Modules only, got {type(module).__name__}")
        return module

    def append(self, module: Module):
        """Add ``module`` at the end (child name ``str(len(self))``); returns self."""
        self.register_module(str(len(self._modules)), self._check(module))
        return self

    def extend(self, modules):
        """Append each module of ``modules``; returns self."""
        for m in modules:
            self.append(m)
        return self

    def _index(self, i: int) -> int:
        n = len(self._modules)
        if not -n <= i < n:
            raise IndexError(f"ModuleList index {i} out of range for length {n}")
        return i % n

    def __getitem__(self, i):
        items = list(self._modules.values())
        if isinstance(i, slice):
            return ModuleList(items[i])
        return items[self._index(i)]

    def __setitem__(self, i, module):
        self.register_module(str(self._index(i)), self._check(module))

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def forward(self, *args, **kwargs):
        raise NotImplementedError("ModuleList has no forward(): iterate over it (for block in self.h: x = block(x)), "
                                  "or use nn.Sequential")


class Sequential(ModuleList):
    """Modules applied one after the other: ``Sequential(a, b, c)(x) == c(b(a(x)))``; children "0", "1", ..."""

    def __init__(self, *modules):
        super().__init__(modules)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Sequential(*list(self._modules.values())[i])
        return super().__getitem__(i)

    def forward(self, x):
        for m in self:
            x = m(x)
        return x


class ModuleDict(Module):
    """A dict of modules, registered as children under their keys, in insertion order.

    Look children up with ``d[key]`` (they are not attributes, so any key is safe).
    """

    _children_are_attributes = False

    def __init__(self, modules=None):
        super().__init__()
        if modules is not None:
            self.update(modules)

    def __getitem__(self, key: str) -> Module:
        try:
            return self._modules[key]
        except KeyError:
            raise KeyError(f"ModuleDict has no key {key!r}; keys: {list(self._modules)}") from None

    def __setitem__(self, key: str, module: Module):
        if not isinstance(key, str) or "." in key or not key:
            raise ValueError(f"ModuleDict keys must be non-empty strings without '.', got {key!r}")
        if not isinstance(module, Module):
            raise TypeError(f"ModuleDict holds Modules only, got {type(module).__name__} for key {key!r}")
        self.register_module(key, module)

    def __delitem__(self, key: str):
        delattr(self, key)

    def __contains__(self, key) -> bool:
        return key in self._modules

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules)

    def keys(self):
        """The keys, in insertion order."""
        return self._modules.keys()

    def values(self):
        """The modules, in insertion order."""
        return self._modules.values()

    def items(self):
        """``(key, module)`` pairs, in insertion order."""
        return self._modules.items()

    def update(self, modules):
        """Add every ``(key, module)`` of a mapping or an iterable of pairs."""
        pairs = modules.items() if hasattr(modules, "items") else modules
        for key, module in pairs:
            self[key] = module

    def forward(self, *args, **kwargs):
        raise NotImplementedError("ModuleDict has no forward(): look modules up by key")
