"""The ``Optimizer`` base class and the usual GPT parameter groups.

An optimizer holds *named* parameters: every piece of state is keyed by the
parameter's dotted name (``h.0.mlp.c_fc.weight``), never by ``id()``, so a
checkpoint saved on one run (or rank) loads on another. ``param_groups`` is a
list of dicts, each with ``"params"`` (a list of ``(name, Parameter)``) and its
hyper-parameters (``"lr"``, ``"weight_decay"``, ...); a schedule sets
``group["lr"]`` (or calls ``set_lr``) before each ``step()``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from autograd import backend
from autograd.tensor import Tensor

from ..module import Module


class Optimizer:
    """Base class: parameter groups, named state, ``zero_grad``, ``state_dict`` / ``load_state_dict``.

    ``params`` is ``model.named_parameters()`` (an iterable of ``(name, Parameter)``),
    a Module (its ``named_parameters()`` are used), or a list of group dicts
    ``{"params": [(name, p), ...], "weight_decay": 0.0, ...}`` whose missing
    hyper-parameters come from ``defaults``. Subclasses write ``step()``, and
    list in ``state_keys`` the per-parameter arrays they keep (each of the
    parameter's shape).
    """

    #: names of the per-parameter state arrays (each of the parameter's shape)
    state_keys: tuple = ()

    def __init__(self, params, defaults: dict):
        self.defaults = dict(defaults)
        self.param_groups: list[dict] = []
        self.state: dict[str, dict] = {}
        self.step_count = 0  # number of step() calls
        self._names: set[str] = set()
        self._ids: set[int] = set()
        for group in _as_groups(params):
            self.add_param_group(group)

    # -- groups ----------------------------------------------------------------
    def add_param_group(self, group: dict):
        """Add a group ``{"params": [(name, p), ...], hyper-parameter: value, ...}`` (defaults fill the rest)."""
        if not isinstance(group, Mapping) or "params" not in group:
            raise TypeError("a parameter group is a dict with a 'params' key: {'params': [(name, p), ...], ...}")
        group = dict(group)
        pairs = list(group["params"].items()) if isinstance(group["params"], Mapping) else list(group["params"])
        checked = []
        for item in pairs:
            if isinstance(item, Tensor):
                raise TypeError("optimizers need named parameters (their state is keyed by name): pass "
                                "model.named_parameters() or [(name, p), ...], not bare parameters")
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
                    and isinstance(item[1], Tensor)):
                raise TypeError(f"each parameter must be a (name, Parameter) pair, got {item!r:.80}")
            name, p = item
            if name in self._names:
                raise ValueError(f"parameter name {name!r} appears twice in the optimizer's groups")
            if id(p) in self._ids:
                raise ValueError(f"parameter {name!r} is the same object as an earlier one (tied weights?): "
                                 "list it once (named_parameters() already removes duplicates)")
            if not p.is_leaf:
                raise ValueError(f"parameter {name!r} is not a leaf tensor (it was computed by an op); "
                                 "optimize leaves (nn.Parameter)")
            if p.dtype.kind != "f":
                raise TypeError(f"parameter {name!r} has dtype {p.dtype}; only floating tensors can be optimized")
            self._names.add(name)
            self._ids.add(id(p))
            checked.append((name, p))
        group["params"] = checked
        for key, value in self.defaults.items():
            group.setdefault(key, value)
        self._validate_group(group)
        self.param_groups.append(group)

    def _validate_group(self, group: dict):
        """Check a group's hyper-parameters (subclasses extend it)."""
        if group["lr"] < 0:
            raise ValueError(f"learning rate must be >= 0, got {group['lr']}")
        if group.get("weight_decay", 0.0) < 0:
            raise ValueError(f"weight_decay must be >= 0, got {group['weight_decay']}")

    def named_parameters(self):
        """Yield ``(name, parameter)`` over all groups, in order."""
        for group in self.param_groups:
            yield from group["params"]

    def set_lr(self, lr: float):
        """Set the learning rate of every group (what a schedule calls each step)."""
        for group in self.param_groups:
            group["lr"] = float(lr)

    def zero_grad(self):
        """Reset every parameter's ``.grad`` to None."""
        for _, p in self.named_parameters():
            p.grad = None

    def step(self):  # pragma: no cover - abstract
        """Update every parameter that has a gradient (parameters whose ``.grad`` is None are skipped)."""
        raise NotImplementedError

    def _state_dtype(self, p):
        """State arrays are float32 for float16/bfloat16 parameters, else the parameter's own dtype."""
        return np.promote_types(p.dtype, np.float32)

    # -- checkpoints -----------------------------------------------------------
    def state_dict(self) -> dict:
        """``{"step": int, "state": {name: {key: array or int}}, "param_groups": [{hyper-params, "params": [names]}]}``.

        Plain arrays, numbers and lists only (no pickle needed to save it). The
        arrays are the live ones, not copies (copy them for a snapshot).
        """
        groups = []
        for group in self.param_groups:
            g = {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items() if k != "params"}
            g["params"] = [name for name, _ in group["params"]]
            groups.append(g)
        state = {name: dict(entry) for name, entry in self.state.items()}
        return {"step": int(self.step_count), "state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict):
        """Restore the state saved by ``state_dict()``; arrays are copied, cast and moved to each parameter's device.

        Raises one ValueError listing every problem: a different number of
        groups, names the optimizer does not know, names it has that the
        checkpoint lacks, parameters in a different group, unknown or missing
        state keys, and wrongly shaped arrays. Nothing changes when it raises.
        """
        for key in ("state", "param_groups"):
            if key not in state_dict:
                raise ValueError(f"optimizer state_dict has no {key!r} entry; expected one from Optimizer.state_dict()")
        saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
        problems = []
        if len(saved_groups) != len(self.param_groups):
            problems.append(f"the checkpoint has {len(saved_groups)} parameter group(s), this optimizer has "
                            f"{len(self.param_groups)}: build the optimizer with the same groups as when it was saved")
        params = dict(self.named_parameters())
        saved_names = [n for g in saved_groups for n in g["params"]]
        unknown = [n for n in saved_names if n not in params]
        unknown += [n for n in saved_state if n not in params and n not in saved_names]
        missing = [n for n in params if n not in set(saved_names)]
        if unknown:
            problems.append(f"unknown parameter names ({len(unknown)}): " + ", ".join(unknown))
        if missing:
            problems.append(f"parameters missing from the checkpoint ({len(missing)}): " + ", ".join(missing))
        if not problems:
            for i, (ours, theirs) in enumerate(zip(self.param_groups, saved_groups)):
                moved = sorted(set(n for n, _ in ours["params"]) ^ set(theirs["params"]))
                if moved:
                    problems.append(f"group {i} holds different parameters in the checkpoint: " + ", ".join(moved))
        for name, entry in saved_state.items():
            if name not in params:
                continue
            p = params[name]
            arrays = {k for k, v in entry.items() if backend.is_array(v) or isinstance(v, (list, Tensor))}
            extra = sorted(arrays - set(self.state_keys))
            if extra:
                problems.append(f"{name}: unknown state keys {extra} (this optimizer keeps {list(self.state_keys)})")
            for k in self.state_keys:
                if k not in entry:
                    if self._state_key_required(k):
                        problems.append(f"{name}: state key {k!r} is missing")
                    continue
                shape = tuple(np.shape(entry[k].data if isinstance(entry[k], Tensor) else entry[k]))
                if shape != tuple(p.shape):
                    problems.append(f"{name}.{k}: checkpoint shape {shape} vs parameter shape {tuple(p.shape)}")
        if problems:
            raise ValueError(f"{type(self).__name__}.load_state_dict failed:\n  " + "\n  ".join(problems))

        for ours, theirs in zip(self.param_groups, saved_groups):
            for k, v in theirs.items():
                if k != "params":
                    ours[k] = tuple(v) if isinstance(v, list) else v
        new_state = {}
        for name, entry in saved_state.items():
            p = params[name]
            dtype = self._state_dtype(p)
            out = {}
            for k, v in entry.items():
                if k in self.state_keys:
                    v = v.data if isinstance(v, Tensor) else v
                    v = v if backend.is_array(v) else np.asarray(v)
                    v = backend.to_device(v, p.device)
                    out[k] = v.astype(dtype, copy=True)  # our own copy, never aliasing the checkpoint
                else:
                    out[k] = int(v) if isinstance(v, (int, np.integer)) else v
            new_state[name] = out
        self.state = new_state
        self.step_count = int(state_dict.get("step", 0))

    def _state_key_required(self, key: str) -> bool:
        """Whether every saved entry must have ``key`` (SGD's momentum buffer exists only with momentum)."""
        return True

    def __repr__(self):
        lines = [f"{type(self).__name__}("]
        for i, group in enumerate(self.param_groups):
            hyper = ", ".join(f"{k}={v}" for k, v in group.items() if k != "params")
            lines.append(f"  group {i}: {len(group['params'])} parameters, {hyper}")
        return "\n".join(lines) + "\n)"


def _as_groups(params) -> list:
    """Normalise the accepted forms of ``params`` to a list of group dicts."""
    if isinstance(params, Module):
        return [{"params": list(params.named_parameters())}]
    if isinstance(params, Mapping):
        return [params] if "params" in params else [{"params": list(params.items())}]
    if isinstance(params, Tensor):
        raise TypeError("optimizers need named parameters: pass model.named_parameters(), not one tensor")
    items = list(params)
    if not items:
        raise ValueError("the optimizer got an empty parameter list")
    if all(isinstance(x, Mapping) for x in items):
        return items
    if any(isinstance(x, Mapping) for x in items):
        raise TypeError("pass either (name, parameter) pairs or a list of group dicts, not a mix")
    return [{"params": items}]


def _grad_of(name, p, xp_dtype):
    """``p.grad`` checked for shape, as ``xp_dtype`` (a copy only when the dtype differs)."""
    g = p.grad
    if g.shape != p.shape:
        raise ValueError(f"gradient of {name!r} has shape {g.shape}, but the parameter has shape {p.shape}")
    return g.astype(xp_dtype, copy=False)


def param_groups_for_gpt(model: Module, weight_decay: float, decay_embeddings: bool = False) -> list[dict]:
    """The usual GPT split: ``[{"params": decayed, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]``.

    Decayed: parameters with 2 or more dimensions (the matrix-product weights).
    Not decayed: biases and norm gains (1-D) and any parameter marked
    ``no_decay=True`` (``Embedding`` marks its table), following the issue's
    default of no decay on biases, norms and embeddings. ``decay_embeddings=True``
    decays ``Embedding`` tables too (nanoGPT does). Frozen parameters are left out.
    Both groups are always returned (possibly empty), so checkpoints line up.
    """
    from ..layers.basic import Embedding

    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, Embedding)}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or (getattr(p, "no_decay", False) and not (decay_embeddings and id(p) in embedding_ids))
        (no_decay if skip else decay).append((name, p))
    return [{"params": decay, "weight_decay": float(weight_decay)}, {"params": no_decay, "weight_decay": 0.0}]
