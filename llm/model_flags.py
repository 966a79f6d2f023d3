"""Every ``GPTConfig`` field a user sets, from the command line: a flag each, or one ``--model-config FILE.json``.

    p = argparse.ArgumentParser(); add_model_flags(p)
    config = config_from_args(p.parse_args(argv), vocab_size=tokenizer.n_vocab)

The order of precedence: the preset, then the JSON file, then the flags. The
vocabulary comes from the tokenizer, never from a flag (a model must fit its
tokenizer).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from .model import PRESETS, GPTConfig, get_preset
from .trainer.config import positive_float, positive_int, unit_float


#: GPTConfig fields with a flag each (dest = field name); vocab_size comes from the tokenizer
FIELD_FLAGS = ("block_size", "n_layer", "n_head", "n_kv_head", "n_embd", "mlp", "norm", "pos", "tie_embeddings",
               "dropout", "bias", "norm_eps", "rope_base", "mlp_hidden_dim", "norm_placement")


def add_model_flags(parser: argparse.ArgumentParser, preset_default: str = "tiny"):
    """Add ``--preset``, ``--model-config`` and a flag per ``GPTConfig`` field (all default None: keep the preset's)."""
    m = parser.add_argument_group("model", "the preset, then --model-config, then these flags")
    m.add_argument("--preset", default=preset_default, choices=list(PRESETS),
                   help=f"model architecture and size (default {preset_default}"
                        + (": 4 layers, 4 heads, 128 wide, block 64)" if preset_default == "tiny" else ")"))
    m.add_argument("--model-config", metavar="FILE.json", default=None,
                   help="a JSON object of GPTConfig fields (e.g. {\"n_layer\": 8, \"norm\": \"rmsnorm\"}) applied "
                        "over the preset; flags still override it")
    m.add_argument("--n-layer", metavar="N", type=positive_int, help="number of Transformer blocks")
    m.add_argument("--n-head", metavar="N", type=positive_int, help="attention heads (must divide --n-embd)")
    m.add_argument("--n-kv-head", metavar="N", type=positive_int,
                   help="key/value heads: --n-head for multi-head attention, 1 for multi-query, a divisor of "
                        "--n-head between them for grouped-query attention")
    m.add_argument("--n-embd", metavar="N", type=positive_int, help="width of the residual stream")
    m.add_argument("--block-size", metavar="N", type=positive_int,
                   help="context length in tokens (the training sequence length)")
    m.add_argument("--mlp", choices=["gelu", "swiglu"], help="the feed-forward block: GPT-2's GELU MLP or Llama's SwiGLU")
    m.add_argument("--mlp-hidden-dim", metavar="N", type=positive_int,
                   help="the feed-forward hidden width (default 4 x --n-embd for gelu, Llama's rule for swiglu)")
    m.add_argument("--norm", choices=["layernorm", "rmsnorm"], help="the normalisation: LayerNorm or RMSNorm")
    m.add_argument("--norm-placement", choices=["pre", "post", "none"],
                   help="where the blocks normalise: pre (at each sub-layer's input, and before the head: GPT-2, "
                        "Llama), post (after each residual add, as the original Transformer; no final norm) or none "
                        "(no norm anywhere, for contrast). With --norm: pre-LN, pre-RMSNorm, post-LN, ...")
    m.add_argument("--norm-eps", metavar="X", type=positive_float, help="the normalisation's epsilon")
    m.add_argument("--pos", choices=["learned", "rope"], help="positions: learned embeddings (GPT-2) or RoPE (Llama)")
    m.add_argument("--rope-base", metavar="X", type=positive_float, help="RoPE's base (default 10000)")
    m.add_argument("--tie-embeddings", action=argparse.BooleanOptionalAction, default=None,
                   help="the output head reuses the token embedding (--no-tie-embeddings: a separate lm_head)")
    m.add_argument("--bias", action=argparse.BooleanOptionalAction, default=None,
                   help="biases in the linear layers and LayerNorm (--no-bias: none, as Llama)")
    m.add_argument("--dropout", metavar="X", type=unit_float, default=None,
                   help="dropout probability in the embeddings, attention and MLP, in [0, 1) (default 0)")
    return parser


def read_model_config_file(path) -> dict:
    """The GPTConfig fields of a JSON file; ValueError naming the file and what is wrong."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"--model-config: {path} does not exist") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--model-config: {path} is not a readable JSON file ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--model-config: {path} must hold a JSON object of GPTConfig fields, got "
                         f"{type(data).__name__}")
    known = {f.name for f in dataclasses.fields(GPTConfig)} - {"vocab_size"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"--model-config: {path} has unknown field(s) {unknown}; the fields are: "
                         f"{', '.join(sorted(known))} (the vocabulary comes from the tokenizer)")
    return data


def config_from_args(args, vocab_size: int) -> GPTConfig:
    """The ``GPTConfig`` of ``--preset``, ``--model-config`` and the field flags, with the tokenizer's vocabulary.

    Raises ValueError (a bad combination, e.g. --n-head that --n-kv-head does not divide) with GPTConfig's message.
    """
    overrides = read_model_config_file(args.model_config) if getattr(args, "model_config", None) else {}
    overrides.update({k: getattr(args, k) for k in FIELD_FLAGS if getattr(args, k, None) is not None})
    return get_preset(args.preset, vocab_size=vocab_size, **overrides)


__all__ = ["add_model_flags", "config_from_args", "read_model_config_file", "FIELD_FLAGS"]
