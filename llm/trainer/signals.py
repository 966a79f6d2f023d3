"""Stopping on a signal with a checkpoint, the same way in one process and under mpirun.

The first SIGINT (Ctrl-C) or SIGTERM (what schedulers and ``docker stop``
send) only asks the loop to stop: it finishes the step it is in, where the
model, the optimizer and the data agree, every rank agrees on that step
(``llm.trainer.ranks.agree_on_stop``: one all-gather), a checkpoint is written and the job exits
130 (SIGINT) or 143 (SIGTERM), as a shell reports a process ended by that
signal. A second signal interrupts at once (KeyboardInterrupt).

Under mpirun the ranks never see a terminal's Ctrl-C: the terminal signals
mpirun, and Open MPI's mpirun answers SIGINT and SIGTERM by killing every rank
within about 0.4 s (SIGTERM, then SIGKILL: fixed in PRRTE, not configurable),
too soon to finish a step. mpirun forwards SIGUSR1 and SIGUSR2 instead, so
those two mean "stop as for SIGINT" and "stop as for SIGTERM" here: ``kill
-USR1 <mpirun's pid>`` stops a running mpirun job with a checkpoint, and
``python -m llm train --dp N`` started without mpirun launches mpirun itself
and turns its own Ctrl-C into that signal (``parallel.launch.run_under_mpirun``).
"""

from __future__ import annotations

import signal
import threading

#: exit code of a run stopped by each signal (128 + the signal's number, as shells report it)
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGUSR1: 130, signal.SIGUSR2: 143}
_NAMES = {signal.SIGINT: "Ctrl-C (SIGINT)", signal.SIGTERM: "SIGTERM", signal.SIGUSR1: "SIGUSR1 (stop as for Ctrl-C)",
          signal.SIGUSR2: "SIGUSR2 (stop as for SIGTERM)"}


class GracefulStop:
    """A context in which the first stop signal only sets ``requested`` (its signal number); a second interrupts.

    ``on_first(name)`` is called from the handler with the signal's name (to
    print a line). Outside the main thread, where Python cannot install
    signal handlers, the signals keep their usual meaning.
    """

    def __init__(self, on_first=None):
        self.requested = None
        self._on_first = on_first
        self._previous = {}

    @property
    def exit_code(self) -> int:
        """130 for SIGINT/SIGUSR1, 143 for SIGTERM/SIGUSR2 (0 when no signal came)."""
        return EXIT_CODES.get(self.requested, 0)

    def _handler(self, signum, frame):
        if self.requested is not None:
            self.__exit__(None, None, None)
            raise KeyboardInterrupt
        self.requested = signum
        if self._on_first is not None:
            self._on_first(_NAMES.get(signum, str(signum)))

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in EXIT_CODES:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}
        return False


__all__ = ["GracefulStop", "EXIT_CODES"]
