"""`python -m llm dpo`: direct preference optimisation (Rafailov et al. 2023) on (prompt, chosen, rejected) pairs.

    python -m llm dpo --model runs/sft/ckpt.safetensors --data ni_pairs --eval-data hhh_alignment,truthful_qa
    python -m llm dpo --data-file pairs.jsonl --loss ipo --beta 0.5
    python -m llm dpo --lora-rank 8 --reference model      # the reference is the base with adapters off

For each pair, the policy's log-probability of each answer given the prompt, summed over the
answer's tokens (its reply and ``<|end|>``; ``--logps mean`` divides by their number), is compared
with the reference model's, as in TRL's ``DPOTrainer``::

    z = (log pi(chosen) - log pi(rejected)) - (log ref(chosen) - log ref(rejected))
    sigmoid  -(1 - eps) log sigmoid(beta z) - eps log sigmoid(-beta z)    (eps: --label-smoothing)
    hinge    max(0, 1 - beta z)
    ipo      (z - 1 / (2 beta))^2        (with mean log-probabilities by default, as TRL)

The loss is the mean over the step's pairs (all micro-batches and replicas). At the start the
policy is the reference, z = 0 and the sigmoid loss is ln 2. The implicit rewards are
``beta (log pi - log ref)`` of each answer; the metrics record ``rewards/chosen``,
``rewards/rejected``, ``rewards/accuracies`` (the share of pairs whose chosen reward is higher) and
``rewards/margins`` for the training steps since the last line, and the same on the held-out pairs
(``val_...``) and on every ``--eval-data`` set at each evaluation, with ``logps/accuracies`` (the
share of pairs where the policy itself finds the chosen answer more likely).

The reference log-probabilities are computed once before training with the starting model
(``--reference precomputed``, the default: it works on every layout, and each pair is computed in
fixed chunks, so the numbers do not depend on the number of processes), or at every step by a
frozen copy of it (``--reference model``, one pipeline stage only); with LoRA the reference is the
same model with its adapters switched off, never a second copy of the weights.
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np

import autograd
from autograd import Tensor, backend, no_grad

from ..trainer import Job, SetupError, add_trainer_flags
from ..trainer.config import positive_int, threads_note
from .chat import ChatFormatError, next_token_labels, render, truncate
from .data import DATASETS, DataError, load_pairs
from .packing import IGNORE_INDEX, RowSampler, batches_of
from .sft import add_data_flags, split_indices
from .start import LoRASettings, StartingPoint, add_start_flags, check_lora_args, save_lora_outputs

DEFAULT_MODEL = "runs/sft/ckpt.safetensors"
LOSSES = ("sigmoid", "hinge", "ipo")
#: pairs per forward when the reference log-probabilities are computed before training (fixed: the numbers
#: must not depend on the number of processes)
REF_CHUNK = 8


# ---------------------------------------------------------------------------
# the loss
# ---------------------------------------------------------------------------


def log_sigmoid(x):
    """log(sigmoid(x)) = min(x, 0) - log(1 + exp(-|x|)), finite for any x.

    d/dx = 1 - sigmoid(x): from min(x, 0) the step (1 or 0, 1/2 at 0) and from
    -log(1 + exp(-|x|)) the term sign(x) exp(-|x|) / (1 + exp(-|x|)) (0 at 0); at
    x = 0 the two give 1/2 = 1 - sigmoid(0). The engine differentiates the
    composition; a test checks it against finite differences.
    """
    return autograd.minimum(x, 0.0) - autograd.log(1 + autograd.exp(-abs(x)))


def preference_loss(z, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0):
    """The per-pair loss of the log-ratio difference ``z`` (a Tensor (P,)), TRL's formulas (module docstring)."""
    if loss_type == "sigmoid":
        loss = -log_sigmoid(z * beta)
        if label_smoothing:
            loss = loss * (1.0 - label_smoothing) - log_sigmoid(z * -beta) * label_smoothing
        return loss
    if loss_type == "hinge":
        return autograd.relu(1.0 - z * beta)
    if loss_type == "ipo":
        return (z - 1.0 / (2.0 * beta)) ** 2
    raise ValueError(f"unknown DPO loss {loss_type!r}; the losses are {', '.join(LOSSES)}")


def sequence_logps(logits, labels, n_tokens=None):
    """Log-probability of each sequence's labelled tokens: ``logits`` (N, T, V), ``labels`` (N, T) -> (N,).

    Summed over the tokens whose label is not -100; divided by ``n_tokens`` (N,)
    when given (the mean).
    """
    N, T, V = logits.shape
    token_nll = autograd.cross_entropy(logits.reshape(N * T, V),  # (N*T, V)
                                       labels.reshape(N * T),  # (N*T,)
                                       ignore_index=IGNORE_INDEX, reduction="none")
    logps = -token_nll.reshape(N, T).sum(axis=1)  # (N*T,) -> (N, T) -> (N,)
    if n_tokens is not None:
        logps = logps / n_tokens
    return logps


class _Stats:
    """Sums over pairs: count, loss, chosen and rejected rewards, correct, margin, log-prob wins."""

    FIELDS = ("n", "loss", "chosen", "rejected", "correct", "margin", "logp_correct")

    def __init__(self):
        self.sums = np.zeros(len(self.FIELDS))

    def add(self, loss, chosen, rejected, logp_c, logp_r):
        self.sums += [len(chosen), float(loss.sum()), float(chosen.sum()), float(rejected.sum()),
                      float((chosen > rejected).sum()), float((chosen - rejected).sum()), float((logp_c > logp_r).sum())]

    def reduced(self, comm) -> dict:
        """The means over every rank's pairs (a collective call); empty when there were none."""
        sums = comm.allreduce(self.sums.copy()) if comm.size > 1 else self.sums
        n = sums[0]
        if not n:
            return {}
        m = dict(zip(self.FIELDS, sums / n))
        return {"loss": float(m["loss"]), "rewards/chosen": float(m["chosen"]), "rewards/rejected": float(m["rejected"]),
                "rewards/accuracies": float(m["correct"]), "rewards/margins": float(m["margin"]),
                "logps/accuracies": float(m["logp_correct"])}


# ---------------------------------------------------------------------------
# pairs -> rows
# ---------------------------------------------------------------------------


def render_pairs(tokenizer, pairs, template: str, max_tokens: int, log=print, what="pairs"):
    """``[(input_ids (2, t), labels (2, t))]`` of each pair (chosen, rejected), cut alike to ``max_tokens``.

    Both answers follow the same prompt, so the prompt is cut by the same number
    of tokens from the left (as many as the longer answer needs, keeping the
    assistant header); an answer that alone overflows is cut at its end. Pairs
    whose two sequences come out the same after the cut are dropped (they
    prefer nothing); both counts are reported.
    """
    out, cut_prompts, cut_answers, dropped = [], 0, 0, 0
    for pair in pairs:
        try:
            seqs = [render(tokenizer, pair.prompt + [{"role": "assistant", "content": a}], template=template,
                           loss_on="last") for a in (pair.chosen, pair.rejected)]
        except ChatFormatError as e:
            raise DataError(f"{pair.where}: {e}") from None
        p = seqs[0].prompt_len
        longest = max(len(s) for s in seqs)
        cut = min(max(longest - max_tokens, 0), p - 1)
        fitted = [truncate(s, max_tokens, cut_prompt=cut) for s in seqs]
        cut_prompts += cut > 0
        cut_answers += any(f[2] for f in fitted)
        rows = [next_token_labels(f[0]) for f in fitted]
        if rows[0] == rows[1]:
            dropped += 1
            continue
        t = max(len(x) for x, _ in rows)
        ids = np.zeros((2, t), dtype=np.int64)
        labels = np.full((2, t), IGNORE_INDEX, dtype=np.int64)
        for k, (x, y) in enumerate(rows):
            ids[k, :len(x)], labels[k, :len(y)] = x, y
        out.append((ids, labels))
    if cut_prompts or cut_answers or dropped:
        log(f"{what}: {cut_prompts} of {len(pairs)} prompts lost tokens from the left to fit the context "
            f"({max_tokens - 1} positions); {cut_answers} pairs had an answer cut at its end; {dropped} pairs were "
            "identical after the cut and were dropped")
    return out


def pair_rows(pairs, width: int, pad_id: int) -> dict:
    """``{"input_ids", "labels"}`` (P, 2, width) and ``"n_tokens"`` (P, 2), right-padded with PAD and -100."""
    P = len(pairs)
    ids = np.full((P, 2, width), pad_id, dtype=np.int64)
    labels = np.full((P, 2, width), IGNORE_INDEX, dtype=np.int64)
    for i, (x, y) in enumerate(pairs):
        ids[i, :, :x.shape[1]], labels[i, :, :y.shape[1]] = x, y
    return {"input_ids": ids, "labels": labels, "n_tokens": (labels != IGNORE_INDEX).sum(axis=2)}


# ---------------------------------------------------------------------------
# the job
# ---------------------------------------------------------------------------


class DPOJob(Job):
    """Direct preference optimisation (see the module docstring)."""

    name = "dpo"

    def __init__(self, args, comm=None, log=print):
        from parallel import Communicator

        self.args, self.log = args, log
        self.comm = comm if comm is not None else Communicator()
        self.loss_type, self.beta, self.smoothing = args.loss, float(args.beta), float(args.label_smoothing)
        self.mean_logps = (args.logps or ("mean" if args.loss == "ipo" else "sum")) == "mean"
        chat = "add" if args.add_chat_tokens else "error"
        self.start = StartingPoint(args.model, args.template, LoRASettings.from_args(args), args.seed, chat, log)
        self.tokenizer = self.start.tokenizer
        config = self.start.config
        self.length = config.block_size
        try:
            pairs = load_pairs(args.data_file, None if args.data_file else args.data, args.subtasks, log=log)
            extra = {name: load_pairs(dataset=name, log=log) for name in self._eval_sets()}
        except DataError as e:
            raise SetupError(str(e)) from None
        train_idx, val_idx = split_indices(len(pairs), min(args.val_size, len(pairs) // 2), args.max_pairs)
        cap = args.eval_batches * args.batch_size
        sets = {"train": [pairs[i] for i in train_idx]}
        if len(val_idx):
            sets["val"] = [pairs[i] for i in val_idx]
        sets.update({name: p[:cap] for name, p in extra.items()})
        pad = self.start.tokens.pad
        self.rows = {}
        for name, ps in sets.items():
            try:
                rendered = render_pairs(self.tokenizer, ps, args.template, self.length + 1,
                                        log if name == "train" else (lambda *a: None), f"{name} pairs")
            except DataError as e:
                raise SetupError(str(e)) from None
            if not rendered:
                raise SetupError(f"no {name} pair is left after fitting the pairs into the context")
            self.rows[name] = pair_rows(rendered, max(x.shape[1] for x, _ in rendered), pad)
        self._policy = None
        self._ref = None
        self._stats = _Stats()
        if args.reference == "precomputed":
            for name, rows in self.rows.items():
                rows["ref_logps"] = self._precompute(rows)
        log(f"data: {len(self.rows['train']['input_ids']):,} training pairs" + "".join(
            f", {len(r['input_ids']):,} {'held out' if n == 'val' else n}" for n, r in self.rows.items() if n != "train")
            + f"; {args.loss} loss, beta {self.beta:g}" + (f", label smoothing {self.smoothing:g}" if self.smoothing
                                                           else "")
            + f", {'mean' if self.mean_logps else 'summed'} log-probabilities, {args.reference} reference")

    def _eval_sets(self) -> list:
        names = [n.strip() for n in (self.args.eval_data or "").split(",") if n.strip()]
        for n in names:
            if DATASETS.get(n, ("",))[0] != "preferences":
                raise SetupError(f"--eval-data {n}: not a preference dataset; they are "
                                 + ", ".join(k for k, (kind, _) in DATASETS.items() if kind == "preferences"))
        return names

    # -- the reference ---------------------------------------------------------------------
    def _reference_model(self):
        """The model that gives the reference log-probabilities, and a context that switches it to the reference:
        the starting model itself (adapters off with LoRA)."""
        from nn import lora_disabled

        if self._ref is None:
            if self.start.lora.rank and self._policy is not None:
                self._ref = self._policy  # the policy with its adapters switched off: no second copy
            else:
                self._ref = self.start.build().to(self.args.device)
                self._ref.requires_grad_(False)
        return self._ref, lora_disabled(self._ref)

    def _ref_logps(self, model, input_ids, labels, n_tokens):
        """Reference log-probabilities (P, 2) of a batch of pairs, without a graph, in eval mode."""
        P, _, T = input_ids.shape
        was = model.training
        model.eval()
        try:
            with no_grad():
                logits, _ = model(input_ids.reshape(2 * P, T))  # (2P, T, V)
                xp = backend.get_array_module(logits.data)
                n = xp.asarray(n_tokens.reshape(2 * P), dtype=logits.dtype) if self.mean_logps else None
                logps = sequence_logps(logits, xp.asarray(labels.reshape(2 * P, T)), n)
        finally:
            model.train(was)
        return backend.to_device(logps.data, "cpu").reshape(P, 2)

    def _precompute(self, rows) -> np.ndarray:
        """The reference log-probabilities (P, 2) of every pair, chunk c computed by rank c % world."""
        model, off = self._reference_model()
        P = len(rows["input_ids"])
        starts = list(range(0, P, REF_CHUNK))
        mine = {}
        with off:
            for c in range(self.comm.rank, len(starts), self.comm.size):
                s = slice(starts[c], starts[c] + REF_CHUNK)
                mine[c] = self._ref_logps(model, backend.to_device(rows["input_ids"][s], self.args.device),
                                          rows["labels"][s], rows["n_tokens"][s])
        if self.comm.size > 1:
            for part in self.comm.allgather(mine):
                mine.update(part)
        if self.start.lora.rank == 0 or self._policy is None:
            self._ref = None  # not needed any more: free the copy
        return np.concatenate([mine[c] for c in range(len(starts))]).astype(np.float64)

    # -- the job ---------------------------------------------------------------------------
    def build_model(self):
        model = self.start.build()
        if self._policy is None:
            self._policy = model  # the model the trainer trains (one stage): the LoRA reference switches it
        return model

    def train_sampler(self, rank, world):
        return RowSampler(self.rows["train"], self.args.batch_size, self.args.seed, rank, world)

    def inputs(self, batch):
        P, _, T = batch["input_ids"].shape
        return batch["input_ids"].reshape(2 * P, T)  # (2P, T): chosen, rejected of each pair in turn

    def count(self, batch):
        return int(batch["input_ids"].shape[0])  # pairs

    def loss(self, logits, batch):
        P, _, T = batch["input_ids"].shape
        xp = backend.get_array_module(logits.data)
        dtype = logits.dtype if logits.dtype != np.float16 else np.float32
        n = xp.asarray(batch["n_tokens"].reshape(2 * P), dtype=dtype) if self.mean_logps else None
        labels = xp.asarray(batch["labels"].reshape(2 * P, T))
        logps = sequence_logps(logits, labels, n).reshape(P, 2)  # (2P,) -> (P, 2)
        if "ref_logps" in batch:
            ref = xp.asarray(batch["ref_logps"], dtype=logps.dtype)  # (P, 2)
        else:
            model, off = self._reference_model()
            with off:
                ref = xp.asarray(self._ref_logps(model, batch["input_ids"], batch["labels"], batch["n_tokens"]),
                                 dtype=logps.dtype)
        chosen, rejected = logps[:, 0], logps[:, 1]  # (P,)
        z = (chosen - rejected) - Tensor(ref[:, 0] - ref[:, 1])  # (P,)
        losses = preference_loss(z, self.beta, self.loss_type, self.smoothing)
        host = lambda a: backend.to_device(a, "cpu").astype(np.float64)  # noqa: E731
        lp = host(logps.data)
        r = self.beta * (lp - host(ref))  # the implicit rewards (P, 2)
        self._stats.add(host(losses.data), r[:, 0], r[:, 1], lp[:, 0], lp[:, 1])
        return losses.sum(), P

    # -- around the loop -------------------------------------------------------------------
    def train_metrics(self, trainer):
        stats, self._stats = self._stats, _Stats()
        return {k: v for k, v in stats.reduced(trainer.comm).items() if k != "loss"}

    def evaluate(self, trainer, step):
        training, self._stats = self._stats, _Stats()
        out = {}
        try:
            for name, rows in self.rows.items():
                if name == "train":
                    continue
                loss = trainer.eval_loss(batches_of(rows, self.args.batch_size))
                stats = self._stats.reduced(trainer.comm)
                self._stats = _Stats()
                out[f"{name}_loss"] = loss
                out.update({f"{name}_{k}": v for k, v in stats.items() if k != "loss"})
        finally:
            self._stats = training
        return out

    def on_evaluated(self, trainer, step, metrics, last):
        if not (last and self.start.lora.rank):
            return
        model = trainer.full_model()  # collective
        if model is not None:
            save_lora_outputs(trainer.out_dir, model, self.tokenizer, self.start.lora, log=self.log)

    def checkpoint_metadata(self):
        return {**self.start.metadata(), "dpo": {"loss": self.loss_type, "beta": self.beta,
                                                 "label_smoothing": self.smoothing, "reference": self.args.reference,
                                                 "logps": "mean" if self.mean_logps else "sum"}}

    def summary(self, trainer, step, metrics):
        parts = []
        for name in self.rows:
            acc = metrics.get(f"{name}_rewards/accuracies")
            if acc is not None:
                parts.append(f"{name}: reward accuracy {acc:.1%}, margin {metrics[f'{name}_rewards/margins']:.4f}, "
                             f"chosen more likely than rejected {metrics[f'{name}_logps/accuracies']:.1%}")
        return "held-out pairs: " + "; ".join(parts) if parts else None


# ---------------------------------------------------------------------------
# flags
# ---------------------------------------------------------------------------


def _beta(s):
    v = float(s)
    if not v > 0 or not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {s}")
    return v


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m llm dpo`` argument parser."""
    p = argparse.ArgumentParser(
        prog="python -m llm dpo",
        description="Direct preference optimisation: make a chat model prefer the chosen answer of each pair over the "
                    "rejected one, relative to a reference (the starting model). Sigmoid (DPO), IPO or hinge loss; "
                    "full fine-tuning or LoRA; one process or --dp/--pp under mpirun; --resume continues bitwise.",
        epilog="Files: OUT_DIR/ckpt.safetensors, OUT_DIR/metrics.jsonl (loss, rewards/chosen, rewards/rejected, "
               "rewards/accuracies, rewards/margins, logps/accuracies; val_... and <eval set>_... at evaluations); with LoRA also "
               "OUT_DIR/adapters.safetensors and the merged OUT_DIR/model.safetensors. Exit codes as `python -m llm "
               "sft`. " + threads_note())
    add_start_flags(p, DEFAULT_MODEL)
    p.add_argument_group("chat tokens").add_argument(
        "--add-chat-tokens", action="store_true",
        help="add the chat tokens when the model lacks them (normally DPO starts from an SFT model, which has them)")
    d = add_data_flags(p, "preferences", "ni_pairs")
    d.add_argument("--max-pairs", metavar="N", type=positive_int, default=None,
                   help="train on at most N pairs (after the held-out ones are set aside) (default: all)")
    d.add_argument("--eval-data", default=None, metavar="NAMES",
                   help="more held-out preference sets scored at each evaluation, comma-separated (e.g. "
                        "hhh_alignment,truthful_qa); each capped at --eval-batches x --batch-size pairs")
    o = p.add_argument_group("preference loss")
    o.add_argument("--loss", default="sigmoid", choices=LOSSES,
                   help="sigmoid: DPO's -log sigmoid(beta z); hinge: max(0, 1 - beta z); ipo: (z - 1/(2 beta))^2 "
                        "(default sigmoid)")
    o.add_argument("--beta", type=_beta, default=0.1, metavar="B",
                   help="strength of the reference: the implicit reward is beta x the log-ratio (default 0.1)")
    o.add_argument("--label-smoothing", type=float, default=0.0, metavar="EPS",
                   help="sigmoid loss only: the share of pairs assumed mislabelled, in [0, 0.5) (conservative DPO) "
                        "(default 0)")
    o.add_argument("--logps", choices=["sum", "mean"], default=None,
                   help="sum the answer's token log-probabilities, or take their mean (default: sum; mean for ipo, "
                        "as TRL)")
    o.add_argument("--reference", choices=["precomputed", "model"], default="precomputed",
                   help="precomputed: the reference log-probabilities once before training (any layout); model: a "
                        "frozen reference forward at every step (--pp 1); with LoRA either is the base model with "
                        "the adapters off (default precomputed)")
    add_trainer_flags(p, {"out_dir": "runs/dpo", "lr": 1e-4, "warmup_steps": 10, "max_steps": 300,
                          "eval_interval": 100, "ckpt_interval": 100, "weight_decay": 0.0, "eval_batches": 16},
                      rows="preference pairs", averaged_over="pairs")
    return p


def main(argv=None, comm=None) -> int:
    """``python -m llm dpo``: returns the exit code (0 done, 1 diverged, 2 bad input, 3 cannot write, 130/143)."""
    from ..train import run_job

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        check_lora_args(args)
        if args.label_smoothing and args.loss != "sigmoid":
            raise SetupError(f"--label-smoothing applies to the sigmoid loss only, not to {args.loss}")
        if not 0.0 <= args.label_smoothing < 0.5:
            raise SetupError(f"--label-smoothing must be in [0, 0.5), got {args.label_smoothing}")
        if args.reference == "model" and args.pp > 1:
            raise SetupError("--reference model runs the reference inside the loss, which needs the whole model on one "
                             "process: use --pp 1, or the default --reference precomputed")
        if args.reference == "model" and args.lora_rank and args.lora_train_embeddings:
            raise SetupError("--reference model with LoRA is the policy with its adapters off, so training the "
                             "embedding (--lora-train-embeddings) would move the reference too: use the default "
                             "--reference precomputed, or drop --lora-train-embeddings")
    except SetupError as e:
        print(f"python -m llm dpo: error: {e}", file=sys.stderr)
        return 2
    if args.out_dir is None:
        args.out_dir = "runs/dpo"
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_job("dpo", args, lambda a, c, log: DPOJob(a, c, log), argv, comm=comm)


__all__ = ["DPOJob", "LOSSES", "log_sigmoid", "preference_loss", "sequence_logps", "render_pairs", "pair_rows",
           "build_parser", "main"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
