"""Pipeline parallelism, the model side: split a GPT's blocks into stages, one ``GPTStage`` per rank.

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
stage holds block 3, ``wte.weight``, ``ln_f.weight``), so the stages' state
dicts put side by side are the model's state dict, and optimizer state (keyed
by name) moves between layouts unchanged: ``gather_state`` collects the full
model and optimizer state on rank 0 (one rank-independent checkpoint), and
``stage_state`` cuts a full state down to one stage of any other layout.

Tied embeddings: the head multiplies by ``wte``, which the first stage needs
for the lookup and the last for the logits. As in Megatron-LM, the last stage
keeps its own copy of ``wte.weight``, made equal at construction; after each
backward the two copies' gradients are summed between the first and the last
stage (``PipelineExecutor`` does it), so both see the full gradient (lookup part
plus head part), take the same optimizer step and stay identical. In a
checkpoint the table appears once.

Balancing (``partition_balanced``): the blocks are split into contiguous runs so
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
from llm.model import GPT, GPTConfig, tied_head

# ---------------------------------------------------------------------------
# partitioning
# ---------------------------------------------------------------------------


def check_counts(counts, n_layer: int, n_stages: int) -> list[int]:
    """Validate user-given blocks per stage: one positive integer per stage, adding up to ``n_layer``.

    Returns the counts as a list of ints; a ValueError names the counts and what is wrong.
    """
    counts = list(counts)
    if len(counts) != n_stages:
        raise ValueError(f"pipeline stage sizes {counts} give {len(counts)} stage(s), but the pipeline has "
                         f"{n_stages}: give one block count per stage")
    bad = [c for c in counts if isinstance(c, bool) or not isinstance(c, numbers.Integral) or c < 1]
    if bad:
        raise ValueError(f"pipeline stage sizes {counts}: every stage needs a whole number >= 1 of blocks, "
                         f"got {bad}")
    if sum(counts) != n_layer:
        raise ValueError(f"pipeline stage sizes {counts} add up to {sum(counts)} blocks, but the model has "
                         f"n_layer={n_layer}: the counts must add up to {n_layer}")
    return [int(c) for c in counts]


def partition_balanced(costs, n_stages: int, first_extra: float = 0.0, last_extra: float = 0.0) -> list[int]:
    """Blocks per stage: split ``costs`` (one per block, in order) into ``n_stages`` contiguous non-empty runs.

    Minimises the largest stage load (a run's cost, plus ``first_extra`` on the
    first stage and ``last_extra`` on the last); among equally good splits, the
    one with the smallest sum of squared loads (the most even), then the one
    that puts blocks earlier. Exact (dynamic programming over split points).
    """
    costs = [float(c) for c in costs]
    n, p = len(costs), int(n_stages)
    if p < 1:
        raise ValueError(f"the pipeline needs at least one stage, got n_stages={n_stages}")
    if n < p:
        raise ValueError(f"cannot split {n} blocks into {p} pipeline stages: every stage needs at least one block "
                         f"(use at most {n} stages, or a model with more layers)")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def load(stage, a, b):  # blocks a..b-1 on `stage`
        extra = (first_extra if stage == 0 else 0.0) + (last_extra if stage == p - 1 else 0.0)
        return prefix[b] - prefix[a] + extra

    # best[k][j]: (max load, sum of squares, counts) for the first j blocks on the first k stages
    best = [[None] * (n + 1) for _ in range(p + 1)]
    best[0][0] = (0.0, 0.0, ())
    for k in range(1, p + 1):
        for j in range(k, n - (p - k) + 1):
            cand = None
            for i in range(k - 1, j):  # stage k-1 holds blocks i..j-1
                prev = best[k - 1][i]
                if prev is None:
                    continue
                w = load(k - 1, i, j)
                key = (max(prev[0], w), prev[1] + w * w, tuple(-c for c in prev[2] + (j - i,)))
                if cand is None or key < cand[0]:
                    cand = (key, prev[2] + (j - i,))
            if cand is not None:
                best[k][j] = (cand[0][0], cand[0][1], cand[1])
    return list(best[p][n][2])


def block_parameters(config: GPTConfig) -> int:
    """Parameters of one block of ``config`` (all blocks of a GPT are the same size)."""
    from llm.sizing import parameter_breakdown

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


def parse_counts(text: str | None):
    """``"3,1"`` -> ``[3, 1]`` (a flag's value); None or "" -> None (balanced). ValueError names the bad text."""
    if text is None or str(text).strip() == "":
        return None
    try:
        return [int(t) for t in str(text).split(",")]
    except ValueError:
        raise ValueError(f"pipeline stage sizes {text!r} must be comma-separated whole numbers, e.g. 3,1") from None


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
# rank-independent state: gather to rank 0, cut down to a stage
# ---------------------------------------------------------------------------


def stage_state(stage: GPTStage, full_state: dict) -> dict:
    """The entries of a full model state dict (name -> array) that ``stage`` holds (its own names)."""
    names = list(stage.state_dict())
    missing = [n for n in names if n not in full_state]
    if missing:
        raise ValueError(f"the state has no entry for {len(missing)} of stage {stage.stage}'s tensors: "
                         + ", ".join(missing))
    return {n: full_state[n] for n in names}


def stage_optimizer_state(stage: GPTStage, full_opt_state: dict) -> dict:
    """An ``Optimizer.state_dict()`` of the whole model cut down to the parameters ``stage`` holds.

    Each group keeps only this stage's names (the groups' hyper-parameters are
    kept); per-parameter state likewise. The result loads into an optimizer
    built over the stage with the same grouping rule.
    """
    return _cut_opt(full_opt_state, [n for n, _ in stage.named_parameters()])


def merge_optimizer_states(parts: list, order: list | None = None) -> dict:
    """Join per-stage ``Optimizer.state_dict()``s into one over the whole model (group by group).

    A name held by two stages (the tied ``wte.weight``) is taken from the
    first part that has it. ``order``: the full model's parameter names, to
    list each group's names in model order.
    """
    n_groups = len(parts[0]["param_groups"])
    groups, state = [], {}
    for k in range(n_groups):
        g = {key: v for key, v in parts[0]["param_groups"][k].items() if key != "params"}
        names = []
        for part in parts:
            for n in part["param_groups"][k]["params"]:
                if n not in names:
                    names.append(n)
        if order is not None:
            rank = {n: i for i, n in enumerate(order)}
            names.sort(key=lambda n: rank.get(n, len(rank)))
        g["params"] = names
        groups.append(g)
    for part in parts:
        for n, v in part["state"].items():
            state.setdefault(n, v)
    return {"step": max(int(p.get("step", 0)) for p in parts), "state": state, "param_groups": groups}


def gather_state(grid, stage: GPTStage, optimizer=None, root: int = 0, tensors: dict | None = None):
    """Collect the whole model's state (and optimizer state) on world rank ``root`` (a collective call).

    ``grid``: the ``parallel.comm.Grid`` (dp x pp). The dp-rank-0 replica of
    every stage sends its arrays (copied to the host) to ``root``; other
    replicas hold the same values and send nothing. Returns ``(model_state,
    optimizer_state)`` on ``root``: ``model_state`` maps every full-model
    name to a NumPy array, in the full model's order, ``optimizer_state`` is
    an ``Optimizer.state_dict()`` over the full model (None without an
    optimizer). Other ranks get ``(None, None)``. ``tensors``: the arrays to
    send instead of ``stage.state_dict()`` (e.g. float32 master weights under
    the same names).
    """
    world = grid.world

    def snapshot():
        source = stage.state_dict() if tensors is None else tensors
        ms = {n: backend.to_device(v.data if isinstance(v, Tensor) else v, "cpu").copy() for n, v in source.items()}
        os_ = None
        if optimizer is not None:
            sd = optimizer.state_dict()
            os_ = {"step": sd["step"], "param_groups": sd["param_groups"],
                   "state": {n: {k: (backend.to_device(v, "cpu").copy() if backend.is_array(v) else v)
                                 for k, v in entry.items()} for n, entry in sd["state"].items()}}
        return ms, os_

    senders = [s * grid.dp for s in range(grid.pp)]  # world rank of (stage s, dp_rank 0)
    tag = 7_700
    if world.rank == root:
        parts = []
        for r in senders:
            parts.append(snapshot() if r == world.rank else world.recv(source=r, tag=tag))
    else:
        if world.rank in senders:
            world.send(snapshot(), dest=root, tag=tag)
        return None, None
    # stage by stage, each in model order: together the full model's order (a tied wte comes from stage 0;
    # the copies are equal)
    model_state = {}
    for ms, _ in parts:
        for n, v in ms.items():
            model_state.setdefault(n, v)
    opt_state = None
    if optimizer is not None:
        opt_state = merge_optimizer_states([o for _, o in parts], order=list(model_state))
    return model_state, opt_state


def scatter_state(grid, stage: GPTStage, model_state=None, opt_state=None, root: int = 0):
    """The inverse of ``gather_state``: world rank ``root`` holds a full model state (and optimizer state);
    every rank gets the part its ``stage`` holds. Returns ``(stage_model_state, stage_opt_state or None)``.

    A collective call; any layout works (the full state knows nothing of the
    one it was saved from). Each rank announces the names it needs; ``root``
    sends each rank exactly those arrays.
    """
    world = grid.world
    names = list(stage.state_dict())
    param_names = [n for n, _ in stage.named_parameters()]
    wanted = world.allgather((names, param_names)) if world.size > 1 else [(names, param_names)]
    has_opt = world.bcast(opt_state is not None if world.rank == root else None, root=root) \
        if world.size > 1 else opt_state is not None
    tag = 7_701
    if world.rank == root:
        missing = sorted({n for ns, _ in wanted for n in ns if n not in model_state})
        if world.size > 1:
            world.bcast(missing, root=root)
        if missing:
            raise ValueError(f"the full state lacks {len(missing)} tensor(s) a stage needs: " + ", ".join(missing))
        mine = None
        for r, (ns, pns) in enumerate(wanted):
            part = ({n: model_state[n] for n in ns}, _cut_opt(opt_state, pns) if has_opt else None)
            if r == root:
                mine = part
            else:
                world.send(part, dest=r, tag=tag)
        return mine
    missing = world.bcast(None, root=root)
    if missing:
        raise ValueError(f"the full state lacks {len(missing)} tensor(s) a stage needs: " + ", ".join(missing))
    return world.recv(source=root, tag=tag)


def _cut_opt(full_opt_state: dict, names) -> dict:
    names = set(names)
    groups = []
    for g in full_opt_state["param_groups"]:
        g = dict(g)
        g["params"] = [n for n in g["params"] if n in names]
        groups.append(g)
    state = {n: dict(v) for n, v in full_opt_state["state"].items() if n in names}
    return {"step": full_opt_state.get("step", 0), "state": state, "param_groups": groups}


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
    from llm.checkpoint import model_state_from_tensors

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

    from llm.checkpoint import FORMAT, save_checkpoint

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
    from llm.checkpoint import CheckpointError, load_checkpoint

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


__all__ = ["check_counts", "partition_balanced", "block_parameters", "stage_layout", "parse_counts", "GPTStage",
           "build_stage", "stage_state", "stage_optimizer_state", "merge_optimizer_states", "gather_state", "scatter_state",
           "state_to_tensors", "tensors_to_state", "save_pipeline_checkpoint", "load_pipeline_checkpoint"]
