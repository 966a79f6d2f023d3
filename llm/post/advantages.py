"""What a PPO rollout's numbers become: KL estimates, rewards, GAE advantages and returns, whitening, the KL coefficient.

Everything here works on plain NumPy arrays of one rollout batch, shaped
``(B, R)``: B responses of R token slots, with ``mask`` (B, R) True on the
tokens a response really has (up to and including its end token; False on
the padding after it). No gradient flows through any of it: these are the
targets the PPO losses (``llm.post.ppo_loss``) are trained towards.

The semantics are TRL's PPO trainer's (``trl/trainer/ppo_trainer.py``, after
OpenAI's lm-human-preferences), differences noted where they occur::

    logr  = ref_logprobs - logprobs                      # per token, on the sampled tokens
    kl    = -logr                  (k1)  or  (exp(logr) - 1) - logr   (k3)
    reward[t] = -kl_coef * kl[t]   on every response token,
    reward[last] += score          the sequence's score at its last real token
    advantages, returns = gae(reward, values, mask, gamma, lam)
    advantages = masked_whiten(advantages, mask)          # mean 0, variance 1 over the real tokens

``k1`` and ``k3`` are Schulman's estimators of KL(pi || pi_ref) from samples
of pi (http://joschu.net/blog/kl-approx.html): both are unbiased; ``k1`` can be
negative on a single token, ``k3`` never is.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

#: the KL estimators ``kl_estimate`` knows
KL_ESTIMATORS = ("k1", "k3")


def _as_mask(mask, shape, what: str) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.shape != tuple(shape):
        raise ValueError(f"{what}: the mask has shape {mask.shape}, the values {tuple(shape)}; they must match")
    return mask.astype(bool)


def masked_mean(values, mask) -> float:
    """The mean of ``values`` where ``mask`` is True (float64); ValueError when the mask selects nothing."""
    values = np.asarray(values, dtype=np.float64)
    mask = _as_mask(mask, values.shape, "masked_mean")
    n = int(mask.sum())
    if n == 0:
        raise ValueError("masked_mean: the mask selects no value (every response empty?)")
    return float(values[mask].sum() / n)


def masked_var(values, mask, unbiased: bool = True) -> float:
    """The variance of ``values`` where ``mask`` is True; ``unbiased``: Bessel's n / (n - 1), as TRL.

    ValueError when fewer than two values are selected (an unbiased variance needs two).
    """
    values = np.asarray(values, dtype=np.float64)
    mask = _as_mask(mask, values.shape, "masked_var")
    n = int(mask.sum())
    if n < (2 if unbiased else 1):
        raise ValueError(f"masked_var: the mask selects {n} value(s); a variance needs at least 2: use more "
                         "responses per rollout batch (or longer ones)")
    x = values[mask]
    var = float(((x - x.mean()) ** 2).sum() / n)
    return var * n / (n - 1) if unbiased else var


def masked_whiten(values, mask, shift_mean: bool = True, eps: float = 1e-8) -> np.ndarray:
    """``(values - mean) / sqrt(var + eps)`` with the mean and (unbiased) variance over the True entries of ``mask``.

    ``shift_mean=False`` adds the mean back (only the scale changes: TRL's
    reward whitening). Entries outside the mask are set to 0. Returns float32
    of ``values``' shape.
    """
    values = np.asarray(values, dtype=np.float64)
    mask = _as_mask(mask, values.shape, "masked_whiten")
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    out = (values - mean) / math.sqrt(var + eps)
    if not shift_mean:
        out += mean
    return np.where(mask, out, 0.0).astype(np.float32)


def kl_estimate(logprobs, ref_logprobs, estimator: str = "k1") -> np.ndarray:
    """Per-token estimates of KL(pi || pi_ref) from tokens sampled from pi: ``k1`` = log pi - log pi_ref,
    ``k3`` = (r - 1) - log r with r = pi_ref / pi (non-negative). float64 of the inputs' shape."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}: use one of {KL_ESTIMATORS}")
    logp = np.asarray(logprobs, dtype=np.float64)
    ref = np.asarray(ref_logprobs, dtype=np.float64)
    if logp.shape != ref.shape:
        raise ValueError(f"kl_estimate: log-probs of shape {logp.shape} and reference log-probs of shape "
                         f"{ref.shape} must match")
    logr = ref - logp
    if estimator == "k1":
        return -logr
    return np.expm1(logr) - logr  # expm1: exact near r = 1, where the two terms nearly cancel


def last_token_index(mask) -> np.ndarray:
    """For each row of a right-padded boolean ``mask`` (B, R), the index of its last True entry; -1 for an empty row."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"last_token_index: needs a (B, R) mask, got shape {mask.shape}")
    R = mask.shape[1]
    last = R - 1 - np.argmax(mask[:, ::-1], axis=1)
    return np.where(mask.any(axis=1), last, -1)


def kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, kl_coef: float, estimator: str = "k1"):
    """``(rewards, kl)``, both (B, R) float64: ``-kl_coef * kl`` on every real token and each row's score added at
    its last real token; 0 on padding.

    TRL adds the score one slot after the last token when there is room (its
    ``sequence_lengths + 1``); here it goes on the last real token itself, the
    end of the episode GAE sees, as in lm-human-preferences. A row with no real
    token is an error.
    """
    scores = np.asarray(scores, dtype=np.float64)
    mask = _as_mask(mask, np.shape(logprobs), "kl_penalized_rewards")
    if scores.shape != (mask.shape[0],):
        raise ValueError(f"kl_penalized_rewards: {scores.shape} scores for {mask.shape[0]} responses; one score each")
    last = last_token_index(mask)
    if (last < 0).any():
        raise ValueError(f"kl_penalized_rewards: response(s) {np.flatnonzero(last < 0).tolist()} have no token")
    kl = np.where(mask, kl_estimate(logprobs, ref_logprobs, estimator), 0.0)
    rewards = -float(kl_coef) * kl
    rewards[np.arange(mask.shape[0]), last] += scores
    return rewards, kl


def gae(rewards, values, mask, gamma: float = 1.0, lam: float = 0.95):
    """Generalised advantage estimation (Schulman et al. 2016) over each row: ``(advantages, returns)`` (B, R) float64.

    With V = 0 after a row's last real token (the episode ends there) and
    rewards and values 0 on padding::

        delta[t] = r[t] + gamma * V[t + 1] - V[t]
        A[t]     = delta[t] + gamma * lam * A[t + 1]        (A = 0 past the end)
        returns  = A + V

    Padding positions get advantage and return 0.
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    mask = _as_mask(mask, rewards.shape, "gae")
    values = np.asarray(values, dtype=np.float64)
    if values.shape != rewards.shape:
        raise ValueError(f"gae: values of shape {values.shape} must match rewards of shape {rewards.shape}")
    for name, v in (("gamma", gamma), ("lam", lam)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0.0 <= v <= 1.0:
            raise ValueError(f"gae: {name} must be in [0, 1], got {v!r}")
    r = np.where(mask, rewards, 0.0)
    v = np.where(mask, values, 0.0)
    B, R = r.shape
    adv = np.zeros((B, R))
    running = np.zeros(B)
    for t in range(R - 1, -1, -1):
        next_v = v[:, t + 1] if t + 1 < R else 0.0
        delta = r[:, t] + gamma * next_v - v[:, t]
        running = delta + gamma * lam * running
        adv[:, t] = running
    adv = np.where(mask, adv, 0.0)
    return adv, np.where(mask, adv + v, 0.0)


class FixedKLController:
    """A constant KL coefficient ``value`` (TRL's default)."""

    def __init__(self, value: float):
        self.value = _check_coef(value)

    def update(self, current_kl: float, n_steps: int):
        """Nothing changes."""

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict):
        self.value = float(state["value"])


class AdaptiveKLController:
    """The KL coefficient adapted towards a target KL (Ziegler et al. 2019, TRL's ``AdaptiveKLController``).

    After a rollout batch of ``n_steps`` responses whose mean KL (summed over
    each response's tokens) was ``current_kl``::

        error = clip(current_kl / target - 1, -0.2, 0.2)
        value *= 1 + error * n_steps / horizon

    A KL above the target raises the coefficient (a stronger pull back to the
    reference), a KL below it lowers it; by at most 20% per ``horizon`` responses.
    """

    def __init__(self, value: float, target: float, horizon: float):
        self.value = _check_coef(value)
        if not target > 0 or not math.isfinite(target):
            raise ValueError(f"the adaptive KL controller's target KL must be > 0, got {target}")
        if not horizon > 0 or not math.isfinite(horizon):
            raise ValueError(f"the adaptive KL controller's horizon must be > 0, got {horizon}")
        self.target, self.horizon = float(target), float(horizon)

    def update(self, current_kl: float, n_steps: int):
        """Move the coefficient after a batch of ``n_steps`` responses with mean KL ``current_kl``."""
        error = float(np.clip(current_kl / self.target - 1.0, -0.2, 0.2))
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict):
        self.value = float(state["value"])


def _check_coef(value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0 or not math.isfinite(value):
        raise ValueError(f"the KL coefficient must be a finite number >= 0, got {value!r}")
    return float(value)


__all__ = ["KL_ESTIMATORS", "masked_mean", "masked_var", "masked_whiten", "kl_estimate", "last_token_index",
           "kl_penalized_rewards", "gae", "FixedKLController", "AdaptiveKLController"]
