"""The one training loop of every job: ``Trainer(job, config, comm).run()``.

It reads like nanoGPT's loop::

    while step < max_steps:
        optimizer.set_lr(cosine_with_warmup(step, ...))
        seed_dropout_for_step(seed, step)
        batch = concat(sampler.next_batch() for _ in range(grad_accum))     # this replica's rows
        result = layout.step(job, optimizer, batch, micro_batches, grad_clip) # forward, backward, AdamW
        step += 1
        log / evaluate / checkpoint / stop on a signal

and everything around it lives in the modules it calls: ``layout`` (one
process or dp x pp, ZeRO; the step), ``checkpoint`` (bitwise resume from any
layout), ``metrics`` (the metrics file, the progress display, MFU),
``signals`` (a checkpoint on Ctrl-C or SIGTERM, agreed by every rank),
``grad_stats`` (``--grad-stats``: per-layer statistics in the metrics). The
job (``llm.trainer.job.Job``) supplies the model, the batches, the loss and
its evaluation.

Exit codes (``run`` returns them, the job's command passes them on): 0 done;
130 / 143 stopped by SIGINT / SIGTERM after writing a checkpoint. Errors are
raised: ``SetupError`` and ``ResumeError`` (bad flags, layout or checkpoint:
exit 2), ``TrainingDiverged`` (exit 1), ``CheckpointWriteError`` (exit 3).
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np

import nn
from autograd import backend
from parallel.pipeline import parse_counts

from .checkpoint import (CheckpointWriteError, ResumeError, TrainingCheckpoint, remove_stale_temporaries,
                         save_training_checkpoint, seed_dropout_for_step)
from .config import BOOKKEEPING_FLAGS, TrainerConfig
from .grad_stats import GradStats, wants_stats
from .layout import Layout, NoTargetsError
from .metrics import MetricsWriter, Progress, matmul_size_for, measure_matmul_flops, mfu
from .ranks import agree_on_stop
from .signals import EXIT_CODES, GracefulStop

#: float16 training gives up after this many optimizer steps in a row overflowed
MAX_CONSECUTIVE_SKIPS = 20
CHECKPOINT_NAME = "ckpt.safetensors"


class TrainingDiverged(RuntimeError):
    """The loss or the gradients stopped being finite and the run cannot go on (exit code 1)."""


class SetupError(ValueError):
    """Flags, data, tokenizer, layout or checkpoint are unusable (exit code 2); the message says what to change."""


def check_layout(cfg: TrainerConfig, world_size: int):
    """Check --dp / --pp / --batch-size / --micro-batches against the world; fill in the defaults.

    Raises the same SetupError on every rank (every rank checks the same numbers).
    """
    if cfg.dp is None:
        if world_size % cfg.pp:
            raise SetupError(f"--pp {cfg.pp} does not divide the job's {world_size} process(es): start "
                             f"`mpirun -n <DP x {cfg.pp}> python -m mpi4py -m llm ...` or pass --dp and --pp "
                             f"with DP x PP = {world_size}")
        cfg.dp = world_size // cfg.pp
    if cfg.dp * cfg.pp != world_size:
        raise SetupError(f"--dp {cfg.dp} x --pp {cfg.pp} = {cfg.dp * cfg.pp} processes, but the job has "
                         f"{world_size}: start `mpirun -n {cfg.dp * cfg.pp} python -m mpi4py -m llm ...` (or leave "
                         f"out mpirun and let --dp/--pp start it), or choose --dp and --pp with DP x PP = {world_size}")
    if cfg.batch_size % cfg.dp:
        raise SetupError(f"--batch-size {cfg.batch_size} (sequences over all replicas) is not divisible by --dp "
                         f"{cfg.dp}; use a multiple of {cfg.dp}")
    rows = cfg.batch_size // cfg.dp * cfg.grad_accum
    if cfg.micro_batches is None:
        cfg.micro_batches = cfg.grad_accum * cfg.pp
    if rows % cfg.micro_batches:
        raise SetupError(f"each replica gets {rows} sequences per step (--batch-size {cfg.batch_size} / --dp "
                         f"{cfg.dp} x --grad-accum {cfg.grad_accum}), which cannot be split into --micro-batches "
                         f"{cfg.micro_batches} equal parts; choose --micro-batches among the divisors of {rows}")
    if cfg.zero and cfg.dp == 1:
        raise SetupError("--zero 1 shards the optimizer state over the data-parallel replicas; it needs --dp 2 or "
                         "more")
    if cfg.min_lr is not None and cfg.min_lr > cfg.lr:
        raise SetupError(f"--min-lr {cfg.min_lr} is larger than --lr {cfg.lr}")
    try:
        backend.normalize_device(cfg.device)
        if cfg.device != "cpu":
            backend.require_cupy()
    except (ValueError, RuntimeError) as e:
        raise SetupError(str(e)) from None


def concat_batches(batches: list) -> dict:
    """Stack the rows of several batches (dicts of arrays) into one."""
    if len(batches) == 1:
        return batches[0]
    xp = backend.get_array_module(*batches[0].values())
    return {k: xp.concatenate([b[k] for b in batches]) for k in batches[0]}


class Trainer:
    """Trains ``job`` with ``config`` over ``comm`` (the MPI world; None: one process). See the module doc.

    ``run()`` returns the exit code. During the run, ``layout`` (the model's
    part on this rank, mixed precision, the executor) and ``optimizer`` are
    there for the job's hooks (``eval_loss``, ``full_model``).
    """

    def __init__(self, job, config: TrainerConfig, comm=None, log=None):
        from parallel import get_world

        self.job, self.cfg = job, config
        self.comm = comm if comm is not None else get_world()
        self.main_rank = self.comm.rank == 0
        self.log = log if log is not None else (print if self.main_rank else (lambda *a, **k: None))
        self.layout = self.optimizer = None
        self.out_dir = Path(config.out_dir)
        self.ckpt_path = self.out_dir / CHECKPOINT_NAME

    # -- services for the job's hooks -----------------------------------------------------------
    def eval_loss(self, batches) -> float:
        """The mean of the job's loss over ``batches`` (the same list on every rank), forward only; collective."""
        return self.layout.eval_loss(self.job, list(batches))

    def full_model(self):
        """The whole float32 model on rank 0 (None elsewhere), e.g. to sample from; a collective call."""
        return self.layout.full_model(self.job.build_model)

    # -- the run ----------------------------------------------------------------------------------
    def _resume_checkpoint(self):
        cfg = self.cfg
        if cfg.resume is not None:
            path = Path(cfg.resume) if cfg.resume else self.ckpt_path
            if not path.exists():
                raise SetupError(f"--resume: there is no checkpoint at {path}; pass its path (--resume PATH) or "
                                 "the --out-dir of the run to continue")
            return TrainingCheckpoint.load(path)  # verified before any work
        if self.ckpt_path.exists() and not cfg.overwrite:
            raise SetupError(f"{self.ckpt_path} already exists: add --resume to continue that run, --overwrite to "
                             "start a new one in its place, or choose another --out-dir")
        return None

    def _build(self, resume):
        cfg, job = self.cfg, self.job
        if not self.main_rank:  # rank 0 says it once for the job
            warnings.filterwarnings("ignore", category=nn.amp.SlowPrecisionWarning)
        model = job.build_model()
        precision = nn.amp.Precision.from_name(cfg.precision)
        precision_meta = {"compute_dtype": precision.compute_dtype, "master_dtype": precision.master_dtype}
        if resume is not None:
            resume.check_compatible(model.config, getattr(job, "tokenizer", None), precision_meta)
            resume.load_model(model)
        if cfg.recompute:
            model.recompute = True
        try:
            counts = parse_counts(cfg.stage_layout)
            self.layout = Layout.build(model, self.comm, dp=cfg.dp, pp=cfg.pp, zero=bool(cfg.zero),
                                       precision=cfg.precision, device=cfg.device, n_micro=cfg.micro_batches,
                                       schedule=cfg.schedule, stage_counts=counts)
        except ValueError as e:
            raise SetupError(f"--pp / --stage-layout / --precision: {e}") from None
        lay = self.layout
        groups = lay.mp.master_params_for(job.param_groups(lay.model, cfg.weight_decay))
        self.optimizer = nn.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
        try:
            self.sampler = job.train_sampler(lay.grid.dp_rank, cfg.dp)
        except ValueError as e:
            raise SetupError(str(e)) from None
        self.precision_meta = precision_meta
        if cfg.pp > 1 or cfg.dp > 1:
            self.log(f"parallel: {cfg.dp} data-parallel replica(s) x {cfg.pp} pipeline stage(s) on {self.comm.size} "
                     f"processes; blocks per stage {[len(r) for r in lay.blocks_per_stage]}; {cfg.schedule} schedule, "
                     f"{cfg.micro_batches} micro-batches per step" + ("; ZeRO-1" if cfg.zero else ""))

    def _restore(self, resume) -> tuple[int, int]:
        """Load the optimizer, scaler, sampler and RNG state; return ``(step, tokens seen)``."""
        cfg = self.cfg
        try:
            self.layout.load_state(resume.model_state(), resume.optimizer_state(), self.optimizer,
                                   resume.scaler_state)
            self.sampler.load_state_dict(resume.sampler_state)
        except (ValueError, KeyError, TypeError) as e:
            raise ResumeError(f"checkpoint {resume.path} cannot be resumed by this run: {e}") from None
        resume.restore_rng()
        for change in resume.changed_flags(cfg.flags, ignore=BOOKKEEPING_FLAGS):
            self.log(f"note: a flag differs from the checkpointed run ({change}); the run will not match an "
                     "uninterrupted one bit for bit")
        theirs = resume.train_config
        if theirs:
            old = theirs.get("lr_decay_steps") or theirs.get("max_steps")
            if old is not None and old != cfg.decay_steps:
                self.log(f"note: the learning rate's cosine now ends at step {cfg.decay_steps}, not {old} as in the "
                         f"checkpointed run, so the rate from here on differs from that run's; to continue its "
                         f"schedule exactly, pass --lr-decay-steps {old}")
        tokens = resume.metadata.get("tokens")
        step = resume.step
        self.log(f"resumed from {resume.path} at step {step}")
        return step, int(tokens) if isinstance(tokens, int) else 0

    def run(self) -> int:
        """Train; returns the exit code (0 done, 130/143 stopped by a signal with a checkpoint)."""
        cfg, job, comm = self.cfg, self.job, self.comm
        t_start = time.perf_counter()
        check_layout(cfg, comm.size)
        resume = self._resume_checkpoint()
        if self.main_rank:
            remove_stale_temporaries(self.out_dir, [CHECKPOINT_NAME, Path(cfg.metrics or "metrics.jsonl").name],
                                     log=self.log)
        self._build(resume)
        lay, opt = self.layout, self.optimizer
        step, tokens = self._restore(resume) if resume is not None else (0, 0)
        resumed_from = str(resume.path) if resume is not None else None
        start_step = step
        del resume

        config = lay.config
        fpt = job.flops_per_token(config)
        n_mm = matmul_size_for(config)
        peak = measure_matmul_flops(cfg.device, n_mm)  # the best rate seen: measured again at every evaluation
        self.log(f"training: {cfg.max_steps} steps of {cfg.batch_size} x {cfg.grad_accum} sequences, {cfg.precision} on "
                 f"{cfg.device}; float32 {n_mm}x{n_mm} matmul: {peak / 1e9:.1f} GFLOP/s (the MFU denominator)")
        warmup = min(cfg.warmup_steps, cfg.decay_steps)
        if warmup < cfg.warmup_steps:
            self.log(f"note: the warm-up is cut to {warmup} steps, the length of the decay")

        if self.main_rank:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        metrics_path = Path(cfg.metrics) if cfg.metrics else self.out_dir / "metrics.jsonl"
        metrics = MetricsWriter(metrics_path, resume_step=start_step if resumed_from is not None else None,
                                enabled=self.main_rank)
        state = {"last_ckpt": resumed_from, "saved_step": start_step, "metrics": {}}

        def checkpoint(step):
            if state["saved_step"] == step and state["last_ckpt"] == str(self.ckpt_path):
                return
            model_state, opt_state = lay.gather_state(opt)  # collective: rank 0 gets the whole model
            error = None
            if self.main_rank:
                try:
                    save_training_checkpoint(
                        self.ckpt_path, model_state=model_state, opt_state=opt_state, config=config,
                        precision=self.precision_meta, scaler_state=lay.mp.scaler.state_dict(),
                        sampler_state=self.sampler.state_dict(), step=step, seed=cfg.seed, job=job.name,
                        tokenizer_json=job.checkpoint_metadata().get("tokenizer"),
                        train_config={**cfg.flags, "lr_decay_steps": cfg.decay_steps},
                        extra_metadata={**{k: v for k, v in job.checkpoint_metadata().items() if k != "tokenizer"},
                                        "tokens": tokens, **{k: v for k, v in state["metrics"].items()
                                                             if k in ("val_loss",)}})
                except nn.amp.NonFiniteError as e:
                    error = ("diverged", str(e))
                except CheckpointWriteError as e:
                    error = ("write", str(e))
            if comm.size > 1:
                error = comm.bcast(error, root=0)  # every rank stops together when rank 0 cannot write
            if error is not None:
                if error[0] == "write":
                    raise CheckpointWriteError(28, error[1])
                raise TrainingDiverged(f"{error[1]}; the last good checkpoint is {state['last_ckpt'] or 'none yet'}; "
                                       "lower --lr")
            state["last_ckpt"], state["saved_step"] = str(self.ckpt_path), step

        progress = Progress(cfg.max_steps, step, enabled=self.main_rank and cfg.progress, desc=job.name)
        grad_stats = GradStats(lay) if cfg.grad_stats else None  # --grad-stats; None: no hook, no cost
        step_time, steps_since_log, skipped_total, skips_in_row = 0.0, 0, 0, 0  # step_time: seconds in steps
        tokens_since_log = 0
        time_up = False
        stop_signal = None  # the stop every rank agreed on; stop.requested is the handler's and may be newer
        stop = GracefulStop(lambda name: progress.write(
            f"{name}: stopping after this step, with a checkpoint (a second signal aborts without one)"))
        try:
            with stop:
                while step < cfg.max_steps:
                    t0 = time.perf_counter()
                    lr = nn.optim.cosine_with_warmup(step, cfg.lr, warmup, cfg.decay_steps, cfg.final_lr)
                    opt.set_lr(lr)
                    seed_dropout_for_step(cfg.seed, step)
                    batch = concat_batches([self.sampler.next_batch() for _ in range(cfg.grad_accum)])
                    batch = {k: backend.to_device(v, cfg.device) for k, v in batch.items()}
                    step_tokens = int(np.prod(job.inputs(batch).shape)) * cfg.dp
                    stats_step = grad_stats is not None and wants_stats(step + 1, cfg)  # the same on every rank
                    if stats_step:
                        grad_stats.arm()
                    try:
                        result = lay.step(job, opt, batch, cfg.micro_batches, cfg.grad_clip,
                                          observe_grads=grad_stats.observe_grads if stats_step else None)
                    except NoTargetsError as e:
                        raise SetupError(f"{e} at step {step + 1}: the data gives a batch without targets; check "
                                         "the job's labels (-100 marks the positions without a loss)") from None
                    except nn.amp.NonFiniteError as e:
                        hint = "lower --lr" + ("" if cfg.grad_clip else " or enable --grad-clip")
                        raise TrainingDiverged(f"{e} at step {step + 1}; the last good checkpoint is "
                                               f"{state['last_ckpt'] or 'none (none was written yet)'}; {hint}") from None
                    step_stats = grad_stats.finish() if stats_step else None  # collective; rank 0 gets them
                    step += 1
                    tokens += step_tokens
                    steps_since_log += 1
                    tokens_since_log += step_tokens
                    step_time += time.perf_counter() - t0
                    progress.update(1)
                    skipped_total += result.skipped
                    skips_in_row = skips_in_row + 1 if result.skipped else 0
                    diverged = skips_in_row >= MAX_CONSECUTIVE_SKIPS
                    time_up = cfg.max_minutes is not None and time.perf_counter() - t_start > 60 * cfg.max_minutes
                    # the same on every rank; a signal that lands during the all-gather stays in stop.requested
                    # (never overwritten here) and is agreed on after the next step
                    stop_signal, (time_up,) = agree_on_stop(comm, stop.requested, time_up)
                    stopping = stop_signal is not None
                    last = step == cfg.max_steps or time_up or stopping or diverged
                    evaluating = (step % cfg.eval_interval == 0 or last) and not (stopping or diverged)

                    if step % cfg.log_interval == 0 or evaluating or last or stats_step:
                        tps = tokens_since_log / step_time  # training only: no evals, no checkpoints
                        step_time, steps_since_log, tokens_since_log = 0.0, 0, 0
                        record = {"step": step, "loss": result.loss, "lr": lr, "grad_norm": result.grad_norm,
                                  "tokens_per_s": tps, "mfu": mfu(fpt, tps, peak * comm.size),
                                  "skipped": result.skipped, "skipped_total": skipped_total, "tokens": tokens}
                        if lay.mp.scaler.enabled:
                            record["loss_scale"] = result.loss_scale
                        record.update(job.train_metrics(self))  # collective: every rank logs at the same steps
                        if step_stats is not None:
                            record["grad_stats"] = step_stats
                        progress.show(step, result.loss, tps, record["mfu"])
                        if evaluating:
                            found = job.evaluate(self, step)
                            state["metrics"] = found
                            # the matmul rate again: a busy neighbour at start-up must not inflate every later MFU
                            peak = max(peak, measure_matmul_flops(cfg.device, n_mm, seconds=0.25))
                            record.update(found, matmul_flops=peak)
                            shown = ", ".join(f"{k} {v:.4f}" for k, v in found.items() if isinstance(v, float))
                            if self.main_rank:
                                progress.write(f"step {step}: train loss {result.loss:.4f}"
                                               + (f", {shown}" if shown else "") + f", lr {lr:.2e}")
                            if not last:
                                job.on_evaluated(self, step, found, last=False)
                        metrics.write(record)
                    if diverged:
                        raise TrainingDiverged(
                            f"{skips_in_row} steps in a row overflowed in float16 (the loss scale fell to "
                            f"{result.loss_scale:g}) at step {step}; the last good checkpoint is "
                            f"{state['last_ckpt'] or 'none (none was written yet)'}; lower --lr or train in fp32")
                    if (cfg.ckpt_interval and step % cfg.ckpt_interval == 0) or last:
                        checkpoint(step)
                    if last:
                        break
        finally:
            progress.close()
            metrics.close()
        if stop_signal is not None:
            self.log(f"stopped at step {step} by a signal; checkpoint: {state['last_ckpt']}; continue with the same "
                     "command and --resume")
            return EXIT_CODES[stop_signal]

        # -- the end ---------------------------------------------------------------------------------
        checkpoint(step)  # a no-op when the last step's checkpoint is written (or was resumed from, unchanged)
        if not state["metrics"]:  # nothing was trained in this call (the checkpoint was already at --max-steps)
            state["metrics"] = job.evaluate(self, step)
        elapsed = time.perf_counter() - t_start
        why = f" (stopped by --max-minutes {cfg.max_minutes:g})" if time_up else ""
        line = job.summary(self, step, state["metrics"])
        self.log(f"done{why}: {step} steps, {tokens:,} tokens, {elapsed / 60:.1f} min; checkpoint {state['last_ckpt']}"
                 + (f"\n{line}" if line else ""))
        job.on_evaluated(self, step, state["metrics"], last=True)
        return 0


def exit_code_for(error: BaseException) -> int:
    """The documented exit code of a trainer error: 1 diverged, 2 bad input, 3 cannot write the checkpoint."""
    if isinstance(error, TrainingDiverged):
        return 1
    if isinstance(error, CheckpointWriteError):
        return 3
    return 2


__all__ = ["Trainer", "TrainingDiverged", "SetupError", "check_layout", "concat_batches", "exit_code_for",
           "MAX_CONSECUTIVE_SKIPS", "CHECKPOINT_NAME"]
