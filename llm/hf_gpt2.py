"""Load and save GPT-2 checkpoints in the Hugging Face layout (config.json + model.safetensors).

A Hugging Face GPT-2 folder holds:

- ``config.json``: ``GPT2Config``'s keys; we read ``vocab_size``, ``n_positions``,
  ``n_embd``, ``n_layer``, ``n_head``, ``n_inner`` (None: 4 * n_embd),
  ``layer_norm_epsilon`` and ``activation_function`` ("gelu_new", the tanh
  approximation GPT-2 uses), and refuse options our model does not implement.
- ``model.safetensors``: the weights. Two naming schemes exist in the wild:
  ``h.0.attn.c_attn.weight`` (``GPT2Model``, as in the ``gpt2`` repository on
  the Hub) and ``transformer.h.0.attn.c_attn.weight`` (``GPT2LMHeadModel``);
  both are accepted. The causal-mask buffers ``h.N.attn.bias`` and
  ``h.N.attn.masked_bias`` are not weights and are skipped. ``lm_head.weight``,
  when present, must equal ``wte.weight`` (GPT-2 ties them). PyTorch
  ``pytorch_model.bin`` files are pickles, which this project never loads:
  convert them to safetensors first.

No transposes: GPT-2's linear layers are ``Conv1D`` modules, whose weight is
stored ``(in_features, out_features)`` and applied as ``x @ W + b``, exactly
like our ``nn.Linear`` (PyTorch's ``nn.Linear`` would need a transpose, since
it stores ``(out, in)``). ``c_attn.weight`` is ``(n_embd, 3 * n_embd)`` with
the output columns ordered ``[q | k | v]``, heads contiguous inside each: the
layout our ``CausalSelfAttention`` splits.
"""

from __future__ import annotations

import json
import os

import numpy as np

from autograd import backend

from . import safetensors as st
from .model import GPT, GPTConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
_PREFIX = "transformer."
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


class HFCheckpointError(ValueError):
    """A Hugging Face GPT-2 folder is missing a file, or holds something this model cannot represent."""


def _read_config(folder: str) -> GPTConfig:
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(path):
        raise HFCheckpointError(f"{folder} has no {CONFIG_FILE}: not a Hugging Face model folder")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise HFCheckpointError(f"{path} is not readable JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise HFCheckpointError(f"{path} must hold a JSON object")
    if cfg.get("model_type", "gpt2") != "gpt2":
        raise HFCheckpointError(f"{path}: model_type {cfg.get('model_type')!r} is not 'gpt2'")
    act = cfg.get("activation_function", "gelu_new")
    if act not in _TANH_GELUS:
        raise HFCheckpointError(f"{path}: activation_function {act!r} is not supported; this GPT uses GPT-2's "
                                f"tanh-approximated GELU ({', '.join(_TANH_GELUS)})")
    for key, ok in (("scale_attn_by_inverse_layer_idx", False), ("scale_attn_weights", True),
                    ("add_cross_attention", False), ("tie_word_embeddings", True)):
        if cfg.get(key, ok) != ok:
            raise HFCheckpointError(f"{path}: {key}={cfg[key]!r} is not supported (only {ok!r})")
    try:
        n_positions = cfg.get("n_positions", cfg.get("n_ctx"))
        return GPTConfig(vocab_size=cfg["vocab_size"], block_size=n_positions, n_layer=cfg["n_layer"],
                         n_head=cfg["n_head"], n_embd=cfg["n_embd"], mlp_hidden_dim=cfg.get("n_inner"),
                         norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)), mlp="gelu", norm="layernorm",
                         pos="learned", tie_embeddings=True, bias=True, dropout=0.0)
    except KeyError as e:
        raise HFCheckpointError(f"{path} lacks the key {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise HFCheckpointError(f"{path}: {e}") from None


def _is_buffer(name: str) -> bool:
    return name.endswith(".attn.bias") or name.endswith(".attn.masked_bias")


def hf_state_to_ours(tensors: dict, where: str = "weights") -> dict:
    """Map HF GPT-2 tensor names to our parameter names (strip ``transformer.``, drop buffers, check the tie)."""
    state, lm_head = {}, None
    for name, a in tensors.items():
        if name == "lm_head.weight":
            lm_head = a
            continue
        key = name[len(_PREFIX):] if name.startswith(_PREFIX) else name
        if _is_buffer(key):
            continue
        if key in state:
            raise HFCheckpointError(f"{where}: {key!r} appears both with and without the 'transformer.' prefix")
        state[key] = a
    if lm_head is not None:
        wte = state.get("wte.weight")
        if wte is None or wte.shape != lm_head.shape or not np.array_equal(wte, lm_head):
            raise HFCheckpointError(f"{where}: lm_head.weight differs from wte.weight; GPT-2 ties them and this "
                                    "loader supports only the tied head")
    return state


def load_hf_gpt2(folder, dtype=np.float32, device: str = "cpu") -> GPT:
    """Build a ``GPT`` from a Hugging Face GPT-2 folder (``config.json`` + ``model.safetensors``).

    The weights are cast to ``dtype`` and the model moved to ``device``. A
    missing, unexpected or wrongly shaped tensor raises ``HFCheckpointError``
    listing them.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise HFCheckpointError(f"{folder} is not a folder (expected config.json and model.safetensors in it)")
    config = _read_config(folder)
    path = os.path.join(folder, WEIGHTS_FILE)
    if not os.path.isfile(path):
        hint = (" (it has pytorch_model.bin, a pickle, which this project does not load: convert it to "
                "safetensors first)") if os.path.exists(os.path.join(folder, "pytorch_model.bin")) else ""
        raise HFCheckpointError(f"{folder} has no {WEIGHTS_FILE}{hint}")
    try:
        tensors = st.load_file(path, bf16="float32")
    except st.SafetensorsError as e:
        raise HFCheckpointError(str(e)) from None
    state = hf_state_to_ours(tensors, path)
    model = GPT(config, generator=np.random.default_rng(0), dtype=dtype)
    try:
        model.load_state_dict(state)
    except ValueError as e:
        raise HFCheckpointError(f"{path} does not fit the GPT-2 of {CONFIG_FILE}:\n{e}") from None
    if device != "cpu":
        model.to(device)
    return model


def hf_config_dict(config: GPTConfig, eos_token_id: int | None = None) -> dict:
    """The ``config.json`` content for ``config`` (a GPT-2 architecture), with ``GPT2Config``'s keys."""
    _check_gpt2_architecture(config)
    eos = config.vocab_size - 1 if eos_token_id is None else int(eos_token_id)
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": config.mlp_hidden_dim,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": config.norm_eps,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "bos_token_id": eos,
        "eos_token_id": eos,
    }


def _check_gpt2_architecture(config: GPTConfig):
    wrong = [f"{k}={getattr(config, k)!r} (GPT-2: {v!r})" for k, v in
             (("mlp", "gelu"), ("norm", "layernorm"), ("pos", "learned"), ("tie_embeddings", True), ("bias", True),
              ("norm_placement", "pre"))
             if getattr(config, k) != v]
    if config.kv_heads != config.n_head:
        wrong.append(f"n_kv_head={config.n_kv_head} (GPT-2 has as many kv heads as heads)")
    if wrong:
        raise HFCheckpointError("this model is not a GPT-2 architecture, so it has no Hugging Face GPT-2 form: "
                                + ", ".join(wrong))


def save_hf_gpt2(model: GPT, folder, prefix: str = "", eos_token_id: int | None = None) -> None:
    """Write ``model`` as a Hugging Face GPT-2 folder: ``config.json`` and ``model.safetensors`` (float32 as stored).

    Tensor names are GPT-2's (``h.0.attn.c_attn.weight``), prefixed with
    ``prefix`` (pass ``"transformer."`` for ``GPT2LMHeadModel``'s naming); the
    tied head is not stored separately. The safetensors metadata is
    ``{"format": "pt"}``, which ``transformers`` expects.
    """
    if not isinstance(model, GPT):
        raise TypeError(f"save_hf_gpt2 needs a GPT, got {type(model).__name__}")
    folder = os.fspath(folder)
    config_json = hf_config_dict(model.config, eos_token_id)
    os.makedirs(folder, exist_ok=True)
    tensors = {prefix + k: backend.to_device(v, "cpu") for k, v in model.state_dict().items()}
    tmp = os.path.join(folder, WEIGHTS_FILE + ".tmp")
    st.save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(folder, WEIGHTS_FILE))
    tmp = os.path.join(folder, CONFIG_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(config_json, f, indent=2)
        f.write("\n")
    os.replace(tmp, os.path.join(folder, CONFIG_FILE))


__all__ = ["HFCheckpointError", "load_hf_gpt2", "save_hf_gpt2", "hf_state_to_ours", "hf_config_dict"]
