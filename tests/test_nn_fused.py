"""Fused LayerNorm, RMSNorm and RoPE: gradcheck, agreement with their composition from primitive ops, dtypes,
and the properties RoPE must have (norm preservation, absolute offsets, relative positions)."""

import math

import numpy as np
import pytest

import autograd
from autograd import Tensor, gradcheck
from autograd.backend import to_device
from nn.functional import apply_rotary, layer_norm, rms_norm, rope_tables
from nn.layers.norm import LayerNorm, RMSNorm
from nn.module import functional_call


def cpu(a):
    return to_device(a.data if isinstance(a, Tensor) else a, "cpu")


def leaf(xp, a, dtype=None):
    a = np.asarray(a) if dtype is None else np.asarray(a).astype(dtype)
    return Tensor(xp.asarray(a), requires_grad=True)


# ---------------------------------------------------------------------------
# compositions from primitive autograd ops (the independent references)
# ---------------------------------------------------------------------------


def layer_norm_ref(x, w=None, b=None, eps=1e-5):
    mean = x.mean(axis=-1, keepdims=True)
    var = x.var(axis=-1, keepdims=True)
    y = (x - mean) / autograd.sqrt(var + eps)
    if w is not None:
        y = y * w
    if b is not None:
        y = y + b
    return y


def rms_norm_ref(x, w=None, eps=1e-6):
    y = x / autograd.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)
    return y * w if w is not None else y


def rotary_ref(x, cos, sin):
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = Tensor(cos), Tensor(sin)
    return autograd.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def compare_with_reference(xp, rng, fused, ref, arrays, tol=1e-10):
    """Forward values and the gradients of every input agree between fused(*ts) and ref(*ts), float64."""
    a = [leaf(xp, x) for x in arrays]
    b = [leaf(xp, x) for x in arrays]
    ya, yb = fused(*a), ref(*b)
    assert ya.shape == yb.shape and ya.dtype == np.float64
    np.testing.assert_allclose(cpu(ya), cpu(yb), rtol=0, atol=tol)
    gy = xp.asarray(rng.standard_normal(ya.shape))
    ya.backward(gy)
    yb.backward(gy)
    for i, (ta, tb) in enumerate(zip(a, b)):
        assert ta.grad is not None and ta.grad.shape == ta.shape, f"input {i}"
        np.testing.assert_allclose(cpu(ta.grad), cpu(tb.grad), rtol=0, atol=tol, err_msg=f"gradient of input {i}")


# ---------------------------------------------------------------------------
# LayerNorm / RMSNorm
# ---------------------------------------------------------------------------

AFFINE = [(True, True), (True, False), (False, False)]


@pytest.mark.parametrize("has_w,has_b", AFFINE)
@pytest.mark.parametrize("shape", [(5, 8), (2, 5, 8)])
def test_layer_norm_gradcheck(xp, rng, shape, has_w, has_b):
    x = leaf(xp, rng.standard_normal(shape))
    params = [leaf(xp, rng.standard_normal(shape[-1])) for ok in (has_w, has_b) if ok]

    def fn(x, *p):
        return layer_norm(x, p[0] if has_w else None, p[1] if has_b else None)

    assert gradcheck(fn, x, *params)


def test_layer_norm_gradcheck_non_contiguous(xp, rng):
    x = leaf(xp, rng.standard_normal((2, 10, 10)))
    w, b = leaf(xp, rng.standard_normal(5)), leaf(xp, rng.standard_normal(5))

    def fn(x, w, b):
        return layer_norm(x.swapaxes(1, 2)[..., ::2], w, b)  # (2, 10, 5): a strided, transposed view

    assert gradcheck(fn, x, w, b)
    xt = leaf(xp, rng.standard_normal((8, 5)))
    assert gradcheck(lambda x: layer_norm(x.T), xt)  # (5, 8): the transposed, non-contiguous view


@pytest.mark.parametrize("has_w", [True, False])
def test_rms_norm_gradcheck(xp, rng, has_w):
    x = leaf(xp, rng.standard_normal((2, 5, 8)))
    params = [leaf(xp, rng.standard_normal(8))] if has_w else []
    assert gradcheck(lambda x, *p: rms_norm(x, p[0] if p else None), x, *params)
    xt = leaf(xp, rng.standard_normal((8, 5)))
    assert gradcheck(lambda x: rms_norm(x.T, None), xt)  # (5, 8): a non-contiguous view


def _norm_pair(op, has_w, has_b):
    """``(fused, ref)``: the fused norm and its composition from primitives, taking ``(x, *params)``."""
    def args(p):
        return p[0] if has_w else None, p[1] if has_b else None

    if op == "layer_norm":
        return (lambda x, *p: layer_norm(x, *args(p), eps=1e-5)), (lambda x, *p: layer_norm_ref(x, *args(p), eps=1e-5))
    return (lambda x, *p: rms_norm(x, args(p)[0], eps=1e-6)), (lambda x, *p: rms_norm_ref(x, args(p)[0], eps=1e-6))


@pytest.mark.parametrize("has_w,has_b", AFFINE)
def test_layer_norm_matches_composition(xp, rng, has_w, has_b):
    arrays = [3 + 2 * rng.standard_normal((2, 5, 8))]
    arrays += [rng.standard_normal(8) for ok in (has_w, has_b) if ok]
    compare_with_reference(xp, rng, *_norm_pair("layer_norm", has_w, has_b), arrays)


@pytest.mark.parametrize("op,has_w,has_b", [("layer_norm", w, b) for w, b in AFFINE] +
                         [("rms_norm", True, False), ("rms_norm", False, False)])
def test_norm_in_pieces_matches_composition(xp, rng, monkeypatch, op, has_w, has_b):
    """Both passes in blocks of 2 rows (pieces of 16 elements, rows of 8), a ragged last block and a
    non-contiguous input: the same values and gradients as the composition, and gradcheck passes."""
    from autograd import kernels

    monkeypatch.setattr(kernels, "CHUNK_ELEMENTS", 16)
    arrays = [(3 + 2 * rng.standard_normal((8, 3, 13))).swapaxes(0, 2)]  # (13, 3, 8): 39 rows, strided
    arrays += [rng.standard_normal(8) for ok in (has_w, has_b) if ok]
    fused, ref = _norm_pair(op, has_w, has_b)
    compare_with_reference(xp, rng, fused, ref, arrays)
    assert gradcheck(fused, *(leaf(xp, a) for a in arrays))


@pytest.mark.parametrize("has_w", [True, False])
def test_rms_norm_matches_composition(xp, rng, has_w):
    arrays = [rng.standard_normal((2, 5, 8))] + ([rng.standard_normal(8)] if has_w else [])
    compare_with_reference(xp, rng, *_norm_pair("rms_norm", has_w, False), arrays)


def test_layer_norm_normalises(xp, rng):
    x = Tensor(xp.asarray(5 + 3 * rng.standard_normal((4, 16))))
    y = cpu(layer_norm(x, eps=0.0))
    np.testing.assert_allclose(y.mean(axis=-1), 0, atol=1e-12)
    np.testing.assert_allclose(y.var(axis=-1), 1, atol=1e-12)
    r = cpu(rms_norm(x, eps=0.0))
    np.testing.assert_allclose((r * r).mean(axis=-1), 1, atol=1e-12)


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_norm_float32_stays_float32(xp, rng, op):
    x64 = rng.standard_normal((2, 5, 8))
    w64 = 1 + 0.1 * rng.standard_normal(8)
    fn = (lambda x, w: layer_norm(x, w, None)) if op == "layer_norm" else (lambda x, w: rms_norm(x, w))
    results = {}
    for dt in (np.float32, np.float64):
        x, w = leaf(xp, x64, dt), leaf(xp, w64, dt)
        y = fn(x, w)
        y.backward(xp.asarray(np.linspace(-1, 1, y.size).reshape(y.shape).astype(dt)))
        assert y.dtype == dt and x.grad.dtype == dt and w.grad.dtype == dt
        results[dt] = (cpu(y), cpu(x.grad), cpu(w.grad))
    for a, b in zip(results[np.float32], results[np.float64]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_norm_float16_computes_statistics_in_float32(xp, rng, op):
    # values near 300: x * x (9e4) overflows float16 (max 65504), so float16 statistics would give inf / 0
    x32 = (300 + 2 * rng.standard_normal((2, 5, 64))).astype(np.float32)
    w32 = (1 + 0.1 * rng.standard_normal(64)).astype(np.float32)
    fn = (lambda x, w: layer_norm(x, w, None)) if op == "layer_norm" else (lambda x, w: rms_norm(x, w))
    y32 = fn(Tensor(xp.asarray(x32)), Tensor(xp.asarray(w32)))
    x16 = leaf(xp, x32, np.float16)
    w16 = leaf(xp, w32, np.float16)
    y16 = fn(x16, w16)
    assert y16.dtype == np.float16
    assert np.isfinite(cpu(y16)).all()
    ref = fn(Tensor(xp.asarray(cpu(x16).astype(np.float32))), Tensor(xp.asarray(cpu(w16).astype(np.float32))))
    np.testing.assert_allclose(cpu(y16).astype(np.float32), cpu(ref), rtol=2e-3, atol=2e-2)
    np.testing.assert_allclose(cpu(y16).astype(np.float32), cpu(y32), rtol=5e-2, atol=0.2)
    y16.backward(xp.ones(y16.shape, dtype=np.float16))
    assert x16.grad.dtype == np.float16 and w16.grad.dtype == np.float16
    assert np.isfinite(cpu(x16.grad)).all() and np.isfinite(cpu(w16.grad)).all()


def test_norm_mixed_float16_input_float32_weight(xp, rng):
    x = leaf(xp, rng.standard_normal((3, 8)), np.float16)
    w = leaf(xp, 1 + 0.1 * rng.standard_normal(8), np.float32)
    b = leaf(xp, rng.standard_normal(8), np.float32)
    y = layer_norm(x, w, b)
    assert y.dtype == np.float16
    y.sum().backward()
    assert x.grad.dtype == np.float16 and w.grad.dtype == np.float32 and b.grad.dtype == np.float32


def test_norm_bad_shapes_are_clear(xp, rng):
    x = Tensor(xp.asarray(rng.standard_normal((2, 8))))
    with pytest.raises(ValueError, match=r"weight has shape \(7,\).*\(8,\)"):
        layer_norm(x, Tensor(xp.ones(7)))
    with pytest.raises(ValueError, match="bias"):
        layer_norm(x, Tensor(xp.ones(8)), Tensor(xp.ones(3)))
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, Tensor(xp.ones(4)))
    with pytest.raises(TypeError, match="floating"):
        layer_norm(Tensor(xp.ones((2, 3), dtype=np.int64)))
    with pytest.raises(ValueError, match="eps"):
        rms_norm(x, eps=-1.0)


# ---------------------------------------------------------------------------
# norm layers
# ---------------------------------------------------------------------------


def _device(xp):
    return "cpu" if xp is np else "cuda"


def test_norm_layers(xp, rng):
    ln = LayerNorm(8).to(_device(xp))
    ln_nb = LayerNorm(8, bias=False)
    rms = RMSNorm(8).to(_device(xp))
    assert [n for n, _ in ln.named_parameters()] == ["weight", "bias"]
    assert [n for n, _ in ln_nb.named_parameters()] == ["weight"]
    assert [n for n, _ in rms.named_parameters()] == ["weight"]
    for m in (ln, ln_nb, rms):
        assert all(p.no_decay for p in m.parameters())
        assert all(p.dtype == np.float32 for p in m.parameters())
    np.testing.assert_array_equal(cpu(ln.weight), np.ones(8))
    np.testing.assert_array_equal(cpu(ln.bias), np.zeros(8))
    ln.to(np.float64)
    rms.to(np.float64)
    ln.weight.data[...] = xp.asarray(rng.standard_normal(8))
    ln.bias.data[...] = xp.asarray(rng.standard_normal(8))
    rms.weight.data[...] = xp.asarray(rng.standard_normal(8))
    x = Tensor(xp.asarray(rng.standard_normal((2, 3, 8))))
    np.testing.assert_allclose(cpu(ln(x)), cpu(layer_norm_ref(x, ln.weight, ln.bias, 1e-5)), atol=1e-12)
    np.testing.assert_allclose(cpu(rms(x)), cpu(rms_norm_ref(x, rms.weight, 1e-6)), atol=1e-12)
    xg = leaf(xp, rng.standard_normal((2, 3, 8)))
    assert gradcheck(lambda x, w, b: functional_call(ln, {"weight": w, "bias": b}, x), xg, ln.weight, ln.bias)
    assert gradcheck(lambda x, w: functional_call(rms, {"weight": w}, x), xg, rms.weight)
    with pytest.raises(ValueError, match="dim"):
        LayerNorm(0)


# ---------------------------------------------------------------------------
# RoPE
# ---------------------------------------------------------------------------


def test_rope_tables_follow_the_formula():
    D, base = 8, 10000.0
    cos, sin = rope_tables(D, 6, base=base, offset=3, dtype=np.float64)
    assert cos.shape == sin.shape == (6, D // 2)
    for t in range(6):
        for i in range(D // 2):
            theta = (t + 3) * base ** (-2.0 * i / D)
            assert math.isclose(cos[t, i], math.cos(theta), abs_tol=1e-14)
            assert math.isclose(sin[t, i], math.sin(theta), abs_tol=1e-14)
    c2, s2 = rope_tables(D, [3, 4, 5, 6, 7, 8], base=base, dtype=np.float64)
    np.testing.assert_array_equal(c2, cos)
    np.testing.assert_array_equal(s2, sin)
    c32, _ = rope_tables(D, 4)
    assert c32.dtype == np.float32
    with pytest.raises(ValueError, match="even"):
        rope_tables(7, 4)


def test_apply_rotary_gradcheck_with_offset(xp, rng):
    cos, sin = rope_tables(8, 5, offset=7, dtype=np.float64, xp=xp)
    x = leaf(xp, rng.standard_normal((2, 3, 5, 8)))
    assert gradcheck(lambda x: apply_rotary(x, cos, sin), x)
    base = leaf(xp, rng.standard_normal((2, 5, 3, 16)))  # a non-contiguous (B, H, T, D) view
    assert gradcheck(lambda b: apply_rotary(b.swapaxes(1, 2)[..., ::2], cos, sin), base)


def test_apply_rotary_matches_composition_and_complex_rotation(xp, rng):
    cos, sin = rope_tables(8, 5, offset=2, dtype=np.float64, xp=xp)
    compare_with_reference(xp, rng, lambda x: apply_rotary(x, cos, sin), lambda x: rotary_ref(x, cos, sin),
                           [rng.standard_normal((2, 3, 5, 8))])
    # independently: the pair (x[i], x[i + D/2]) as a complex number, multiplied by exp(i theta)
    x = rng.standard_normal((2, 3, 5, 8))
    z = (x[..., :4] + 1j * x[..., 4:]) * np.exp(1j * (np.arange(2, 7)[:, None] * 10000.0 ** (-np.arange(0, 8, 2) / 8)))
    y = cpu(apply_rotary(Tensor(xp.asarray(x)), cos, sin))
    np.testing.assert_allclose(y, np.concatenate([z.real, z.imag], axis=-1), atol=1e-12)


def test_apply_rotary_dtypes(xp, rng):
    cos, sin = rope_tables(8, 5, offset=3, xp=xp)  # float32 tables
    x64 = rng.standard_normal((2, 3, 5, 8))
    x32 = leaf(xp, x64, np.float32)
    y32 = apply_rotary(x32, cos, sin)
    y32.backward(xp.ones(y32.shape, dtype=np.float32))
    assert y32.dtype == np.float32 and x32.grad.dtype == np.float32
    c64, s64 = rope_tables(8, 5, offset=3, dtype=np.float64, xp=xp)
    np.testing.assert_allclose(cpu(y32), cpu(apply_rotary(Tensor(xp.asarray(x64)), c64, s64)), atol=1e-6)
    x16 = leaf(xp, x64, np.float16)
    y16 = apply_rotary(x16, cos, sin)
    y16.backward(xp.ones(y16.shape, dtype=np.float16))
    assert y16.dtype == np.float16 and x16.grad.dtype == np.float16
    assert np.isfinite(cpu(y16)).all()
    np.testing.assert_allclose(cpu(y16).astype(np.float32), cpu(y32), atol=1e-2)


def test_rope_preserves_norms(xp, rng):
    cos, sin = rope_tables(16, 6, offset=100, dtype=np.float64, xp=xp)
    x = rng.standard_normal((2, 3, 6, 16))
    y = cpu(apply_rotary(Tensor(xp.asarray(x)), cos, sin))
    assert not np.allclose(y, x)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-12)
    pair_norm = lambda a: a[..., :8] ** 2 + a[..., 8:] ** 2  # noqa: E731 - each rotated pair keeps its length
    np.testing.assert_allclose(pair_norm(y), pair_norm(x), rtol=1e-12)


def test_rope_offset_equals_position_in_full_sequence(xp, rng):
    D, T = 8, 7
    x = rng.standard_normal((2, 3, T, D))
    cos, sin = rope_tables(D, T, dtype=np.float64, xp=xp)
    full = cpu(apply_rotary(Tensor(xp.asarray(x)), cos, sin))
    for p in (0, 3, 6):
        c1, s1 = rope_tables(D, 1, offset=p, dtype=np.float64, xp=xp)
        one = cpu(apply_rotary(Tensor(xp.asarray(x[:, :, p:p + 1])), c1, s1))
        np.testing.assert_allclose(one, full[:, :, p:p + 1], atol=1e-13)
    c1, s1 = rope_tables(D, 1, offset=5, dtype=np.float64, xp=xp)  # a wrong position does not match
    assert not np.allclose(cpu(apply_rotary(Tensor(xp.asarray(x[:, :, 3:4])), c1, s1)), full[:, :, 3:4])


def test_rope_dot_product_depends_only_on_relative_position(xp, rng):
    D = 16
    q, k = rng.standard_normal(D), rng.standard_normal(D)

    def rotated(v, pos):
        c, s = rope_tables(D, 1, offset=pos, dtype=np.float64, xp=xp)
        return cpu(apply_rotary(Tensor(xp.asarray(v[None, :])), c, s))[0]

    def score(m, n):
        return float(rotated(q, m) @ rotated(k, n))

    assert math.isclose(score(3, 1), score(9, 7), abs_tol=1e-12)
    assert math.isclose(score(2, 2), score(40, 40), abs_tol=1e-12)
    assert math.isclose(score(2, 2), float(q @ k), abs_tol=1e-12)
    assert math.isclose(score(10, 2), score(25, 17), abs_tol=1e-12)
    assert not math.isclose(score(3, 1), score(3, 2), abs_tol=1e-6)


def test_apply_rotary_bad_shapes_are_clear(xp, rng):
    cos, sin = rope_tables(8, 5, xp=xp)
    with pytest.raises(ValueError, match="even"):
        apply_rotary(Tensor(xp.ones((2, 5, 7))), cos, sin)
    with pytest.raises(ValueError, match="rope_tables"):
        apply_rotary(Tensor(xp.ones((2, 4, 8))), cos, sin)  # 4 positions, tables for 5
    with pytest.raises(ValueError, match="same shape"):
        apply_rotary(Tensor(xp.ones((2, 5, 8))), cos, sin[:4])
