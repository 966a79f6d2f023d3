"""LoRA against full fine-tuning: trainable parameters, optimizer state, peak step memory and step time, one run.

Each mode runs in its own subprocess (so one's freed memory cannot hide the other's peak): the
trainer's one-process step (``llm.trainer.Layout.step``, as ``python -m llm sft`` runs it) on the
``small`` preset (6 layers, 384 wide, block 256) with a batch of 8, the resident set after building
the model and the optimizer (before any step), and the high-water mark over the steps; their
difference is the steps' memory: activations, gradients, AdamW's moments (created at the first
step), temporaries. LoRA adapts c_attn and c_proj (attention's and the MLP's) with rank 8 and
freezes everything else, so the frozen weights get no gradient, no master copy and no moments.
Before timing, the LoRA model's output at the start is checked to be the base model's.

    .venv/bin/python benchmarks/lora_memory.py                        # small, ~1 minute on 2 cores
    .venv/bin/python benchmarks/lora_memory.py --preset tiny --rank 4
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

from autograd import backend, no_grad  # noqa: E402
from llm.model import GPT, get_preset  # noqa: E402
from nn import apply_lora  # noqa: E402

TARGETS = ("c_attn", "c_proj")


def build(preset, mode, rank):
    """The model of ``mode`` ("full" or "lora")."""
    config = get_preset(preset, vocab_size=2048)
    model = GPT(config, generator=np.random.default_rng(0))
    if mode == "lora":
        apply_lora(model, TARGETS, rank=rank, alpha=2 * rank, generator=np.random.default_rng(1))
    return model


def batch_for(config, batch, step):
    ids = np.random.default_rng(step).integers(0, config.vocab_size, (batch, config.block_size + 1))
    return ids[:, :-1], ids[:, 1:]


def worker(preset, mode, rank, batch, steps):
    """In a subprocess: trainable parameters, AdamW state, base and peak resident set, median step time."""
    backend.keep_freed_memory()  # as the training commands do
    model = build(preset, mode, rank)
    _, opt, step = one_process(model, "fp32")
    base = _rss_mb()
    times = []
    for k in range(steps):
        t0 = time.perf_counter()
        step(*batch_for(model.config, batch, k + 1))
        times.append(time.perf_counter() - t0)
    state = sum(v.nbytes for entry in opt.state_dict()["state"].values() for v in entry.values()
                if hasattr(v, "nbytes"))
    print(json.dumps({"trainable": model.num_parameters(trainable_only=True), "total": model.num_parameters(),
                      "adam_mb": state / 2**20, "base_mb": base, "peak_mb": _maxrss_mb(),
                      "step_s": statistics.median(times)}))


def lora_starts_as_the_base(preset, rank) -> bool:
    """Whether the LoRA model's logits at the start are the base model's, bit for bit."""
    x, _ = batch_for(get_preset(preset, vocab_size=2048), 2, 0)
    with no_grad():
        return bool(np.array_equal(build(preset, "full", rank)(x)[0].data, build(preset, "lora", rank)(x)[0].data))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--worker", choices=["full", "lora"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.preset, args.worker, args.rank, args.batch, args.steps)
        return 0
    print(f"{args.preset}, batch {args.batch}, LoRA rank {args.rank} on {', '.join(TARGETS)}: output at the start "
          f"{'equals' if lora_starts_as_the_base(args.preset, args.rank) else 'DIFFERS FROM'} the base model's")
    rows = {}
    for mode in ("full", "lora"):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", mode, "--preset", args.preset, "--rank",
               str(args.rank), "--batch", str(args.batch), "--steps", str(args.steps)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows[mode] = json.loads(out.strip().splitlines()[-1])
    print("| mode | trainable parameters | AdamW state (MB) | step memory (MB) | peak RSS (MB) | s/step |")
    print("|---|---:|---:|---:|---:|---:|")
    for mode, r in rows.items():
        print(f"| {mode} | {r['trainable']:,} of {r['total']:,} | {r['adam_mb']:.1f} | {r['peak_mb'] - r['base_mb']:.1f} "
              f"| {r['peak_mb']:.1f} | {r['step_s']:.3f} |")
    f, lo = rows["full"], rows["lora"]
    print(f"lora / full: trainable {lo['trainable'] / f['trainable']:.4f}x, step memory "
          f"{(lo['peak_mb'] - lo['base_mb']) / (f['peak_mb'] - f['base_mb']):.2f}x, peak RSS "
          f"{lo['peak_mb'] / f['peak_mb']:.2f}x, time {lo['step_s'] / f['step_s']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
