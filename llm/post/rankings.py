"""Preference data for the reward model: pairs and K-way rankings, their arrays, and a shuffling sampler.

Records (one JSON object per line):

    {"prompt": ..., "chosen": "...", "rejected": "...", "margin": 1.5}    a pair ("margin" optional)
    {"prompt": ..., "responses": ["best", "middle", "worst"]}             a ranking, best first
    {"prompt": ..., "responses": [...], "scores": [2, 0, 1]}              a ranking by score (higher better;
                                                                          equal scores make no pair)

``prompt`` is text or a conversation (a list of ``{"role", "content"}``
messages, ending with a user turn); pairs may also use TRL's conversational
form (``llm.post.data``, which reads DPO's pairs, reads them here too); the
job's ``encode(prompt, response)`` renders them in the chat format. A ranking of K responses gives every ordered pair of them
(K (K - 1) / 2 pairs when there are no ties) and stays one batch element, so
its K responses are scored by one forward and its pairs are never split
between micro-batches or ranks.

Arrays (``PreferenceArrays``): ``input_ids`` (N, K, T) right-padded with
``pad_id``; ``keep`` (N, K, T) True on real tokens; ``better`` (N, K, K)
``better[n, i, j]`` = response i preferred to response j; ``margin`` (N, K,
K). K and T are the largest of the data set, so every batch has one shape.
The trainer's batches are drawn by SFT's ``llm.post.packing.RowSampler``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from .chat import ChatFormatError, check_conversation
from .data import DATASETS, DataError, dataset_records, pair_from_record, read_jsonl


@dataclass
class Ranking:
    """One prompt (chat messages ending with a user turn), its responses, and the preferred pairs
    ``(i, j, margin)``: response i beats response j."""

    prompt: list
    responses: list
    pairs: list


def record_prompt(record, where: str = "record") -> list:
    """A record's ``prompt`` as chat messages ending with a user turn (text becomes one user turn); DataError
    naming ``where`` otherwise."""
    if "prompt" not in record:
        raise DataError(f"{where}: a ranking record needs \"prompt\" and \"responses\" (its fields: "
                        f"{', '.join(sorted(record)) or 'none'})")
    prompt = record["prompt"]
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    try:
        messages = check_conversation(prompt, f"{where}: \"prompt\"")
    except ChatFormatError as e:
        raise DataError(str(e)) from None
    if messages[-1]["role"] == "assistant":
        raise DataError(f"{where}: \"prompt\" must end with a user turn (the responses follow it)")
    return messages


def _margin(record, where: str) -> float:
    margin = record.get("margin", 0.0)
    if isinstance(margin, bool) or not isinstance(margin, numbers.Real) or not math.isfinite(margin):
        raise DataError(f"{where}: \"margin\" must be a finite number, got {margin!r}")
    return float(margin)


def ranking_from_record(record, where: str = "record") -> Ranking:
    """The ``Ranking`` of one record (see the module docstring); ``DataError`` naming ``where`` otherwise.

    Pairs are read by ``llm.post.data.pair_from_record`` (DPO's reader: text or
    Hugging Face's conversational form), plus the optional ``margin``.
    """
    if not isinstance(record, dict):
        raise DataError(f"{where}: a preference record is a JSON object, got {type(record).__name__}")
    if "responses" not in record:
        pair = pair_from_record(record, where)
        return Ranking(pair.prompt, [pair.chosen, pair.rejected], [(0, 1, _margin(record, where))])
    prompt = record_prompt(record, where)
    responses = record["responses"]
    if not isinstance(responses, list) or len(responses) < 2:
        raise DataError(f"{where}: \"responses\" must be a list of at least 2 responses")
    for k, r in enumerate(responses):
        if not isinstance(r, str):
            raise DataError(f"{where}: \"responses\"[{k}] must be a string, got {type(r).__name__}")
    if len(set(responses)) != len(responses):
        raise DataError(f"{where}: the same response appears twice in \"responses\"; a ranking orders different "
                        "responses")
    scores = record.get("scores")
    if scores is None:
        pairs = [(i, j, 0.0) for i in range(len(responses)) for j in range(i + 1, len(responses))]
    else:
        if not isinstance(scores, list) or len(scores) != len(responses) or not all(
                isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x) for x in scores):
            raise DataError(f"{where}: \"scores\" must be a list of {len(responses)} finite numbers, one per "
                            "response")
        pairs = [(i, j, 0.0) for i in range(len(responses)) for j in range(len(responses)) if scores[i] > scores[j]]
        if not pairs:
            raise DataError(f"{where}: every response has the same score: the record prefers nothing; drop it")
    return Ranking(prompt, list(responses), pairs)


def read_rankings(path=None, dataset=None, subtasks=None, cache_dir=None, log=print) -> list[Ranking]:
    """Every record of a JSONL file, or of a named preference data set (``llm.post.data.DATASETS``: ``ni_pairs``,
    ``hhh_alignment``, ``truthful_qa``), as ``Ranking``\\ s (errors name the file and line)."""
    if dataset is not None and DATASETS.get(dataset, ("preferences",))[0] != "preferences":
        raise DataError(f"{dataset} holds instructions, not preferences; the preference data sets are "
                        + ", ".join(k for k, (kind, _) in DATASETS.items() if kind == "preferences"))
    records = read_jsonl(path) if path is not None else dataset_records(dataset, subtasks, cache_dir, log)
    return [ranking_from_record(r, where) for where, r in records]


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

    def as_rows(self) -> dict:
        """The data set as a dict of arrays with one row per ranking (what ``llm.post.packing.RowSampler`` draws
        batches from)."""
        return {"input_ids": self.input_ids, "keep": self.keep, "better": self.better, "margin": self.margin}

    def rows(self, index) -> dict:
        """The batch of elements ``index`` (an array of row numbers): a dict of arrays."""
        return {k: v[index] for k, v in self.as_rows().items()}

    @property
    def pairs(self) -> int:
        """The number of preferred pairs in the data set."""
        return int(self.better.sum())


def encode_rankings(rankings: list, encode, pad_id: int, max_len: int | None = None) -> PreferenceArrays:
    """Render every response of every ranking with ``encode(prompt, response) -> (ids, truncated)`` into arrays.

    ``max_len``: the length every sequence is padded to (default: the longest).
    """
    if not rankings:
        raise DataError("no preference records to encode")
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
            raise DataError(f"a rendered sequence has {T} tokens, more than the {max_len} allowed")
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


__all__ = ["Ranking", "record_prompt", "ranking_from_record", "read_rankings", "PreferenceArrays",
           "encode_rankings"]
