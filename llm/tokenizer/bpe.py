"""Encoding one chunk: tiktoken's byte-pair merge by rank.

A vocabulary is ``ranks: dict[bytes, int]``: every token's bytes and its id, where the id is also
its merge priority (lower merges first). To encode a chunk, start from its single bytes and repeat:
among all adjacent pairs of parts whose concatenated bytes are a token, merge the one with the
lowest rank (the leftmost one on a tie); stop when no adjacent pair is a token. This is exactly the
rule of tiktoken's ``_byte_pair_merge``, so any vocabulary gives tiktoken's ids.

Note the rule looks at the BYTES of a pair, not at which pair of ids was merged in training: the
bytes ``abc`` are reachable from ``ab + c`` and from ``a + bc`` alike. For vocabularies learned
by BPE both views give the same ids in practice (tiktoken's ``gpt2`` encoding, built on this rule,
matches GPT-2's pair-based ``encoder.py``), and this view needs no list of merges at all.
"""

from __future__ import annotations

import heapq

# Chunks up to this many bytes use the simple list algorithm (O(n^2) in C-level list scans, fast for
# words); longer ones (a long run of spaces, a URL, text with no spaces) use the O(n log n) heap.
LONG_CHUNK = 128

_NO_RANK = 1 << 62  # larger than every rank


def byte_pair_merge(ranks, piece):
    """Split ``piece`` (bytes) into tokens by merging the lowest-rank pair first; returns a list of bytes.

    Every single byte of ``piece`` must be a key of ``ranks`` for the result to be encodable (it is,
    for byte-level vocabularies). ``ranks.get`` is the only access made, so any mapping works.
    """
    n = len(piece)
    if n <= 1:
        return [piece] if n else []
    if n > LONG_CHUNK:
        return _byte_pair_merge_heap(ranks, piece)
    get = ranks.get
    # starts[k] is where part k begins; part k is piece[starts[k]:starts[k + 1]].
    starts = list(range(n + 1))
    # pair_rank[k] is the rank of part k + part k+1 as one token (or _NO_RANK).
    pair_rank = [get(piece[i:i + 2], _NO_RANK) for i in range(n - 1)]
    while pair_rank:
        best = min(pair_rank)
        if best == _NO_RANK:
            break
        k = pair_rank.index(best)  # leftmost lowest rank
        del starts[k + 1]  # parts k and k+1 become one part
        del pair_rank[k]
        # Only the pairs touching the new part change: (k-1, k) and (k, k+1).
        if k < len(pair_rank):
            pair_rank[k] = get(piece[starts[k]:starts[k + 2]], _NO_RANK)
        if k > 0:
            pair_rank[k - 1] = get(piece[starts[k - 1]:starts[k + 1]], _NO_RANK)
    return [piece[starts[k]:starts[k + 1]] for k in range(len(starts) - 1)]


def _byte_pair_merge_heap(ranks, piece):
    """Same result as ``byte_pair_merge`` in O(n log n): a heap of candidate pairs and a linked list of parts.

    A heap entry ``(rank, start, end)`` stands for "merge the part that begins at ``start`` with the
    part after it, giving ``piece[start:end]``". Entries go stale when either part changes; an entry
    is current exactly when the part at ``start`` is still alive and the part after it still ends
    at ``end``. Ordering by ``(rank, start)`` picks the lowest rank, leftmost first, as tiktoken does.
    """
    n = len(piece)
    get = ranks.get
    end = list(range(1, n + 1))   # end[s]: where the part beginning at s ends (valid while alive[s])
    prev = list(range(-1, n - 1))  # prev[s]: where the part before the one at s begins (-1 for the first)
    alive = [True] * n
    heap = []
    for i in range(n - 1):
        r = get(piece[i:i + 2])
        if r is not None:
            heap.append((r, i, i + 2))
    heapq.heapify(heap)
    while heap:
        r, s, e = heapq.heappop(heap)
        if not alive[s]:
            continue
        mid = end[s]
        if mid >= n or end[mid] != e:
            continue  # stale: one of the two parts has changed since this entry was pushed
        alive[mid] = False
        end[s] = e
        if e < n:
            prev[e] = s
            r2 = get(piece[s:end[e]])
            if r2 is not None:
                heapq.heappush(heap, (r2, s, end[e]))
        p = prev[s]
        if p >= 0:
            r2 = get(piece[p:e])
            if r2 is not None:
                heapq.heappush(heap, (r2, p, e))
    parts = []
    s = 0
    while s < n:
        parts.append(piece[s:end[s]])
        s = end[s]
    return parts


def encode_piece(ranks, piece):
    """Token ids of one chunk (bytes). A chunk that is itself a token is one id (tiktoken's shortcut)."""
    r = ranks.get(piece)
    if r is not None:
        return [r]
    return [ranks[p] for p in byte_pair_merge(ranks, piece)]
