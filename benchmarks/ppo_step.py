"""Where a PPO iteration's time goes, by response length: generating, scoring, updating.

    .venv/bin/python benchmarks/ppo_step.py              # the table (~2 minutes on a 2-core CPU)
    .venv/bin/python benchmarks/ppo_step.py --lengths 8 32 --iterations 3

A `tiny` GPT (4 layers, 128 wide, context 128; random weights: the time of a
step does not depend on what the model knows) with the chat tokens runs
``python -m llm ppo`` with a constant reward for a few iterations of 32
rollouts (4 epochs of minibatches of 16: 8 optimizer steps per iteration) at
each response length, and prints the shares of an iteration spent sampling the
rollouts (batched, KV-cached generation, ``llm.generate``), scoring them (the
forwards of the policy, the reference and the value model, and the reward),
and in the updates (the trainer's forward, backward and AdamW on the policy
and the value model), as the job measures them (``generate_share``,
``score_share``). Generation is sequential in the response length while every
other part is one batched forward (and backward) over it, so its share grows
with the length. The first iteration (warm-up) is not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def make_checkpoint(path, block: int):
    from llm.checkpoint import save_model
    from llm.model import GPT, get_preset
    from llm.post.chat import add_chat_tokens
    from llm.tokenizer import Tokenizer

    text = "What is two and two? It is four. The cat sat on the mat. Hello there, how are you? " * 50
    tok = Tokenizer.train(text, vocab_size=512)
    model = GPT(get_preset("tiny", vocab_size=tok.n_vocab, block_size=block), generator=np.random.default_rng(0))
    tok, _ = add_chat_tokens(tok, model)
    save_model(path, model, tok)


def constant(prompts, responses, records):
    """The same reward for every response: only the time matters here."""
    return [0.5] * len(responses)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[8, 32, 64])
    p.add_argument("--iterations", type=int, default=4, help="PPO iterations per length (the first not counted)")
    args = p.parse_args(argv)
    if args.iterations < 2:
        raise SystemExit("--iterations must be at least 2 (the first is a warm-up)")
    from llm.post.ppo import main as ppo_main
    from llm.post.rewards import CallableReward

    folder = Path(tempfile.mkdtemp(prefix="ppo-bench-"))
    ckpt = folder / "model.safetensors"
    make_checkpoint(ckpt, block=128)
    prompts = folder / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Question {k}: what is {k} and {k}?"}) + "\n" for k in range(64)))
    print(f"{'response length':>15} | {'iteration s':>11} | {'generate':>8} | {'score':>6} | {'update':>6}")
    print("-" * 60)
    for R in args.lengths:
        out = folder / f"R{R}"
        code = ppo_main(["--model", str(ckpt), "--prompts", str(prompts), "--out-dir", str(out), "--overwrite",
                         "--rollout-batch", "32", "--gen-batch", "32", "--batch-size", "16", "--ppo-epochs", "4",
                         "--response-length", str(R), "--max-steps", str(8 * args.iterations + 1),
                         "--log-interval", "8", "--eval-interval", "100000", "--eval-prompts", "1",
                         "--no-progress", "--val-fraction", "0.05"], reward=CallableReward(constant, "constant"))
        if code:
            raise SystemExit(f"ppo exited {code}")
        rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
        shares = [r for r in rows if "generate_share" in r][1:]  # one line per completed iteration; skip the first
        g, s, t = (float(np.mean([r[k] for r in shares])) for k in ("generate_share", "score_share", "iteration_s"))
        print(f"{R:>15} | {t:>11.2f} | {100 * g:>7.0f}% | {100 * s:>5.0f}% | {100 * (1 - g - s):>5.0f}%")
    if os.environ.get("KEEP") is None:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
