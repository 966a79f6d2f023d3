"""Where the time of one training step goes: seconds per op kind, forward and backward separately.

Builds the "small" GPT of ``benchmarks/vs_pytorch.py`` (6 layers, 6 heads,
384 wide, block 256, batch 8, vocabulary 65, float32), runs a few warm-up
steps, then times ``--steps`` steps with every ``Function`` subclass's
``forward`` and ``backward`` wrapped by a timer (installed here, for the
duration of the run only: the engine carries no instrumentation). Times are
exclusive (an op called inside another op's forward is charged to itself),
summed over the timed steps and divided by their number.

The table lists, per op class, its forward and backward milliseconds per step
and calls per step, then the phases of the step: the model's forward, the
backward pass and ``AdamW.step``; "engine and Python" is what the phases take
beyond the ops' own ``forward``/``backward`` (graph bookkeeping, module code,
gradient accumulation, ``sum_to``).

    .venv/bin/python benchmarks/profile_step.py                 # "small", 3 timed steps
    .venv/bin/python benchmarks/profile_step.py --config tiny --steps 10
    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/profile_step.py --cpu-time

On a shared machine, wall-clock times swing with the neighbours' load.
``--cpu-time`` times with this thread's CPU clock instead (``time.thread_time``),
which a busy neighbour disturbs far less; with ``OPENBLAS_NUM_THREADS=1`` all the
work is on this thread, so the table is the step's single-core cost.
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import resource
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from autograd.engine import Function  # noqa: E402
from vs_pytorch import CONFIGS, build_ours  # noqa: E402

_clock = time.perf_counter  # --cpu-time switches it to time.thread_time


def _faults():
    """Minor page faults of this process so far (a fresh page touched for the first time)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class Profiler:
    """Exclusive time and page faults per (op class, "forward" | "backward"), with a stack for nested calls."""

    def __init__(self):
        self.total = collections.defaultdict(float)
        self.faults = collections.defaultdict(int)
        self.calls = collections.defaultdict(int)
        self.stack = []  # [key, start, time spent in children, faults at start, faults in children]
        self.saved = []

    def wrap(self, cls, kind):
        original = cls.__dict__[kind]
        key = (cls.__name__, kind)
        prof = self

        @functools.wraps(original)
        def timed(self_, *args, **kwargs):
            frame = [key, _clock(), 0.0, _faults(), 0]
            prof.stack.append(frame)
            try:
                return original(self_, *args, **kwargs)
            finally:
                prof.stack.pop()
                elapsed = _clock() - frame[1]
                faults = _faults() - frame[3]
                prof.total[key] += elapsed - frame[2]
                prof.faults[key] += faults - frame[4]
                prof.calls[key] += 1
                if prof.stack:
                    prof.stack[-1][2] += elapsed
                    prof.stack[-1][4] += faults

        self.saved.append((cls, kind, original))
        setattr(cls, kind, timed)

    def install(self):
        seen, todo = set(), list(Function.__subclasses__())
        while todo:
            cls = todo.pop()
            if cls in seen:
                continue
            seen.add(cls)
            todo.extend(cls.__subclasses__())
            for kind in ("forward", "backward"):
                if kind in cls.__dict__:
                    self.wrap(cls, kind)

    def remove(self):
        for cls, kind, original in reversed(self.saved):
            setattr(cls, kind, original)
        self.saved.clear()

    def reset(self):
        self.total.clear()
        self.faults.clear()
        self.calls.clear()


def profile(config, steps, warmup=2):
    model, opt, ids, targets = build_ours(config)
    phases = collections.defaultdict(float)

    def step(record):
        f0, t0 = _faults(), _clock()
        _, loss = model(ids, targets)
        t1 = _clock()
        loss.backward()
        t2 = _clock()
        opt.step()
        opt.zero_grad()
        t3, f3 = _clock(), _faults()
        if record:
            phases["forward"] += t1 - t0
            phases["backward"] += t2 - t1
            phases["optimizer"] += t3 - t2
            phases["faults"] += f3 - f0

    prof = Profiler()
    prof.install()
    try:
        for _ in range(warmup):
            step(False)
        prof.reset()
        for _ in range(steps):
            step(True)
    finally:
        prof.remove()
    return prof, phases, ids.size


def report(prof, phases, steps, tokens, top):
    ms = 1000.0 / steps
    ops = collections.defaultdict(lambda: [0.0, 0.0, 0, 0, 0])  # fwd s, bwd s, fwd calls, bwd calls, faults
    for (name, kind), t in prof.total.items():
        row = ops[name]
        i = 0 if kind == "forward" else 1
        row[i] += t
        row[2 + i] += prof.calls[(name, kind)]
        row[4] += prof.faults[(name, kind)]
    step_s = phases["forward"] + phases["backward"] + phases["optimizer"]
    rows = sorted(ops.items(), key=lambda kv: -(kv[1][0] + kv[1][1]))
    print(f"one training step: {step_s * ms:.1f} ms ({tokens / (step_s / steps):.0f} tokens/s)")
    print()
    print("| op | fwd ms | bwd ms | total ms | % of step | calls/step | page faults/step |")
    print("|----|-------:|-------:|---------:|----------:|-----------:|-----------------:|")
    for name, (f, b, cf, cb, pf) in rows[:top]:
        print(f"| {name} | {f * ms:.1f} | {b * ms:.1f} | {(f + b) * ms:.1f} | {(f + b) / step_s:.1%} "
              f"| {cf / steps:.0f} | {pf / steps:.0f} |")
    rest = rows[top:]
    if rest:
        f = sum(r[1][0] for r in rest)
        b = sum(r[1][1] for r in rest)
        print(f"| ({len(rest)} others) | {f * ms:.1f} | {b * ms:.1f} | {(f + b) * ms:.1f} | {(f + b) / step_s:.1%} | |")
    fwd_ops = sum(r[0] for r in ops.values())
    bwd_ops = sum(r[1] for r in ops.values())
    print()
    print("| phase | ms | ops' own ms | engine and Python ms |")
    print("|-------|---:|------------:|---------------------:|")
    print(f"| forward | {phases['forward'] * ms:.1f} | {fwd_ops * ms:.1f} | {(phases['forward'] - fwd_ops) * ms:.1f} |")
    print(f"| backward | {phases['backward'] * ms:.1f} | {bwd_ops * ms:.1f} | "
          f"{(phases['backward'] - bwd_ops) * ms:.1f} |")
    print(f"| optimizer (AdamW step + zero_grad) | {phases['optimizer'] * ms:.1f} | | |")
    print()
    print(f"page faults per step: {phases['faults'] / steps:.0f} (a first touch of memory the process got from "
          "the kernel; each costs microseconds)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="small", choices=list(CONFIGS))
    ap.add_argument("--steps", type=int, default=3, help="timed steps (after 2 warm-up steps)")
    ap.add_argument("--top", type=int, default=15, help="op kinds listed individually")
    ap.add_argument("--cpu-time", action="store_true", help="time with this thread's CPU clock, not the wall clock")
    args = ap.parse_args(argv)
    if args.cpu_time:
        global _clock
        _clock = time.thread_time
    prof, phases, tokens = profile(args.config, args.steps)
    clock = "this thread's CPU time" if args.cpu_time else "wall-clock time"
    print(f"config {args.config!r}, {args.steps} timed steps, {clock}")
    report(prof, phases, args.steps, tokens, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
