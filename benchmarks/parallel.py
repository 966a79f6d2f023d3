"""Parallel training on the CPU: data-parallel weak scaling and the pipeline bubble, measured.

Two measurements, each run as its own ``mpirun`` job that this script launches
(one BLAS thread per rank: ``OMP_NUM_THREADS=1`` etc., so ranks do not fight
over cores):

1. **Data parallelism, weak scaling.** Every rank trains the same small GPT on
   its own batch of fixed size (``--dp-batch`` sequences of ``--seq`` tokens):
   forward, backward, bucketed gradient all-reduce (``DataParallel``), AdamW.
   With 1 rank and with 2 ranks:
   ``efficiency = tokens/s(2 ranks) / (2 * tokens/s(1 rank))``
   (1.0 is perfect; the all-reduce and the ranks sharing memory bandwidth cost the rest).

2. **Pipeline bubble.** A 2-stage pipeline (1F1B and GPipe) runs ``m`` micro-batches
   of fixed size per step, ``m`` in {2, 4, 8}. Each stage times its forward and
   backward computations (busy) inside the step; the step's wall time is the
   slowest stage's (stages start together after a barrier). Measured bubble =
   ``1 - mean over stages(busy) / wall``, against the theory ``(p - 1) / (m + p - 1)``,
   which assumes equal stages and free messages.

Every figure is the median over the timed steps (after warm-up steps). Run::

    .venv/bin/python benchmarks/parallel.py              # both tables (~1-2 min on 2 cores)
    .venv/bin/python benchmarks/parallel.py --steps 5    # quicker, noisier

On a machine with fewer than 2 free cores the ranks share a core and the
efficiency says so: read it together with the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
               "NUMEXPR_NUM_THREADS")


def model_config(args):
    from llm.model import GPTConfig

    return GPTConfig(vocab_size=args.vocab, block_size=args.seq, n_layer=args.n_layer, n_head=args.n_head,
                     n_embd=args.n_embd)


# ---------------------------------------------------------------------------
# workers (run under mpirun)
# ---------------------------------------------------------------------------


def worker_dp(args):
    import numpy as np

    import nn
    from llm.model import GPT
    from parallel import DataParallel, get_world

    comm = get_world()
    config = model_config(args)
    model = GPT(config, generator=np.random.default_rng(0))
    ddp = DataParallel(model, comm)
    opt = nn.optim.AdamW(nn.optim.param_groups_for_gpt(model, 0.1), lr=1e-3)
    g = np.random.default_rng(comm.rank)
    times, comm_times, cpu_shares = [], [], []
    for step in range(args.warmup + args.steps):
        x = g.integers(0, config.vocab_size, size=(args.dp_batch, args.seq))
        y = g.integers(0, config.vocab_size, size=(args.dp_batch, args.seq))
        comm.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        _, loss = ddp(x, targets=y)
        loss.backward()
        t1 = time.perf_counter()
        ddp.finish_grads()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0  # before the barrier (it spins)
        comm.barrier()
        times.append(time.perf_counter() - t0)
        comm_times.append(t2 - t1)
        cpu_shares.append(cpu / wall)
    k = args.warmup
    step_s = statistics.median(times[k:])
    comm_s = statistics.median(comm.allgather(statistics.median(comm_times[k:])))
    cpu_share = statistics.mean(comm.allgather(statistics.median(cpu_shares[k:])))
    if comm.rank == 0:
        tokens = comm.size * args.dp_batch * args.seq
        print(json.dumps({"ranks": comm.size, "step_s": step_s, "tokens_per_s": tokens / step_s,
                          "finish_grads_s": comm_s, "cpu_share": cpu_share}), flush=True)


def worker_pp(args):
    import numpy as np

    from llm.model import GPT
    from llm.trainer import Job, stage_layout
    from parallel import get_world, make_grid
    from parallel.pipeline_exec import PipelineExecutor, split_rows

    comm = get_world()
    config = model_config(args)
    grid = make_grid(comm, 1, comm.size)
    stage = GPT(config, generator=np.random.default_rng(0)).pipeline_stage(grid.stage, stage_layout(config, grid.pp))
    job = Job()
    pipe = PipelineExecutor(stage, grid, n_micro=args.micro, schedule=args.schedule)
    g = np.random.default_rng(0)
    rows = args.micro * args.pp_micro_batch
    bubbles, walls, busy_per_stage, op_times = [], [], [], []
    for step in range(args.warmup + args.steps):
        x = g.integers(0, config.vocab_size, size=(rows, args.seq))
        y = g.integers(0, config.vocab_size, size=(rows, args.seq))
        comm.barrier()
        result = pipe.step(split_rows({"input_ids": x, "labels": y}, args.micro), job.loss, job.inputs, job.count)
        stage.zero_grad()
        busy = comm.allgather(result.busy_s)
        wall = max(comm.allgather(result.wall_s))
        fb = comm.allgather((result.forward_s / args.micro, result.backward_s / args.micro))
        if step >= args.warmup:
            bubbles.append(1.0 - sum(busy) / (len(busy) * wall))
            walls.append(wall)
            busy_per_stage.append([b / wall for b in busy])
            op_times.append(fb)
    if comm.rank == 0:
        from parallel.schedule import timeline

        i = bubbles.index(statistics.median_low(bubbles))
        # the timed model of parallel.schedule with this step's per-stage forward/backward times:
        # the bubble that unequal stages alone explain (messages and overheads free)
        fwd = [f for f, _ in op_times[i]]
        bwd = [b for _, b in op_times[i]]
        model = timeline(args.schedule, comm.size, args.micro, forward_time=fwd, backward_time=bwd).bubble
        print(json.dumps({"stages": comm.size, "micro": args.micro, "schedule": args.schedule,
                          "bubble": bubbles[i], "wall_s": walls[i], "busy_fraction": busy_per_stage[i],
                          "model_bubble": model, "op_ms": [[1e3 * f, 1e3 * b] for f, b in op_times[i]]}),
              flush=True)


# ---------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------


def mpirun_path():
    here = os.path.join(os.path.dirname(sys.executable), "mpirun")
    return here if os.path.exists(here) else shutil.which("mpirun")


def launch(ranks, worker_args, timeout=600):
    mpirun = mpirun_path()
    if mpirun is None:
        sys.exit('mpirun not found: install the MPI extra, `pip install -e ".[mpi]"`')
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    env.update({k: "1" for k in THREAD_VARS})
    cmd = [mpirun, "-n", str(ranks), "--oversubscribe", sys.executable, "-m", "mpi4py", os.path.abspath(__file__)]
    cmd += worker_args
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1])


def common_flags(args):
    return ["--steps", str(args.steps), "--warmup", str(args.warmup), "--seq", str(args.seq),
            "--n-layer", str(args.n_layer), "--n-head", str(args.n_head), "--n-embd", str(args.n_embd),
            "--vocab", str(args.vocab)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", choices=["dp", "pp"], help=argparse.SUPPRESS)
    p.add_argument("--micro", type=int, default=4, help=argparse.SUPPRESS)
    p.add_argument("--schedule", default="1f1b", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=10, help="timed steps per measurement (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--seq", type=int, default=64, help="tokens per sequence (default 64)")
    p.add_argument("--n-layer", type=int, default=4, help="GPT layers (default 4)")
    p.add_argument("--n-head", type=int, default=4, help="attention heads (default 4)")
    p.add_argument("--n-embd", type=int, default=128, help="width (default 128)")
    p.add_argument("--vocab", type=int, default=512, help="vocabulary size (default 512)")
    p.add_argument("--dp-batch", type=int, default=8, help="sequences per rank for data parallelism (default 8)")
    p.add_argument("--pp-micro-batch", type=int, default=4, help="sequences per pipeline micro-batch (default 4)")
    p.add_argument("--micro-list", default="2,4,8", help="micro-batch counts for the bubble (default 2,4,8)")
    p.add_argument("--skip-dp", action="store_true", help="only the pipeline table")
    p.add_argument("--skip-pp", action="store_true", help="only the data-parallel table")
    args = p.parse_args(argv)

    if args.worker == "dp":
        return worker_dp(args)
    if args.worker == "pp":
        return worker_pp(args)

    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    print(f"GPT n_layer={args.n_layer} n_embd={args.n_embd} n_head={args.n_head} vocab={args.vocab} seq={args.seq}; "
          f"float32; 1 BLAS thread per rank; {os.cpu_count()} CPUs, load average {load:.1f} at start")
    if not args.skip_dp:
        res = {n: launch(n, ["--worker", "dp", "--dp-batch", str(args.dp_batch)] + common_flags(args)) for n in (1, 2)}
        eff = res[2]["tokens_per_s"] / (2 * res[1]["tokens_per_s"])
        print(f"\ndata parallelism, weak scaling ({args.dp_batch} x {args.seq} tokens per rank, median of "
              f"{args.steps} steps)")
        print(f"{'ranks':>5} {'step ms':>9} {'tokens/s':>10} {'efficiency':>11} {'wait grads ms':>14} "
              f"{'cpu share':>10}")
        for n in (1, 2):
            e = 1.0 if n == 1 else eff
            r = res[n]
            print(f"{n:>5} {r['step_s'] * 1e3:>9.1f} {r['tokens_per_s']:>10.0f} {e:>11.2f} "
                  f"{r['finish_grads_s'] * 1e3:>14.1f} {r['cpu_share']:>10.2f}")
        print("wait grads: finish_grads() after backward (the all-reduce still running, and waiting for the slower "
              "rank); cpu share: CPU time / wall time of a rank's step (below 1: the rank waited, or the OS gave "
              "its core to another process)")
    if not args.skip_pp:
        print(f"\npipeline bubble, p = 2 stages ({args.pp_micro_batch} x {args.seq} tokens per micro-batch, "
              f"median of {args.steps} steps)")
        print(f"{'schedule':>8} {'m':>3} {'step ms':>9} {'busy s0':>8} {'busy s1':>8} {'bubble':>7} "
              f"{'theory':>7} {'ratio':>6} {'uneven':>7}")
        for schedule in ("1f1b", "gpipe"):
            for m in [int(v) for v in args.micro_list.split(",")]:
                r = launch(2, ["--worker", "pp", "--micro", str(m), "--schedule", schedule,
                               "--pp-micro-batch", str(args.pp_micro_batch)] + common_flags(args))
                theory = 1 / (m + 1)
                b0, b1 = r["busy_fraction"]
                print(f"{schedule:>8} {m:>3} {r['wall_s'] * 1e3:>9.1f} {b0:>8.2f} {b1:>8.2f} {r['bubble']:>7.3f} "
                      f"{theory:>7.3f} {r['bubble'] / theory:>6.2f} {r['model_bubble']:>7.3f}")
                last = r
        (f0, b0), (f1, b1) = last["op_ms"]
        print(f"\nbusy sN: stage N's share of the step spent computing; bubble = 1 - mean(busy); theory = "
              f"(p-1)/(m+p-1) for equal stages and free messages; ratio = bubble / theory; uneven = the bubble the "
              f"timed schedule model predicts from the measured per-stage times alone (last run: forward/backward "
              f"{f0:.1f}/{b0:.1f} ms on stage 0, {f1:.1f}/{b1:.1f} ms on stage 1 per micro-batch)")
    return 0


if __name__ == "__main__":
    sys.exit(main() or 0)
