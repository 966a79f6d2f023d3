"""`python -m llm reward`: train a reward model on preference pairs and rankings, from an SFT checkpoint.

    python -m llm reward --model runs/sft/ckpt.safetensors --data prefs.jsonl
    python -m llm reward --model runs/sft/ckpt.safetensors --data prefs.jsonl --val-data heldout.jsonl \\
        --center-coef 0.01 --max-steps 300 --dp 2

The model (``llm.post.reward_model``) is the SFT model's trunk with a scalar
head, read at each sequence's last real token; the loss is Bradley-Terry's
over every preferred pair (with the records' margins and optional centring);
the data are pairs and K-way rankings rendered in the chat format
(``llm.post.rankings``). It is a job of the one trainer, so ``--dp``/``--pp``,
``--resume`` (bitwise), mixed precision and the exit codes are those of every
training command (``python -m llm train --help``).

Logged on every metrics line for the training pairs since the previous line
(``train_``), and at each evaluation for the held-out pairs (``val_``, with
``val_loss``): the accuracy (share of pairs ranked right), the mean margin
``r_chosen - r_rejected`` and the mean, std, min and max reward. The normalisation (gain and
bias to mean 0 and std 1 on reference samples: ``--norm-data``, else the
held-out responses) is measured at every evaluation and stored in the
checkpoint (``metadata["reward_model"]["normalization"]``, with the step it was
measured at); ``python -m llm ppo --reward-model`` applies it.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from ..trainer import Job, SetupError, add_trainer_flags
from ..trainer.config import nonneg_float, positive_int, threads_note, unit_float
from .chat import ChatFormatError
from .data import DataError, read_jsonl
from .packing import RowSampler
from .rankings import Ranking, encode_rankings, read_rankings, record_prompt
from .reward_model import (METADATA_KEY, RewardModel, RewardNormalization, RewardStats, bradley_terry_loss,
                           sequence_scores)
from .start import load_start_model


def chat_encoder(tokenizer, max_len: int, template: str = "chat"):
    """``encode(prompt, response) -> (ids, truncated)``: the prompt (chat messages) and the response as a
    conversation in the chat format (``llm.post.chat.render``), the response ending with the end token; a sequence longer than ``max_len``
    loses prompt tokens on the left (``chat.truncate``)."""
    from . import chat

    chat.chat_tokens(tokenizer)  # a tokenizer without the chat tokens: one clear message now

    def encode(prompt, response):
        rendered = chat.render(tokenizer, list(prompt) + [{"role": "assistant", "content": response}], template)
        fitted, cut_prompt, cut_answer = chat.truncate(rendered, max_len)
        return fitted.ids, bool(cut_prompt or cut_answer)

    return encode


def _split(rankings: list, fraction: float, seed: int):
    order = np.random.default_rng([seed, 7]).permutation(len(rankings))
    n_val = int(round(len(rankings) * fraction))
    if n_val < 1 or n_val >= len(rankings):
        raise SetupError(f"--val-fraction {fraction} of {len(rankings)} records leaves no held-out or no training "
                         "record; pass --val-data or another fraction")
    val = set(order[:n_val].tolist())
    return [r for k, r in enumerate(rankings) if k not in val], [r for k, r in enumerate(rankings) if k in val]


def _read_samples(path) -> list:
    """Reference samples for the normalisation: JSONL records ``{"prompt", "response"}`` as one-response rankings."""
    out = []
    for where, rec in read_jsonl(path):
        if not isinstance(rec, dict) or not isinstance(rec.get("response"), str):
            raise DataError(f"{where}: a reference sample is {{\"prompt\": ..., \"response\": \"...\"}}")
        out.append(Ranking(record_prompt(rec, where), [rec["response"]], []))
    return out


class RewardJob(Job):
    """Bradley-Terry training of a ``RewardModel`` initialised from ``args.model`` (see the module docstring).

    ``encode(prompt, response) -> (ids, truncated)`` renders a sequence (default:
    ``chat_encoder``); ``policy``/``tokenizer`` may be given instead of loading
    ``args.model`` (tests).
    """

    name = "reward"

    def __init__(self, args, comm=None, log=print, encode=None, policy=None, tokenizer=None):
        self.args, self.comm, self.log = args, comm, log
        if policy is None:
            policy, tokenizer = load_start_model(args.model)
        self.policy, self.tokenizer = policy, tokenizer
        block = policy.config.block_size
        self.max_len = min(args.max_length or block, block)
        pad = _pad_id(tokenizer)
        try:
            encode = encode if encode is not None else chat_encoder(tokenizer, self.max_len, args.template)
            if (args.data is None) == (args.dataset is None):
                raise DataError("give the preference data: --data FILE.jsonl ... or --dataset NAME (one of them)")
            train = [r for path in args.data for r in read_rankings(path)] if args.data else \
                read_rankings(dataset=args.dataset, subtasks=args.subtasks, log=log)
            if args.val_data:
                val = [r for path in args.val_data for r in read_rankings(path)]
            elif args.val_dataset:
                val = read_rankings(dataset=args.val_dataset, log=log)
            else:
                train, val = _split(train, args.val_fraction, args.seed)
            self.train = encode_rankings(train, encode, pad, self.max_len)
            self.val = encode_rankings(val, encode, pad, self.max_len)
            self.norm_ref = encode_rankings(_read_samples(args.norm_data), encode, pad, self.max_len) \
                if args.norm_data else None
        except (DataError, ChatFormatError, OSError) as e:
            raise SetupError(str(e)) from None
        cut = self.train.truncated + self.val.truncated
        log(f"reward data: {len(self.train)} training rankings ({self.train.pairs} pairs), {len(self.val)} held out "
            f"({self.val.pairs} pairs); sequences of up to {self.train.input_ids.shape[-1]} tokens"
            + (f"; {cut} prompt(s) longer than {self.max_len} tokens lost tokens on the left" if cut else ""))
        self.stats = RewardStats()
        self.normalization = None

    # -- the model and its data ------------------------------------------------------------
    def build_model(self):
        return RewardModel.from_policy(self.policy, generator=np.random.default_rng(self.args.seed))

    def train_sampler(self, rank, world):
        return RowSampler(self.train.as_rows(), self.args.batch_size, self.args.seed, rank, world)

    def inputs(self, batch):
        N, K, T = batch["input_ids"].shape
        return batch["input_ids"].reshape(N * K, T)  # (N*K, T): every response of every ranking

    def count(self, batch) -> int:
        return int(np.asarray(batch["better"]).sum())

    def loss(self, output, batch):
        N, K, T = batch["input_ids"].shape
        keep = np.asarray(batch["keep"])
        rewards = sequence_scores(output, keep.reshape(N * K, T)).reshape(N, K)  # (N, K)
        total, pairs = bradley_terry_loss(rewards, batch["better"], batch["margin"], self.args.center_coef)
        from autograd import backend

        self.stats.add(backend.to_device(rewards.data, "cpu"), batch["better"], keep.any(axis=-1))
        return total, pairs

    def flops_per_token(self, config) -> float:
        from ..sizing import flops_per_token

        return flops_per_token(config) - 6 * config.n_embd * (config.vocab_size - 1)  # the head has 1 output

    # -- evaluation ------------------------------------------------------------------------------
    def _measure(self, trainer, arrays) -> tuple[float, RewardStats]:
        self.stats = RewardStats()
        bs = self.args.batch_size
        batches = [arrays.rows(np.arange(k, min(k + bs, len(arrays)))) for k in range(0, len(arrays), bs)]
        loss = trainer.eval_loss(batches)
        stats = self.stats.merged(trainer.comm)
        self.stats = RewardStats()
        return loss, stats

    def train_metrics(self, trainer) -> dict:
        """Accuracy, margin and rewards of the training pairs since the last metrics line (``train_`` keys)."""
        seen, self.stats = self.stats.merged(trainer.comm), RewardStats()
        return seen.summary("train_")

    def evaluate(self, trainer, step):
        val_loss, val = self._measure(trainer, self.val)
        ref = val if self.norm_ref is None else self._measure(trainer, self.norm_ref)[1]
        self.normalization = RewardNormalization.from_stats(ref, step)
        return {"val_loss": val_loss, **val.summary("val_"), "norm_gain": self.normalization.gain,
                "norm_bias": self.normalization.bias}

    def checkpoint_metadata(self):
        from ..checkpoint import tokenizer_to_json

        norm = self.normalization.to_json() if self.normalization is not None else None
        return {"tokenizer": tokenizer_to_json(self.tokenizer),
                METADATA_KEY: {"head": "scalar", "normalization": norm, "init": str(self.args.model)}}

    def summary(self, trainer, step, metrics):
        if "val_accuracy" not in metrics:
            return None
        return (f"held-out pairs: accuracy {metrics['val_accuracy']:.3f}, margin {metrics['val_margin']:.3f}, "
                f"loss {metrics['val_loss']:.4f} (ln 2 = 0.6931 is chance)")


def _pad_id(tokenizer) -> int:
    """The chat format's padding id where the tokenizer has one, else end-of-text (only its position matters:
    the last real token is found from the mask)."""
    from .chat import PAD_TOKEN

    return tokenizer.special_tokens.get(PAD_TOKEN, tokenizer.eot_token)


# ---------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------


def add_reward_data_flags(parser):
    """The reward job's own flags (its data and loss)."""
    g = parser.add_argument_group("reward model")
    g.add_argument("--model", required=True, metavar="CKPT",
                   help="the checkpoint the reward model starts from (an SFT model: `python -m llm sft`); its trunk is "
                        "copied and a scalar head added; its tokenizer and chat format are used")
    g.add_argument("--data", nargs="+", default=None, metavar="JSONL",
                   help="preference records, one JSON object per line: {'prompt', 'chosen', 'rejected', 'margin'?} "
                        "or {'prompt', 'responses': [best, ..., worst]} or with 'scores' (higher is better)")
    g.add_argument("--dataset", default=None, choices=["ni_pairs", "hhh_alignment", "truthful_qa"],
                   help="real preference pairs instead of --data, fetched once into the cache (llm.post.data): "
                        "ni_pairs (correct vs wrong answers of Natural Instructions), hhh_alignment, truthful_qa")
    g.add_argument("--subtasks", default=None, metavar="GLOBS",
                   help="with --dataset ni_pairs: the tasks to keep, comma-separated glob patterns")
    g.add_argument("--val-data", nargs="+", default=None, metavar="JSONL",
                   help="held-out preference records (default: --val-fraction of the training records)")
    g.add_argument("--val-dataset", default=None, choices=["ni_pairs", "hhh_alignment", "truthful_qa"],
                   help="a named held-out preference data set, e.g. hhh_alignment")
    g.add_argument("--val-fraction", type=unit_float, default=0.1, metavar="X",
                   help="share of --data held out when --val-data is not given (default 0.1)")
    g.add_argument("--norm-data", default=None, metavar="JSONL",
                   help="reference samples {'prompt', 'response'} whose rewards the normalisation maps to mean 0 and "
                        "std 1 (default: the held-out responses)")
    g.add_argument("--center-coef", type=nonneg_float, default=0.0, metavar="X",
                   help="weight of the centring term (r_chosen + r_rejected)^2 per pair (TRL's "
                        "center_rewards_coefficient; e.g. 0.01) (default 0)")
    g.add_argument("--template", choices=["chat", "alpaca"], default="chat",
                   help="the chat template the SFT model was trained with (default chat)")
    g.add_argument("--max-length", type=positive_int, default=None, metavar="N",
                   help="tokens per rendered sequence; longer prompts lose tokens on the left (default: the "
                        "model's block size)")
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m llm reward`` argument parser."""
    p = argparse.ArgumentParser(
        prog="python -m llm reward",
        description="Train a reward model: an SFT checkpoint's trunk with a scalar head read at the last real "
                    "token, Bradley-Terry loss over every preferred pair of each prompt (pairs or K-way rankings), "
                    "optional margins and centring; logs accuracy, margin and reward statistics, and stores a "
                    "normalisation (mean 0, std 1 on reference samples) with the model for PPO.",
        epilog="Files: OUT_DIR/ckpt.safetensors (the reward model, its tokenizer and normalisation, and the training "
               "state: --resume continues bitwise) and OUT_DIR/metrics.jsonl. Exit codes as `python -m llm train`. "
               + threads_note())
    add_reward_data_flags(p)
    add_trainer_flags(p, {"out_dir": "runs/reward", "batch_size": 8, "max_steps": 200, "lr": 1e-4,
                          "warmup_steps": 10, "eval_interval": 50, "ckpt_interval": 100},
                      rows="preference records (pairs or rankings)", averaged_over="preferred pairs")
    p.set_defaults(out_dir="runs/reward")
    return p


def main(argv=None, comm=None) -> int:
    """``python -m llm reward``: returns the exit code (as ``python -m llm train``)."""
    from ..train import run_job

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_job("reward", args, lambda a, c, log: RewardJob(a, c, log), argv, comm=comm)


__all__ = ["RewardJob", "chat_encoder", "build_parser", "main"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
