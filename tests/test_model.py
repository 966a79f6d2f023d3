"""The GPT model: config and presets, shapes, loss, tying, causality, gradients, and a short overfit."""

import math

import numpy as np
import pytest

import autograd
import nn
from autograd import Tensor, gradcheck, no_grad
from autograd.backend import to_device
from llm import sizing
from llm.model import GPT, PRESETS, GPTConfig, get_preset, tied_head


def cpu(a):
    return to_device(a.data if isinstance(a, Tensor) else a, "cpu")


def build(xp, config, seed=0, dtype=np.float32):
    model = GPT(config, generator=np.random.default_rng(seed), dtype=dtype)
    if xp is not np:
        model.to("cuda")
    return model


def tiny(**overrides):
    base = dict(vocab_size=61, block_size=16, n_layer=2, n_head=4, n_embd=32)
    base.update(overrides)
    return GPTConfig(**base)


def llama_tiny(**overrides):
    base = dict(vocab_size=61, block_size=16, n_layer=2, n_embd=32, n_head=4, n_kv_head=2)
    base.update(overrides)
    return get_preset("llama-tiny", **base)


def scramble(model, rng, scale=0.3):
    """Give every parameter sizeable random values, so that tests see nonlinear, non-degenerate behaviour."""
    for name, p in model.named_parameters():
        values = rng.standard_normal(p.shape) * scale
        if p.ndim == 1 and name.endswith("weight"):  # norm gains stay near 1
            values += 1.0
        xp = autograd.get_array_module(p.data)
        p.data[...] = xp.asarray(values.astype(p.dtype))
    return model


def numpy_cross_entropy(logits, targets, ignore=-100):
    logits = logits.astype(np.float64).reshape(-1, logits.shape[-1])
    t = targets.reshape(-1)
    keep = t != ignore
    m = logits.max(axis=1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(axis=1, keepdims=True)))[:, 0]
    return float(np.mean(lse[keep] - logits[keep, t[keep]]))


# ---------------------------------------------------------------------------
# config and presets
# ---------------------------------------------------------------------------


def test_presets_are_the_published_shapes():
    g = PRESETS["gpt2"]
    assert (g.vocab_size, g.block_size, g.n_layer, g.n_head, g.n_embd) == (50257, 1024, 12, 12, 768)
    assert g.tie_embeddings and g.bias and g.mlp == "gelu" and g.norm == "layernorm" and g.pos == "learned"
    m = PRESETS["gpt2-medium"]
    assert (m.n_layer, m.n_head, m.n_embd) == (24, 16, 1024)
    for name in ("llama", "llama-tiny"):
        c = PRESETS[name]
        assert (c.norm, c.pos, c.mlp, c.bias, c.tie_embeddings) == ("rmsnorm", "rope", "swiglu", False, False)
        assert 1 < c.kv_heads < c.n_head
    t = PRESETS["tiny"]
    assert (t.n_layer, t.n_head, t.n_embd, t.block_size) == (4, 4, 128, 64)
    s = PRESETS["small"]
    assert (s.n_layer, s.n_head, s.n_embd, s.block_size) == (6, 6, 384, 256)
    assert PRESETS["llama-tiny"].n_kv_head == 2 and PRESETS["llama-tiny"].n_embd == 128


def test_get_preset_copies_and_overrides():
    c = get_preset("tiny", vocab_size=100)
    assert c.vocab_size == 100 and PRESETS["tiny"].vocab_size == 50257
    c.n_layer = 1
    assert PRESETS["tiny"].n_layer == 4
    with pytest.raises(ValueError, match="gpt2.*llama-tiny|presets are"):
        get_preset("gpt5")
    with pytest.raises(ValueError, match="n_layers"):
        get_preset("tiny", n_layers=3)


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(n_embd=30, n_head=4), "not divisible by n_head"),
    (dict(n_head=4, n_kv_head=3), "not divisible by n_kv_head"),
    (dict(mlp="relu"), "mlp must be one of"),
    (dict(norm="batchnorm"), "norm must be one of"),
    (dict(pos="alibi"), "pos must be one of"),
    (dict(n_layer=0), "n_layer must be a positive integer"),
    (dict(dropout=1.0), "dropout"),
    (dict(pos="rope", n_embd=36, n_head=12), "even head_dim"),
])
def test_config_validation(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        tiny(**kwargs)


def test_gpt2_parameter_count_by_formula():
    # GPT-2: V*C + P*C (embeddings) + L * (12 C^2 + 13 C) (blocks) + 2 C (ln_f); published: 124M / 355M
    def formula(V, P, L, C):
        return V * C + P * C + L * (12 * C * C + 13 * C) + 2 * C

    assert sizing.count_parameters(get_preset("gpt2")) == formula(50257, 1024, 12, 768) == 124_439_808
    assert sizing.count_parameters(get_preset("gpt2-medium")) == formula(50257, 1024, 24, 1024)
    untied = get_preset("gpt2", tie_embeddings=False)
    assert sizing.count_parameters(untied) == 124_439_808 + 50257 * 768


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_small_and_sizing_matches(name):
    overrides = dict(vocab_size=61, block_size=16, n_layer=1, n_embd=32, n_head=4)
    if PRESETS[name].n_kv_head is not None:
        overrides["n_kv_head"] = 2
    config = get_preset(name, **overrides)
    model = GPT(config, generator=np.random.default_rng(0))
    assert model.num_parameters() == sizing.count_parameters(config)
    ids = np.random.default_rng(1).integers(0, 61, (2, 16))
    logits, loss = model(ids, targets=ids)
    assert logits.shape == (2, 16, 61) and np.isfinite(loss.item())


def test_parameter_names_follow_gpt2():
    model = GPT(tiny(n_layer=1), generator=np.random.default_rng(0))
    names = [n for n, _ in model.named_parameters()]
    assert names == ["wte.weight", "wpe.weight", "h.0.ln_1.weight", "h.0.ln_1.bias", "h.0.attn.c_attn.weight",
                     "h.0.attn.c_attn.bias", "h.0.attn.c_proj.weight", "h.0.attn.c_proj.bias", "h.0.ln_2.weight",
                     "h.0.ln_2.bias", "h.0.mlp.c_fc.weight", "h.0.mlp.c_fc.bias", "h.0.mlp.c_proj.weight",
                     "h.0.mlp.c_proj.bias", "ln_f.weight", "ln_f.bias"]
    sd = model.state_dict()
    assert sd["h.0.attn.c_attn.weight"].shape == (32, 96) and sd["h.0.mlp.c_fc.weight"].shape == (32, 128)
    untied = GPT(tiny(n_layer=1, tie_embeddings=False), generator=np.random.default_rng(0))
    assert [n for n, _ in untied.named_parameters()][-1] == "lm_head.weight"
    assert untied.lm_head.weight.shape == (32, 61)


def test_tied_and_untied_counts():
    tied = GPT(tiny(), generator=np.random.default_rng(0))
    untied = GPT(tiny(tie_embeddings=False), generator=np.random.default_rng(0))
    assert untied.num_parameters() - tied.num_parameters() == 61 * 32
    assert tied.lm_head is None and "lm_head.weight" not in tied.state_dict()


def test_same_seed_bitwise_identical_init():
    a = GPT(llama_tiny(), generator=np.random.default_rng(7))
    b = GPT(llama_tiny(), generator=np.random.default_rng(7))
    c = GPT(llama_tiny(), generator=np.random.default_rng(8))
    for (na, pa), (nb, pb), (_, pc) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        assert na == nb and pa.data.tobytes() == pb.data.tobytes()
    assert any(not np.array_equal(pa.data, pc.data) for pa, pc in zip(a.parameters(), c.parameters()))


def test_gpt2_init_statistics():
    model = GPT(tiny(n_embd=64, n_layer=4, vocab_size=512), generator=np.random.default_rng(0))
    assert abs(model.wte.weight.data.std() - 0.02) < 0.002
    assert abs(model.h[0].mlp.c_fc.weight.data.std() - 0.02) < 0.002
    assert abs(model.h[0].attn.c_proj.weight.data.std() - 0.02 / math.sqrt(2 * 4)) < 0.001
    assert np.all(model.h[0].attn.c_attn.bias.data == 0) and np.all(model.ln_f.weight.data == 1)


# ---------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------


def test_shapes_loss_at_init_and_loss_value(xp, rng):
    V = 256
    model = build(xp, tiny(vocab_size=V, n_embd=64))
    ids = rng.integers(0, V, (3, 16))
    targets = rng.integers(0, V, (3, 16))
    logits, loss = model(xp.asarray(ids), targets=xp.asarray(targets))
    assert logits.shape == (3, 16, V) and logits.dtype == np.float32 and loss.dtype == np.float32
    assert loss.shape == ()
    assert abs(loss.item() - math.log(V)) < 0.1  # near-uniform predictions at init
    assert loss.item() == pytest.approx(numpy_cross_entropy(cpu(logits), targets), rel=1e-5)
    logits2, none = model(ids)  # NumPy ids for a model on any device
    assert none is None
    np.testing.assert_array_equal(cpu(logits2), cpu(logits))


def test_ignore_index_targets(rng):
    model = scramble(GPT(tiny(), generator=np.random.default_rng(0)), rng)
    ids = rng.integers(0, 61, (2, 8))
    targets = rng.integers(0, 61, (2, 8))
    targets[0, :3] = -100
    targets[1, 5] = -100
    logits, loss = model(ids, targets=targets)
    assert loss.item() == pytest.approx(numpy_cross_entropy(logits.numpy(), targets), rel=1e-5)


def test_ids_accepted_as_tensor_or_lists_and_checked():
    model = GPT(tiny(), generator=np.random.default_rng(0))
    ids = [[1, 2, 3], [4, 5, 6]]
    a, _ = model(ids)
    b, _ = model(Tensor(np.array(ids)))
    np.testing.assert_array_equal(a.data, b.data)
    with pytest.raises(TypeError, match="integer token ids"):
        model(np.ones((1, 3)))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        model(np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="61"):
        model(np.array([[1, 61]]))
    with pytest.raises(ValueError, match="targets"):
        model(np.array([[1, 2]]), targets=np.array([[1, 2, 3]]))


def test_block_size_overflow_names_both_numbers():
    model = GPT(tiny(block_size=8), generator=np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"9.*block_size=8"):
        model(np.zeros((1, 9), dtype=np.int64))
    caches = model.new_kv_caches()
    with no_grad():
        model(np.zeros((1, 6), dtype=np.int64), kv_caches=caches)
        with pytest.raises(ValueError, match=r"6 cached \+ 3 new.*block_size=8"):
            model(np.zeros((1, 3), dtype=np.int64), kv_caches=caches)


@pytest.mark.parametrize("make", [tiny, llama_tiny], ids=["gpt2", "llama"])
def test_causality(make, rng):
    model = scramble(GPT(make(), generator=np.random.default_rng(0)), rng)
    ids = rng.integers(0, 61, (1, 12))
    base, _ = model(ids)
    for t in (0, 5, 11):
        changed = ids.copy()
        changed[0, t] = (changed[0, t] + 1) % 61
        out, _ = model(changed)
        np.testing.assert_array_equal(out.data[0, :t], base.data[0, :t])  # the past does not see the future
        assert np.abs(out.data[0, t:] - base.data[0, t:]).max() > 1e-4  # the present and future do


@pytest.mark.parametrize("make", [tiny, llama_tiny], ids=["gpt2", "llama"])
def test_kv_cache_forward_matches_full(make, xp, rng):
    model = scramble(build(xp, make()), rng)
    ids = xp.asarray(rng.integers(0, 61, (2, 12)))
    with no_grad():
        full, _ = model(ids)
        caches = model.new_kv_caches()
        parts = [model(ids[:, :5], kv_caches=caches)[0], model(ids[:, 5:6], kv_caches=caches)[0],
                 model(ids[:, 6:], kv_caches=caches)[0]]
        last, _ = model(ids, last_only=True)
    stitched = np.concatenate([cpu(p) for p in parts], axis=1)
    np.testing.assert_allclose(stitched, cpu(full), rtol=1e-4, atol=1e-5)
    assert last.shape == (2, 1, 61)
    np.testing.assert_allclose(cpu(last)[:, 0], cpu(full)[:, -1], rtol=1e-5, atol=1e-6)


def test_learned_positions_use_rows_offset_onwards(rng):
    model = GPT(tiny(n_layer=1), generator=np.random.default_rng(0))
    ids = rng.integers(0, 61, (1, 3))
    caches = model.new_kv_caches()
    with no_grad():
        model(rng.integers(0, 61, (1, 4)), kv_caches=caches)
    # only wpe rows 4..6 may matter: with every other row zeroed the logits must not change
    with no_grad():
        before = model(ids, kv_caches=[_copy_cache(c) for c in caches])[0].data
        model.wpe.weight.data[:4] = 0
        model.wpe.weight.data[7:] = 0
        after = model(ids, kv_caches=caches)[0].data
    np.testing.assert_array_equal(before, after)


def _copy_cache(c):
    new = nn.KVCache(c.max_len)
    new.k, new.v, new.offset = c.k.copy(), c.v.copy(), c.offset
    return new


def test_llama_tiny_forward_and_backward(rng):
    config = get_preset("llama-tiny", vocab_size=97)
    model = GPT(config, generator=np.random.default_rng(0))
    assert model.wpe is None and model.lm_head is not None
    assert model.h[0].attn.n_kv_head == 2 and model.h[0].attn.rope
    ids = rng.integers(0, 97, (2, 32))
    logits, loss = model(ids, targets=rng.integers(0, 97, (2, 32)))
    assert logits.shape == (2, 32, 97)
    loss.backward()
    assert all(p.grad is not None and np.isfinite(p.grad).all() for p in model.parameters())


def test_dropout_only_in_training(rng):
    model = GPT(tiny(dropout=0.2), generator=np.random.default_rng(0))
    ids = rng.integers(0, 61, (1, 8))
    a = model(ids)[0].data
    b = model(ids)[0].data
    assert not np.array_equal(a, b)
    model.eval()
    np.testing.assert_array_equal(model(ids)[0].data, model(ids)[0].data)


def test_float64_model_via_to(rng):
    model = GPT(tiny(), generator=np.random.default_rng(0)).to("float64")
    logits, loss = model(rng.integers(0, 61, (1, 4)), targets=rng.integers(0, 61, (1, 4)))
    assert logits.dtype == np.float64 and loss.dtype == np.float64


# ---------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------


def test_tied_head_gradcheck_and_matches_composition(rng):
    x = Tensor(rng.standard_normal((2, 3, 4)), requires_grad=True)
    w = Tensor(rng.standard_normal((5, 4))[:, :], requires_grad=True)
    assert gradcheck(tied_head, x, w)
    w_strided = Tensor(rng.standard_normal((5, 8))[:, ::2], requires_grad=True)  # non-contiguous
    assert gradcheck(tied_head, x, w_strided)
    y = tied_head(x, w)
    ref = x @ w.T
    np.testing.assert_allclose(y.data, ref.data, rtol=1e-12)
    g = rng.standard_normal(y.shape)
    y.backward(g)
    gx, gw = x.grad.copy(), w.grad.copy()
    x.grad = w.grad = None
    ref.backward(g)
    np.testing.assert_allclose(gx, x.grad, rtol=1e-12)
    np.testing.assert_allclose(gw, w.grad, rtol=1e-12)


@pytest.mark.parametrize("make, names", [
    (tiny, ["wte.weight", "wpe.weight", "h.0.attn.c_attn.weight", "h.1.mlp.c_fc.bias", "ln_f.weight"]),
    (lambda: llama_tiny(mlp_hidden_dim=24), ["wte.weight", "h.0.attn.c_attn.weight", "h.1.mlp.w3.weight",
                                             "ln_f.weight", "lm_head.weight"]),
], ids=["gpt2", "llama"])
def test_gpt_gradcheck_float64(make, names, rng):
    config = make()
    config.vocab_size, config.block_size, config.n_embd = 13, 8, 16
    model = scramble(GPT(config, generator=np.random.default_rng(0), dtype=np.float64), rng, scale=0.2)
    ids = rng.integers(0, 13, (2, 5))
    targets = rng.integers(0, 13, (2, 5))
    targets[1, 2] = -100
    params = dict(model.named_parameters())
    inputs = [Tensor(params[n].data.copy(), requires_grad=True) for n in names]

    def loss_fn(*ts):
        return nn.functional_call(model, dict(zip(names, ts)), ids, targets)[1]

    assert gradcheck(loss_fn, *inputs, atol=1e-6, rtol=1e-4)


def test_tied_embedding_gets_both_gradients(rng):
    """wte's gradient is the lookup's plus the head's: check against each one computed on its own."""
    model = scramble(GPT(tiny(n_layer=1), generator=np.random.default_rng(0), dtype=np.float64), rng, 0.2)
    ids = rng.integers(0, 61, (2, 6))
    targets = rng.integers(0, 61, (2, 6))
    w = model.wte.weight
    _, loss = model(ids, targets=targets)
    loss.backward()
    both = w.grad.copy()
    # the same function with the head's copy of wte a separate leaf
    head_w = Tensor(w.data.copy(), requires_grad=True)
    model.zero_grad()
    x = model.wte(ids) + model.wpe.weight[0:6]
    x = model.ln_f(model.h[0](x))
    loss2 = autograd.cross_entropy(tied_head(x, head_w).reshape(12, 61), targets.reshape(12))
    loss2.backward()
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-12)
    np.testing.assert_allclose(both, w.grad + head_w.grad, rtol=1e-10, atol=1e-14)
    assert np.abs(head_w.grad).max() > 1e-6 and np.abs(w.grad).max() > 1e-6


def test_short_overfit():
    """A small model memorises one repeated sequence: the loss falls below 0.1 within 100 AdamW steps."""
    V, T = 16, 16
    config = tiny(vocab_size=V, block_size=T, n_layer=2, n_embd=32, n_head=2)
    model = GPT(config, generator=np.random.default_rng(0))
    seq = np.random.default_rng(1).integers(0, V, T + 1)
    x, y = np.stack([seq[:-1]] * 4), np.stack([seq[1:]] * 4)
    opt = nn.optim.AdamW(nn.optim.param_groups_for_gpt(model, weight_decay=0.0), lr=1e-2, betas=(0.9, 0.95))
    first = None
    for step in range(100):
        _, loss = model(x, targets=y)
        first = loss.item() if first is None else first
        model.zero_grad()
        loss.backward()
        opt.step()
    assert first > 2.0
    assert loss.item() < 0.1


# ---------------------------------------------------------------------------
# sizing: FLOPs and the size command
# ---------------------------------------------------------------------------


def test_flops_per_token_palm_estimate():
    gpt2 = get_preset("gpt2")
    N, wpe = 124_439_808, 1024 * 768
    # 6N over the weights used in matrix products (the tied wte is the head; wpe is only looked up),
    # plus attention 12 * n_layer * n_embd * T
    assert sizing.flops_per_token(gpt2, 1024) == 6 * (N - wpe) + 12 * 12 * 768 * 1024
    assert sizing.flops_per_token(gpt2) == sizing.flops_per_token(gpt2, 1024)
    assert sizing.flops_per_token(gpt2, 256) == 6 * (N - wpe) + 12 * 12 * 768 * 256
    untied = get_preset("gpt2", tie_embeddings=False)
    # an untied head adds a V x C product; the wte lookup then costs nothing
    assert sizing.matmul_parameters(untied) == N - wpe
    assert sizing.forward_flops_per_token(gpt2, 1024) * 3 == sizing.flops_per_token(gpt2, 1024)
    assert sizing.compute_optimal_tokens(N) == 20 * N
    assert sizing.non_embedding_parameters(gpt2) == N - 50257 * 768 - wpe


def test_size_command_prints_a_table(capsys):
    assert sizing.main(["--preset", "gpt2"]) == 0
    out = capsys.readouterr().out
    assert "124,439,808" in out and "FLOPs/token" in out and f"{20 * 124_439_808:,}" in out
    assert sizing.main(["--preset", "tiny", "--vocab-size", "512", "--n-layer", "2"]) == 0
    out = capsys.readouterr().out
    assert f"{sizing.count_parameters(get_preset('tiny', vocab_size=512, n_layer=2)):,}" in out
    assert sizing.main(["--preset", "gpt2", "--n-head", "7"]) == 2
    assert "not divisible" in capsys.readouterr().err
