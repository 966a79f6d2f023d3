"""Engine overhead: the autograd engine's time per op as a ratio to the raw NumPy calls it makes.

For each op we time, in the same run:

- fwd:      the engine op on tensors that require grad (so the graph is recorded)
            against the same NumPy expression on the raw arrays;
- fwd+bwd:  the engine forward plus ``backward()`` against the NumPy forward plus
            the backward written out by hand (e.g. for a @ b: g @ b.T and a.T @ g).

On tiny tensors (8x8) the arrays cost almost nothing, so the ratio is the
engine's Python overhead; on large tensors (2048x2048 float32) it should
approach 1.0, and what is left over is real extra work (copies, temporaries).
Each number is the median of several repeats (``time.perf_counter``), each
repeat a loop long enough to be timed reliably, engine and NumPy repeats
alternating so that a busy neighbour slows both alike.

autograd's CPU threads are set to one here (``autograd.set_num_threads(1)``),
so the engine and the raw NumPy code run the same BLAS with the same threads:
the table measures the engine, not the thread pool (``vs_pytorch.py`` does).

    .venv/bin/python benchmarks/engine_overhead.py            # the table
    .venv/bin/python benchmarks/engine_overhead.py --profile  # cProfile of the tiny MLP step
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import autograd  # noqa: E402
from autograd import Tensor, cross_entropy  # noqa: E402

F32 = np.float32
autograd.set_num_threads(1)  # same BLAS threading on both sides (see the module doc)


def calibrate(fn, min_repeat_s=0.03, max_loops=100_000):
    """How many calls of ``fn`` make one timed repeat last ~``min_repeat_s`` (the call also warms up)."""
    t0 = time.perf_counter()
    fn()
    one = time.perf_counter() - t0
    if one >= min_repeat_s:
        return 1
    fn()  # a second call: the first one paid for lazy set-up
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-7)
    return int(min(max_loops, max(1, min_repeat_s / one)))


def time_loop(fn, loops):
    """Seconds per call of ``fn`` over ``loops`` calls."""
    t0 = time.perf_counter()
    for _ in range(loops):
        fn()
    return (time.perf_counter() - t0) / loops


def compare(eng, ref, repeats):
    """Median seconds per call of the engine and the NumPy versions, their repeats alternating."""
    loops_e, loops_r = calibrate(eng), calibrate(ref)
    te, tr = [], []
    for _ in range(repeats):  # alternate, so that a busy neighbour slows both alike
        te.append(time_loop(eng, loops_e))
        tr.append(time_loop(ref, loops_r))
    return statistics.median(te), statistics.median(tr)


def _available(fn):
    """True if an engine op is implemented (other parts of the engine may still be stubs)."""
    try:
        fn(Tensor(np.ones((2, 2), dtype=F32)))
        return True
    except NotImplementedError:
        return False


# -- the cases: (engine forward, engine fwd+bwd, numpy forward, numpy fwd+bwd) ------------------


def elementwise_cases(n, rng):
    """add, mul, matmul, exp, sum on (n, n) float32 tensors."""
    a_np = rng.standard_normal((n, n)).astype(F32)
    b_np = rng.standard_normal((n, n)).astype(F32)
    g_np = rng.standard_normal((n, n)).astype(F32)
    a = Tensor(a_np, requires_grad=True)
    b = Tensor(b_np, requires_grad=True)

    def run_bwd(make):
        def step():
            a.grad = b.grad = None
            make().backward(grad=g_np)
        return step

    def run_scalar_bwd(make):
        def step():
            a.grad = None
            make().backward()
        return step

    # The hand-written NumPy backward keeps its gradients until the next call, as the engine keeps
    # a.grad / b.grad, so both sides pay the same allocation and page-fault costs.
    kept = {}

    def np_add_bwd():
        kept.clear()
        a_np + b_np
        kept["a"], kept["b"] = g_np, g_np  # d(a+b)/da = d(a+b)/db = identity: nothing to compute

    def np_mul_bwd():
        kept.clear()
        a_np * b_np
        kept["a"], kept["b"] = g_np * b_np, g_np * a_np

    def np_matmul_bwd():
        kept.clear()
        a_np @ b_np
        kept["a"], kept["b"] = g_np @ b_np.T, a_np.T @ g_np

    def np_exp_bwd():
        kept.clear()
        y = np.exp(a_np)
        kept["a"] = g_np * y

    def np_sum_bwd():
        kept.clear()
        s = a_np.sum()
        kept["a"] = np.full_like(a_np, np.ones_like(s))  # d sum / d a = 1 everywhere, times ds = 1

    cases = [
        ("add", lambda: a + b, run_bwd(lambda: a + b), lambda: a_np + b_np, np_add_bwd),
        ("mul", lambda: a * b, run_bwd(lambda: a * b), lambda: a_np * b_np, np_mul_bwd),
        ("matmul", lambda: a @ b, run_bwd(lambda: a @ b), lambda: a_np @ b_np, np_matmul_bwd),
    ]
    if _available(autograd.exp):
        cases.append(("exp", lambda: autograd.exp(a), run_bwd(lambda: autograd.exp(a)), lambda: np.exp(a_np),
                      np_exp_bwd))
    cases.append(("sum", lambda: autograd.sum(a), run_scalar_bwd(lambda: autograd.sum(a)), lambda: a_np.sum(),
                  np_sum_bwd))
    return cases


def mlp_case(batch, d_in, hidden, classes, rng):
    """One step of a 2-layer tanh MLP with cross-entropy: x @ W1 + b1 -> tanh -> @ W2 + b2 -> CE."""
    x_np = rng.standard_normal((batch, d_in)).astype(F32)
    y_np = rng.integers(0, classes, size=batch)
    p_np = {
        "W1": (rng.standard_normal((d_in, hidden)) / np.sqrt(d_in)).astype(F32),
        "b1": np.zeros(hidden, F32),
        "W2": (rng.standard_normal((hidden, classes)) / np.sqrt(hidden)).astype(F32),
        "b2": np.zeros(classes, F32),
    }
    p = {k: Tensor(v, requires_grad=True) for k, v in p_np.items()}
    x = Tensor(x_np)
    if _available(autograd.tanh):
        act = autograd.tanh
    else:  # element-wise ops not written yet: relu as a product with a constant mask
        def act(t):
            return t * Tensor((t.data > 0).astype(t.dtype))

    def fwd():
        return cross_entropy(act(x @ p["W1"] + p["b1"]) @ p["W2"] + p["b2"], y_np)

    def fwd_bwd():
        for t in p.values():
            t.grad = None
        fwd().backward()

    rows = np.arange(batch)

    def np_fwd(keep=False):
        h = np.tanh(x_np @ p_np["W1"] + p_np["b1"])  # (B, H)
        z = h @ p_np["W2"] + p_np["b2"]  # (B, K)
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        s = e.sum(axis=1)
        loss = (np.log(s) - z[rows, y_np]).mean()
        return (loss, h, e, s) if keep else loss

    kept = {}

    def np_fwd_bwd():
        kept.clear()  # gradients live until the next call, like the engine's .grad
        _, h, e, s = np_fwd(keep=True)
        dz = e / s[:, None]  # softmax
        dz[rows, y_np] -= 1
        dz *= F32(1.0 / batch)
        grads = {"W2": h.T @ dz, "b2": dz.sum(axis=0)}
        da = dz @ p_np["W2"].T
        da *= 1 - h * h  # tanh'
        grads["W1"] = x_np.T @ da
        grads["b1"] = da.sum(axis=0)
        kept.update(grads)

    return ("mlp step", fwd, fwd_bwd, np_fwd, np_fwd_bwd)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", type=int, default=8, help="side of the tiny square tensors (default 8)")
    parser.add_argument("--large", type=int, default=2048, help="side of the large square tensors (default 2048)")
    parser.add_argument("--profile", action="store_true", help="cProfile the tiny MLP step instead")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)

    if args.profile:
        import cProfile
        import pstats

        _, _, fwd_bwd, _, _ = mlp_case(args.tiny, args.tiny, args.tiny, args.tiny, rng)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(5000):
            fwd_bwd()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(20)
        return

    t_start = time.perf_counter()
    print(f"engine overhead: engine time / raw NumPy time, float32, numpy {np.__version__}, "
          f"{os.cpu_count()} CPUs")
    print(f"{'op':<10} {'size':<11} {'mode':<8} {'engine µs':>12} {'numpy µs':>12} {'ratio':>7}")
    for n, repeats, mlp_dims in ((args.tiny, 7, args.tiny), (args.large, 5, args.large // 2)):
        # square (n, n) operands; the MLP step: batch n, inputs = hidden = classes = mlp_dims
        cases = elementwise_cases(n, rng) + [mlp_case(n, mlp_dims, mlp_dims, mlp_dims, rng)]
        for name, fwd, fwd_bwd, np_fwd, np_fwd_bwd in cases:
            size = f"{n}x{mlp_dims if name == 'mlp step' else n}"
            for mode, eng, ref in (("fwd", fwd, np_fwd), ("fwd+bwd", fwd_bwd, np_fwd_bwd)):
                e, r = compare(eng, ref, repeats)
                print(f"{name:<10} {size:<11} {mode:<8} {e * 1e6:12.1f} {r * 1e6:12.1f} {e / r:7.2f}", flush=True)
    print(f"(total {time.perf_counter() - t_start:.1f} s)")


if __name__ == "__main__":
    main()
