"""float16 mixed precision on the CPU: how much slower a training step is than in float32.

NumPy has no fast float16 matrix product (no BLAS kernel: it converts and loops), so
``--precision fp16`` is correct on the CPU but slow; ``nn.amp`` warns with the factor this
script measures (``nn.amp.FP16_ON_NUMPY_SLOWDOWN``). One step is a training step of the
``tiny`` preset as ``python -m llm train`` runs it by default (batch 16 x 64 tokens, a
2048-token vocabulary): forward, loss, ``MixedPrecision.backward``, clipping, AdamW. The two
precisions' steps alternate, so a busy neighbour slows both alike; each figure is a median.

    .venv/bin/python benchmarks/half_precision_cpu.py             # ~1 minute on 2 cores
    .venv/bin/python benchmarks/half_precision_cpu.py --steps 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import nn  # noqa: E402
from llm.model import GPT, get_preset  # noqa: E402


def make_step(precision, config, batch, seed=0):
    """A function running one training step in ``precision`` on fresh random ids; returns its seconds."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", nn.amp.SlowPrecisionWarning)  # the warning is what this script measures
        model = GPT(config, generator=np.random.default_rng(seed))
        mp = nn.amp.MixedPrecision(model, precision)
    opt = nn.optim.AdamW(mp.param_groups_for_gpt(0.1), lr=1e-3, betas=(0.9, 0.99))
    rng = np.random.default_rng(seed)
    T = config.block_size

    def step():
        ids = rng.integers(0, config.vocab_size, (batch, T + 1))
        t0 = time.perf_counter()
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # float16 overflows skip the step
            _, loss = model(ids[:, :-1], ids[:, 1:])
            loss.item()
            mp.backward(loss)
            mp.step(opt, 1.0)
        return time.perf_counter() - t0

    return step


def main(argv=None):
    """Print the two step times and their ratio; returns 0."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per precision (default 4)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per precision first (default 1)")
    ap.add_argument("--batch-size", type=int, default=16, help="sequences per step (default 16, the train default)")
    args = ap.parse_args(argv)

    config = get_preset("tiny", vocab_size=2048)
    steps = {p: make_step(p, config, args.batch_size) for p in ("fp32", "fp16")}
    times = {p: [] for p in steps}
    for i in range(args.warmup + args.steps):
        for p, step in steps.items():  # alternate: a busy neighbour slows both alike
            dt = step()
            if i >= args.warmup:
                times[p].append(dt)
    med = {p: statistics.median(t) for p, t in times.items()}
    tokens = args.batch_size * config.block_size
    print(f"tiny preset, batch {args.batch_size} x {config.block_size}, NumPy {np.__version__}, {os.cpu_count()} CPUs")
    print("| precision | ms/step | tokens/s |\n|---|---:|---:|")
    for p in steps:
        print(f"| {p} | {med[p] * 1e3:.1f} | {tokens / med[p]:,.0f} |")
    print(f"fp16 / fp32 step time: {med['fp16'] / med['fp32']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
