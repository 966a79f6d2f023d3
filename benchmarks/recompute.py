"""Activation recomputation (``--recompute``): peak step memory and step time, with and without, in one run.

Each configuration runs in its own subprocess (so one's freed memory cannot hide the other's peak):
the trainer's one-process step (``llm.trainer.Layout.step``, as ``python -m llm train`` runs it) on
the ``small`` preset (6 layers, 384 wide, block 256) with a batch of 8, the resident set after
building the model and optimizer (before any step), and the high-water mark over the steps; their
difference is the steps' memory (activations, gradients, AdamW's moments, temporaries). The
gradients of the two are checked equal (float rounding) on one batch first.

    .venv/bin/python benchmarks/recompute.py                  # small, ~1 minute on 2 cores
    .venv/bin/python benchmarks/recompute.py --preset tiny --batch 16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from train_step import one_process  # noqa: E402  (benchmarks/train_step.py; puts the project on sys.path)
from vs_pytorch import _maxrss_mb, _rss_mb  # noqa: E402

from autograd import backend  # noqa: E402
from llm.model import GPT, get_preset  # noqa: E402


def batch_for(config, batch, step):
    ids = np.random.default_rng(step).integers(0, config.vocab_size, (batch, config.block_size + 1))
    return ids[:, :-1], ids[:, 1:]


def worker(preset, batch, steps, recompute):
    """In a subprocess: base and peak resident set, and the median step time."""
    backend.keep_freed_memory()  # as `python -m llm train` does
    config = get_preset(preset, vocab_size=2048)
    model = GPT(config, generator=np.random.default_rng(0))
    model.recompute = recompute
    _, _, step = one_process(model, "fp32")
    base = _rss_mb()  # the model and its gradients' future owners; AdamW's moments come with the first step
    times = []
    for k in range(steps):
        t0 = time.perf_counter()
        step(*batch_for(config, batch, k + 1))
        times.append(time.perf_counter() - t0)
    print(json.dumps({"base_mb": base, "peak_mb": _maxrss_mb(), "step_s": statistics.median(times)}))


def gradients_agree(preset, batch):
    """The largest relative difference between the plain and the recomputed gradients on one batch."""
    config = get_preset(preset, vocab_size=2048)
    x, y = batch_for(config, batch, 0)
    grads = []
    for recompute in (False, True):
        model = GPT(config, generator=np.random.default_rng(0))
        model.recompute = recompute
        _, loss = model(x, targets=y)
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    return max(float(np.abs(grads[1][n] - g).max() / (np.abs(g).max() or 1.0)) for n, g in grads[0].items())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--worker", choices=["plain", "recompute"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.preset, args.batch, args.steps, args.worker == "recompute")
        return 0
    print(f"{args.preset}, batch {args.batch}: gradients with and without recomputation differ by at most "
          f"{gradients_agree(args.preset, args.batch):.1e} (relative)")
    rows = {}
    for mode in ("plain", "recompute"):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", mode, "--preset", args.preset, "--batch",
               str(args.batch), "--steps", str(args.steps)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows[mode] = json.loads(out.strip().splitlines()[-1])
    print("| mode | step memory (MB) | peak RSS (MB) | s/step |\n|---|---:|---:|---:|")
    for mode, r in rows.items():
        print(f"| {mode} | {r['peak_mb'] - r['base_mb']:.1f} | {r['peak_mb']:.1f} | {r['step_s']:.3f} |")
    p, r = rows["plain"], rows["recompute"]
    print(f"recompute / plain: step memory {(r['peak_mb'] - r['base_mb']) / (p['peak_mb'] - p['base_mb']):.2f}x, "
          f"time {r['step_s'] / p['step_s']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
