"""The trainer's settings and the command-line flags every training job shares.

``add_trainer_flags(parser)`` adds the optimisation, evaluation/logging/
checkpoint, parallelism and memory flags to a job's parser (``python -m llm
train``, ``sft``, ``dpo``, ...); ``TrainerConfig.from_args(args)`` reads them
back. A job adds its own flags (data, model, loss) beside them.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, field, fields


def positive_int(s):
    """argparse type: an integer >= 1."""
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def nonneg_int(s):
    """argparse type: an integer >= 0."""
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {s}")
    return v


def nonneg_float(s):
    """argparse type: a finite number >= 0."""
    v = float(s)
    if not v >= 0 or not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {s}")
    return v


def positive_float(s):
    """argparse type: a finite number > 0."""
    v = float(s)
    if not v > 0 or not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {s}")
    return v


def unit_float(s):
    """argparse type: a number in [0, 1)."""
    v = float(s)
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {s}")
    return v


@dataclass
class TrainerConfig:
    """Every setting of the trainer (the flags of ``add_trainer_flags``; see their help)."""

    out_dir: str = "runs/run"
    batch_size: int = 16
    grad_accum: int = 1
    max_steps: int = 2000
    max_minutes: float | None = None
    lr: float = 2e-3
    min_lr: float | None = None
    warmup_steps: int = 100
    lr_decay_steps: int | None = None
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    precision: str = "fp32"
    device: str = "cpu"
    seed: int = 1337
    eval_interval: int = 500
    eval_batches: int = 40
    log_interval: int = 10
    ckpt_interval: int = 500
    metrics: str | None = None
    resume: str | None = None
    overwrite: bool = False
    progress: bool = True
    dp: int | None = None
    pp: int = 1
    schedule: str = "1f1b"
    micro_batches: int | None = None
    stage_layout: str | None = None
    zero: int = 0
    recompute: bool = False
    grad_stats: bool = False
    flags: dict = field(default_factory=dict)  # every flag of the run, recorded in checkpoints

    @classmethod
    def from_args(cls, args, out_dir: str) -> "TrainerConfig":
        """The settings from parsed flags (``add_trainer_flags``); ``out_dir`` where ``--out-dir`` is not given."""
        names = {f.name for f in fields(cls)} - {"out_dir", "progress", "flags"}
        values = {n: getattr(args, n) for n in names if hasattr(args, n)}
        flags = {k: v for k, v in vars(args).items() if k not in ("resume", "overwrite")}
        return cls(out_dir=args.out_dir if args.out_dir is not None else out_dir,
                   progress=not getattr(args, "no_progress", False), flags=flags, **values)

    @property
    def decay_steps(self) -> int:
        """The step at which the cosine reaches ``min_lr``: ``lr_decay_steps``, else ``max_steps``."""
        return self.max_steps if self.lr_decay_steps is None else self.lr_decay_steps

    @property
    def final_lr(self) -> float:
        """``min_lr``, else ``lr / 10``."""
        return self.lr / 10 if self.min_lr is None else self.min_lr


#: flags that say nothing about the training trajectory (not compared when resuming)
BOOKKEEPING_FLAGS = ("resume", "overwrite", "max_minutes", "metrics", "out_dir", "no_progress", "data_dir",
                     "eval_interval", "eval_batches", "log_interval", "ckpt_interval", "sample_prompt",
                     "sample_tokens", "max_steps", "lr_decay_steps", "grad_stats")


def add_trainer_flags(parser: argparse.ArgumentParser, defaults: dict | None = None, rows: str = "sequences",
                      averaged_over: str = "tokens"):
    """Add the flags every training job shares to ``parser`` (``defaults`` overrides the defaults, by dest).

    ``rows`` names what a batch is made of and ``averaged_over`` what the loss is a mean over, for the
    help of ``--batch-size`` and ``--grad-accum`` (DPO: preference pairs, averaged over pairs).
    """
    d = {f.name: f.default for f in fields(TrainerConfig) if f.name != "flags"}
    d.update(defaults or {})

    t = parser.add_argument_group("optimization")
    t.add_argument("--batch-size", metavar="N", type=positive_int, default=d["batch_size"],
                   help=f"{rows} per micro-batch, over all processes (default {d['batch_size']})")
    t.add_argument("--grad-accum", metavar="N", type=positive_int, default=d["grad_accum"],
                   help=f"micro-batches per optimizer step; the loss is the mean over all of their {averaged_over} "
                        f"(default {d['grad_accum']})")
    t.add_argument("--max-steps", metavar="N", type=nonneg_int, default=d["max_steps"],
                   help=f"optimizer steps to train for (default {d['max_steps']})")
    t.add_argument("--max-minutes", metavar="X", type=positive_float, default=d["max_minutes"],
                   help="wall-clock budget: stop (evaluate, checkpoint) once this many minutes have passed since the "
                        "start. A safety net for slow machines: a run it stops has a machine-dependent length, so "
                        "--max-steps is the control (default: no limit)")
    t.add_argument("--lr", metavar="X", type=positive_float, default=d["lr"],
                   help=f"peak learning rate (default {d['lr']:g})")
    t.add_argument("--min-lr", metavar="X", type=nonneg_float, default=d["min_lr"],
                   help="learning rate at the end of the cosine decay (default --lr / 10)")
    t.add_argument("--warmup-steps", metavar="N", type=nonneg_int, default=d["warmup_steps"],
                   help=f"steps of linear warm-up from --lr/warmup to --lr (default {d['warmup_steps']})")
    t.add_argument("--lr-decay-steps", metavar="N", type=nonneg_int, default=d["lr_decay_steps"],
                   help="step at which the cosine decay reaches --min-lr (default --max-steps). To extend a finished "
                        "run with --resume and a larger --max-steps without changing its schedule, pass its old "
                        "--max-steps here; set it from the start for a run you mean to extend")
    t.add_argument("--weight-decay", metavar="X", type=nonneg_float, default=d["weight_decay"],
                   help="AdamW's decoupled weight decay on the matrices (not biases, norms, embeddings) "
                        f"(default {d['weight_decay']:g})")
    t.add_argument("--beta1", metavar="X", type=unit_float, default=d["beta1"],
                   help=f"AdamW beta1 (default {d['beta1']:g})")
    t.add_argument("--beta2", metavar="X", type=unit_float, default=d["beta2"],
                   help=f"AdamW beta2 (default {d['beta2']:g})")
    t.add_argument("--grad-clip", metavar="X", type=nonneg_float, default=d["grad_clip"],
                   help=f"clip the gradients' global L2 norm to this; 0 turns clipping off (default {d['grad_clip']:g})")
    t.add_argument("--precision", default=d["precision"], choices=["fp32", "fp16", "bf16", "fp64"],
                   help="fp32; fp16 (float16 compute, float32 master weights, dynamic loss scaling: fast on GPUs, "
                        "many times slower than fp32 on a CPU, where NumPy has no fast float16 product); bf16 (needs "
                        "an array library with bfloat16); fp64 (double precision throughout: gradient studies, exact "
                        f"comparisons) (default {d['precision']})")
    t.add_argument("--device", default=d["device"], metavar="DEVICE",
                   help=f"'cpu' or 'cuda' / 'cuda:N' (needs CuPy) (default {d['device']})")
    t.add_argument("--seed", metavar="N", type=nonneg_int, default=d["seed"],
                   help=f"seed of the initial weights, the batches, dropout and the samples (default {d['seed']})")

    o = parser.add_argument_group("evaluation, logging, checkpoints")
    o.add_argument("--eval-interval", metavar="N", type=positive_int, default=d["eval_interval"],
                   help=f"evaluate every N steps, and at the end (default {d['eval_interval']})")
    o.add_argument("--eval-batches", metavar="N", type=positive_int, default=d["eval_batches"],
                   help=f"validation batches (of --batch-size sequences) per evaluation (default {d['eval_batches']})")
    o.add_argument("--log-interval", metavar="N", type=positive_int, default=d["log_interval"],
                   help="write a metrics line (and update the progress display) every N steps "
                        f"(default {d['log_interval']})")
    o.add_argument("--ckpt-interval", metavar="N", type=nonneg_int, default=d["ckpt_interval"],
                   help="write the checkpoint every N steps (and always at the end); 0: only at the end "
                        f"(default {d['ckpt_interval']})")
    o.add_argument("--out-dir", default=None, metavar="DIR",
                   help=f"folder for the checkpoint and the metrics (default {d['out_dir']}, relative to the current "
                        "folder)")
    o.add_argument("--metrics", default=None, metavar="PATH",
                   help="metrics file, one JSON object per logged step (default OUT_DIR/metrics.jsonl)")
    o.add_argument("--resume", nargs="?", const="", default=None, metavar="CKPT",
                   help="continue from a checkpoint (default OUT_DIR/ckpt.safetensors) with the same flags; the "
                        "losses then match an uninterrupted run bit for bit")
    o.add_argument("--overwrite", action="store_true",
                   help="start afresh even though OUT_DIR already holds a checkpoint (it is replaced at the first "
                        "checkpoint of the new run)")
    o.add_argument("--grad-stats", action="store_true",
                   help="add per-layer statistics to the metrics lines (and at the first step, the initial weights): "
                        "each layer's and each parameter group's gradient norm and update-to-weight ratio, and the "
                        "RMS of each block's output; `python -m llm gradients OUT_DIR` plots them. Costs nothing "
                        "when off, a fraction of a step per metrics line when on")
    o.add_argument("--no-progress", action="store_true",
                   help="no progress display (a bar on a terminal, a line per --log-interval elsewhere; on stderr)")

    par = parser.add_argument_group(
        "parallelism", "DP x PP processes. Without mpirun, --dp/--pp start it: python -m llm train --dp 2 --pp 2 "
                       "(Ctrl-C then stops every rank with a checkpoint). Under your own mpirun: mpirun -n 4 python "
                       "-m mpi4py -m llm train --dp 2 --pp 2 (world rank = stage * DP + replica; stop it with a "
                       "checkpoint by `kill -USR1 <mpirun pid>`: Open MPI kills the ranks at once on Ctrl-C). Only "
                       "rank 0 prints and writes files; the checkpoint is the one file a single process writes, so "
                       "a run resumes on any number of processes")
    par.add_argument("--dp", metavar="N", type=positive_int, default=d["dp"],
                     help="data-parallel replicas: each draws its share of every batch and the gradients are summed "
                          "over them (default: the number of MPI processes / --pp)")
    par.add_argument("--pp", metavar="N", type=positive_int, default=d["pp"],
                     help="pipeline stages: the model's blocks are split into N consecutive groups, one per process, "
                          "embeddings on the first and the head and loss on the last (default 1)")
    par.add_argument("--schedule", default=d["schedule"], choices=["1f1b", "gpipe"],
                     help="pipeline schedule: 1f1b (one forward, one backward; stage s holds at most PP - s "
                          "micro-batches of activations) or gpipe (all forwards, then all backwards; holds all of "
                          "them); same result, same bubble (default 1f1b)")
    par.add_argument("--micro-batches", metavar="M", type=positive_int, default=d["micro_batches"],
                     help="micro-batches per optimizer step: each replica's rows of the step's --batch-size x "
                          "--grad-accum sequences are split into M equal parts; the pipeline's idle fraction is "
                          "(PP-1)/(M+PP-1) (default: --grad-accum x --pp)")
    par.add_argument("--stage-layout", metavar="COUNTS", default=d["stage_layout"],
                     help="blocks per pipeline stage, comma-separated, e.g. 3,1 (default: balanced by parameter "
                          "count, the head's counted on the last stage)")
    par.add_argument("--zero", metavar="STAGE", type=int, choices=[0, 1], default=d["zero"],
                     help="1: ZeRO stage 1, the float32 master weights and AdamW's moments sharded over the --dp "
                          "replicas (1/DP of that memory on each); a checkpoint written with it resumes without it and "
                          "on other world sizes (default 0)")

    m = parser.add_argument_group("memory")
    m.add_argument("--recompute", action="store_true",
                   help="activation recomputation: each block keeps only its input during the forward and "
                        "recomputes its activations in the backward (about a third more compute, much less memory)")
    return parser


def threads_note() -> str:
    """The one piece of thread advice, shared by the README and every job's --help."""
    return ("The CPU ops use one thread per core (per MPI rank on a machine). On a CPU other busy processes share, "
            "prefix OMP_NUM_THREADS=1: threads that must meet slow down several times under contention.")


def default_out_dir(job: str, preset: str) -> str:
    """``runs/<preset>`` for pre-training, ``runs/<preset>-<job>`` for the others."""
    return os.path.join("runs", preset if job == "pretrain" else f"{preset}-{job}")


__all__ = ["TrainerConfig", "add_trainer_flags", "BOOKKEEPING_FLAGS", "threads_note", "default_out_dir",
           "positive_int", "nonneg_int", "nonneg_float", "positive_float", "unit_float"]
