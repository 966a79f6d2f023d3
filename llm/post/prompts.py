"""Prompt sets for PPO and for scoring policies: reading, rendering, and what a policy's responses to them earn.

    >>> prompts = render_prompts(read_prompt_records("heldout.jsonl"), tokenizer, max_tokens=48)
    >>> score_responses(policy, prompts, reward, tokenizer, length=16, sampled=False)   # greedy
    {'score': 0.41, 'score_stderr': 0.05, 'ended': 0.98, 'n': 80}
    >>> score_responses(policy, prompts, reward, tokenizer, length=16, sampled=True, ref=sft_model)
    {..., 'kl': 1.7}                    # KL(policy || ref) per response, from the sampled responses (k1)

A prompt record is a JSON object with a ``prompt`` (text, or chat messages
ending with a user turn) and whatever fields its reward reads (``answer``,
``tests``, ...). It is rendered as a generation prompt in the chat format
(``chat.render(..., add_generation_prompt=True)``); a prompt longer than
``max_tokens`` loses tokens on the left. ``score_responses`` generates with the
KV cache (greedy, or sampled at a temperature from seeded streams, one per
chunk of ``gen_batch`` prompts), cuts each response after its first end token
and hands the batch to the reward (``llm.post.rewards``). Under MPI (``comm``)
each rank takes its share of the prompts and the sums are combined.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..trainer import SetupError
from . import rollout as ro
from .rewards import Completions, RewardError


def read_prompt_records(path) -> list:
    """Prompt records from a JSONL file: objects with a ``prompt`` (text or chat messages) and any other fields."""
    from .data import DataError, read_jsonl
    from .rankings import record_prompt

    try:
        records = read_jsonl(path)
        for where, rec in records:
            if not isinstance(rec, dict):
                raise DataError(f"{where}: a prompt record is a JSON object with a \"prompt\" field")
            record_prompt(rec, where)
    except DataError as e:
        raise SetupError(f"--prompts: {e}") from None
    return [rec for _, rec in records]


@dataclass
class PromptSet:
    """Prompt records and their rendered ids (chat format, generation prompt, cut from the left to fit)."""

    records: list
    ids: list
    truncated: int

    def __len__(self) -> int:
        return len(self.records)

    @property
    def width(self) -> int:
        """The longest rendered prompt."""
        return max(len(p) for p in self.ids)


def render_prompts(records: list, tokenizer, max_tokens: int, template: str = "chat") -> PromptSet:
    """Render each record's prompt as a generation prompt (``chat.render(..., add_generation_prompt=True)``)."""
    from . import chat
    from .rankings import record_prompt

    ids, cut = [], 0
    for rec in records:
        r = chat.render(tokenizer, record_prompt(rec), template, add_generation_prompt=True).ids
        if len(r) > max_tokens:
            r, cut = r[len(r) - max_tokens:], cut + 1
        ids.append(r)
    return PromptSet(records, ids, cut)


def completions(tokenizer, prompts: PromptSet, idx, resp: ro.Responses, template: str = "chat") -> Completions:
    """The ``Completions`` a reward gets for the responses ``resp`` to the prompts ``idx`` of ``prompts``."""
    from .chat import parse_reply

    response_ids = [resp.tokens[b][resp.mask[b]].tolist() for b in range(len(idx))]
    texts = [parse_reply(tokenizer, r, template).text for r in response_ids]
    recs = [prompts.records[i] for i in idx]
    return Completions([r["prompt"] for r in recs], texts, recs, [prompts.ids[i] for i in idx], response_ids,
                       resp.ended)


def score_responses(policy, prompts: PromptSet, reward, tokenizer, *, length: int, sampled: bool,
                    temperature: float = 0.7, ref=None, template: str = "chat", gen_batch: int = 16, seed: int = 0,
                    comm=None) -> dict:
    """The mean reward of ``policy``'s responses to ``prompts`` (greedy, or ``sampled`` at ``temperature``).

    Returns ``{"score", "score_stderr", "ended", "n"}`` (``ended``: the share of
    responses that wrote the end token) and, sampled with a ``ref`` model,
    ``"kl"``: the mean over prompts of the summed ``log p - log p_ref`` of the
    sampled tokens (at ``temperature``), an unbiased estimate of KL(policy ||
    ref) per response. A collective call under ``comm``.
    """
    from ..generate import generate
    from .chat import chat_tokens

    tok = chat_tokens(tokenizer)
    n = len(prompts)
    world, rank = (comm.size, comm.rank) if comm is not None else (1, 0)
    mine = np.array_split(np.arange(n), world)[rank]
    P = prompts.width
    scores, kls, ended, errors = [], [], [], []
    for c in range(0, len(mine), gen_batch):
        idx = mine[c:c + gen_batch]
        ids = [list(prompts.ids[i]) for i in idx]
        if sampled:
            gen = np.random.default_rng([seed, 1_000_003, int(idx[0])])
            resp = ro.sample_responses(policy, ids, length, temperature, tok.eos, tok.pad, gen)
        else:
            resp = ro.truncate_after_eos(generate(policy, ids, length, greedy=True, eos_id=tok.eos), tok.eos, tok.pad,
                                         length)
        try:
            scores.append(reward(completions(tokenizer, prompts, idx, resp, template)))
        except RewardError as e:
            errors.append(str(e))
            scores.append(np.zeros(len(idx)))
        ended.append(resp.ended)
        if sampled and ref is not None:
            batch = ro.pack(ids, resp, P, tok.pad)
            logp = ro.response_logprobs(policy, batch, temperature)
            ref_lp = ro.response_logprobs(ref, batch, temperature)
            kls.append(((logp.astype(np.float64) - ref_lp) * batch.mask).sum(axis=1))
    s = np.concatenate(scores) if scores else np.zeros(0)
    local = (float(s.sum()), float((s * s).sum()), float(np.concatenate(kls).sum()) if kls else 0.0,
             float(np.concatenate(ended).sum()) if ended else 0.0, errors)
    if comm is not None and comm.size > 1:
        gathered = comm.allgather(local)
        local = tuple(sum(g[k] for g in gathered) for k in range(4)) + ([e for g in gathered for e in g[4]],)
    if local[4]:
        raise RewardError(local[4][0])
    mean = local[0] / n
    var = max(local[1] / n - mean * mean, 0.0)
    out = {"score": mean, "score_stderr": math.sqrt(var / max(n - 1, 1)), "ended": local[3] / n, "n": n}
    if sampled and ref is not None:
        out["kl"] = local[2] / n
    return out


__all__ = ["read_prompt_records", "PromptSet", "render_prompts", "completions", "score_responses"]
