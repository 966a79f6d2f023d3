"""Pipeline parallelism, the MPI side: execute a stage's instruction list, then sync gradients.

    grid = make_grid(get_world(), dp, pp)                    # world rank = stage * dp + dp_rank
    stage = model.pipeline_stage(grid.stage, layout)          # a GPT that holds its blocks (llm.model)
    pipe = PipelineExecutor(stage, grid, n_micro=4, schedule="1f1b")
    opt = nn.optim.AdamW(nn.optim.param_groups_for_gpt(stage, 0.1), lr=1e-3)
    for step in ...:
        micro = split_rows(batch, 4)                         # this replica's batch, on every stage
        result = pipe.step(micro, loss_fn, inputs_fn, count_fn)   # forward + backward of all of them, grads synced
        pipe.clip_grad_norm_(1.0)                            # the global norm over all stages
        opt.step(); opt.zero_grad()
        rank0_print(result.loss)                             # the global batch's mean loss, on every rank

One process is the one-stage, one-replica case of the same code (a size-1
``Grid``): the schedule is then forward, backward for each micro-batch, and
nothing travels.

A batch is a dict of arrays that share their first axis (rows), e.g.
``{"input_ids": (B, T), "labels": (B, T)}``; the caller says how to read it:
``inputs_fn(batch)`` is what the first stage takes (token ids), ``kwargs_fn(batch)``
what every stage's forward takes besides (optional), ``count_fn(batch)``
the number of terms its loss averages over (known before the forward, so every
micro-batch can be divided by the global count), and ``loss_fn(output, batch)``
turns the last stage's output into ``(summed loss, count)``.

What ``step`` does:

1. Runs the stage's instruction list (``parallel.schedule``): activations and
   their gradients travel between neighbouring stages with non-blocking
   messages (``isend``/``irecv``). Receives are posted ahead of time
   (``recv_lookahead`` per direction), sends are waited for at the end of the
   step, so no message size can deadlock it (the lists themselves run even under
   blocking semantics; see ``parallel.schedule``).
2. A forward keeps the stage's graph of micro-batch i alive (the received
   activation is a leaf Tensor with ``requires_grad=True``); the backward of i
   calls ``out.backward(grad)`` with the received gradient (the last stage:
   ``loss.backward()``), then sends the input's ``.grad`` upstream.
3. The last stage's loss for micro-batch i is ``loss_fn``'s sum divided by ``N``,
   the ``count_fn`` total of the *global* batch (all micro-batches, all
   data-parallel replicas), so the summed gradients equal those of one process
   on the whole batch, however the counts fall between ranks (masked tokens).
4. Gradients are summed over the data-parallel group (``DataParallel`` with
   ``reduction="sum"`` over ``grid.dp_comm``: the backward of the last
   micro-batch starts the bucket all-reduces, the earlier ones run in
   ``no_sync``; ``reduce_grads=False`` leaves that to ZeRO's reduce-scatter),
   then, with tied embeddings, the ``wte`` gradients of the first and last
   stage are summed (one message each way), so both copies stay equal.

The stage is any ``nn.Module`` with the attributes below (a GPT and its
``pipeline_stage`` parts have them; this module imports no model):

- ``stage``, ``n_stages``, ``is_first``, ``is_last``: its place in the pipeline;
- ``forward(x)``: token ids (first stage) or the previous stage's activation
  Tensor in; the activation out, or on the last stage the model's output
  (``loss_fn`` reads it; a ``(logits, loss)`` pair is taken as the logits);
- ``activation_shape(ids_shape)``, ``activation_dtype``, ``device``: what
  travels between stages, to post receives ahead of time;
- ``tied_weight``: ``(name, Parameter)`` of a weight the first and last stage
  both hold (GPT's tied ``wte``) or None; ``holds_tied_copy``: True on the
  stage whose copy is the duplicate (counted once in the gradient norm).

``step`` returns a ``StepResult``: the global loss (on every rank), the peak
number of micro-batches whose activations this stage held, and the stage's
busy time (forward and backward computations) against the step's wall time.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from autograd import backend
from autograd.backend import get_array_module
from autograd.tensor import Tensor

from . import schedule as sch
from .comm import Communicator, Grid
from .ddp import DataParallel, broadcast_module, check_replicas_agree

#: what a stage module must have (see the module docstring)
STAGE_ATTRIBUTES = ("stage", "n_stages", "is_first", "is_last", "forward", "activation_shape", "activation_dtype",
                    "device", "tied_weight", "holds_tied_copy")

#: message tags: activation of micro-batch i -> 2 i, its gradient -> 2 i + 1; the tied-embedding gradient
TIED_GRAD_TAG = 1 << 20


@dataclass
class StepResult:
    """What one pipeline step measured.

    ``loss``: the mean loss over the global batch (every rank gets it; NaN if
    there were no targets). ``peak_activations``: the most micro-batches whose
    forward graphs this stage held at once. ``busy_s``: seconds this stage spent
    in forward and backward computations; ``wall_s``: seconds of the schedule
    (from the first instruction to the last send completing, before the
    gradient all-reduces); ``bubble`` = 1 - busy_s / wall_s. ``forward_s`` and
    ``backward_s``: the busy time split into forwards and backwards.
    """

    loss: float
    peak_activations: int
    busy_s: float
    wall_s: float
    n_tokens: int
    forward_s: float = 0.0
    backward_s: float = 0.0

    @property
    def bubble(self) -> float:
        return 1.0 - self.busy_s / self.wall_s if self.wall_s > 0 else 0.0


def split_rows(batch: dict, n: int) -> list:
    """Split a batch (a dict of arrays with a common first axis) into ``n`` equal parts along that axis."""
    rows = batch_rows(batch)
    if n < 1 or rows % n:
        raise ValueError(f"a batch of {rows} rows cannot be split into {n} equal micro-batches: "
                         f"choose a batch size divisible by the number of micro-batches")
    b = rows // n
    return [{k: v[i * b:(i + 1) * b] for k, v in batch.items()} for i in range(n)]


def batch_rows(batch: dict) -> int:
    """The number of rows of a batch (a dict of arrays with a common first axis); ValueError if they differ."""
    sizes = {k: int(v.shape[0]) for k, v in batch.items()}
    if not sizes or len(set(sizes.values())) != 1:
        raise ValueError(f"a batch is a dict of arrays with the same number of rows, got {sizes}")
    return next(iter(sizes.values()))


def _logits(output):
    """The logits of a model's output: the output itself, or the first of a ``(logits, loss)`` pair."""
    return output[0] if isinstance(output, tuple) else output


class PipelineExecutor:
    """Run one pipeline stage's share of every step over ``grid`` (see the module docstring).

    ``stage``: this rank's stage module (stage ``grid.stage`` of ``grid.pp``; see the module docstring).
    ``grid``: a ``parallel.comm.Grid``; a plain ``Communicator`` is taken as the
    pipeline group with no data parallelism. ``schedule``: "1f1b" or "gpipe".
    ``n_micro``: micro-batches per step. Construction is a collective call
    (the data-parallel replicas of a stage check that they agree and take
    dp-rank 0's weights).
    """

    def __init__(self, stage, grid, n_micro: int, schedule: str = "1f1b", bucket_mb: float = 25.0,
                 recv_lookahead: int = 2, reduce_grads: bool = True):
        if isinstance(grid, Communicator):
            grid = Grid(grid, 1, grid.size, 0, grid.rank, Communicator(), grid)
        missing = [a for a in STAGE_ATTRIBUTES if not hasattr(stage, a)]
        if missing:
            raise TypeError(f"PipelineExecutor needs a pipeline stage module (a GPT or its pipeline_stage(), or one with "
                            f"the attributes in parallel.pipeline_exec's docstring); {type(stage).__name__} lacks "
                            f"{', '.join(missing)}")
        if stage.n_stages != grid.pp or stage.stage != grid.stage:
            raise ValueError(f"this rank is stage {grid.stage} of {grid.pp}, but its module is stage {stage.stage} of "
                             f"{stage.n_stages}: take the stage with model.pipeline_stage(grid.stage, layout)")
        if recv_lookahead < 1:
            raise ValueError(f"recv_lookahead must be >= 1, got {recv_lookahead}")
        self.stage, self.grid = stage, grid
        self.pp_comm, self.dp_comm = grid.pp_comm, grid.dp_comm
        self.n_micro, self.schedule = int(n_micro), schedule
        self.instructions = sch.stage_schedule(schedule, grid.stage, grid.pp, self.n_micro)
        self.recv_lookahead = int(recv_lookahead)
        self.ddp = None
        if self.dp_comm.size > 1:
            if reduce_grads:  # checks the replicas agree and takes dp-rank 0's weights
                self.ddp = DataParallel(stage, self.dp_comm, bucket_mb=bucket_mb, reduction="sum")
            else:  # the gradients are reduced by the caller (ZeRO's reduce-scatter): the weights still start equal
                check_replicas_agree(self.dp_comm, stage)
                broadcast_module(self.dp_comm, stage, root=0)
        self._sync_tied_initial()

    # -- tied embeddings ---------------------------------------------------------------
    def _tied_peer(self):
        """The stage this one sums the tied weight's gradient with (None if there is no second copy)."""
        s = self.stage
        if s.tied_weight is None:
            return None
        if s.is_first:
            return s.n_stages - 1
        if s.is_last:
            return 0
        return None

    def _sync_tied_initial(self):
        """Make the last stage's ``wte`` copy equal to the first stage's (they are built equal; this enforces it)."""
        peer = self._tied_peer()
        if peer is None:
            return
        _, w = self.stage.tied_weight
        if self.stage.is_first:
            self.pp_comm.send(w.data, dest=peer, tag=TIED_GRAD_TAG + 1)
        else:
            w.data[...] = self.pp_comm.recv(get_array_module(w.data).empty_like(w.data), source=peer,
                                            tag=TIED_GRAD_TAG + 1)

    def _sum_tied_grads(self):
        """First and last stage exchange their ``wte`` gradients and both keep the sum (same bits on both)."""
        peer = self._tied_peer()
        if peer is None:
            return
        _, w = self.stage.tied_weight
        xp = get_array_module(w.data)
        mine = w.grad if w.grad is not None else xp.zeros_like(w.data)
        mine = xp.ascontiguousarray(mine)
        theirs = xp.empty_like(mine)
        rreq = self.pp_comm.irecv(theirs, source=peer, tag=TIED_GRAD_TAG)
        sreq = self.pp_comm.isend(mine, dest=peer, tag=TIED_GRAD_TAG)
        rreq.wait()
        sreq.wait()
        # first + last in that order on both ranks: the same bits
        w.grad = mine + theirs if self.stage.is_first else theirs + mine

    # -- one step ------------------------------------------------------------------------
    def step(self, micro_batches: list, loss_fn, inputs_fn, count_fn, loss_scale: float = 1.0,
             kwargs_fn=None) -> StepResult:
        """Forward and backward of every micro-batch by the schedule; gradients summed over dp and tied copies.

        ``micro_batches``: ``n_micro`` batches (dicts of arrays, see the module
        docstring), this replica's, on every stage (the first stage reads
        ``inputs_fn(batch)``, the last gives its output to ``loss_fn``, every
        stage needs the shapes). Each micro-batch's summed loss is divided by
        the global ``count_fn`` total over all micro-batches and replicas
        before its backward. ``loss_scale``: the last stage back-propagates
        ``loss * loss_scale`` (mixed precision). ``kwargs_fn(batch)``: keyword
        arguments every stage's forward takes for the batch (``position_ids``,
        ``attention_mask`` of packed rows). Every rank of the grid must call it
        (a collective call).
        """
        if len(micro_batches) != self.n_micro:
            raise ValueError(f"the executor runs {self.n_micro} micro-batches per step, got {len(micro_batches)}")
        stage, comm = self.stage, self.pp_comm
        s, p = stage.stage, stage.n_stages
        n_total = None
        if stage.is_last:
            local = sum(int(count_fn(b)) for b in micro_batches)
            n_total = int(self.dp_comm.allreduce(local, op="sum")) if self.dp_comm.size > 1 else local
        dtype = stage.activation_dtype
        xp = get_array_module(next(iter(stage.parameters())).data)
        shapes = [stage.activation_shape(inputs_fn(b).shape) for b in micro_batches]

        # receives: posted ahead, per direction, in the order the list consumes them
        pending = {sch.RECV_FWD: [i for op, i in self.instructions if op == sch.RECV_FWD],
                   sch.RECV_BWD: [i for op, i in self.instructions if op == sch.RECV_BWD]}
        posted = {}  # (op, i) -> (request, buffer)

        def top_up(kind):
            queue = pending[kind]
            while queue and sum(1 for k in posted if k[0] == kind) < self.recv_lookahead:
                i = queue.pop(0)
                buf = xp.empty(shapes[i], dtype=dtype)
                src, tag = (s - 1, 2 * i) if kind == sch.RECV_FWD else (s + 1, 2 * i + 1)
                posted[(kind, i)] = (comm.irecv(buf, source=src, tag=tag), buf)

        if p > 1:
            top_up(sch.RECV_FWD)
            top_up(sch.RECV_BWD)

        received = {}  # (kind, i) -> array
        live = {}  # i -> (input tensor or None, output tensor): the forward graphs kept for backward
        input_grads = {}  # i -> the gradient of the stage's input, until it is sent
        sends = []
        losses = []
        peak = 0
        fwd_s = bwd_s = 0.0
        n_backward = self.n_micro
        done_backward = 0
        t_start = time.perf_counter()
        for op, i in self.instructions:
            if op in (sch.RECV_FWD, sch.RECV_BWD):
                if (op, i) not in posted:
                    top_up(op)
                req, buf = posted.pop((op, i))
                received[(op, i)] = req.wait()
                top_up(op)
            elif op == sch.FORWARD:
                t0 = time.perf_counter()
                batch = micro_batches[i]
                if stage.is_first:
                    inp, arg = None, inputs_fn(batch)
                else:
                    inp = Tensor(received.pop((sch.RECV_FWD, i)), requires_grad=True)
                    arg = inp
                out = stage(arg, **(kwargs_fn(batch) if kwargs_fn is not None else {}))
                if stage.is_last:
                    total, count = loss_fn(_logits(out), batch)
                    expected = int(count_fn(batch))
                    if int(count) != expected:
                        raise ValueError(f"the loss of micro-batch {i} averages over {int(count)} terms, but count_fn "
                                         f"says {expected}: a job's loss and count must agree")
                    out = total / max(n_total, 1)  # a Python int keeps the dtype
                    losses.append(total.data)
                live[i] = (inp, out)
                peak = max(peak, len(live))
                fwd_s += time.perf_counter() - t0
            elif op == sch.SEND_FWD:
                act = xp.ascontiguousarray(live[i][1].data)
                sends.append(comm.isend(act, dest=s + 1, tag=2 * i))
            elif op == sch.BACKWARD:
                t0 = time.perf_counter()
                inp, out = live.pop(i)
                if stage.is_last:
                    grad = None if loss_scale == 1.0 else xp.full(out.shape, loss_scale, dtype=out.dtype)
                else:
                    grad = received.pop((sch.RECV_BWD, i))
                done_backward += 1
                if self.ddp is not None and done_backward < n_backward:
                    with self.ddp.no_sync():  # only the last backward starts the all-reduce
                        out.backward(grad)
                else:
                    out.backward(grad)
                if inp is not None:
                    g = inp.grad if inp.grad is not None else xp.zeros(inp.shape, dtype=inp.dtype)
                    input_grads[i] = xp.ascontiguousarray(g)  # kept until sent
                del inp, out
                bwd_s += time.perf_counter() - t0
            elif op == sch.SEND_BWD:
                g = input_grads.pop(i)
                sends.append(comm.isend(g, dest=s - 1, tag=2 * i + 1))
            else:  # pragma: no cover - the schedule module only makes the ops above
                raise ValueError(f"unknown pipeline instruction {op!r}")
        for r in sends:
            r.wait()
        wall = time.perf_counter() - t_start
        if self.ddp is not None:
            self.ddp.finish_grads()
        self._sum_tied_grads()

        # the loss: the last stage's sum over micro-batches, summed over replicas, sent to every stage
        local = float(sum(float(backend.to_device(v, "cpu")) for v in losses)) if losses else 0.0
        if stage.is_last and self.dp_comm.size > 1:
            local = self.dp_comm.allreduce(local, op="sum")
        if p > 1:
            local, n_total = comm.bcast((local, n_total) if stage.is_last else None, root=p - 1)
        loss = local / n_total if n_total else math.nan
        return StepResult(loss=float(loss), peak_activations=peak, busy_s=fwd_s + bwd_s, wall_s=wall,
                          n_tokens=int(n_total or 0), forward_s=fwd_s, backward_s=bwd_s)

    # -- after the step ------------------------------------------------------------------
    def grad_norm(self) -> float:
        """The global L2 norm of the whole model's gradients (the tied ``wte`` counted once); a collective call."""
        return global_grad_norm(self.stage.named_parameters(), self.pp_comm, exclude=self.duplicate_names)

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Scale every stage's gradients so the global norm is at most ``max_norm`` (torch's formula); return the norm.

        Every rank computes the same norm, so every stage scales by the same
        factor (a collective call). A non-finite norm scales nothing.
        """
        return clip_grad_norm_global_(self.stage.named_parameters(), max_norm, self.pp_comm,
                                      exclude=self.duplicate_names)

    @property
    def duplicate_names(self) -> tuple:
        """Parameter names this stage holds a second copy of (the last stage's tied ``wte``): count them once."""
        return (self.stage.tied_weight[0],) if self.stage.holds_tied_copy else ()

    # -- evaluation --------------------------------------------------------------------
    def eval_loss(self, batches, loss_fn, inputs_fn, kwargs_fn=None) -> tuple[float, int]:
        """``(summed loss, count)`` over the global ``batches``, forward only, in eval mode; a collective call.

        Every rank passes the same batches (dicts of arrays); each data-parallel
        replica takes its share of every batch's rows (``np.array_split``; a
        replica whose share is empty skips that batch). No graph is recorded;
        the stages pass activations along as in a forward, and the last stage
        adds up ``loss_fn``'s sums and counts. Both are added over the replicas:
        every rank gets the totals (the mean is their ratio).
        """
        from autograd.engine import no_grad

        stage, comm = self.stage, self.pp_comm
        s = stage.stage
        total, count = 0.0, 0
        sends = []
        was_training = stage.training
        stage.eval()
        try:
            with no_grad():
                for i, batch in enumerate(batches):
                    rows = np.array_split(np.arange(batch_rows(batch)), self.dp_comm.size)[self.dp_comm.rank]
                    if rows.size == 0:
                        continue
                    batch = {k: v[rows[0]:rows[-1] + 1] for k, v in batch.items()}
                    if stage.is_first:
                        inp = inputs_fn(batch)
                    else:
                        xp = get_array_module(next(iter(stage.parameters())).data)
                        buf = xp.empty(stage.activation_shape(inputs_fn(batch).shape), dtype=stage.activation_dtype)
                        inp = Tensor(comm.recv(buf, source=s - 1, tag=2 * i))
                    out = stage(inp, **(kwargs_fn(batch) if kwargs_fn is not None else {}))
                    if stage.is_last:
                        loss, n = loss_fn(_logits(out), batch)
                        total += float(backend.to_device(loss.data, "cpu"))
                        count += int(n)
                    else:
                        sends.append(comm.isend(get_array_module(out.data).ascontiguousarray(out.data),
                                                dest=s + 1, tag=2 * i))
                    # keep at most a few sends in flight
                    while len(sends) > 4:
                        sends.pop(0).wait()
            for r in sends:
                r.wait()
        finally:
            stage.train(was_training)
        if stage.is_last and self.dp_comm.size > 1:
            total = self.dp_comm.allreduce(total, op="sum")
            count = self.dp_comm.allreduce(count, op="sum")
        if stage.n_stages > 1:
            total, count = comm.bcast((total, count) if stage.is_last else None, root=stage.n_stages - 1)
        return total, count


def global_grad_norm(named_params, comm: Communicator, exclude=()) -> float:
    """The L2 norm of the gradients of ``named_params`` on every rank of ``comm`` together (a collective call).

    Each rank's sum of squares (float32 or wider; names in ``exclude``
    skipped) is added over ``comm``; every rank returns the same norm.
    """
    local = 0.0
    for name, p in named_params:
        if p.grad is None or name in exclude:
            continue
        g = p.grad.ravel()  # (n,)
        if g.dtype.itemsize < 4:
            g = g.astype(np.float32)
        local += float(get_array_module(g).vdot(g, g))
    total = comm.allreduce(local, op="sum") if comm.size > 1 else local
    return math.sqrt(total) if total >= 0 else math.nan


def clip_grad_norm_global_(named_params, max_norm: float, comm: Communicator, exclude=()) -> float:
    """``nn.optim.clip_grad_norm_`` over parameters spread across the ranks of ``comm``; returns the global norm.

    When the global norm exceeds ``max_norm`` every gradient (excluded names
    too: they are copies) is multiplied by ``max_norm / (norm + 1e-6)``. A NaN or
    infinite norm scales nothing.
    """
    if max_norm <= 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    named_params = list(named_params)
    norm = global_grad_norm(named_params, comm, exclude)
    if math.isfinite(norm) and norm > max_norm:
        coef = max_norm / (norm + 1e-6)
        for _, p in named_params:
            if p.grad is not None:
                p.grad *= coef
    return norm


__all__ = ["PipelineExecutor", "StepResult", "split_rows", "batch_rows", "global_grad_norm", "clip_grad_norm_global_",
           "TIED_GRAD_TAG"]
