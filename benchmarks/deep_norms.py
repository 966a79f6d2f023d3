"""The deep-network experiment of issue 16: does the norm's place decide whether a deep narrow GPT trains?

Narrow models (64 wide, 4 heads) of 12, 48 and 120 blocks, each with post-LN (the original Transformer:
a LayerNorm after every residual add), pre-LN (GPT-2: at each sub-layer's input), pre-RMSNorm (Llama)
and no norm at all, are trained briefly on the default corpus (Shakespeare, the 2048-token BPE of
``python -m llm train``) with the same learning rate, warm-up, batches and seed, through
``python -m llm train --grad-stats`` itself. For each run the script prints the ratio of the first
block's gradient norm to the last block's at initialisation (the first step's gradients) and after
training (the last step's), the training loss reached (the mean of the last logged losses) and the
validation loss, and it saves the plots: the per-block gradient-norm profiles of all runs side by side
(one panel per depth, at initialisation and after training) and a layer-by-step heat map of each run.

    .venv/bin/python benchmarks/deep_norms.py                    # the experiment (~25 min on 2 idle cores)
    .venv/bin/python benchmarks/deep_norms.py --quick            # the same on 2 and 6 blocks, a minute
    .venv/bin/python benchmarks/deep_norms.py --plots docs/images/deep_norms   # PNGs for the guide

Everything lands in ``--out`` (default ``runs/deep_norms``): one run folder per model (its metrics,
checkpoint and log), ``results.json``, ``results.md`` (the table) and the PNGs (also written to
``--plots`` when given). A run that diverges (NaN loss: exit 1) is reported as such, with the step.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llm import plots  # noqa: E402
from llm import train as train_mod  # noqa: E402
from llm.trainer import read_metrics  # noqa: E402

#: the placements compared: label -> model flags
PLACEMENTS = {
    "post-LN": ["--norm-placement", "post", "--norm", "layernorm"],
    "pre-LN": ["--norm-placement", "pre", "--norm", "layernorm"],
    "pre-RMSNorm": ["--norm-placement", "pre", "--norm", "rmsnorm"],
    "none": ["--norm-placement", "none"],
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depths", type=int, nargs="+", default=[12, 48, 120], help="numbers of blocks")
    p.add_argument("--placements", nargs="+", default=list(PLACEMENTS), choices=list(PLACEMENTS))
    p.add_argument("--width", type=int, default=64, help="n_embd (default 64)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per run (default 200)")
    p.add_argument("--lr", type=float, default=2e-3,
                   help="peak learning rate, the same for every run (default 2e-3, python -m llm train's)")
    p.add_argument("--warmup", type=int, default=40, help="warm-up steps, the same for every run (default 40)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--log-interval", type=int, default=10, help="a statistics line every N steps")
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--out", default="runs/deep_norms", help="folder for the runs, the table and the plots")
    p.add_argument("--plots", default=None, metavar="DIR",
                   help="also write the profiles and the deepest models' heat maps here (e.g. docs/images/...)")
    p.add_argument("--quick", action="store_true", help="2 and 6 blocks, 20 steps: see it work in a minute")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each run's checkpoint (deleted by default)")
    p.add_argument("--replot", action="store_true",
                   help="train nothing: redo the table and the plots from the runs already in --out")
    args = p.parse_args(argv)
    if args.quick:
        args.depths, args.steps, args.warmup, args.log_interval, args.eval_batches = [2, 6], 20, 5, 5, 2
    return args


def run_one(args, depth: int, placement: str, out: Path) -> tuple[dict, list]:
    """Train one model with ``python -m llm train --grad-stats`` (in this process): its row of the table and its
    metrics records."""
    flags = ["--n-layer", str(depth), "--n-embd", str(args.width), "--n-head", str(args.heads),
             "--block-size", str(args.block_size), *PLACEMENTS[placement],
             "--batch-size", str(args.batch_size), "--max-steps", str(args.steps), "--lr", str(args.lr),
             "--warmup-steps", str(args.warmup), "--log-interval", str(args.log_interval),
             "--eval-interval", str(args.steps), "--eval-batches", str(args.eval_batches), "--seed", str(args.seed),
             "--sample-tokens", "0", "--ckpt-interval", "0", "--grad-stats", "--no-progress", "--overwrite",
             "--out-dir", str(out)]
    out.mkdir(parents=True, exist_ok=True)
    log = io.StringIO()
    t0, c0 = time.perf_counter(), time.process_time()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        rc = train_mod.main(flags)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    (out / "train.log").write_text(log.getvalue(), encoding="utf-8")
    if not args.keep_checkpoints and (out / "ckpt.safetensors").exists():
        (out / "ckpt.safetensors").unlink()  # 70 MB for 120 blocks; the metrics are what the experiment reads
    records = read_metrics(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else []
    stats = plots.stats_records(records)
    losses = [r["loss"] for r in records if isinstance(r.get("loss"), float)]
    val = [r["val_loss"] for r in records if isinstance(r.get("val_loss"), float)]
    row = {"depth": depth, "placement": placement, "exit": rc, "seconds": seconds, "cpu_seconds": cpu_seconds,
           "steps": records[-1]["step"] if records else 0,
           "ratio_init": plots.first_to_last_ratio(stats[0]["grad_stats"]) if stats else math.nan,
           "ratio_trained": plots.first_to_last_ratio(stats[-1]["grad_stats"]) if len(stats) > 1 else math.nan,
           "ratio1_init": second_to_last(stats[0]["grad_stats"]) if stats else math.nan,
           "ratio1_trained": second_to_last(stats[-1]["grad_stats"]) if len(stats) > 1 else math.nan,
           "train_loss": sum(losses[-3:]) / len(losses[-3:]) if losses else math.nan,
           "val_loss": val[-1] if val else math.nan}
    if rc == 1:  # diverged: the trainer names the step in its message
        row["note"] = next((line.strip() for line in log.getvalue().splitlines() if "error" in line), "diverged")
        row["train_loss"] = row["val_loss"] = math.nan
    elif rc != 0:
        raise SystemExit(f"run {out} failed (exit {rc}):\n{log.getvalue()[-3000:]}")
    return row, records


def second_to_last(stats) -> float:
    """Block 1's gradient norm over the last block's: the depth effect without block 0, whose input is the raw
    embedding (0.02-sized at initialisation) rather than the residual stream of a block."""
    profile = plots.block_profile(stats)
    return float(profile[1] / profile[-1]) if len(profile) > 1 and profile[-1] > 0 else math.nan


def fmt(x, spec, missing="n/a"):
    return missing if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def table(rows) -> str:
    lines = ["| blocks | norms | h.0 / last grad norm, init | after training | h.1 / last, init | after training | "
             "train loss | val loss | minutes (CPU) |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        gone = "diverged" if r["exit"] == 1 else "n/a"
        lines.append(f"| {r['depth']} | {r['placement']} | {fmt(r['ratio_init'], '.3g')} | "
                     f"{fmt(r['ratio_trained'], '.3g')} | {fmt(r['ratio1_init'], '.3g')} | "
                     f"{fmt(r['ratio1_trained'], '.3g')} | {fmt(r['train_loss'], '.3f', gone)} | "
                     f"{fmt(r['val_loss'], '.3f', gone)} "
                     f"| {r['seconds'] / 60:.1f} ({r.get('cpu_seconds', 0.0) / 60:.1f}) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    places = [out] + ([Path(args.plots)] if args.plots else [])
    rows, runs = [], {}
    t0 = time.perf_counter()
    if args.replot:  # the runs, settings and times of the experiment already in --out
        saved = json.loads((out / "results.json").read_text(encoding="utf-8"))
        rows = saved["rows"]
        runs = {(r["depth"], r["placement"]): read_metrics(out / f"L{r['depth']}-{r['placement']}" / "metrics.jsonl")
                for r in rows}
        args = argparse.Namespace(**{**saved["settings"], "plots": args.plots, "out": args.out, "replot": True})
    for depth in [] if args.replot else args.depths:
        for placement in args.placements:
            row, records = run_one(args, depth, placement, out / f"L{depth}-{placement}")
            rows.append(row)
            runs[(depth, placement)] = records
            print(f"{depth:4d} blocks {placement:12s} ratio at init {fmt(row['ratio_init'], '9.3g')}, after "
                  f"{row['steps']} steps {fmt(row['ratio_trained'], '9.3g')}; train loss "
                  f"{fmt(row['train_loss'], '.3f', 'diverged')}, val {fmt(row['val_loss'], '.3f', 'diverged')} "
                  f"({row['seconds']:.0f} s)"
                  + (f"  [{row['note']}]" if "note" in row else ""), flush=True)
    total = saved["minutes"] * 60 if args.replot else time.perf_counter() - t0
    cpu_total = sum(r.get("cpu_seconds", 0.0) for r in rows)
    text = table(rows)
    settings = (f"width {args.width}, {args.heads} heads, context {args.block_size}, batch {args.batch_size}, "
                f"{args.steps} steps, lr {args.lr:g}, warm-up {args.warmup}, AdamW, clipping 1.0, seed {args.seed}")
    took = f"{total / 60:.1f} minutes in all ({cpu_total / 60:.1f} CPU-minutes)"
    print(f"\n{settings}; {took}\n\n{text}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(f"{settings}; {took}\n\n{text}\n", encoding="utf-8")
    (out / "results.json").write_text(json.dumps({"settings": vars(args), "minutes": total / 60, "rows": rows},
                                                 indent=1, default=str) + "\n", encoding="utf-8")
    try:
        for when, pick in (("init", 0), ("trained", -1)):
            panels = {f"{d} blocks, {'initialisation' if pick == 0 else 'after training'}":
                      {p: plots.stats_records(runs[(d, p)])[pick]["grad_stats"] for p in args.placements
                       if plots.stats_records(runs[(d, p)])} for d in args.depths}
            for place in places:
                plots.plot_profiles(panels, place / f"profiles-{when}.png")
        scales = {d: plots.log_range_of([r for (depth, _), r in runs.items() if depth == d]) for d in args.depths}
        for (depth, placement), records in runs.items():
            if plots.stats_records(records):
                for place in places if depth == max(args.depths) else places[:1]:  # --plots: the deepest only
                    plots.plot_heatmap(records, place / f"heatmap-L{depth}-{placement}.png",
                                       title=f"{depth} blocks, {placement}: gradient norm by layer",
                                       log_range=scales[depth])  # one scale per depth: the maps compare
        print(f"plots in {', '.join(str(p) for p in places)}")
    except plots.PlotError as e:
        print(f"no plots: {e}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
