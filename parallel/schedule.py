"""Pipeline schedules as plain instruction lists, and a simulator that checks them without MPI.

A pipeline of ``p`` stages runs ``m`` micro-batches per optimizer step. Each
stage executes its own list of instructions, ``(op, micro_batch)`` tuples::

    ("recv_fwd", i)   receive micro-batch i's activation from stage s - 1
    ("forward", i)    run this stage's layers on it (the last stage: up to the loss)
    ("send_fwd", i)   send the output activation to stage s + 1
    ("recv_bwd", i)   receive the gradient of that output from stage s + 1
    ("backward", i)   back-propagate through the stage's forward graph of micro-batch i
    ("send_bwd", i)   send the gradient of the stage's input to stage s - 1

The first stage has no ``recv_fwd``/``send_bwd`` (its input is token ids), the
last no ``send_fwd``/``recv_bwd`` (its backward starts from the loss).

Two schedules decide the order of the computations on each stage:

- **GPipe** (Huang et al. 2019): all ``m`` forwards, then all ``m`` backwards.
  Every stage holds the activations of all ``m`` micro-batches at the peak.
- **1F1B** (PipeDream-Flush, Narayanan et al. 2021; Megatron-LM's default):
  stage ``s`` runs ``p - s - 1`` warm-up forwards, then alternates one forward
  and one backward, then drains the remaining backwards. A micro-batch's
  activations are freed as soon as its backward ran, so stage ``s`` never holds
  more than ``p - s`` of them (``min(m, p - s)``).

Both have the same bubble (idle fraction) when a forward takes ``f`` and a
backward ``b`` time units: the pipeline fills and drains in ``(p - 1)(f + b)``,
the useful work is ``m (f + b)``, so the idle fraction of the step is
``(p - 1) / (m + p - 1)``.

Where the messages go: ``build_schedule`` times the computations (forward 1
unit, backward 2, messages free; each stage starts its next computation as soon
as its input is there), then sorts every computation and every message
(a send and its matching receive are one event) into one global order by time.
Each stage's list is this global order restricted to the events it takes part
in. A consequence: the lists run to completion even when every send blocks
until its receive is posted (rendezvous, what MPI does above the eager limit):
the earliest unfinished event in the global order always has both of its
participants at it. ``simulate`` checks this by executing all lists with
blocking semantics, with no assumption about how they were built.

    >>> sched = build_schedule("1f1b", n_stages=2, n_micro=2)
    >>> sched[0]  # doctest: +NORMALIZE_WHITESPACE
    [('forward', 0), ('send_fwd', 0), ('forward', 1), ('send_fwd', 1),
     ('recv_bwd', 0), ('backward', 0), ('recv_bwd', 1), ('backward', 1)]
    >>> simulate(sched).peak_activations
    [2, 1]
"""

from __future__ import annotations

from dataclasses import dataclass, field

RECV_FWD, FORWARD, SEND_FWD = "recv_fwd", "forward", "send_fwd"
RECV_BWD, BACKWARD, SEND_BWD = "recv_bwd", "backward", "send_bwd"
OPS = (RECV_FWD, FORWARD, SEND_FWD, RECV_BWD, BACKWARD, SEND_BWD)
COMPUTE_OPS = (FORWARD, BACKWARD)
SCHEDULES = ("gpipe", "1f1b")


class ScheduleError(ValueError):
    """An instruction list is invalid or deadlocks; the message names the stage, the instruction and why."""


def _check_sizes(n_stages, n_micro):
    for name, v in (("n_stages", n_stages), ("n_micro", n_micro)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")


def _check_kind(kind):
    if kind not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {kind!r}: use one of {SCHEDULES}")


# ---------------------------------------------------------------------------
# the order of the computations on one stage
# ---------------------------------------------------------------------------


def compute_order(kind: str, stage: int, n_stages: int, n_micro: int) -> list[tuple[str, int]]:
    """The forwards and backwards of ``stage``, in the order ``kind`` ("gpipe" or "1f1b") runs them."""
    _check_kind(kind)
    _check_sizes(n_stages, n_micro)
    if not 0 <= stage < n_stages:
        raise ValueError(f"stage {stage} does not exist in a pipeline of {n_stages} stages (0..{n_stages - 1})")
    m = n_micro
    if kind == "gpipe":
        return [(FORWARD, i) for i in range(m)] + [(BACKWARD, i) for i in range(m)]
    warmup = min(n_stages - stage - 1, m)
    order = [(FORWARD, i) for i in range(warmup)]
    for k in range(m - warmup):  # steady state: one forward, one backward
        order += [(FORWARD, warmup + k), (BACKWARD, k)]
    order += [(BACKWARD, i) for i in range(m - warmup, m)]  # cool-down
    return order


def peak_activations_bound(kind: str, stage: int, n_stages: int, n_micro: int) -> int:
    """The most micro-batches whose activations ``stage`` holds at once: ``m`` (GPipe), ``min(m, p - s)`` (1F1B)."""
    _check_kind(kind)
    return n_micro if kind == "gpipe" else min(n_micro, n_stages - stage)


def bubble_fraction(n_stages: int, n_micro: int) -> float:
    """The theoretical idle fraction of a step, ``(p - 1) / (m + p - 1)``, for GPipe and 1F1B alike."""
    _check_sizes(n_stages, n_micro)
    return (n_stages - 1) / (n_micro + n_stages - 1)


# ---------------------------------------------------------------------------
# timing the computations, and placing the messages
# ---------------------------------------------------------------------------


@dataclass
class Timeline:
    """When each computation runs in the timed model ``build_schedule`` uses.

    ``start[s]`` and ``end[s]``: dicts ``(op, i) -> time`` for stage ``s``.
    ``makespan``: the time the last computation ends. ``busy[s]``: the time
    stage ``s`` computes. ``bubble``: ``1 - mean(busy) / makespan``.
    """

    start: list
    end: list
    makespan: float
    busy: list

    @property
    def bubble(self) -> float:
        return 1.0 - sum(self.busy) / (len(self.busy) * self.makespan)


def timeline(kind: str, n_stages: int, n_micro: int, forward_time: float = 1.0, backward_time: float = 2.0,
             orders: list | None = None) -> Timeline:
    """Time the schedule: each stage runs its ``compute_order`` back to back, starting a computation
    as soon as the stage is free and its input has arrived (messages take no time).

    A forward of micro-batch i on stage s needs the forward of i on s - 1 to have
    ended; a backward needs its own forward and (except on the last stage) the
    backward of i on s + 1. ``forward_time`` and ``backward_time``: one number
    for every stage, or a list with one per stage (unequal stages). ``orders``
    replaces the per-stage orders (for tests).
    """
    p, m = n_stages, n_micro
    if orders is None:
        orders = [compute_order(kind, s, p, m) for s in range(p)]
    start = [dict() for _ in range(p)]
    end = [dict() for _ in range(p)]
    pos = [0] * p
    free = [0.0] * p

    def per_stage(t, what):
        ts = [float(v) for v in t] if isinstance(t, (list, tuple)) else [float(t)] * p
        if len(ts) != p:
            raise ValueError(f"{what} has {len(ts)} entries for {p} stages")
        return ts

    fwd, bwd = per_stage(forward_time, "forward_time"), per_stage(backward_time, "backward_time")
    remaining = sum(len(o) for o in orders)
    while remaining:
        progressed = False
        for s in range(p):
            while pos[s] < len(orders[s]):
                op, i = orders[s][pos[s]]
                deps = []
                if op == FORWARD:
                    if s > 0:
                        deps.append(end[s - 1].get((FORWARD, i)))
                else:
                    deps.append(end[s].get((FORWARD, i)))
                    if s < p - 1:
                        deps.append(end[s + 1].get((BACKWARD, i)))
                if any(d is None for d in deps):
                    break  # the input is not computed yet: try the other stages
                t0 = max([free[s]] + deps)
                start[s][(op, i)] = t0
                end[s][(op, i)] = free[s] = t0 + (fwd[s] if op == FORWARD else bwd[s])
                pos[s] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = {s: orders[s][pos[s]] for s in range(p) if pos[s] < len(orders[s])}
            raise ScheduleError(f"the compute orders cannot be timed: each waiting stage needs a result that comes "
                                f"later in another stage's order ({stuck})")
    makespan = max(free)
    busy = [sum(end[s][k] - start[s][k] for k in start[s]) for s in range(p)]
    return Timeline(start, end, makespan, busy)


def build_schedule(kind: str, n_stages: int, n_micro: int) -> list[list[tuple[str, int]]]:
    """The instruction lists of all ``n_stages`` stages for ``n_micro`` micro-batches (see the module docstring).

    Deterministic: every rank builds the same lists and executes its own
    (``build_schedule(...)[stage]``).
    """
    _check_kind(kind)
    _check_sizes(n_stages, n_micro)
    p = n_stages
    tl = timeline(kind, n_stages, n_micro)
    # one global list of events: (time, category, tiebreak, participants and their instructions)
    events = []
    for s in range(p):
        for (op, i), t in tl.start[s].items():
            events.append((t, 1, s, i, op, [(s, (op, i))]))
        for (op, i), t in tl.end[s].items():
            if op == FORWARD and s < p - 1:  # the activation goes to s + 1
                events.append((t, 0, s, i, op, [(s, (SEND_FWD, i)), (s + 1, (RECV_FWD, i))]))
            elif op == BACKWARD and s > 0:  # the input's gradient goes to s - 1
                events.append((t, 0, s, i, op, [(s, (SEND_BWD, i)), (s - 1, (RECV_BWD, i))]))
    # at equal times, messages come before computations (a computation starting at t may need one
    # arriving at t); the rest of the key only makes the order deterministic
    events.sort(key=lambda e: e[:5])
    lists = [[] for _ in range(p)]
    for *_, parts in events:
        for s, instr in parts:
            lists[s].append(instr)
    return lists


def stage_schedule(kind: str, stage: int, n_stages: int, n_micro: int) -> list[tuple[str, int]]:
    """The instruction list of one stage: ``build_schedule(kind, n_stages, n_micro)[stage]``."""
    if not 0 <= stage < n_stages:
        raise ValueError(f"stage {stage} does not exist in a pipeline of {n_stages} stages (0..{n_stages - 1})")
    return build_schedule(kind, n_stages, n_micro)[stage]


# ---------------------------------------------------------------------------
# the simulator
# ---------------------------------------------------------------------------


@dataclass
class SimResult:
    """What ``simulate`` measured: ``peak_activations[s]`` (micro-batches stage s held at once),
    ``rounds`` (scheduler rounds until every list finished) and ``messages`` (send/recv pairs matched)."""

    peak_activations: list = field(default_factory=list)
    rounds: int = 0
    messages: int = 0


_PEER = {SEND_FWD: (+1, RECV_FWD), RECV_FWD: (-1, SEND_FWD), SEND_BWD: (-1, RECV_BWD), RECV_BWD: (+1, SEND_BWD)}


def _check_lists(lists, n_micro):
    """Static checks: known ops, each computation once per micro-batch, messages only to existing stages,
    every send with exactly one matching receive."""
    p = len(lists)
    for s, lst in enumerate(lists):
        seen = {}
        for k, instr in enumerate(lst):
            if not (isinstance(instr, tuple) and len(instr) == 2 and instr[0] in OPS and isinstance(instr[1], int)):
                raise ScheduleError(f"stage {s}, instruction {k}: {instr!r} is not (op, micro_batch) with op in {OPS}")
            op, i = instr
            if not 0 <= i < n_micro:
                raise ScheduleError(f"stage {s}, instruction {k}: micro-batch {i} is outside 0..{n_micro - 1}")
            if op in _PEER and not 0 <= s + _PEER[op][0] < p:
                raise ScheduleError(f"stage {s}, instruction {k}: {instr} talks to stage {s + _PEER[op][0]}, "
                                    f"which does not exist in a pipeline of {p} stages")
            if instr in seen:
                raise ScheduleError(f"stage {s}: {instr} appears twice (instructions {seen[instr]} and {k})")
            seen[instr] = k
        for op in COMPUTE_OPS:
            missing = [i for i in range(n_micro) if (op, i) not in seen]
            if missing:
                raise ScheduleError(f"stage {s} never runs {op} of micro-batch(es) {missing}")
    for s in range(p - 1):  # the link between s and s + 1, both directions
        for send, recv, a, b in ((SEND_FWD, RECV_FWD, s, s + 1), (SEND_BWD, RECV_BWD, s + 1, s)):
            sent = sorted(i for op, i in lists[a] if op == send)
            received = sorted(i for op, i in lists[b] if op == recv)
            if sent != received:
                raise ScheduleError(f"{send} on stage {a} does not match {recv} on stage {b}: micro-batches sent "
                                    f"{sent}, received {received}")
            if sent != list(range(n_micro)):
                raise ScheduleError(f"stage {a} sends {send} for micro-batches {sent}, expected all of "
                                    f"0..{n_micro - 1}")


def simulate(lists: list, n_micro: int | None = None) -> SimResult:
    """Execute every stage's instruction list together, with blocking sends and receives; check and measure.

    Semantics: a computation runs at once if its inputs are there; a send
    and its matching receive (same micro-batch, neighbouring stages, same
    direction) complete together when both stages have reached them, and a
    stage waits at a send or receive until its peer is at the matching one
    (rendezvous: the strictest MPI behaviour). Raises ``ScheduleError`` for:
    an unknown or duplicated instruction, a send without its receive, a
    forward before its activation arrived, a backward before its forward or
    its gradient, a send of something not computed yet, and a deadlock (every
    unfinished stage waiting; the message lists where each one is stuck).
    """
    p = len(lists)
    if p == 0:
        raise ScheduleError("no stages")
    if n_micro is None:
        n_micro = 1 + max((i for lst in lists for _, i in lst), default=-1)
    _check_lists(lists, n_micro)
    pos = [0] * p
    have_act = [set() for _ in range(p)]  # micro-batches whose input activation arrived (stage 0: all)
    have_grad = [set() for _ in range(p)]  # micro-batches whose output gradient arrived (last stage: from the loss)
    fwd_done = [set() for _ in range(p)]
    bwd_done = [set() for _ in range(p)]
    live = [0] * p
    peak = [0] * p
    result = SimResult()

    def fail(s, why):
        raise ScheduleError(f"stage {s}, instruction {pos[s]} {lists[s][pos[s]]}: {why}")

    while any(pos[s] < len(lists[s]) for s in range(p)):
        result.rounds += 1
        progressed = False
        for s in range(p):
            while pos[s] < len(lists[s]):
                op, i = lists[s][pos[s]]
                if op == FORWARD:
                    if s > 0 and i not in have_act[s]:
                        fail(s, f"forward of micro-batch {i} before its activation was received")
                    fwd_done[s].add(i)
                    live[s] += 1
                    peak[s] = max(peak[s], live[s])
                elif op == BACKWARD:
                    if i not in fwd_done[s]:
                        fail(s, f"backward of micro-batch {i} before its forward")
                    if s < p - 1 and i not in have_grad[s]:
                        fail(s, f"backward of micro-batch {i} before its output gradient was received")
                    bwd_done[s].add(i)
                    live[s] -= 1
                else:
                    step, want = _PEER[op]
                    q = s + step
                    if pos[q] >= len(lists[q]) or lists[q][pos[q]] != (want, i):
                        break  # blocked until the peer reaches the matching instruction
                    # both are at the pair: check the sender has what it sends, deliver, move both on
                    sender, kind = (s, op) if op in (SEND_FWD, SEND_BWD) else (q, want)
                    if kind == SEND_FWD and i not in fwd_done[sender]:
                        raise ScheduleError(f"stage {sender}, instruction {pos[sender]} {(kind, i)}: sends the "
                                            f"activation of micro-batch {i} before computing it")
                    if kind == SEND_BWD and i not in bwd_done[sender]:
                        raise ScheduleError(f"stage {sender}, instruction {pos[sender]} {(kind, i)}: sends the "
                                            f"input gradient of micro-batch {i} before computing it")
                    if kind == SEND_FWD:
                        have_act[sender + 1].add(i)
                    else:
                        have_grad[sender - 1].add(i)
                    pos[q] += 1
                    result.messages += 1
                pos[s] += 1
                progressed = True
        if not progressed:
            stuck = "; ".join(f"stage {s} at {lists[s][pos[s]]}" for s in range(p) if pos[s] < len(lists[s]))
            raise ScheduleError(f"deadlock: every unfinished stage waits for a peer that never reaches the "
                                f"matching send/receive ({stuck})")
    result.peak_activations = peak
    return result


__all__ = ["OPS", "SCHEDULES", "RECV_FWD", "FORWARD", "SEND_FWD", "RECV_BWD", "BACKWARD", "SEND_BWD",
           "ScheduleError", "compute_order", "peak_activations_bound", "bubble_fraction", "Timeline", "timeline",
           "build_schedule", "stage_schedule", "simulate", "SimResult"]
