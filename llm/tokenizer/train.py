"""Byte-pair-encoding training with incremental pair counts.

The naive trainer (minbpe's) recounts every adjacent pair of the whole corpus after each merge:
O(corpus x merges). This one does the same merges with far less work, in three steps:

1. Pre-tokenised text repeats itself: 5 MB of Shakespeare is 1.3 M chunks but only ~37 k distinct
   ones. Training runs over the UNIQUE chunks, each weighted by how often it occurs.
2. ``counts[pair]`` (weighted) and ``where[pair]`` (the ids of the chunks that may contain the pair)
   are built once. Merging a pair visits only ``where[pair]``; each occurrence changes just its two
   neighbouring pairs, and those changes are applied to ``counts`` in place.
3. A heap of ``(-count, pair)`` finds the most frequent pair. Entries go stale when a count falls;
   a popped entry whose count is out of date is pushed back with its current count ("lazy
   deletion"), so the entry that wins is always exact.

Tie-break (deterministic, documented): among pairs with the highest count, the pair with the
smallest ``(left id, right id)`` wins, i.e. the lexicographically smallest pair of ids. A pair is
stored as the int ``left * base + right`` with ``base`` larger than every id, so comparing keys
compares pairs lexicographically.
"""

from __future__ import annotations

import heapq
from collections import defaultdict


def train_merges(chunk_counts, num_merges, token_bytes=None, progress=None):
    """Learn up to ``num_merges`` byte-pair merges from weighted chunks.

    Args:
        chunk_counts: mapping ``chunk bytes -> number of occurrences`` (the unique pre-tokenised chunks).
        num_merges: how many NEW tokens to create. Training stops earlier when no pair is left.
        token_bytes: optional list to extend: ``token_bytes[i]`` is the bytes of token ``i``; defaults
            to the 256 single bytes. Ids of new tokens follow on from ``len(token_bytes)``.
        progress: optional callable ``progress(n_tokens_added, num_merges)`` called after each new token.

    Returns:
        ``(merges, token_bytes)``. ``merges`` is a list of ``(left_id, right_id, new_id)`` in the order
        learned. Normally ``new_id`` is a fresh id (256, 257, ...). If the bytes of ``left + right``
        are already a token (two different pairs can spell the same bytes: ``(ab, c)`` and
        ``(a, bc)``; this happens when training continues from a given ``token_bytes``, and was never
        seen when starting from the 256 bytes, in thousands of random corpora), the merge reuses that
        token's id instead of creating a duplicate, so the vocabulary never holds the same bytes twice
        (tiktoken's rank files could not express that).

    The rule for each step: merge the pair of adjacent tokens with the highest total count; ties go to
    the smallest ``(left_id, right_id)``; in a chunk, occurrences are merged left to right
    (``a a a`` with pair ``(a, a)`` becomes ``aa a``).
    """
    if num_merges < 0:
        raise ValueError(f"num_merges must be >= 0, got {num_merges}")
    vocab = [bytes([i]) for i in range(256)] if token_bytes is None else list(token_bytes)
    ids_of = {b: i for i, b in enumerate(vocab)}
    first_new = len(vocab)
    K = first_new + num_merges + 1  # pair key = left * K + right, with every id < K

    words = []   # token ids of each unique chunk (lists, rewritten in place as merges happen)
    freqs = []   # how often each unique chunk occurs
    for chunk, n in chunk_counts.items():
        if len(chunk) >= 2:  # a single-byte chunk has no pair and can never change
            words.append([ids_of[chunk[i:i + 1]] for i in range(len(chunk))])
            freqs.append(n)

    counts = defaultdict(int)  # pair key -> weighted count
    where = defaultdict(set)   # pair key -> ids of chunks that contain (or once contained) the pair
    for wi, w in enumerate(words):
        f = freqs[wi]
        for j in range(len(w) - 1):
            key = w[j] * K + w[j + 1]
            counts[key] += f
            where[key].add(wi)
    heap = [(-c, key) for key, c in counts.items()]
    heapq.heapify(heap)

    merges = []
    added = 0
    while added < num_merges:
        # Pop until the top entry is up to date: its stored count equals the current count.
        while heap:
            neg, key = heap[0]
            c = counts.get(key, 0)
            if c == -neg:
                break
            if c > 0:
                heapq.heapreplace(heap, (-c, key))
            else:
                heapq.heappop(heap)
        if not heap:
            break  # every chunk is a single token: nothing left to merge
        heapq.heappop(heap)
        a, b = divmod(key, K)
        merged = vocab[a] + vocab[b]
        new = ids_of.get(merged)
        if new is None:
            new = len(vocab)
            vocab.append(merged)
            ids_of[merged] = new
            added += 1
        merges.append((a, b, new))

        raised = set()  # keys whose count went up: they need a fresh heap entry
        bK, newK = b * K, new * K
        for wi in where.pop(key):
            w = words[wi]
            n = len(w)
            f = freqs[wi]
            out = None
            i = 0  # w[:i] has been copied to `out` (once the first occurrence is found)
            j = 0
            while True:
                try:
                    j = w.index(a, j)
                except ValueError:
                    break
                if j + 1 >= n:
                    break
                if w[j + 1] != b:
                    j += 1
                    continue
                # Occurrence of (a, b) at j..j+1: its neighbours L (left) and R (right) change pairs.
                if out is None:
                    out = w[:j]
                else:
                    out.extend(w[i:j])
                if out:
                    left = out[-1]  # already merged: may be `new` from the previous occurrence
                    counts[left * K + a] -= f
                    k2 = left * K + new
                    counts[k2] += f
                    where[k2].add(wi)
                    raised.add(k2)
                if j + 2 < n:
                    right = w[j + 2]
                    counts[bK + right] -= f
                    k2 = newK + right
                    counts[k2] += f
                    where[k2].add(wi)
                    raised.add(k2)
                out.append(new)
                i = j = j + 2
            if out is not None:  # `where` may list chunks that no longer hold the pair
                out.extend(w[i:])
                words[wi] = out
        counts.pop(key, None)  # every occurrence was merged (the `-=` above may have touched it)
        for k2 in raised:
            c = counts[k2]
            if c > 0:
                heapq.heappush(heap, (-c, k2))
        if progress is not None:
            progress(added, num_merges)
    return merges, vocab
