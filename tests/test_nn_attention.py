"""Fused causal attention (MHA / GQA / MQA, cached keys), CausalSelfAttention, KVCache and Block."""

import math

import numpy as np
import pytest

import autograd
from autograd import random as ag_random
from autograd import Tensor, gradcheck, no_grad
from autograd.backend import to_device
from nn.functional import scaled_dot_product_attention
from nn.layers.attention import CausalSelfAttention, KVCache
from nn.layers.basic import Embedding
from nn.layers.block import Block
from nn.layers.mlp import MLP, SwiGLU
from nn.layers.norm import LayerNorm, RMSNorm
from nn.module import functional_call

HEADS = [pytest.param(2, 2, id="mha"), pytest.param(4, 2, id="gqa"), pytest.param(4, 1, id="mqa")]


def cpu(a):
    return to_device(a.data if isinstance(a, Tensor) else a, "cpu")


def leaf(xp, a, dtype=None):
    a = np.asarray(a) if dtype is None else np.asarray(a).astype(dtype)
    return Tensor(xp.asarray(a), requires_grad=True)


def qkv(rng, B, H, Hkv, T, S, D=6):
    return (rng.standard_normal((B, H, T, D)), rng.standard_normal((B, Hkv, S, D)),
            rng.standard_normal((B, Hkv, S, D)))


def attention_ref(q, k, v, causal=True, keep=None, p_drop=0.0):
    """softmax(q k^T / sqrt(D) + mask) v from primitive ops, each kv head repeated for its H / Hkv query heads."""
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    heads = np.arange(H) // (H // Hkv)  # query head h reads kv head h // G
    kr, vr = k[:, heads], v[:, heads]  # (B, H, S, D)
    scores = (q @ kr.swapaxes(-1, -2)) * (1.0 / math.sqrt(D))  # (B, H, T, S)
    if causal:
        future = np.arange(S)[None, :] > np.arange(T)[:, None] + (S - T)  # key j after query i's position
        xp = autograd.get_array_module(q.data)
        scores = autograd.where(xp.asarray(future), -1e9, scores)
    p = autograd.softmax(scores, axis=-1)
    if keep is not None:
        p = p * Tensor(keep.astype(p.dtype) / (1.0 - p_drop))
    return p @ vr


# ---------------------------------------------------------------------------
# the fused op
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("H,Hkv", HEADS)
@pytest.mark.parametrize("T,S", [(4, 4), (3, 5)], ids=["self", "cached"])
def test_attention_gradcheck(xp, rng, H, Hkv, T, S):
    q, k, v = (leaf(xp, a) for a in qkv(rng, 2, H, Hkv, T, S))
    assert gradcheck(scaled_dot_product_attention, q, k, v)


def test_attention_gradcheck_non_contiguous(xp, rng):
    # q, k, v as the transposed views a model makes from (B, T, H, D)
    q, k, v = (leaf(xp, rng.standard_normal(s)) for s in [(2, 4, 4, 6), (2, 4, 2, 6), (2, 4, 2, 6)])
    assert gradcheck(lambda q, k, v: scaled_dot_product_attention(q.swapaxes(1, 2), k.swapaxes(1, 2),
                                                                  v.swapaxes(1, 2)), q, k, v)


@pytest.mark.parametrize("H,Hkv", HEADS)
@pytest.mark.parametrize("T,S", [(5, 5), (2, 5), (1, 4)], ids=["self", "cached", "one-token"])
@pytest.mark.parametrize("causal", [True, False])
def test_attention_matches_composition(xp, rng, H, Hkv, T, S, causal):
    arrays = qkv(rng, 2, H, Hkv, T, S)
    a = [leaf(xp, x) for x in arrays]
    b = [leaf(xp, x) for x in arrays]
    ya = scaled_dot_product_attention(*a, causal=causal)
    yb = attention_ref(*b, causal=causal)
    assert ya.shape == (2, H, T, 6) and ya.dtype == np.float64
    np.testing.assert_allclose(cpu(ya), cpu(yb), rtol=0, atol=1e-10)
    gy = xp.asarray(rng.standard_normal(ya.shape))
    ya.backward(gy)
    yb.backward(gy)
    for name, ta, tb in zip("qkv", a, b):
        assert ta.grad.shape == ta.shape
        np.testing.assert_allclose(cpu(ta.grad), cpu(tb.grad), rtol=0, atol=1e-10, err_msg=f"d{name}")


@pytest.mark.parametrize("H,Hkv", HEADS)
@pytest.mark.parametrize("T,S", [(7, 7), (5, 9), (1, 4)], ids=["self", "cached", "one-token"])
def test_attention_in_row_blocks_matches_composition(xp, rng, monkeypatch, H, Hkv, T, S):
    """Causal attention runs in blocks of query rows that see only the keys up to their last row; with
    blocks of 3 rows (a ragged last one), values and gradients still equal the plain composition, and so
    does attention dropout (its mask sliced per block)."""
    from nn.functional import attention as A

    monkeypatch.setattr(A, "BLOCK_ROWS", 3)
    assert xp is not np or len(A._row_blocks(xp, T, S, True)) == -(-T // 3)
    arrays = qkv(rng, 3, H, Hkv, T, S)
    a = [leaf(xp, x) for x in arrays]
    b = [leaf(xp, x) for x in arrays]
    ya, yb = scaled_dot_product_attention(*a), attention_ref(*b)
    np.testing.assert_allclose(cpu(ya), cpu(yb), rtol=0, atol=1e-10)
    gy = xp.asarray(rng.standard_normal(ya.shape))
    ya.backward(gy)
    yb.backward(gy)
    for name, ta, tb in zip("qkv", a, b):
        np.testing.assert_allclose(cpu(ta.grad), cpu(tb.grad), rtol=0, atol=1e-10, err_msg=f"d{name}")
    assert gradcheck(scaled_dot_product_attention, *(leaf(xp, x) for x in arrays))

    p_drop = 0.3

    def dropped(q, k, v):  # the same mask on every call
        return scaled_dot_product_attention(q, k, v, dropout_p=p_drop, generator=xp.random.default_rng(3))

    assert gradcheck(dropped, *(leaf(xp, x) for x in arrays))
    keep = xp.random.default_rng(3).random((3, H, T, S), dtype=np.float32) >= np.float32(p_drop)
    ref = attention_ref(*(Tensor(xp.asarray(x)) for x in arrays), keep=keep, p_drop=p_drop)
    got = dropped(*(Tensor(xp.asarray(x)) for x in arrays))
    np.testing.assert_allclose(cpu(got), cpu(ref), rtol=0, atol=1e-10)


def test_attention_only_needed_gradients(xp, rng):
    q, k, v = qkv(rng, 1, 2, 1, 3, 3)
    qt, kt, vt = leaf(xp, q), Tensor(xp.asarray(k)), leaf(xp, v)
    scaled_dot_product_attention(qt, kt, vt).sum().backward()
    assert qt.grad is not None and vt.grad is not None and kt.grad is None


def test_attention_causality_of_the_op(xp, rng):
    q, k, v = qkv(rng, 1, 2, 2, 5, 5)
    y = cpu(scaled_dot_product_attention(*(Tensor(xp.asarray(a)) for a in (q, k, v))))
    k2, v2 = k.copy(), v.copy()
    k2[:, :, 3:] += 5.0  # change the keys and values of positions 3 and 4
    v2[:, :, 3:] -= 5.0
    y2 = cpu(scaled_dot_product_attention(*(Tensor(xp.asarray(a)) for a in (q, k2, v2))))
    np.testing.assert_array_equal(y2[:, :, :3], y[:, :, :3])
    assert not np.allclose(y2[:, :, 3:], y[:, :, 3:])


def test_attention_dtypes(xp, rng):
    arrays = qkv(rng, 2, 4, 2, 3, 5, D=8)
    ts = [leaf(xp, a, np.float32) for a in arrays]
    y = scaled_dot_product_attention(*ts)
    y.backward(xp.ones(y.shape, dtype=np.float32))
    assert y.dtype == np.float32 and all(t.grad.dtype == np.float32 for t in ts)
    ref = attention_ref(*(Tensor(xp.asarray(a)) for a in arrays))
    np.testing.assert_allclose(cpu(y), cpu(ref), atol=1e-5)
    # float16: large logits (|q.k| / sqrt(D) ~ 100s) whose exp would overflow float16; softmax runs in float32
    big = [4 * a for a in arrays]
    t16 = [leaf(xp, a, np.float16) for a in big]
    y16 = scaled_dot_product_attention(*t16)
    assert y16.dtype == np.float16 and np.isfinite(cpu(y16)).all()
    ref16 = attention_ref(*(Tensor(xp.asarray(cpu(t).astype(np.float64))) for t in t16))
    np.testing.assert_allclose(cpu(y16).astype(np.float64), cpu(ref16), atol=0.1)
    y16.backward(xp.ones(y16.shape, dtype=np.float16))
    assert all(t.grad.dtype == np.float16 and np.isfinite(cpu(t.grad)).all() for t in t16)


def test_attention_dropout(xp, rng):
    arrays = qkv(rng, 2, 4, 2, 3, 5)
    p = 0.3

    def fn(q, k, v):  # the same mask on every call
        return scaled_dot_product_attention(q, k, v, dropout_p=p, generator=xp.random.default_rng(7))

    ts = [leaf(xp, a) for a in arrays]
    assert gradcheck(fn, *ts)
    keep = xp.random.default_rng(7).random((2, 4, 3, 5), dtype=np.float32) >= np.float32(p)
    assert 0 < int(keep.sum()) < keep.size
    ref = attention_ref(*(Tensor(xp.asarray(a)) for a in arrays), keep=keep, p_drop=p)
    np.testing.assert_allclose(cpu(fn(*ts)), cpu(ref), atol=1e-12)
    plain = cpu(scaled_dot_product_attention(*ts))
    assert not np.allclose(cpu(fn(*ts)), plain)
    off = scaled_dot_product_attention(*ts, dropout_p=p, training=False)
    np.testing.assert_array_equal(cpu(off), plain)


def test_attention_bad_shapes_are_clear(xp, rng):
    q, k, v = (Tensor(xp.asarray(a)) for a in qkv(rng, 1, 3, 2, 4, 4))
    with pytest.raises(ValueError, match=r"query heads \(3\).*kv heads \(2\)"):
        scaled_dot_product_attention(q, k, v)
    q, k, v = (Tensor(xp.asarray(a)) for a in qkv(rng, 1, 2, 2, 5, 3))
    with pytest.raises(ValueError, match="at least 5 keys"):
        scaled_dot_product_attention(q, k, v)
    with pytest.raises(ValueError, match="4 axes"):
        scaled_dot_product_attention(Tensor(xp.ones((2, 3, 4))), k, v)
    with pytest.raises(ValueError, match="same shape"):
        scaled_dot_product_attention(q, k, v[:, :, :2])


# ---------------------------------------------------------------------------
# CausalSelfAttention
# ---------------------------------------------------------------------------


def _device(xp):
    return "cpu" if xp is np else "cuda"


def float64_model(module, xp, rng, scale=0.5):
    """The module in float64 on xp's device, with weights large enough that attention is far from uniform."""
    module.to(np.float64).to(_device(xp))
    for name, p in module.named_parameters():
        if "ln_" in name and name.endswith("weight"):
            p.data[...] = xp.asarray(1 + 0.1 * rng.standard_normal(p.shape))
        else:
            p.data[...] = xp.asarray(scale * rng.standard_normal(p.shape))
    return module


def param_gradcheck(module, x):
    names = [n for n, _ in module.named_parameters()]
    params = [Tensor(p.data, requires_grad=True) for _, p in module.named_parameters()]

    def fn(x, *ps):
        return functional_call(module, dict(zip(names, ps)), x)

    return gradcheck(fn, x, *params)


@pytest.mark.parametrize("H,Hkv", HEADS)
@pytest.mark.parametrize("rope", [False, True], ids=["learned", "rope"])
def test_causal_self_attention_gradcheck(xp, rng, H, Hkv, rope):
    attn = float64_model(CausalSelfAttention(8, H, Hkv, rope=rope, generator=np.random.default_rng(0)), xp, rng)
    hd = 8 // H
    assert attn.c_attn.weight.shape == (8, (H + 2 * Hkv) * hd)
    x = leaf(xp, rng.standard_normal((2, 5, 8)))
    assert param_gradcheck(attn, x)


def test_causal_self_attention_names_and_init():
    gen = np.random.default_rng(0)
    attn = CausalSelfAttention(64, 8, 2, n_layer=6, generator=gen)
    assert [n for n, _ in attn.named_parameters()] == ["c_attn.weight", "c_attn.bias", "c_proj.weight", "c_proj.bias"]
    assert attn.c_attn.weight.shape == (64, (8 + 2 * 2) * 8)
    np.testing.assert_allclose(attn.c_attn.weight.data.std(), 0.02, rtol=0.05)
    np.testing.assert_allclose(attn.c_proj.weight.data.std(), 0.02 / math.sqrt(12), rtol=0.05)
    nb = CausalSelfAttention(16, 4, bias=False)
    assert [n for n, _ in nb.named_parameters()] == ["c_attn.weight", "c_proj.weight"]
    a1 = CausalSelfAttention(16, 4, generator=np.random.default_rng(3))
    a2 = CausalSelfAttention(16, 4, generator=np.random.default_rng(3))
    np.testing.assert_array_equal(a1.c_attn.weight.data, a2.c_attn.weight.data)


def test_causal_self_attention_matches_plain_numpy(xp, rng):
    """Forward against an independent float64 NumPy implementation (GQA with RoPE, rotate-half convention)."""
    B, T, C, H, Hkv = 2, 5, 16, 4, 2
    hd, G = C // H, H // Hkv
    attn = float64_model(CausalSelfAttention(C, H, Hkv, rope=True), xp, rng)
    x = rng.standard_normal((B, T, C))
    y = cpu(attn(Tensor(xp.asarray(x))))
    W, b = cpu(attn.c_attn.weight), cpu(attn.c_attn.bias)
    qkv_ = x @ W + b
    q = qkv_[..., :H * hd].reshape(B, T, H, hd)
    k = qkv_[..., H * hd:(H + Hkv) * hd].reshape(B, T, Hkv, hd)
    v = qkv_[..., (H + Hkv) * hd:].reshape(B, T, Hkv, hd)
    theta = np.arange(T)[:, None] * 10000.0 ** (-np.arange(0, hd, 2) / hd)  # (T, hd/2)

    def rot(a):  # a: (B, T, heads, hd)
        a1, a2 = a[..., :hd // 2], a[..., hd // 2:]
        c, s = np.cos(theta)[None, :, None], np.sin(theta)[None, :, None]
        return np.concatenate([a1 * c - a2 * s, a2 * c + a1 * s], axis=-1)

    q, k = rot(q), rot(k)
    out = np.zeros((B, T, H, hd))
    for bb in range(B):
        for h in range(H):
            for i in range(T):
                sc = np.array([q[bb, i, h] @ k[bb, j, h // G] for j in range(i + 1)]) / math.sqrt(hd)
                w = np.exp(sc - sc.max())
                w /= w.sum()
                out[bb, i, h] = sum(w[j] * v[bb, j, h // G] for j in range(i + 1))
    expected = out.reshape(B, T, C) @ cpu(attn.c_proj.weight) + cpu(attn.c_proj.bias)
    np.testing.assert_allclose(y, expected, atol=1e-12)


def test_causal_self_attention_is_causal(xp, rng):
    attn = float64_model(CausalSelfAttention(16, 4, 2, rope=True), xp, rng)
    x = rng.standard_normal((2, 6, 16))
    y = cpu(attn(Tensor(xp.asarray(x))))
    x2 = x.copy()
    x2[:, 4] += 3.0
    y2 = cpu(attn(Tensor(xp.asarray(x2))))
    np.testing.assert_array_equal(y2[:, :4], y[:, :4])
    assert not np.allclose(y2[:, 4:], y[:, 4:])


def test_bad_head_counts_are_clear():
    with pytest.raises(ValueError, match=r"n_embd=10 is not divisible by n_head=3"):
        CausalSelfAttention(10, 3)
    with pytest.raises(ValueError, match=r"n_head=4 is not divisible by n_kv_head=3"):
        CausalSelfAttention(16, 4, 3)
    with pytest.raises(ValueError, match=r"head_dim .* = 3 must be even"):
        CausalSelfAttention(12, 4, rope=True)
    with pytest.raises(ValueError, match="n_kv_head=3"):
        Block(16, 4, n_kv_head=3)


# ---------------------------------------------------------------------------
# KV cache: token-by-token decoding equals full recomputation
# ---------------------------------------------------------------------------


def _decode(step, x, chunks):
    """Outputs of feeding x (B, T, C) in consecutive chunks of the given sizes, concatenated along T."""
    outs, t = [], 0
    for n in chunks:
        outs.append(cpu(step(x[:, t:t + n], t)))
        t += n
    return np.concatenate(outs, axis=1)


@pytest.mark.parametrize("H,Hkv", HEADS)
@pytest.mark.parametrize("rope", [False, True], ids=["learned", "rope"])
def test_kv_cache_attention_equals_full(xp, rng, H, Hkv, rope):
    attn = float64_model(CausalSelfAttention(16, H, Hkv, rope=rope), xp, rng)
    x = Tensor(xp.asarray(rng.standard_normal((2, 6, 16))))
    with no_grad():
        full = cpu(attn(x))
        for chunks, max_len in [([1] * 6, 6), ([3, 1, 2], None)]:
            cache = KVCache(max_len)
            got = _decode(lambda xs, t: attn(xs, kv_cache=cache), x, chunks)
            assert cache.offset == 6
            np.testing.assert_allclose(got, full, atol=1e-12)
        no_cache = _decode(lambda xs, t: attn(xs, offset=t), x, [1] * 6)  # without the cache the past is lost
    assert np.abs(no_cache[:, 1:] - full[:, 1:]).max() > 1e-3


@pytest.mark.parametrize("config", [
    dict(norm="layernorm", mlp="gelu", rope=False, n_kv_head=None),
    dict(norm="rmsnorm", mlp="swiglu", rope=True, n_kv_head=2, bias=False),
], ids=["gpt2", "llama"])
def test_kv_cache_model_equals_full(xp, rng, config):
    """A two-block model (learned positions for GPT-2 style, RoPE for Llama style) decoded with one cache per layer."""
    blocks = [float64_model(Block(16, 4, n_layer=2, mlp_hidden_dim=24, generator=np.random.default_rng(i), **config),
                            xp, rng) for i in range(2)]
    wpe = float64_model(Embedding(8, 16), xp, rng)

    def model(x, start, caches=None):
        if not config["rope"]:
            x = x + wpe(xp.arange(start, start + x.shape[1]))
        for i, blk in enumerate(blocks):
            x = blk(x, kv_cache=None if caches is None else caches[i], offset=None if caches else start)
        return x

    x = Tensor(xp.asarray(rng.standard_normal((2, 7, 16))))
    with no_grad():
        full = cpu(model(x, 0))
        caches = [KVCache(8) for _ in blocks]
        got = _decode(lambda xs, t: model(xs, t, caches), x, [2, 1, 1, 3])
    np.testing.assert_allclose(got, full, atol=1e-12)


def test_kv_cache_with_gradients(xp, rng):
    """With gradients on, cached decoding gives the same outputs, and gradients reach the current tokens."""
    attn = float64_model(CausalSelfAttention(16, 4, 2, rope=True), xp, rng)
    x = rng.standard_normal((1, 4, 16))
    with no_grad():
        full = cpu(attn(Tensor(xp.asarray(x))))
    cache = KVCache()
    outs = []
    for t in range(4):
        xt = leaf(xp, x[:, t:t + 1])
        y = attn(xt, kv_cache=cache)
        y.sum().backward()
        assert xt.grad is not None and np.abs(cpu(xt.grad)).sum() > 0
        outs.append(cpu(y))
    np.testing.assert_allclose(np.concatenate(outs, axis=1), full, atol=1e-12)


def test_kv_cache_errors(xp, rng):
    attn = CausalSelfAttention(8, 2).to(_device(xp))
    cache = KVCache(3)
    with no_grad():
        attn(Tensor(xp.asarray(rng.standard_normal((1, 2, 8)).astype(np.float32))), kv_cache=cache)
        with pytest.raises(ValueError, match="max_len=3"):
            attn(Tensor(xp.asarray(rng.standard_normal((1, 2, 8)).astype(np.float32))), kv_cache=cache)
        cache2 = KVCache()
        attn(Tensor(xp.asarray(rng.standard_normal((1, 2, 8)).astype(np.float32))), kv_cache=cache2)
        with pytest.raises(ValueError, match="batch 1"):
            attn(Tensor(xp.asarray(rng.standard_normal((3, 1, 8)).astype(np.float32))), kv_cache=cache2)
        with pytest.raises(ValueError, match="offset=5"):
            attn(Tensor(xp.asarray(rng.standard_normal((1, 1, 8)).astype(np.float32))), kv_cache=cache2, offset=5)
        cache2.reset()
        assert cache2.offset == 0
        attn(Tensor(xp.asarray(rng.standard_normal((3, 1, 8)).astype(np.float32))), kv_cache=cache2)
        assert cache2.offset == 1
    with pytest.raises(ValueError, match="max_len"):
        KVCache(0)


# ---------------------------------------------------------------------------
# Block
# ---------------------------------------------------------------------------


def test_block_structure():
    gpt2 = Block(16, 4, n_layer=3, generator=np.random.default_rng(0))
    assert [n for n, _ in gpt2.named_children()] == ["ln_1", "attn", "ln_2", "mlp"]
    assert isinstance(gpt2.ln_1, LayerNorm) and isinstance(gpt2.mlp, MLP)
    names = [n for n, _ in gpt2.named_parameters()]
    assert names[:2] == ["ln_1.weight", "ln_1.bias"] and "attn.c_attn.weight" in names
    assert "mlp.c_fc.weight" in names and names[-1] == "mlp.c_proj.bias"
    no_decay = {n for n, p in gpt2.named_parameters() if p.no_decay}
    assert no_decay == {"ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias"}
    llama = Block(16, 4, 2, mlp="swiglu", norm="rmsnorm", rope=True, bias=False, mlp_hidden_dim=32)
    assert isinstance(llama.ln_1, RMSNorm) and isinstance(llama.mlp, SwiGLU) and llama.attn.rope
    assert llama.attn.n_kv_head == 2 and llama.mlp.hidden_dim == 32
    with pytest.raises(ValueError, match="norm"):
        Block(16, 4, norm="batchnorm")
    with pytest.raises(ValueError, match="mlp"):
        Block(16, 4, mlp="relu")


@pytest.mark.parametrize("config", [
    dict(norm="layernorm", mlp="gelu", rope=False, n_kv_head=None),
    dict(norm="rmsnorm", mlp="swiglu", rope=True, n_kv_head=1, bias=False),
], ids=["gpt2", "llama"])
def test_block_gradcheck_and_residual_form(xp, rng, config):
    blk = float64_model(Block(8, 2, mlp_hidden_dim=12, **config), xp, rng)
    x = leaf(xp, rng.standard_normal((2, 4, 8)))
    assert param_gradcheck(blk, x)
    h = x + blk.attn(blk.ln_1(x))
    expected = h + blk.mlp(blk.ln_2(h))
    np.testing.assert_allclose(cpu(blk(x)), cpu(expected), atol=1e-14)


def test_block_float32_and_dropout(xp, rng):
    blk = Block(16, 4, 2, dropout=0.2, rope=True, generator=np.random.default_rng(0)).to(_device(xp))
    x = leaf(xp, rng.standard_normal((2, 5, 16)), np.float32)
    ag_random.manual_seed(0)
    y = blk(x)
    assert y.dtype == np.float32
    y.sum().backward()
    assert x.grad.dtype == np.float32 and all(p.grad.dtype == np.float32 for p in blk.parameters())
    blk.eval()
    y1, y2 = cpu(blk(x)), cpu(blk(x))
    np.testing.assert_array_equal(y1, y2)
    assert not np.allclose(cpu(y), y1)  # training mode dropped something
