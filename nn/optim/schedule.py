"""Learning-rate schedules: pure functions of the step number.

Set the rate before each optimizer step::

    lr = cosine_with_warmup(step, max_lr, warmup_steps, total_steps, min_lr)
    optimizer.set_lr(lr)
"""

from __future__ import annotations

import math


def cosine_with_warmup(step: int, max_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """nanoGPT's schedule: linear warm-up, cosine decay to ``min_lr`` at ``total_steps``, then ``min_lr``.

    - ``step < warmup_steps``: ``max_lr * (step + 1) / warmup_steps`` (from max_lr/warmup_steps at step 0
      up to max_lr at the last warm-up step; never exactly 0, which would waste a step);
    - ``warmup_steps <= step <= total_steps``: with ``r = (step - warmup_steps) / (total_steps - warmup_steps)``,
      ``min_lr + 0.5 * (1 + cos(pi * r)) * (max_lr - min_lr)`` (max_lr at r = 0, min_lr at r = 1);
    - ``step > total_steps``: ``min_lr``.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if warmup_steps < 0 or total_steps < warmup_steps:
        raise ValueError(f"need 0 <= warmup_steps <= total_steps, got warmup_steps={warmup_steps}, "
                         f"total_steps={total_steps}")
    if min_lr > max_lr:
        raise ValueError(f"min_lr ({min_lr}) must not exceed max_lr ({max_lr})")
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step > total_steps or total_steps == warmup_steps:
        return min_lr
    ratio = (step - warmup_steps) / (total_steps - warmup_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))  # 1 -> 0
    return min_lr + coeff * (max_lr - min_lr)


def constant(step: int, lr: float) -> float:
    """The same ``lr`` at every step."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return lr
