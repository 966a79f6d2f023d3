"""Plots of ``--grad-stats``: a layer-by-step heat map of one run, per-layer profiles of several runs side by side.

    python -m llm gradients runs/a runs/b            # a summary table; heat maps and profiles as PNG
    python -m llm gradients runs/a --stat act_rms --out plots/

The data are the ``"grad_stats"`` objects of a run's ``metrics.jsonl`` (see
``llm.trainer.grad_stats``): ``layer_table`` turns them into a (layers x
logged steps) array, ``plot_heatmap`` draws it with a logarithmic colour
scale, ``plot_profiles`` draws one statistic against the block index for
several runs (one panel per group of runs).

matplotlib is optional (``pip install -e ".[report]"`` or ``pip install
matplotlib``) and imported only when a plot is drawn; without it the command
still prints its table and says how to get the plots.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

PROG = "python -m llm gradients"
STATS = ("grad_norm", "update_ratio", "act_rms")
STAT_LABELS = {"grad_norm": "gradient norm", "update_ratio": "update-to-weight ratio",
               "act_rms": "activation RMS (block output)"}


class PlotError(RuntimeError):
    """A plot cannot be drawn (matplotlib missing, no statistics in a run); the message says what to do."""


def require_matplotlib():
    """``matplotlib.pyplot`` on the non-interactive Agg backend, or a PlotError saying how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise PlotError('matplotlib is not installed, so no plot can be drawn: pip install -e ".[report]" '
                        "(or pip install matplotlib), then run this again") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ---------------------------------------------------------------------------
# the data
# ---------------------------------------------------------------------------


def stats_records(records: list) -> list:
    """The metrics records that carry ``grad_stats``, in order."""
    return [r for r in records if isinstance(r.get("grad_stats"), dict)]


def layer_table(records: list, stat: str = "grad_norm", blocks_only: bool = False):
    """``(steps, layers, table)``: the logged steps with statistics, the layer names in the model's order, and a
    float array (len(layers), len(steps)) of ``stat`` (NaN where a layer has none, e.g. the head's act_rms)."""
    if stat not in STATS:
        raise ValueError(f"unknown statistic {stat!r}; choose one of {', '.join(STATS)}")
    rows = stats_records(records)
    layers = []
    for r in rows:
        for name in r["grad_stats"]:
            if name not in layers and (not blocks_only or name.startswith("h.")):
                layers.append(name)
    table = np.full((len(layers), len(rows)), np.nan)
    for j, r in enumerate(rows):
        for i, name in enumerate(layers):
            value = r["grad_stats"].get(name, {}).get(stat)
            if value is not None:
                table[i, j] = value
    return [r["step"] for r in rows], layers, table


def block_profile(stats: dict, stat: str = "grad_norm") -> np.ndarray:
    """``stat`` of each block h.0, h.1, ... of one ``grad_stats`` object (NaN where missing)."""
    blocks = sorted((int(k.split(".")[1]) for k in stats if k.startswith("h.")))
    return np.array([_value(stats.get(f"h.{i}", {}).get(stat)) for i in range(blocks[-1] + 1)] if blocks else [])


def first_to_last_ratio(stats: dict, stat: str = "grad_norm") -> float:
    """The first block's ``stat`` over the last block's: > 1 the gradient grows towards the input, < 1 it fades."""
    profile = block_profile(stats, stat)
    if len(profile) == 0 or not profile[-1] > 0:
        return math.nan
    return float(profile[0] / profile[-1])


def _value(v):
    return np.nan if v is None else float(v)


# ---------------------------------------------------------------------------
# the plots
# ---------------------------------------------------------------------------


def plot_heatmap(records: list, path, stat: str = "grad_norm", title: str | None = None,
                 log_range: tuple | None = None) -> Path:
    """A heat map of ``stat`` by layer (rows, the input at the bottom) and logged step (columns), log10 colours.

    ``log_range``: ``(low, high)`` of the colour scale in log10 units, to draw several runs on one scale
    (default: this run's own range)."""
    plt = require_matplotlib()
    steps, layers, table = layer_table(records, stat)
    if not steps:
        raise PlotError("no metrics line has grad_stats: train with --grad-stats")
    with np.errstate(divide="ignore", invalid="ignore"):
        shown = np.log10(table)
    shown[~np.isfinite(shown)] = np.nan
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    low, high = log_range if log_range is not None else (None, None)
    image = ax.imshow(shown, aspect="auto", origin="lower", interpolation="nearest", cmap="viridis", vmin=low,
                      vmax=high)
    fig.colorbar(image, ax=ax, label=f"log10 {STAT_LABELS[stat]}")
    xt = _ticks(len(steps), 8)
    ax.set_xticks(xt, [str(steps[i]) for i in xt])
    yt = _ticks(len(layers), 12)
    ax.set_yticks(yt, [layers[i] for i in yt])
    ax.set_xlabel("step")
    ax.set_ylabel("layer (input at the bottom)")
    ax.set_title(title or f"{STAT_LABELS[stat]} by layer")
    return _save(fig, plt, path)


def plot_profiles(panels: dict, path, stat: str = "grad_norm", title: str | None = None) -> Path:
    """Per-block profiles side by side: ``panels`` maps a panel title to ``{run label: grad_stats object}``; each
    run is one line of ``stat`` against the block index, on a log scale."""
    plt = require_matplotlib()
    if not panels:
        raise PlotError("no runs to draw")
    n = len(panels)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, (name, runs) in zip(axes.flat, panels.items()):
        for label, stats in runs.items():
            profile = block_profile(stats, stat)
            if len(profile):
                ax.plot(np.arange(len(profile)), profile, marker="." if len(profile) < 30 else None, label=label)
        ax.set_yscale("log")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("block")
        ax.set_ylabel(STAT_LABELS[stat])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    return _save(fig, plt, path)


def log_range_of(runs: list, stat: str = "grad_norm") -> tuple:
    """``(low, high)``: whole powers of ten around every finite positive ``stat`` of the runs (lists of records),
    for one colour scale across heat maps."""
    values = np.concatenate([layer_table(r, stat)[2].ravel() for r in runs] + [np.empty(0)])
    values = values[np.isfinite(values) & (values > 0)]
    if values.size == 0:
        return (-1.0, 1.0)
    return (math.floor(np.log10(values.min())), math.ceil(np.log10(values.max())))


def _ticks(n: int, most: int) -> list:
    """At most ``most`` evenly spread indices of 0 .. n-1, the last included."""
    if n <= most:
        return list(range(n))
    return sorted({round(i * (n - 1) / (most - 1)) for i in range(most)})


def _save(fig, plt, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------


def summary_table(runs: dict, stat: str = "grad_norm") -> str:
    """A Markdown table: for each run, ``stat`` of the first and last block, and their ratio, at the first and
    the last logged step."""
    lines = [f"| run | steps | first/last block {stat}, first step | same, last step |", "|---|---|---|---|"]
    for label, records in runs.items():
        rows = stats_records(records)
        first, last = rows[0], rows[-1]
        lines.append(f"| {label} | {first['step']}..{last['step']} | "
                     f"{_ratio_text(first['grad_stats'], stat)} | {_ratio_text(last['grad_stats'], stat)} |")
    return "\n".join(lines)


def _ratio_text(stats, stat):
    profile = block_profile(stats, stat)
    if len(profile) == 0:
        return "n/a"
    return f"{profile[0]:.3g} / {profile[-1]:.3g} = {first_to_last_ratio(stats, stat):.3g}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description="Summarise and plot the per-layer statistics that training with --grad-stats wrote "
                               "to metrics.jsonl: a heat map of each run (layer x step) and the per-block profile "
                               "of every run at its first and last logged step, side by side.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (holding metrics.jsonl) or metrics files")
    p.add_argument("--stat", choices=STATS, default="grad_norm", help="the statistic to draw (default grad_norm)")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="folder for the PNG files (default: the first run's folder)")
    return p


def _metrics_path(run: str) -> Path:
    path = Path(run)
    return path / "metrics.jsonl" if path.is_dir() else path


def main(argv=None) -> int:
    """``python -m llm gradients``: 0 done (without matplotlib: the table and a note), 2 bad input (a missing run,
    a run without statistics)."""
    from .trainer.metrics import read_metrics

    args = build_parser().parse_args(argv)
    runs = {}
    for run in args.runs:
        path = _metrics_path(run)
        if not path.is_file():
            print(f"{PROG}: error: {path} does not exist (pass a run folder of `python -m llm train --grad-stats`)",
                  file=sys.stderr)
            return 2
        records = read_metrics(path)
        if not stats_records(records):
            print(f"{PROG}: error: {path} has no grad_stats: train with --grad-stats", file=sys.stderr)
            return 2
        runs[str(run).rstrip("/")] = records
    print(summary_table(runs, args.stat))
    out = Path(args.out) if args.out else _metrics_path(args.runs[0]).parent
    try:
        scale = log_range_of(list(runs.values()), args.stat)  # one colour scale: the maps compare
        for label, records in runs.items():
            name = Path(label).name if Path(label).is_dir() else Path(label).parent.name
            drawn = plot_heatmap(records, out / f"{name}-{args.stat}-heatmap.png", args.stat, title=f"{name}: "
                                 f"{STAT_LABELS[args.stat]} by layer", log_range=scale)
            print(f"wrote {drawn}")
        panels = {f"{which} logged step": {label: (stats_records(r)[0] if which == "first" else stats_records(r)[-1])
                                           ["grad_stats"] for label, r in runs.items()} for which in ("first", "last")}
        print(f"wrote {plot_profiles(panels, out / f'profiles-{args.stat}.png', args.stat)}")
    except PlotError as e:  # no matplotlib: the table above is the result
        print(f"{PROG}: {e}", file=sys.stderr)
    return 0


__all__ = ["layer_table", "block_profile", "first_to_last_ratio", "stats_records", "plot_heatmap", "plot_profiles",
           "log_range_of",
           "summary_table", "require_matplotlib", "PlotError", "main", "STATS"]
