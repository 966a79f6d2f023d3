"""What every post-training job starts from and leaves: the model, its chat tokens, LoRA, and the output files.

``load_start_model(path)`` reads the starting model: one of our checkpoints (a model checkpoint or
a training checkpoint, whose LoRA adapters, if it has any, are merged in), or a Hugging Face GPT-2
folder (``config.json``, ``model.safetensors``, ``vocab.json`` + ``merges.txt``).
``StartingPoint`` holds it with its tokenizer (the chat tokens added when asked: new embedding rows
at the mean embedding) and builds the model to train, alike on every rank: the starting weights,
plus LoRA adapters (A drawn from the run's seed) when ``--lora-rank`` is given.

A LoRA run leaves, beside the trainer's ``ckpt.safetensors`` (weights and adapters, to resume),
``adapters.safetensors`` (the adapters alone: a small file, ``load_adapters``) and
``model.safetensors`` (the merged model, W + (alpha / r) A B, which ``python -m llm generate`` and
``python -m llm eval`` read).
"""

from __future__ import annotations

import copy
import dataclasses
import os

import numpy as np

from ..checkpoint import CheckpointError, build_model, load_checkpoint, save_checkpoint, save_model
from ..hf_gpt2 import HFCheckpointError, load_hf_gpt2
from ..model import GPT
from ..trainer import SetupError
from .chat import TEMPLATES, ChatFormatError, add_chat_tokens, chat_tokens

#: metadata["format"] of an adapters file
ADAPTERS_FORMAT = "llm-from-scratch/lora-adapters"
ADAPTERS_FILE = "adapters.safetensors"
MERGED_FILE = "model.safetensors"


# ---------------------------------------------------------------------------
# the starting model
# ---------------------------------------------------------------------------


def _hf_tokenizer(folder: str):
    from ..tokenizer import Tokenizer

    vocab, merges = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    if not (os.path.isfile(vocab) and os.path.isfile(merges)):
        raise SetupError(f"{folder} has no vocab.json + merges.txt (GPT-2's tokenizer files), which the model needs")
    return Tokenizer.from_gpt2_files(vocab, merges)


def load_start_model(path: str, flag: str = "--model"):
    """``(model, tokenizer)`` from one of our checkpoints or a Hugging Face GPT-2 folder; SetupError otherwise,
    its message naming the flag the path came from (``--model``, ``--ref``, ...).

    A training checkpoint of a LoRA run comes back with the adapters merged
    into the weights (``llm.checkpoint.build_model``): a plain GPT.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        try:
            model = load_hf_gpt2(path)
        except (HFCheckpointError, OSError, ValueError) as e:
            raise SetupError(f"{flag} {path}: {e}") from None
        try:
            return model, _hf_tokenizer(path)
        except SetupError as e:
            raise SetupError(f"{flag}: {e}") from None
    if not os.path.exists(path):
        raise SetupError(f"{flag} {path}: no such checkpoint file or Hugging Face folder (train one with "
                         "`python -m llm train`, or pass a checkpoint)")
    try:
        tensors, metadata = load_checkpoint(path)
        model, tokenizer = build_model(tensors, metadata, where=f"checkpoint {path}")  # a LoRA run's: merged
    except CheckpointError as e:
        raise SetupError(f"{flag}: {e}") from None
    if tokenizer is None:
        raise SetupError(f"{flag} {path} holds no tokenizer; post-training needs the model's tokenizer")
    return model, tokenizer


@dataclasses.dataclass
class LoRASettings:
    """``--lora-rank`` (0: full fine-tuning), ``--lora-alpha``, ``--lora-targets``, ``--lora-dropout`` and
    ``--lora-train-embeddings``."""

    rank: int = 0
    alpha: float = 16.0
    targets: tuple = ("c_attn", "c_proj")
    dropout: float = 0.0
    train_embeddings: bool = False

    @classmethod
    def from_args(cls, args) -> "LoRASettings":
        targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
        return cls(args.lora_rank, float(args.lora_alpha), targets, float(args.lora_dropout),
                   bool(args.lora_train_embeddings))

    def metadata(self) -> dict | None:
        """What checkpoints record (None without LoRA)."""
        if not self.rank:
            return None
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets), "dropout": self.dropout,
                "train_embeddings": self.train_embeddings}


class StartingPoint:
    """The starting model and tokenizer of a post-training job, and how to build the model it trains.

    ``missing_tokens``: "add" (add the chat tokens where missing, growing the
    embedding) or "error" (a clear error when they are missing).
    """

    def __init__(self, path: str, template: str, lora: LoRASettings, seed: int, missing_tokens: str = "add",
                 log=print):
        if template not in TEMPLATES:
            raise SetupError(f"--template {template!r}: the templates are {', '.join(TEMPLATES)}")
        model, tokenizer = load_start_model(path)
        if missing_tokens == "add":
            tokenizer, added = add_chat_tokens(tokenizer, model)
            if added:
                log(f"tokenizer: added {', '.join(added)} (ids {tokenizer.n_vocab - len(added)}.."
                    f"{tokenizer.n_vocab - 1}); the embedding grows to {tokenizer.n_vocab} rows, new rows at the "
                    "mean embedding")
        else:
            added = []
        try:
            self.tokens = chat_tokens(tokenizer)
        except ChatFormatError as e:
            raise SetupError(f"--model {path}: {e}") from None
        self.path, self.template, self.lora, self.seed = path, template, lora, seed
        self.tokenizer, self.added = tokenizer, added
        self._base = model.train()
        if lora.rank and added and not lora.train_embeddings:
            log(f"note: LoRA keeps the embedding frozen, so the {len(added)} new chat tokens stay at the mean "
                "embedding, alike; add --lora-train-embeddings to train the embedding too (or start from a model "
                "that has the chat tokens)")
        self.adapted = []
        if lora.rank:
            from nn import lora_layers

            self.adapted = [name for name, _ in lora_layers(self.build())]  # also checks the targets now
            log(f"LoRA: rank {lora.rank}, alpha {lora.alpha:g} on {len(self.adapted)} layers "
                f"({', '.join(lora.targets)})" + (" and the embedding" if lora.train_embeddings else ""))

    @property
    def config(self):
        """The model's ``GPTConfig`` (vocabulary grown by the chat tokens)."""
        return self._base.config

    def build(self) -> GPT:
        """The model to train: a copy of the starting weights, with LoRA adapters when asked (the same on every
        call and every rank: A comes from the seed)."""
        from nn import apply_lora

        model = copy.deepcopy(self._base)
        lora = self.lora
        if lora.rank:
            try:
                apply_lora(model, lora.targets, lora.rank, lora.alpha, lora.dropout,
                                            generator=np.random.default_rng([self.seed, 7]))
            except ValueError as e:
                raise SetupError(f"--lora-targets: {e}") from None
            if lora.train_embeddings:
                model.wte.weight.requires_grad = True
                if model.lm_head is not None:
                    model.lm_head.weight.requires_grad = True
        return model

    def metadata(self) -> dict:
        """Metadata every checkpoint of the job records (the tokenizer, the template, LoRA, the start)."""
        from ..checkpoint import tokenizer_to_json

        meta = {"tokenizer": tokenizer_to_json(self.tokenizer), "chat_template": self.template,
                "start_model": os.path.abspath(self.path)}
        if self.lora.rank:
            meta["lora"] = self.lora.metadata()
        return meta


# ---------------------------------------------------------------------------
# what a LoRA run leaves
# ---------------------------------------------------------------------------


def save_adapters(path, model: GPT, tokenizer, lora: LoRASettings, extra_metadata: dict | None = None):
    """Write the adapters alone (``lora.<layer>.lora_A`` / ``lora_B``; with ``--lora-train-embeddings`` the
    embedding too) with the LoRA settings, the model config and the tokenizer, atomically."""
    from nn import lora_state_dict

    from ..checkpoint import tokenizer_to_json

    tensors = {f"lora.{k}": v for k, v in lora_state_dict(model).items()}
    if lora.train_embeddings:
        tensors["lora.wte.weight"] = model.wte.weight.data
        if model.lm_head is not None:
            tensors["lora.lm_head.weight"] = model.lm_head.weight.data
    metadata = {"format": ADAPTERS_FORMAT, "lora": lora.metadata(), "config": dataclasses.asdict(model.config),
                "tokenizer": tokenizer_to_json(tokenizer), **(extra_metadata or {})}
    save_checkpoint(path, tensors, metadata)


def load_adapters(model: GPT, path):
    """Put the adapters of an adapters file on ``model`` (a plain GPT of the same config: LoRA is applied first);
    returns the model. CheckpointError when the file is not an adapters file or does not fit."""
    from nn import apply_lora, lora_layers

    tensors, metadata = load_checkpoint(path)
    if metadata.get("format") != ADAPTERS_FORMAT:
        raise CheckpointError(f"{path} is not a LoRA adapters file (format {metadata.get('format')!r})")
    if metadata.get("config") != dataclasses.asdict(model.config):
        raise CheckpointError(f"{path} holds adapters for another model config")
    lora = metadata["lora"]
    if not lora_layers(model):
        apply_lora(model, lora["targets"], lora["rank"], lora["alpha"], lora.get("dropout", 0.0))
    state = {k[len("lora."):]: v for k, v in tensors.items()}
    try:
        model.load_state_dict(state, strict=False)
    except ValueError as e:
        raise CheckpointError(f"{path} does not fit the model:\n{e}") from None
    unknown = sorted(set(state) - set(model.state_dict()))
    if unknown:
        raise CheckpointError(f"{path} holds tensors the model does not have: {', '.join(unknown[:5])}")
    return model


def save_lora_outputs(out_dir, model: GPT, tokenizer, lora: LoRASettings, log=print) -> tuple[str, str]:
    """Write ``adapters.safetensors`` and the merged ``model.safetensors`` into ``out_dir``; returns their paths."""
    from nn import merged_state_dict

    adapters = os.path.join(out_dir, ADAPTERS_FILE)
    merged_path = os.path.join(out_dir, MERGED_FILE)
    save_adapters(adapters, model, tokenizer, lora)
    plain = GPT(model.config)
    plain.load_state_dict(merged_state_dict(model))
    save_model(merged_path, plain, tokenizer, extra_metadata={"lora_merged": lora.metadata()})
    log(f"LoRA: adapters alone in {adapters} ({os.path.getsize(adapters):,} bytes); the merged model in "
        f"{merged_path} (for `python -m llm generate` / `python -m llm eval`)")
    return adapters, merged_path


# ---------------------------------------------------------------------------
# the flags sft and dpo share
# ---------------------------------------------------------------------------


def add_start_flags(parser, default_model: str):
    """``--model``, ``--template`` and the LoRA flags."""
    m = parser.add_argument_group("starting model")
    m.add_argument("--model", default=default_model, metavar="PATH",
                   help="the model to start from: one of our checkpoints (.safetensors, from `python -m llm train` "
                        "or a post-training run) or a Hugging Face GPT-2 folder (config.json, model.safetensors, "
                        f"vocab.json, merges.txt) (default {default_model})")
    m.add_argument("--template", default="chat", choices=TEMPLATES,
                   help="chat: <|user|>...<|end|><|assistant|>...<|end|>; alpaca: '### Instruction:' / "
                        "'### Response:' text headers; both end a reply with <|end|> (default chat)")
    lo = parser.add_argument_group("LoRA", "train low-rank adapters on chosen projections instead of every weight")
    lo.add_argument("--lora-rank", metavar="R", type=int, default=0,
                    help="rank of the adapters; 0 trains every weight (default 0)")
    lo.add_argument("--lora-alpha", metavar="A", type=float, default=16.0,
                    help="scale: the update is (alpha / R) x A B, alpha being this value (default 16)")
    lo.add_argument("--lora-targets", metavar="NAMES", default="c_attn,c_proj",
                    help="comma-separated linear layers to adapt, matched against the end of their names: c_attn, "
                         "c_proj (attention's and the MLP's), c_fc, attn.c_proj, mlp.c_proj, ... "
                         "(default c_attn,c_proj)")
    lo.add_argument("--lora-dropout", metavar="P", type=float, default=0.0,
                    help="dropout on the adapters' input (default 0)")
    lo.add_argument("--lora-train-embeddings", action="store_true",
                    help="also train the token embedding (and an untied head): needed for chat tokens a LoRA run "
                         "adds, whose rows would otherwise stay alike")
    return parser


def check_lora_args(args):
    """SetupError for LoRA flags out of range."""
    if args.lora_rank < 0:
        raise SetupError(f"--lora-rank must be >= 0 (0 trains every weight), got {args.lora_rank}")
    if args.lora_rank and not args.lora_alpha > 0:
        raise SetupError(f"--lora-alpha must be > 0, got {args.lora_alpha}")
    if not 0.0 <= args.lora_dropout < 1.0:
        raise SetupError(f"--lora-dropout must be in [0, 1), got {args.lora_dropout}")


__all__ = ["load_start_model", "LoRASettings", "StartingPoint", "save_adapters", "load_adapters",
           "save_lora_outputs", "add_start_flags", "check_lora_args", "ADAPTERS_FILE", "MERGED_FILE"]
