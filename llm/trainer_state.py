"""What a training run keeps besides the loop: its checkpoints, its metrics file and its speed gauges.

Checkpoints (``save_training_checkpoint`` / ``TrainingCheckpoint``): one
safetensors file written atomically by ``llm.checkpoint.save_checkpoint``
(temp file, fsync, rename: a crash leaves the old checkpoint or the new one,
never half of one; a SHA-256 of the bytes detects corruption). It is a model
checkpoint in the project's format, so ``python -m llm generate`` reads it,
plus everything a run needs to continue bitwise as if it had never stopped:

    tensors
      model.<name>               the weights in float32 (in mixed precision: the float32 master
                                 weights, of which the float16 model is the rounding)
      optim.exp_avg.<name>       AdamW's first moment, per parameter name
      optim.exp_avg_sq.<name>    AdamW's second moment
    metadata (JSON)
      format, config, tokenizer  the model convention of llm.checkpoint (config = asdict(GPTConfig),
                                 tokenizer = its JSON text)
      step                       optimizer steps completed (the learning-rate schedule's position)
      optimizer                  AdamW's step counts (global and per parameter) and hyper-parameters
      mixed_precision            the precision and the loss scaler's state (scale, clean-step counter)
      data                       the batch sampler's state ({"seed", "step"}: the next batch it draws)
      rng                        the seed, and the state of autograd.random's NumPy generator
      train_config               the run's flags (to warn when a resumed run changes one)
      tokens, val_loss, ...      bookkeeping for people

No pickle anywhere: a checkpoint from a stranger cannot run code.

The dropout stream is re-seeded before every step from ``(seed, step)``
(``seed_dropout_for_step``), like the batch sampler, so the masks of step k do
not depend on what ran before it (an evaluation, a sample, a resume) or on the
device: CuPy's generator state, which cannot be saved, never needs to be.

Metrics (``MetricsWriter``): one JSON object per line, appended and flushed as
they come; a resumed run first drops the lines after its checkpoint's step, so
the file reads as one uninterrupted run.

Speed (``measure_matmul_flops``, ``mfu``): the model FLOPs utilisation is
``flops_per_token * tokens_per_s`` over the float32 matrix-product rate of
this machine, timed on the training device at start-up and again at every
evaluation, the best rate counting (on a shared machine a busy neighbour
during one measurement would otherwise inflate every MFU that follows).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

import autograd.random as agrandom
from autograd import backend, kernels
from nn.amp import NonFiniteError  # the loss, the gradient norm or the weights stopped being finite

from .checkpoint import (FORMAT, CheckpointError, config_from_metadata, load_checkpoint, model_state_from_tensors,
                         save_checkpoint, tokenizer_from_metadata)
from .model import GPTConfig

#: metadata["kind"] of a checkpoint that holds a training state
KIND = "training-state"


class ResumeError(Exception):
    """A checkpoint cannot be resumed: missing, corrupt, or made for another model, tokenizer or precision."""


# ---------------------------------------------------------------------------
# randomness
# ---------------------------------------------------------------------------


def step_seed(seed: int, step: int) -> int:
    """A 63-bit seed derived from ``(seed, step)`` with NumPy's SeedSequence (well mixed, the same everywhere)."""
    return int(np.random.SeedSequence([int(seed), int(step)]).generate_state(2, np.uint32).view(np.uint64)[0] >> 1)


def seed_dropout_for_step(seed: int, step: int):
    """Re-seed autograd.random's generators (dropout's) for optimizer step ``step``: ``manual_seed(step_seed(...))``."""
    agrandom.manual_seed(step_seed(seed, step))


def rng_state(seed: int) -> dict:
    """The RNG part of a checkpoint: the run's seed and autograd.random's NumPy generator state (a dict of ints)."""
    return {"seed": int(seed), "dropout": "autograd.random.manual_seed(step_seed(seed, step)) before each step",
            "numpy_default": agrandom.default_generator(np).bit_generator.state}


def restore_rng_state(state: dict):
    """Put back autograd.random's NumPy generator state saved by ``rng_state``."""
    saved = state.get("numpy_default") if isinstance(state, dict) else None
    if saved is not None:
        agrandom.default_generator(np).bit_generator.state = saved


# ---------------------------------------------------------------------------
# speed
# ---------------------------------------------------------------------------


def matmul_size_for(config: GPTConfig) -> int:
    """The side of the square product that stands for the model's: 4 * n_embd (the MLP's width), in [256, 4096]."""
    n = 4 * config.n_embd
    return int(min(4096, max(256, -(-n // 64) * 64)))


def _synchronize(xp):
    cuda = getattr(xp, "cuda", None)
    if cuda is not None:
        cuda.Device().synchronize()


def measure_matmul_flops(device: str = "cpu", n: int = 512, seconds: float = 0.5) -> float:
    """The float32 matrix-product rate (FLOP/s) of ``device``: ``(n, n) @ (n, n)`` timed for about ``seconds``.

    One product costs ``2 n^3`` FLOPs. The time is split into five windows and
    the fastest window counts (the rate the hardware reaches, not the average
    over whatever else the machine is doing). On the CPU the product runs on
    autograd's threads, as the model's do (BLAS alone is single-threaded
    while they exist).
    """
    xp = backend.array_module_for_device(device)
    rng = np.random.default_rng(0)
    a = backend.to_device(rng.standard_normal((n, n), dtype=np.float32), device)
    b = backend.to_device(rng.standard_normal((n, n), dtype=np.float32), device)
    out = None if xp is np else xp.empty((n, n), dtype=np.float32)

    def product():
        if out is None:
            kernels.matmul(a, b)
        else:
            xp.matmul(a, b, out=out)

    product()  # warm-up (threads, CUDA kernels)
    _synchronize(xp)
    t0 = time.perf_counter()
    reps = 1
    while True:  # how many products fill a tenth of the budget
        product()
        _synchronize(xp)
        dt = time.perf_counter() - t0
        if dt > seconds / 50 or reps > 10_000:
            break
        reps += 1
    per_window = max(1, int(reps * (seconds / 5) / max(dt, 1e-9)))
    best = math.inf
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(per_window):
            product()
        _synchronize(xp)
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 * per_window / best


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: ``flops_per_token * tokens_per_s / peak_flops`` (0 where the peak is unknown)."""
    return flops_per_token * tokens_per_s / peak_flops if peak_flops > 0 else 0.0


# ---------------------------------------------------------------------------
# Ctrl-C
# ---------------------------------------------------------------------------


class GracefulInterrupt:
    """A context in which the first Ctrl-C (SIGINT) only sets ``requested``; the second one interrupts at once.

    The training loop checks ``requested`` after each step, where the model,
    the optimizer and the sampler agree, writes a checkpoint there and stops.
    (A KeyboardInterrupt raised in the middle of a step could leave half the
    parameters updated.) Outside the main thread, where Python cannot install
    signal handlers, Ctrl-C keeps its usual meaning.
    """

    def __init__(self, on_first=None):
        self.requested = False
        self._on_first = on_first
        self._previous = None

    def _handler(self, signum, frame):
        if self.requested:
            signal.signal(signal.SIGINT, self._previous or signal.default_int_handler)
            raise KeyboardInterrupt
        self.requested = True
        if self._on_first is not None:
            self._on_first()

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
        return False


# ---------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------


def _jsonable(value):
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None  # NaN/inf are not JSON: null
    if isinstance(value, np.integer):
        return int(value)
    return value


class MetricsWriter:
    """Appends one JSON object per line to ``path``, flushed at once (``tail -f`` shows it live).

    A fresh run (``resume_step=None``) starts the file empty. A resumed run keeps
    the lines whose ``"step"`` is at most ``resume_step`` (the checkpoint's) and
    drops the rest, which the interrupted run wrote after its last checkpoint.
    ``enabled=False`` (ranks other than 0) writes nothing.
    """

    def __init__(self, path, resume_step: int | None = None, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self._f = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keep = []
        if resume_step is not None and self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a crash
                if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= resume_step:
                    keep.append(line)
        fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=self.path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in keep))
        os.replace(tmp, self.path)
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict):
        """Append ``record`` as one line (NaN and inf become null)."""
        if self._f is None:
            return
        self._f.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
        self._f.flush()

    def close(self):
        """Close the file (further writes are ignored)."""
        if self._f is not None:
            self._f.close()
            self._f = None


def read_metrics(path) -> list[dict]:
    """The records of a metrics file, in order (a line cut short by a crash is skipped)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


# ---------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------


def params_are_finite(mp) -> bool:
    """Whether every master weight is finite (one sum per tensor, one synchronisation)."""
    partial = []
    xp = np
    for _, m in mp.master_named_parameters():
        xp = backend.get_array_module(m.data)
        partial.append(m.data.sum(dtype=np.float64))
    if not partial:
        return True
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(xp.isfinite(xp.stack(partial).sum()))


def save_training_checkpoint(path, *, model, mp, optimizer, sampler, tokenizer_json: str | None, step: int,
                             seed: int, train_config: dict | None = None, extra_metadata: dict | None = None):
    """Write the whole training state (module docstring) to ``path`` atomically.

    ``model``: the GPT; ``mp``: its ``nn.amp.MixedPrecision``; ``optimizer``:
    the AdamW over ``mp``'s master parameters; ``sampler``: the
    ``llm.data.BatchSampler``; ``step``: optimizer steps completed.
    Refuses (NonFiniteError) to write weights that are not finite, so a good
    checkpoint is never replaced by a diverged one.
    """
    if not params_are_finite(mp):
        raise NonFiniteError(f"the weights are not finite after step {step}; {path} was not overwritten")
    masters = dict(mp.master_named_parameters())
    tensors = {}
    for name, value in model.state_dict().items():
        m = masters.get(name)
        tensors[f"model.{name}"] = m.data if m is not None else value
    opt = optimizer.state_dict()
    param_steps = {}
    for name, entry in opt["state"].items():
        for key in optimizer.state_keys:
            if key in entry:
                tensors[f"optim.{key}.{name}"] = entry[key]
        param_steps[name] = int(entry.get("step", 0))
    scaler = mp.scaler.state_dict()
    metadata = {
        "format": FORMAT,
        "kind": KIND,
        "config": dataclasses.asdict(model.config),
        "tokenizer": tokenizer_json,
        "step": int(step),
        "optimizer": {"type": type(optimizer).__name__, "step": int(opt["step"]), "param_steps": param_steps,
                      "param_groups": opt["param_groups"]},
        "mixed_precision": {"precision": {"compute_dtype": mp.precision.compute_dtype,
                                          "master_dtype": mp.precision.master_dtype},
                            "scaler": scaler},
        "data": sampler.state_dict(),
        "rng": rng_state(seed),
        "train_config": train_config or {},
    }
    for k, v in (extra_metadata or {}).items():
        if k in metadata:
            raise ValueError(f"extra checkpoint metadata {k!r} collides with a training-state key")
        metadata[k] = v
    save_checkpoint(path, tensors, metadata)


def _diff(ours: dict, theirs: dict) -> list[str]:
    return [f"{k}: checkpoint {theirs.get(k)!r}, now {ours.get(k)!r}"
            for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]


@dataclasses.dataclass
class TrainingCheckpoint:
    """A training checkpoint read back (and verified): ``TrainingCheckpoint.load(path)``, then restore in order.

    1. ``check_compatible(config, tokenizer)`` before building anything;
    2. ``load_model(model)`` into the freshly built float32 model (before ``MixedPrecision``);
    3. ``restore(mp, optimizer, sampler)`` once those exist.
    Every failure is a ``ResumeError`` naming the file and the problem.
    """

    path: str
    tensors: dict
    metadata: dict
    config: GPTConfig

    @classmethod
    def load(cls, path) -> "TrainingCheckpoint":
        """Read and verify ``path`` (checksums, format, training keys); ResumeError otherwise."""
        path = os.fspath(path)
        try:
            tensors, metadata = load_checkpoint(path)
            config = config_from_metadata(metadata, where=f"checkpoint {path}")
        except CheckpointError as e:
            raise ResumeError(str(e)) from None
        missing = [k for k in ("step", "optimizer", "mixed_precision", "data", "rng") if k not in metadata]
        if missing:
            raise ResumeError(f"checkpoint {path} holds a model but no training state (missing {', '.join(missing)}); "
                              "it cannot be resumed")
        if not isinstance(metadata["step"], int) or metadata["step"] < 0:
            raise ResumeError(f"checkpoint {path} has an invalid step {metadata['step']!r}")
        return cls(path, tensors, metadata, config)

    @property
    def step(self) -> int:
        """Optimizer steps completed when the checkpoint was written."""
        return int(self.metadata["step"])

    @property
    def train_config(self) -> dict:
        """The flags the checkpointed run was started with (a dict; empty if unknown)."""
        tc = self.metadata.get("train_config")
        return tc if isinstance(tc, dict) else {}

    def check_compatible(self, config: GPTConfig, tokenizer=None):
        """ResumeError unless the checkpoint's model config and tokenizer are ``config`` and ``tokenizer``."""
        diff = _diff(dataclasses.asdict(config), dataclasses.asdict(self.config))
        if diff:
            raise ResumeError(f"checkpoint {self.path} was trained with another model config than these flags give:\n  "
                              + "\n  ".join(diff) + "\npass the model flags it was trained with (--preset, --n-layer, "
                              "--n-head, --n-embd, --block-size, --dropout, --vocab-size / --tokenizer), or start a "
                              "new run in another --out-dir")
        if tokenizer is not None:
            from .data import tokenizer_sha256

            try:
                theirs = tokenizer_from_metadata(self.metadata, f"checkpoint {self.path}")
            except CheckpointError as e:
                raise ResumeError(str(e)) from None
            if theirs is None:
                raise ResumeError(f"checkpoint {self.path} holds no tokenizer, so its vocabulary cannot be checked")
            if tokenizer_sha256(theirs) != tokenizer_sha256(tokenizer):
                raise ResumeError(f"checkpoint {self.path} was trained with another tokenizer ({theirs.n_vocab} "
                                  f"tokens) than this run's ({tokenizer.n_vocab} tokens): its token ids mean "
                                  "other things; pass the same --tokenizer / --vocab-size and --data as the run that "
                                  "wrote it")

    def load_model(self, model):
        """Copy the checkpoint's weights into ``model`` (float32, built from the same config)."""
        state = model_state_from_tensors(self.tensors)
        try:
            model.load_state_dict(state)
        except ValueError as e:
            raise ResumeError(f"checkpoint {self.path} does not fit the model:\n{e}") from None

    def restore(self, mp, optimizer, sampler, subset: bool = False):
        """Restore the loss scaler (and masters), AdamW's moments and step counts, the sampler and the RNG.

        ``subset=True``: the optimizer holds only some of the model's parameters
        (one pipeline stage); only their state is restored.
        """
        meta = self.metadata
        try:
            mpm = meta["mixed_precision"]
            master = {}
            if mp.copies:
                master = {name: self.tensors[f"model.{name}"] for name, _ in mp.master_named_parameters()
                          if f"model.{name}" in self.tensors}
            mp.load_state_dict({"precision": mpm["precision"], "master": master, "scaler": mpm["scaler"]})
            om = meta["optimizer"]
            if om.get("type", type(optimizer).__name__) != type(optimizer).__name__:
                raise ValueError(f"the checkpoint's optimizer is {om.get('type')}, this run uses "
                                 f"{type(optimizer).__name__}")
            keep = {n for n, _ in optimizer.named_parameters()} if subset else None
            state = {}
            for name, t in om["param_steps"].items():
                if keep is not None and name not in keep:
                    continue
                entry = {"step": int(t)}
                for key in optimizer.state_keys:
                    arr = self.tensors.get(f"optim.{key}.{name}")
                    if arr is not None:
                        entry[key] = arr
                state[name] = entry
            # only the parameter names of the groups: the hyper-parameters are this run's flags
            groups = [{"params": [n for n in g["params"] if keep is None or n in keep]} for g in om["param_groups"]]
            optimizer.load_state_dict({"step": int(om["step"]), "state": state, "param_groups": groups})
            sampler.load_state_dict(meta["data"])
        except (ValueError, KeyError, TypeError) as e:
            raise ResumeError(f"checkpoint {self.path} cannot be resumed by this run: {e}") from None
        restore_rng_state(meta.get("rng") or {})

    def changed_flags(self, train_config: dict, ignore=("resume", "overwrite", "max_steps", "max_minutes")) -> list:
        """``"flag: checkpoint X, now Y"`` for each recorded flag this run changes (bitwise resume needs none)."""
        theirs = self.train_config
        if not theirs:
            return []
        keys = (set(train_config) | set(theirs)) - set(ignore)
        return _diff({k: train_config.get(k) for k in keys}, {k: theirs.get(k) for k in keys})


# ---------------------------------------------------------------------------
# data and pipeline parallelism (--dp / --pp under mpirun)
# ---------------------------------------------------------------------------


def rank0_first(comm, fn, errors: tuple = (ValueError,)):
    """``fn()`` on rank 0 first, then on the other ranks (which then find rank 0's cached files); a collective call.

    Building the tokenizer and the token shards once, instead of on every rank
    at the same time into the same cache folder. If rank 0 raises one of
    ``errors``, every other rank raises the same type with the same message
    instead of waiting (and instead of doing the work again). Without a
    communicator, or at size 1: just ``fn()``.
    """
    if comm is None or comm.size == 1:
        return fn()
    if comm.rank == 0:
        try:
            result = fn()
        except errors as e:
            comm.bcast((errors.index(type(e)) if type(e) in errors else 0, str(e)), root=0)
            raise
        comm.bcast(None, root=0)
        return result
    failure = comm.bcast(None, root=0)
    if failure is not None:
        raise errors[failure[0]](failure[1])
    return fn()


def agree_on_flags(comm, *flags) -> list[bool]:
    """Each flag True on every rank if it is True on any (one all-gather): a stop request, a time limit.

    Signals and clocks differ between processes; decisions that change the
    sequence of collective calls must not.
    """
    if comm is None or comm.size == 1:
        return [bool(f) for f in flags]
    gathered = comm.allgather([bool(f) for f in flags])
    return [any(g[i] for g in gathered) for i in range(len(flags))]


def pipeline_train_step(pipe, mp, optimizer, micro_batches, grad_clip: float | None = 1.0):
    """One optimizer step of a data x pipeline parallel run; ``(loss, grad_norm, skipped, loss_scale)``.

    ``pipe``: the ``parallel.pipeline_exec.PipelineExecutor`` of this rank's
    stage; ``mp``: the stage's ``MixedPrecision``; ``optimizer``: AdamW over
    its masters. The executor runs the schedule (every micro-batch's loss is
    divided by the global batch's token count, times the loss scale), sums the
    gradients over the data-parallel group and the tied embedding copies; then
    every rank agrees on a float16 overflow (skip together), the masters are
    clipped to the global norm over all stages, and each stage steps. A non-finite
    loss or norm without a loss scaler raises ``NonFiniteError`` on every rank.
    """
    from parallel.ddp import agree_found_inf
    from parallel.pipeline_exec import clip_grad_norm_global_, global_grad_norm

    scale = mp.scaler.get_scale() if mp.scaler.enabled else 1.0
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        result = pipe.step(micro_batches, loss_scale=scale)
        if not math.isfinite(result.loss) and not mp.scaler.enabled:  # the same global loss on every rank
            mp.zero_grad()
            raise NonFiniteError(f"loss is {result.loss}")

        def norm_over_stages(masters, max_norm):
            if max_norm:
                return clip_grad_norm_global_(masters, max_norm, pipe.pp_comm, exclude=pipe.duplicate_names)
            return global_grad_norm(masters, pipe.pp_comm, exclude=pipe.duplicate_names)

        stepped = mp.step(optimizer, grad_clip, agree_found_inf=lambda f: agree_found_inf(pipe.grid.world, f),
                          grad_norm=norm_over_stages)
    return result.loss, mp.last_grad_norm, not stepped, mp.scaler.get_scale()


def assemble_full_model(pipe, mp, optimizer, config: GPTConfig, precision: str, adamw_kwargs: dict):
    """The whole model, its MixedPrecision and its AdamW, rebuilt on world rank 0 from every stage (collective).

    Every stage's float32 master weights and optimizer state go to rank 0
    (``parallel.pipeline.gather_state``), which builds the single-process
    objects from them: so ``save_training_checkpoint`` writes the same file a
    one-process run would, whatever the layout, and ``generate`` can sample.
    Returns ``(model, mp, optimizer)`` on rank 0, None elsewhere.
    """
    import nn
    from parallel.pipeline import gather_state

    from .model import GPT

    masters = dict(mp.master_named_parameters())
    tensors = {n: (masters[n].data if n in masters else v) for n, v in pipe.stage.state_dict().items()}
    model_state, opt_state = gather_state(pipe.grid, pipe.stage, optimizer, tensors=tensors)
    if pipe.grid.world.rank != 0:
        return None
    model = GPT(config)
    model.load_state_dict(model_state)
    model.to(pipe.stage.device)
    full_mp = nn.amp.MixedPrecision(model, precision)
    full_mp.scaler.load_state_dict(mp.scaler.state_dict())
    kwargs = dict(adamw_kwargs)
    full_opt = nn.optim.AdamW(full_mp.param_groups_for_gpt(kwargs.pop("weight_decay", 0.0)), **kwargs)
    full_opt.load_state_dict(opt_state)
    return model, full_mp, full_opt


__all__ = ["KIND", "ResumeError", "NonFiniteError", "GracefulInterrupt", "step_seed", "seed_dropout_for_step",
           "rng_state", "restore_rng_state", "matmul_size_for", "measure_matmul_flops", "mfu", "MetricsWriter",
           "read_metrics",
           "params_are_finite", "save_training_checkpoint", "TrainingCheckpoint", "rank0_first", "agree_on_flags",
           "pipeline_train_step", "assemble_full_model"]
