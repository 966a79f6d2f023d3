"""Generation speed against Hugging Face transformers' ``generate`` on the CPU: same weights, same prompts, one run.

For each config ("tiny", "small"; GPT-2 architecture, float32, vocabulary
``--vocab``) and batch size (1, 8) we build our ``llm.model.GPT`` from a seed,
write it as a Hugging Face GPT-2 folder (``llm.hf_gpt2.save_hf_gpt2``) and load
that folder with ``transformers.GPT2LMHeadModel``, so both hold the same
weights. Both continue the same random prompts (``--prompt-len`` tokens, all
rows the same length) greedily by ``--new-tokens`` tokens with a KV cache and
no stop token: ours with ``llm.generate.generate`` (the engine behind
``python -m llm generate`` and the evaluator's ``generate_until``), theirs with
``model.generate(do_sample=False, use_cache=True)``. Before timing, the
script checks that both produce the same tokens (it prints the fraction that
agree: float32 sums in a different order can flip a near-tie on a random
model, so the check reports instead of asserting).

Timing: our repeats and theirs alternate, so a busy neighbour slows both alike;
the table shows the median time of each and the ratio ours / transformers of
tokens per second (above 1.0: we are faster). A token is one new token of one
row (batch 8 makes 8 per step). Both use every core: PyTorch's intra-op pool
is ``os.cpu_count()`` threads, ours is ``autograd.threads``; ``--threads N``
sets both.

    .venv/bin/pip install torch==2.13.0 transformers     # benchmark-only installs, never project dependencies
    .venv/bin/python benchmarks/generate_vs_transformers.py                 # tiny and small, batch 1 and 8
    .venv/bin/python benchmarks/generate_vs_transformers.py --configs tiny --batches 8 --repeats 9
    .venv/bin/python benchmarks/generate_vs_transformers.py --profile tiny:8   # cProfile of our side only

Without transformers the script says so and exits 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# benchmarks/vs_pytorch.py sets OPENBLAS_NUM_THREADS / OMP_NUM_THREADS from --threads when imported, before
# NumPy loads (BLAS reads its thread count then); it imports torch only when it runs
import vs_pytorch  # noqa: E402,F401

import numpy as np  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

#: config name -> (preset, prompt length, new tokens): prompt + new tokens fill the preset's context
CONFIGS = {"tiny": ("tiny", 16, 48), "small": ("small", 32, 224)}


def build_ours(name: str, vocab: int, seed: int = 0):
    """Our GPT for config ``name`` with weights drawn from ``seed`` (GPT-2's init), in eval mode."""
    from llm.model import GPT, get_preset

    model = GPT(get_preset(CONFIGS[name][0], vocab_size=vocab), generator=np.random.default_rng(seed))
    model.eval()
    return model


def build_hf(ours, folder: str, threads: int):
    """transformers' GPT2LMHeadModel loaded from ``ours`` written as a Hugging Face folder."""
    import torch
    import transformers

    from llm.hf_gpt2 import save_hf_gpt2

    torch.set_num_threads(threads)
    save_hf_gpt2(ours, folder, prefix="transformer.")
    model = transformers.GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    model.generation_config.eos_token_id = None  # generate exactly --new-tokens tokens, as ours does
    model.generation_config.pad_token_id = 0
    return model


def prompts_for(name: str, vocab: int, batch: int, seed: int = 1) -> np.ndarray:
    """Random prompts (batch, prompt length) of token ids."""
    return np.random.default_rng(seed).integers(0, vocab, (batch, CONFIGS[name][1]), dtype=np.int64)


def ours_generate(model, prompts: np.ndarray, n: int) -> np.ndarray:
    """Our greedy continuation (batch, n)."""
    from llm.generate import generate

    return generate(model, prompts, n, greedy=True)


def hf_generate(model, prompts: np.ndarray, n: int) -> np.ndarray:
    """transformers' greedy continuation (batch, n)."""
    import torch

    ids = torch.from_numpy(prompts)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, use_cache=True)
    return out[:, prompts.shape[1]:].numpy()


def measure(name: str, batch: int, vocab: int, repeats: int, threads: int, folder: str) -> dict:
    """Median seconds of each side for one (config, batch), alternating repeats; plus the token agreement."""
    ours = build_ours(name, vocab)
    hf = build_hf(ours, os.path.join(folder, f"{name}-{vocab}"), threads)
    n = CONFIGS[name][2]
    prompts = prompts_for(name, vocab, batch)
    a, b = ours_generate(ours, prompts, n), hf_generate(hf, prompts, n)  # also the warm-up
    agree = float((a == b).mean())
    t_ours, t_hf = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ours_generate(ours, prompts, n)
        t_ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        hf_generate(hf, prompts, n)
        t_hf.append(time.perf_counter() - t0)
    tokens = batch * n
    ours_tps, hf_tps = tokens / statistics.median(t_ours), tokens / statistics.median(t_hf)
    return dict(config=name, batch=batch, tokens=tokens, agree=agree, ours=ours_tps, hf=hf_tps, ratio=ours_tps / hf_tps)


def profile(name: str, batch: int, vocab: int, repeats: int):
    """cProfile of our generation alone (no transformers needed)."""
    import cProfile
    import pstats

    model = build_ours(name, vocab)
    prompts = prompts_for(name, vocab, batch)
    n = CONFIGS[name][2]
    ours_generate(model, prompts, n)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(repeats):
        ours_generate(model, prompts, n)
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="tiny,small", help="comma-separated: tiny, small (default both)")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes (default 1,8)")
    parser.add_argument("--vocab", type=int, default=2048,
                        help="vocabulary size (default 2048, the default tokenizer's; 50257 is GPT-2's)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per side (default 5)")
    parser.add_argument("--threads", type=int, default=None, help="threads for both frameworks (default: all cores)")
    parser.add_argument("--profile", default=None, metavar="CONFIG:BATCH",
                        help="profile our generation for one config and batch instead of comparing")
    args = parser.parse_args(argv)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    for c in configs:
        if c not in CONFIGS:
            parser.error(f"unknown config {c!r}; choose from {', '.join(CONFIGS)}")
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    if args.profile:
        name, _, batch = args.profile.partition(":")
        profile(name, int(batch or 1), args.vocab, args.repeats)
        return 0
    if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("torch") is None:
        print("transformers and torch are not installed; install them (benchmark-only) with\n"
              "  .venv/bin/pip install torch==2.13.0 transformers")
        return 0
    from autograd import threads as autograd_threads

    threads = args.threads or autograd_threads.num_threads()
    if args.threads:
        autograd_threads.set_num_threads(args.threads)
    print(f"greedy generation, float32, vocabulary {args.vocab}, {threads} thread(s) each, "
          f"median of {args.repeats} alternating repeats")
    print(f"{'config':>6} {'batch':>5} {'prompt+new':>10} {'agree':>6} {'ours tok/s':>11} {'hf tok/s':>9} "
          f"{'ours/hf':>8}")
    with tempfile.TemporaryDirectory() as folder:
        for name in configs:
            for batch in batches:
                r = measure(name, batch, args.vocab, args.repeats, threads, folder)
                _, p, n = CONFIGS[name]
                print(f"{name:>6} {batch:>5} {f'{p}+{n}':>10} {r['agree']:>6.2f} {r['ours']:>11,.0f} "
                      f"{r['hf']:>9,.0f} {r['ratio']:>8.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
