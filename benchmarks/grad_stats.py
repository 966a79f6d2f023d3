"""What ``--grad-stats`` costs: the trainer's step with the statistics taken against the plain step, in one run.

For each model the one-process step (``llm.trainer.Layout.step``, as ``python -m llm train`` runs it) is
timed plain and as an armed ``--grad-stats`` step (``GradStats.arm``, the step with ``observe_grads``,
``GradStats.finish``), alternating, on the same batches; the median of each counts. An armed step
copies the trained weights once and reads every gradient, weight and block output once more. Only
the first step and the steps that write a metrics line are armed, so over a run the cost is the armed
step's extra time divided by ``--log-interval``; the table gives it for the default interval (10).
Both clocks are shown: on a machine other processes share, the process's CPU time is the steadier.
Off, the trainer sets no hook: the plain step is what runs.

    .venv/bin/python benchmarks/grad_stats.py               # tiny, and a narrow deep model, ~1 minute
    .venv/bin/python benchmarks/grad_stats.py --steps 20
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from train_step import one_process  # noqa: E402  (benchmarks/train_step.py; puts the project on sys.path)

from llm.model import GPT, get_preset  # noqa: E402
from llm.trainer.grad_stats import GradStats  # noqa: E402

#: name -> (GPTConfig overrides over "tiny", batch size): the default training model and the experiment's deepest
MODELS = {"tiny (4 x 128, T 64)": (dict(vocab_size=2048), 16),
          "deep narrow (48 x 64, T 32)": (dict(vocab_size=2048, n_layer=48, n_embd=64, block_size=32), 8)}


def bench(overrides, batch, steps):
    """``[(plain, armed) median wall seconds, (plain, armed) median CPU seconds]`` of one model's step."""
    config = get_preset("tiny", **overrides)
    layout, opt, _ = one_process(GPT(config, generator=np.random.default_rng(0)), "fp32")
    from llm.trainer import Job

    job = Job()
    stats = GradStats(layout)
    rng = np.random.default_rng(0)

    def batch_of_ids():
        ids = rng.integers(0, config.vocab_size, (batch, config.block_size + 1))
        return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}

    def plain(b):
        layout.step(job, opt, b, 1, 1.0)

    def armed(b):
        stats.arm()
        layout.step(job, opt, b, 1, 1.0, observe_grads=stats.observe_grads)
        stats.finish()

    for _ in range(2):  # warm-up (AdamW's moments, the allocator)
        plain(batch_of_ids())
        armed(batch_of_ids())
    wall, cpu = {plain: [], armed: []}, {plain: [], armed: []}
    for k in range(steps):
        for fn in ((plain, armed) if k % 2 == 0 else (armed, plain)):
            b = batch_of_ids()
            t0, c0 = time.perf_counter(), time.process_time()
            fn(b)
            wall[fn].append(time.perf_counter() - t0)
            cpu[fn].append(time.process_time() - c0)
    return [(statistics.median(d[plain]), statistics.median(d[armed])) for d in (wall, cpu)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10, help="timed steps of each kind per model (default 10)")
    p.add_argument("--log-interval", type=int, default=10, help="the interval the run-average assumes (default 10)")
    args = p.parse_args(argv)
    print(f"| model | clock | plain step ms | armed step ms | armed / plain | a run with --log-interval "
          f"{args.log_interval} / plain |")
    print("|---|---|---:|---:|---:|---:|")
    for name, (overrides, batch) in MODELS.items():
        for clock, (t_plain, t_armed) in zip(("wall", "CPU"), bench(overrides, batch, args.steps)):
            run = 1.0 + (t_armed / t_plain - 1.0) / args.log_interval
            print(f"| {name}, batch {batch} | {clock} | {1e3 * t_plain:.1f} | {1e3 * t_armed:.1f} | "
                  f"{t_armed / t_plain:.3f} | {run:.3f} |", flush=True)


if __name__ == "__main__":
    main()
