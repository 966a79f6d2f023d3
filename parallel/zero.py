"""ZeRO stage 1 (Rajbhandari et al. 2020): the optimizer's state sharded over the data-parallel ranks.

Plain data parallelism keeps a full copy of the optimizer state on every rank:
AdamW's two moments (2 x 4 bytes per float32 weight) and, with mixed precision,
the float32 master weights (4 more): 12 bytes per weight against the 2 of the
float16 weights themselves. Stage 1 gives each of N ranks 1/N of that state.
``ShardedMasters`` is the master weights (``nn.amp.MasterWeights``'s interface)
of this rank's shard; a plain ``nn.optim.AdamW`` over them keeps moments for
the shard only:

    flat    all trainable parameters, one after another (in the model's order), padded with
            zeros to a multiple of N; rank r owns elements [r*c, (r+1)*c), c = ceil(n / N)
    masters float32, one flat array of c elements; each parameter's part of it is one master
            Parameter (a view) under the parameter's name, so AdamW's state stays keyed by name
    step    1. reduce-scatter of the flat gradient (summed over ranks: the loss is already
               divided by the global count): rank r receives its shard's gradient only
               (``grads_from_model``, through ``nn.amp.MixedPrecision.step`` like any masters)
            2. unscale, check for inf/NaN, agree across ranks, maybe skip; clip by the global
               norm (every rank's shard counted once)
            3. AdamW on the shard's master pieces (each piece with its parameter's group)
            4. all-gather of the updated shards into every rank's full parameters (``copy_to_model``)

Each rank ends the step with the same full parameters as a single process running
``nn.optim.AdamW`` on the whole batch (up to the rounding of the gradient sum).
Gradients are still full-size on every rank (that is stage 2's saving), and the
flat gradient buffer is reused as the all-gather's destination. Use it *instead
of* ``DataParallel``'s all-reduce: it reduces the gradients itself.

    masters = ShardedMasters(model.named_parameters(), dp_comm)   # from the float32 model
    mp = nn.amp.MixedPrecision(model, "fp16", masters=masters)
    opt = nn.optim.AdamW(mp.param_groups_for_gpt(0.1), lr=6e-4)
    loss.backward(); mp.step(opt, 1.0, agree_found_inf=..., grad_norm=...)

Checkpoints: ``full_state(optimizer)`` (a collective call) gathers the shards into
per-parameter arrays in ``nn.optim.AdamW.state_dict()``'s format plus the float32
masters, so the file is the single-process one; ``load_full_state`` takes such a
state from any world size (or from a run without ZeRO) and keeps this rank's shard.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from autograd.backend import get_array_module
from nn.module import Parameter

from .comm import Communicator
from .ddp import check_replicas_agree

# ---------------------------------------------------------------------------
# the flat layout (pure: unit-tested without MPI)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Piece:
    """The part of parameter ``param`` that lies in one rank's shard.

    Shard elements ``[shard_lo, shard_hi)`` hold the parameter's flat elements
    ``[param_lo, param_hi)``; ``group`` is the parameter's optimizer group.
    """

    param: int
    group: int
    shard_lo: int
    shard_hi: int
    param_lo: int
    param_hi: int


class FlatLayout:
    """Where each parameter lies in the flat vector and which rank owns which part of it.

    ``entries``: ``[(name, numel, group_index)]`` in flat order. ``world``: the
    number of shards. ``numel`` real elements, ``padded`` = ``world * chunk``
    with ``chunk`` = ceil(numel / world); the padding sits at the end of the
    last shard(s) and belongs to no parameter.
    """

    def __init__(self, entries, world: int):
        if world < 1:
            raise ValueError(f"world size must be >= 1, got {world}")
        self.names = [e[0] for e in entries]
        self.sizes = [int(e[1]) for e in entries]
        self.groups = [int(e[2]) for e in entries]
        self.offsets = list(np.cumsum([0] + self.sizes[:-1])) if entries else []
        self.offsets = [int(o) for o in self.offsets]
        self.numel = int(sum(self.sizes))
        self.world = int(world)
        self.chunk = max(1, -(-self.numel // self.world))
        self.padded = self.chunk * self.world

    def shard(self, rank: int) -> tuple:
        """``(lo, hi)``: the flat elements rank ``rank`` owns."""
        return rank * self.chunk, (rank + 1) * self.chunk

    def pieces(self, rank: int) -> list:
        """The ``Piece``\\ s of every parameter that overlaps rank ``rank``'s shard, in flat order."""
        lo, hi = self.shard(rank)
        out = []
        for i, (off, n) in enumerate(zip(self.offsets, self.sizes)):
            a, b = max(lo, off), min(hi, off + n)
            if a < b:
                out.append(Piece(i, self.groups[i], a - lo, b - lo, a - off, b - off))
        return out

    def group_mask(self, rank: int, values) -> np.ndarray:
        """A per-element array over rank ``rank``'s shard: ``values[group]`` on each piece, 0 on padding.

        (e.g. ``values`` = each group's weight decay gives the shard's decay mask.)
        """
        mask = np.zeros(self.chunk, dtype=np.float64)
        for pc in self.pieces(rank):
            mask[pc.shard_lo:pc.shard_hi] = values[pc.group]
        return mask


# ---------------------------------------------------------------------------
# the sharded master weights
# ---------------------------------------------------------------------------


class ShardedMasters:
    """This rank's shard of the float32 master weights, with ``nn.amp.MasterWeights``'s interface (ZeRO-1).

    ``named_params``: the float32 model's parameters (the trainable floating
    ones are sharded, in this order); ``comm``: the data-parallel group.
    Construction is a collective call: every rank must hold the same parameter
    names, shapes and dtypes (a ValueError on every rank otherwise).
    ``named_parameters()`` gives one master Parameter per parameter that
    overlaps this rank's shard, under the parameter's name and with its
    ``no_decay`` flag: a view of the part it owns (shape ``(piece,)``).
    """

    sharded = True
    copies = True

    def __init__(self, named_params, comm: Communicator, master_dtype=np.float32):
        self.comm = comm
        self.master_dtype = np.dtype(master_dtype)
        self.params = [(name, p) for name, p in named_params if p.requires_grad and p.dtype.kind == "f"]
        spec = [("parameter", name, tuple(p.shape), str(p.dtype)) for name, p in self.params]
        check_replicas_agree(comm, spec, what="set of trained parameters")
        dtypes = sorted({str(p.dtype) for _, p in self.params})
        if len(dtypes) > 1:
            raise TypeError(f"ShardedMasters needs parameters of one dtype, got {dtypes}: cast the model first "
                            "(model.to('float32'))")
        first = self.params[0][1].data if self.params else np.zeros(0, np.float32)
        xp = self.xp = get_array_module(first)
        self.layout = FlatLayout([(name, p.size, 0) for name, p in self.params], comm.size)
        self.pieces = self.layout.pieces(comm.rank)
        self.shard = xp.zeros(self.layout.chunk, dtype=self.master_dtype)  # (chunk,): this rank's masters
        self.shard_grad = xp.zeros(self.layout.chunk, dtype=self.master_dtype)  # (chunk,)
        self._flat = None  # (padded,) gradient buffer, reused as the all-gather's destination
        self.pairs = []  # (name, model parameter, master piece)
        for pc in self.pieces:
            name, p = self.params[pc.param]
            self.shard[pc.shard_lo:pc.shard_hi] = p.data.reshape(-1)[pc.param_lo:pc.param_hi]  # flat (numel,)
            master = Parameter(self.shard[pc.shard_lo:pc.shard_hi], no_decay=getattr(p, "no_decay", False), name=name)
            self.pairs.append((name, p, master))
        self._master_of = {id(p): m for _, p, m in self.pairs}
        self._has_grad = np.zeros(len(self.params), dtype=np.int32)

    def named_parameters(self) -> list:
        """``[(name, master piece)]`` for the parameters this rank's shard holds a part of, in the model's order."""
        return [(name, m) for name, _, m in self.pairs]

    def master_of(self, p):
        """The master piece of model parameter ``p`` on this rank (None: no part of it is here, or frozen)."""
        return self._master_of.get(id(p))

    def state_bytes(self) -> int:
        """Bytes of master weights this rank holds (1/N of the model's float32 weights)."""
        return int(self.shard.nbytes)

    def grads_from_model(self, inv_scale: float = 1.0) -> bool:
        """Reduce-scatter the model's gradients into the shard (summed over ranks), times ``inv_scale``.

        A collective call. Each piece's ``.grad`` becomes a view of the shard's
        gradient; a parameter no rank has a gradient for gets ``None`` (AdamW
        skips it, as a single process would). Returns whether this rank's part
        has an inf or NaN (combine it over the ranks: ``agree_found_inf``).
        """
        xp = self.xp
        if self._flat is None or get_array_module(self._flat) is not xp:
            self._flat = xp.empty(self.layout.padded, dtype=self.master_dtype)  # (padded,)
        flat = self._flat
        has = np.zeros(len(self.params), dtype=np.int32)
        for i, ((name, p), off, n) in enumerate(zip(self.params, self.layout.offsets, self.layout.sizes)):
            g = p.grad
            if g is None:
                flat[off:off + n] = 0
                continue
            if g.shape != p.shape:
                raise ValueError(f"gradient of {name!r} has shape {g.shape}, but the parameter has shape {p.shape}")
            flat[off:off + n] = g.reshape(-1)  # (n,), cast to float32
            has[i] = 1
        flat[self.layout.numel:] = 0
        self._has_grad = self.comm.allreduce(has, op="max") if self.comm.size > 1 else has
        g = self.comm.reduce_scatter(flat, op="sum", out=self.shard_grad)  # (chunk,)
        if inv_scale != 1.0:
            g *= inv_scale  # a Python float keeps float32
        for pc, (_, _, m) in zip(self.pieces, self.pairs):
            m.grad = g[pc.shard_lo:pc.shard_hi] if self._has_grad[pc.param] else None
        with np.errstate(over="ignore", invalid="ignore") if xp is np else _nullcontext():
            return not bool(xp.isfinite(g.sum(dtype=np.float32)))

    def copy_to_model(self):
        """All-gather the updated shards, in the parameters' dtype, into every rank's full parameters (collective)."""
        dtype = self.params[0][1].dtype if self.params else self.master_dtype
        send = self.shard.astype(dtype) if dtype != self.master_dtype else self.shard  # (chunk,)
        if self._flat is None:
            self._flat = self.xp.empty(self.layout.padded, dtype=self.master_dtype)
        nbytes = self.layout.padded * np.dtype(dtype).itemsize
        full = self._flat.view(np.uint8)[:nbytes].view(dtype)  # (padded,): the consumed gradient's memory
        self.comm.allgather(send, out=full)
        for (_, p), off, n in zip(self.params, self.layout.offsets, self.layout.sizes):
            p.data[...] = full[off:off + n].reshape(p.shape)  # (n,) -> p.shape

    def zero_grad(self):
        """Drop the pieces' gradients."""
        for _, _, m in self.pairs:
            m.grad = None

    def __len__(self):
        return len(self.pairs)

    # -- checkpoints: full per-parameter arrays, whatever the world size ---------------------------------
    def _gather(self, shard):
        """All-gather a shard-shaped array into the full flat vector (padded,) on every rank."""
        return self.comm.allgather(shard).reshape(-1)  # (padded,)

    def _per_param(self, full):
        return {name: full[off:off + n].reshape(p.shape).copy()  # (n,) -> p.shape
                for (name, p), off, n in zip(self.params, self.layout.offsets, self.layout.sizes)}

    def state_dict(self) -> dict:
        """``{name: full float32 master}`` for every sharded parameter (a collective call)."""
        return self._per_param(self._gather(self.shard))

    def load_state_dict(self, master: dict):
        """Take this rank's part of full masters ``{name: array}`` (from any world size) and all-gather into the
        model. ValueError on missing or wrongly shaped entries (checked before anything changes)."""
        problems = [f"master weights missing for {name!r}" for name, _ in self.params if name not in master]
        problems += [f"master {name}: shape {tuple(np.shape(master[name]))} vs parameter shape {tuple(p.shape)}"
                     for name, p in self.params if name in master and tuple(np.shape(master[name])) != p.shape]
        if problems:
            raise ValueError("master weights do not fit:\n  " + "\n  ".join(problems))
        for pc in self.pieces:
            name, _ = self.params[pc.param]
            value = self.xp.asarray(master[name]).reshape(-1)[pc.param_lo:pc.param_hi]  # flat (numel,) slice
            self.shard[pc.shard_lo:pc.shard_hi] = value
        self.copy_to_model()

    def optimizer_state(self, optimizer, groups_by_name: list) -> dict:
        """The optimizer's state over the whole (stage of the) model, ``AdamW.state_dict()``'s format (collective).

        ``groups_by_name``: the full parameter names of each group, in order
        (the shard's groups list only the names it holds a part of). Moments
        are gathered into full per-parameter arrays; the per-parameter step
        counts are the same on every rank that holds a part.
        """
        sd = optimizer.state_dict()
        state = {}
        for key in optimizer.state_keys:
            packed = self.xp.zeros(self.layout.chunk, dtype=self.master_dtype)  # (chunk,)
            for pc, (name, _, _) in zip(self.pieces, self.pairs):
                entry = sd["state"].get(name)
                if entry is not None and key in entry:
                    packed[pc.shard_lo:pc.shard_hi] = entry[key]
            for name, value in self._per_param(self._gather(packed)).items():
                state.setdefault(name, {})[key] = value
        steps = {name: int(entry.get("step", 0)) for name, entry in sd["state"].items()}
        gathered = self.comm.allgather(steps) if self.comm.size > 1 else [steps]
        all_steps = {}
        for part in gathered:
            all_steps.update(part)
        state = {name: {"step": all_steps[name], **state[name]} for name, _ in self.params if name in all_steps}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": list(names)}
                  for g, names in zip(sd["param_groups"], groups_by_name)]
        return {"step": sd["step"], "state": state, "param_groups": groups}

    def shard_optimizer_state(self, full: dict) -> dict:
        """A full optimizer state (per-parameter arrays, any world size) cut to this rank's pieces: loads into the
        AdamW over ``named_parameters()``."""
        mine = {name for name, _, _ in self.pairs}
        state = {}
        for pc, (name, _, _) in zip(self.pieces, self.pairs):
            entry = full["state"].get(name)
            if entry is None:
                continue
            state[name] = {k: (np.asarray(v).reshape(-1)[pc.param_lo:pc.param_hi] if np.ndim(v) else v)
                           for k, v in entry.items()}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [n for n in g["params"] if n in mine]}
                  for g in full["param_groups"]]
        return {"step": full.get("step", 0), "state": state, "param_groups": groups}


def _nullcontext():
    import contextlib

    return contextlib.nullcontext()


__all__ = ["ShardedMasters", "FlatLayout", "Piece"]
