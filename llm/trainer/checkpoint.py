"""Training checkpoints: everything a run needs to continue bitwise, in one model checkpoint file.

One safetensors file written atomically by ``llm.checkpoint.save_checkpoint``
(temp file, fsync, rename: a crash leaves the old checkpoint or the new one,
never half of one; a SHA-256 of the bytes detects corruption). It is a model
checkpoint in the project's format, so ``python -m llm generate`` reads it,
plus the training state. Whatever the layout (one process, dp x pp, ZeRO) the
file is the one a single process writes, so a run resumes on any layout:

    tensors
      model.<name>               the weights in float32 (in mixed precision: the float32 master
                                 weights, of which the float16 model is the rounding)
      optim.exp_avg.<name>       AdamW's first moment, per parameter name
      optim.exp_avg_sq.<name>    AdamW's second moment
    metadata (JSON)
      format, config, tokenizer  the model convention of llm.checkpoint (config = asdict(GPTConfig),
                                 tokenizer = its JSON text)
      kind, job                  "training-state", and the job that wrote it ("pretrain", "sft", ...)
      step                       optimizer steps completed (the learning-rate schedule's position)
      optimizer                  AdamW's step counts (global and per parameter) and hyper-parameters
      mixed_precision            the precision and the loss scaler's state (scale, clean-step counter)
      data                       the batch sampler's state (the next batch it draws)
      rng                        the seed, and the state of autograd.random's NumPy generator
      train_config               the run's flags (to warn when a resumed run changes one)
      tokens, val_loss, ...      bookkeeping for people

No pickle anywhere: a checkpoint from a stranger cannot run code.

Randomness: the dropout stream is re-seeded before every step from ``(seed,
step)`` (``seed_dropout_for_step``), like the batch sampler, so the masks of
step k do not depend on what ran before it (an evaluation, a sample, a resume)
or on the device: CuPy's generator state, which cannot be saved, never needs to be.

Writing can fail for want of room: ``CheckpointWriteError`` then says where,
how many bytes were needed and how many were free; the previous checkpoint
is untouched (the write went to a temporary file, which is removed). A run
killed in the middle of a write leaves that temporary file behind:
``remove_stale_temporaries`` deletes ours at the next start.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
from pathlib import Path

import numpy as np

import autograd.random as agrandom
from nn.amp import NonFiniteError

from ..checkpoint import (FORMAT, CheckpointError, config_from_metadata, load_checkpoint, model_state_from_tensors,
                          save_checkpoint, tokenizer_from_metadata)
from ..model import GPTConfig

#: metadata["kind"] of a checkpoint that holds a training state
KIND = "training-state"


class ResumeError(Exception):
    """A checkpoint cannot be resumed: missing, corrupt, or made for another model, tokenizer or precision."""


class CheckpointWriteError(OSError):
    """The checkpoint could not be written (the disk is full, or the folder is not writable)."""


# ---------------------------------------------------------------------------
# randomness
# ---------------------------------------------------------------------------


def step_seed(seed: int, step: int) -> int:
    """A 63-bit seed derived from ``(seed, step)`` with NumPy's SeedSequence (well mixed, the same everywhere)."""
    return int(np.random.SeedSequence([int(seed), int(step)]).generate_state(2, np.uint32).view(np.uint64)[0] >> 1)


def seed_dropout_for_step(seed: int, step: int):
    """Re-seed autograd.random's generators (dropout's) for optimizer step ``step``: ``manual_seed(step_seed(...))``."""
    agrandom.manual_seed(step_seed(seed, step))


def rng_state(seed: int) -> dict:
    """The RNG part of a checkpoint: the run's seed and autograd.random's NumPy generator state (a dict of ints)."""
    return {"seed": int(seed), "dropout": "autograd.random.manual_seed(step_seed(seed, step)) before each step",
            "numpy_default": agrandom.default_generator(np).bit_generator.state}


def restore_rng_state(state: dict):
    """Put back autograd.random's NumPy generator state saved by ``rng_state``."""
    saved = state.get("numpy_default") if isinstance(state, dict) else None
    if saved is not None:
        agrandom.default_generator(np).bit_generator.state = saved


# ---------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------


def tensors_are_finite(tensors: dict) -> bool:
    """Whether every floating array in ``tensors`` is finite (one sum each, in float64)."""
    with np.errstate(over="ignore", invalid="ignore"):
        total = sum(float(np.asarray(v).sum(dtype=np.float64)) for v in tensors.values()
                    if np.asarray(v).dtype.kind == "f")
    return bool(np.isfinite(total))


def save_training_checkpoint(path, *, model_state: dict, opt_state: dict, config: GPTConfig, precision: dict,
                             scaler_state: dict, sampler_state: dict, step: int, seed: int, job: str,
                             tokenizer_json: str | None, train_config: dict | None = None,
                             extra_metadata: dict | None = None):
    """Write the whole training state (module docstring) to ``path`` atomically.

    ``model_state``: float32 arrays by full parameter name (the masters);
    ``opt_state``: an ``AdamW.state_dict()`` over the whole model. Refuses
    (NonFiniteError) to write weights that are not finite, so a good checkpoint
    is never replaced by a diverged one; a full disk raises
    ``CheckpointWriteError`` (the previous file is kept).
    """
    if not tensors_are_finite(model_state):
        raise NonFiniteError(f"the weights are not finite after step {step}; {path} was not overwritten")
    tensors = {f"model.{name}": value for name, value in model_state.items()}
    param_steps = {}
    for name, entry in opt_state["state"].items():
        for key, value in entry.items():
            if key != "step":
                tensors[f"optim.{key}.{name}"] = value
        param_steps[name] = int(entry.get("step", 0))
    metadata = {
        "format": FORMAT,
        "kind": KIND,
        "job": job,
        "config": dataclasses.asdict(config),
        "tokenizer": tokenizer_json,
        "step": int(step),
        "optimizer": {"type": "AdamW", "step": int(opt_state["step"]), "param_steps": param_steps,
                      "param_groups": opt_state["param_groups"]},
        "mixed_precision": {"precision": precision, "scaler": scaler_state},
        "data": sampler_state,
        "rng": rng_state(seed),
        "train_config": train_config or {},
    }
    for k, v in (extra_metadata or {}).items():
        if k in metadata:
            raise ValueError(f"extra checkpoint metadata {k!r} collides with a training-state key")
        metadata[k] = v
    try:
        save_checkpoint(path, tensors, metadata)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EROFS, errno.EPERM):
            raise
        raise _write_error(path, tensors, e) from None


def _write_error(path, tensors: dict, error: OSError) -> CheckpointWriteError:
    folder = Path(path).resolve().parent
    needed = sum(int(np.asarray(v).nbytes) for v in tensors.values())
    try:
        free = f"{shutil.disk_usage(folder).free:,} bytes free"
    except OSError:
        free = "free space unknown"
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        why = f"the disk is full: it needs about {needed:,} bytes, {free} in {folder}"
        fix = "free some space (or pass another --out-dir) and resume"
    else:
        why = f"{folder} is not writable ({error.strerror})"
        fix = "pass a writable --out-dir and resume"
    return CheckpointWriteError(error.errno, f"could not write the checkpoint {path}: {why}; the previous checkpoint "
                                             f"is intact; {fix}")


def remove_stale_temporaries(folder, names, log=print) -> list[str]:
    """Delete the temporary files our atomic writes of ``names`` left in ``folder`` when a run was killed mid-write.

    ``llm.atomic`` writes ``NAME`` through ``.tmp-XXXXXXXX-NAME`` in the same
    folder; a kill during the write leaves that file behind (as large as the
    checkpoint). Only files of exactly that form are removed; returns their
    names, and says so through ``log``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in sorted(folder.iterdir()):
        if not entry.name.startswith(".tmp-") or not entry.is_file():
            continue
        if any(entry.name.endswith("-" + name) and len(entry.name) > len(".tmp--" + name) for name in names):
            size = entry.stat().st_size
            try:
                os.unlink(entry)
            except OSError:
                continue
            removed.append(entry.name)
            log(f"removed {entry} ({size:,} bytes), a temporary file left by a run killed while writing")
    return removed


# ---------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------


def _diff(ours: dict, theirs: dict) -> list[str]:
    return [f"{k}: checkpoint {theirs.get(k)!r}, now {ours.get(k)!r}"
            for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]


@dataclasses.dataclass
class TrainingCheckpoint:
    """A training checkpoint read back and verified: ``TrainingCheckpoint.load(path)``.

    ``check_compatible(config, tokenizer)`` before building anything, then
    ``model_state()`` into the freshly built float32 model, and
    ``optimizer_state()``, ``scaler_state``, ``sampler_state`` and
    ``restore_rng()`` once those exist. Every failure is a ``ResumeError``
    naming the file and the problem.
    """

    path: str
    tensors: dict
    metadata: dict
    config: GPTConfig

    @classmethod
    def load(cls, path) -> "TrainingCheckpoint":
        """Read and verify ``path`` (checksums, format, training keys); ResumeError otherwise."""
        path = os.fspath(path)
        try:
            tensors, metadata = load_checkpoint(path)
            config = config_from_metadata(metadata, where=f"checkpoint {path}")
        except CheckpointError as e:
            raise ResumeError(str(e)) from None
        missing = [k for k in ("step", "optimizer", "mixed_precision", "data", "rng") if k not in metadata]
        if missing:
            raise ResumeError(f"checkpoint {path} holds a model but no training state (missing {', '.join(missing)}); "
                              "it cannot be resumed")
        if not isinstance(metadata["step"], int) or metadata["step"] < 0:
            raise ResumeError(f"checkpoint {path} has an invalid step {metadata['step']!r}")
        return cls(path, tensors, metadata, config)

    @property
    def step(self) -> int:
        """Optimizer steps completed when the checkpoint was written."""
        return int(self.metadata["step"])

    @property
    def train_config(self) -> dict:
        """The flags the checkpointed run was started with (a dict; empty if unknown)."""
        tc = self.metadata.get("train_config")
        return tc if isinstance(tc, dict) else {}

    def check_compatible(self, config: GPTConfig, tokenizer=None, precision: dict | None = None):
        """ResumeError unless the checkpoint's model config, tokenizer and precision are this run's."""
        diff = _diff(dataclasses.asdict(config), dataclasses.asdict(self.config))
        if diff:
            raise ResumeError(f"checkpoint {self.path} was trained with another model config than these flags give:\n  "
                              + "\n  ".join(diff) + "\npass the model flags it was trained with (--preset, --n-layer, "
                              "--n-head, --n-embd, --block-size, --dropout, --model-config, --vocab-size / "
                              "--tokenizer), or start a new run in another --out-dir")
        if tokenizer is not None:
            from ..data import tokenizer_sha256

            try:
                theirs = tokenizer_from_metadata(self.metadata, f"checkpoint {self.path}")
            except CheckpointError as e:
                raise ResumeError(str(e)) from None
            if theirs is None:
                raise ResumeError(f"checkpoint {self.path} holds no tokenizer, so its vocabulary cannot be checked")
            if tokenizer_sha256(theirs) != tokenizer_sha256(tokenizer):
                raise ResumeError(f"checkpoint {self.path} was trained with another tokenizer ({theirs.n_vocab} "
                                  f"tokens) than this run's ({tokenizer.n_vocab} tokens): its token ids mean "
                                  "other things; pass the same --tokenizer / --vocab-size and --data as the run that "
                                  "wrote it")
        if precision is not None:
            saved = (self.metadata.get("mixed_precision") or {}).get("precision")
            if saved != precision:
                raise ResumeError(f"checkpoint {self.path} was trained with precision {saved}, this run uses "
                                  f"{precision}: resume with the same --precision")

    def model_state(self) -> dict:
        """The float32 weights by parameter name (the masters of a mixed-precision run)."""
        return model_state_from_tensors(self.tensors)

    def load_model(self, model):
        """Copy the checkpoint's weights into ``model`` (float32, built from the same config)."""
        try:
            model.load_state_dict(self.model_state())
        except ValueError as e:
            raise ResumeError(f"checkpoint {self.path} does not fit the model:\n{e}") from None

    def optimizer_state(self) -> dict:
        """AdamW's state over the whole model, in ``Optimizer.state_dict()``'s format (arrays by name)."""
        om = self.metadata["optimizer"]
        state = {}
        for name, t in om["param_steps"].items():
            entry = {"step": int(t)}
            for key in ("exp_avg", "exp_avg_sq"):
                arr = self.tensors.get(f"optim.{key}.{name}")
                if arr is not None:
                    entry[key] = arr
            state[name] = entry
        # only the parameter names of the groups: the hyper-parameters are this run's flags
        groups = [{"params": list(g["params"])} for g in om["param_groups"]]
        return {"step": int(om["step"]), "state": state, "param_groups": groups}

    @property
    def scaler_state(self) -> dict:
        """The loss scaler's state."""
        return self.metadata["mixed_precision"]["scaler"]

    @property
    def sampler_state(self) -> dict:
        """The batch sampler's state (where the data continues)."""
        return self.metadata["data"]

    def restore_rng(self):
        """Put back autograd.random's generator state."""
        restore_rng_state(self.metadata.get("rng") or {})

    def changed_flags(self, train_config: dict, ignore=()) -> list:
        """``"flag: checkpoint X, now Y"`` for each recorded flag this run changes (bitwise resume needs none)."""
        theirs = self.train_config
        if not theirs:
            return []
        keys = (set(train_config) | set(theirs)) - set(ignore)
        return _diff({k: train_config.get(k) for k in keys}, {k: theirs.get(k) for k in keys})


__all__ = ["KIND", "ResumeError", "CheckpointWriteError", "NonFiniteError", "step_seed", "seed_dropout_for_step",
           "rng_state", "restore_rng_state", "tensors_are_finite", "save_training_checkpoint",
           "remove_stale_temporaries", "TrainingCheckpoint"]
