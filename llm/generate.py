"""Text generation: greedy decoding and sampling (temperature, top-k, top-p) with a KV cache.

    >>> new_ids = generate(model, tokenizer.encode("ROMEO:"), max_new_tokens=50, temperature=0.8, top_k=40,
    ...                    generator=np.random.default_rng(0))

``generate`` feeds the prompt once (the *prefill*), keeping every layer's keys
and values in ``nn.KVCache``\\ s, then one token per step: each step costs one
position's work instead of the whole prefix's, with the same logits as
recomputing everything (a test checks it token by token).

The context is limited to ``block_size`` positions. When the next token would
not fit in the cache, the caches are reset and the last ``block_size`` tokens
(the last ``block_size - 1`` before it and the new token) are prefilled again,
so every step sees what nanoGPT's uncached loop sees, ``ids[:, -block_size:]``;
from then on each step re-prefills (no cache reuse past the window).

``sample_next(logits, ...)`` is the sampling rule on a logits array alone:

- greedy (or temperature 0): the argmax;
- temperature T: softmax(logits / T);
- top-k: only the k largest logits stay (ties with the k-th stay too);
- top-p (nucleus, Holtzman et al. 2019): the smallest set of most probable
  tokens whose probabilities sum to at least p stays (always at least one);
- then one draw from the renormalised distribution with ``generator``.

``python -m llm generate --checkpoint ckpt.safetensors --prompt "..."`` runs
it from the command line.
"""

from __future__ import annotations

import argparse
import codecs
import math
import numbers
import sys

import numpy as np

from autograd import backend
from autograd.engine import no_grad
from autograd.tensor import Tensor


def _check_options(temperature, top_k, top_p):
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not temperature >= 0 \
            or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, numbers.Real)
                              or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def _as_generator(generator):
    if generator is None:
        return np.random.default_rng()
    if isinstance(generator, (int, np.integer)) and not isinstance(generator, bool):
        return np.random.default_rng(int(generator))
    if not isinstance(generator, np.random.Generator):
        raise TypeError(f"generator must be a numpy.random.Generator (or an int seed), got {type(generator).__name__}")
    return generator


def filter_logits(logits: np.ndarray, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> np.ndarray:
    """The log-probabilities (float64, (B, V)) that sampling draws from: scaled, top-k and top-p filtered.

    Removed tokens get -inf. ``temperature`` must be > 0 here.
    """
    x = np.array(logits, dtype=np.float64)  # a fresh (B, V) float64 copy, filtered in place
    if x.ndim != 2:
        raise ValueError(f"filter_logits needs logits of shape (B, V), got {x.shape}")
    x /= float(temperature)
    V = x.shape[-1]
    if top_k is not None and top_k < V:
        kth = np.partition(x, V - top_k, axis=-1)[:, V - top_k:V - top_k + 1]  # (B, 1): the k-th largest
        x[x < kth] = -np.inf
    x -= x.max(axis=-1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=-1, keepdims=True))  # log-softmax
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-x, axis=-1, kind="stable")  # (B, V): most probable first
        p_sorted = np.exp(np.take_along_axis(x, order, axis=-1))  # (B, V)
        before = np.cumsum(p_sorted, axis=-1) - p_sorted  # probability mass strictly before each token
        drop_sorted = before >= top_p  # keep while the mass before is < p: the first token always stays
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        x[drop] = -np.inf
        x -= np.log(np.exp(x).sum(axis=-1, keepdims=True))  # renormalise
    return x


def sample_next(logits, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                greedy: bool = False, generator=None) -> np.ndarray:
    """Pick the next token of each row of ``logits`` (B, V) (or (V,)); returns int64 ids (B,) (or a 0-d array).

    Greedy (or ``temperature == 0``) takes the argmax; otherwise one draw per row
    from ``filter_logits(logits, temperature, top_k, top_p)`` with ``generator``
    (a ``numpy.random.Generator``; an int is a seed). Logits on the GPU are
    brought to the CPU (one (B, V) copy) so that a seed draws the same tokens
    on every device.
    """
    _check_options(temperature, top_k, top_p)
    if isinstance(logits, Tensor):
        logits = logits.data
    logits = np.asarray(backend.to_device(logits, "cpu") if backend.is_array(logits) else logits)
    single = logits.ndim == 1
    if single:
        logits = logits[None]  # (1, V)
    if logits.ndim != 2 or logits.shape[-1] == 0:
        raise ValueError(f"sample_next needs logits of shape (B, V) or (V,), got {logits.shape}")
    if greedy or temperature == 0:
        ids = logits.argmax(axis=-1).astype(np.int64)
    else:
        gen = _as_generator(generator)
        logp = filter_logits(logits, temperature, top_k, top_p)  # (B, V)
        cdf = np.cumsum(np.exp(logp), axis=-1)  # (B, V)
        u = (1.0 - gen.random(logits.shape[0]))[:, None] * cdf[:, -1:]  # (B, 1), in (0, total]
        ids = (cdf < u).sum(axis=-1).astype(np.int64)  # the first index whose cdf reaches u
        ids = np.minimum(ids, logits.shape[-1] - 1)
    return ids[0] if single else ids


def _as_rows(ids):
    """The prompt as a list of 1-D int64 arrays (one per row) and whether it was a single 1-D prompt.

    Accepts a 1-D sequence, a (B, T) array, or a list of B sequences of any lengths.
    """
    if isinstance(ids, Tensor):
        ids = ids.data
    if backend.is_array(ids):
        ids = backend.to_device(ids, "cpu")
    if isinstance(ids, (list, tuple)) and ids and all(isinstance(r, (list, tuple, np.ndarray)) for r in ids):
        rows = [np.asarray(r) for r in ids]  # possibly ragged
        single = False
    else:
        prompt = np.asarray(ids)
        single = prompt.ndim == 1
        if prompt.ndim not in (1, 2):
            raise ValueError(f"generate: the prompt must be a 1-D sequence, a (B, T) array or a list of sequences, "
                             f"got shape {prompt.shape}")
        rows = [prompt] if single else list(prompt)
    if not rows:
        raise ValueError("generate: the batch of prompts is empty")
    for i, r in enumerate(rows):
        if r.ndim != 1 or r.size == 0:
            raise ValueError(f"generate: prompt {i} must be a non-empty 1-D sequence of token ids, got shape "
                             f"{r.shape}; to start from nothing, pass the end-of-text token")
        if r.dtype.kind not in "iu":
            raise TypeError(f"generate: ids must be integer token ids, got dtype {r.dtype}")
    return [r.astype(np.int64) for r in rows], single


class _Prefill:
    """Feeds rows of possibly different lengths (each cropped to its last ``block`` tokens) into empty caches.

    Rows of one length go in as they are. Otherwise they are left-padded to the
    longest: ``pad[i]`` pad slots in front of row i, masked out as keys, and
    positions that count from the row's first real token. ``keys`` (B, block)
    says which cache slots are real keys; later tokens are always real.
    """

    def __init__(self, model, rows, caches, block: int):
        lens = np.array([min(len(r), block) for r in rows])
        width = int(lens.max())
        for c in caches:
            c.reset()
        if (lens == width).all():
            self.pad = self.keys = None
            ids = np.stack([r[len(r) - width:] for r in rows])  # (B, width)
            self.logits = _last_logits(model, ids, caches)
            return
        B = len(rows)
        self.pad = width - lens  # (B,)
        ids = np.zeros((B, width), dtype=np.int64)
        self.keys = np.ones((B, block), dtype=bool)
        for i, r in enumerate(rows):
            ids[i, self.pad[i]:] = r[len(r) - lens[i]:]
            self.keys[i, :self.pad[i]] = False
        positions = np.maximum(np.arange(width)[None, :] - self.pad[:, None], 0)  # (B, width); pads at 0
        self.logits = _last_logits(model, ids, caches, positions, self.keys[:, None, None, :width])

    def step(self, model, nxt, caches):
        """Logits (B, V) after feeding the new tokens ``nxt`` (B,) into the caches."""
        if self.pad is None:
            return _last_logits(model, nxt[:, None], caches)
        slot = caches[0].offset  # the new token's cache slot
        positions = (slot - self.pad)[:, None]  # (B, 1)
        return _last_logits(model, nxt[:, None], caches, positions, self.keys[:, None, None, :slot + 1])


def _last_logits(model, ids, caches, position_ids=None, attention_mask=None):
    logits, _ = model(ids, kv_caches=caches, last_only=True, position_ids=position_ids,
                      attention_mask=attention_mask)  # (B, 1, V)
    return logits.data[:, -1]  # (B, V)


def generate(model, ids, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, greedy: bool = False, eos_id: int | None = None,
             generator=None, on_token=None) -> np.ndarray:
    """Continue ``ids`` by up to ``max_new_tokens`` tokens; returns the new ids (int64 NumPy).

    ``ids``: a 1-D prompt (list or array) -> a 1-D result; ``(B, T)`` or a list
    of B prompts of different lengths -> ``(B, n)``. Prompts of different
    lengths are left-padded and masked (``GPT.forward``'s ``attention_mask``
    and ``position_ids``): each row continues exactly as it would alone.
    Sampling options: see ``sample_next``. Generation stops after
    ``max_new_tokens``, once every row has produced ``eos_id`` (the eos token
    is included; a row that finished early is padded with ``eos_id``), or when
    ``on_token(new)`` returns True: it is called after every step with that
    step's tokens (B,) (streaming, stop strings). Runs under ``no_grad`` with the
    model in eval mode (its mode is restored).
    """
    _check_options(temperature, top_k, top_p)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    rows, single = _as_rows(ids)
    gen = None if (greedy or temperature == 0) else _as_generator(generator)
    B = len(rows)
    block = model.config.block_size
    out = np.empty((B, max_new_tokens), dtype=np.int64)
    done = np.zeros(B, dtype=bool)
    n = 0
    was_training = model.training
    model.eval()
    try:
        with no_grad():
            if max_new_tokens:
                caches = model.new_kv_caches(block)
                state = _Prefill(model, rows, caches, block)
                logits = state.logits
            while n < max_new_tokens:
                nxt = sample_next(logits, temperature, top_k, top_p, greedy, gen)  # (B,)
                if eos_id is not None:
                    nxt = np.where(done, eos_id, nxt)
                    done |= nxt == eos_id
                out[:, n] = nxt
                n += 1
                if on_token is not None and on_token(nxt):
                    break
                if n == max_new_tokens or (eos_id is not None and done.all()):
                    break
                if caches[0].offset + 1 <= block:
                    logits = state.step(model, nxt, caches)  # (B, 1) new tokens
                else:  # the window is full: start again from the last block_size tokens of every row
                    state = _Prefill(model, [np.concatenate([r, out[i, :n]]) for i, r in enumerate(rows)], caches,
                                     block)
                    logits = state.logits
    finally:
        model.train(was_training)
    out = out[:, :n]
    return out[0] if single else out


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------


class TextStream:
    """Writes the text of token ids to ``out`` as they come, never cutting a multi-byte character.

    A byte-level BPE token may end in the middle of a UTF-8 character (its
    other bytes come with the next token), so the bytes go through an
    incremental UTF-8 decoder that holds an unfinished character back until
    its last byte arrives; ``close()`` flushes what is left (an unfinished
    character becomes U+FFFD, as ``Tokenizer.decode`` would make it).
    """

    def __init__(self, tokenizer, out):
        self.tokenizer, self.out = tokenizer, out
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def write(self, ids):
        """Write the text of ``ids`` (as much of it as forms whole characters) and flush."""
        text = self.decoder.decode(self.tokenizer.decode_bytes([int(i) for i in ids]))
        if text:
            self.out.write(text)
            self.out.flush()

    def close(self):
        """Write what the decoder still holds."""
        text = self.decoder.decode(b"", final=True)
        if text:
            self.out.write(text)
        self.out.flush()


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors: ``PROG: error: MESSAGE (see --help)``, exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _temperature(text: str) -> float:
    value = float(text)
    if not value >= 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0 (0 means greedy), got {text!r}")
    return value


def main(argv=None) -> int:
    """``python -m llm generate``: continue a prompt with a trained checkpoint, streaming the text to stdout.

    The prompt is printed first, then each token as it is made; Ctrl-C stops
    generation and keeps what was shown (exit status 130).
    """
    parser = _Parser(
        prog="python -m llm generate",
        description="Generate text from a checkpoint written by `python -m llm train` (a safetensors file holding "
                    "the model, its config and its tokenizer). Prints the prompt followed by the continuation.")
    parser.add_argument("--checkpoint", required=True, help="path of the model checkpoint (.safetensors)")
    parser.add_argument("--prompt", default="",
                        help="text to continue (default: empty, which starts from the end-of-text token)")
    parser.add_argument("--max-new-tokens", type=int, default=100, help="how many tokens to generate (default 100)")
    parser.add_argument("--temperature", type=_temperature, default=1.0,
                        help="softmax temperature: < 1 sharper, > 1 flatter, 0 greedy (default 1.0)")
    parser.add_argument("--top-k", type=int, default=None,
                        help="sample only among the k most probable tokens (default: all)")
    parser.add_argument("--top-p", type=float, default=None,
                        help="nucleus sampling: only the smallest set of most probable tokens whose probability "
                             "sums to at least p, 0 < p <= 1 (default: off)")
    parser.add_argument("--greedy", action="store_true", help="always take the most probable token (no sampling)")
    parser.add_argument("--seed", type=int, default=None, help="random seed for sampling (default: fresh entropy)")
    parser.add_argument("--device", default="cpu", help="'cpu' or 'cuda' (needs CuPy) (default cpu)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer JSON file to use when the checkpoint does not contain one")
    parser.add_argument("--no-stop", action="store_true",
                        help="do not stop at the end-of-text token; always generate --max-new-tokens tokens")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 0:
        parser.error("--max-new-tokens must be >= 0")
    if args.top_k is not None and args.top_k < 1:
        parser.error("--top-k must be >= 1")
    if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
        parser.error("--top-p must be in (0, 1]")

    from .checkpoint import CheckpointError, load_model

    def fail(msg):
        print(f"python -m llm generate: error: {msg}", file=sys.stderr)
        return 2

    try:
        model, tokenizer, _ = load_model(args.checkpoint, device=args.device)
    except CheckpointError as e:
        return fail(str(e))
    except (RuntimeError, ValueError) as e:  # e.g. device 'cuda' without CuPy
        return fail(str(e))
    if args.tokenizer is not None:
        from .tokenizer import Tokenizer

        try:
            tokenizer = Tokenizer.load(args.tokenizer)
        except (OSError, ValueError) as e:
            return fail(f"cannot load tokenizer {args.tokenizer}: {e}")
        if tokenizer.n_vocab > model.config.vocab_size:
            return fail(f"tokenizer {args.tokenizer} has {tokenizer.n_vocab} tokens, more than the model's "
                        f"vocab_size {model.config.vocab_size}")
    if tokenizer is None:
        return fail(f"checkpoint {args.checkpoint} has no tokenizer; pass --tokenizer PATH")
    try:
        eot = tokenizer.eot_token
    except KeyError:
        eot = None
    try:
        prompt_ids = tokenizer.encode(args.prompt, allowed_special="all") if args.prompt else []
    except ValueError as e:
        return fail(f"cannot encode the prompt: {e}")
    if not prompt_ids:
        if eot is None:
            return fail("the prompt is empty and the tokenizer has no end-of-text token to start from; "
                        "pass --prompt TEXT")
        start = [eot]
    else:
        start = prompt_ids
    eos = None if args.no_stop else eot
    stream = TextStream(tokenizer, sys.stdout)
    stream.write(prompt_ids)

    def show(new):
        if int(new[0]) != eos:  # the end-of-text token that stops generation is not printed
            stream.write(new[:1])

    try:
        generate(model, start, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                 top_p=args.top_p, greedy=args.greedy, eos_id=eos, generator=np.random.default_rng(args.seed),
                 on_token=show)
    except KeyboardInterrupt:
        stream.close()
        sys.stdout.write("\n")
        print("python -m llm generate: interrupted; the text above is what was generated", file=sys.stderr)
        return 130
    stream.close()
    sys.stdout.write("\n")
    sys.stdout.flush()
    return 0


__all__ = ["filter_logits", "sample_next", "generate", "TextStream", "main"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
