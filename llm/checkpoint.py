"""Checkpoints: one safetensors file per checkpoint, written atomically, verified when read.

A checkpoint is a safetensors file (``llm.safetensors``): arrays by name, and
metadata stored under the format's ``"__metadata__"``, each value JSON-encoded
(so numbers, lists and dicts survive the format's strings-only metadata).
Nothing in it is executed when it is read: no pickle.

Writing is atomic (``save_checkpoint``): the bytes go to a temporary file in
the same folder, which is flushed and ``fsync``-ed, then renamed over the
target with ``os.replace`` (atomic on POSIX and Windows), and the folder is
``fsync``-ed so the rename itself survives a crash. A reader sees the old file
or the new one, never half of one.

Corruption is detected (``load_checkpoint``): the header is validated (length
field, JSON, dtypes, shapes, offsets tiling the data exactly), and the SHA-256
of the data buffer, stored in the metadata under ``data_sha256``, is compared
with the bytes read, and the SHA-256 of the header's content (tensor names,
dtypes, shapes, offsets and the other metadata) under ``header_sha256`` with
the header read. A truncated file, a flipped bit in the data or a garbled
header each raise ``CheckpointError`` naming the file and the problem.

The model convention (``save_model`` / ``load_model``):

- tensors ``"model.<parameter name>"``, e.g. ``model.h.0.attn.c_attn.weight``;
- metadata ``{"format": "llm-from-scratch/1", "config": asdict(GPTConfig),
  "tokenizer": <the tokenizer's JSON text> or None, ...}``, plus what the
  training loop adds (``step``, ``rng``, ``data``, ``scaler``), and optimizer
  tensors ``"optim.<state>.<parameter name>"`` passed as ``extra_tensors``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np

from autograd import backend
from autograd.tensor import Tensor

from . import safetensors as st
from .atomic import atomic_open
from .model import GPT, GPTConfig

#: the value of metadata["format"] in a model checkpoint
FORMAT = "llm-from-scratch/1"
#: the metadata key that holds the SHA-256 of the data buffer (reserved)
CHECKSUM_KEY = "data_sha256"
#: the metadata key that holds the SHA-256 of the header's content: tensor index and other metadata (reserved)
HEADER_CHECKSUM_KEY = "header_sha256"
_CHECKSUM_KEYS = (CHECKSUM_KEY, HEADER_CHECKSUM_KEY)
_RESERVED_MODEL_KEYS = ("format", "config", "tokenizer")


class CheckpointError(Exception):
    """A checkpoint is missing, unreadable, corrupt or does not fit the model; the message names the file."""


# ---------------------------------------------------------------------------
# raw checkpoints: tensors + metadata
# ---------------------------------------------------------------------------


def _to_numpy(name, value):
    if isinstance(value, Tensor):
        value = value.data
    if not backend.is_array(value):
        raise TypeError(f"checkpoint tensor {name!r} must be an array or Tensor, got {type(value).__name__}")
    value = backend.to_device(value, "cpu")
    return value if value.flags.c_contiguous else value.copy(order="C")


def _encode_metadata(metadata: dict) -> dict:
    if not hasattr(metadata, "items"):
        raise TypeError(f"checkpoint metadata must be a dict, got {type(metadata).__name__}")
    out = {}
    for key, value in metadata.items():
        if not isinstance(key, str):
            raise TypeError(f"checkpoint metadata keys must be strings, got {key!r}")
        if key in _CHECKSUM_KEYS:
            raise ValueError(f"checkpoint metadata key {key!r} is reserved for the checksums")
        try:
            out[key] = json.dumps(value, allow_nan=True)
        except (TypeError, ValueError) as e:
            raise TypeError(f"checkpoint metadata {key!r} cannot be stored as JSON ({e}); store plain numbers, "
                            "strings, lists and dicts (convert arrays with .tolist())") from None
    return out


def _header_digest(index: dict, metadata: dict) -> str:
    """SHA-256 of the header's content (tensor names, dtypes, shapes, offsets; metadata but the checksums)."""
    content = {"tensors": index, "metadata": {k: v for k, v in metadata.items() if k not in _CHECKSUM_KEYS}}
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()





def save_checkpoint(path, tensors: dict, metadata: dict | None = None) -> None:
    """Write ``tensors`` (name -> array or Tensor, moved to the CPU) and ``metadata`` to ``path``, atomically.

    ``metadata`` values are any JSON-serialisable Python values. The SHA-256 of
    the tensor bytes is added under ``"data_sha256"``, and the SHA-256 of the
    header's content (tensor index and metadata) under ``"header_sha256"``.
    """
    path = os.fspath(path)
    arrays = {name: _to_numpy(name, v) for name, v in tensors.items()}
    meta = _encode_metadata(metadata or {})
    meta[HEADER_CHECKSUM_KEY] = _header_digest(st.layout(arrays), meta)
    meta[CHECKSUM_KEY] = st.data_sha256(arrays)
    with atomic_open(path, "wb") as f:
        st.write(f, arrays, meta)


def load_checkpoint(path, verify: bool = True) -> tuple[dict, dict]:
    """Read a checkpoint: ``(tensors: name -> np.ndarray, metadata: dict)``.

    Raises ``CheckpointError`` (naming ``path``) for a missing file, a bad
    header, a truncated file, or data whose SHA-256 differs from the stored
    one (skip that check with ``verify=False``). A safetensors file written by
    another tool (no checksum) is read without the check; metadata values
    that are not JSON are returned as the strings they are.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} is a folder, not a checkpoint file")
    try:
        raw_meta, index = st.read_header(path)
        if verify and HEADER_CHECKSUM_KEY in raw_meta and _header_digest(index, raw_meta) != raw_meta[
                HEADER_CHECKSUM_KEY]:
            raise CheckpointError(f"checkpoint {path} is corrupt: its header (tensor names, shapes or metadata) "
                                  "differs from what was written (header checksum mismatch)")
        if verify and CHECKSUM_KEY in raw_meta:
            actual = st.file_data_sha256(path)
            if actual != raw_meta[CHECKSUM_KEY]:
                raise CheckpointError(f"checkpoint {path} is corrupt: the SHA-256 of its tensor data is {actual}, "
                                      f"but {raw_meta[CHECKSUM_KEY]} was recorded when it was written")
        tensors = st.load_file(path, bf16="float32")
    except st.SafetensorsError as e:
        raise CheckpointError(f"checkpoint {path} is corrupt or not a checkpoint: {e}") from None
    except OSError as e:
        raise CheckpointError(f"checkpoint {path} cannot be read: {e}") from None
    metadata = {}
    for key, value in raw_meta.items():
        if key in _CHECKSUM_KEYS:
            continue
        try:
            metadata[key] = json.loads(value)
        except json.JSONDecodeError:
            metadata[key] = value
    return tensors, metadata


# ---------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------


def tokenizer_to_json(tokenizer) -> str:
    """The tokenizer's JSON text (its ``save`` format), for storing inside a checkpoint."""
    return tokenizer.to_json()


def tokenizer_from_json(text: str):
    """A ``Tokenizer`` from the JSON text ``tokenizer_to_json`` produced."""
    from .tokenizer import Tokenizer

    return Tokenizer.from_json(text, "the checkpoint's tokenizer")


def model_state_from_tensors(tensors: dict) -> dict:
    """The model's state dict inside a checkpoint's tensors: ``"model.<name>"`` entries, prefix removed."""
    return {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}


def tokenizer_from_metadata(metadata: dict, where: str):
    """The ``Tokenizer`` stored in a checkpoint's metadata, or None; CheckpointError if it is malformed."""
    text = metadata.get("tokenizer")
    if text is None:
        return None
    if not isinstance(text, str):
        raise CheckpointError(f"{where}: metadata 'tokenizer' must be the tokenizer's JSON text")
    try:
        return tokenizer_from_json(text)
    except ValueError as e:
        raise CheckpointError(f"{where}: the stored tokenizer is invalid: {e}") from None


def _check_vocab(tokenizer, config: GPTConfig, where: str):
    if tokenizer is not None and tokenizer.n_vocab != config.vocab_size:
        raise CheckpointError(f"{where}: the tokenizer has n_vocab={tokenizer.n_vocab} but the model's "
                              f"vocab_size is {config.vocab_size}; build the model with "
                              f"vocab_size=tokenizer.n_vocab")


def save_model(path, model: GPT, tokenizer=None, extra_tensors: dict | None = None,
               extra_metadata: dict | None = None) -> None:
    """Save ``model`` (tensors ``model.<name>``), its config and ``tokenizer`` to one checkpoint, atomically.

    ``extra_tensors`` (e.g. ``optim.exp_avg.<name>``) and ``extra_metadata``
    (e.g. ``step``) are stored alongside; their names must not collide with
    the model's.
    """
    path = os.fspath(path)
    if not isinstance(model, GPT):
        raise TypeError(f"save_model needs a GPT, got {type(model).__name__}")
    _check_vocab(tokenizer, model.config, f"save_model({path})")
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    for k, v in (extra_tensors or {}).items():
        if k in tensors:
            raise ValueError(f"save_model: extra tensor {k!r} collides with a model tensor; name it e.g. 'optim.{k}'")
        tensors[k] = v
    metadata = {"format": FORMAT, "config": dataclasses.asdict(model.config),
                "tokenizer": None if tokenizer is None else tokenizer_to_json(tokenizer)}
    for k, v in (extra_metadata or {}).items():
        if k in _RESERVED_MODEL_KEYS:
            raise ValueError(f"save_model: extra metadata key {k!r} is reserved ({', '.join(_RESERVED_MODEL_KEYS)})")
        metadata[k] = v
    save_checkpoint(path, tensors, metadata)


def config_from_metadata(metadata: dict, where: str = "checkpoint") -> GPTConfig:
    """The ``GPTConfig`` stored in a model checkpoint's metadata (CheckpointError if absent or invalid)."""
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{where} is not a model checkpoint of this project (metadata format "
                              f"{metadata.get('format')!r}, expected {FORMAT!r})")
    cfg = metadata.get("config")
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{where} has no model config in its metadata")
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    unknown = sorted(set(cfg) - fields)
    if unknown:
        raise CheckpointError(f"{where}: its config has fields this code does not know: {unknown} "
                              "(written by a newer version?)")
    try:
        return GPTConfig(**cfg)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: invalid model config: {e}") from None


def build_model(tensors: dict, metadata: dict, device: str = "cpu", where: str = "checkpoint"):
    """``(model, tokenizer or None)`` from what ``load_checkpoint`` returned for a ``save_model`` file.

    The model's dtype is that of the stored ``wte``; it is moved to ``device``.
    A training checkpoint of a LoRA run (metadata ``"lora"``) comes back with
    its adapters merged into the weights: a plain GPT. A missing, unexpected or
    wrongly shaped tensor raises ``CheckpointError`` listing the keys.
    """
    config = config_from_metadata(metadata, where)
    state = model_state_from_tensors(tensors)
    if metadata.get("lora"):
        state = _lora_merged_state(state, metadata["lora"], config, where)
    wte = state.get("wte.weight")
    dtype = wte.dtype if wte is not None and wte.dtype.kind == "f" else np.float32
    model = GPT(config, generator=np.random.default_rng(0), dtype=dtype)
    try:
        model.load_state_dict(state)
    except ValueError as e:
        raise CheckpointError(f"{where} does not fit its model config:\n{e}") from None
    tokenizer = tokenizer_from_metadata(metadata, where)
    if tokenizer is not None:
        _check_vocab(tokenizer, config, where)
    if device != "cpu":
        model.to(device)
    return model, tokenizer


def _lora_merged_state(state: dict, lora: dict, config, where: str) -> dict:
    """The state of a LoRA run's model (``lora``: its targets, rank, alpha) with the adapters folded into the weights."""
    from nn import apply_lora, merged_state_dict

    model = GPT(config, generator=np.random.default_rng(0))
    apply_lora(model, lora["targets"], lora["rank"], lora["alpha"])
    try:
        model.load_state_dict(state)
    except ValueError as e:
        raise CheckpointError(f"{where} does not fit its LoRA settings {lora}:\n{e}") from None
    return merged_state_dict(model)


def load_model(path, device: str = "cpu"):
    """Load a ``save_model`` checkpoint: ``(model, tokenizer or None, metadata)``.

    The model comes back in training mode, as a freshly built one does (call
    ``eval()`` for inference); ``metadata`` holds everything stored, including
    what the training loop added. For the optimizer tensors as well, call
    ``load_checkpoint`` once and pass its results to ``build_model``.
    """
    path = os.fspath(path)
    tensors, metadata = load_checkpoint(path)
    model, tokenizer = build_model(tensors, metadata, device=device, where=f"checkpoint {path}")
    return model, tokenizer, metadata


__all__ = ["CheckpointError", "FORMAT", "CHECKSUM_KEY", "HEADER_CHECKSUM_KEY", "save_checkpoint", "load_checkpoint",
           "save_model", "load_model", "build_model", "config_from_metadata", "tokenizer_to_json",
           "tokenizer_from_json"]
