"""Atomic file writes: a reader sees the old file or the new one, never half of either.

Write to a temporary file in the same folder, flush and ``fsync`` it, rename it
over the target with ``os.replace`` (atomic on POSIX and Windows), then
``fsync`` the folder so the rename itself survives a crash. Checkpoints,
tokenizers, dataset shards and the corpus cache all go through here.
"""

from __future__ import annotations

import contextlib
import os
import tempfile

import numpy as np


def fsync_dir(folder) -> None:
    """fsync a folder so that a rename inside it is durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(os.fspath(folder), os.O_RDONLY)
    except OSError:  # e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path, mode: str = "wb", **open_kwargs):
    """``with atomic_open(path) as f:`` writes ``f`` to a temporary file that replaces ``path`` on success.

    On an exception the temporary file is removed and ``path`` is untouched.
    The new file gets ordinary permissions (0644; ``mkstemp`` makes it 0600).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix="-" + os.path.basename(path))
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(folder)


def write_text_atomic(path, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically (newlines written as they are)."""
    with atomic_open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)


def write_bytes_atomic(path, chunks) -> None:
    """Write a bytes object, or an iterable of bytes / NumPy arrays (raw bytes), to ``path`` atomically."""
    if isinstance(chunks, (bytes, bytearray, memoryview)):
        chunks = [chunks]
    with atomic_open(path, "wb") as f:
        for c in chunks:
            f.write(memoryview(np.ascontiguousarray(c)).cast("B") if isinstance(c, np.ndarray) else c)


@contextlib.contextmanager
def locked_folder(folder):
    """Hold an exclusive lock on ``folder`` (its ``.lock`` file) while converting data into it, so that
    two processes do not fetch and convert the same data twice. Without ``fcntl`` (Windows) there is no
    lock: the atomic writes still keep every file whole."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, ".lock"), "a") as f:
        try:
            import fcntl
        except ImportError:
            yield
            return
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
