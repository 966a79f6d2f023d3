"""Training speed against PyTorch's eager mode on the CPU: the same GPT, batch and weights, in one run.

For each config ("tiny", "small"; GPT-2 architecture, vocabulary 65, float32,
dropout 0) we build our ``llm.model.GPT`` and a small nanoGPT-style PyTorch
GPT-2 written below, copy our weights into it (our ``Linear`` stores
``(in, out)``, ``torch.nn.Linear`` ``(out, in)``: transposed on copy), check
that both give the same loss (rtol 1e-4) and the same gradients for a few
parameters, then time training steps (forward, backward, AdamW with the same
hyper-parameters and parameter groups; ``torch.optim.AdamW`` with its default
``foreach`` implementation). Our repeats and PyTorch's alternate, so a busy
neighbour slows both alike; the table shows medians and the ratio ours / torch
of tokens per second (above 1.0: we are faster).

Memory: each framework runs in its own subprocess (``--worker ours|torch``), so
their peaks do not mix, and the "ours" process never imports PyTorch. A worker
builds the model, optimizer and batch, reads its current resident set (the
baseline: libraries, weights, batch), runs a few training steps and reads
``VmHWM``, the process's peak resident set. "step peak" is the difference:
what training adds at its worst moment (activations and saved tensors,
gradients, AdamW's two moments, the backward pass's temporaries, and whatever
the allocator keeps). The total peak of each process is printed too
(PyTorch's includes its ~300 MB of libraries).

Threads: both frameworks use every core: PyTorch's intra-op pool is set to
``os.cpu_count()``; ours is ``autograd.threads`` (one thread per core unless
``OMP_NUM_THREADS`` / ``OPENBLAS_NUM_THREADS`` say otherwise), which splits
matrix products, attention, GELU, LayerNorm and AdamW into pieces and runs
BLAS single-threaded inside them. ``--threads N`` sets both to N
(``--threads 1``: one core each, which a busy neighbour disturbs far less
than two threads that must meet at every barrier).

    .venv/bin/python benchmarks/vs_pytorch.py                  # both configs (~2 min on 2 cores)
    .venv/bin/python benchmarks/vs_pytorch.py --configs tiny   # one config
    .venv/bin/python benchmarks/vs_pytorch.py --no-memory      # timings only
    .venv/bin/python benchmarks/vs_pytorch.py --threads 1      # one core per framework
    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 .venv/bin/python benchmarks/vs_pytorch.py

The last form tells glibc's malloc (for both frameworks: they share the
process) to keep freed memory for reuse instead of handing it back to the
kernel at the end of every step and taking it again, page fault by page
fault, in the next one; ``profile_step.py`` counts those faults per op.

PyTorch is not a dependency of the project; install it into the venv to run
this benchmark (``.venv/bin/pip install torch``). Without it the script says so
and exits 0.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time


def _threads_from_argv(argv):
    """The value of ``--threads N`` if given (read before NumPy is imported: BLAS reads its thread count then)."""
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--threads="):
            return a.split("=", 1)[1]
    return None


if _threads_from_argv(sys.argv) is not None:
    os.environ["OPENBLAS_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"] = _threads_from_argv(sys.argv)

import numpy as np  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

VOCAB = 65
#: config name -> (preset, batch size); the preset's block_size is the sequence length
CONFIGS = {"tiny": ("tiny", 12), "small": ("small", 8)}
HYPER = dict(lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def have_torch() -> bool:
    """Whether PyTorch can be imported (checked without importing it: the "ours" worker must not load it)."""
    import importlib.util

    return importlib.util.find_spec("torch") is not None


# ---------------------------------------------------------------------------
# the two models
# ---------------------------------------------------------------------------


def build_ours(name, seed=0):
    """Our GPT, an AdamW over GPT-2's parameter groups, and a fixed batch (ids, targets)."""
    from llm.model import GPT, get_preset
    from nn.optim import AdamW, param_groups_for_gpt

    preset, batch = CONFIGS[name]
    config = get_preset(preset, vocab_size=VOCAB)
    model = GPT(config, generator=np.random.default_rng(seed))
    opt = AdamW(param_groups_for_gpt(model, HYPER["weight_decay"]), lr=HYPER["lr"], betas=HYPER["betas"],
                eps=HYPER["eps"])
    ids, targets = batch_for(name, seed)
    return model, opt, ids, targets


def train_step(model, opt, ids, targets):
    """One training step of either framework (same calls on both); returns the loss as a float."""
    _, loss = model(ids, targets)
    loss.backward()
    opt.step()
    opt.zero_grad()
    return float(loss.item())


def torch_gpt_class():
    """A nanoGPT-style GPT-2 (learned positions, LayerNorm, tanh-GELU MLP, tied head, biases, no dropout)."""
    import torch
    import torch.nn as tnn
    import torch.nn.functional as F

    class Attention(tnn.Module):
        def __init__(self, C, H):
            super().__init__()
            self.H = H
            self.c_attn = tnn.Linear(C, 3 * C)
            self.c_proj = tnn.Linear(C, C)

        def forward(self, x):
            B, T, C = x.shape
            q, k, v = self.c_attn(x).split(C, dim=2)
            q = q.view(B, T, self.H, C // self.H).transpose(1, 2)  # (B, H, T, hd)
            k = k.view(B, T, self.H, C // self.H).transpose(1, 2)
            v = v.view(B, T, self.H, C // self.H).transpose(1, 2)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, hd)
            return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))

    class MLP(tnn.Module):
        def __init__(self, C):
            super().__init__()
            self.c_fc = tnn.Linear(C, 4 * C)
            self.gelu = tnn.GELU(approximate="tanh")
            self.c_proj = tnn.Linear(4 * C, C)

        def forward(self, x):
            return self.c_proj(self.gelu(self.c_fc(x)))

    class Block(tnn.Module):
        def __init__(self, C, H):
            super().__init__()
            self.ln_1 = tnn.LayerNorm(C)
            self.attn = Attention(C, H)
            self.ln_2 = tnn.LayerNorm(C)
            self.mlp = MLP(C)

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))

    class TorchGPT(tnn.Module):
        def __init__(self, V, T, L, H, C):
            super().__init__()
            self.wte = tnn.Embedding(V, C)
            self.wpe = tnn.Embedding(T, C)
            self.h = tnn.ModuleList([Block(C, H) for _ in range(L)])
            self.ln_f = tnn.LayerNorm(C)

        def forward(self, ids, targets):
            T = ids.shape[1]
            x = self.wte(ids) + self.wpe(torch.arange(T, device=ids.device))
            for block in self.h:
                x = block(x)
            logits = F.linear(self.ln_f(x), self.wte.weight)  # tied head (B, T, V)
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1), ignore_index=-100)
            return logits, loss

    return TorchGPT


def build_torch(name, ours_model=None, seed=0):
    """The PyTorch twin, with ``ours_model``'s weights copied in (PyTorch's own init when it is None)."""
    import torch

    from llm.model import get_preset

    torch.set_num_threads(_num_threads())
    ids, targets = batch_for(name, seed)
    c = get_preset(CONFIGS[name][0], vocab_size=VOCAB)
    model = torch_gpt_class()(c.vocab_size, c.block_size, c.n_layer, c.n_head, c.n_embd)
    if ours_model is not None:
        copy_weights(ours_model, model)
    return model, torch_adamw(model), torch.from_numpy(ids), torch.from_numpy(targets)


def copy_weights(ours_model, torch_model):
    """Copy our GPT's (CPU, float32) weights into the PyTorch twin; Linear weights are transposed on the way."""
    import torch

    ours = dict(ours_model.named_parameters())
    theirs = dict(torch_model.named_parameters())
    if set(ours) != set(theirs):
        raise RuntimeError(f"parameter names differ: {sorted(set(ours) ^ set(theirs))}")
    with torch.no_grad():
        for n, p in theirs.items():
            w = ours[n].data
            if w.ndim == 2 and not n.startswith(("wte", "wpe")):
                w = w.T  # our Linear is (in, out), torch's (out, in)
            p.copy_(torch.from_numpy(np.ascontiguousarray(w)))


def torch_adamw(torch_model):
    """``torch.optim.AdamW`` over GPT-2's groups (matrices decay; biases, norms, embeddings do not), HYPER's settings."""
    import torch

    theirs = dict(torch_model.named_parameters())
    decay = [p for n, p in theirs.items() if p.ndim >= 2 and not n.startswith(("wte", "wpe"))]
    rest = [p for n, p in theirs.items() if not (p.ndim >= 2 and not n.startswith(("wte", "wpe")))]
    return torch.optim.AdamW([{"params": decay, "weight_decay": HYPER["weight_decay"]},
                              {"params": rest, "weight_decay": 0.0}],
                             lr=HYPER["lr"], betas=HYPER["betas"], eps=HYPER["eps"])


def batch_for(name, seed=0):
    """The fixed batch ``(ids, targets)`` of config ``name``, each ``(B, T)``, the same for both frameworks."""
    from llm.model import get_preset

    preset, batch = CONFIGS[name]
    T = get_preset(preset).block_size
    data = np.random.default_rng(seed + 1).integers(0, VOCAB, size=(batch, T + 1))  # (B, T + 1)
    return np.ascontiguousarray(data[:, :-1]), np.ascontiguousarray(data[:, 1:])


# ---------------------------------------------------------------------------
# agreement check
# ---------------------------------------------------------------------------


def check_agreement(name, ours, theirs):
    """Same loss (rtol 1e-4) and the same gradients for a few parameters before any timing."""
    model, _, ids, targets = ours
    tmodel, _, tids, ttargets = theirs
    _, loss = model(ids, targets)
    loss.backward()
    _, tloss = tmodel(tids, ttargets)
    tloss.backward()
    a, b = float(loss.item()), float(tloss.item())
    if not math.isclose(a, b, rel_tol=1e-4):
        raise SystemExit(f"{name}: losses disagree: ours {a:.6f}, torch {b:.6f}")
    ours_p = dict(model.named_parameters())
    theirs_p = dict(tmodel.named_parameters())
    L = model.config.n_layer - 1
    worst = 0.0
    for n in ("wte.weight", "wpe.weight", "h.0.attn.c_attn.weight", "h.0.ln_1.weight",
              f"h.{L}.mlp.c_fc.weight", f"h.{L}.mlp.c_proj.bias", "ln_f.weight"):
        g = ours_p[n].grad
        tg = theirs_p[n].grad.numpy()
        if tg.ndim == 2 and not n.startswith(("wte", "wpe")):
            tg = tg.T
        err = float(np.abs(g - tg).max() / (np.abs(tg).max() + 1e-12))
        worst = max(worst, err)
        if err > 2e-3:
            raise SystemExit(f"{name}: gradient of {n} disagrees: max |ours - torch| / max |torch| = {err:.2e}")
    for p in ours_p.values():
        p.grad = None
    tmodel.zero_grad()
    return a, b, worst


# ---------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------


def _num_threads() -> int:
    """Threads per framework: ``--threads`` if given, else one per core."""
    return int(_threads_from_argv(sys.argv) or os.cpu_count() or 1)


def thread_settings():
    import torch

    from autograd import threads

    malloc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") and k.endswith("_")}
    return (f"cores {os.cpu_count()}; torch {torch.__version__} intra-op threads {torch.get_num_threads()}; "
            f"NumPy {np.__version__}, autograd threads {threads.num_threads()} (BLAS single-threaded inside); "
            f"glibc malloc {malloc or 'defaults'}")


def step_flops(model, tokens):
    """Training FLOPs per step: 6 per parameter per token (matmul weights) plus attention's 12 L T C per token."""
    c = model.config
    n_matmul = sum(p.data.size for n, p in model.named_parameters() if p.ndim == 2 and n != "wpe.weight")
    return tokens * (6 * n_matmul + 12 * c.n_layer * c.block_size * c.n_embd // 2)  # causal: half the keys


def time_config(name, repeats, steps):
    ours = build_ours(name)
    theirs = build_torch(name, ours[0])
    la, lb, gerr = check_agreement(name, ours, theirs)
    print(f"{name}: loss ours {la:.6f} torch {lb:.6f} (rel diff {abs(la - lb) / abs(lb):.1e}); "
          f"worst gradient rel diff {gerr:.1e}", flush=True)
    for _ in range(2):  # warm up (optimizer state, allocator, BLAS threads)
        train_step(*ours)
        train_step(*theirs)
    t_ours, t_torch = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            train_step(*ours)
        t_ours.append((time.perf_counter() - t0) / steps)
        t0 = time.perf_counter()
        for _ in range(steps):
            train_step(*theirs)
        t_torch.append((time.perf_counter() - t0) / steps)
    tokens = ours[2].size
    return dict(tokens=tokens, ours=statistics.median(t_ours), torch=statistics.median(t_torch),
                flops=step_flops(ours[0], tokens))


# ---------------------------------------------------------------------------
# memory, one framework per process
# ---------------------------------------------------------------------------


def _maxrss_mb():
    """The process's peak resident set so far, in MB.

    Linux's ``VmHWM`` (the high-water mark of this process's own memory map).
    ``ru_maxrss`` is not used where VmHWM exists: Linux carries it over from the
    parent through fork and exec, so a worker would report the parent's size.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux, bytes on macOS


def _rss_mb():
    """The process's resident set now, in MB (from /proc; falls back to the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return _maxrss_mb()


def worker(framework, name, steps):
    """Run in a subprocess: resident set after building the model and optimizer, and the peak over ``steps``."""
    parts = build_ours(name) if framework == "ours" else build_torch(name)
    base = _rss_mb()
    for _ in range(steps):
        train_step(*parts)
    peak = _maxrss_mb()
    print(json.dumps({"base_mb": base, "peak_mb": peak, "step_mb": peak - base}))


def measure_memory(name, steps=3):
    out = {}
    for fw in ("ours", "torch"):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", fw, "--config", name, "--steps", str(steps)]
        if _threads_from_argv(sys.argv) is not None:
            cmd += ["--threads", _threads_from_argv(sys.argv)]
        r = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[fw] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


# ---------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per framework (default 9 tiny, 5 small)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--worker", choices=("ours", "torch"), help=argparse.SUPPRESS)
    ap.add_argument("--config", choices=list(CONFIGS), help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=3, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for both frameworks (NumPy's BLAS, torch's intra-op pool); default: "
                         "one per core. --threads 1 compares the work of a step, little disturbed by a busy machine")
    args = ap.parse_args(argv)
    if not have_torch():
        print("vs_pytorch: PyTorch is not installed, nothing to compare against; skipped. "
              "Install it into the venv for this benchmark only: .venv/bin/pip install torch")
        return 0
    if args.worker:
        worker(args.worker, args.config, args.steps)
        return 0

    print(thread_settings())
    from llm.trainer import measure_matmul_flops

    peak = measure_matmul_flops("cpu", 1024, seconds=2.0) / 1e9
    print(f"float32 matmul peak (1024^3 on autograd's threads): {peak:.0f} GFLOP/s")
    rows = []
    for name in args.configs:
        repeats = args.repeats or (9 if name == "tiny" else 5)
        steps = 10 if name == "tiny" else 1
        r = time_config(name, repeats, steps)
        if not args.no_memory:
            r["mem"] = measure_memory(name)
        rows.append((name, r))

    print()
    print("| config | tokens/step | ours tok/s | torch tok/s | ratio ours/torch | ours MFU | torch MFU |")
    print("|--------|------------:|-----------:|------------:|-----------------:|---------:|----------:|")
    for name, r in rows:
        to, tt = r["tokens"] / r["ours"], r["tokens"] / r["torch"]
        mo, mt = r["flops"] / r["ours"] / 1e9 / peak, r["flops"] / r["torch"] / 1e9 / peak
        print(f"| {name:6} | {r['tokens']:11d} | {to:10.0f} | {tt:11.0f} | {to / tt:16.2f} | {mo:7.0%} | {mt:8.0%} |")
    if not args.no_memory:
        print()
        print("| config | ours step peak MB | torch step peak MB | ratio | ours total MB | torch total MB |")
        print("|--------|------------------:|-------------------:|------:|--------------:|---------------:|")
        for name, r in rows:
            mo, mt = r["mem"]["ours"], r["mem"]["torch"]
            print(f"| {name:6} | {mo['step_mb']:17.1f} | {mt['step_mb']:18.1f} | "
                  f"{mo['step_mb'] / max(mt['step_mb'], 1e-9):5.2f} | {mo['peak_mb']:13.1f} | {mt['peak_mb']:14.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
