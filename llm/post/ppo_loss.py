"""PPO's two losses on a minibatch of rollout tokens, as autograd Tensors: the clipped policy objective and the
clipped value loss (Schulman et al. 2017; TRL's PPO trainer).

Per real response token t (``mask`` True), with ``ratio = exp(logp_new - logp_old)``
and the whitened advantage A::

    policy:  max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))
    value:   0.5 * max((v - R)^2, (v_old + clip(v - v_old, -c, c) - R)^2)

Both return the *sum* over the real tokens (the trainer divides by the real
tokens of the whole global batch, so the mean is over every token of the
step, however they fall between micro-batches and ranks; TRL averages each
micro-batch first) and a dict of statistics summed the same way (plain
floats: clipped tokens, ratio, approximate KL, squared value error), for
logging.

Why the clipped policy term gives no gradient: where the ratio has left
``[1 - eps, 1 + eps]`` in the direction the advantage rewards (ratio > 1 + eps
with A > 0, ratio < 1 - eps with A < 0), the max picks the clipped term,
whose derivative in the ratio is 0; in the other direction the unclipped term
is the larger (pessimistic) one and its gradient flows.
"""

from __future__ import annotations

import numpy as np

import autograd
from autograd import backend
from autograd.tensor import Tensor


def _host(x):
    if isinstance(x, Tensor):
        x = x.data
    return np.asarray(backend.to_device(x, "cpu"))


def _on(array, like: Tensor):
    """``array`` as a constant of ``like``'s dtype and device."""
    return backend.to_device(np.asarray(array, dtype=like.dtype), like.device)


def token_logprobs(logits: Tensor, tokens, mask, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / temperature)[token] at each position: (B, R) from logits (B, R, V) and tokens (B, R).

    Positions where ``mask`` is False get 0 (they are left out of the
    softmax's work entirely). The temperature is the one the tokens were
    sampled at, so these are the log-probabilities of the sampling
    distribution (TRL divides the logits the same way).
    """
    B, R, V = logits.shape
    tokens = np.where(_host(mask), _host(tokens), -100).astype(np.int64)
    if temperature != 1.0:
        logits = logits * (1.0 / float(temperature))
    nll = autograd.cross_entropy(logits.reshape(B * R, V),  # (B*R, V)
                                 backend.to_device(tokens.reshape(B * R), logits.device),  # (B*R,)
                                 ignore_index=-100, reduction="none")
    return -nll.reshape(B, R)  # (B, R)


def entropy(logits, mask, temperature: float = 1.0) -> float:
    """The summed entropy (nats) of softmax(logits / temperature) over the positions where ``mask`` is True."""
    x = _host(logits).astype(np.float64) / float(temperature)  # (B, R, V)
    m = _host(mask).astype(bool)
    x = x[m]  # (n, V)
    if x.size == 0:
        return 0.0
    x -= x.max(axis=-1, keepdims=True)
    logz = np.log(np.exp(x).sum(axis=-1))
    p = np.exp(x - logz[:, None])
    return float((logz - (p * x).sum(axis=-1)).sum())


def policy_loss(new_logprobs: Tensor, old_logprobs, advantages, mask, clip_range: float):
    """``(summed clipped surrogate loss, stats)`` over the real tokens (see the module docstring).

    ``new_logprobs`` (B, R) Tensor; ``old_logprobs``, ``advantages``, ``mask``
    (B, R) arrays. stats: ``tokens``, ``clipped`` (tokens where the clipped
    term was strictly larger: TRL's clip fraction), ``ratio`` (the summed
    ratios), ``approx_kl`` (summed ``0.5 * (logp_new - logp_old)^2``).
    """
    if not clip_range > 0:
        raise ValueError(f"the policy clip range must be > 0, got {clip_range}")
    maskf = _on(_host(mask), new_logprobs)
    old = _on(np.where(_host(mask), _host(old_logprobs), 0.0), new_logprobs)
    adv = _on(np.where(_host(mask), _host(advantages), 0.0), new_logprobs)
    diff = new_logprobs - old
    ratio = autograd.exp(diff)
    unclipped = -adv * ratio
    clipped = -adv * autograd.clip(ratio, 1.0 - clip_range, 1.0 + clip_range)
    total = (autograd.maximum(unclipped, clipped) * maskf).sum()
    m = _host(mask).astype(bool)
    d = _host(diff)
    stats = {"tokens": float(m.sum()),
             "clipped": float(((_host(clipped) > _host(unclipped)) & m).sum()),
             "ratio": float(_host(ratio)[m].sum()),
             "approx_kl": float((0.5 * d[m].astype(np.float64) ** 2).sum())}
    return total, stats


def value_loss(values: Tensor, old_values, returns, mask, clip_range: float | None):
    """``(summed clipped value loss, stats)`` over the real tokens (see the module docstring).

    ``values`` (B, R) Tensor: the value model's predictions now;
    ``old_values`` those at the rollout, ``returns`` GAE's targets.
    ``clip_range`` None: the plain ``0.5 * (v - R)^2``. stats: ``tokens``,
    ``clipped`` (tokens where the clipped loss was strictly larger), ``sq_error``
    (summed ``(v - R)^2`` of the unclipped prediction).
    """
    maskf = _on(_host(mask), values)
    ret = _on(np.where(_host(mask), _host(returns), 0.0), values)
    plain = (values - ret) * (values - ret)
    if clip_range is None:
        worst = plain
        clipped_count = 0.0
    else:
        if not clip_range > 0:
            raise ValueError(f"the value clip range must be > 0 (or None for no clipping), got {clip_range}")
        old = _on(np.where(_host(mask), _host(old_values), 0.0), values)
        moved = old + autograd.clip(values - old, -clip_range, clip_range)
        clipped = (moved - ret) * (moved - ret)
        worst = autograd.maximum(plain, clipped)
        clipped_count = float(((_host(clipped) > _host(plain)) & _host(mask).astype(bool)).sum())
    total = (worst * maskf).sum() * 0.5
    m = _host(mask).astype(bool)
    stats = {"tokens": float(m.sum()), "clipped": clipped_count,
             "sq_error": float(_host(plain)[m].astype(np.float64).sum())}
    return total, stats


__all__ = ["token_logprobs", "entropy", "policy_loss", "value_loss"]
