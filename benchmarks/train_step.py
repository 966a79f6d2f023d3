"""Training throughput: tokens/s and MFU of one full training step of the small GPT presets.

One step is what ``python -m llm train`` runs (``llm.trainer.Layout.step``, the trainer's one step
for every job and layout, here the one-process layout): forward, the next-token loss, backward,
global-norm clipping, AdamW, through ``nn.amp.MixedPrecision``.
For each preset the step is timed a few times after warm-up steps and the median counts.

MFU (model FLOPs utilisation) = ``flops_per_token * tokens/s`` over the float32 matrix-product
rate of this machine, measured in the same run (a square product of the model's MLP width,
``llm.trainer.measure_matmul_flops``), just before and just after the preset's steps; the
faster of the two is the denominator, so a busy neighbour makes the MFU look worse, not better.
``flops_per_token`` is ``6 N + 12 n_layer n_embd T`` (``llm.sizing``, PaLM's estimate).

    .venv/bin/python benchmarks/train_step.py                  # tiny and small, ~1 minute on 2 cores
    .venv/bin/python benchmarks/train_step.py --presets tiny --steps 20
    .venv/bin/python benchmarks/train_step.py --device cuda --precision fp16
    .venv/bin/python benchmarks/train_step.py --recompute      # with activation recomputation
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import nn  # noqa: E402
from autograd import backend  # noqa: E402
from llm.model import GPT, get_preset  # noqa: E402
from llm.sizing import count_parameters, flops_per_token  # noqa: E402
from llm.trainer import Job, Layout  # noqa: E402
from llm.trainer.metrics import matmul_size_for, measure_matmul_flops  # noqa: E402
from parallel import get_world  # noqa: E402

#: the presets of the table: (preset, batch size, vocabulary) (character-level vocabulary, as Shakespeare's 65)
PRESETS = {"tiny": ("tiny", 12, 65), "small": ("small", 8, 65)}


def one_process(model, precision, device="cpu"):
    """``(layout, optimizer, step)``: the trainer's one-process layout of ``model``, an AdamW, and
    ``step(ids, targets)`` -> the trainer's StepResult (one micro-batch, clipping at 1.0)."""
    model.to(device)
    layout = Layout.build(model, get_world(), precision=precision, device=device)
    opt = nn.optim.AdamW(layout.mp.param_groups_for_gpt(0.1), lr=1e-3, betas=(0.9, 0.99))
    job = Job()

    def step(ids, targets):
        return layout.step(job, opt, {"input_ids": ids, "labels": targets}, 1, 1.0)

    return layout, opt, step


def bench(name, steps, warmup, device, precision, seed=0, recompute=False):
    """Median seconds per training step of preset ``name`` and the best matmul rate around it."""
    preset, batch, vocab = PRESETS[name]
    config = get_preset(preset, vocab_size=vocab)
    T = config.block_size
    model = GPT(config, generator=np.random.default_rng(seed))
    model.recompute = recompute
    _, _, step = one_process(model, precision, device)
    rng = np.random.default_rng(seed)

    def batch_of_ids():
        ids = rng.integers(0, vocab, (batch, T + 1))
        return backend.to_device(ids[:, :-1], device), backend.to_device(ids[:, 1:], device)

    n = matmul_size_for(config)
    peak = measure_matmul_flops(device, n)
    for _ in range(warmup):
        step(*batch_of_ids())
    times = []
    for _ in range(steps):
        b = batch_of_ids()
        t0 = time.perf_counter()
        res = step(*b)
        _ = res.loss  # the loss was read with .item(): the step has finished on the device
        times.append(time.perf_counter() - t0)
    peak = max(peak, measure_matmul_flops(device, n))
    return config, batch * T, statistics.median(times), peak


def main(argv=None):
    """Print the table; returns 0."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS),
                    help="presets to time (default: all)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per preset (default 10 tiny, 5 small)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"], help="default fp32")
    ap.add_argument("--recompute", action="store_true", help="activation recomputation (python -m llm train --recompute)")
    args = ap.parse_args(argv)

    print(f"training step (forward + backward + clip + AdamW){' with --recompute' if args.recompute else ''}, "
          f"{args.precision} on {args.device}, NumPy "
          f"{np.__version__}, {os.cpu_count()} CPUs")
    header = ("| preset | params | batch x T | ms/step | tokens/s | model GFLOP/s | matmul GFLOP/s (n) | MFU |\n"
              "|---|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for name in args.presets:
        steps = args.steps or (10 if name == "tiny" else 5)
        config, tokens, dt, peak = bench(name, steps, args.warmup, args.device, args.precision,
                                         recompute=args.recompute)
        tps = tokens / dt
        model_flops = flops_per_token(config, config.block_size) * tps
        preset, batch, vocab = PRESETS[name]
        rows.append(f"| {name} | {count_parameters(config):,} | {batch} x {config.block_size} | {dt * 1e3:.1f} | "
                    f"{tps:,.0f} | {model_flops / 1e9:.1f} | {peak / 1e9:.1f} ({matmul_size_for(config)}) | "
                    f"{100 * model_flops / peak:.1f}% |")
        print(f"  {name}: {rows[-1]}", file=sys.stderr)
    print(header)
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
