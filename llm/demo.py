"""`python -m llm demo`: a character-level language model trained with the engine, end to end.

A Bengio-style MLP language model (as in Karpathy's makemore): the previous
``context`` characters are embedded, concatenated, passed through one tanh
hidden layer, and a linear head predicts the next character. It trains in well
under a minute on a CPU and shows the loss fall from the uniform baseline
ln(vocab) past the unigram entropy, then samples some text.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
from tqdm import tqdm

import autograd as ag
import nn
from autograd import Tensor


class CharMLP(nn.Module):
    """Embed ``context`` characters, one tanh hidden layer, logits over the vocabulary."""

    def __init__(self, vocab_size: int, context: int, n_embd: int, n_hidden: int, generator):
        super().__init__()
        self.context = context
        self.wte = nn.Embedding(vocab_size, n_embd, generator=generator)
        self.hidden = nn.Linear(context * n_embd, n_hidden, generator=generator)
        self.head = nn.Linear(n_hidden, vocab_size, generator=generator)

    def forward(self, ids):
        B = ids.shape[0]
        x = self.wte(ids).reshape(B, -1)  # (B, context * n_embd)
        return self.head(self.hidden(x).tanh())  # (B, vocab)


def windows(data: np.ndarray, context: int, rows: np.ndarray):
    """Inputs (len(rows), context) and next-character targets (len(rows),) starting at ``rows``."""
    idx = rows[:, None] + np.arange(context)  # (B, context)
    return data[idx], data[rows + context]


def estimate_loss(model, data, context, batch, rng, batches=8) -> float:
    """Mean cross-entropy over a few random batches, without building a graph."""
    losses = []
    with ag.no_grad():
        for _ in range(batches):
            rows = rng.integers(0, len(data) - context - 1, batch)
            x, y = windows(data, context, rows)
            losses.append(ag.cross_entropy(model(x), y).item())
    return float(np.mean(losses))


def sample(model, itos, start_ids, n_chars, rng, temperature=0.8) -> str:
    """Generate ``n_chars`` characters after ``start_ids`` by sampling the softmax."""
    ids = list(start_ids)
    with ag.no_grad():
        for _ in range(n_chars):
            logits = model(np.array([ids[-model.context:]]))
            p = ag.softmax(logits / temperature, axis=-1).numpy()[0].astype(np.float64)
            ids.append(int(rng.choice(len(p), p=p / p.sum())))
    return "".join(itos[i] for i in ids[len(start_ids):])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llm demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000, help="optimizer steps (default 3000)")
    parser.add_argument("--batch-size", type=int, default=128, help="windows per step (default 128)")
    parser.add_argument("--context", type=int, default=8, help="characters the model sees (default 8)")
    parser.add_argument("--n-embd", type=int, default=24, help="embedding width per character (default 24)")
    parser.add_argument("--n-hidden", type=int, default=256, help="hidden layer width (default 256)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate (default 3e-3)")
    parser.add_argument("--max-bytes", type=int, default=2_000_000, help="characters of the corpus to use (default 2e6)")
    parser.add_argument("--seed", type=int, default=0, help="seed for initialisation and batches (default 0)")
    args = parser.parse_args(argv)

    from llm.corpus import default_corpus

    corpus = default_corpus(max_bytes=args.max_bytes)
    text = corpus.text
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = np.fromiter((stoi[c] for c in text), dtype=np.int64, count=len(text))
    split = int(0.9 * len(data))
    train, val = data[:split], data[split:]
    counts = np.bincount(train, minlength=len(chars)) / len(train)
    unigram = float(-(counts[counts > 0] * np.log(counts[counts > 0])).sum())
    print(f"corpus: {corpus.name}, {len(text):,} characters, vocabulary {len(chars)}")
    print(f"baselines: uniform ln(V) = {math.log(len(chars)):.3f} nats, unigram entropy = {unigram:.3f} nats")

    rng = np.random.default_rng(args.seed)
    model = CharMLP(len(chars), args.context, args.n_embd, args.n_hidden, generator=rng)
    opt = nn.optim.AdamW(nn.optim.param_groups_for_gpt(model, weight_decay=0.01), lr=args.lr)
    print(f"model: {model.num_parameters():,} parameters")

    start = time.perf_counter()
    bar = tqdm(range(args.steps), desc="training", unit="step", mininterval=0.5)
    for step in bar:
        opt.set_lr(nn.optim.cosine_with_warmup(step, args.lr, args.steps // 20, args.steps, args.lr / 10))
        x, y = windows(train, args.context, rng.integers(0, len(train) - args.context - 1, args.batch_size))
        loss = ag.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
            tqdm.write(f"step {step:5d}  train loss {loss.item():.3f}  "
                       f"val loss {estimate_loss(model, val, args.context, 512, rng):.3f}")
    bar.close()
    val_loss = estimate_loss(model, val, args.context, 512, rng, batches=32)
    print(f"done in {time.perf_counter() - start:.1f} s: validation loss {val_loss:.3f} nats "
          f"(unigram baseline {unigram:.3f}, uniform {math.log(len(chars)):.3f})")
    start_ids = [stoi[c] for c in text[:args.context]]
    print("\nsample:\n" + text[:args.context] + sample(model, chars, start_ids, 300, rng))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
