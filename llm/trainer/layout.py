"""Where a training job's model lives and how one optimizer step runs: one process, or dp x pp (with ZeRO-1).

A single process is the dp=1, pp=1 case of the same code: a size-1 ``Grid``
over the one-process stand-in communicator, a one-stage pipeline (forward,
backward for each micro-batch; nothing travels) and no gradient reduction.
Following ``--dp 2 --pp 2`` from the flags to the collectives: ``Layout.build``
makes the grid (``parallel.make_grid``), keeps this rank's stage of the model
(``GPT.pipeline_stage``), hands it to ``parallel.PipelineExecutor`` (the
schedule, the activations between stages, the bucketed gradient all-reduce
over the replicas) and, with ``zero=1``, makes the master weights
``parallel.ShardedMasters`` (reduce-scatter, all-gather). ``Layout.step`` is the
one optimizer step of every job; ``nn.amp.MixedPrecision.step`` does its
second half with the two collective hooks this module supplies.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

import nn
from autograd import backend
from parallel import ShardedMasters, make_grid
from parallel.ddp import agree_found_inf
from parallel.pipeline import check_counts, gather_state, partition_balanced, stage_optimizer_state
from parallel.pipeline_exec import PipelineExecutor, clip_grad_norm_global_, global_grad_norm, split_rows

from ..model import GPTConfig


# ---------------------------------------------------------------------------
# which blocks each pipeline stage holds
# ---------------------------------------------------------------------------


def block_parameters(config: GPTConfig) -> int:
    """Parameters of one block of ``config`` (all blocks of a GPT are the same size)."""
    from ..sizing import norm_parameters, parameter_breakdown

    b = parameter_breakdown(config)
    return (b["attn"] + b["mlp"]) // config.n_layer + 2 * norm_parameters(config)


def stage_layout(config: GPTConfig, n_stages: int, counts=None) -> list[range]:
    """The blocks of each stage, ``[range(start, stop), ...]``: from ``counts`` (validated) or balanced.

    Balanced (``parallel.pipeline.partition_balanced``): contiguous runs of
    blocks so that the largest per-stage parameter count is as small as
    possible, counting the parameters that do matrix-product work: every
    block's, and on the last stage the head's (``n_embd * vocab_size``, tied or
    not) and ``ln_f`` (pre-norm only). The embedding lookups on the first stage cost no
    products and are not counted, so a large vocabulary moves blocks off the
    last stage.
    """
    if isinstance(n_stages, bool) or not isinstance(n_stages, numbers.Integral) or n_stages < 1:
        raise ValueError(f"the number of pipeline stages must be a positive integer, got {n_stages!r}")
    if counts is not None:
        counts = check_counts(counts, config.n_layer, n_stages)
    else:
        if config.n_layer < n_stages:
            raise ValueError(f"cannot split n_layer={config.n_layer} blocks into {n_stages} pipeline stages: every "
                             f"stage needs at least one block (use at most {config.n_layer} stages)")
        from ..sizing import norm_parameters

        ln_f = norm_parameters(config) if config.norm_placement == "pre" else 0
        head = config.n_embd * config.vocab_size + ln_f
        counts = partition_balanced([block_parameters(config)] * config.n_layer, n_stages, last_extra=head)
    out, start = [], 0
    for c in counts:
        out.append(range(start, start + c))
        start += c
    return out


# ---------------------------------------------------------------------------
# the layout
# ---------------------------------------------------------------------------


class NoTargetsError(ValueError):
    """A step's global batch has no term to average the loss over (``job.count`` is 0 everywhere)."""


@dataclass
class StepResult:
    """One optimizer step: the mean loss over the global batch, the gradient norm (None when skipped), whether a
    float16 overflow skipped it, and the loss scale after it."""

    loss: float
    grad_norm: float | None
    skipped: bool
    loss_scale: float


class Layout:
    """This rank's part of a training run: its stage of the model, the executor, mixed precision and masters.

    Build it with ``Layout.build``. ``model`` is this rank's stage (the whole
    model in one process), ``mp`` its ``nn.amp.MixedPrecision`` (float32
    masters, or ZeRO's shard of them), ``pipe`` the ``PipelineExecutor`` over
    ``grid``. ``comm`` is the world (the size-1 stand-in in one process).
    """

    def __init__(self, comm, grid, model, layout, pipe, mp, zero: bool, precision: str):
        self.comm, self.grid, self.model, self.blocks_per_stage = comm, grid, model, layout
        self.pipe, self.mp, self.zero, self.precision = pipe, mp, zero, precision
        self.config = model.config

    @classmethod
    def build(cls, model, comm, *, dp: int = 1, pp: int = 1, zero: bool = False, precision: str = "fp32",
              device: str = "cpu", n_micro: int = 1, schedule: str = "1f1b", stage_counts=None) -> "Layout":
        """Keep this rank's stage of the float32 ``model`` (built alike on every rank), on ``device``.

        A collective call: the data-parallel replicas take dp-rank 0's
        weights. ``zero``: shard the master weights and the optimizer state
        over the replicas (ZeRO-1). Raises ValueError for a layout the world
        or the model cannot take (the same on every rank).
        """
        if dp * pp != comm.size:
            raise ValueError(f"--dp {dp} x --pp {pp} = {dp * pp} processes, but the job has {comm.size}")
        layout = stage_layout(model.config, pp, stage_counts)
        grid = make_grid(comm, dp, pp)
        stage = model.pipeline_stage(grid.stage, layout) if pp > 1 else model
        stage.to(device)
        stage.train()
        pipe = PipelineExecutor(stage, grid, n_micro=n_micro, schedule=schedule, reduce_grads=not zero)
        master_dtype = nn.amp.Precision.from_name(precision).master_numpy_dtype()
        masters = ShardedMasters(stage.named_parameters(), grid.dp_comm, master_dtype) if zero else None
        mp = nn.amp.MixedPrecision(stage, precision, masters=masters)
        return cls(comm, grid, stage, layout, pipe, mp, zero, precision)

    # -- the step ------------------------------------------------------------------------------
    @property
    def duplicate_names(self) -> tuple:
        """Parameter names this rank holds a second copy of (the last stage's tied ``wte``): counted once."""
        return self.pipe.duplicate_names

    def _norm_comm(self):
        # the replicas of a stage hold the same gradients, unless ZeRO split them: then every rank holds its own part
        return self.comm if self.zero else self.grid.pp_comm

    def grad_norm(self, named_masters, max_norm):
        """The global L2 norm of the masters' gradients over every rank's share (a collective call), clipping them
        to ``max_norm`` when it is set (None or 0: measured only)."""
        if max_norm:
            return clip_grad_norm_global_(named_masters, max_norm, self._norm_comm(), exclude=self.duplicate_names)
        return global_grad_norm(named_masters, self._norm_comm(), exclude=self.duplicate_names)

    def step(self, job, optimizer, batch: dict, n_micro: int, grad_clip: float | None,
             observe_grads=None) -> StepResult:
        """One optimizer step over this replica's ``batch`` (a dict of arrays), in ``n_micro`` micro-batches.

        Forward and backward of every micro-batch (each one's summed loss
        divided by the global count, times the loss scale), gradients summed
        over the replicas and the tied copies, then ``MixedPrecision.step``:
        unscale into the masters, agree on a float16 overflow (skip together),
        clip to the global norm, the optimizer's step, masters back into the
        model. A non-finite loss or norm without a loss scaler raises
        ``nn.amp.NonFiniteError`` on every rank before anything is updated.

        ``observe_grads(named_masters)`` (``--grad-stats``), when given, sees
        this rank's masters with their final gradients (unscaled, summed over
        the replicas, not yet clipped) just before the norm, clipping and the
        optimizer's step; it is not called for a step a float16 overflow skips.
        """
        mp = self.mp
        scale = mp.scaler.get_scale() if mp.scaler.enabled else 1.0
        # overflows are expected in float16 and are caught below; NumPy's warnings would only repeat them
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            result = self.pipe.step(split_rows(batch, n_micro), job.loss, job.inputs, job.count, loss_scale=scale,
                                    kwargs_fn=job.model_kwargs)
            if result.n_tokens == 0:  # nothing to average over (every label masked): the same on every rank
                mp.zero_grad()
                raise NoTargetsError("the step's batch has nothing to learn: every label is masked (count 0 over all "
                                     "micro-batches and replicas)")
            if not math.isfinite(result.loss) and not mp.scaler.enabled:  # the same global loss on every rank
                mp.zero_grad()
                raise nn.amp.NonFiniteError(f"loss is {result.loss}")
            world = self.comm
            grad_norm = self.grad_norm
            if observe_grads is not None:
                def grad_norm(named_masters, max_norm):
                    observe_grads(named_masters)
                    return self.grad_norm(named_masters, max_norm)
            stepped = mp.step(optimizer, grad_clip, grad_norm=grad_norm,
                              agree_found_inf=(lambda f: agree_found_inf(world, f)) if world.size > 1 else None)
        return StepResult(result.loss, mp.last_grad_norm, not stepped, mp.scaler.get_scale())

    def eval_loss(self, job, batches) -> float:
        """The mean of ``job.loss`` over the global ``batches``, forward only (a collective call)."""
        total, count = self.pipe.eval_loss(batches, job.loss, job.inputs, job.model_kwargs)
        return total / count if count else math.nan

    # -- state: one checkpoint, whatever the layout ------------------------------------------------
    def stage_state(self, optimizer) -> tuple[dict, dict]:
        """``(float32 tensors, optimizer state)`` of this rank's stage, by full parameter name (collective over
        the replicas with ZeRO): the masters stand for the trained parameters, the model's own arrays for the
        rest (frozen weights, buffers)."""
        if self.zero:
            masters = self.mp.masters.state_dict()
            groups = [[n for n, p in g["params"]] for g in self._model_groups(optimizer)]
            opt_state = self.mp.masters.optimizer_state(optimizer, groups)
        else:
            masters = {n: m.data for n, m in self.mp.master_named_parameters()}
            opt_state = optimizer.state_dict()
        tensors = {n: (masters[n] if n in masters else v) for n, v in self.model.state_dict().items()}
        return tensors, opt_state

    def _model_groups(self, optimizer):
        """The optimizer's groups over the model's parameters (the full names of each group, ZeRO or not)."""
        by_name = dict(self.model.named_parameters())
        groups = []
        for g in optimizer.param_groups:
            names = {n for n, _ in g["params"]}
            groups.append({"params": [(n, by_name[n]) for n in by_name if n in names]})
        if self.zero:  # a group may hold no piece on this rank: take the names from the owners of the pieces
            spec = [[n for n, _ in g["params"]] for g in groups]
            gathered = self.grid.dp_comm.allgather(spec) if self.grid.dp_comm.size > 1 else [spec]
            merged = [sorted({n for part in gathered for n in part[k]}, key=list(by_name).index)
                      for k in range(len(groups))]
            groups = [{"params": [(n, by_name[n]) for n in names]} for names in merged]
        return groups

    def gather_state(self, optimizer):
        """The whole model's float32 state and optimizer state on world rank 0 (``(None, None)`` elsewhere);
        a collective call. Whatever the layout, the result is what one process would hold."""
        tensors, opt_state = self.stage_state(optimizer)
        if self.comm.size == 1:
            return {n: backend.to_device(v, "cpu") for n, v in tensors.items()}, opt_state
        return gather_state(self.grid, self.model, tensors=tensors, opt_state=opt_state)

    def load_state(self, model_state: dict, opt_state: dict, optimizer, scaler_state: dict):
        """Restore a full (any layout's) state into this rank's masters, model, optimizer and loss scaler.

        ``model_state``: float32 arrays by full name (the model's own weights
        are loaded before ``build``, so only the masters are set here).
        """
        params = dict(self.model.named_parameters())
        if self.zero:
            self.mp.masters.load_state_dict({n: model_state[n] for n, p in params.items()
                                             if n in model_state and p.requires_grad})
        elif self.mp.copies:
            self.mp.masters.load_state_dict({n: model_state[n] for n, _ in self.mp.master_named_parameters()})
        cut = stage_optimizer_state(self.model, opt_state)
        if self.zero:
            cut = self.mp.masters.shard_optimizer_state(cut)
        optimizer.load_state_dict(cut)
        self.mp.scaler.load_state_dict(scaler_state)

    def full_model(self, build=None):
        """The whole model, float32, on world rank 0 (None elsewhere), to sample from: this rank's model in one
        float32 process; rebuilt from every stage's float32 weights otherwise (a collective call), into
        ``build()`` (a model of the trained one's structure, e.g. ``job.build_model``; default a plain GPT)."""
        if self.comm.size == 1 and not self.mp.copies:
            return self.model
        tensors = dict(self.model.state_dict())
        masters = self.mp.masters.state_dict() if self.zero else \
            {n: m.data for n, m in self.mp.master_named_parameters()}
        tensors.update({n: v for n, v in masters.items() if n in tensors})
        state = tensors if self.comm.size == 1 else gather_state(self.grid, self.model, tensors=tensors)[0]
        if self.comm.rank != 0:
            return None
        from ..model import GPT

        model = build() if build is not None else GPT(self.config)
        model.load_state_dict(state)
        return model.to(self.model.device)


__all__ = ["Layout", "StepResult", "NoTargetsError", "stage_layout", "block_parameters"]
