"""Attention masks and per-row positions: the fused op against gradcheck and a composition of primitives,
and the GPT on left-padded and packed batches against separate, unpadded sequences."""

import math

import numpy as np
import pytest

import autograd
from autograd import Tensor, gradcheck, no_grad
from autograd.backend import to_device
from llm.model import GPT, GPTConfig, get_preset
from nn.functional import scaled_dot_product_attention

HEADS = [pytest.param(2, 2, id="mha"), pytest.param(4, 2, id="gqa"), pytest.param(4, 1, id="mqa")]


def cpu(a):
    return to_device(a.data if isinstance(a, Tensor) else a, "cpu")


def leaf(xp, a):
    return Tensor(xp.asarray(np.asarray(a)), requires_grad=True)


def qkv(rng, B, H, Hkv, T, S, D=6):
    return (rng.standard_normal((B, H, T, D)), rng.standard_normal((B, Hkv, S, D)),
            rng.standard_normal((B, Hkv, S, D)))


def masked_attention_ref(q, k, v, mask, causal=True):
    """softmax(q k^T / sqrt(D) + masks) v from primitive ops; rows that may attend nothing are zero."""
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    heads = np.arange(H) // (H // Hkv)
    kr, vr = k[:, heads], v[:, heads]  # (B, H, S, D)
    allowed = np.broadcast_to(np.asarray(mask), (B, 1, T, S))
    if causal:
        allowed = allowed & ~(np.arange(S)[None, :] > np.arange(T)[:, None] + (S - T))
    xp = autograd.get_array_module(q.data)
    scores = (q @ kr.swapaxes(-1, -2)) * (1.0 / math.sqrt(D))  # (B, H, T, S)
    scores = autograd.where(xp.asarray(~allowed), -1e9, scores)
    p = autograd.softmax(scores, axis=-1) * Tensor(xp.asarray(allowed.any(axis=-1, keepdims=True).astype(float)))
    return p @ vr


def key_padding(B, S, pads):
    keep = np.ones((B, S), dtype=bool)
    for b, n in enumerate(pads):
        keep[b, :n] = False
    return keep[:, None, None, :]  # (B, 1, 1, S)


def segments_mask(segments, T=None):
    """Block-diagonal mask (B, 1, T, S) from the segment id of each of S positions; queries are the last T."""
    seg = np.asarray(segments)  # (B, S)
    T = seg.shape[1] if T is None else T
    return seg[:, None, seg.shape[1] - T:, None] == seg[:, None, None, :]  # (B, 1, T, S)


MASKS = {
    # left padding of 0, 2 and 4 keys (the last row's first query rows see nothing at all)
    "key-padding": lambda B, T, S: key_padding(B, S, [0, 2, 4][:B]),
    "packed": lambda B, T, S: segments_mask([[0] * 2 + [1] * (S - 4) + [2] * 2] * B, T),
    "shared (1, 1, T, S)": lambda B, T, S: (np.random.default_rng(5).random((1, 1, T, S)) > 0.3),
    "per-row (B, 1, T, S)": lambda B, T, S: (np.random.default_rng(6).random((B, 1, T, S)) > 0.4),
}


@pytest.mark.parametrize("H,Hkv", HEADS)
@pytest.mark.parametrize("kind", list(MASKS))
@pytest.mark.parametrize("T,S,causal", [(7, 7, True), (3, 7, True), (1, 6, True), (5, 6, False)],
                         ids=["self", "cached", "one-token", "not-causal"])
def test_masked_attention_matches_composition(xp, rng, monkeypatch, H, Hkv, kind, T, S, causal):
    from nn.functional import attention as A

    monkeypatch.setattr(A, "BLOCK_ROWS", 3)  # several row blocks, a ragged last one
    B = 3
    mask = MASKS[kind](B, T, S)
    arrays = qkv(rng, B, H, Hkv, T, S)
    a = [leaf(xp, x) for x in arrays]
    b = [leaf(xp, x) for x in arrays]
    ya = scaled_dot_product_attention(*a, causal=causal, mask=xp.asarray(mask))
    yb = masked_attention_ref(*b, mask=mask, causal=causal)
    assert np.isfinite(cpu(ya)).all()
    np.testing.assert_allclose(cpu(ya), cpu(yb), rtol=0, atol=1e-10)
    gy = xp.asarray(rng.standard_normal(ya.shape))
    ya.backward(gy)
    yb.backward(gy)
    for name, ta, tb in zip("qkv", a, b):
        np.testing.assert_allclose(cpu(ta.grad), cpu(tb.grad), rtol=0, atol=1e-10, err_msg=f"d{name}")


@pytest.mark.parametrize("H,Hkv", HEADS)
def test_masked_attention_gradcheck(xp, rng, H, Hkv):
    B, T, S = 3, 4, 6
    mask = xp.asarray(key_padding(B, S, [0, 3, 5]))  # row 2's first two queries attend nothing
    fn = lambda q, k, v: scaled_dot_product_attention(q, k, v, mask=mask)  # noqa: E731
    assert gradcheck(fn, *(leaf(xp, x) for x in qkv(rng, B, H, Hkv, T, S)))
    packed = xp.asarray(segments_mask([[0, 0, 1, 1, 1], [0, 1, 1, 2, 2], [0, 0, 0, 0, 0]]))
    fn = lambda q, k, v: scaled_dot_product_attention(q, k, v, mask=packed)  # noqa: E731
    assert gradcheck(fn, *(leaf(xp, x) for x in qkv(rng, 3, H, Hkv, 5, 5)))


def test_a_row_that_may_attend_nothing_gives_zeros_not_nan(xp, rng):
    q, k, v = (leaf(xp, x) for x in qkv(rng, 2, 2, 2, 4, 4))
    mask = np.ones((2, 1, 4, 4), dtype=bool)
    mask[1, :, 2] = False  # query 2 of row 1 may attend no key
    y = scaled_dot_product_attention(q, k, v, mask=xp.asarray(mask))
    y.backward(xp.ones(y.shape))
    out = cpu(y)
    assert (out[1, :, 2] == 0).all() and np.isfinite(out).all()
    assert all(np.isfinite(cpu(t.grad)).all() for t in (q, k, v))
    assert (cpu(q.grad)[1, :, 2] == 0).all()
    # with float32 too
    q32, k32, v32 = (Tensor(xp.asarray(cpu(t).astype(np.float32))) for t in (q, k, v))
    out32 = cpu(scaled_dot_product_attention(q32, k32, v32, mask=xp.asarray(mask)))
    assert (out32[1, :, 2] == 0).all() and np.isfinite(out32).all()


def test_all_true_mask_equals_no_mask(xp, rng):
    q, k, v = (Tensor(xp.asarray(x)) for x in qkv(rng, 2, 4, 2, 3, 5))
    plain = cpu(scaled_dot_product_attention(q, k, v))
    masked = cpu(scaled_dot_product_attention(q, k, v, mask=xp.ones((2, 1, 1, 5), dtype=bool)))
    np.testing.assert_allclose(masked, plain, rtol=0, atol=1e-14)


def test_packed_sequences_attend_only_within_their_segment(xp, rng):
    """One row holding three sequences back to back equals the three attended separately."""
    lens = [2, 4, 3]
    q, k, v = qkv(rng, 1, 2, 2, sum(lens), sum(lens))
    mask = segments_mask([sum([[i] * n for i, n in enumerate(lens)], [])])
    y = cpu(scaled_dot_product_attention(*(Tensor(xp.asarray(a)) for a in (q, k, v)), mask=xp.asarray(mask)))
    start = 0
    for n in lens:
        part = [Tensor(xp.asarray(a[:, :, start:start + n])) for a in (q, k, v)]
        np.testing.assert_allclose(y[:, :, start:start + n], cpu(scaled_dot_product_attention(*part)), atol=1e-12)
        start += n


def test_bad_masks_are_clear_errors(rng):
    q, k, v = (Tensor(x) for x in qkv(rng, 2, 2, 2, 3, 5))
    with pytest.raises(TypeError, match="boolean"):
        scaled_dot_product_attention(q, k, v, mask=np.ones((2, 1, 3, 5)))
    with pytest.raises(ValueError, match=r"does not broadcast to \(B, 1, T, S\)"):
        scaled_dot_product_attention(q, k, v, mask=np.ones((2, 2, 3, 5), dtype=bool))
    with pytest.raises(ValueError, match=r"does not broadcast"):
        scaled_dot_product_attention(q, k, v, mask=np.ones((3, 1, 1, 5), dtype=bool))


# ---------------------------------------------------------------------------
# the GPT: left padding and packing against separate sequences
# ---------------------------------------------------------------------------


def small_gpt(llama=False, block_size=16, seed=0):
    if llama:
        config = get_preset("llama-tiny", vocab_size=40, block_size=block_size, n_layer=2, n_head=4, n_kv_head=2,
                            n_embd=16, mlp_hidden_dim=32)
    else:
        config = GPTConfig(vocab_size=40, block_size=block_size, n_layer=2, n_head=2, n_embd=16)
    model = GPT(config, generator=np.random.default_rng(seed), dtype=np.float64)
    rng = np.random.default_rng(seed + 1)
    for name, p in model.named_parameters():
        p.data[...] = rng.standard_normal(p.shape) * 0.4 + (1.0 if p.ndim == 1 and name.endswith("weight") else 0)
    return model


@pytest.mark.parametrize("llama", [False, True], ids=["gpt2", "llama"])
def test_left_padded_batch_equals_each_row_alone(llama):
    model = small_gpt(llama)
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 40, n) for n in (5, 9, 2)]
    W = 9
    ids = np.zeros((3, W), dtype=np.int64)
    keep = np.zeros((3, W), dtype=bool)
    for i, r in enumerate(rows):
        ids[i, W - len(r):] = r
        keep[i, W - len(r):] = True
    positions = np.maximum(np.cumsum(keep, axis=1) - 1, 0)
    with no_grad():
        logits, _ = model(ids, position_ids=positions, attention_mask=keep[:, None, None, :])
        for i, r in enumerate(rows):
            alone, _ = model(r[None])
            np.testing.assert_allclose(logits.data[i, W - len(r):], alone.data[0], rtol=1e-10, atol=1e-12)
        # and through the KV cache: prefill the padded batch, then one token per step
        caches = model.new_kv_caches()
        model(ids, kv_caches=caches, position_ids=positions, attention_mask=keep[:, None, None, :])
        nxt = np.array([[3], [4], [5]])
        keys = np.concatenate([keep, np.ones((3, 1), dtype=bool)], axis=1)
        step, _ = model(nxt, kv_caches=caches, position_ids=np.array([[5], [9], [2]]),
                        attention_mask=keys[:, None, None, :])
        for i, r in enumerate(rows):
            alone, _ = model(np.concatenate([r, nxt[i]])[None])
            np.testing.assert_allclose(step.data[i, 0], alone.data[0, -1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("llama", [False, True], ids=["gpt2", "llama"])
def test_packed_sequences_train_as_if_separate(llama):
    """Loss and every gradient of a packed row (block-diagonal mask, positions restarting per segment) equal
    those of the sequences trained separately: the backward of the mask is right inside a whole model."""
    lens = [4, 7, 5]
    rng = np.random.default_rng(1)
    seqs = [rng.integers(0, 40, n + 1) for n in lens]  # inputs and next-token targets
    packed_ids = np.concatenate([s[:-1] for s in seqs])[None]  # (1, 16)
    packed_targets = np.concatenate([s[1:] for s in seqs])[None]
    seg = np.concatenate([[i] * n for i, n in enumerate(lens)])[None]
    positions = np.concatenate([np.arange(n) for n in lens])[None]
    mask = seg[:, None, :, None] == seg[:, None, None, :]

    model = small_gpt(llama)
    _, loss = model(packed_ids, packed_targets, position_ids=positions, attention_mask=mask)
    loss.backward()
    packed_grads = {n: p.grad.copy() for n, p in model.named_parameters()}
    model.zero_grad()
    total = sum(model(s[None, :-1], s[None, 1:])[1] * len(s[:-1]) for s in seqs) * (1.0 / sum(lens))
    total.backward()
    assert float(loss.item()) == pytest.approx(float(total.item()), rel=1e-12)
    for n, p in model.named_parameters():
        np.testing.assert_allclose(packed_grads[n], p.grad, rtol=1e-9, atol=1e-12, err_msg=n)


def test_model_rejects_bad_positions_and_masks():
    model = small_gpt(block_size=8)
    ids = np.zeros((2, 3), dtype=np.int64)
    with pytest.raises(ValueError, match="position_ids must lie in"):
        model(ids, position_ids=np.array([[0, 1, 8], [0, 1, 2]]))
    with pytest.raises(ValueError, match="must match ids"):
        model(ids, position_ids=np.zeros((2, 4), dtype=np.int64))
    with pytest.raises(ValueError, match="4-D"):
        model(ids, attention_mask=np.ones((2, 3), dtype=bool))
    with pytest.raises(TypeError, match="integer"):
        model(ids, position_ids=np.zeros((2, 3)))


# ---------------------------------------------------------------------------
# the heads' split and merge (one node each, for fewer nodes per generation step)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("H,Hkv", HEADS)
def test_split_and_merge_heads_against_reshape_and_transpose(xp, rng, H, Hkv):
    from autograd.ops.shape import split
    from nn.layers.attention import MergeHeads, SplitHeads

    B, T, hd = 2, 3, 4
    x = rng.standard_normal((B, T, (H + 2 * Hkv) * hd))
    a, b = leaf(xp, x), leaf(xp, x)
    qa, ka, va = SplitHeads(H, Hkv, hd)(a)
    qb, kb, vb = split(b, [H * hd, (H + Hkv) * hd], axis=-1)
    qb = qb.reshape(B, T, H, hd).transpose(0, 2, 1, 3)  # (B, H, T, hd)
    kb = kb.reshape(B, T, Hkv, hd).transpose(0, 2, 1, 3)  # (B, Hkv, T, hd)
    vb = vb.reshape(B, T, Hkv, hd).transpose(0, 2, 1, 3)
    for u, w in ((qa, qb), (ka, kb), (va, vb)):
        assert u.shape == w.shape
        np.testing.assert_array_equal(cpu(u), cpu(w))
    ya = MergeHeads()(qa * 2.0)  # (B, T, H hd)
    yb = (qb * 2.0).transpose(0, 2, 1, 3).reshape(B, T, H * hd)
    np.testing.assert_array_equal(cpu(ya), cpu(yb))
    gy = xp.asarray(rng.standard_normal(ya.shape))
    ((ya * Tensor(gy)).sum() + (ka * va).sum()).backward()
    ((yb * Tensor(gy)).sum() + (kb * vb).sum()).backward()
    np.testing.assert_array_equal(cpu(a.grad), cpu(b.grad))
    assert gradcheck(lambda t: MergeHeads()(SplitHeads(H, Hkv, hd)(t)[0] * SplitHeads(H, Hkv, hd)(t)[2][:, :1]),
                     leaf(xp, x))
