"""ZeRO stage 1 (Rajbhandari et al. 2020): AdamW whose state is sharded over the data-parallel ranks.

Plain data parallelism keeps a full copy of the optimizer state on every rank:
AdamW's two moments (2 x 4 bytes per float32 weight) and, with mixed precision,
the float32 master weights (4 more): 12 bytes per weight against the 2 of the
float16 weights themselves. Stage 1 gives each of N ranks 1/N of that state:

    flat    all trainable parameters, one after another (optimizer-group order), padded with
            zeros to a multiple of N; rank r owns elements [r*c, (r+1)*c), c = ceil(n / N)
    step    1. reduce-scatter of the flat gradient: rank r receives the averaged (or summed)
               gradient of its shard only
            2. (loss scaling) unscale, check for inf/NaN, agree across ranks, maybe skip
            3. (clipping) the global norm is an all-reduce of the shards' sums of squares
            4. AdamW on the shard: its moments, its master weights (float32), per parameter
               segment with that parameter's group's lr / weight decay / betas and step count
            5. all-gather of the updated shards into every rank's full parameters

Each rank ends the step with the same full parameters as a single process running
``nn.optim.AdamW`` on the whole batch (up to the rounding of the gradient sum).
Gradients are still full-size on every rank (that is stage 2's saving), and the
flat gradient buffer is reused as the all-gather's destination.

Use it *instead of* ``DataParallel``'s gradient averaging (it reduces the
gradients itself); the model must start identical on every rank, which the
constructor ensures by broadcasting rank 0's parameters::

    opt = ZeroAdamW(nn.optim.param_groups_for_gpt(model, 0.1), comm, lr=6e-4)
    loss.backward()          # local gradients; accumulate micro-batches freely
    opt.step()               # reduce-scatter, update the shard, all-gather
    opt.zero_grad()

Mixed precision: ``ZeroAdamW(..., compute_dtype="float16")`` built on a float32
model takes the float32 master shard from the float32 weights, then casts the
model's parameters to float16 in place (as ``nn.amp.MixedPrecision`` does, whose
masters it replaces). ``step(scaler=DynamicLossScaler())`` unscales and skips
overflowing steps, the same decision on every rank.

Checkpoints: ``state_dict()`` (a collective call) gathers the shards into the
format of ``nn.optim.AdamW.state_dict()``, keyed by parameter name, plus
``"master"``; any world size, and a plain ``AdamW``, can load it.
``load_state_dict`` re-shards for this communicator's size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from autograd.backend import get_array_module
from nn.optim.adamw import AdamW, adamw_update_
from nn.optim.optimizer import Optimizer

from .comm import Communicator, get_world
from .ddp import REDUCTIONS, agree_found_inf, check_replicas_agree

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
# the optimizer
# ---------------------------------------------------------------------------


class ZeroAdamW(AdamW):
    """``nn.optim.AdamW`` with its state sharded over ``comm`` (ZeRO stage 1); see the module docstring.

    ``params`` and the hyper-parameters are AdamW's (named parameters or group
    dicts with their own lr / weight_decay / betas / eps). Construction is a
    collective call: every rank must pass the same parameter names, shapes,
    dtypes and groups (a ValueError on every rank otherwise); rank 0's parameter
    values are broadcast unless ``broadcast=False``. All parameters must share
    one dtype. ``reduction``: "mean" (gradients averaged over ranks) or "sum"
    (the loss already divides by a global count; see ``parallel.ddp``).
    ``compute_dtype="float16"``: mixed precision (float32 master shard, model
    cast to float16). ``step()`` returns whether the update was applied.
    """

    def __init__(self, params, comm: Communicator | None = None, lr: float = 1e-3, betas=(0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.1, reduction: str = "mean", compute_dtype=None,
                 broadcast: bool = True):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.comm = get_world() if comm is None else comm
        self.reduction = reduction
        self._params = []  # (name, parameter, group index), flat order
        for gi, group in enumerate(self.param_groups):
            self._params.extend((name, p, gi) for name, p in group["params"])
        dtypes = sorted({str(p.dtype) for _, p, _ in self._params})
        if len(dtypes) > 1:
            raise TypeError(f"ZeroAdamW needs parameters of one dtype, got {dtypes}: cast the model first "
                            "(model.to('float32')), or pass compute_dtype='float16' for mixed precision")
        spec = [("parameter", name, tuple(p.shape), str(p.dtype), gi) for name, p, gi in self._params]
        check_replicas_agree(self.comm, spec, what="set of optimized parameters")
        for _, p, _ in self._params:
            if not p.data.flags.c_contiguous:
                p.data = get_array_module(p.data).ascontiguousarray(p.data)
            if broadcast and self.comm.size > 1:
                self.comm.bcast(p.data, 0)

        first = self._params[0][1].data if self._params else np.zeros(0, np.float32)
        xp = self.xp = get_array_module(first)
        self.state_dtype = np.dtype(np.promote_types(first.dtype, np.float32))
        self.layout = FlatLayout([(name, p.size, gi) for name, p, gi in self._params], self.comm.size)
        self.pieces = self.layout.pieces(self.comm.rank)
        chunk = self.layout.chunk

        # the sharded state: two moments, and the master weights when the parameters are narrower
        self.exp_avg = xp.zeros(chunk, dtype=self.state_dtype)
        self.exp_avg_sq = xp.zeros(chunk, dtype=self.state_dtype)
        self.param_steps = [0] * len(self._params)
        self.master = None
        if compute_dtype is not None:
            cdt = np.dtype(compute_dtype)
            if cdt.kind != "f":
                raise ValueError(f"compute_dtype must be a floating dtype, got {cdt}")
            if cdt.itemsize < self.state_dtype.itemsize or first.dtype.itemsize < self.state_dtype.itemsize:
                self.master = self._shard_of_params()  # float32 copy of this rank's part of the weights
            for _, p, _ in self._params:
                if p.dtype != cdt:
                    p.data = p.data.astype(cdt)
                    if p.grad is not None:
                        p.grad = p.grad.astype(cdt)
            self.param_dtype = cdt
        else:
            self.param_dtype = np.dtype(first.dtype)
            if self.param_dtype.itemsize < self.state_dtype.itemsize:
                self.master = self._shard_of_params()
        self._flat_grad = None  # (padded,) gradient buffer, reused as the all-gather destination
        self._shard_grad = xp.empty(chunk, dtype=self.state_dtype)
        self.last_grad_norm = None

    # -- memory ------------------------------------------------------------------
    def state_bytes(self) -> int:
        """Bytes of optimizer state held by this rank: the two moment shards and the master shard."""
        n = self.exp_avg.nbytes + self.exp_avg_sq.nbytes
        return n + (self.master.nbytes if self.master is not None else 0)

    # -- flat packing --------------------------------------------------------------
    def _shard_of_params(self):
        """This rank's shard of the flat parameters, as a fresh array of the state dtype (padding 0)."""
        w = self.xp.zeros(self.layout.chunk, dtype=self.state_dtype)
        for pc in self.pieces:
            p = self._params[pc.param][1]
            w[pc.shard_lo:pc.shard_hi] = p.data.reshape(-1)[pc.param_lo:pc.param_hi]  # flat (numel,) slice
        return w

    def _pack_grads(self):
        """The flat padded gradient (zeros where a parameter has none) and the per-parameter has-grad flags."""
        xp = self.xp
        if self._flat_grad is None or get_array_module(self._flat_grad) is not xp:
            self._flat_grad = xp.empty(self.layout.padded, dtype=self.state_dtype)  # (padded,)
        flat = self._flat_grad
        has = np.zeros(len(self._params), dtype=np.int32)
        for i, ((name, p, _), off, n) in enumerate(zip(self._params, self.layout.offsets, self.layout.sizes)):
            g = p.grad
            if g is None:
                flat[off:off + n] = 0
                continue
            if g.shape != p.shape:
                raise ValueError(f"gradient of {name!r} has shape {g.shape}, but the parameter has shape {p.shape}")
            flat[off:off + n] = g.reshape(-1)  # (n,), cast to the state dtype
            has[i] = 1
        flat[self.layout.numel:] = 0
        return flat, has

    # -- the step ------------------------------------------------------------------
    def step(self, scaler=None, max_norm: float | None = None) -> bool:
        """Reduce-scatter the gradients, update this rank's shard with AdamW, all-gather the parameters.

        ``scaler``: an ``nn.amp.DynamicLossScaler`` whose scale multiplied the
        loss: the gradients are divided by it, an inf/NaN on any rank skips the
        step on every rank, and ``scaler.update`` is called. ``max_norm``: clip
        to this global L2 norm (kept in ``last_grad_norm``). Returns True when the
        parameters were updated. A collective call.
        """
        comm = self.comm
        flat, has = self._pack_grads()
        any_grad = comm.allreduce(has, op="max") if comm.size > 1 else has
        g = comm.reduce_scatter(flat, op=self.reduction, out=self._shard_grad)  # (chunk,)
        xp = self.xp
        self.last_grad_norm = None
        if scaler is not None and scaler.enabled:
            g *= 1.0 / scaler.get_scale()  # a Python float: keeps the dtype
            with _quiet(xp):
                found = not bool(xp.isfinite(g).all())
            if not scaler.update(agree_found_inf(comm, found)):
                return False
        if max_norm is not None:
            if max_norm <= 0:
                raise ValueError(f"max_norm must be > 0, got {max_norm}")
            local = float(xp.vdot(g, g))
            norm = math.sqrt(comm.allreduce(local, op="sum"))
            self.last_grad_norm = norm
            if math.isfinite(norm) and norm > max_norm:
                g *= max_norm / (norm + 1e-6)  # torch's clip_grad_norm_ formula
        self.step_count += 1
        for i in range(len(self._params)):
            if any_grad[i]:
                self.param_steps[i] += 1
        w = self.master if self.master is not None else self._shard_of_params()
        self._update_shard(w, g, any_grad)
        self._gather_params(w)
        return True

    def _update_shard(self, w, g, any_grad):
        """AdamW on every piece of this rank's shard, the arithmetic of ``nn.optim.AdamW.step`` in the same order."""
        xp = self.xp
        for pc in self.pieces:
            if not any_grad[pc.param]:
                continue  # no rank had a gradient: skipped, as AdamW skips grad None
            group = self.param_groups[pc.group]
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            t = self.param_steps[pc.param]
            s = slice(pc.shard_lo, pc.shard_hi)
            ws, gs, m, v = w[s], g[s], self.exp_avg[s], self.exp_avg_sq[s]
            adamw_update_(xp, ws, m, v, gs, xp.empty_like(ws), lr, b1, b2, eps, wd, t)

    def _gather_params(self, w):
        """All-gather the updated shards (in the parameters' dtype) and write them into every parameter."""
        send = w.astype(self.param_dtype) if w.dtype != self.param_dtype else w  # (chunk,)
        nbytes = self.layout.padded * self.param_dtype.itemsize
        # the flat gradient is consumed: its memory receives the gathered parameters
        full = self._flat_grad.view(np.uint8)[:nbytes].view(self.param_dtype)  # (padded,)
        self.comm.allgather(send, out=full)
        for (_, p, _), off, n in zip(self._params, self.layout.offsets, self.layout.sizes):
            p.data[...] = full[off:off + n].reshape(p.shape)  # (n,) -> p.shape

    # -- checkpoints ---------------------------------------------------------------
    def _gather_full(self, shard):
        """All-gather a state shard into the full flat vector (padded,)."""
        return self.comm.allgather(shard).reshape(-1)  # (padded,)

    def state_dict(self) -> dict:
        """The full, rank-independent state (a collective call: every rank gets the same dict).

        ``nn.optim.AdamW``'s format: ``{"step", "state": {name: {"step", "exp_avg",
        "exp_avg_sq"}}, "param_groups"}`` (only parameters that have been stepped
        have state), plus ``"master": {name: float32 array}`` when master weights
        are kept. Arrays are fresh copies.
        """
        out = Optimizer.state_dict(self)  # step and param_groups (self.state is empty: the state is sharded)
        m_full = self._gather_full(self.exp_avg)
        v_full = self._gather_full(self.exp_avg_sq)
        state = {}
        for i, ((name, p, _), off, n) in enumerate(zip(self._params, self.layout.offsets, self.layout.sizes)):
            if self.param_steps[i] == 0:
                continue
            state[name] = {"step": int(self.param_steps[i]),
                           "exp_avg": m_full[off:off + n].reshape(p.shape).copy(),  # (n,) -> p.shape
                           "exp_avg_sq": v_full[off:off + n].reshape(p.shape).copy()}
        out["state"] = state
        if self.master is not None:
            w_full = self._gather_full(self.master)
            out["master"] = {name: w_full[off:off + n].reshape(p.shape).copy()
                             for (name, p, _), off, n in zip(self._params, self.layout.offsets, self.layout.sizes)}
        return out

    def load_state_dict(self, state_dict: dict):
        """Load a full state (``state_dict()`` from any world size, or a plain ``AdamW``'s); keep this rank's shard.

        Validation is ``AdamW.load_state_dict``'s (one ValueError listing every
        problem). Master weights come from ``state_dict["master"]`` when present
        (and are rounded into the parameters), otherwise from the current
        parameters: load the model's weights first.
        """
        AdamW.load_state_dict(self, state_dict)  # validates; fills self.state with full arrays and the groups
        full = self.state
        self.state = {}
        self.exp_avg[...] = 0
        self.exp_avg_sq[...] = 0
        self.param_steps = [0] * len(self._params)
        for i, (name, _, _) in enumerate(self._params):
            if name in full:
                self.param_steps[i] = int(full[name].get("step", 0))
        for pc in self.pieces:
            entry = full.get(self._params[pc.param][0])
            if entry is None:
                continue
            s = slice(pc.shard_lo, pc.shard_hi)
            self.exp_avg[s] = entry["exp_avg"].reshape(-1)[pc.param_lo:pc.param_hi]  # flat (numel,) slice
            self.exp_avg_sq[s] = entry["exp_avg_sq"].reshape(-1)[pc.param_lo:pc.param_hi]
        master = state_dict.get("master")
        if self.master is not None:
            if master:
                missing = [name for name, _, _ in self._params if name not in master]
                if missing:
                    raise ValueError(f"ZeroAdamW.load_state_dict: master weights missing for {missing}")
                for name, p, _ in self._params:
                    value = master[name]
                    value = value if get_array_module(value) is self.xp else self.xp.asarray(value)
                    if tuple(value.shape) != tuple(p.shape):
                        raise ValueError(f"master {name}: checkpoint shape {tuple(value.shape)} vs parameter "
                                         f"shape {tuple(p.shape)}")
                    p.data[...] = value  # rounded into the compute dtype
                self.master[...] = 0
                for pc in self.pieces:
                    value = master[self._params[pc.param][0]]
                    value = value if get_array_module(value) is self.xp else self.xp.asarray(value)
                    self.master[pc.shard_lo:pc.shard_hi] = value.reshape(-1)[pc.param_lo:pc.param_hi]  # (numel,)
            else:
                self.master = self._shard_of_params()


def _quiet(xp):
    """Silence NumPy's inf/NaN warnings (an overflow is expected and handled)."""
    import contextlib

    return xp.errstate(over="ignore", invalid="ignore") if hasattr(xp, "errstate") else contextlib.nullcontext()


__all__ = ["ZeroAdamW", "FlatLayout", "Piece"]
