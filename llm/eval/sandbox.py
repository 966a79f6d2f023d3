"""Model-written programs run in a separate, isolated, resource-limited process, never in the evaluator's.

``run_program(source)`` writes the source into a new temporary folder and runs it with a fresh
``python -I`` (isolated: no user site-packages, no ``PYTHON*`` variables, no current folder on the
path; ``-S`` too, with the site-packages folders put on the path without running ``.pth`` hooks)
in a new session, with an empty environment but for a few safe variables, stdin closed, and:

- a wall-clock timeout (the whole session is killed when it passes) and a CPU-time limit;
- an address-space limit (``memory_mb``): a memory bomb gets ``MemoryError``;
- a cap on output: stdout and stderr are read as they come, their tails kept; past
  ``max_output_bytes`` the program is killed;
- a cap on the size of any file it writes (``file_size_mb``) and on open files;
- a cap on processes (``max_processes``): the parent counts the program's process tree while it
  runs and kills it all past the cap. Root ignores RLIMIT_NPROC, so this count is what contains a
  fork bomb there; for other users RLIMIT_NPROC also applies;
- its children are killed with it: at the end the session is frozen (SIGSTOP), its process tree
  collected, and everything killed (SIGKILL), so nothing it started outlives it;
- the guard (``guard=True``, see ``sandbox_child``): writes, deletes and renames outside its folder,
  new processes, signals, ctypes calls, higher limits and sockets raise ``PermissionError``.

The result says how it ended: ``passed`` (exit status 0 after the program ran to its end),
``failed`` (an exception, a nonzero exit, a signal, or a cap it exceeded: ``reason`` says which),
``timeout`` (wall-clock or CPU time), or ``error`` (the sandbox itself could not start it, e.g. a
memory limit too small for Python to start).

``run_programs(sources, workers=2)`` runs many programs at once, each in its own sandbox.

    >>> run_program("print(1 + 1)").stdout
    '2\\n'
    >>> run_program("while True: pass", timeout_s=1).status
    'timeout'
"""

from __future__ import annotations

import marshal
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

_CHILD = str(Path(__file__).with_name("sandbox_child.py"))
_POLL_S = 0.02  # how often the parent wakes to check the clock and count the program's processes
_DRAIN_S = 1.0  # after the program ends, how long its pipes may stay open (held by an escaped process)
STATUSES = ("passed", "failed", "timeout", "error")


class SandboxError(RuntimeError):
    """The sandbox cannot work on this platform (it needs POSIX: fork, sessions, resource limits)."""


@dataclass
class SandboxResult:
    """How a sandboxed program ended.

    ``status``: passed / failed / timeout / error; ``returncode``: the exit status (negative: killed by
    that signal; None if it never started); ``stdout``/``stderr``: the last ``tail_bytes`` of each;
    ``reason``: one line saying why it did not pass (empty when it passed); ``wall_s``: seconds it ran;
    ``output_bytes``: stdout and stderr bytes it wrote in all.
    """

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    reason: str
    wall_s: float
    output_bytes: int = 0

    @property
    def passed(self) -> bool:
        """True when the program ran to its end and exited with status 0."""
        return self.status == "passed"


def _process_tree(pid: int) -> set:
    """``pid``'s descendants (Linux ``/proc/PID/task/TID/children``), found at this moment."""
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                with open(f"/proc/{p}/task/{t}/children") as f:
                    kids = [int(k) for k in f.read().split()]
            except (OSError, ValueError):
                continue
            for k in kids:
                if k not in found:
                    found.add(k)
                    todo.append(k)
    return found


def _can_count_processes() -> bool:
    return os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children")


def _signal_quietly(send, target, sig) -> None:
    try:
        send(target, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_everything(proc: subprocess.Popen) -> None:
    """Kills the program's session: freeze its group, collect its process tree, then SIGKILL all of it."""
    pgid = proc.pid  # start_new_session: the program leads its own session and process group
    _signal_quietly(os.killpg, pgid, signal.SIGSTOP)
    tree = _process_tree(proc.pid) if proc.returncode is None else set()
    _signal_quietly(os.killpg, pgid, signal.SIGKILL)
    for pid in tree:  # descendants that left the group (setsid/setpgid) are still in the tree
        _signal_quietly(os.kill, pid, signal.SIGKILL)
    _signal_quietly(os.kill, proc.pid, signal.SIGKILL)
    proc.wait()


def _remove_folder(folder: str) -> None:
    """Deletes the program's folder, even where it took away its own permissions (chmod 000 on a subfolder)."""
    def make_writable_and_retry(func, path, _exc_info):
        try:
            os.chmod(os.path.dirname(path), 0o700)
            if os.path.isdir(path) and not os.path.islink(path):
                os.chmod(path, 0o700)
            func(path)
        except OSError:
            pass

    shutil.rmtree(folder, onerror=make_writable_and_retry)


def _child_env(folder: str, extra) -> dict:
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": folder, "TMPDIR": folder, "LANG": "C.UTF-8",
           "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.update(extra or {})
    return env


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def run_program(source: str, timeout_s: float = 10.0, memory_mb: int = 512, *, max_processes: int = 16,
                max_output_bytes: int = 1_000_000, tail_bytes: int = 8192, file_size_mb: int = 16,
                open_files: int = 256, guard: bool = True, run_name: str = "__main__", allow_exit: bool = True,
                env: dict | None = None, python: str | None = None) -> SandboxResult:
    """Runs the Python ``source`` in a sandbox (see the module's docstring) and says how it ended.

    ``run_name``: the program's ``__name__`` (``"__main__"`` runs ``if __name__ == "__main__":`` blocks).
    ``allow_exit=False`` counts ``sys.exit()``/``exit()`` (even with status 0) as a failure: the
    program must run to its end, as the HumanEval and MBPP checkers require. ``env`` adds variables
    to the program's (otherwise minimal) environment; ``python`` is the interpreter (default: this one).
    Never raises for anything the program does; raises ``SandboxError`` off POSIX.
    """
    if os.name != "posix":
        raise SandboxError(f"the sandbox needs a POSIX system (sessions, fork, resource limits); this is {os.name}")
    for name, value in (("timeout_s", timeout_s), ("memory_mb", memory_mb), ("max_processes", max_processes),
                        ("max_output_bytes", max_output_bytes), ("file_size_mb", file_size_mb)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"run_program: {name} must be a positive number, got {value!r}")
    folder = tempfile.mkdtemp(prefix="llm-sandbox-")
    start = time.monotonic()
    try:
        return _run_in(folder, source, timeout_s, memory_mb, max_processes, max_output_bytes, tail_bytes,
                       file_size_mb, open_files, guard, run_name, allow_exit, env, python, start)
    except OSError as e:
        return SandboxResult("error", None, "", "", f"the sandbox could not run the program: {e}",
                             time.monotonic() - start)
    finally:
        _remove_folder(folder)


def _run_in(folder, source, timeout_s, memory_mb, max_processes, max_output_bytes, tail_bytes, file_size_mb,
            open_files, guard, run_name, allow_exit, env, python, start) -> SandboxResult:
    program = os.path.join(folder, "program.py")
    with open(program, "w", encoding="utf-8") as f:
        f.write(source)
    report_r, report_w = os.pipe()
    config = {"program": program, "folder": folder, "run_name": run_name, "guard": bool(guard),
              "report_fd": report_w, "memory_bytes": int(memory_mb * 2**20),
              "cpu_seconds": int(math.ceil(timeout_s)) + 1, "backstop_seconds": int(math.ceil(timeout_s)) + 2,
              "file_bytes": int(file_size_mb * 2**20),
              "open_files": int(open_files), "max_processes": int(max_processes)}
    try:
        proc = subprocess.Popen(
            [python or sys.executable, "-I", "-S", "-B", "-X", "utf8", _CHILD, marshal.dumps(config).hex()],
            cwd=folder, env=_child_env(folder, env), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, pass_fds=(report_w,), start_new_session=True, close_fds=True)
    except BaseException:
        os.close(report_r)
        raise
    finally:
        os.close(report_w)
    deadline = start + timeout_s
    tails = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    report = bytearray()
    total_output = 0
    stopped = ""  # why the parent killed it, if it did
    count_processes = _can_count_processes()
    sel = selectors.DefaultSelector()
    for fd in (*tails, report_r):
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    open_fds = len(tails) + 1
    ended_at = None
    try:
        while True:
            if proc.poll() is not None:
                if ended_at is None:  # whatever the program left running goes too, so that its pipes reach EOF
                    ended_at = time.monotonic()
                    _kill_everything(proc)
                if not open_fds or time.monotonic() > ended_at + _DRAIN_S:
                    break
            for key, _ in sel.select(timeout=_POLL_S):
                try:
                    data = os.read(key.fd, 65536)
                except BlockingIOError:
                    continue
                if not data:
                    sel.unregister(key.fd)
                    open_fds -= 1
                elif key.fd == report_r:
                    report += data[:64]
                else:
                    total_output += len(data)
                    tail = tails[key.fd]
                    tail += data
                    del tail[:-tail_bytes]
            if stopped or proc.returncode is not None:
                continue
            if total_output > max_output_bytes:
                stopped = f"output limit: wrote more than {max_output_bytes} bytes"
            elif time.monotonic() > deadline:
                stopped = f"timed out after {timeout_s:g} s (wall clock)"
            elif count_processes and len(_process_tree(proc.pid)) > max_processes:  # the supervisor not counted
                stopped = f"process limit: more than {max_processes} processes"
            if stopped:
                _kill_everything(proc)
    finally:
        sel.close()
        os.close(report_r)
        if proc.returncode is None:
            _kill_everything(proc)
        proc.stdout.close()
        proc.stderr.close()
    wall = time.monotonic() - start
    stdout, stderr = (bytes(t).decode("utf-8", "replace") for t in tails.values())
    if not stopped and ended_at is not None and ended_at - start > timeout_s + _POLL_S:
        stopped = f"timed out after {timeout_s:g} s (wall clock)"  # ended by the supervisor's backstop alarm first
    rc = proc.returncode
    how = bytes(report).decode("ascii", "replace")  # "started", then "returned" or "exit" (sandbox_child.run)
    result = SandboxResult("failed", rc, stdout, stderr, "", wall, total_output)
    if not how.startswith("started") and not stopped:
        result.status = "error"
        result.reason = ("the sandbox failed before the program started: "
                         + (_last_line(stderr) or f"exit status {rc}"))
    elif stopped:
        result.status = "timeout" if stopped.startswith("timed out") else "failed"
        result.reason = stopped
    elif rc == -signal.SIGXCPU:
        result.status, result.reason = "timeout", f"CPU time limit ({config['cpu_seconds']} s)"
    elif rc == 0 and (how.endswith("returned") or allow_exit):
        result.status = "passed"
    elif rc == 0:
        result.reason = "the program called exit() before its end"
    elif rc is not None and rc < 0:
        result.reason = f"killed by {signal.Signals(-rc).name}" if -rc in signal.valid_signals() else f"signal {-rc}"
    else:
        result.reason = _last_line(stderr) or f"exit status {rc}"
    return result


def run_programs(sources, workers: int | None = None, progress: bool = False, **limits) -> list:
    """Runs each source with ``run_program(source, **limits)``, ``workers`` at a time; results in the sources' order.

    ``workers`` defaults to the number of CPU cores, at most 2 (each program is a process of its own).
    ``progress=True`` shows a progress bar.
    """
    sources = list(sources)
    workers = workers or max(1, min(2, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(lambda s: run_program(s, **limits), sources)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(sources), desc="running programs", unit="program")
        return list(results)
