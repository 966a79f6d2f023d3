"""Data parallelism: every rank holds the whole model, sees its own slice of the batch, and averages gradients.

    comm = get_world()
    model = build_model()                       # any initialisation: rank 0's weights win
    ddp = DataParallel(model, comm)             # checks the replicas agree, broadcasts rank 0's weights
    opt = nn.optim.AdamW(model.named_parameters(), lr=...)
    for step in ...:
        x, y = my_slice_of(global_batch, comm.rank, comm.size)
        loss = cross_entropy(ddp(x), y)         # mean over this rank's (equal-sized) slice
        loss.backward()                         # buckets start their all-reduce as their grads become ready
        ddp.finish_grads()                      # wait; every rank now holds the averaged gradient
        opt.step(); opt.zero_grad()

How the gradients travel (PyTorch DDP's design, Li et al. 2020):

- Parameters are walked in ``named_parameters()`` order, the same on every
  rank, and packed into a few flat buckets (``bucket_mb`` each) in *reverse*
  order, which is roughly the order backward finishes their gradients.
- A post-accumulate-grad hook on every parameter counts the bucket's ready
  gradients; when a bucket is complete, it is packed into one contiguous
  float32 (float64 for float64 models) buffer and a non-blocking all-reduce is
  started, so communication overlaps the rest of the backward pass. Buckets are
  started strictly in index order (a complete bucket waits for the ones before
  it), because MPI matches collectives by call order on every rank.
- ``finish_grads()`` starts whatever is left (a parameter without a gradient,
  e.g. one not used this step, counts as zeros so that every rank sends the same
  buckets), waits for all of them and writes the result back into ``p.grad``. A
  parameter that had no gradient on *any* rank keeps ``grad = None`` (one flag
  per parameter travels in the same message), so the optimizer skips it exactly
  as a single process would.

Gradient accumulation: run all micro-batches but the last inside
``with ddp.no_sync():`` (gradients only add up locally), the last outside, then
``finish_grads()``: one all-reduce per step.

Two ways to normalise the loss:

- ``reduction="mean"`` (default): each rank's loss is the mean over its own
  examples and the gradients are averaged over ranks. Equal to one process
  with the whole batch when every rank has the same number of examples.
- ``reduction="sum"``: for language models, where ranks hold different numbers
  of non-ignored target tokens. Each rank divides the *sum* of its token losses
  by the *global* token count and the gradients are summed::

      n_global = global_token_count(comm, int((y != ignore_index).sum()))
      loss = cross_entropy(logits, y, reduction="sum") / n_global
      loss.backward(); ddp.finish_grads()          # ddp built with reduction="sum"
      global_loss = comm.allreduce(loss.item())    # for logging

  The sum over ranks of these losses is the single-process mean loss over all
  tokens, and so is the sum of the gradients.

Mixed precision: after ``finish_grads()`` every rank holds the same reduced
gradients (an inf or NaN on any rank spreads to all through the sum), so
``MixedPrecision.step`` takes the same skip decision everywhere. Where the
check is made on rank-local values, combine it with ``agree_found_inf``.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field

import numpy as np

from autograd.backend import get_array_module, to_device

from .comm import Communicator, get_world

REDUCTIONS = ("mean", "sum")


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def global_token_count(comm: Communicator, local_count) -> int:
    """The number of (non-ignored) target tokens over all ranks: the loss normaliser of ``reduction="sum"``."""
    return int(comm.allreduce(int(local_count), op="sum"))


def agree_found_inf(comm: Communicator, found_inf) -> bool:
    """True on every rank if any rank found an inf or NaN (an all-reduce of the flag with max).

    With it all ranks skip the same step and lower the loss scale together,
    so the replicas and their scalers stay identical.
    """
    return bool(comm.allreduce(int(bool(found_inf)), op="max"))


def _spec(module) -> list:
    """``[(kind, name, shape, dtype)]`` for every parameter and persistent buffer, in traversal order."""
    out = [("parameter", name, tuple(p.shape), str(p.dtype)) for name, p in module.named_parameters()]
    out += [("buffer", name, tuple(b.shape), str(b.dtype)) for name, b in module.named_buffers()]
    return out


def check_replicas_agree(comm: Communicator, module, what: str = "model"):
    """Raise the same ValueError on every rank unless all ranks have the same parameter names, shapes and dtypes.

    One all-gather of a digest; only on a mismatch are the full lists gathered
    to name the first differing parameter and the ranks that differ from rank 0.
    """
    spec = _spec(module) if not isinstance(module, list) else module
    digest = hashlib.sha256(repr(spec).encode()).hexdigest()
    digests = comm.allgather(digest)
    if all(d == digests[0] for d in digests):
        return
    specs = comm.allgather(spec)
    ranks = [r for r, d in enumerate(digests) if d != digests[0]]
    first = specs[ranks[0]]
    detail = None
    for i in range(max(len(specs[0]), len(first))):
        a = specs[0][i] if i < len(specs[0]) else None
        b = first[i] if i < len(first) else None
        if a != b:
            def show(s):
                return "nothing" if s is None else f"{s[0]} {s[1]!r} of shape {s[2]} and dtype {s[3]}"

            detail = f"entry {i}: rank 0 has {show(a)}, rank {ranks[0]} has {show(b)}"
            break
    raise ValueError(f"the {what} differs across ranks (ranks {ranks} differ from rank 0; first difference at "
                     f"{detail}): every rank must build the same model (same config, same parameter order)")


def broadcast_module(comm: Communicator, module, root: int = 0):
    """Overwrite every parameter and buffer with rank ``root``'s values, in place (a collective call)."""
    for _, p in module.named_parameters():
        comm.bcast(_contiguous(p), root)
    for mod in module.modules():
        for name, b in list(mod.named_buffers(recurse=False)):
            if not b.flags.c_contiguous:
                b = get_array_module(b).ascontiguousarray(b)
                setattr(mod, name, b)  # a registered buffer: replaced in place in the module
            comm.bcast(b, root)


def _contiguous(p):
    if not p.data.flags.c_contiguous:
        p.data = get_array_module(p.data).ascontiguousarray(p.data)
    return p.data


# ---------------------------------------------------------------------------
# bucket assignment (pure: unit-tested without MPI)
# ---------------------------------------------------------------------------


def bucket_dtype(dtype) -> np.dtype:
    """The dtype gradients are reduced in: float32 for float16/bfloat16/float32, float64 for float64."""
    dtype = np.dtype(dtype)
    return np.dtype(np.promote_types(dtype, np.float32)) if dtype.kind == "f" else np.dtype(np.float32)


@dataclass
class Bucket:
    """One flat gradient buffer: parameters ``indices`` (into the parameter list) at ``offsets``."""

    index: int
    dtype: np.dtype
    indices: list = field(default_factory=list)
    names: list = field(default_factory=list)
    offsets: list = field(default_factory=list)
    sizes: list = field(default_factory=list)
    numel: int = 0

    @property
    def nbytes(self) -> int:
        """Bytes of the gradients in this bucket (the per-parameter flags excluded)."""
        return self.numel * self.dtype.itemsize


def assign_buckets(params, bucket_bytes: int) -> list:
    """Split parameters into flat buckets: reverse registration order, at most ``bucket_bytes`` each.

    ``params``: ``[(name, numel, dtype)]`` in ``named_parameters()`` order.
    Walking them from the last, a parameter joins the current bucket unless that
    would push it past ``bucket_bytes`` or its reduction dtype differs; then a
    new bucket starts. A parameter larger than ``bucket_bytes`` gets a bucket of
    its own. Returns the buckets in launch order (bucket 0 holds the last
    parameters). The result depends only on the names, sizes and dtypes, so
    every rank computes the same buckets.
    """
    if not bucket_bytes > 0:
        raise ValueError(f"bucket size must be > 0 bytes, got {bucket_bytes}")
    buckets: list[Bucket] = []
    current = None
    for i in range(len(params) - 1, -1, -1):
        name, numel, dtype = params[i]
        dt = bucket_dtype(dtype)
        size = int(numel) * dt.itemsize
        if current is None or current.dtype != dt or (current.numel and current.nbytes + size > bucket_bytes):
            current = Bucket(index=len(buckets), dtype=dt)
            buckets.append(current)
        current.indices.append(i)
        current.names.append(name)
        current.offsets.append(current.numel)
        current.sizes.append(int(numel))
        current.numel += int(numel)
    return buckets


# ---------------------------------------------------------------------------
# DataParallel
# ---------------------------------------------------------------------------


class DataParallel:
    """Wrap ``model`` for data parallelism over ``comm`` (default: the world); see the module docstring.

    On construction (a collective call): checks that every rank has the same
    parameter and buffer names, shapes and dtypes (a clear ValueError on every
    rank otherwise), broadcasts rank 0's parameters and buffers, assigns the
    trainable parameters to buckets of ``bucket_mb`` megabytes (MiB) and
    installs the gradient hooks. ``reduction`` is "mean" (gradients averaged)
    or "sum" (summed: the loss is already divided by a global count).

    ``ddp(x)`` calls the model. ``model`` and ``module`` are the wrapped model.
    ``num_allreduces`` counts the bucket all-reduces started so far.
    """

    def __init__(self, model, comm: Communicator | None = None, bucket_mb: float = 25.0, reduction: str = "mean",
                 broadcast: bool = True):
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.module = self.model = model
        self.comm = get_world() if comm is None else comm
        self.reduction = reduction
        check_replicas_agree(self.comm, model)
        if broadcast and self.comm.size > 1:
            broadcast_module(self.comm, model, root=0)
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.bucket_bytes = int(bucket_mb * 2 ** 20)
        self.buckets = assign_buckets([(n, p.size, p.dtype) for n, p in self.params], self.bucket_bytes)
        self._where = {}  # id(param) -> (bucket, position in bucket)
        for b in self.buckets:
            for j, i in enumerate(b.indices):
                self._where[id(self.params[i][1])] = (b, j)
        self._buffers = [None] * len(self.buckets)  # flat arrays: gradients, then one flag per parameter
        self._sync = True
        self.num_allreduces = 0
        self._reset()
        # one process: nothing to reduce, so no hooks (and no counting pass in every backward)
        self._handles = [] if self.comm.size == 1 else \
            [p.register_post_accumulate_grad_hook(self._grad_ready) for _, p in self.params]

    # -- forward -----------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    forward = __call__

    def __repr__(self):
        return (f"DataParallel(rank={self.comm.rank}, size={self.comm.size}, {len(self.params)} parameters in "
                f"{len(self.buckets)} bucket(s) of <= {self.bucket_bytes / 2 ** 20:g} MiB, "
                f"reduction={self.reduction!r})")

    # -- per-step state ------------------------------------------------------------
    def _reset(self):
        self._ready = [0] * len(self.buckets)  # gradients final in this pass, per bucket
        self._launched = 0  # buckets 0.._launched-1 have started their all-reduce
        self._requests = [None] * len(self.buckets)

    @contextlib.contextmanager
    def no_sync(self):
        """Inside, backward passes only accumulate gradients locally (no communication).

        Use it for all micro-batches of a step but the last; the backward of the
        last one (outside) starts the all-reduce of the accumulated sums.
        """
        if self._launched:
            raise RuntimeError("no_sync() entered while gradients of this step are already being reduced: "
                               "call finish_grads() first")
        previous, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = previous

    # -- the hook ------------------------------------------------------------------
    def _grad_ready(self, p):
        """Post-accumulate-grad hook: count ``p`` ready; start every complete bucket that is next in line."""
        if not self._sync:
            return
        b, _ = self._where[id(p)]
        if b.index < self._launched:
            raise RuntimeError(
                f"a second backward() reached parameters whose gradients are already being reduced (bucket {b.index}): "
                "call finish_grads() after each backward(), or run all micro-batches but the last inside "
                "ddp.no_sync()")
        self._ready[b.index] += 1
        while self._launched < len(self.buckets) and \
                self._ready[self._launched] == len(self.buckets[self._launched].indices):
            self._launch(self._launched)

    def _buffer(self, b: Bucket, like):
        buf = self._buffers[b.index]
        xp = get_array_module(like)
        if buf is None or get_array_module(buf) is not xp:
            buf = self._buffers[b.index] = xp.empty(b.numel + len(b.indices), dtype=b.dtype)  # (numel + flags,)
        return buf

    def _launch(self, k: int):
        """Pack bucket ``k`` (missing gradients as zeros, plus one has-grad flag each) and start its all-reduce."""
        b = self.buckets[k]
        buf = self._buffer(b, self.params[b.indices[0]][1].data)
        flags = np.zeros(len(b.indices), dtype=b.dtype)  # on the host; copied in with one transfer
        for j, (i, off, n) in enumerate(zip(b.indices, b.offsets, b.sizes)):
            g = self.params[i][1].grad
            if g is None:
                buf[off:off + n] = 0
            else:
                buf[off:off + n] = g.reshape(-1)  # (n,), cast to the bucket dtype
                flags[j] = 1
        buf[b.numel:] = get_array_module(buf).asarray(flags)  # (n_params_in_bucket,)
        op = "mean" if self.reduction == "mean" else "sum"
        self._requests[k] = self.comm.iallreduce(buf, op=op, inplace=True)
        self._launched = k + 1
        self.num_allreduces += 1

    # -- after backward ----------------------------------------------------------------
    def finish_grads(self):
        """Start the buckets not yet started, wait for all, write the reduced gradients into ``p.grad``.

        Call it once per step, after the last backward and before clipping and
        the optimizer step (a collective call: every rank must call it).
        """
        if not self._sync:
            raise RuntimeError("finish_grads() inside no_sync(): leave the no_sync() block first")
        if self.comm.size == 1:
            self._reset()
            return
        while self._launched < len(self.buckets):
            self._launch(self._launched)
        for k, b in enumerate(self.buckets):
            buf = self._requests[k].wait()
            flags = to_device(buf[b.numel:], "cpu")  # one transfer per bucket
            for j, (i, off, n) in enumerate(zip(b.indices, b.offsets, b.sizes)):
                p = self.params[i][1]
                if not flags[j] > 0:  # no rank had a gradient: leave it None
                    p.grad = None
                    continue
                reduced = buf[off:off + n].reshape(p.shape)  # p.shape, a view of the bucket: copied out below
                if p.grad is None:
                    p.grad = reduced.astype(p.dtype, copy=True)
                else:
                    p.grad[...] = reduced
        self._reset()

    sync_grads = finish_grads

    def global_token_count(self, local_count) -> int:
        """``global_token_count(self.comm, local_count)``: the loss normaliser of ``reduction="sum"``."""
        return global_token_count(self.comm, local_count)

    def remove_hooks(self):
        """Unregister the gradient hooks (the model then trains as a plain local model)."""
        for h in self._handles:
            h.remove()
        self._handles = []


__all__ = ["DataParallel", "assign_buckets", "Bucket", "bucket_dtype", "global_token_count", "agree_found_inf",
           "check_replicas_agree", "broadcast_module", "REDUCTIONS"]
