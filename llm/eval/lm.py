"""lm-evaluation-harness's three request types, answered by our GPT: the engine of the evaluator.

    >>> lm = ModelLM(model, tokenizer, batch_size=8)
    >>> lm.loglikelihood([("The capital of France is", " Paris")])   # [(sum of log-probs, is_greedy)]
    >>> lm.loglikelihood_rolling(["a whole document ..."])           # [sum of log-probs of every token]
    >>> lm.generate_until([("Q: 2+2?\\nA:", {"until": ["\\n"], "max_gen_toks": 32})])   # ["<the answer>"]

The semantics are the harness's (``lm_eval/api/model.py`` and
``lm_eval/models/huggingface.py``), so that scores computed from them mean
what the harness's mean:

- ``loglikelihood(context, continuation)``: trailing spaces of the context
  move to the front of the continuation; the pair is encoded whole and split
  where the context's own encoding ends; an empty context is the end-of-text
  token (unless the continuation starts with it). The model reads
  ``(context + continuation)[-(max_length + 1):][:-1]``, so a long input loses
  tokens on the left and no position past the model's context is ever used;
  the result is the sum of the continuation tokens' log-probabilities and
  whether each of them is the argmax.
- ``loglikelihood_rolling(text)``: the text's tokens in disjoint windows of
  ``max_length`` predictions (the first conditioned on end-of-text, the others
  on the ``max_length`` tokens before them), so every token is predicted
  exactly once (``rolling_windows``).
- ``generate_until(context, gen_kwargs)``: ``until`` (stop strings, plus the
  end-of-text text), ``max_gen_toks`` (default 256), ``do_sample`` and
  ``temperature`` (greedy by default; also ``top_k``, ``top_p``). The context is
  cut from the left to ``max_length - max_gen_toks`` tokens; a row stops at
  end-of-text or once a stop string appears; the text returned is cut before
  the first stop string.

Batching: loglikelihood inputs are de-duplicated (multiple-choice questions
whose one-token answers share a context need one forward), sorted longest
first and right-padded, ``batch_size`` sequences per forward; generation
requests are grouped by their generation options, sorted longest first and
left-padded into KV-cached batches (``llm.generate.generate``). Results come
back in the caller's order. Everything runs under ``no_grad`` in eval mode.
"""

from __future__ import annotations

import json
import math
import numbers

import numpy as np

from autograd import backend
from autograd.engine import no_grad

from ..generate import generate

#: logits of one forward are kept under this many bytes (long windows of a large vocabulary go in fewer rows)
LOGITS_BUDGET_BYTES = 256 * 2**20

_GEN_KEYS = {"until", "max_gen_toks", "max_new_tokens", "do_sample", "temperature", "top_k", "top_p"}


def rolling_windows(tokens: list[int], prefix_token: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """Disjoint ``(context, predicted)`` windows that predict every token of ``tokens`` exactly once.

    The first window predicts ``tokens[:max_length]`` from ``prefix_token``
    followed by them; each later window predicts the next ``max_length``
    tokens (fewer at the end), its context being only the token just before
    them, while the model still reads the ``max_length`` tokens before each
    prediction. (The harness's ``get_rolling_token_windows`` with
    ``context_len=1`` followed by ``make_disjoint_window``.)
    """
    if max_length < 1:
        raise ValueError(f"rolling_windows: max_length must be >= 1, got {max_length}")
    windows = []
    if not tokens:
        return windows
    first = min(max_length, len(tokens))
    windows.append(([prefix_token], list(tokens[:first])))
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, max_length)
        end = done + n
        window = list(tokens[max(0, end - max_length - 1):end - 1])  # the max_length inputs before `end`
        windows.append((window[:len(window) - (n - 1)], list(tokens[end - n:end])))
        done = end
    return windows


def _normalize_gen_kwargs(kwargs, default_max_gen_toks: int) -> dict:
    """The harness's generation options as ``until`` (list), ``max_gen_toks``, ``greedy``, ``temperature``,
    ``top_k``, ``top_p``; a clear error for anything else."""
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, dict):
        raise TypeError(f"generate_until: generation options must be a dict, got {type(kwargs).__name__}")
    unknown = sorted(set(kwargs) - _GEN_KEYS)
    if unknown:
        raise ValueError(f"generate_until: unknown generation option(s) {unknown}; supported: {sorted(_GEN_KEYS)}")
    until = kwargs.get("until", [])
    if until is None:
        until = []
    elif isinstance(until, str):
        until = [until]
    elif not (isinstance(until, (list, tuple)) and all(isinstance(u, str) for u in until)):
        raise TypeError(f"generate_until: 'until' must be a string or a list of strings, got {until!r}")
    max_gen = kwargs.get("max_gen_toks", kwargs.get("max_new_tokens", default_max_gen_toks))
    if isinstance(max_gen, bool) or not isinstance(max_gen, numbers.Integral) or max_gen < 1:
        raise ValueError(f"generate_until: max_gen_toks must be a positive integer, got {max_gen!r}")
    temperature = kwargs.get("temperature", 0.0)
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not math.isfinite(temperature) \
            or temperature < 0:
        raise ValueError(f"generate_until: temperature must be a finite number >= 0, got {temperature!r}")
    do_sample = kwargs.get("do_sample")
    if do_sample is None:
        do_sample = temperature > 0
    greedy = not do_sample or temperature == 0  # the harness: do_sample=False means temperature 0
    return dict(until=list(until), max_gen_toks=int(max_gen), greedy=greedy,
                temperature=0.0 if greedy else float(temperature), top_k=kwargs.get("top_k"),
                top_p=kwargs.get("top_p"))


def _first_stop(text: str, until: list[str]) -> int:
    """Index of the earliest occurrence in ``text`` of any non-empty stop string (len(text) if none)."""
    cut = len(text)
    for s in until:
        if s:
            i = text.find(s)
            if i != -1:
                cut = min(cut, i)
    return cut


class ModelLM:
    """Our GPT and its tokenizer behind lm-evaluation-harness's three request types (see the module doc).

    ``batch_size``: sequences per forward (and rows per generation batch).
    ``max_length``: the longest input the model reads (default and maximum:
    the model's ``block_size``). ``max_gen_toks``: the default generation
    length (the harness's 256). ``progress``: a tqdm bar over requests.
    ``seed``: the sampling generator's seed (the harness's 1234).
    """

    def __init__(self, model, tokenizer, batch_size: int = 8, max_length: int | None = None,
                 max_gen_toks: int = 256, progress: bool = True, seed: int = 1234):
        block = model.config.block_size
        if max_length is None:
            max_length = block
        for name, value in (("batch_size", batch_size), ("max_length", max_length), ("max_gen_toks", max_gen_toks)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"ModelLM: {name} must be a positive integer, got {value!r}")
        if max_length > block:
            raise ValueError(f"ModelLM: max_length={max_length} exceeds the model's context of {block} positions; "
                             f"use max_length <= {block}")
        if tokenizer.n_vocab > model.config.vocab_size:
            raise ValueError(f"ModelLM: the tokenizer has {tokenizer.n_vocab} tokens, more than the model's "
                             f"vocab_size {model.config.vocab_size}; they do not belong together")
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_length, self.max_gen_toks = int(batch_size), int(max_length), int(max_gen_toks)
        self.progress = bool(progress)
        self.generator = np.random.default_rng(seed)
        self._special_ids = set(tokenizer.special_tokens.values())
        #: how many loglikelihood inputs lost tokens on the left to fit ``max_length`` (the harness warns)
        self.n_truncated = 0

    # -- tokens --------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        """The end-of-text id: where generation stops and what an empty context is conditioned on."""
        try:
            return self.tokenizer.eot_token
        except KeyError:
            raise ValueError("ModelLM: the tokenizer has no <|endoftext|> token, which empty contexts, rolling "
                             "windows and generation need; use a tokenizer trained with it") from None

    prefix_token_id = eot_token_id

    def tok_encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (special-token text such as ``<|endoftext|>`` becomes that token, as in HF)."""
        if not isinstance(text, str):
            raise TypeError(f"ModelLM: requests must hold strings, got {type(text).__name__}: {text!r:.80}")
        return self.tokenizer.encode(text, allowed_special="all")

    def tok_decode(self, ids) -> str:
        """Text of ``ids`` without special tokens (the harness decodes with ``skip_special_tokens=True``)."""
        return self.tokenizer.decode([int(i) for i in ids if int(i) not in self._special_ids])

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """The harness's encoding of a (context, continuation) request into two lists of token ids."""
        if not isinstance(context, str) or not isinstance(continuation, str):
            raise TypeError(f"loglikelihood: a request is a (context, continuation) pair of strings, got "
                            f"({type(context).__name__}, {type(continuation).__name__})")
        if context == "":
            cont = self.tok_encode(continuation)
            if cont and cont[0] == self.prefix_token_id:
                return cont[:1], cont[1:]
            return [self.prefix_token_id], cont
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.tok_encode(context + continuation)
        context_enc = self.tok_encode(context)
        return context_enc, whole[len(context_enc):]

    # -- the three request types ----------------------------------------------
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """``[(sum of log P(continuation | context), is_greedy)]`` for ``(context, continuation)`` pairs."""
        pairs = [self.encode_pair(*self._pair(r)) for r in requests]
        return self.loglikelihood_tokens(pairs, desc="loglikelihood")

    def loglikelihood_rolling(self, texts) -> list[float]:
        """The log-likelihood of each whole text (every token predicted once, in disjoint windows)."""
        texts = list(texts)
        windows, owner = [], []
        for i, text in enumerate(texts):
            for w in rolling_windows(self.tok_encode(text), self.prefix_token_id, self.max_length):
                windows.append(w)
                owner.append(i)
        totals = [0.0] * len(texts)
        for i, (logp, _) in zip(owner, self.loglikelihood_tokens(windows, desc="loglikelihood_rolling")):
            totals[i] += logp
        return totals

    def generate_until(self, requests) -> list[str]:
        """The model's continuation of each ``(context, gen_kwargs)`` request, cut before its first stop string."""
        requests = [self._gen_request(r) for r in requests]
        groups: dict[str, list[int]] = {}
        for i, (_, kwargs) in enumerate(requests):
            groups.setdefault(json.dumps(kwargs, sort_keys=True, default=repr), []).append(i)
        results: list[str | None] = [None] * len(requests)
        bar = self._bar(len(requests), "generate_until")
        try:
            for members in groups.values():
                opts = _normalize_gen_kwargs(requests[members[0]][1], self.max_gen_toks)
                max_ctx = self.max_length - opts["max_gen_toks"]
                if max_ctx < 1:
                    raise ValueError(f"generate_until: max_gen_toks={opts['max_gen_toks']} leaves no room for the "
                                     f"context in a model that reads {self.max_length} positions; lower max_gen_toks "
                                     f"below {self.max_length}")
                encoded = {i: self.tok_encode(requests[i][0]) for i in members}
                order = sorted(members, key=lambda i: (-len(encoded[i]), requests[i][0]))  # the harness's order
                for b in range(0, len(order), self.batch_size):
                    chunk = order[b:b + self.batch_size]
                    contexts = [encoded[i][-max_ctx:] or [self.eot_token_id] for i in chunk]
                    for i, text in zip(chunk, self._generate_batch(contexts, opts)):
                        results[i] = text
                    bar.update(len(chunk))
        finally:
            bar.close()
        return results

    # -- on token ids ----------------------------------------------------------
    def loglikelihood_tokens(self, requests, desc: str = "loglikelihood") -> list[tuple[float, bool]]:
        """``[(sum of log-probs, is_greedy)]`` for ``(context_ids, continuation_ids)`` pairs of token-id lists.

        The context must not be empty (condition on ``prefix_token_id``
        instead); inputs longer than ``max_length + 1`` tokens lose tokens on
        the left. Requests with the same model input share one forward.
        """
        L = self.max_length
        inputs: dict[tuple, int] = {}  # model input -> its index in `unique`
        unique, plan = [], []  # plan[r] = (input index, continuation ids)
        for r, req in enumerate(requests):
            ctx, cont = self._token_pair(req, r)
            whole = ctx + cont
            if len(whole) > L + 1:
                self.n_truncated += 1
            inp = tuple(whole[-(L + 1):][:-1])
            u = inputs.get(inp)
            if u is None:
                u = inputs[inp] = len(unique)
                unique.append(inp)
            plan.append((u, cont))
        users: list[list[int]] = [[] for _ in unique]
        for r, (u, _) in enumerate(plan):
            users[u].append(r)

        results: list[tuple[float, bool] | None] = [None] * len(plan)
        order = sorted(range(len(unique)), key=lambda u: (-len(unique[u]), unique[u]))  # longest first
        bar = self._bar(len(plan), desc)
        try:
            for batch in self._batches(order, unique):
                logits = self._forward_right_padded([unique[u] for u in batch])  # (b, T, V)
                for row, u in enumerate(batch):
                    n = len(unique[u])
                    for r in users[u]:
                        cont = plan[r][1]
                        results[r] = _score(logits[row, n - len(cont):n], cont)
                    bar.update(len(users[u]))
        finally:
            bar.close()
        return results

    # -- internals --------------------------------------------------------------
    def _bar(self, total: int, desc: str):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, disable=not self.progress, leave=False)

    @staticmethod
    def _pair(request):
        if not isinstance(request, (tuple, list)) or len(request) != 2:
            raise TypeError(f"loglikelihood: each request is a (context, continuation) pair, got {request!r:.100}")
        return request

    @staticmethod
    def _gen_request(request):
        if not isinstance(request, (tuple, list)) or len(request) != 2 or not isinstance(request[0], str):
            raise TypeError(f"generate_until: each request is a (context, gen_kwargs) pair, got {request!r:.100}")
        return request[0], dict(request[1] or {})

    def _token_pair(self, req, r):
        if not isinstance(req, (tuple, list)) or len(req) != 2:
            raise TypeError(f"loglikelihood_tokens: request {r} must be a (context_ids, continuation_ids) pair, "
                            f"got {req!r:.100}")
        ctx, cont = [int(t) for t in req[0]], [int(t) for t in req[1]]
        if not ctx:
            raise ValueError(f"loglikelihood_tokens: request {r} has an empty context; condition on the "
                             f"end-of-text token [{self.prefix_token_id}] instead (loglikelihood does)")
        if not cont:
            raise ValueError(f"loglikelihood_tokens: request {r} has an empty continuation: nothing to score")
        if len(cont) > self.max_length:
            raise ValueError(f"loglikelihood_tokens: request {r}'s continuation has {len(cont)} tokens, more than "
                             f"the {self.max_length} the model can score at once; use loglikelihood_rolling")
        V = self.model.config.vocab_size
        bad = [t for t in ctx + cont if not 0 <= t < V]
        if bad:
            raise ValueError(f"loglikelihood_tokens: request {r} holds token id {bad[0]} outside the model's "
                             f"vocabulary 0 .. {V - 1}")
        return ctx, cont

    def _batches(self, order, unique):
        """Runs of ``order`` of at most ``batch_size`` inputs whose logits fit ``LOGITS_BUDGET_BYTES``."""
        row_bytes = 4 * self.model.config.vocab_size
        i = 0
        while i < len(order):
            longest = len(unique[order[i]])  # sorted longest first: the first input sets the padded length
            n = max(1, min(self.batch_size, LOGITS_BUDGET_BYTES // (row_bytes * longest)))
            yield order[i:i + n]
            i += n

    def _forward_right_padded(self, seqs):
        """Logits (b, T, V) as a float32 NumPy array for sequences right-padded to the longest, T."""
        T = max(len(s) for s in seqs)
        ids = np.zeros((len(seqs), T), dtype=np.int64)  # padding sits after each row: causality ignores it
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = s
        model = self.model
        was_training = model.training
        model.eval()
        try:
            with no_grad():
                logits, _ = model(ids)
        finally:
            model.train(was_training)
        return np.asarray(backend.to_device(logits.data, "cpu"))

    def _generate_batch(self, contexts, opts) -> list[str]:
        """Continue each context (token lists) and return the texts cut before their first stop string."""
        until = list(opts["until"])
        eot = self.eot_token_id
        eot_text = self.tokenizer.decode([eot])
        if eot_text not in until:
            until.append(eot_text)  # the harness adds the end-of-text text to the stop strings
        B = len(contexts)
        tokens: list[list[int]] = [[] for _ in range(B)]
        finished = np.zeros(B, dtype=bool)

        def on_token(new):
            for i in np.flatnonzero(~finished):
                t = int(new[i])
                if t == eot:
                    finished[i] = True
                    continue
                tokens[i].append(t)
                text = self.tok_decode(tokens[i])
                if any(s and s in text for s in until):
                    finished[i] = True
            return bool(finished.all())

        generate(self.model, contexts, opts["max_gen_toks"], temperature=opts["temperature"] or 1.0,
                 top_k=opts["top_k"], top_p=opts["top_p"], greedy=opts["greedy"], generator=self.generator,
                 on_token=on_token)
        texts = [self.tok_decode(t) for t in tokens]
        return [text[:_first_stop(text, until)] for text in texts]


def _score(logits, cont) -> tuple[float, bool]:
    """(sum of log-softmax(logits)[i, cont[i]], every cont[i] the argmax) for logits (n, V) of n continuation tokens."""
    cont = np.asarray(cont)
    greedy = bool((logits.argmax(axis=-1) == cont).all())
    x = logits.astype(np.float64)  # (n, V)
    m = x.max(axis=-1, keepdims=True)
    logz = m[:, 0] + np.log(np.exp(x - m).sum(axis=-1))  # (n,)
    return float((x[np.arange(len(cont)), cont] - logz).sum()), greedy


__all__ = ["ModelLM", "rolling_windows", "LOGITS_BUDGET_BYTES"]
