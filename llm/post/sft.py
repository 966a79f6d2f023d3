"""`python -m llm sft`: supervised fine-tuning of a pre-trained GPT on conversations or instructions.

    python -m llm sft --data natural_instructions --subtasks 'subtask04[1-7]*' --packing
    python -m llm sft --data-file chats.jsonl --model runs/tiny/ckpt.safetensors --lora-rank 8
    python -m llm sft --model gpt2_folder/ --data-file alpaca.jsonl --template alpaca
    python -m llm sft --dp 2 ...                  # two data-parallel processes (mpirun), the same run

Each record becomes a conversation, rendered by ``llm.post.chat.render`` (the chat tokens are
added to the tokenizer and the model first if they are missing), cut to the context (the prompt
from the left), and turned into next-token labels that are -100 everywhere but the assistant's
replies and their ``<|end|>``. The loss is the cross-entropy summed over those labels and divided
by their number in the whole step (every micro-batch, every replica): a mean over the step's answer
tokens, never a mean of per-sequence means. Rows are right-padded, or with ``--packing`` several
examples share a row (best-fit decreasing) with positions restarting at 0 and a block-diagonal
attention mask; both give the same loss.

A held-out set (``--val-size`` records, the same split whatever the seed) is scored at every
evaluation: ``val_loss`` (the mean loss on its assistant tokens) and, from greedy replies to the
first ``--eval-replies`` of its prompts, ``replies_stop`` (the share that ends with ``<|end|>``),
``replies_in_template`` and ``replies_exact``. ``--max-steps 0`` scores the starting model.

The training itself is the one trainer's (``llm.trainer``): ``--resume`` continues bitwise, ``--dp``
/ ``--pp`` run under mpirun, Ctrl-C stops with a checkpoint. Exit codes as ``python -m llm train``.
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np

from ..trainer import Job, SetupError, add_trainer_flags
from ..trainer.config import nonneg_int, positive_int, threads_note
from .chat import ChatFormatError, next_token_labels, render, truncate
from .data import DATASETS, DataError, load_conversations
from .packing import RowSampler, attention_mask, batches_of, pack_rows, pad_rows
from .replies import reply_stats
from .start import LoRASettings, StartingPoint, add_start_flags, check_lora_args, save_lora_outputs

DEFAULT_MODEL = "runs/tiny/ckpt.safetensors"
#: the held-out records are drawn with this seed, whatever --seed is, so every run scores the same ones
SPLIT_SEED = 0


def split_indices(n: int, val_size: int, max_train: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(train, held-out)`` indices of ``n`` records: a fixed permutation, the first ``val_size`` held out."""
    order = np.random.default_rng(SPLIT_SEED).permutation(n)
    val, train = order[:val_size], order[val_size:]
    if max_train is not None:
        train = train[:max_train]
    return train, val


def render_examples(tokenizer, conversations, template: str, max_tokens: int, log=print, what="examples"):
    """``[(input_ids, labels)]`` of conversations rendered in ``template`` and cut to ``max_tokens`` tokens.

    Says how many prompts were cut from the left (and by how much at most), and
    how many answers were longer than the context on their own (cut at their end).
    """
    out, cut_prompts, cut_answers, most = [], 0, 0, 0
    for where, conv in conversations:
        try:
            rendered = render(tokenizer, conv, template=template)
        except ChatFormatError as e:
            raise DataError(f"{where}: {e}") from None
        fitted, cut_p, cut_a = truncate(rendered, max_tokens)
        cut_prompts += cut_p > 0
        cut_answers += cut_a > 0
        most = max(most, cut_p)
        x, y = next_token_labels(fitted)
        out.append((np.asarray(x, dtype=np.int64), np.asarray(y, dtype=np.int64)))
    if cut_prompts or cut_answers:
        log(f"{what}: {cut_prompts} of {len(out)} prompts were longer than the context ({max_tokens - 1} positions) "
            f"and lost tokens from the left (at most {most})" + (
                f"; {cut_answers} answers were longer than the context on their own and were cut at their end "
                "(those lose their <|end|>)" if cut_answers else ""))
    return out


class SFTJob(Job):
    """Supervised fine-tuning (see the module docstring): next-token loss on the assistant's tokens only."""

    name = "sft"

    def __init__(self, args, comm=None, log=print):
        self.args, self.log = args, log
        self.start = StartingPoint(args.model, args.template, LoRASettings.from_args(args), args.seed, "add", log)
        self.tokenizer = self.start.tokenizer
        config = self.start.config
        length = config.block_size if args.max_length is None else args.max_length
        if length > config.block_size:
            raise SetupError(f"--max-length {length} is longer than the model's context ({config.block_size})")
        self.length = length
        try:
            conversations = load_conversations(args.data_file, None if args.data_file else args.data, args.subtasks,
                                               log=log)
        except DataError as e:
            raise SetupError(str(e)) from None
        val_size = min(args.val_size, len(conversations) // 2)
        train_idx, val_idx = split_indices(len(conversations), val_size, args.max_examples)
        self.val_conversations = [conversations[i][1] for i in val_idx]
        try:
            train = render_examples(self.tokenizer, [conversations[i] for i in train_idx], args.template, length + 1,
                                    log, "training examples")
            val = render_examples(self.tokenizer, [conversations[i] for i in val_idx], args.template, length + 1,
                                  lambda *a: None)
        except DataError as e:
            raise SetupError(str(e)) from None
        pad = self.start.tokens.pad
        width = length if args.packing else max(len(x) for x, _ in train)
        self.train_rows = pack_rows(train, width, pad) if args.packing else pad_rows(train, width, pad)
        self.val_rows = pad_rows(val, max(len(x) for x, _ in val), pad) if val else None
        n_rows = len(self.train_rows["input_ids"])
        tokens = sum(int((y != -100).sum()) for _, y in train)
        log(f"data: {len(train):,} training examples in {n_rows:,} rows of {width} positions"
            + (f" (packed, {sum(len(x) for x, _ in train) / (n_rows * width):.0%} full)" if args.packing else "")
            + f", {tokens:,} answer tokens; {len(val):,} held out")

    # -- the job --------------------------------------------------------------------------------
    def build_model(self):
        return self.start.build()

    def train_sampler(self, rank, world):
        return RowSampler(self.train_rows, self.args.batch_size, self.args.seed, rank, world)

    def model_kwargs(self, batch):
        if "segment_ids" not in batch:
            return {}
        return {"position_ids": batch["position_ids"], "attention_mask": attention_mask(batch["segment_ids"])}

    def evaluate(self, trainer, step):
        if self.val_rows is None:
            return {}
        rows = batches_of(self.val_rows, self.args.batch_size)[:self.args.eval_batches]
        metrics = {"val_loss": trainer.eval_loss(rows)}
        metrics.update(self._replies(trainer))
        return metrics

    def _replies(self, trainer) -> dict:
        """Greedy replies to the first --eval-replies held-out prompts (rank 0; every rank gets the numbers)."""
        n = self.args.eval_replies
        if not n:
            return {}
        model = trainer.full_model()  # collective
        stats = None
        if model is not None:
            stats = reply_stats(model, self.tokenizer, self.val_conversations[:n], self.args.template,
                                self.args.max_new_tokens)
        if trainer.comm.size > 1:
            stats = trainer.comm.bcast(stats, root=0)
        return stats

    def on_evaluated(self, trainer, step, metrics, last):
        if not (last and self.start.lora.rank):
            return
        model = trainer.full_model()  # collective
        if model is not None:
            save_lora_outputs(trainer.out_dir, model, self.tokenizer, self.start.lora, log=self.log)

    def checkpoint_metadata(self):
        return self.start.metadata()

    def summary(self, trainer, step, metrics):
        val = metrics.get("val_loss")
        if val is None or not math.isfinite(val):
            return None
        line = f"held-out loss on assistant tokens {val:.4f} nats/token"
        if "replies_n" in metrics:
            line += (f"; greedy replies to {metrics['replies_n']} held-out prompts: {metrics['replies_stop']:.0%} "
                     f"stop with <|end|>, {metrics['replies_in_template']:.0%} stay in the template, "
                     f"{metrics['replies_exact']:.0%} exact")
        return line


# ---------------------------------------------------------------------------
# flags
# ---------------------------------------------------------------------------


def add_data_flags(parser, kind: str, default_data: str):
    """``--data``, ``--data-file``, ``--subtasks``, ``--val-size`` (shared with dpo)."""
    names = [k for k, (k_kind, _) in DATASETS.items() if k_kind == kind]
    d = parser.add_argument_group("data")
    d.add_argument("--data", default=default_data, choices=names,
                   help="real data fetched once into the cache: " + "; ".join(
                       f"{k}: {DATASETS[k][1]}" for k in names) + f" (default {default_data})")
    d.add_argument("--data-file", default=None, metavar="FILE.jsonl",
                   help="your own JSON lines instead of --data (Hugging Face field names; see the README)")
    d.add_argument("--subtasks", default=None, metavar="GLOBS",
                   help="keep only these subtasks / tasks of --data, comma-separated glob patterns (e.g. "
                        "'subtask041*,subtask033*' of natural_instructions)")
    d.add_argument("--val-size", metavar="N", type=nonneg_int, default=200,
                   help="records held out for evaluation, drawn the same way whatever --seed is (at most half the "
                        "data; 0: none) (default 200)")
    return d


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m llm sft`` argument parser."""
    p = argparse.ArgumentParser(
        prog="python -m llm sft",
        description="Supervised fine-tuning: teach a pre-trained GPT to answer in a chat template, with the loss on "
                    "the assistant's tokens only. Full fine-tuning or LoRA; padded or packed rows; one process or "
                    "--dp/--pp under mpirun; --resume continues bitwise.",
        epilog="Files: OUT_DIR/ckpt.safetensors (the model with its chat tokens and the training state; `python -m llm "
               "generate/eval --checkpoint` read it), OUT_DIR/metrics.jsonl; with LoRA also OUT_DIR/adapters."
               "safetensors and the merged OUT_DIR/model.safetensors. Exit codes: 0 done, 1 diverged, 2 bad "
               "flags/data/checkpoint, 3 the checkpoint could not be written, 130/143 stopped by a signal. "
               + threads_note())
    add_start_flags(p, DEFAULT_MODEL)
    d = add_data_flags(p, "instructions", "natural_instructions")
    d.add_argument("--max-examples", metavar="N", type=positive_int, default=None,
                   help="train on at most N records (after the held-out ones are set aside) (default: all)")
    d.add_argument("--max-length", metavar="T", type=positive_int, default=None,
                   help="positions per row, at most the model's context (default: the context)")
    d.add_argument("--packing", action="store_true",
                   help="pack several examples per row (best-fit decreasing, positions restart per example, "
                        "block-diagonal attention); default: one example per row, right-padded")
    e = p.add_argument_group("held-out replies")
    e.add_argument("--eval-replies", metavar="N", type=nonneg_int, default=32,
                   help="greedy replies to the first N held-out prompts at each evaluation; 0: none (default 32)")
    e.add_argument("--max-new-tokens", metavar="N", type=positive_int, default=32,
                   help="longest reply generated (default 32)")
    add_trainer_flags(p, {"out_dir": "runs/sft", "lr": 3e-4, "warmup_steps": 20, "max_steps": 500,
                          "eval_interval": 100, "ckpt_interval": 100, "weight_decay": 0.0, "eval_batches": 50})
    return p


def main(argv=None, comm=None) -> int:
    """``python -m llm sft``: returns the exit code (see the module docstring)."""
    from ..train import run_job

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        check_lora_args(args)
    except SetupError as e:
        print(f"python -m llm sft: error: {e}", file=sys.stderr)
        return 2
    if args.out_dir is None:
        args.out_dir = "runs/sft"
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_job("sft", args, lambda a, c, log: SFTJob(a, c, log), argv, comm=comm)


__all__ = ["SFTJob", "build_parser", "main", "render_examples", "split_indices", "add_data_flags", "SPLIT_SEED"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
