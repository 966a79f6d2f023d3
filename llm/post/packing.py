"""Training rows from rendered examples: right padding, or best-fit-decreasing packing, and their sampler.

An example is the ``(input_ids, labels)`` of one conversation (``llm.post.chat.next_token_labels``:
labels are -100 off the answer). Rows are a dict of arrays with one row per line, all ``length``
long:

- ``pad_rows``: one example per row, padded on the right with PAD ids and -100 labels. Causal
  attention already keeps every real token from seeing the padding after it, so the model needs
  nothing else.
- ``pack_rows``: several examples per row, placed by best-fit decreasing (``best_fit_decreasing``:
  longest first, each into the row with the least room that still fits it), with
  ``position_ids`` that restart at 0 for every example and ``segment_ids`` that number the
  examples of a row (padding is a segment of its own). ``attention_mask(segment_ids)`` is the
  block-diagonal mask that keeps each example's attention inside itself; with it and the positions,
  every example computes what it computes alone, so packed and padded rows give the same summed
  loss (to float rounding), in fewer, fuller rows.

``RowSampler`` draws the training batches: every epoch a permutation of the rows seeded by
``(seed, epoch)``, global batch k = the next ``batch_size`` rows of that stream, and each
data-parallel replica its own share of them, so the global batch is the same whatever the number
of replicas. Its state is the number of batches drawn.
"""

from __future__ import annotations

import bisect

import numpy as np

IGNORE_INDEX = -100


def best_fit_decreasing(lengths, capacity: int) -> list:
    """Bins (lists of indices into ``lengths``) of total length at most ``capacity``, by best-fit decreasing.

    Items are taken longest first (ties: lower index first); each goes into the
    open bin with the least room left that still holds it, or into a new bin.
    The bins come in the order they were opened. O(n log n).
    """
    lengths = [int(n) for n in lengths]
    for i, n in enumerate(lengths):
        if not 0 < n <= capacity:
            raise ValueError(f"item {i} has length {n}, which does not fit bins of {capacity}")
    bins = []
    by_room = {}  # room left -> open bins with that room (a stack)
    rooms = []  # the sorted rooms that some open bin has
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        k = bisect.bisect_left(rooms, n)
        if k < len(rooms):
            room = rooms[k]
            b = by_room[room].pop()
            if not by_room[room]:
                del by_room[room]
                rooms.pop(k)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        left = room - n
        if left > 0:
            if left not in by_room:
                by_room[left] = []
                bisect.insort(rooms, left)
            by_room[left].append(b)
    return bins


def pad_rows(examples, length: int, pad_id: int) -> dict:
    """``{"input_ids", "labels"}`` (N, length) int64: one example per row, right-padded (PAD, -100)."""
    n = len(examples)
    ids = np.full((n, length), pad_id, dtype=np.int64)
    labels = np.full((n, length), IGNORE_INDEX, dtype=np.int64)
    for r, (x, y) in enumerate(examples):
        if len(x) > length:
            raise ValueError(f"example {r} has {len(x)} positions, more than the rows' {length}")
        ids[r, :len(x)] = x
        labels[r, :len(y)] = y
    return {"input_ids": ids, "labels": labels}


def pack_rows(examples, length: int, pad_id: int) -> dict:
    """``{"input_ids", "labels", "position_ids", "segment_ids"}`` (R, length) int64 of best-fit-decreasing rows.

    Within a row the examples sit one after another in the order they were
    placed, each with positions 0, 1, ... and its own segment id (0, 1, ...); the
    padding at the end of a row has labels -100, its own segment id and positions
    from 0.
    """
    bins = best_fit_decreasing([len(x) for x, _ in examples], length)
    R = len(bins)
    ids = np.full((R, length), pad_id, dtype=np.int64)
    labels = np.full((R, length), IGNORE_INDEX, dtype=np.int64)
    positions = np.zeros((R, length), dtype=np.int64)
    segments = np.zeros((R, length), dtype=np.int64)
    for r, members in enumerate(bins):
        at = 0
        for s, i in enumerate(members):
            x, y = examples[i]
            n = len(x)
            ids[r, at:at + n], labels[r, at:at + n] = x, y
            positions[r, at:at + n] = np.arange(n)
            segments[r, at:at + n] = s
            at += n
        positions[r, at:] = np.arange(length - at)
        segments[r, at:] = len(members)
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "segment_ids": segments}


def attention_mask(segment_ids):
    """The block-diagonal mask ``(B, 1, T, T)`` (True: may attend) of rows ``(B, T)`` of segment ids."""
    return segment_ids[:, None, :, None] == segment_ids[:, None, None, :]  # (B, 1, T, T)


class RowSampler:
    """Batches of rows for data-parallel replica ``rank`` of ``world`` (see the module docstring).

    ``rows``: a dict of arrays with a common first axis. Each ``next_batch()``
    gives this replica's ``batch_size // world`` rows of the next global batch
    of ``batch_size`` rows.
    """

    def __init__(self, rows: dict, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.rows = rows
        self.n = int(next(iter(rows.values())).shape[0])
        if self.n == 0:
            raise ValueError("there are no training rows")
        if batch_size % world:
            raise ValueError(f"a batch of {batch_size} rows cannot be shared by {world} replicas")
        self.batch_size, self.seed, self.rank, self.world = int(batch_size), int(seed), int(rank), int(world)
        self.batches = 0
        self._epoch, self._order = None, None

    def _order_of(self, epoch: int):
        if epoch != self._epoch:
            self._epoch, self._order = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._order

    def global_indices(self, k: int) -> np.ndarray:
        """The rows of global batch ``k`` (every replica's), in order."""
        out = np.empty(self.batch_size, dtype=np.int64)
        for j, pos in enumerate(range(k * self.batch_size, (k + 1) * self.batch_size)):
            out[j] = self._order_of(pos // self.n)[pos % self.n]
        return out

    def next_batch(self) -> dict:
        """This replica's rows of the next global batch."""
        share = self.batch_size // self.world
        idx = self.global_indices(self.batches)[self.rank * share:(self.rank + 1) * share]
        self.batches += 1
        return {k: v[idx] for k, v in self.rows.items()}

    @property
    def epoch(self) -> float:
        """Epochs drawn so far (fractional)."""
        return self.batches * self.batch_size / self.n

    def state_dict(self) -> dict:
        return {"batches": self.batches, "seed": self.seed, "rows": self.n}

    def load_state_dict(self, state):
        if int(state["rows"]) != self.n:
            raise ValueError(f"the checkpoint's data had {state['rows']} training rows, this run has {self.n}: "
                             "resume with the same data and flags")
        self.batches, self.seed = int(state["batches"]), int(state["seed"])


def batches_of(rows: dict, batch_size: int) -> list:
    """``rows`` cut into consecutive batches of ``batch_size`` rows (the last may be shorter), for evaluation."""
    n = int(next(iter(rows.values())).shape[0])
    return [{k: v[i:i + batch_size] for k, v in rows.items()} for i in range(0, n, batch_size)]


__all__ = ["IGNORE_INDEX", "best_fit_decreasing", "pad_rows", "pack_rows", "attention_mask", "RowSampler",
           "batches_of"]
