"""PPO's rollouts: responses sampled with the KV cache, truncated after the end token, laid out for scoring.

    >>> resp = sample_responses(policy, prompt_ids, length=32, temperature=0.7, eos_id=end, pad_id=pad, generator=g)
    >>> batch = pack(prompt_ids, resp, prompt_width=P, pad_id=pad)
    >>> logp = response_logprobs(policy, batch, temperature=0.7)       # (B, R), no graph
    >>> values = response_values(value_model, batch)                    # (B, R)

Sampling is ``llm.generate.generate`` (batched, KV-cached, ragged prompts
left-padded and masked), at the temperature given and nothing else (no top-k,
no top-p: PPO's ratios need the log-probabilities of the distribution the
tokens were drawn from, the temperature-scaled softmax). A row that writes the
end token stops there: everything after its first end token becomes padding
(TRL's ``truncate_response``), and the end token itself is a real token of the
response. A row that reaches ``length`` tokens without it is cut there
(``ended`` False; PPO's ``missing_eos_penalty`` applies), so generation never
runs past ``length`` tokens.

The layout every forward of PPO uses (rollout scoring and the update alike)::

    ids   (B, P + R)   [pad .. pad, prompt] [response, pad .. pad]
    real  (B, P + R)   False on padding, True on prompt and response tokens
    positions          count the real tokens from 0 (padding repeats a neighbour's)
    attention          key padding: no token attends to a pad

so the logits at ``P - 1 .. P + R - 2`` predict the response tokens ``0 .. R - 1``
and the value model's outputs there are the values of the states before them.
Prompts are left-padded to ``P`` (the widest prompt of the data set, fixed so
that every batch has one shape) and responses right-padded to ``R``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from autograd import backend
from autograd.engine import no_grad

from .ppo_loss import token_logprobs


@dataclass
class Responses:
    """Sampled responses: ``tokens`` (B, R) (pad after the end), ``mask`` (B, R) True on real response tokens
    (the end token included), ``ended`` (B,) whether each row wrote the end token."""

    tokens: np.ndarray
    mask: np.ndarray
    ended: np.ndarray


@dataclass
class PackedBatch:
    """Prompts and responses in PPO's layout (module docstring): ``ids``, ``real`` (B, P + R), ``response``,
    ``mask`` (B, R), ``prompt_width`` P."""

    ids: np.ndarray
    real: np.ndarray
    response: np.ndarray
    mask: np.ndarray
    prompt_width: int


def truncate_after_eos(tokens, eos_id: int, pad_id: int, length: int) -> Responses:
    """Cut each row after its first ``eos_id`` (kept) and pad to ``length``; ``ended`` rows wrote ``eos_id``."""
    tokens = np.asarray(tokens, dtype=np.int64)
    B, n = tokens.shape
    if n > length:
        raise ValueError(f"truncate_after_eos: {n} tokens per row, more than the response length {length}")
    out = np.full((B, length), int(pad_id), dtype=np.int64)
    out[:, :n] = tokens
    is_eos = out == eos_id
    is_eos[:, n:] = False
    ended = is_eos.any(axis=1)
    first = np.where(ended, np.argmax(is_eos, axis=1), n - 1)  # the last real token of each row
    mask = np.arange(length)[None, :] <= first[:, None]
    if n == 0:
        mask[:] = False
    out[~mask] = pad_id
    return Responses(out, mask, ended)


def sample_responses(policy, prompts: list, length: int, temperature: float, eos_id: int, pad_id: int,
                     generator) -> Responses:
    """Sample a response of at most ``length`` tokens to each prompt (lists of ids) at ``temperature``."""
    from ..generate import generate

    if not temperature > 0:
        raise ValueError(f"PPO samples at a temperature > 0 (its ratios need a sampling distribution), got "
                         f"{temperature}")
    new = generate(policy, [list(p) for p in prompts], length, temperature=float(temperature), eos_id=eos_id,
                   generator=generator)
    return truncate_after_eos(new, eos_id, pad_id, length)


def pack(prompts: list, responses: Responses, prompt_width: int, pad_id: int) -> PackedBatch:
    """Prompts left-padded to ``prompt_width`` followed by the responses (module docstring)."""
    B, R = responses.tokens.shape
    if len(prompts) != B:
        raise ValueError(f"pack: {len(prompts)} prompts for {B} responses")
    ids = np.full((B, prompt_width + R), int(pad_id), dtype=np.int64)
    real = np.zeros((B, prompt_width + R), dtype=bool)
    for b, p in enumerate(prompts):
        if not 0 < len(p) <= prompt_width:
            raise ValueError(f"pack: prompt {b} has {len(p)} tokens; it must have 1 .. {prompt_width}")
        ids[b, prompt_width - len(p):prompt_width] = p
        real[b, prompt_width - len(p):prompt_width] = True
    ids[:, prompt_width:] = responses.tokens
    real[:, prompt_width:] = responses.mask
    return PackedBatch(ids, real, responses.tokens, responses.mask, int(prompt_width))


def model_kwargs(real) -> dict:
    """``position_ids`` and ``attention_mask`` of PPO's layout for ``real`` (B, S): positions count the real
    tokens from 0 (a pad takes the previous real token's), and no query attends a pad key."""
    real = np.asarray(backend.to_device(real, "cpu"), dtype=bool)
    positions = np.maximum(np.cumsum(real, axis=1) - 1, 0)  # (B, S)
    return {"position_ids": positions, "attention_mask": real[:, None, None, :]}  # mask (B, 1, 1, S)


def response_slice(output, prompt_width: int, length: int):
    """The positions of an output (B, P + R, ...) that predict the response tokens: ``P - 1 .. P + R - 2``."""
    return output[:, prompt_width - 1:prompt_width - 1 + length]


def _eval_forward(model, batch: PackedBatch):
    was = model.training
    model.eval()
    try:
        with no_grad():
            out = model(batch.ids, **model_kwargs(batch.real))
    finally:
        model.train(was)
    return out[0] if isinstance(out, tuple) else out


def response_logprobs(model, batch: PackedBatch, temperature: float) -> np.ndarray:
    """The log-probabilities (B, R) float32 of the response tokens under ``model`` (a GPT) at ``temperature``
    (0 on padding); forward only, in eval mode."""
    logits = response_slice(_eval_forward(model, batch), batch.prompt_width, batch.response.shape[1])
    lp = token_logprobs(logits, batch.response, batch.mask, temperature)
    return np.asarray(backend.to_device(lp.data, "cpu"), dtype=np.float32)


def response_values(model, batch: PackedBatch) -> np.ndarray:
    """The value model's (a ``RewardModel``'s) values (B, R) float32 of the states before each response token
    (0 on padding); forward only, in eval mode."""
    out = response_slice(_eval_forward(model, batch), batch.prompt_width, batch.response.shape[1])
    values = np.asarray(backend.to_device(out.data[..., 0], "cpu"), dtype=np.float32)  # (B, R)
    return np.where(batch.mask, values, 0.0).astype(np.float32)


__all__ = ["Responses", "PackedBatch", "truncate_after_eos", "sample_responses", "pack", "model_kwargs",
           "response_slice", "response_logprobs", "response_values"]
