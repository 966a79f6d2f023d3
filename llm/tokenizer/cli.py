"""Command line: ``python -m llm tokenizer train|encode|decode`` (or ``python -m llm.tokenizer.cli ...``).

    python -m llm tokenizer train --input a.txt b.txt --vocab-size 4096 --pattern gpt4 --out tok.json
    python -m llm tokenizer encode --tokenizer tok.json --text "Hello world"
    python -m llm tokenizer decode --tokenizer tok.json --ids 15496 995

Bad input (a missing file, a vocabulary too small, a corrupt tokenizer file, an unknown id) prints one
``error: ...`` line to stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
import time

from .formats import TokenizerFormatError
from .patterns import SPLIT_PATTERNS
from .tokenizer import ENDOFTEXT, Tokenizer


class CLIError(Exception):
    """A user error: printed as ``error: <message>`` with exit status 2."""


def build_parser(prog="python -m llm tokenizer"):
    """The argparse parser for the three subcommands."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train a byte-level BPE tokenizer on text files, or encode / decode with a trained one.")
    sub = parser.add_subparsers(dest="command", metavar="{train,encode,decode}")
    sub.required = True

    p = sub.add_parser("train", help="learn a BPE vocabulary from text files and save it as JSON",
                       description="Learn a byte-level BPE vocabulary from UTF-8 text files.")
    p.add_argument("--input", nargs="+", required=True, metavar="FILE",
                   help="one or more UTF-8 text files to train on (each is pre-tokenised separately)")
    p.add_argument("--vocab-size", type=int, required=True, metavar="N",
                   help="total vocabulary size: 256 byte tokens + merges + special tokens")
    p.add_argument("--pattern", choices=sorted(SPLIT_PATTERNS), default="gpt4",
                   help="split regex applied before BPE: GPT-2's or GPT-4's (cl100k) (default: gpt4)")
    p.add_argument("--special", nargs="*", default=[ENDOFTEXT], metavar="TOKEN",
                   help=f"special tokens, given ids after the merges (default: {ENDOFTEXT}); "
                        "pass --special with no value for none")
    p.add_argument("--out", required=True, metavar="PATH", help="where to write the tokenizer (our JSON format)")
    p.add_argument("--tiktoken-out", metavar="PATH",
                   help="also write the ordinary tokens as a tiktoken rank file (base64 and rank per line)")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")

    p = sub.add_parser("encode", help="print the token ids of a text",
                       description="Encode text with a saved tokenizer and print the ids, space-separated.")
    p.add_argument("--tokenizer", required=True, metavar="PATH", help="tokenizer JSON written by `train`")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", metavar="T", help="the text to encode")
    src.add_argument("--input", metavar="FILE", help="a UTF-8 text file to encode")
    p.add_argument("--allow-special", action="store_true",
                   help="encode special-token text (e.g. <|endoftext|>) as the special token; "
                        "without this flag such text is an error")

    p = sub.add_parser("decode", help="print the text of token ids",
                       description="Decode token ids with a saved tokenizer and print the text.")
    p.add_argument("--tokenizer", required=True, metavar="PATH", help="tokenizer JSON written by `train`")
    p.add_argument("--ids", nargs="+", required=True, metavar="ID",
                   help="token ids, separated by spaces and/or commas (e.g. --ids 15496 995 or --ids 15496,995)")
    return parser


def _read(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise CLIError(f"input file not found: {path}") from None
    except IsADirectoryError:
        raise CLIError(f"input path is a directory, not a file: {path}") from None
    except UnicodeDecodeError as e:
        raise CLIError(f"{path} is not UTF-8 text ({e})") from None


def _load_tokenizer(path):
    try:
        return Tokenizer.load(path)
    except FileNotFoundError as e:
        raise CLIError(str(e)) from None
    except (TokenizerFormatError, IsADirectoryError) as e:
        raise CLIError(f"cannot read tokenizer: {e}") from None


def _train(args):
    if args.vocab_size < 256 + len(args.special):
        raise CLIError(f"--vocab-size must be at least 256 + {len(args.special)} (the byte tokens and the special "
                       f"tokens), got {args.vocab_size}")
    texts = [_read(path) for path in args.input]
    t0 = time.perf_counter()
    try:
        tok = Tokenizer.train(texts, args.vocab_size, pattern=args.pattern, special_tokens=args.special)
    except ValueError as e:
        raise CLIError(str(e)) from None
    seconds = time.perf_counter() - t0
    try:
        tok.save(args.out)
        if args.tiktoken_out:
            tok.save_tiktoken_file(args.tiktoken_out)
    except OSError as e:
        raise CLIError(f"cannot write the tokenizer: {e}") from None
    if not args.quiet:
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        print(f"trained {tok.n_vocab} tokens ({len(tok.merges)} merges, pattern {args.pattern}) on {n_bytes:,} bytes "
              f"in {seconds:.2f} s; saved to {args.out}", file=sys.stderr)
    return 0


def _encode(args):
    tok = _load_tokenizer(args.tokenizer)
    text = args.text if args.text is not None else _read(args.input)
    try:
        ids = tok.encode(text, allowed_special="all" if args.allow_special else "none_raise")
    except ValueError as e:
        raise CLIError(str(e).splitlines()[0] + " (pass --allow-special to encode it as the special token)") from None
    print(" ".join(map(str, ids)))
    return 0


def _decode(args):
    tok = _load_tokenizer(args.tokenizer)
    ids = []
    for field in args.ids:
        for s in field.replace(",", " ").split():
            try:
                ids.append(int(s))
            except ValueError:
                raise CLIError(f"--ids: {s!r} is not an integer token id") from None
    try:
        text = tok.decode(ids)
    except ValueError as e:
        raise CLIError(str(e)) from None
    sys.stdout.write(text + "\n")
    return 0


def main(argv=None, prog="python -m llm tokenizer"):
    """Run the tokenizer command line with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    args = build_parser(prog).parse_args(argv)
    handler = {"train": _train, "encode": _encode, "decode": _decode}[args.command]
    try:
        return handler(args)
    except CLIError as e:
        print(f"{prog} {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(prog="python -m llm.tokenizer.cli"))
