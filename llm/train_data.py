"""The tokenizer and the tokenised datasets a training run needs, built once and cached.

    >>> from llm.train_data import corpus_folder, default_tokenizer, prepare_training_data
    >>> folder, resolved = corpus_folder(["default"])          # ~/.cache/llm-from-scratch/datasets/<sha>
    >>> tok = default_tokenizer(resolved, folder, vocab_size=1024)
    >>> train_ds, val_ds, data_dir = prepare_training_data(["default"], tok, folder, block_size=64)

The cache (``--data-dir``, default ``~/.cache/llm-from-scratch/datasets``, or
``$LLM_FROM_SCRATCH_CACHE/datasets``) holds one folder per corpus, named by the
sha256 of the sources' fingerprint (``llm.data.source_fingerprint``: file
paths, sizes and modification times; the text's hash for the default corpus),
so an edited file gets a fresh folder::

    datasets/<corpus sha256[:16]>/
        sources.json                      what the folder was built from (for people)
        tokenizer-bpe1024-gpt4.json       a BPE tokenizer of 1024 tokens trained on this corpus (one per size
                                          and pattern)
        tokenizer-bpe266-gpt4-complete.json
                                          the corpus ran out of pairs to merge at 266 tokens: every merge it
                                          has; it serves any --vocab-size of 266 or more
        tokens-<tokenizer sha256[:16]>/   the corpus tokenised with that tokenizer (llm.data's layout)

Nothing here is tied to one run's output folder, so a second run on the same
data (another model, another seed) starts training within seconds. Every file
is written to a temporary name and renamed, so an interrupted run never leaves
a half-written tokenizer or dataset behind (``llm.data`` takes care of the
shards; ``Tokenizer.save`` is atomic). A corpus folder is made only when
something is cached in it, and a run whose data fails (a missing, empty or
binary source) removes the folders it made: it leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import warnings
from pathlib import Path

from . import data as datamod
from .tokenizer import ENDOFTEXT, Tokenizer, TokenizerFormatError

#: the BPE tokenizer is trained on at most this many bytes of the corpus (its first documents)
TOKENIZER_TRAIN_BYTES = 20_000_000
#: the field of a JSON-lines record that holds the text, unless --text-field says otherwise
DEFAULT_TEXT_FIELD = "text"


class DataSetupError(ValueError):
    """The data or the tokenizer of a run cannot be prepared; the message names the file and the fix."""


def cache_root(data_dir=None) -> Path:
    """``data_dir``, or ``<llm.corpus.cache_dir()>/datasets`` (``~/.cache/llm-from-scratch/datasets``)."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    from .corpus import cache_dir

    return cache_dir() / "datasets"


def corpus_folder(sources, data_dir=None, default_max_bytes=None, extensions=None, text_field=None):
    """``(folder, resolved sources)``: the cache folder of this corpus (made when something is cached in it).

    ``extensions``: the file endings a folder source takes (None: ``llm.data.DEFAULT_EXTENSIONS``);
    ``text_field``: the field of JSON-lines records that holds the text (None: "text"). Another
    field is another corpus, with a folder of its own. Raises DataSetupError for a source that
    does not exist.
    """
    try:
        resolved = datamod.resolve_sources(sources, _extensions(extensions))
        sha, _ = datamod.source_fingerprint(resolved, default_max_bytes)
    except datamod.DatasetError as e:
        raise DataSetupError(str(e)) from None
    if text_field not in (None, DEFAULT_TEXT_FIELD):
        sha = hashlib.sha256(f"{sha} text_field={text_field}".encode("utf-8")).hexdigest()
    return cache_root(data_dir) / sha[:16], resolved


def _extensions(extensions):
    return datamod.DEFAULT_EXTENSIONS if extensions is None else tuple(extensions)


def _record_sources(folder, sources, fingerprint, items):
    """Make ``folder`` and write its ``sources.json`` (what it was built from, for people) once."""
    folder.mkdir(parents=True, exist_ok=True)
    info = folder / "sources.json"
    if not info.exists():
        tmp = folder / f".sources.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({"sources": [str(s) for s in sources], "fingerprint": fingerprint, "items": items},
                                  indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, info)


@contextlib.contextmanager
def _removed_on_failure(folder):
    """If the block raises, remove ``folder`` and those of its parents that it made, where they are left empty."""
    made = []  # folder and its parents that do not exist yet, deepest first
    p = Path(folder)
    while not p.exists() and p != p.parent:
        made.append(p)
        p = p.parent
    try:
        yield
    except BaseException:
        for p in made:
            try:
                p.rmdir()
            except OSError:  # not empty (something else is cached there now), or gone already
                break
        raise


def load_tokenizer(path) -> Tokenizer:
    """A tokenizer from our JSON format (``python -m llm tokenizer train`` writes it); DataSetupError if unusable."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataSetupError(f"tokenizer file {path} does not exist; train one with `python -m llm tokenizer train` "
                             "or leave out --tokenizer to train one on the data")
    try:
        tok = Tokenizer.load(path)
    except (TokenizerFormatError, ValueError, OSError) as e:
        raise DataSetupError(f"cannot load tokenizer {path}: {e}") from None
    if ENDOFTEXT not in tok.special_tokens:
        raise DataSetupError(f"tokenizer {path} has no {ENDOFTEXT} special token, which separates the documents "
                             "of the training data; retrain it with that special token")
    return tok


def _training_text(resolved, max_bytes, default_max_bytes=None, text_field=None):
    """The corpus's first documents, up to about ``max_bytes`` bytes, as a list of strings."""
    docs, size = [], 0
    for doc in datamod.iter_documents(resolved, text_field or DEFAULT_TEXT_FIELD, default_max_bytes):
        docs.append(doc)
        size += len(doc)
        if size >= max_bytes:
            break
    return docs


def _cached_tokenizer_path(folder, vocab_size, pattern):
    """The cached tokenizer that training ``vocab_size`` tokens on this corpus would give, or None.

    That is ``tokenizer-bpe<vocab_size>-<pattern>.json``, or a ``-complete`` one of at most
    ``vocab_size`` tokens: the corpus has no more merges, so asking for more gives the same tokenizer.
    """
    exact = Path(folder) / f"tokenizer-bpe{vocab_size}-{pattern}.json"
    if exact.exists():
        return exact
    prefix, suffix = "tokenizer-bpe", f"-{pattern}-complete.json"
    for path in sorted(Path(folder).glob(f"{prefix}*{suffix}")):
        size = path.name[len(prefix):-len(suffix)]
        if size.isdigit() and int(size) <= vocab_size:
            return path
    return None


def default_tokenizer(resolved, folder, vocab_size: int, pattern: str = "gpt4", log=print,
                      max_bytes: int = TOKENIZER_TRAIN_BYTES, default_max_bytes=None, text_field=None) -> Tokenizer:
    """A byte-level BPE tokenizer of ``vocab_size`` tokens (``<|endoftext|>`` included) trained on this corpus.

    Trained on the first ``max_bytes`` bytes of the documents the first time, loaded
    afterwards. Cached under the size it has: ``folder/tokenizer-bpe<n>-<pattern>.json``,
    or ``tokenizer-bpe<n>-<pattern>-complete.json`` when the corpus ran out of pairs to
    merge before ``vocab_size`` (it then serves every size from ``n`` up). Training is
    deterministic, so a deleted cache file comes back identical. ``text_field``: as for
    ``corpus_folder``.
    """
    log = log or (lambda *a, **k: None)
    folder = Path(folder)
    path = _cached_tokenizer_path(folder, vocab_size, pattern)
    if path is not None:
        try:
            tok = Tokenizer.load(path)
            log(f"tokenizer: {path} (byte-level BPE, {tok.n_vocab} tokens, cached)")
            return tok
        except (TokenizerFormatError, ValueError, OSError) as e:
            log(f"tokenizer: the cached {path} is unreadable ({e}); training it again")
    t0 = time.perf_counter()
    try:
        docs = _training_text(resolved, max_bytes, default_max_bytes, text_field)
    except datamod.DatasetError as e:
        raise DataSetupError(str(e)) from None
    n_bytes = sum(len(d) for d in docs)
    if n_bytes == 0:
        raise DataSetupError(f"the training data is empty: {', '.join(s.spec for s in resolved)} holds no text to "
                             "train a tokenizer on")
    with warnings.catch_warnings():  # a corpus that runs out of pairs: said below, in the log line
        warnings.filterwarnings("ignore", message="the training text ran out of pairs")
        tok = Tokenizer.train(docs, vocab_size, pattern=pattern, special_tokens=(ENDOFTEXT,))
    complete = tok.n_vocab < vocab_size
    path = folder / f"tokenizer-bpe{tok.n_vocab}-{pattern}{'-complete' if complete else ''}.json"
    with _removed_on_failure(folder):
        _record_sources(folder, [s.spec for s in resolved], *datamod.source_fingerprint(resolved, default_max_bytes))
        tok.save(path)
    size = (f"{tok.n_vocab} tokens: the text ran out of pairs to merge before the {vocab_size} asked for"
            if complete else f"{tok.n_vocab} tokens")
    log(f"tokenizer: trained byte-level BPE ({size}; {pattern} pattern) on {n_bytes:,} characters in "
        f"{time.perf_counter() - t0:.1f}s; saved to {path}")
    return tok


def prepare_training_data(sources, tokenizer, folder, block_size: int, val_fraction: float = 0.1, log=print,
                          default_max_bytes=None, text_field=None, extensions=None):
    """``(train_ds, val_ds, data_dir)``: the corpus tokenised with ``tokenizer`` in ``folder/tokens-<sha>``.

    Built by ``llm.data.prepare`` the first time (reused afterwards); both
    splits must hold at least ``block_size + 1`` tokens. DataSetupError otherwise.
    ``text_field`` and ``extensions``: as for ``corpus_folder``.
    """
    data_dir = Path(folder) / f"tokens-{datamod.tokenizer_sha256(tokenizer)[:16]}"
    try:
        with _removed_on_failure(folder):
            train_ds, val_ds = datamod.prepare(sources, tokenizer, data_dir, val_fraction, block_size=block_size,
                                               log=log, default_max_bytes=default_max_bytes,
                                               text_field=text_field or DEFAULT_TEXT_FIELD,
                                               extensions=_extensions(extensions))
    except datamod.DatasetError as e:
        raise DataSetupError(str(e)) from None
    fingerprint = train_ds.meta["sources"]
    _record_sources(Path(folder), sources, fingerprint["sha256"], fingerprint["items"])
    return train_ds, val_ds, data_dir


__all__ = ["DataSetupError", "TOKENIZER_TRAIN_BYTES", "DEFAULT_TEXT_FIELD", "cache_root", "corpus_folder", "load_tokenizer",
           "default_tokenizer", "prepare_training_data"]
