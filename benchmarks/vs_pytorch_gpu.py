"""GPU training step against PyTorch eager: GPT-2 124M at block 1024, same weights, in one run.

Ours: the trainer's step (``llm.trainer.Layout.step``: forward, backward, global-norm clipping at 1.0,
AdamW) on CuPy, through ``nn.amp.MixedPrecision`` (``--precision fp16`` by
default: CuPy has no bfloat16). PyTorch: the nanoGPT-style twin of
``vs_pytorch.py`` (``F.scaled_dot_product_attention``, fused attention on the
GPU) under ``torch.autocast(dtype=torch.bfloat16)``, ``clip_grad_norm_`` and
``torch.optim.AdamW`` with the same groups and hyper-parameters. Both models
start from our weights; the first losses must agree (rtol 2e-2 in mixed
precision, 1e-4 in fp32) before any timing. Repeats alternate between the
frameworks; each step ends with the loss read on the host, so the time is the
device's. The target of issue 6 is ours / torch step time <= 1.25.

MFU: model FLOPs per step (6 per weight per token plus attention, as
``vs_pytorch.step_flops``) over the half-precision matrix-product rate of the
same GPU, measured in this run with ``torch.mm`` on 8192-square bfloat16
matrices (float32 and 1024-square on the CPU).

    .venv/bin/pip install torch      # PyTorch is not a dependency of the project
    .venv/bin/python benchmarks/vs_pytorch_gpu.py                    # gpt2, batch 8, fp16 vs bf16
    .venv/bin/python benchmarks/vs_pytorch_gpu.py --batch 4 --steps 5
    .venv/bin/python benchmarks/vs_pytorch_gpu.py --device cpu --preset tiny --precision fp32  # a dry run

Without PyTorch, or with ``--device cuda`` where CuPy or a CUDA build of
PyTorch is missing, it says so and exits 0.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# (importing vs_pytorch also puts the project root on sys.path)
from vs_pytorch import HYPER, copy_weights, have_torch, step_flops, torch_adamw, torch_gpt_class  # noqa: E402


def _missing(device):
    """Why this benchmark cannot run here, or None."""
    if not have_torch():
        return "PyTorch is not installed (.venv/bin/pip install torch)"
    if device.startswith("cuda"):
        import torch

        from autograd import backend

        if not backend.cupy_available():
            return 'CuPy is not installed (pip install -e ".[cuda12]")'
        if not torch.cuda.is_available():
            return "this PyTorch has no CUDA device"
    return None


def build(preset, batch, device, precision, seed=0):
    """Both frameworks' (step function, model) pairs, from the same float32 weights and the same batch."""
    import torch

    from autograd import backend
    from llm.model import GPT, get_preset
    from train_step import one_process  # benchmarks/train_step.py: the trainer's one-process step

    config = get_preset(preset)
    model = GPT(config, generator=np.random.default_rng(seed))
    c = config
    tmodel = torch_gpt_class()(c.vocab_size, c.block_size, c.n_layer, c.n_head, c.n_embd)
    copy_weights(model, tmodel)  # before either moves: our weights are float32 on the CPU here
    tdev = torch.device("cuda" if device.startswith("cuda") else "cpu")
    tmodel.to(tdev)
    topt = torch_adamw(tmodel)
    _, opt, step = one_process(model, precision, device)
    for group in opt.param_groups:
        group.update(lr=HYPER["lr"], betas=tuple(HYPER["betas"]), eps=HYPER["eps"])
    data = np.random.default_rng(seed + 1).integers(0, c.vocab_size, size=(batch, c.block_size + 1))  # (B, T + 1)
    ids, targets = data[:, :-1], data[:, 1:]
    batch_ours = (backend.to_device(np.ascontiguousarray(ids), device),
                  backend.to_device(np.ascontiguousarray(targets), device))
    tids, ttargets = (torch.from_numpy(np.ascontiguousarray(a)).to(tdev) for a in (ids, targets))
    autocast = precision != "fp32"

    def ours():
        return float(step(*batch_ours).loss)

    def theirs():
        with torch.autocast(tdev.type, dtype=torch.bfloat16, enabled=autocast):
            _, loss = tmodel(tids, ttargets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tmodel.parameters(), 1.0)
        topt.step()
        topt.zero_grad(set_to_none=True)
        return float(loss.item())

    return ours, theirs, model, batch * c.block_size


def matmul_peak(device) -> float:
    """FLOP/s of ``torch.mm``: 8192-square bfloat16 on the GPU, 1024-square float32 on the CPU (best of 5 windows)."""
    import torch

    cuda = device.startswith("cuda")
    n, dtype = (8192, torch.bfloat16) if cuda else (1024, torch.float32)
    dev = "cuda" if cuda else "cpu"
    a, b = (torch.randn(n, n, device=dev).to(dtype) for _ in range(2))
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.mm(a, b)
    sync()
    best = math.inf
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(10):
            torch.mm(a, b)
        sync()
        best = min(best, (time.perf_counter() - t0) / 10)
    return 2 * n ** 3 / best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="gpt2", help="model preset (default gpt2: GPT-2 124M, block 1024)")
    ap.add_argument("--batch", type=int, default=8, help="sequences per step (default 8)")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu for a dry run")
    ap.add_argument("--precision", default="fp16", choices=["fp32", "fp16", "bf16"],
                    help="ours (default fp16); PyTorch runs bfloat16 autocast unless this is fp32")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per framework and repeat (default 10)")
    ap.add_argument("--repeats", type=int, default=3, help="alternating repeats (default 3)")
    args = ap.parse_args(argv)
    why = _missing(args.device)
    if why:
        print(f"vs_pytorch_gpu: {why}; skipped.")
        return 0

    ours, theirs, model, tokens = build(args.preset, args.batch, args.device, args.precision)
    la, lb = ours(), theirs()  # the first step of each, from the same weights
    rtol = 1e-4 if args.precision == "fp32" else 2e-2
    print(f"{args.preset}, batch {args.batch}: first loss ours {la:.5f} ({args.precision}), torch {lb:.5f} "
          f"({'fp32' if args.precision == 'fp32' else 'bf16 autocast'})", flush=True)
    if not math.isclose(la, lb, rel_tol=rtol):
        raise SystemExit(f"losses disagree beyond rtol {rtol}: ours {la:.5f}, torch {lb:.5f}")
    ours(), theirs()  # warm-up: kernels compiled, allocator pools filled
    t_ours, t_torch = [], []
    for _ in range(args.repeats):
        for step, times in ((ours, t_ours), (theirs, t_torch)):
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            times.append((time.perf_counter() - t0) / args.steps)
    peak = matmul_peak(args.device)
    flops = step_flops(model, tokens)
    to, tt = statistics.median(t_ours), statistics.median(t_torch)
    print(f"matmul peak ({'bf16' if args.device.startswith('cuda') else 'fp32'} torch.mm): {peak / 1e12:.1f} TFLOP/s")
    print()
    print("| preset | tokens/step | ours ms/step | torch ms/step | ratio ours/torch (target <= 1.25) | ours MFU | torch MFU |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f"| {args.preset} | {tokens} | {to * 1e3:.1f} | {tt * 1e3:.1f} | {to / tt:.2f} | "
          f"{flops / to / peak:.0%} | {flops / tt / peak:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
