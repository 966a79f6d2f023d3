"""Reading and writing tokenizer files: our JSON format, tiktoken's rank files, GPT-2's encoder.json + vocab.bpe.

Our format (``Tokenizer.save`` / ``Tokenizer.load``) is one UTF-8 JSON object::

    {
      "format": "llm-from-scratch/bpe-tokenizer",
      "version": 1,
      "pattern": "<the split regex>",
      "tokens": [[0, "AA=="], [1, "AQ=="], ..., [256, "IHQ="], ...],
      "merges": [[32, 116, 256], ...],
      "special_tokens": {"<|endoftext|>": 4095}
    }

``tokens`` lists every ordinary token as ``[id, base64 of its bytes]`` (base64 because a token can
be any bytes, including half of a UTF-8 character); the id is also the merge rank. ``merges``
(optional) lists ``[left_id, right_id, new_id]`` in the order training learned them.
``special_tokens`` maps each special token's text to its id. Nothing in the file is executed.

tiktoken's rank file: one line per token, ``<base64 of the bytes> <rank>``, sorted by rank.
Special tokens are not part of it (tiktoken takes them as a separate argument).

GPT-2's files: ``encoder.json`` maps each token, written through GPT-2's byte-to-unicode table
(``bytes_to_unicode``), to its id; ``vocab.bpe`` starts with a ``#version`` line, then one merge
per line, the two parts separated by a space, in merge order.
"""

from __future__ import annotations

import base64
import binascii
import json
import os

FORMAT_NAME = "llm-from-scratch/bpe-tokenizer"
FORMAT_VERSION = 1


class TokenizerFormatError(ValueError):
    """A tokenizer file is missing a field, malformed, or inconsistent; the message names the file and the problem."""


def bytes_to_unicode():
    """GPT-2's table from each byte (0-255) to a printable unicode character, as in its encoder.py.

    Bytes that are already printable, non-space Latin-1 characters ('!'..'~', '¡'..'¬', '®'..'ÿ') map
    to themselves; the other 68 bytes (controls, space, ...) map to 256, 257, ... in byte order, so
    'Ġ' (U+0120) stands for the space byte 32.
    """
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}





def read_text(path, what):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} file not found: {path}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TokenizerFormatError(f"{path}: not a UTF-8 text file ({e}); is it really a {what} file?") from None


# ----------------------------------------------------------------------------------------------- our JSON


def dump_json(ranks, special_tokens, pattern, merges=None):
    """The text of our JSON format for a vocabulary (see the module docstring)."""
    obj = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "pattern": pattern,
        "tokens": [[i, base64.b64encode(b).decode("ascii")] for b, i in sorted(ranks.items(), key=lambda kv: kv[1])],
    }
    if merges is not None:
        obj["merges"] = [list(m) for m in merges]
    obj["special_tokens"] = dict(sorted(special_tokens.items(), key=lambda kv: kv[1]))
    # One token per line keeps the file readable and diffable.
    lines = ["{"]
    items = list(obj.items())
    for n, (k, v) in enumerate(items):
        comma = "," if n < len(items) - 1 else ""
        if k in ("tokens", "merges"):
            body = ",\n".join("    " + json.dumps(x) for x in v)
            lines.append(f"  {json.dumps(k)}: [\n{body}\n  ]{comma}" if v else f"  {json.dumps(k)}: []{comma}")
        else:
            lines.append(f"  {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}{comma}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def load_json(path):
    """Read our JSON format from a file: ``(ranks, special_tokens, pattern, merges or None)``."""
    return parse_json(read_text(path, "tokenizer"), path)


def parse_json(text, path="<tokenizer JSON>"):
    """Parse our JSON format (``path`` names the source in errors); raises TokenizerFormatError."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise TokenizerFormatError(
            f"{path}: not valid JSON ({e}); the file is corrupt or not a tokenizer file") from None

    def bad(msg):
        return TokenizerFormatError(f"{path}: {msg}")

    if not isinstance(obj, dict) or obj.get("format") != FORMAT_NAME:
        raise bad(f'not a tokenizer file of this project (expected "format": "{FORMAT_NAME}"). '
                  "For a tiktoken rank file use Tokenizer.from_tiktoken_file; for GPT-2's files, "
                  "Tokenizer.from_gpt2_files")
    if obj.get("version") != FORMAT_VERSION:
        raise bad(f"unsupported version {obj.get('version')!r} (this code reads version {FORMAT_VERSION})")
    pattern = obj.get("pattern")
    if not isinstance(pattern, str):
        raise bad('"pattern" must be a string (the split regex)')
    tokens = obj.get("tokens")
    if not isinstance(tokens, list):
        raise bad('"tokens" must be a list of [id, base64] pairs')
    ranks = {}
    for n, entry in enumerate(tokens):
        if not (isinstance(entry, list) and len(entry) == 2 and type(entry[0]) is int and isinstance(entry[1], str)):
            raise bad(f'"tokens"[{n}] must be [id, "base64 bytes"], got {entry!r}')
        try:
            b = base64.b64decode(entry[1], validate=True)
        except (binascii.Error, ValueError):
            raise bad(f'"tokens"[{n}]: {entry[1]!r} is not valid base64') from None
        if b in ranks:
            raise bad(f'"tokens"[{n}]: the bytes {b!r} appear twice (ids {ranks[b]} and {entry[0]})')
        ranks[b] = entry[0]
    specials = obj.get("special_tokens", {})
    if not isinstance(specials, dict) or not all(type(v) is int for v in specials.values()):
        raise bad('"special_tokens" must map each special token string to an integer id')
    merges = obj.get("merges")
    if merges is not None:
        if not isinstance(merges, list) or not all(
                isinstance(m, list) and len(m) == 3 and all(type(x) is int for x in m) for m in merges):
            raise bad('"merges" must be a list of [left_id, right_id, new_id] integer triples')
        merges = [tuple(m) for m in merges]
    return ranks, specials, pattern, merges


# ----------------------------------------------------------------------------------------------- tiktoken


def dump_tiktoken(ranks):
    """The text of a tiktoken rank file for ``ranks`` (bytes -> rank): ``base64 rank`` lines sorted by rank."""
    items = sorted(ranks.items(), key=lambda kv: kv[1])
    return "".join(f"{base64.b64encode(b).decode('ascii')} {r}\n" for b, r in items)


def load_tiktoken(path):
    """Parse a tiktoken rank file (as tiktoken.load.load_tiktoken_bpe does); returns ``ranks`` (bytes -> rank)."""
    text = read_text(path, "tiktoken rank")
    ranks = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        try:
            if len(fields) != 2:
                raise ValueError
            b = base64.b64decode(fields[0], validate=True)
            r = int(fields[1])
        except (binascii.Error, ValueError):
            raise TokenizerFormatError(
                f"{path}, line {lineno}: expected '<base64 bytes> <rank>', got {line[:80]!r}") from None
        if b in ranks:
            raise TokenizerFormatError(f"{path}, line {lineno}: the bytes {b!r} appear twice")
        ranks[b] = r
    if not ranks:
        raise TokenizerFormatError(f"{path}: no tokens in the file")
    return ranks


# ----------------------------------------------------------------------------------------------- GPT-2


def dump_gpt2(ranks, merges, special_tokens):
    """The texts of GPT-2's ``encoder.json`` and ``vocab.bpe`` for a vocabulary; returns ``(encoder_json, vocab_bpe)``.

    ``merges`` must be ``(left_id, right_id, new_id)`` triples in merge order (``Tokenizer.merges``).
    """
    b2u = bytes_to_unicode()
    to_str = {i: "".join(b2u[x] for x in b) for b, i in ranks.items()}
    encoder = {s: i for i, s in sorted(to_str.items())}
    for name, i in special_tokens.items():
        encoder[name] = i
    lines = ["#version: 0.2"] + [f"{to_str[a]} {to_str[b]}" for a, b, _ in merges]
    return json.dumps(encoder, ensure_ascii=False), "\n".join(lines) + "\n"


def load_gpt2(encoder_json_path, vocab_bpe_path, special_tokens=("<|endoftext|>", "<|startoftext|>")):
    """Parse GPT-2's ``encoder.json`` + ``vocab.bpe``; returns ``(ranks, special_tokens, merges)``.

    Entries of ``encoder.json`` named in ``special_tokens`` become special tokens (GPT-2 has
    ``<|endoftext|>`` = 50256); every other entry is decoded to bytes through GPT-2's byte-to-unicode
    table. Each merge of ``vocab.bpe`` must join two tokens into a token of ``encoder.json``, and the
    merges must come in increasing id order, since the id is the merge priority here (as in tiktoken).
    """
    text = read_text(encoder_json_path, "GPT-2 encoder.json")
    try:
        encoder = json.loads(text)
    except json.JSONDecodeError as e:
        raise TokenizerFormatError(f"{encoder_json_path}: not valid JSON ({e})") from None
    if not isinstance(encoder, dict) or not all(isinstance(k, str) and type(v) is int for k, v in encoder.items()):
        raise TokenizerFormatError(f"{encoder_json_path}: expected a JSON object mapping token strings to integer ids")
    u2b = {u: b for b, u in bytes_to_unicode().items()}
    ranks, specials, str_id = {}, {}, {}
    for s, i in encoder.items():
        if s in special_tokens:
            specials[s] = i
            continue
        try:
            b = bytes(u2b[ch] for ch in s)
        except KeyError as e:
            raise TokenizerFormatError(
                f"{encoder_json_path}: token {s!r} has the character {e.args[0]!r}, which is not in GPT-2's "
                "byte-to-unicode table; if it is a special token, pass it in special_tokens") from None
        if b in ranks:
            raise TokenizerFormatError(f"{encoder_json_path}: tokens {s!r} and another both spell the bytes {b!r}")
        ranks[b] = i
        str_id[s] = i
    bpe = read_text(vocab_bpe_path, "GPT-2 vocab.bpe").splitlines()
    merges = []
    last_new = -1
    for lineno, line in enumerate(bpe, 1):
        if lineno == 1 and line.startswith("#version"):
            continue
        if not line.strip():
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise TokenizerFormatError(
                f"{vocab_bpe_path}, line {lineno}: expected two tokens separated by one space, got {line!r}")
        left, right = parts
        try:
            a, b, new = str_id[left], str_id[right], str_id[left + right]
        except KeyError as e:
            raise TokenizerFormatError(
                f"{vocab_bpe_path}, line {lineno}: token {e.args[0]!r} is not in {encoder_json_path}") from None
        if new <= last_new:
            raise TokenizerFormatError(
                f"{vocab_bpe_path}, line {lineno}: merge {line!r} gives id {new}, not above the previous merge's id "
                f"{last_new}; merge order and ids must agree")
        last_new = new
        merges.append((a, b, new))
    return ranks, specials, merges
