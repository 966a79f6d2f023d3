"""Generation: KV-cached decoding equals full recomputation; greedy, temperature, top-k, top-p; the CLI."""

import numpy as np
import pytest

import autograd
from autograd import no_grad
from autograd.backend import to_device
from llm.checkpoint import save_model
from llm.generate import filter_logits, generate, main, sample_next
from llm.model import GPT, GPTConfig, get_preset
from llm.tokenizer import Tokenizer


def scramble(model, rng, scale=0.3):
    for name, p in model.named_parameters():
        values = rng.standard_normal(p.shape) * scale
        if p.ndim == 1 and name.endswith("weight"):
            values += 1.0
        xp = autograd.get_array_module(p.data)
        p.data[...] = xp.asarray(values.astype(p.dtype))
    return model


def gpt2_like(block_size=8):
    return GPTConfig(vocab_size=37, block_size=block_size, n_layer=2, n_head=2, n_embd=16)


def llama_like(block_size=8):
    return get_preset("llama-tiny", vocab_size=37, block_size=block_size, n_layer=2, n_head=4, n_kv_head=2,
                      n_embd=16, mlp_hidden_dim=32)


def model_for(make, xp=np, block_size=8, seed=0):
    model = scramble(GPT(make(block_size), generator=np.random.default_rng(seed)), np.random.default_rng(seed + 1))
    if xp is not np:
        model.to("cuda")
    return model


def uncached_greedy(model, prompt, n):
    """nanoGPT's loop: recompute the whole (cropped) context for every token."""
    ctx = np.array(prompt, dtype=np.int64).reshape(len(prompt), -1) if np.ndim(prompt) == 2 else \
        np.array(prompt, dtype=np.int64)[None]
    bs = model.config.block_size
    out = []
    with no_grad():
        for _ in range(n):
            logits, _ = model(ctx[:, -bs:])
            nxt = to_device(logits.data[:, -1], "cpu").argmax(axis=-1)
            out.append(nxt)
            ctx = np.concatenate([ctx, nxt[:, None]], axis=1)
    return np.stack(out, axis=1)


@pytest.mark.parametrize("make", [gpt2_like, llama_like], ids=["gpt2", "llama"])
def test_cached_greedy_equals_uncached_token_by_token(make, xp):
    model = model_for(make, xp)
    prompt = [3, 1, 4, 1, 5]
    new = generate(model, prompt, 14, greedy=True)  # crosses block_size=8 several times
    ref = uncached_greedy(model, prompt, 14)[0]
    assert new.shape == (14,) and new.dtype == np.int64
    assert len(set(ref.tolist())) > 2  # a non-trivial sequence
    np.testing.assert_array_equal(new, ref)


def test_cached_greedy_batch_and_long_prompt():
    model = model_for(gpt2_like)
    prompt = np.random.default_rng(0).integers(0, 37, (2, 11))  # longer than block_size: cropped
    new = generate(model, prompt, 6, greedy=True)
    assert new.shape == (2, 6)
    np.testing.assert_array_equal(new, uncached_greedy(model, prompt, 6))


@pytest.mark.parametrize("make", [gpt2_like, llama_like], ids=["gpt2", "llama"])
def test_prompts_of_different_lengths_generate_as_each_alone(make):
    """Left-padded and masked in one batch, every row continues exactly as it does alone, also once the rows
    outgrow block_size (the windows are cut per row and padded again)."""
    model = model_for(make, block_size=16)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 37, n) for n in (3, 7, 1, 12, 20)]
    batch = generate(model, prompts, 10, greedy=True)
    assert batch.shape == (5, 10)
    for row, prompt in zip(batch, prompts):
        np.testing.assert_array_equal(row, uncached_greedy(model, prompt, 10)[0])
    assert len({tuple(r) for r in batch.tolist()}) > 2


def test_on_token_sees_every_step_and_can_stop():
    model = model_for(gpt2_like)
    seen = []
    out = generate(model, [[1, 2], [3, 4, 5]], 6, greedy=True, on_token=lambda new: seen.append(new.copy()) or
                   len(seen) == 4)
    assert out.shape == (2, 4) and len(seen) == 4
    np.testing.assert_array_equal(np.stack(seen, axis=1), out)


def test_generate_restores_mode_and_uses_eval():
    model = model_for(gpt2_like)
    model.train()
    model.drop.p = 0.5  # dropout would make greedy decoding random in training mode
    a = generate(model, [1, 2, 3], 5, greedy=True)
    b = generate(model, [1, 2, 3], 5, greedy=True)
    np.testing.assert_array_equal(a, b)
    assert model.training and model.h[0].training


def test_top_k_one_and_tiny_top_p_equal_greedy():
    model = model_for(llama_like)
    greedy = generate(model, [7, 8], 10, greedy=True)
    topk = generate(model, [7, 8], 10, temperature=1.5, top_k=1, generator=np.random.default_rng(0))
    topp = generate(model, [7, 8], 10, temperature=1.5, top_p=1e-6, generator=np.random.default_rng(1))
    zero_t = generate(model, [7, 8], 10, temperature=0.0)
    np.testing.assert_array_equal(topk, greedy)
    np.testing.assert_array_equal(topp, greedy)
    np.testing.assert_array_equal(zero_t, greedy)


def test_sampling_is_reproducible_with_a_seed():
    model = model_for(gpt2_like)
    a = generate(model, [1, 2], 12, temperature=1.2, top_k=20, top_p=0.95, generator=np.random.default_rng(5))
    b = generate(model, [1, 2], 12, temperature=1.2, top_k=20, top_p=0.95, generator=np.random.default_rng(5))
    c = generate(model, [1, 2], 12, temperature=1.2, top_k=20, top_p=0.95, generator=np.random.default_rng(6))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_stops_at_eos():
    model = model_for(gpt2_like)
    free = generate(model, [3, 1, 4], 12, greedy=True)
    eos = int(free[3])
    first = int(np.argmax(free == eos))
    stopped = generate(model, [3, 1, 4], 12, greedy=True, eos_id=eos)
    np.testing.assert_array_equal(stopped, free[:first + 1])
    assert stopped[-1] == eos
    assert generate(model, [3, 1, 4], 0).shape == (0,)


def test_batch_rows_that_finish_are_padded_with_eos():
    model = model_for(gpt2_like)
    prompts = np.array([[3, 1, 4], [2, 7, 1]])
    free = generate(model, prompts, 10, greedy=True)
    eos = int(free[0, 1])
    out = generate(model, prompts, 10, greedy=True, eos_id=eos)
    first0 = int(np.argmax(free[0] == eos))
    assert np.all(out[0, first0:] == eos)
    row1 = free[1]
    if eos in row1:
        n = int(np.argmax(row1 == eos)) + 1
        assert out.shape[1] == max(n, first0 + 1)
    else:
        assert out.shape[1] == 10
        np.testing.assert_array_equal(out[1], row1)


def test_argument_errors():
    model = model_for(gpt2_like)
    with pytest.raises(ValueError, match="non-empty"):
        generate(model, [], 3)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, [1], 3, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [1], 3, top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        generate(model, [1], 3, top_k=0)
    with pytest.raises(TypeError, match="integer"):
        generate(model, [1.5, 2.0], 3)


# ---------------------------------------------------------------------------
# the sampling rule on logits directly
# ---------------------------------------------------------------------------


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def chi_square(counts, probs):
    n = counts.sum()
    expected = n * probs
    keep = expected > 0
    assert np.all(counts[~keep] == 0), "a token of probability 0 was drawn"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()), int(keep.sum() - 1)


def draw(logits, n, **kw):
    gen = np.random.default_rng(123)
    batch = np.tile(np.asarray(logits, dtype=np.float32), (n, 1))  # n independent rows, one call
    ids = sample_next(batch, generator=gen, **kw)
    return np.bincount(ids, minlength=len(logits))


# chi-square critical values at p = 0.001 for the degrees of freedom used below
CHI2_CRIT = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52}


def test_sampling_matches_softmax_at_temperature_one():
    logits = np.array([2.0, 1.0, 0.5, -1.0, 0.0, 1.5])
    counts = draw(logits, 20000)
    stat, df = chi_square(counts, softmax(logits))
    assert stat < CHI2_CRIT[df]
    # and the rule is not sampling something else: a flat distribution is rejected by the same test
    flat_stat, _ = chi_square(counts, np.full(6, 1 / 6))
    assert flat_stat > 100


def test_sampling_with_temperature_top_k_top_p():
    logits = np.array([2.0, 1.0, 0.5, -1.0, 0.0, 1.5])
    counts = draw(logits, 20000, temperature=0.5)
    stat, df = chi_square(counts, softmax(logits / 0.5))
    assert stat < CHI2_CRIT[df]
    full = softmax(logits)
    counts = draw(logits, 20000, top_k=3)
    q = np.where(np.isin(np.arange(6), [0, 5, 1]), full, 0.0)  # the 3 largest logits: tokens 0, 5, 1
    stat, df = chi_square(counts, q / q.sum())
    assert stat < CHI2_CRIT[df]
    # top-p 0.6 keeps tokens 0 (0.38) and 5 (0.23): their mass 0.61 is the first to reach 0.6
    assert full[0] < 0.6 <= full[0] + full[5]
    counts = draw(logits, 20000, top_p=0.6)
    q = np.where(np.isin(np.arange(6), [0, 5]), full, 0.0)
    stat, df = chi_square(counts, q / q.sum())
    assert stat < CHI2_CRIT[df]


def test_filter_logits_top_p_keeps_smallest_set_reaching_p():
    probs = np.array([0.05, 0.5, 0.15, 0.3])
    logits = np.log(probs)[None]
    kept = lambda p: set(np.flatnonzero(np.isfinite(filter_logits(logits, top_p=p)[0])).tolist())  # noqa: E731
    assert kept(0.5) == {1}
    assert kept(0.51) == {1, 3}
    assert kept(0.8) == {1, 3}
    assert kept(0.81) == {1, 3, 2}
    assert kept(1e-9) == {1}
    assert kept(1.0) == {0, 1, 2, 3}
    out = filter_logits(logits, top_p=0.8)[0]
    np.testing.assert_allclose(np.exp(out[[1, 3]]), [0.5 / 0.8, 0.3 / 0.8])


def test_filter_logits_top_k_and_temperature():
    logits = np.array([[1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 5.0, 1.0]])
    out = filter_logits(logits, temperature=2.0, top_k=2)
    assert np.isinf(out[0, [0, 3]]).all() and np.isfinite(out[0, [1, 2]]).all()
    assert np.isinf(out[1, [0, 1]]).all() and np.isfinite(out[1, [2, 3]]).all()
    e = np.exp(np.array([3.0, 2.0]) / 2.0)
    np.testing.assert_allclose(np.exp(out[0, [1, 2]]), e / e.sum())
    assert np.array_equal(sample_next(logits, greedy=True), [1, 2])
    assert sample_next(logits[0], greedy=True).shape == ()


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------


@pytest.fixture
def checkpoint(tmp_path):
    text = "".join(chr(97 + (i * i + 3 * i) % 26) + (" " if i % 7 == 0 else "") for i in range(4000))
    tok = Tokenizer.train("to be or not to be, that is the question. " + text, vocab_size=280)
    config = GPTConfig(vocab_size=tok.n_vocab, block_size=32, n_layer=1, n_head=2, n_embd=16)
    model = GPT(config, generator=np.random.default_rng(0))
    path = tmp_path / "ckpt.safetensors"
    save_model(path, model, tokenizer=tok)
    return path


def test_cli_prints_prompt_and_continuation(checkpoint, capsys):
    args = ["--checkpoint", str(checkpoint), "--prompt", "to be", "--max-new-tokens", "5", "--seed", "1",
            "--top-k", "10", "--no-stop"]
    assert main(args) == 0
    out1 = capsys.readouterr().out
    assert out1.startswith("to be") and len(out1.rstrip("\n")) > len("to be")
    assert main(args) == 0
    assert capsys.readouterr().out == out1  # seeded
    assert main(["--checkpoint", str(checkpoint), "--greedy", "--max-new-tokens", "3"]) == 0


@pytest.mark.parametrize("damage", ["missing", "garbage", "truncated"])
def test_cli_bad_checkpoint_is_a_clear_error(checkpoint, damage, capsys, tmp_path):
    path = checkpoint
    if damage == "missing":
        path = tmp_path / "nope.safetensors"
    elif damage == "garbage":
        path.write_bytes(b"this is not a checkpoint at all")
    else:
        data = path.read_bytes()
        path.write_bytes(data[:len(data) - 100])
    assert main(["--checkpoint", str(path), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "error" in err and str(path) in err and "Traceback" not in err


def test_cli_rejects_bad_options(checkpoint, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", str(checkpoint), "--top-p", "1.5"])
    assert e.value.code == 2
    assert "--top-p" in capsys.readouterr().err



@pytest.mark.parametrize("value", ["nan", "inf", "-1", "-inf", "x"])
def test_cli_bad_temperature_is_a_one_line_usage_error(checkpoint, capsys, value):
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", str(checkpoint), f"--temperature={value}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--temperature" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_generate_refuses_a_temperature_that_is_not_finite():
    model = model_for(gpt2_like)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite"):
            generate(model, [1, 2], 3, temperature=bad)


class Recorder:
    """A stdout that remembers every write."""

    def __init__(self):
        self.writes = []

    def write(self, text):
        self.writes.append(text)

    def flush(self):
        pass


def scripted(monkeypatch, tokens, interrupt_at=None):
    """Make generation pick ``tokens`` in order (one row), recording how much was written before each pick."""
    import llm.generate as G

    calls = []

    def fake_sample_next(logits, *args, **kwargs):
        calls.append(len(G.sys.stdout.writes))
        if interrupt_at is not None and len(calls) == interrupt_at:
            raise KeyboardInterrupt
        return np.array([tokens[len(calls) - 1]])

    monkeypatch.setattr(G, "sample_next", fake_sample_next)
    out = Recorder()
    monkeypatch.setattr(G.sys, "stdout", out)
    return out, calls


def byte_tokens(path, text):
    from llm.checkpoint import load_model

    tok = load_model(path)[1]
    ranks = tok.mergeable_ranks
    return [ranks[bytes([b])] for b in text.encode("utf-8")]


def test_cli_streams_tokens_and_never_cuts_a_character(checkpoint, monkeypatch):
    ids = byte_tokens(checkpoint, "é€ ok")  # one token per byte: é and € arrive in pieces
    out, calls = scripted(monkeypatch, ids)
    assert main(["--checkpoint", str(checkpoint), "--prompt", "to be", "--max-new-tokens", str(len(ids)),
                 "--no-stop"]) == 0
    assert "".join(out.writes) == "to beé€ ok\n"
    assert all("\ufffd" not in w for w in out.writes)
    assert out.writes[0] == "to be"  # the prompt is shown before the first token is made
    assert calls[0] == 1 and calls[-1] > calls[0] + 1  # tokens were written while generation went on


def test_cli_ctrl_c_keeps_what_was_shown(checkpoint, monkeypatch, capsys):
    ids = byte_tokens(checkpoint, "abcdef")
    out, _ = scripted(monkeypatch, ids, interrupt_at=4)
    assert main(["--checkpoint", str(checkpoint), "--prompt", "to be", "--max-new-tokens", "6", "--no-stop"]) == 130
    assert "".join(out.writes) == "to beabc\n"
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err
