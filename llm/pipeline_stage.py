"""Pipeline parallelism, the GPT's side: split its blocks into stages, one ``GPTStage`` per rank.

    >>> from llm.model import get_preset
    >>> config = get_preset("tiny", vocab_size=256, n_layer=4)
    >>> stage_layout(config, n_stages=2)                # balanced by parameter count
    [range(0, 2), range(2, 4)]
    >>> stage_layout(config, 2, counts=[3, 1])          # or given by the user
    [range(0, 3), range(3, 4)]

What lives where (Megatron-LM's layout, Narayanan et al. 2021):

- the first stage: the token and position embeddings (``wte``, ``wpe``, ``drop``)
  and its blocks; its input is the token ids;
- the middle stages: their blocks only; input and output are activations (B, T, C);
- the last stage: its blocks, the final norm ``ln_f``, the head and the loss.

Parameter names are the full model's (``h.3.attn.c_attn.weight`` on whichever
stage holds block 3, ``wte.weight``, ``ln_f.weight``), so ``parallel.pipeline``'s
``gather_state`` / ``scatter_state`` move whole-model state between layouts,
and ``save_pipeline_checkpoint`` / ``load_pipeline_checkpoint`` write and read
one checkpoint file in the single-process format, whatever the layout.

Tied embeddings: the head multiplies by ``wte``, which the first stage needs
for the lookup and the last for the logits. As in Megatron-LM, the last stage
keeps its own copy of ``wte.weight``, made equal at construction; after each
backward the two copies' gradients are summed between the first and the last
stage (``PipelineExecutor`` does it), so both see the full gradient (lookup part
plus head part), take the same optimizer step and stay identical. In a
checkpoint the table appears once.

Balancing (``parallel.pipeline.partition_balanced``): the blocks are split into contiguous runs so
that the largest per-stage parameter count is as small as possible, counting the
parameters that do matrix-product work (``llm.sizing``'s convention): every
block's, and on the last stage the head's (``n_embd * vocab_size``, the tied
``wte`` included) and ``ln_f``. The embedding lookups on the first stage cost
no matrix products and are not counted. A large vocabulary therefore moves
blocks off the last stage.
"""

from __future__ import annotations

import copy
import numbers

import numpy as np

import autograd
import nn
from autograd import backend
from autograd.tensor import Tensor
from parallel.pipeline import check_counts, gather_state, partition_balanced, scatter_state

from .model import GPT, GPTConfig, tied_head

# ---------------------------------------------------------------------------
# the layout
# ---------------------------------------------------------------------------


def block_parameters(config: GPTConfig) -> int:
    """Parameters of one block of ``config`` (all blocks of a GPT are the same size)."""
    from .sizing import parameter_breakdown

    b = parameter_breakdown(config)
    norm = b["norms"] // (2 * config.n_layer + 1)
    return (b["attn"] + b["mlp"]) // config.n_layer + 2 * norm


def stage_layout(config: GPTConfig, n_stages: int, counts=None) -> list[range]:
    """The blocks of each stage, ``[range(start, stop), ...]``: from ``counts`` (validated) or balanced.

    Balanced: by parameter count, the head's on the last stage (see the module docstring).
    """
    if isinstance(n_stages, bool) or not isinstance(n_stages, numbers.Integral) or n_stages < 1:
        raise ValueError(f"the number of pipeline stages must be a positive integer, got {n_stages!r}")
    if counts is not None:
        counts = check_counts(counts, config.n_layer, n_stages)
    else:
        if config.n_layer < n_stages:
            raise ValueError(f"cannot split n_layer={config.n_layer} blocks into {n_stages} pipeline stages: every "
                             f"stage needs at least one block (use at most {config.n_layer} stages)")
        head = config.n_embd * config.vocab_size + config.n_embd * (2 if config.norm == "layernorm" and config.bias
                                                                  else 1)
        counts = partition_balanced([block_parameters(config)] * config.n_layer, n_stages, last_extra=head)
    out, start = [], 0
    for c in counts:
        out.append(range(start, start + c))
        start += c
    return out


# ---------------------------------------------------------------------------
# the stage module
# ---------------------------------------------------------------------------


class GPTStage(nn.Module):
    """Stage ``stage`` of ``n_stages`` of a GPT: its blocks, plus the embeddings (first) or head and loss (last).

    Build it from a full model with ``GPTStage(model, stage, layout)`` (it takes
    the model's modules, sharing them; ``build_stage`` builds the model from a
    seed first). Children, in the full model's order: ``wte``, ``wpe``,
    ``drop`` (first stage; ``wte`` also on the last when the head is tied),
    ``h`` (an ``nn.ModuleDict`` keyed "3", "4", ... by block index), ``ln_f``
    and ``lm_head`` (last stage; ``lm_head`` only when untied).

    ``forward(x, targets=None, n_tokens=None)``:

    - ``x``: token ids ``(B, T)`` on the first stage, the previous stage's
      activation ``(B, T, C)`` (a Tensor) elsewhere;
    - returns the activation ``(B, T, C)`` on every stage but the last; on the
      last, the logits ``(B, T, V)`` without ``targets``, and with them the loss
      ``sum of cross-entropies / n_tokens`` (``n_tokens`` defaults to the number
      of non-ignored targets here, i.e. the mean). Pass the token count of the
      whole global batch so that micro-batch losses add up to the batch mean.
    """

    def __init__(self, model: GPT, stage: int, layout: list):
        super().__init__()
        if not isinstance(model, GPT):
            raise TypeError(f"GPTStage needs a GPT to take its layers from, got {type(model).__name__}")
        n_stages = len(layout)
        if not 0 <= stage < n_stages:
            raise ValueError(f"stage {stage} does not exist in a pipeline of {n_stages} stages (0..{n_stages - 1})")
        flat = [i for r in layout for i in r]
        if flat != list(range(model.config.n_layer)):
            raise ValueError(f"the stage layout {layout} does not cover blocks 0..{model.config.n_layer - 1} "
                             "exactly once, in order")
        c = model.config
        self.config = c
        self.stage, self.n_stages = stage, n_stages
        self.layout = [range(r.start, r.stop) for r in layout]
        self.blocks = self.layout[stage]
        self.is_first, self.is_last = stage == 0, stage == n_stages - 1
        self.tied = bool(c.tie_embeddings)
        if self.is_first:
            self.wte = model.wte
            self.wpe = model.wpe
            self.drop = model.drop
        elif self.is_last and self.tied:
            self.wte = copy.deepcopy(model.wte)  # the head's own copy; its gradient is summed with stage 0's
        self.h = nn.ModuleDict({str(i): model.h[i] for i in self.blocks})
        if self.is_last:
            self.ln_f = model.ln_f
            if not self.tied:
                self.lm_head = model.lm_head
        self.training = model.training

    @property
    def tied_weight(self):
        """``(name, Parameter)`` of the weight the first and the last stage both hold (the tied ``wte``), else None.

        Set on those two stages of a multi-stage pipeline with tied embeddings;
        the executor sums the two copies' gradients after every backward.
        """
        if not self.tied or self.n_stages == 1 or not (self.is_first or self.is_last):
            return None
        return "wte.weight", self.wte.weight

    @property
    def holds_tied_copy(self) -> bool:
        """True on the last stage of a multi-stage pipeline with tied embeddings: its ``wte`` is the head's copy."""
        return self.tied and self.is_last and not self.is_first

    @property
    def activation_dtype(self):
        """The dtype of the activations this stage receives and sends (that of its parameters)."""
        return next(iter(self.h.parameters())).dtype

    @property
    def device(self) -> str:
        """"cpu" or "cuda": where the parameters live."""
        return next(iter(self.parameters())).device

    def activation_shape(self, ids_shape) -> tuple:
        """The shape of the activation between stages for token ids of shape ``(B, T)``: ``(B, T, n_embd)``."""
        return (int(ids_shape[0]), int(ids_shape[1]), self.config.n_embd)

    def forward(self, x, targets=None, n_tokens=None):
        c = self.config
        if self.is_first:
            if isinstance(x, Tensor):
                x = x.data
            if not backend.is_array(x):
                x = np.asarray(x)
            if x.dtype.kind not in "iu" or x.ndim != 2:
                raise ValueError(f"the first pipeline stage takes integer token ids of shape (B, T), got an array "
                                 f"of dtype {x.dtype} and shape {x.shape}")
            T = x.shape[1]
            if T > c.block_size:
                raise ValueError(f"{T} positions exceed block_size={c.block_size}; crop the context")
            x = self.wte(backend.to_device(x, self.device))  # (B, T, C)
            if self.wpe is not None:
                x = x + self.wpe.weight[0:T]  # (T, C) broadcast over B
            x = self.drop(x)
        elif not isinstance(x, Tensor):
            raise TypeError(f"stage {self.stage} takes the previous stage's activation as a Tensor (B, T, C), got "
                            f"{type(x).__name__}")
        for block in self.h.values():
            x = block(x)
        if not self.is_last:
            return x
        x = self.ln_f(x)
        logits = tied_head(x, self.wte.weight) if self.tied else self.lm_head(x)  # (B, T, V)
        if targets is None:
            return logits
        if isinstance(targets, Tensor):
            targets = targets.data
        targets = backend.to_device(targets if backend.is_array(targets) else np.asarray(targets), self.device)
        B, T, V = logits.shape
        if targets.shape != (B, T):
            raise ValueError(f"targets of shape {targets.shape} must match the batch {(B, T)}")
        if n_tokens is None:
            n_tokens = int((targets != -100).sum())
        total = autograd.cross_entropy(logits.reshape(B * T, V),  # (B*T, V)
                                       targets.reshape(B * T),  # (B*T,)
                                       ignore_index=-100, reduction="sum")
        return total / max(int(n_tokens), 1)  # a Python int keeps the dtype

    def extra_repr(self):
        return f"stage {self.stage} of {self.n_stages}, blocks {self.blocks.start}..{self.blocks.stop - 1}"


def build_stage(config: GPTConfig, stage: int, n_stages: int, counts=None, generator=None, dtype=np.float32,
                model: GPT | None = None) -> GPTStage:
    """Stage ``stage`` of ``config``'s GPT, with exactly the weights ``GPT(config, generator, dtype)`` would have.

    The whole model is built (on the host, from ``generator``) and the stage
    keeps its part; the rest is freed. Every rank that passes equal
    generators gets consistent stages. ``model``: take the parts of this one
    instead.
    """
    layout = stage_layout(config, n_stages, counts)
    if model is None:
        model = GPT(config, generator=generator, dtype=dtype)
    return GPTStage(model, stage, layout)


# ---------------------------------------------------------------------------
# one checkpoint file, whatever the layout
# ---------------------------------------------------------------------------


def state_to_tensors(model_state: dict, opt_state: dict | None, state_keys=("exp_avg", "exp_avg_sq"),
                     optimizer_type: str = "AdamW") -> tuple[dict, dict]:
    """``(tensors, metadata)`` in the training checkpoint convention (``llm.trainer_state``).

    Tensors ``model.<name>`` and ``optim.<state key>.<name>``; metadata
    ``{"optimizer": {"type", "step", "param_steps", "param_groups"}}``.
    """
    tensors = {f"model.{n}": v for n, v in model_state.items()}
    meta = {}
    if opt_state is not None:
        param_steps = {}
        for name, entry in opt_state["state"].items():
            for key in state_keys:
                if key in entry:
                    tensors[f"optim.{key}.{name}"] = entry[key]
            param_steps[name] = int(entry.get("step", 0))
        meta["optimizer"] = {"type": optimizer_type, "step": int(opt_state["step"]), "param_steps": param_steps,
                             "param_groups": opt_state["param_groups"]}
    return tensors, meta


def tensors_to_state(tensors: dict, metadata: dict, state_keys=("exp_avg", "exp_avg_sq")):
    """The inverse of ``state_to_tensors``: ``(model_state, opt_state or None)`` from a checkpoint's contents."""
    from .checkpoint import model_state_from_tensors

    model_state = model_state_from_tensors(tensors)
    om = metadata.get("optimizer")
    if not isinstance(om, dict):
        return model_state, None
    state = {}
    for name, t in om["param_steps"].items():
        entry = {"step": int(t)}
        for key in state_keys:
            arr = tensors.get(f"optim.{key}.{name}")
            if arr is not None:
                entry[key] = arr
        state[name] = entry
    groups = [dict(g) for g in om["param_groups"]]
    return model_state, {"step": int(om["step"]), "state": state, "param_groups": groups}


def save_pipeline_checkpoint(path, grid, stage: GPTStage, optimizer=None, metadata: dict | None = None,
                             root: int = 0):
    """Write the whole model (and optimizer) state as ONE checkpoint file from world rank ``root`` (collective).

    The file has the single-process layout (``llm.checkpoint`` format,
    ``model.<name>`` and ``optim.<key>.<name>`` tensors, the model config in the
    metadata), so any layout, including one process, can load it. Returns on
    every rank after the file is complete.
    """
    import dataclasses

    from .checkpoint import FORMAT, save_checkpoint

    model_state, opt_state = gather_state(grid, stage, optimizer, root=root)
    error = None
    if grid.world.rank == root:
        try:
            keys = getattr(optimizer, "state_keys", ("exp_avg", "exp_avg_sq"))
            tensors, meta = state_to_tensors(model_state, opt_state, keys, type(optimizer).__name__)
            meta.update({"format": FORMAT, "config": dataclasses.asdict(stage.config), "tokenizer": None})
            meta.update(metadata or {})
            save_checkpoint(path, tensors, meta)
        except Exception as e:  # every rank raises it, none waits for rank 0 forever
            error = f"{type(e).__name__}: {e}"
    error = grid.world.bcast(error, root=root) if grid.world.size > 1 else error
    if error is not None:
        raise RuntimeError(f"writing the pipeline checkpoint {path} failed on rank {root}: {error}")


def load_pipeline_checkpoint(path, grid, stage: GPTStage, optimizer=None, root: int = 0) -> dict:
    """Read ONE checkpoint file on world rank ``root`` and load each rank's part into ``stage`` (and ``optimizer``).

    The file may come from any layout (or from one process). Returns the
    checkpoint's metadata on every rank. A missing or corrupt file raises the
    same ``CheckpointError`` on every rank.
    """
    from .checkpoint import CheckpointError, load_checkpoint

    world = grid.world
    model_state = opt_state = metadata = None
    error = None
    if world.rank == root:
        try:
            tensors, metadata = load_checkpoint(path)
            keys = getattr(optimizer, "state_keys", ("exp_avg", "exp_avg_sq"))
            model_state, opt_state = tensors_to_state(tensors, metadata, keys)
        except CheckpointError as e:
            error = str(e)
    error = world.bcast(error, root=root) if world.size > 1 else error
    if error is not None:
        raise CheckpointError(error)
    metadata = world.bcast(metadata, root=root) if world.size > 1 else metadata
    if optimizer is None:
        opt_state = None
    part_model, part_opt = scatter_state(grid, stage, model_state, opt_state, root=root)
    stage.load_state_dict(part_model)
    if optimizer is not None:
        if part_opt is None:
            raise CheckpointError(f"checkpoint {path} holds no optimizer state to resume from")
        optimizer.load_state_dict(part_opt)
    return metadata


__all__ = ["block_parameters", "stage_layout", "GPTStage", "build_stage", "state_to_tensors", "tensors_to_state",
           "save_pipeline_checkpoint", "load_pipeline_checkpoint"]
