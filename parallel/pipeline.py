"""Pipeline parallelism, the model-agnostic side: balanced stage sizes and rank-independent state.

A pipeline splits a model's repeated blocks into contiguous runs, one per
stage (one rank each); the model side of it, which modules a stage keeps and
how its forward runs, belongs to the model (``llm.model.GPT.pipeline_stage``
for the GPT). This module holds what does not depend on the model:

- ``partition_balanced``: blocks per stage that minimise the largest stage's
  cost (exact, by dynamic programming), and ``check_counts`` /
  ``parse_counts`` for sizes a user gives;
- rank-independent state. Stages name their parameters as the full model
  does (``h.3.attn.c_attn.weight`` on whichever stage holds block 3), so the
  stages' state dicts put side by side are the model's state dict, and
  optimizer state (keyed by name) moves between layouts unchanged:
  ``gather_state`` collects the full model and optimizer state on rank 0 (one
  checkpoint, whatever the layout), and ``stage_optimizer_state`` cuts a full
  optimizer state down to one stage of any other layout.

Any ``nn.Module`` with a ``stage`` number works here; the executor
(``parallel.pipeline_exec``) lists the few more attributes it reads.
"""

from __future__ import annotations

import numbers

from autograd import backend
from autograd.tensor import Tensor

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


def parse_counts(text: str | None):
    """``"3,1"`` -> ``[3, 1]`` (a flag's value); None or "" -> None (balanced). ValueError names the bad text."""
    if text is None or str(text).strip() == "":
        return None
    try:
        return [int(t) for t in str(text).split(",")]
    except ValueError:
        raise ValueError(f"pipeline stage sizes {text!r} must be comma-separated whole numbers, e.g. 3,1") from None


# ---------------------------------------------------------------------------
# rank-independent state: gather to rank 0, cut down to a stage
# ---------------------------------------------------------------------------


def stage_optimizer_state(stage, full_opt_state: dict) -> dict:
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


def gather_state(grid, stage, optimizer=None, root: int = 0, tensors: dict | None = None, opt_state: dict | None = None):
    """Collect the whole model's state (and optimizer state) on world rank ``root`` (a collective call).

    ``grid``: the ``parallel.comm.Grid`` (dp x pp). The dp-rank-0 replica of
    every stage sends its arrays (copied to the host) to ``root``; other
    replicas hold the same values and send nothing. Returns ``(model_state,
    optimizer_state)`` on ``root``: ``model_state`` maps every full-model
    name to a NumPy array, in the full model's order, ``optimizer_state`` is
    an ``Optimizer.state_dict()`` over the full model (None without an
    optimizer). Other ranks get ``(None, None)``. ``tensors``: the arrays to
    send instead of ``stage.state_dict()`` (e.g. float32 master weights under
    the same names); ``opt_state``: the optimizer state to send instead of
    ``optimizer.state_dict()`` (e.g. ZeRO's, gathered over the replicas).
    """
    world = grid.world

    def snapshot():
        source = stage.state_dict() if tensors is None else tensors
        ms = {n: backend.to_device(v.data if isinstance(v, Tensor) else v, "cpu").copy() for n, v in source.items()}
        os_ = None
        if optimizer is not None or opt_state is not None:
            sd = optimizer.state_dict() if opt_state is None else opt_state
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
    merged = None
    if optimizer is not None or opt_state is not None:
        merged = merge_optimizer_states([o for _, o in parts], order=list(model_state))
    return model_state, merged


def _cut_opt(full_opt_state: dict, names) -> dict:
    names = set(names)
    groups = []
    for g in full_opt_state["param_groups"]:
        g = dict(g)
        g["params"] = [n for n in g["params"] if n in names]
        groups.append(g)
    state = {n: dict(v) for n, v in full_opt_state["state"].items() if n in names}
    return {"step": full_opt_state.get("step", 0), "state": state, "param_groups": groups}


__all__ = ["check_counts", "partition_balanced", "parse_counts", "stage_optimizer_state", "merge_optimizer_states",
           "gather_state"]
