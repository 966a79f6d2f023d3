"""ModelLM: the harness's three request types, checked against independent computations.

References are plain: one full-sequence forward per request with no batching and
no padding, in float64; an exact bigram model for the rolling windows; windows
written out by hand.
"""

import numpy as np
import pytest

from autograd import Tensor, no_grad
from llm.eval.lm import ModelLM, rolling_windows
from llm.generate import generate
from llm.model import GPT, GPTConfig, get_preset
from llm.tokenizer import Tokenizer

TEXT = ("to be or not to be, that is the question. whether tis nobler in the mind to suffer "
        "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles. ") * 4


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(TEXT, vocab_size=300)


def make_model(tok, block_size=24, dtype=np.float64, seed=0, llama=False):
    if llama:
        config = get_preset("llama-tiny", vocab_size=tok.n_vocab, block_size=block_size, n_layer=2, n_head=4,
                            n_kv_head=2, n_embd=16, mlp_hidden_dim=32)
    else:
        config = GPTConfig(vocab_size=tok.n_vocab, block_size=block_size, n_layer=2, n_head=2, n_embd=16)
    model = GPT(config, generator=np.random.default_rng(seed), dtype=dtype)
    rng = np.random.default_rng(seed + 1)
    for name, p in model.named_parameters():  # larger weights than GPT-2's init: peaked, varied predictions
        p.data[...] = (rng.standard_normal(p.shape) * 0.5 + (1.0 if p.ndim == 1 and name.endswith("weight") else 0))
    return model


def log_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def reference_loglikelihood(model, ctx, cont, max_length):
    """One unpadded forward of (ctx + cont)[-(max_length + 1):][:-1]; the last len(cont) rows score cont."""
    inp = (ctx + cont)[-(max_length + 1):][:-1]
    with no_grad():
        logits, _ = model(np.array([inp]))
    logp = log_softmax(logits.data[0])[len(inp) - len(cont):]  # (len(cont), V)
    total = float(logp[np.arange(len(cont)), cont].sum())
    greedy = bool((logp.argmax(axis=-1) == np.array(cont)).all())
    return total, greedy


# ---------------------------------------------------------------------------
# encoding a request
# ---------------------------------------------------------------------------


def test_trailing_spaces_move_to_the_continuation(tok):
    lm = ModelLM(make_model(tok), tok, progress=False)
    ctx, cont = lm.encode_pair("to be or not  ", "to be")
    assert ctx == tok.encode("to be or not")
    assert ctx + cont == tok.encode("to be or not  to be")
    assert tok.decode(cont) == "  to be"
    # the split is where the context's own encoding ends, even where a token would cross it
    ctx, cont = lm.encode_pair("the slin", "gs and")
    assert ctx == tok.encode("the slin") and ctx + cont == tok.encode("the slings and")[:len(ctx + cont)]
    assert tok.decode(ctx + cont) == "the slings and"


def test_empty_context_is_conditioned_on_end_of_text(tok):
    lm = ModelLM(make_model(tok), tok, progress=False)
    eot = tok.eot_token
    assert lm.encode_pair("", "to be") == ([eot], tok.encode("to be"))
    # a continuation that starts with end-of-text is its own context
    assert lm.encode_pair("", "<|endoftext|>to be") == ([eot], tok.encode("to be"))
    [(got, _)] = lm.loglikelihood([("", " the question")])
    ref, _ = reference_loglikelihood(lm.model, [eot], tok.encode(" the question"), lm.max_length)
    assert got == pytest.approx(ref, rel=1e-12)


def test_bad_requests_are_clear_errors(tok):
    lm = ModelLM(make_model(tok), tok, progress=False)
    with pytest.raises(TypeError, match="pair"):
        lm.loglikelihood(["just a string"])
    with pytest.raises(TypeError, match="strings"):
        lm.loglikelihood([("ctx", 3)])
    with pytest.raises(ValueError, match="empty continuation"):
        lm.loglikelihood_tokens([([1, 2], [])])
    with pytest.raises(ValueError, match="empty context"):
        lm.loglikelihood_tokens([([], [1])])
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        lm.loglikelihood_tokens([([1], [10**6])])
    with pytest.raises(ValueError, match="exceeds the model's context"):
        ModelLM(lm.model, tok, max_length=1000)


# ---------------------------------------------------------------------------
# loglikelihood
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("llama", [False, True], ids=["gpt2", "llama"])
def test_loglikelihood_equals_one_plain_forward_per_request(tok, llama):
    model = make_model(tok, llama=llama)
    lm = ModelLM(model, tok, batch_size=3, progress=False)
    requests = [("to be or not", " to be"), ("that is the", " question."), ("whether tis nobler in the mind ", "to"),
                ("the slings", " and arrows of outrageous fortune"), ("a", " sea"), ("to be or not", " to be")]
    got = lm.loglikelihood(requests)
    assert len(got) == len(requests)
    for (c, x), (logp, greedy) in zip(requests, got):
        ref = reference_loglikelihood(model, *lm.encode_pair(c, x), lm.max_length)
        assert logp == pytest.approx(ref[0], rel=1e-10, abs=1e-10)
        assert greedy == ref[1]
        assert logp < 0


def test_long_inputs_are_cut_from_the_left_as_the_harness_does(tok):
    model = make_model(tok, block_size=12)
    lm = ModelLM(model, tok, batch_size=4, progress=False)
    rng = np.random.default_rng(0)
    ctx = rng.integers(0, 256, 30).tolist()
    requests = [(ctx, rng.integers(0, 256, n).tolist()) for n in (1, 5, 12)] + [(ctx[:3], [7, 8])]
    got = lm.loglikelihood_tokens(requests)
    assert lm.n_truncated == 3
    for (c, x), (logp, greedy) in zip(requests, got):
        # the model reads exactly the max_length tokens before the last one, and no more
        ref = reference_loglikelihood(model, c, x, 12)
        assert logp == pytest.approx(ref[0], rel=1e-10)
        assert greedy == ref[1]
    # the same as scoring the cut sequence directly
    whole = ctx + requests[1][1]
    cut = reference_loglikelihood(model, whole[-13:-5], whole[-5:], 12)
    assert got[1][0] == pytest.approx(cut[0], rel=1e-10)
    with pytest.raises(ValueError, match="more than the 12"):
        lm.loglikelihood_tokens([([1], list(range(13)))])


def test_is_greedy_is_true_exactly_for_the_argmax_continuation(tok):
    model = make_model(tok)
    lm = ModelLM(model, tok, progress=False)
    ctx = tok.encode("to be or not")
    best = generate(model, ctx, 4, greedy=True).tolist()
    other = best[:3] + [(best[3] + 1) % tok.n_vocab]
    (lp_best, g_best), (lp_other, g_other) = lm.loglikelihood_tokens([(ctx, best), (ctx, other)])
    assert g_best and not g_other
    assert lp_best > lp_other


def test_batched_equals_unbatched_and_keeps_the_callers_order(tok):
    model = make_model(tok, dtype=np.float32)
    rng = np.random.default_rng(3)
    requests = [(rng.integers(0, 256, rng.integers(1, 20)).tolist(), rng.integers(0, 256, rng.integers(1, 6)).tolist())
                for _ in range(23)]
    requests += requests[:4]  # repeats share a forward
    one = ModelLM(model, tok, batch_size=1, progress=False).loglikelihood_tokens(requests)
    many = ModelLM(model, tok, batch_size=7, progress=False).loglikelihood_tokens(requests)
    np.testing.assert_allclose([r[0] for r in many], [r[0] for r in one], rtol=2e-5)
    assert [r[1] for r in many] == [r[1] for r in one]
    assert many[23:] == many[:4]


def test_requests_with_one_input_share_one_forward(tok):
    """Multiple choice with one-token answers: every choice reads the same input (the context)."""
    model = make_model(tok)
    calls = []
    original = model.forward

    def counting(ids, *a, **k):
        calls.append(np.asarray(ids).shape)
        return original(ids, *a, **k)

    model.forward = counting
    lm = ModelLM(model, tok, batch_size=1, progress=False)
    ctx = tok.encode("that is the")
    out = lm.loglikelihood_tokens([(ctx, [t]) for t in (5, 9, 40, 41)])
    assert len(calls) == 1
    with no_grad():
        logits, _ = original(np.array([ctx]))
    logp = log_softmax(logits.data[0, -1])
    np.testing.assert_allclose([o[0] for o in out], logp[[5, 9, 40, 41]], rtol=1e-12)


# ---------------------------------------------------------------------------
# rolling windows
# ---------------------------------------------------------------------------


def test_rolling_windows_by_hand():
    toks = list(range(10))
    assert rolling_windows(toks, 99, 4) == [([99], [0, 1, 2, 3]), ([3], [4, 5, 6, 7]), ([5, 6, 7], [8, 9])]
    assert rolling_windows(toks[:3], 99, 4) == [([99], [0, 1, 2])]
    assert rolling_windows([], 99, 4) == []
    assert rolling_windows(toks[:2], 99, 1) == [([99], [0]), ([0], [1])]


@pytest.mark.parametrize("n,L", [(1, 5), (5, 5), (6, 5), (23, 5), (40, 7), (9, 1)])
def test_rolling_windows_predict_every_token_once_from_what_precedes_it(n, L):
    toks = list(range(100, 100 + n))
    windows = rolling_windows(toks, 7, L)
    assert [t for _, pred in windows for t in pred] == toks  # every token exactly once, in order
    full = [7] + toks
    start = 1
    for ctx, pred in windows:
        inp = (ctx + pred)[:-1]  # what the model reads
        assert 1 <= len(inp) <= L
        assert full[start - len(ctx):start + len(pred) - 1] == inp  # the tokens just before each prediction
        start += len(pred)
    # and the model reads as much as it can: every window after the first reads a full max_length
    assert all(len((c + p)[:-1]) == L for c, p in windows[1:])


class BigramModel:
    """A stand-in model whose next-token log-probabilities depend only on the current token (a bigram table)."""

    def __init__(self, V, block_size, seed=0):
        from types import SimpleNamespace

        self.config = SimpleNamespace(block_size=block_size, vocab_size=V)
        self.table = np.random.default_rng(seed).standard_normal((V, V)) * 2.0  # logits of next | current
        self.training = False
        self.max_seen = 0

    def eval(self):
        self.training = False

    def train(self, mode=True):
        self.training = mode

    def __call__(self, ids, **kwargs):
        ids = np.asarray(ids)
        self.max_seen = max(self.max_seen, ids.shape[1])
        return Tensor(self.table[ids]), None


@pytest.mark.parametrize("L", [1, 4, 16, 64])
def test_rolling_loglikelihood_equals_an_exact_bigram_model(tok, L):
    model = BigramModel(tok.n_vocab, 64)
    lm = ModelLM(model, tok, batch_size=3, max_length=L, progress=False)
    texts = [TEXT[:200], "to", TEXT[50:130], ""]
    got = lm.loglikelihood_rolling(texts)
    logp = log_softmax(model.table)  # log P(next | current)
    for text, value in zip(texts, got):
        ids = [tok.eot_token] + tok.encode(text)
        exact = sum(logp[a, b] for a, b in zip(ids[:-1], ids[1:]))
        assert value == pytest.approx(exact, rel=1e-12, abs=1e-12)
    assert got[3] == 0.0
    assert model.max_seen <= L


def test_rolling_equals_sum_of_windows_on_a_gpt(tok):
    model = make_model(tok, block_size=10)
    lm = ModelLM(model, tok, batch_size=2, progress=False)
    [total] = lm.loglikelihood_rolling([TEXT[:120]])
    windows = rolling_windows(tok.encode(TEXT[:120]), tok.eot_token, 10)
    assert len(windows) > 2
    ref = sum(reference_loglikelihood(model, c, p, 10)[0] for c, p in windows)
    assert total == pytest.approx(ref, rel=1e-10)


# ---------------------------------------------------------------------------
# generate_until
# ---------------------------------------------------------------------------


def greedy_text(model, tok, context, n):
    """Plain greedy continuation of one context, decoded, stopping at end-of-text."""
    ids = generate(model, tok.encode(context) or [tok.eot_token], n, greedy=True, eos_id=tok.eot_token).tolist()
    if tok.eot_token in ids:
        ids = ids[:ids.index(tok.eot_token)]
    return tok.decode(ids)


def test_generate_until_cuts_before_the_first_stop_string(tok):
    model = make_model(tok, block_size=48)
    lm = ModelLM(model, tok, progress=False)
    free = greedy_text(model, tok, "to be or", 20)
    assert len(free) > 6
    stop_a, stop_b = free[2:4], free[4:6]  # two stop strings that occur in the free continuation
    [out] = lm.generate_until([("to be or", {"until": [stop_b, stop_a], "max_gen_toks": 20})])
    assert out == free[:min(free.find(stop_a), free.find(stop_b))]
    [out] = lm.generate_until([("to be or", {"until": "zzzz", "max_gen_toks": 20})])
    assert out == free
    [out] = lm.generate_until([("to be or", {"max_gen_toks": 3})])
    assert out == tok.decode(generate(model, tok.encode("to be or"), 3, greedy=True).tolist())


@pytest.mark.parametrize("llama", [False, True], ids=["gpt2", "llama"])
def test_generate_until_batched_with_padding_equals_one_by_one(tok, llama):
    model = make_model(tok, block_size=48, dtype=np.float32, llama=llama)
    contexts = ["to be", "that is the question. whether tis", "a", "the slings and arrows of", "", "or not to be"]
    kwargs = {"until": ["."], "max_gen_toks": 12}
    batched = ModelLM(model, tok, batch_size=4, progress=False).generate_until([(c, kwargs) for c in contexts])
    single = [ModelLM(model, tok, batch_size=1, progress=False).generate_until([(c, kwargs)])[0] for c in contexts]
    assert batched == single
    for c, out in zip(contexts, single):
        free = greedy_text(model, tok, c, 12)
        assert out == free[:free.find(".")] if "." in free else out == free
    assert len(set(batched)) > 2


def test_generate_until_cuts_the_context_from_the_left(tok):
    model = make_model(tok, block_size=16)
    lm = ModelLM(model, tok, progress=False)
    long = TEXT[:300]
    [out] = lm.generate_until([(long, {"max_gen_toks": 6, "until": []})])
    kept = tok.encode(long)[-(16 - 6):]
    assert out == tok.decode(generate(model, kept, 6, greedy=True).tolist())
    with pytest.raises(ValueError, match="max_gen_toks"):
        lm.generate_until([("x", {"max_gen_toks": 16})])
    with pytest.raises(ValueError, match="unknown generation option"):
        lm.generate_until([("x", {"max_gen_tokens": 3})])
    with pytest.raises(ValueError, match="temperature"):
        lm.generate_until([("x", {"do_sample": True, "temperature": float("nan")})])


def test_generate_until_sampling_is_seeded(tok):
    model = make_model(tok, block_size=32, dtype=np.float32)
    req = [("to be", {"do_sample": True, "temperature": 1.0, "max_gen_toks": 8, "until": []})] * 3
    a = ModelLM(model, tok, progress=False, seed=5).generate_until(req)
    b = ModelLM(model, tok, progress=False, seed=5).generate_until(req)
    assert a == b and len(set(a)) > 1
