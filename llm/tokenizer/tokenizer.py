"""The byte-level BPE tokenizer: train, encode, decode, save, load, and read tiktoken's and GPT-2's files.

    >>> from llm.tokenizer import Tokenizer
    >>> tok = Tokenizer.train(open("input.txt").read(), vocab_size=4096, pattern="gpt4")
    >>> ids = tok.encode("Hello world<|endoftext|>", allowed_special="all")
    >>> tok.decode(ids)
    'Hello world<|endoftext|>'

How text becomes ids (the same steps as tiktoken):

1. Allowed special tokens (``<|endoftext|>``, ...) are cut out of the text first and get their own ids.
2. The split pattern (GPT-2's or GPT-4's regex) cuts the rest into chunks: words with their leading
   space, numbers, punctuation runs, whitespace runs.
3. Each chunk's UTF-8 bytes are merged by rank (``bpe.byte_pair_merge``). A chunk's ids are cached,
   so a word seen before costs one dict lookup.

The base vocabulary is the 256 single bytes, so every string can be encoded and
``decode(encode(s)) == s`` for every str without lone surrogates.
"""

from __future__ import annotations

import warnings
from collections import Counter

import regex

from ..atomic import write_text_atomic
from . import formats
from .bpe import encode_piece
from .patterns import GPT2_SPLIT_PATTERN, GPT4_SPLIT_PATTERN, pattern_name, resolve_pattern
from .train import train_merges

ENDOFTEXT = "<|endoftext|>"


def _split_on(text, specials):
    """Pieces of ``text`` with every occurrence of the strings in ``specials`` removed (documents kept apart)."""
    if not specials:
        return [text]
    return _special_regex(frozenset(specials)).split(text)


_SPECIAL_REGEX_CACHE = {}


def _special_regex(specials):
    """A compiled regex matching any of ``specials`` (longest first, so a token that prefixes another loses)."""
    r = _SPECIAL_REGEX_CACHE.get(specials)
    if r is None:
        if len(_SPECIAL_REGEX_CACHE) > 64:
            _SPECIAL_REGEX_CACHE.clear()
        r = regex.compile("|".join(regex.escape(s) for s in sorted(specials, key=lambda s: (-len(s), s))))
        _SPECIAL_REGEX_CACHE[specials] = r
    return r


def _raise_disallowed_special_token(token):
    """Raise tiktoken's error for special-token text that the caller did not allow (same wording)."""
    raise ValueError(
        f"Encountered text corresponding to disallowed special token {token!r}.\n"
        "If you want this text to be encoded as a special token, "
        f"pass it to `allowed_special`, e.g. `allowed_special={{{token!r}, ...}}`.\n"
        "If you want this text to be encoded as normal text, disable the check for this token "
        f"by passing `disallowed_special=(enc.special_tokens_set - {{{token!r}}})`.\n"
        "To disable this check for all special tokens, pass `disallowed_special=()`.\n"
    )


class Tokenizer:
    """A byte-level BPE tokenizer with tiktoken's encoding rule.

    Args:
        mergeable_ranks: ``bytes -> id`` for every ordinary token; the id is also the merge priority
            (lower merges first). It must contain all 256 single bytes.
        special_tokens: ``str -> id`` for special tokens such as ``<|endoftext|>``; their ids must not
            be used by ordinary tokens.
        pattern: the split regex, or a name: "gpt2", "gpt4" (see ``llm.tokenizer.patterns``).
        merges: optional ``(left_id, right_id, new_id)`` triples in the order they were learned
            (kept for inspection and for writing GPT-2's vocab.bpe; encoding does not need them).
        cache_size: how many distinct chunks keep their ids cached (the cache is cleared when full).

    Most users call ``Tokenizer.train``, ``Tokenizer.load``, ``Tokenizer.from_tiktoken_file`` or
    ``Tokenizer.from_gpt2_files`` rather than this constructor.
    """

    def __init__(self, mergeable_ranks, special_tokens=None, pattern=GPT4_SPLIT_PATTERN, *, merges=None,
                 cache_size=100_000):
        ranks = dict(mergeable_ranks)
        special_tokens = dict(special_tokens or {})
        pattern = resolve_pattern(pattern)
        missing = [b for b in range(256) if bytes([b]) not in ranks]
        if missing:
            raise ValueError(f"mergeable_ranks lacks {len(missing)} of the 256 single bytes "
                             f"(e.g. {bytes(missing[:3])!r}): a byte-level BPE vocabulary must contain every byte "
                             "so that any text can be encoded")
        decoder = {}
        for b, i in ranks.items():
            if not isinstance(b, bytes) or not b:
                raise ValueError(f"mergeable_ranks keys must be non-empty bytes, got {b!r}")
            if type(i) is not int or i < 0:
                raise ValueError(f"token ids must be non-negative ints, got {i!r} for {b!r}")
            if i in decoder:
                raise ValueError(f"id {i} is used by two tokens, {decoder[i]!r} and {b!r}")
            decoder[i] = b
        for s, i in special_tokens.items():
            if not isinstance(s, str) or not s:
                raise ValueError(f"special token names must be non-empty strings, got {s!r}")
            if type(i) is not int or i < 0:
                raise ValueError(f"special token ids must be non-negative ints, got {i!r} for {s!r}")
            if i in decoder:
                raise ValueError(f"special token {s!r} has id {i}, which is already the id of {decoder[i]!r}")
            decoder[i] = s.encode("utf-8")
        try:
            self._pat = regex.compile(pattern)
        except regex.error as e:
            raise ValueError(f"the split pattern is not a valid regex ({e}): {pattern!r}") from None
        if merges is not None:
            merges = [tuple(int(x) for x in m) for m in merges]
            for a, b, new in merges:
                if not (a in decoder and b in decoder and new in decoder and decoder[a] + decoder[b] == decoder[new]):
                    raise ValueError(f"merge ({a}, {b}) -> {new} does not join two tokens into a token of this "
                                     "vocabulary")
        self.pattern = pattern
        self._ranks = ranks
        self._special = special_tokens
        self._decoder = decoder
        self._merges = merges
        self._cache = {}
        self._cache_size = int(cache_size)

    # ------------------------------------------------------------------------------------------- training

    @classmethod
    def train(cls, text, vocab_size, pattern="gpt4", special_tokens=(ENDOFTEXT,), progress=None):
        """Learn a BPE vocabulary of ``vocab_size`` tokens (special tokens included) from text.

        Args:
            text: a str, or an iterable of str (e.g. one per file); each is split separately.
            vocab_size: total tokens: 256 bytes + merges + special tokens.
            pattern: "gpt2", "gpt4" or a custom split regex.
            special_tokens: special token strings; they get the ids right after the merges, in this
                order. Their text is cut out of the training text, so no merge crosses a document
                boundary marked by ``<|endoftext|>``.
            progress: optional ``progress(done, total)`` callback after each merge.

        Merges are learned by ``train.train_merges``: the most frequent adjacent pair over the unique
        chunks, ties broken by the smallest ``(left id, right id)``. If the text runs out of pairs
        before ``vocab_size`` is reached, training stops early with a warning and the vocabulary is
        smaller (special tokens then follow the last merge).
        """
        special_tokens = list(special_tokens)
        if len(set(special_tokens)) != len(special_tokens) or not all(isinstance(s, str) and s for s in special_tokens):
            raise ValueError(f"special_tokens must be distinct non-empty strings, got {special_tokens!r}")
        if type(vocab_size) is not int or vocab_size < 256 + len(special_tokens):
            raise ValueError(f"vocab_size must be an int of at least 256 + {len(special_tokens)} (the bytes and the "
                             f"special tokens), got {vocab_size!r}")
        pat = regex.compile(resolve_pattern(pattern))
        if isinstance(text, str):
            text = [text]
        counts = Counter()
        for doc in text:
            if not isinstance(doc, str):
                raise TypeError(f"training text must be str (or an iterable of str), got {type(doc).__name__}")
            for piece in _split_on(doc, special_tokens):
                counts.update(pat.findall(piece))
        chunk_counts = Counter()
        for chunk, n in counts.items():
            chunk_counts[chunk.encode("utf-8")] += n
        num_merges = vocab_size - 256 - len(special_tokens)
        merges, vocab = train_merges(chunk_counts, num_merges, progress=progress)
        if len(vocab) < 256 + num_merges:
            warnings.warn(f"the training text ran out of pairs after {len(vocab) - 256} merges; the vocabulary has "
                          f"{len(vocab) + len(special_tokens)} tokens instead of {vocab_size}", stacklevel=2)
        ranks = {b: i for i, b in enumerate(vocab)}
        specials = {s: len(vocab) + k for k, s in enumerate(special_tokens)}
        return cls(ranks, specials, resolve_pattern(pattern), merges=merges)

    # ------------------------------------------------------------------------------------------- encoding

    def encode_ordinary(self, text):
        """Token ids of ``text``, treating special-token text as ordinary text (tiktoken's ``encode_ordinary``).

        Long texts are split into chunks window by window (``WINDOW`` characters at a time) so that the
        list of chunks never holds a whole large corpus; the ids are the same as in one pass (see
        ``_window_chunks``).
        """
        ids = []
        for chunks in self._window_chunks(text):
            self._encode_chunks(chunks, ids)
        return ids

    WINDOW = 1 << 20  # characters pre-tokenised at a time by encode_ordinary

    def _window_chunks(self, text):
        """Yield lists of consecutive chunks of ``text`` (the regex's matches), one window at a time.

        A regex match that ends well before the window's end is the same as in the whole text (the
        patterns look ahead at most one character, and that character is inside the window); only
        the chunks that touch the window's end can differ. So the last two chunks of each window are
        dropped and the next window starts where they began. If the chunks do not tile the window
        exactly (a custom pattern that skips characters), the rest of the text is done in one pass.
        """
        pat, n, pos, window = self._pat, len(text), 0, self.WINDOW
        while n - pos > window:
            chunks = pat.findall(text, pos, pos + window)
            keep = chunks[:-2]
            joined = "".join(keep)
            if not keep or not text.startswith(joined, pos):
                if keep:  # gaps between matches: fall back to one pass over the rest
                    break
                window *= 2  # a single chunk longer than the window: look further
                continue
            yield keep
            pos += len(joined)
        yield pat.findall(text, pos)

    def _encode_chunks(self, chunks, ids):
        """Append the ids of each chunk (str) to ``ids``, through the chunk cache."""
        cache = self._cache
        ranks = self._ranks
        extend = ids.extend
        for chunk in chunks:
            t = cache.get(chunk)
            if t is None:
                try:
                    b = chunk.encode("utf-8")
                except UnicodeEncodeError:  # a lone surrogate: replace it with U+FFFD, as tiktoken does
                    b = chunk.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode("utf-8")
                t = encode_piece(ranks, b)
                if len(cache) >= self._cache_size:
                    cache.clear()
                cache[chunk] = t
            extend(t)

    def encode(self, text, *, allowed_special="none_raise", disallowed_special="all"):
        """Token ids of ``text``, with tiktoken's handling of special tokens.

        Args:
            allowed_special: which special-token texts become their special ids: "all", a set of
                names, or "none_raise" / "none" / an empty set for none.
            disallowed_special: special-token texts that raise ValueError when found: "all" (default:
                every special not allowed) or a collection; ``()`` encodes them as ordinary text.
                ``allowed_special="none"`` also means ``disallowed_special=()`` (minbpe's meaning).

        By default (as in tiktoken) text such as ``"<|endoftext|>"`` raises a ValueError, so that
        user text cannot inject a document boundary by accident; pass ``allowed_special="all"`` to
        encode it as the special token, or use ``encode_ordinary`` to encode it as plain text.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}; for bytes, decode them to str first")
        if isinstance(allowed_special, str):
            if allowed_special == "all":
                allowed = frozenset(self._special)
            elif allowed_special in ("none_raise", "none"):
                allowed = frozenset()
                if allowed_special == "none":
                    disallowed_special = ()
            else:
                raise ValueError(f'allowed_special must be "all", "none_raise", "none" or a set of special token '
                                 f"names, got {allowed_special!r}")
        else:
            allowed = frozenset(allowed_special)
            unknown = allowed - self._special.keys()
            if unknown:
                raise ValueError(f"allowed_special names {sorted(unknown)} that are not special tokens of this "
                                 f"tokenizer; its special tokens are {sorted(self._special)}")
        if disallowed_special == "all":
            disallowed = frozenset(self._special) - allowed
        else:
            disallowed = frozenset(disallowed_special)
        if disallowed:
            m = _special_regex(disallowed).search(text)
            if m:
                _raise_disallowed_special_token(m.group())
        if not allowed:
            return self.encode_ordinary(text)
        ids = []
        start = 0
        for m in _special_regex(allowed).finditer(text):
            ids.extend(self.encode_ordinary(text[start:m.start()]))
            ids.append(self._special[m.group()])
            start = m.end()
        ids.extend(self.encode_ordinary(text[start:]))
        return ids

    # ------------------------------------------------------------------------------------------- decoding

    def decode_bytes(self, ids):
        """The bytes that ``ids`` stand for (special tokens give their UTF-8 text)."""
        dec = self._decoder
        try:
            return b"".join([dec[i] for i in ids])
        except KeyError as e:
            raise ValueError(f"token id {e.args[0]!r} is not in this tokenizer's vocabulary "
                             f"(ids run from 0 to {self.n_vocab - 1})") from None
        except TypeError:
            raise TypeError(f"decode expects an iterable of int token ids, got {type(ids).__name__} "
                            "holding something else") from None

    def decode(self, ids, errors="replace"):
        """The text that ``ids`` stand for; bytes that are not valid UTF-8 (a cut character) become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    def decode_single_token_bytes(self, token):
        """The bytes of one token id."""
        return self.decode_bytes([token])

    # ------------------------------------------------------------------------------------------- vocabulary

    @property
    def n_vocab(self):
        """One more than the largest id (as tiktoken's ``n_vocab``): the size of an embedding table for these ids."""
        return max(self._decoder) + 1

    vocab_size = n_vocab

    def with_special_tokens(self, names):
        """A copy of this tokenizer with the special tokens ``names`` added where missing.

        New tokens get the ids ``n_vocab, n_vocab + 1, ...`` in the order given; every
        existing id (ordinary or special) is unchanged, so text encodes to the same ids
        as before unless it is a new special token's text. Names already present are
        kept as they are. (A model grows its embedding to match with
        ``GPT.resize_token_embeddings(tokenizer.n_vocab)``.)
        """
        names = list(names)
        if not all(isinstance(s, str) and s for s in names) or len(set(names)) != len(names):
            raise ValueError(f"special token names must be distinct non-empty strings, got {names!r}")
        specials = dict(self._special)
        next_id = self.n_vocab
        for name in names:
            if name not in specials:
                specials[name] = next_id
                next_id += 1
        return Tokenizer(self._ranks, specials, self.pattern, merges=self._merges, cache_size=self._cache_size)

    @property
    def mergeable_ranks(self):
        """A copy of ``bytes -> id`` for the ordinary tokens."""
        return dict(self._ranks)

    @property
    def special_tokens(self):
        """A copy of ``name -> id`` for the special tokens."""
        return dict(self._special)

    @property
    def special_tokens_set(self):
        """The special token names, as tiktoken's ``special_tokens_set``."""
        return set(self._special)

    @property
    def eot_token(self):
        """The id of ``<|endoftext|>`` (KeyError if this tokenizer has none)."""
        try:
            return self._special[ENDOFTEXT]
        except KeyError:
            raise KeyError(f"this tokenizer has no {ENDOFTEXT} special token; it has {sorted(self._special)}") from None

    @property
    def pattern_name(self):
        """ "gpt2" or "gpt4" when the split pattern is one of those, else None."""
        return pattern_name(self.pattern)

    @property
    def merges(self):
        """``(left_id, right_id, new_id)`` per merged token, in rank order.

        Known exactly for trained tokenizers and GPT-2's files. For a vocabulary read from a rank file
        (no merge list there), each token is split the way tiktoken's rule would build it from
        lower-ranked tokens, which is how minbpe and Hugging Face recover merges.
        """
        if self._merges is None:
            self._merges = self._recover_merges()
        return list(self._merges)

    def _recover_merges(self):
        from .bpe import byte_pair_merge

        merges = []
        ranks = self._ranks
        for b, r in sorted(ranks.items(), key=lambda kv: kv[1]):
            if len(b) < 2:
                continue
            lower = _RankLimit(ranks, r)
            parts = byte_pair_merge(lower, b)
            if len(parts) != 2:
                raise ValueError(f"token {b!r} (id {r}) cannot be built by merging two lower-ranked tokens")
            merges.append((ranks[parts[0]], ranks[parts[1]], r))
        return merges

    def __repr__(self):
        name = self.pattern_name or "custom pattern"
        return f"<Tokenizer n_vocab={self.n_vocab} pattern={name} special_tokens={sorted(self._special)}>"

    # ------------------------------------------------------------------------------------------- files

    def to_json(self) -> str:
        """The tokenizer in our JSON format (``formats`` documents it), as text."""
        return formats.dump_json(self._ranks, self._special, self.pattern, self._merges)

    @classmethod
    def from_json(cls, text: str, source: str = "<tokenizer JSON>"):
        """A tokenizer from ``to_json`` text; errors raise ``TokenizerFormatError`` naming ``source``."""
        ranks, specials, pattern, merges = formats.parse_json(text, source)
        try:
            return cls(ranks, specials, pattern, merges=merges)
        except ValueError as e:
            raise formats.TokenizerFormatError(f"{source}: {e}") from None

    def save(self, path):
        """Write the tokenizer in our JSON format, atomically."""
        write_text_atomic(path, self.to_json())

    @classmethod
    def load(cls, path):
        """Read a tokenizer written by ``save``. A corrupt file raises ``TokenizerFormatError`` naming the problem."""
        return cls.from_json(formats.read_text(path, "tokenizer"), str(path))

    def save_tiktoken_file(self, path):
        """Write the ordinary tokens as a tiktoken rank file (``base64 rank`` lines).

        tiktoken then gives the same ids::

            tiktoken.Encoding("mine", pat_str=tok.pattern, mergeable_ranks=load_tiktoken_bpe(path),
                              special_tokens=tok.special_tokens)
        """
        write_text_atomic(path, formats.dump_tiktoken(self._ranks))

    @classmethod
    def from_tiktoken_file(cls, path, pattern="gpt4", special_tokens=None):
        """Read a tiktoken rank file.

        Args:
            pattern: the split regex the ranks were made for ("gpt2" for r50k/p50k/gpt2 files, "gpt4" for
                cl100k_base), or the regex itself.
            special_tokens: ``name -> id``, or a list of names, which then get the ids after the largest rank.
        """
        ranks = formats.load_tiktoken(path)
        if special_tokens is None:
            special_tokens = {}
        elif not isinstance(special_tokens, dict):
            start = max(ranks.values()) + 1
            special_tokens = {s: start + k for k, s in enumerate(special_tokens)}
        try:
            return cls(ranks, special_tokens, pattern)
        except ValueError as e:
            raise formats.TokenizerFormatError(f"{path}: {e}") from None

    @classmethod
    def from_gpt2_files(cls, encoder_json, vocab_bpe, special_tokens=(ENDOFTEXT, "<|startoftext|>")):
        """Read OpenAI's GPT-2 ``encoder.json`` and ``vocab.bpe``; encoding then gives GPT-2's ids.

        The split pattern is GPT-2's. Entries of encoder.json named in ``special_tokens`` (GPT-2 has
        ``<|endoftext|>`` = 50256) become special tokens; the rest are decoded through GPT-2's
        byte-to-unicode table.
        """
        ranks, specials, merges = formats.load_gpt2(encoder_json, vocab_bpe, tuple(special_tokens))
        try:
            return cls(ranks, specials, GPT2_SPLIT_PATTERN, merges=merges)
        except ValueError as e:
            raise formats.TokenizerFormatError(f"{encoder_json}, {vocab_bpe}: {e}") from None

    def save_gpt2_files(self, encoder_json, vocab_bpe):
        """Write the vocabulary as GPT-2's ``encoder.json`` + ``vocab.bpe`` (readable by ``from_gpt2_files``)."""
        enc, bpe = formats.dump_gpt2(self._ranks, self.merges, self._special)
        write_text_atomic(encoder_json, enc)
        write_text_atomic(vocab_bpe, bpe)


class _RankLimit:
    """A view of ``ranks`` holding only the tokens ranked below ``limit`` (for recovering merges)."""

    def __init__(self, ranks, limit):
        self._ranks, self._limit = ranks, limit

    def get(self, key, default=None):
        r = self._ranks.get(key)
        return r if r is not None and r < self._limit else default

