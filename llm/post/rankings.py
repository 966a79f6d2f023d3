"""Preference data for the reward model: pairs and K-way rankings, their arrays, and a shuffling sampler.

Records (one JSON object per line):

    {"prompt": ..., "chosen": "...", "rejected": "...", "margin": 1.5}    a pair ("margin" optional)
    {"prompt": ..., "responses": ["best", "middle", "worst"]}             a ranking, best first
    {"prompt": ..., "responses": [...], "scores": [2, 0, 1]}              a ranking by score (higher better;
                                                                          equal scores make no pair)

``prompt`` is text or a conversation (a list of ``{"role", "content"}``
messages); the job's ``encode(prompt, response)`` renders it (the chat
format). A ranking of K responses gives every ordered pair of them
(K (K - 1) / 2 pairs when there are no ties) and stays one batch element, so
its K responses are scored by one forward and its pairs are never split
between micro-batches or ranks.

Arrays (``PreferenceArrays``): ``input_ids`` (N, K, T) right-padded with
``pad_id``; ``keep`` (N, K, T) True on real tokens; ``better`` (N, K, K)
``better[n, i, j]`` = response i preferred to response j; ``margin`` (N, K,
K). K and T are the largest of the data set, so every batch has one shape.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class PreferenceDataError(ValueError):
    """A preference record is malformed; the message names the record and the fix."""


@dataclass
class Ranking:
    """One prompt's responses and its preferred pairs ``(i, j, margin)``: response i beats response j."""

    prompt: object
    responses: list
    pairs: list


def _text(value, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise PreferenceDataError(f"{where}: {field!r} must be a string, got {type(value).__name__}")
    return value


def _prompt(record, where: str):
    if "prompt" not in record:
        raise PreferenceDataError(f"{where}: missing field 'prompt' (records need 'prompt' and either 'chosen' + "
                                  f"'rejected' or 'responses'; got fields {sorted(record)})")
    prompt = record["prompt"]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                        and isinstance(m.get("role"), str) for m in prompt):
        return prompt
    raise PreferenceDataError(f"{where}: 'prompt' must be text or a list of {{'role', 'content'}} messages")


def ranking_from_record(record, where: str = "record") -> Ranking:
    """The ``Ranking`` of one record (see the module docstring); ``PreferenceDataError`` naming ``where`` otherwise."""
    if not isinstance(record, dict):
        raise PreferenceDataError(f"{where}: a preference record is a JSON object, got {type(record).__name__}")
    prompt = _prompt(record, where)
    if "responses" in record:
        responses = record["responses"]
        if not isinstance(responses, list) or len(responses) < 2:
            raise PreferenceDataError(f"{where}: 'responses' must be a list of at least 2 responses")
        responses = [_text(r, where, f"responses[{k}]") for k, r in enumerate(responses)]
        if len(set(responses)) != len(responses):
            raise PreferenceDataError(f"{where}: the same response appears twice in 'responses'; a ranking "
                                      "orders different responses")
        scores = record.get("scores")
        if scores is None:
            pairs = [(i, j, 0.0) for i in range(len(responses)) for j in range(i + 1, len(responses))]
        else:
            if not isinstance(scores, list) or len(scores) != len(responses) or not all(
                    isinstance(s, numbers.Real) and not isinstance(s, bool) and math.isfinite(s) for s in scores):
                raise PreferenceDataError(f"{where}: 'scores' must be a list of {len(responses)} finite numbers, "
                                          "one per response")
            pairs = [(i, j, 0.0) for i in range(len(responses)) for j in range(len(responses))
                     if scores[i] > scores[j]]
            if not pairs:
                raise PreferenceDataError(f"{where}: every response has the same score: the record prefers "
                                          "nothing; remove it")
        return Ranking(prompt, responses, pairs)
    missing = [f for f in ("chosen", "rejected") if f not in record]
    if missing:
        raise PreferenceDataError(f"{where}: missing field(s) {missing} (records need 'prompt' and either "
                                  f"'chosen' + 'rejected' or 'responses'; got fields {sorted(record)})")
    chosen, rejected = _text(record["chosen"], where, "chosen"), _text(record["rejected"], where, "rejected")
    if chosen == rejected:
        raise PreferenceDataError(f"{where}: 'chosen' and 'rejected' are identical: the pair prefers nothing; "
                                  "remove it")
    margin = record.get("margin", 0.0)
    if isinstance(margin, bool) or not isinstance(margin, numbers.Real) or not math.isfinite(margin):
        raise PreferenceDataError(f"{where}: 'margin' must be a finite number, got {margin!r}")
    return Ranking(prompt, [chosen, rejected], [(0, 1, float(margin))])


def read_rankings(path) -> list[Ranking]:
    """Every record of a JSONL file as a ``Ranking`` (errors name the file and line)."""
    path = Path(path)
    if not path.is_file():
        raise PreferenceDataError(f"preference data {path} does not exist; pass a JSONL file of records with "
                                  "'prompt' and 'chosen' + 'rejected' (or 'responses')")
    out = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise PreferenceDataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            out.append(ranking_from_record(record, f"{path}:{n}"))
    if not out:
        raise PreferenceDataError(f"preference data {path} holds no record")
    return out


@dataclass
class PreferenceArrays:
    """A data set of rankings as arrays (see the module docstring); ``truncated`` sequences lost prompt tokens."""

    input_ids: np.ndarray
    keep: np.ndarray
    better: np.ndarray
    margin: np.ndarray
    truncated: int = 0

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def rows(self, index) -> dict:
        """The batch of elements ``index`` (an array of row numbers): a dict of arrays."""
        return {"input_ids": self.input_ids[index], "keep": self.keep[index], "better": self.better[index],
                "margin": self.margin[index]}

    @property
    def pairs(self) -> int:
        """The number of preferred pairs in the data set."""
        return int(self.better.sum())


def encode_rankings(rankings: list, encode, pad_id: int, max_len: int | None = None) -> PreferenceArrays:
    """Render every response of every ranking with ``encode(prompt, response) -> (ids, truncated)`` into arrays.

    ``max_len``: the length every sequence is padded to (default: the longest).
    """
    if not rankings:
        raise PreferenceDataError("no preference records to encode")
    seqs, truncated = [], 0
    for rk in rankings:
        row = []
        for resp in rk.responses:
            ids, cut = encode(rk.prompt, resp)
            truncated += int(bool(cut))
            row.append([int(t) for t in ids])
        seqs.append(row)
    K = max(len(r) for r in seqs)
    T = max(len(s) for r in seqs for s in r)
    if max_len is not None:
        if T > max_len:
            raise PreferenceDataError(f"a rendered sequence has {T} tokens, more than the {max_len} allowed")
        T = max_len
    N = len(seqs)
    ids = np.full((N, K, T), int(pad_id), dtype=np.int64)
    keep = np.zeros((N, K, T), dtype=bool)
    better = np.zeros((N, K, K), dtype=bool)
    margin = np.zeros((N, K, K), dtype=np.float32)
    for n, (rk, row) in enumerate(zip(rankings, seqs)):
        for k, s in enumerate(row):
            ids[n, k, :len(s)] = s
            keep[n, k, :len(s)] = True
        for i, j, m in rk.pairs:
            better[n, i, j] = True
            margin[n, i, j] = m
    return PreferenceArrays(ids, keep, better, margin, truncated)


class RowSampler:
    """Batches of rows of a data set, reshuffled every epoch: ``batch_size`` rows per call, over all replicas.

    Epoch e visits the rows in the order ``permutation(seed, e)``; global
    batch k is the next ``batch_size`` of them and data-parallel replica
    ``rank`` of ``world`` takes its consecutive share, so the rows of a step
    are the same whatever ``world`` is. ``rows_of(index)`` turns row numbers
    into a batch (e.g. ``PreferenceArrays.rows``). The state is ``(epoch,
    position)``.
    """

    def __init__(self, n_rows: int, rows_of, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if n_rows < batch_size:
            raise ValueError(f"the data set has {n_rows} rows, fewer than a batch of {batch_size}; lower "
                             "--batch-size or add data")
        if batch_size % world:
            raise ValueError(f"a batch of {batch_size} rows cannot be split over {world} replicas")
        self.n_rows, self.rows_of, self.batch_size = int(n_rows), rows_of, int(batch_size)
        self.seed, self.rank, self.world = int(seed), int(rank), int(world)
        self.epoch, self.position = 0, 0

    def _order(self):
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n_rows)

    def next_batch(self) -> dict:
        if self.position + self.batch_size > self.n_rows:  # the rest of an epoch that no longer fills a batch
            self.epoch, self.position = self.epoch + 1, 0
        batch = self._order()[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        share = self.batch_size // self.world
        return self.rows_of(np.sort(batch[self.rank * share:(self.rank + 1) * share]))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict):
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


__all__ = ["PreferenceDataError", "Ranking", "ranking_from_record", "read_rankings", "PreferenceArrays",
           "encode_rankings", "RowSampler"]
