"""``python -m llm report RUN_DIR...``: a Markdown report card of training runs and their evaluations.

A run folder is what ``python -m llm train --out-dir`` leaves: ``metrics.jsonl``
(one JSON object per logged step: ``loss``, and ``val_loss`` at evaluation
steps) and ``ckpt.safetensors``, plus the ``eval-*.json`` files ``python -m llm
eval`` writes beside the checkpoint. Any folder below it that has its own
``metrics.jsonl`` (a later fine-tuning stage) is reported as a stage of the run.

For each run the card gives the model (from the checkpoint's header: no tensor
is read), the training summary (steps, tokens, first and last loss, the
validation losses), the loss curves drawn as a PNG when matplotlib can be
imported (``pip install -e ".[report]"``; without it the card says so), and
each evaluation's table with the chance level of each score.

The card is written to ``RUN_DIR/report.md`` (the first run folder's, or
``--out``) and printed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from ..atomic import write_text_atomic
from ..plots import PlotError, require_matplotlib
from .cli import markdown_table

PROG = "python -m llm report"
PLOT_HINT = ('Plots: matplotlib is not installed, so the curves are not drawn; `pip install -e ".[report]"` '
             "(or `pip install matplotlib`) and run the report again.")


class ReportError(Exception):
    """A run folder cannot be reported (missing, or nothing in it to report); the message says why."""


def read_metrics(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` file; a bad line is skipped with a warning (a crash can cut the last)."""
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                print(f"{PROG}: warning: {path}, line {n} is not JSON; skipped", file=sys.stderr)
                continue
            if isinstance(rec, dict):
                records.append(rec)
    return records


def checkpoint_summary(path: Path) -> dict | None:
    """The model config and step stored in a checkpoint's header (None if there is no readable checkpoint)."""
    from .. import safetensors as st

    if not path.is_file():
        return None
    try:
        raw_meta, _ = st.read_header(path)
    except (st.SafetensorsError, OSError):
        return None
    out = {}
    for key in ("config", "step"):
        if key in raw_meta:
            try:
                out[key] = json.loads(raw_meta[key])
            except json.JSONDecodeError:
                pass
    return out


def find_evals(folder: Path) -> list[tuple[Path, dict]]:
    """The evaluation results (``python -m llm eval``'s JSON) directly in ``folder`` or its ``eval/``, oldest first."""
    found = []
    for path in sorted([*folder.glob("*.json"), *folder.glob("eval/*.json")]):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(doc, dict) and isinstance(doc.get("results"), dict) and isinstance(doc.get("order"), list):
            found.append((path, doc))
    return sorted(found, key=lambda item: (str(item[1].get("created", "")), str(item[0])))


def find_stages(run: Path) -> list[Path]:
    """The run folder and every folder below it holding a ``metrics.jsonl`` or evaluations (later stages)."""
    stages = [run]
    for path in sorted(run.rglob("metrics.jsonl")):
        if path.parent != run:
            stages.append(path.parent)
    return stages


def plot_curves(records: list[dict], out_png: Path, title: str) -> bool:
    """Draw training loss and validation loss against step into ``out_png``; False if matplotlib is missing."""
    try:
        plt = require_matplotlib()
    except PlotError:
        return False
    train = [(r["step"], r["loss"]) for r in records if "step" in r and _finite(r.get("loss"))]
    val = [(r["step"], r["val_loss"]) for r in records if "step" in r and _finite(r.get("val_loss"))]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="training loss", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    plt.close(fig)
    return True


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _model_lines(ckpt: dict | None) -> list[str]:
    if not ckpt or not isinstance(ckpt.get("config"), dict):
        return ["No checkpoint (`ckpt.safetensors`) with a model config in this folder."]
    c = ckpt["config"]
    keys = ["n_layer", "n_head", "n_embd", "block_size", "vocab_size", "mlp", "norm", "pos"]
    parts = [f"{k} {c[k]}" for k in keys if k in c]
    step = f"; checkpoint at step {ckpt['step']}" if "step" in ckpt else ""
    return [f"Model: {', '.join(parts)}{step}."]


def _training_lines(records: list[dict]) -> list[str]:
    steps = [r for r in records if "step" in r and _finite(r.get("loss"))]
    if not steps:
        return ["No training steps logged."]
    first, last = steps[0], steps[-1]
    lines = [f"Training: {last['step']} steps"
             + (f", {last['tokens']:,} tokens" if isinstance(last.get("tokens"), int) else "")
             + f"; loss {first['loss']:.4f} at step {first['step']} -> {last['loss']:.4f} at step {last['step']}."]
    vals = [r for r in records if _finite(r.get("val_loss"))]
    if vals:
        lines += ["", "| step | validation loss | perplexity |", "|---:|---:|---:|"]
        lines += [f"| {r['step']} | {r['val_loss']:.4f} | {math.exp(min(r['val_loss'], 700)):.2f} |" for r in vals]
    return lines


def _eval_lines(path: Path, doc: dict, base: Path) -> list[str]:
    settings = doc.get("settings", {})
    bits = [f"{doc.get('created', '?')}", f"{doc.get('elapsed_s', '?')} s"]
    if settings.get("limit") is not None:
        bits.append(f"limit {settings['limit']}")
    try:
        shown = path.relative_to(base)
    except ValueError:
        shown = path
    lines = [f"### Evaluation `{shown}` ({', '.join(bits)})", "", markdown_table(doc["results"], doc["order"])]
    notes = [f"- {name}: {note}" for name in doc["order"] for note in doc["results"][name].get("notes", [])]
    if notes:
        lines += ["", "Notes:", *notes]
    return lines


def report_run(run: Path, out_dir: Path, plots: bool = True) -> tuple[list[str], bool]:
    """The Markdown lines of one run (all its stages); PNGs go to ``out_dir``. Returns (lines, any plot missing)."""
    if not run.is_dir():
        raise ReportError(f"{run} is not a folder (give the --out-dir of a training run)")
    lines, missing_plot, anything = [f"## Run `{run}`", ""], False, False
    for stage in find_stages(run):
        if stage != run:
            lines += [f"### Stage `{stage.relative_to(run)}`", ""]
        lines += _model_lines(checkpoint_summary(stage / "ckpt.safetensors"))
        metrics_path = stage / "metrics.jsonl"
        if metrics_path.is_file():
            anything = True
            records = read_metrics(metrics_path)
            lines += [""] + _training_lines(records)
            if plots:
                name = "_".join(stage.relative_to(run.parent).parts) + "_loss.png"
                png = out_dir / name
                if plot_curves(records, png, str(stage)):
                    try:
                        rel = png.relative_to(out_dir)
                    except ValueError:
                        rel = png
                    lines += ["", f"![training and validation loss of {stage}]({rel.as_posix()})"]
                else:
                    missing_plot = True
        evals = find_evals(stage)
        for path, doc in evals:
            anything = True
            lines += [""] + _eval_lines(path, doc, run)
        lines.append("")
    if not anything:
        raise ReportError(f"{run} holds neither metrics.jsonl nor evaluation results (eval-*.json)")
    return lines, missing_plot


def build_report(runs, out_dir: Path, plots: bool = True) -> str:
    """The whole report card (Markdown) for the run folders ``runs``."""
    lines = ["# Report card", ""]
    missing = False
    for run in runs:
        run_lines, miss = report_run(Path(run), out_dir, plots)
        lines += run_lines
        missing |= miss
    if missing:
        lines += [PLOT_HINT, ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    """Entry point of ``python -m llm report``."""
    p = argparse.ArgumentParser(prog=PROG, description="Collect training runs (metrics.jsonl, the checkpoint) and "
                                "their evaluations (eval-*.json from `python -m llm eval`) into a Markdown report card "
                                "with loss curves (PNG, when matplotlib is installed).")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (the --out-dir of `python -m llm train`)")
    p.add_argument("--out", default=None, help="the Markdown file to write (default: RUN_DIR/report.md of the first)")
    p.add_argument("--no-plots", action="store_true", help="do not draw the curves")
    args = p.parse_args(argv)
    out = Path(args.out) if args.out else Path(args.runs[0]) / "report.md"
    try:
        text = build_report(args.runs, out.parent, plots=not args.no_plots)
    except ReportError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, text + "\n")
    print(text)
    print(f"report: {out}", file=sys.stderr)
    return 0


__all__ = ["ReportError", "read_metrics", "checkpoint_summary", "find_evals", "find_stages", "plot_curves",
           "report_run", "build_report", "main"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
