"""A generated task with a programmatic reward: sums of two small numbers, with held-out operand pairs.

    >>> train, heldout = ppo_prompts()            # [{"prompt": "What is 12 + 7?", "answer": "19"}, ...]
    >>> sft = sft_records()                        # conversations answering the training questions
    >>> prefs = preference_records()               # {"prompt", "chosen": right sum, "rejected": a near miss}

Every pair ``(a, b)`` with ``0 <= a, b <= max_operand`` is one problem; a
seeded fifth of them (``split``) is held out from every stage (SFT, the reward
model and PPO), so a held-out score measures answers to questions no stage saw.
The reward (``llm.post.rewards.arithmetic_reward``) is 1 when the reply is
exactly the sum, else 0: the correctness of a generated answer, the kind of
real, programmatic reward the roadmap's PPO stage optimises.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

#: operands run from 0 to this
MAX_OPERAND = 19
#: share of the problems held out from every stage
HELDOUT_FRACTION = 0.2


def question(a: int, b: int) -> str:
    """The prompt of the problem ``a + b``."""
    return f"What is {a} + {b}?"


def split(max_operand: int = MAX_OPERAND, heldout_fraction: float = HELDOUT_FRACTION, seed: int = 0):
    """``(training pairs, held-out pairs)``: every ``(a, b)``, a seeded ``heldout_fraction`` of them held out."""
    pairs = [(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1)]
    order = np.random.default_rng([seed, 1515]).permutation(len(pairs))
    n_held = int(round(len(pairs) * heldout_fraction))
    held = sorted(pairs[i] for i in order[:n_held])
    train = sorted(pairs[i] for i in order[n_held:])
    return train, held


def ppo_prompts(seed: int = 0, max_operand: int = MAX_OPERAND):
    """``(training, held-out)`` prompt records ``{"prompt", "answer"}`` (the split does not depend on ``seed``,
    which only orders the training records)."""
    train, held = split(max_operand)
    rec = [{"prompt": question(a, b), "answer": str(a + b)} for a, b in train]
    order = np.random.default_rng([seed, 3]).permutation(len(rec))
    return [rec[i] for i in order], [{"prompt": question(a, b), "answer": str(a + b)} for a, b in held]


def sft_records(max_operand: int = MAX_OPERAND) -> list:
    """SFT conversations ``{"messages": [user question, assistant sum]}`` for the training problems."""
    train, _ = split(max_operand)
    return [{"messages": [{"role": "user", "content": question(a, b)}, {"role": "assistant", "content": str(a + b)}]}
            for a, b in train]


def near_miss(total: int, rng) -> int:
    """A wrong answer close to ``total``: off by 1 to 3, never negative."""
    return total + int(rng.choice([d for d in (-3, -2, -1, 1, 2, 3) if total + d >= 0]))


def preference_records(seed: int = 0, max_operand: int = MAX_OPERAND, heldout: bool = False) -> list:
    """Preference pairs: the right sum chosen, a near miss rejected; for the training problems, or the held-out
    ones (to measure a reward model's held-out accuracy)."""
    train, held = split(max_operand)
    rng = np.random.default_rng([seed, 5 + int(heldout)])
    return [{"prompt": question(a, b), "chosen": str(a + b), "rejected": str(near_miss(a + b, rng))}
            for a, b in (held if heldout else train)]


def write_jsonl(path, records) -> Path:
    """Write ``records`` one JSON object per line; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


__all__ = ["MAX_OPERAND", "HELDOUT_FRACTION", "question", "split", "ppo_prompts", "sft_records",
           "near_miss", "preference_records", "write_jsonl"]
