"""Decisions every rank must take together, and work one rank does first.

Under mpirun every rank runs the same loop; any decision that changes the
sequence of collective calls (stop now, the clock ran out, build the cache)
must come out the same on every rank, or the ranks wait for each other
forever. Without a communicator (or at size 1) these are plain calls.
"""

from __future__ import annotations


def agree_on_stop(comm, requested, *flags):
    """``(stop signal, flags)`` every rank acts on (one all-gather): the first signal any rank got (None for
    none), and each flag True if it is True on any rank (a time limit).

    Signals and clocks differ between processes; the decision to stop (which
    changes the sequence of collective calls) must be the same everywhere.
    """
    if comm is None or comm.size == 1:
        return requested, [bool(f) for f in flags]
    gathered = comm.allgather((requested, [bool(f) for f in flags]))
    signals = [r for r, _ in gathered if r is not None]
    return (signals[0] if signals else None), [any(g[i] for _, g in gathered) for i in range(len(flags))]


def rank0_first(comm, fn, errors: tuple = (ValueError,)):
    """``fn()`` on rank 0 first, then on the other ranks (which then find rank 0's cached files); a collective call.

    Building the tokenizer and the token shards once, instead of on every rank
    at the same time into the same cache folder. If rank 0 raises one of
    ``errors``, every other rank raises the same type with the same message
    instead of waiting (and instead of doing the work again). Without a
    communicator, or at size 1: just ``fn()``.
    """
    if comm is None or comm.size == 1:
        return fn()
    if comm.rank == 0:
        try:
            result = fn()
        except errors as e:
            comm.bcast((errors.index(type(e)) if type(e) in errors else 0, str(e)), root=0)
            raise
        comm.bcast(None, root=0)
        return result
    failure = comm.bcast(None, root=0)
    if failure is not None:
        raise errors[failure[0]](failure[1])
    return fn()


__all__ = ["agree_on_stop", "rank0_first"]
