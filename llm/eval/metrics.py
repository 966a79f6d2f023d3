"""Metrics, their aggregations and their standard errors, computed as lm-evaluation-harness computes them.

Per-document values are aggregated over a task; a standard error comes with each:

- ``mean`` (acc, acc_norm, exact_match, pass@k): the plain mean; standard error
  ``mean_stderr``, the sample standard deviation (Bessel's n - 1) over sqrt(n);
- ``perplexity`` (LAMBADA): exp(-mean log-likelihood) of the continuations; its
  standard error is the harness's bootstrap (``bootstrap_stderr``);
- ``weighted_perplexity`` and ``bits_per_byte`` (perplexity on text): the
  log-likelihoods and the word or byte counts are summed over all documents
  first, then exp(-sum ll / sum count) or -sum ll / sum bytes / ln 2. The
  harness gives these no standard error (None here, "N/A" there).

A group of tasks (MMLU's 57 subjects, its four categories) reports the mean of
its tasks' values weighted by their sizes (``weighted_mean``) with the pooled
standard error (``pooled_stderr``).

Generated answers are compared with ``exact_match`` after ``regex_extract``
picked the answer out of the text (the harness's ``regex`` filter followed by
``take_first``).
"""

from __future__ import annotations

import math
import re
import string
from typing import Callable, Sequence

import numpy as np

#: what ``regex_extract`` returns when the pattern does not match (the harness's fallback)
INVALID = "[invalid]"
#: the harness's default number of bootstrap resamples (``--bootstrap_iters``)
BOOTSTRAP_ITERS = 100_000


def mean(values: Sequence[float]) -> float:
    """The arithmetic mean (an error on an empty sequence: a task with no documents has no score)."""
    values = list(values)
    if not values:
        raise ValueError("mean of no values: the task produced no results")
    return math.fsum(values) / len(values)


def sample_stddev(values: Sequence[float]) -> float:
    """The sample standard deviation, with Bessel's correction (n - 1); needs at least two values."""
    values = list(values)
    if len(values) < 2:
        raise ValueError(f"a sample standard deviation needs at least 2 values, got {len(values)}")
    mu = mean(values)
    return math.sqrt(math.fsum((x - mu) ** 2 for x in values) / (len(values) - 1))


def mean_stderr(values: Sequence[float]) -> float | None:
    """Standard error of a mean: sample_stddev / sqrt(n); None for fewer than 2 values (the harness's "N/A")."""
    values = list(values)
    if len(values) < 2:
        return None
    return sample_stddev(values) / math.sqrt(len(values))


def perplexity(loglikelihoods: Sequence[float]) -> float:
    """exp(-mean(ll)): the perplexity of a set of continuations, each weighing the same (LAMBADA's)."""
    return math.exp(-mean(loglikelihoods))


def _sums(pairs) -> tuple[float, float]:
    pairs = list(pairs)
    if not pairs:
        raise ValueError("no (log-likelihood, count) pairs to aggregate: the task produced no results")
    ll = math.fsum(float(p[0]) for p in pairs)
    count = math.fsum(float(p[1]) for p in pairs)
    if count <= 0:
        raise ValueError("the documents hold no words or bytes to divide by: is the text empty?")
    return ll, count


def weighted_perplexity(pairs: Sequence[tuple[float, float]]) -> float:
    """exp(-sum(ll) / sum(count)) over (log-likelihood, words or bytes) pairs: word or byte perplexity."""
    ll, count = _sums(pairs)
    return math.exp(-ll / count)


def bits_per_byte(pairs: Sequence[tuple[float, float]]) -> float:
    """-sum(ll) / sum(bytes) / ln 2 over (log-likelihood in nats, UTF-8 bytes) pairs."""
    ll, count = _sums(pairs)
    return -ll / count / math.log(2)


def bootstrap_stderr(statistic: Callable[[np.ndarray], np.ndarray], values: Sequence[float],
                     iters: int = BOOTSTRAP_ITERS) -> float | None:
    """The harness's bootstrap estimate of a statistic's standard error, with the very same resamples.

    The harness draws ``iters // chunk`` chunks of ``chunk = min(1000, iters)``
    resamples; chunk ``i`` uses ``random.Random(i)`` and each resample is
    ``rnd.choices(values, k=n)``, i.e. the indices ``floor(rnd.random() * n)``
    of n consecutive draws. NumPy's legacy ``RandomState`` seeded with the list
    ``[i]`` is the same Mersenne Twister in the same state (CPython seeds an
    int through ``init_by_array``, as NumPy does for a sequence), and its
    ``random_sample`` builds doubles from two 32-bit outputs exactly as
    ``random.random`` does, so the resamples are identical and vectorised.
    ``statistic`` maps a (R, n) array of resamples to their R statistics. The
    result is the sample standard deviation of the ``iters // chunk * chunk``
    statistics; None for fewer than 2 values or ``iters`` < 2 (no estimate).
    """
    x = np.asarray(values, dtype=np.float64)
    n = x.shape[0]
    if n < 2 or iters < 2:
        return None
    chunk = min(1000, iters)
    rows_per_block = max(1, min(chunk, 4_000_000 // n))  # bound the (rows, n) index array to ~32 MB
    stats = []
    for i in range(iters // chunk):
        rng = np.random.RandomState([i])
        done = 0
        while done < chunk:
            rows = min(rows_per_block, chunk - done)
            idx = np.floor(rng.random_sample((rows, n)) * float(n)).astype(np.intp)  # (rows, n)
            stats.append(np.asarray(statistic(x[idx]), dtype=np.float64))  # (rows,)
            done += rows
    return sample_stddev(np.concatenate(stats).tolist())


def perplexity_rows(resamples: np.ndarray) -> np.ndarray:
    """``perplexity`` of each row of a (R, n) array of log-likelihoods (for ``bootstrap_stderr``)."""
    return np.exp(-resamples.mean(axis=1))


def weighted_mean(values: Sequence[float], sizes: Sequence[int]) -> float:
    """A group's score: its tasks' values weighted by their numbers of documents."""
    if len(values) != len(sizes) or not values:
        raise ValueError(f"weighted_mean needs as many sizes as values (got {len(values)} and {len(sizes)})")
    return math.fsum(v * s for v, s in zip(values, sizes)) / sum(sizes)


def pooled_stderr(stderrs: Sequence[float], sizes: Sequence[int]) -> float | None:
    """A group's standard error from its tasks' (pooled variance, as the harness's ``pooled_sample_stderr``).

    var = sum((n_i - 1) * n_i * se_i**2) / (sum(n_i) - k), se = sqrt(var / sum(n_i)):
    each task's sample variance is n_i * se_i**2. None if a task has no standard error.
    """
    if len(stderrs) != len(sizes) or not sizes:
        raise ValueError(f"pooled_stderr needs as many sizes as standard errors (got {len(stderrs)} and {len(sizes)})")
    if any(s is None for s in stderrs) or sum(sizes) <= len(sizes):
        return None
    var = math.fsum((n - 1) * se ** 2 * n for se, n in zip(stderrs, sizes)) / (sum(sizes) - len(sizes))
    return math.sqrt(var / sum(sizes))


def multiple_choice_scores(loglikelihoods: Sequence[float], choices: Sequence[str], gold: int) -> dict:
    """acc and acc_norm of one multiple-choice question, as the harness scores them.

    acc: the choice with the highest log-likelihood is the gold one.
    acc_norm: the same after dividing each log-likelihood by its choice's length
    in characters (the choice text without the delimiter before it). Ties go to
    the first choice (``argmax``).
    """
    if len(loglikelihoods) != len(choices) or not choices:
        raise ValueError(f"{len(loglikelihoods)} log-likelihoods for {len(choices)} choices")
    lls = np.asarray(loglikelihoods, dtype=np.float64)
    lengths = np.array([float(len(c)) for c in choices])
    pred = int(np.argmax(lls))
    pred_norm = int(np.argmax(lls / lengths))
    return {"acc": float(pred == gold), "acc_norm": float(pred_norm == gold)}


def regex_extract(text: str, pattern: str, group_select: int = 0, fallback: str = INVALID) -> str:
    """The harness's ``regex`` filter: match ``group_select`` of ``re.findall`` (-1: the last), stripped.

    When the pattern has several groups, a match is a tuple and its first
    non-empty group is taken. No match gives ``fallback``.
    """
    matches = re.findall(pattern, text if isinstance(text, str) else "")
    if not matches:
        return fallback
    match = matches[group_select]
    if isinstance(match, tuple):
        parts = [m for m in match if m]
        match = parts[0] if parts else fallback
    return match.strip()


def exact_match(prediction: str, reference: str, regexes_to_ignore: Sequence[str] = (), ignore_case: bool = False,
                ignore_punctuation: bool = False, ignore_numbers: bool = False) -> float:
    """1.0 if the two strings are equal after the harness's normalisation, else 0.0.

    Each regex of ``regexes_to_ignore`` is removed from both (in order), then
    case, ASCII punctuation and digits are dropped when asked.
    """
    for pattern in regexes_to_ignore:
        prediction = re.sub(pattern, "", prediction)
        reference = re.sub(pattern, "", reference)
    if ignore_case:
        prediction, reference = prediction.lower(), reference.lower()
    if ignore_punctuation:
        table = str.maketrans("", "", string.punctuation)
        prediction, reference = prediction.translate(table), reference.translate(table)
    if ignore_numbers:
        table = str.maketrans("", "", string.digits)
        prediction, reference = prediction.translate(table), reference.translate(table)
    return float(prediction == reference)


def count_words(text: str) -> int:
    """The harness's word count for word perplexity: ``len(re.split(r"\\s+", text))``."""
    return len(re.split(r"\s+", text))


def count_bytes(text: str) -> int:
    """The number of UTF-8 bytes of ``text`` (byte perplexity, bits per byte)."""
    return len(text.encode("utf-8"))


__all__ = ["INVALID", "BOOTSTRAP_ITERS", "mean", "sample_stddev", "mean_stderr", "perplexity", "perplexity_rows",
           "weighted_perplexity", "bits_per_byte", "bootstrap_stderr", "weighted_mean", "pooled_stderr",
           "multiple_choice_scores", "regex_extract", "exact_match", "count_words", "count_bytes"]
