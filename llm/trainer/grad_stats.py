"""``--grad-stats``: per-layer gradient norms, update-to-weight ratios and activation RMS, in the metrics file.

On the steps it is armed for (the first step of a fresh run, whose gradients
are those of the initial weights, and every step that writes a metrics line:
each ``--log-interval``, evaluation and the last step), the trainer adds a
``"grad_stats"`` object to that step's line::

    "grad_stats": {
      "embed": {"grad_norm": 0.41, "update_ratio": 0.0021, "act_rms": 0.028,
                "groups": {"wte": {"grad_norm": 0.40, "update_ratio": 0.0020}, "wpe": {...}}},
      "h.0":   {"grad_norm": ..., "update_ratio": ..., "act_rms": ...,
                "groups": {"ln_1": {...}, "attn": {...}, "ln_2": {...}, "mlp": {...}}},
      ...
      "head":  {"grad_norm": ..., "update_ratio": ..., "groups": {"ln_f": {...}}}
    }

Layers are the model's parts in order: ``embed`` (``wte``, ``wpe``), each block
``h.i``, ``head`` (``ln_f``, ``lm_head``; a tied head's weight is ``wte``, in
``embed``). A parameter group is one child of a layer (a block's ``ln_1``,
``attn``, ``ln_2``, ``mlp``). For a set S of parameters:

- ``grad_norm`` = sqrt(sum over S of ||g||^2), g the gradient the optimizer
  receives (the mean loss's over the global batch, unscaled, before clipping),
  so the layers' norms combine to the ``grad_norm`` of the line;
- ``update_ratio`` = ||W_after - W_before|| / ||W_before|| over S: how far the
  step moved the weights, relative to their size (whatever the optimizer);
- ``act_rms`` = sqrt(mean of x^2) over every element of the layer's output in
  the step's forward passes (all micro-batches and replicas): the embeddings'
  output for ``embed``, the residual stream after the block for ``h.i``.

Frozen parameters (LoRA's base weights) have no gradient and are left out.
A float16 step skipped by an overflow has activation RMS only.

Cost: nothing when off (no hook is set, the step is the same code). When on,
an armed step copies the trained weights once (to measure the update), reads
every gradient and weight once more and every block output once, in float32;
the other steps cost nothing. ``benchmarks/grad_stats.py`` measures it.

Under ``--dp``/``--pp`` every rank measures its own parameters and rows, and
rank 0 merges them: the sums of squares of the stages (and, with ZeRO, of
each replica's shard) are added; without ZeRO the replicas hold the same
gradients and dp-rank 0's are used; the activations of every replica add up.
The last stage's copy of a tied embedding is counted once.
"""

from __future__ import annotations

import math

import numpy as np

from autograd.backend import get_array_module

#: parameter-name prefixes that make up the embedding layer and the output head of a GPT
EMBED_PARTS = ("wte", "wpe")
HEAD_PARTS = ("ln_f", "lm_head")


def layer_of(name: str) -> str:
    """The layer a parameter (or activation) belongs to: ``"h.3"``, ``"embed"``, ``"head"``, else its first part."""
    parts = name.split(".")
    if parts[0] == "h" and len(parts) > 1:
        return f"h.{parts[1]}"
    if parts[0] in EMBED_PARTS or parts[0] == "embed":
        return "embed"
    if parts[0] in HEAD_PARTS:
        return "head"
    return parts[0]


def group_of(name: str) -> str:
    """The parameter group within its layer: a block's child (``ln_1``, ``attn``, ``ln_2``, ``mlp``), else the first part."""
    parts = name.split(".")
    if parts[0] == "h" and len(parts) > 2:
        return parts[2]
    return parts[0]


def _sum_squares(a) -> float:
    """sum(a ** 2) in float32 or wider (float16 is cast up first), as a Python float."""
    flat = a.ravel()  # (n,)
    if flat.dtype.itemsize < 4:
        flat = flat.astype(np.float32)
    return float(get_array_module(flat).vdot(flat, flat))


def _finite(value):
    return value if math.isfinite(value) else None  # JSON has no NaN or inf


class GradStats:
    """Collects the statistics of one armed step on this rank of ``layout`` (an ``llm.trainer.Layout``).

    Per armed step: ``arm()`` before it (sets the model's activation hook),
    ``observe_grads`` passed to ``Layout.step`` (the gradients and a copy of
    the weights), ``finish()`` after it: a collective call that returns the
    ``"grad_stats"`` object on world rank 0 (None on the others) and removes
    the hook.
    """

    def __init__(self, layout):
        self.layout = layout
        self.armed = False
        self._acts: dict[str, list] = {}
        self._params: list = []  # (name, master, weights before the step, sum of squares of the gradient)

    def arm(self):
        """Start recording: the next step's forward activations and gradients."""
        self.armed = True
        self._acts, self._params = {}, []
        self.layout.model.activation_hook = self._record_activation

    def _record_activation(self, name, x):
        entry = self._acts.setdefault(name, [0.0, 0])
        entry[0] += _sum_squares(x.data)
        entry[1] += int(x.data.size)

    def observe_grads(self, named_masters):
        """``Layout.step``'s hook: the gradient of each trained weight (before clipping) and the weight itself."""
        skip = set(self.layout.duplicate_names)
        self._params = [(name, m, m.data.copy(), _sum_squares(m.grad))
                        for name, m in named_masters if m.grad is not None and name not in skip]

    def finish(self) -> dict | None:
        """The step's statistics, merged over every rank, on world rank 0 (None elsewhere); a collective call."""
        self.layout.model.activation_hook = None
        self.armed = False
        params = {name: (g2, _sum_squares(before), _sum_squares(m.data - before))
                  for name, m, before, g2 in self._params}
        mine = {"dp_rank": self.layout.grid.dp_rank, "params": params, "acts": self._acts}
        self._acts, self._params = {}, []
        comm = self.layout.comm
        every = comm.allgather(mine) if comm.size > 1 else [mine]  # world rank order: stage by stage
        if comm.rank != 0:
            return None
        return merge(every, sharded=self.layout.zero)


def merge(parts: list, sharded: bool) -> dict:
    """The ``"grad_stats"`` object from every rank's sums of squares (``parts``, in world-rank order).

    ``sharded`` (ZeRO): each replica holds a different piece of a parameter, so
    the pieces add up; otherwise the replicas hold the same gradients and
    dp-rank 0's are taken. Activations add up over every rank.
    """
    sums: dict[str, list] = {}  # parameter name -> [grad^2, weight^2, update^2]
    acts: dict[str, list] = {}
    for part in parts:
        if sharded or part["dp_rank"] == 0:
            for name, values in part["params"].items():
                total = sums.setdefault(name, [0.0, 0.0, 0.0])
                for k in range(3):
                    total[k] += values[k]
        for name, (s2, n) in part["acts"].items():
            total = acts.setdefault(name, [0.0, 0])
            total[0] += s2
            total[1] += n

    layers: dict[str, dict] = {}  # in the order parameters and activations first appear: the model's order
    group_sums: dict[str, dict[str, list]] = {}
    for name in list(acts) + list(sums):
        layers.setdefault(layer_of(name), {})
    for name, (g2, w2, d2) in sums.items():
        groups = group_sums.setdefault(layer_of(name), {})
        total = groups.setdefault(group_of(name), [0.0, 0.0, 0.0])
        for k, v in enumerate((g2, w2, d2)):
            total[k] += v
    out = {}
    for layer in layers:
        entry = {}
        groups = group_sums.get(layer)
        if groups:
            g2, w2, d2 = (sum(v[k] for v in groups.values()) for k in range(3))
            entry.update(_norms(g2, w2, d2))
        if layer in acts:
            s2, n = acts[layer]
            entry["act_rms"] = _finite(math.sqrt(s2 / n)) if n else None
        if groups:
            entry["groups"] = {g: _norms(*v) for g, v in groups.items()}
        out[layer] = entry
    return out


def _norms(g2: float, w2: float, d2: float) -> dict:
    return {"grad_norm": _finite(math.sqrt(g2)) if g2 >= 0 else None,
            "update_ratio": _finite(math.sqrt(d2) / math.sqrt(w2)) if w2 > 0 else None}


def wants_stats(next_step: int, cfg) -> bool:
    """Whether step number ``next_step`` (1-based) is armed: the first one, and every one that writes a metrics
    line known in advance (each --log-interval, evaluation, and --max-steps)."""
    return (next_step == 1 or next_step % cfg.log_interval == 0 or next_step % cfg.eval_interval == 0
            or next_step == cfg.max_steps)


__all__ = ["GradStats", "merge", "layer_of", "group_of", "wants_stats", "EMBED_PARTS", "HEAD_PARTS"]
