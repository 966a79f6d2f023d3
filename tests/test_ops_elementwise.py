"""Element-wise ops: gradients (gradcheck), forward values against plain NumPy / math,
dtypes, kinks, ties, boundaries, numerical stability, and the erf they rest on."""

import math
import warnings

import numpy as np
import pytest

import autograd as ag
from autograd import Tensor, gradcheck
from autograd.backend import to_device
from autograd.ops import elementwise as E
from autograd.ops.special import erf


def cpu(a):
    """A NumPy copy of an array or a Tensor's data."""
    return to_device(a.data if isinstance(a, Tensor) else a, "cpu")


def leaf(xp, a, dtype=None):
    """A leaf tensor on xp that requires a gradient."""
    a = np.asarray(a) if dtype is None else np.asarray(a, dtype=dtype)
    return Tensor(xp.asarray(a), requires_grad=True)


def away_from_zero(a, gap=0.05):
    """Push values at least ``gap`` from 0, keeping their sign (inputs away from a kink at 0)."""
    return np.where(a >= 0, a + gap, a - gap)


# plain references, written independently of the ops (math.erf element by element)
_erf_ref = np.vectorize(math.erf, otypes=[np.float64])


def _gelu_tanh_ref(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def _gelu_erf_ref(x):
    return 0.5 * x * (1 + _erf_ref(x / math.sqrt(2)))


# name: (op, NumPy reference, input maker from a standard-normal draw)
UNARY = {
    "exp": (ag.exp, np.exp, lambda a: a),
    "log": (ag.log, np.log, lambda a: np.abs(a) + 0.1),
    "sqrt": (ag.sqrt, np.sqrt, lambda a: np.abs(a) + 0.1),
    "tanh": (ag.tanh, np.tanh, lambda a: a),
    "sigmoid": (ag.sigmoid, lambda x: 1 / (1 + np.exp(-x)), lambda a: 3 * a),
    "relu": (ag.relu, lambda x: np.where(x > 0, x, 0.0), away_from_zero),
    "silu": (ag.silu, lambda x: x / (1 + np.exp(-x)), lambda a: 3 * a),
    "abs": (ag.abs, np.abs, away_from_zero),
    "gelu_tanh": (lambda t: ag.gelu(t, approximate="tanh"), _gelu_tanh_ref, lambda a: 3 * a),
    "gelu_none": (lambda t: ag.gelu(t, approximate="none"), _gelu_erf_ref, lambda a: 3 * a),
}


@pytest.mark.parametrize("name", sorted(UNARY))
def test_unary_gradcheck(xp, rng, name):
    op, _, make = UNARY[name]
    contiguous = make(rng.standard_normal((3, 4)))
    strided = make(rng.standard_normal((6, 8))).T[:, ::2]  # (8, 3), non-contiguous
    assert not strided.flags.c_contiguous
    scalar = make(rng.standard_normal(()))
    for a in (contiguous, strided, scalar):
        assert gradcheck(op, leaf(xp, a))


@pytest.mark.parametrize("name", sorted(UNARY))
def test_unary_forward_matches_reference(xp, rng, name):
    op, ref, make = UNARY[name]
    a = make(rng.standard_normal((5, 7)))
    y = op(Tensor(xp.asarray(a)))
    assert y.dtype == np.float64
    np.testing.assert_allclose(cpu(y), ref(a), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", sorted(UNARY))
def test_unary_float32_stays_float32(xp, rng, name):
    op, ref, make = UNARY[name]
    a = make(rng.standard_normal((4, 5))).astype(np.float32)
    x = leaf(xp, a)
    y = op(x)
    assert y.dtype == np.float32
    np.testing.assert_allclose(cpu(y), ref(a.astype(np.float64)), rtol=1e-5, atol=1e-6)
    (y * 1.5).sum().backward()
    assert x.grad.dtype == np.float32
    # the float32 gradient agrees with the float64 one
    x64 = leaf(xp, a.astype(np.float64))
    (op(x64) * 1.5).sum().backward()
    np.testing.assert_allclose(cpu(x.grad), cpu(x64.grad), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cls", [E.Exp, E.Log, E.Sqrt, E.Tanh, E.Sigmoid, E.ReLU, E.SiLU, E.Abs, E.GELUTanh,
                                 E.GELUErf])
def test_unary_backward_leaves_its_arguments_alone(rng, cls):
    """backward may work in place only on its own temporaries: not on gy, not on what it saved."""
    x = np.abs(rng.standard_normal((3, 4))) + 0.1
    fn = cls()
    fn.needs_input_grad = (True,)
    fn.forward(x.copy())
    gy = rng.standard_normal((3, 4))
    gy_before = gy.copy()
    first = fn.backward(gy)
    np.testing.assert_array_equal(gy, gy_before)
    np.testing.assert_array_equal(fn.backward(gy), first)  # what forward saved is unchanged


def test_unary_derivatives_at_chosen_points():
    """Analytic derivatives written out by hand, at a few points."""
    x = np.array([-1.5, -0.3, 0.4, 2.0])
    s = 1 / (1 + np.exp(-x))
    c = math.sqrt(2 / math.pi)
    t = np.tanh(c * (x + 0.044715 * x ** 3))
    phi = np.exp(-x ** 2 / 2) / math.sqrt(2 * math.pi)
    expected = {
        ag.exp: np.exp(x),
        ag.tanh: 1 / np.cosh(x) ** 2,
        ag.sigmoid: s * (1 - s),
        ag.silu: s + x * s * (1 - s),
        ag.gelu: 0.5 * (1 + t) + 0.5 * x * (1 - t ** 2) * c * (1 + 3 * 0.044715 * x ** 2),
        (lambda v: ag.gelu(v, "none")): 0.5 * (1 + _erf_ref(x / math.sqrt(2))) + x * phi,
    }
    for op, d in expected.items():
        xt = Tensor(x, requires_grad=True)
        op(xt).sum().backward()
        np.testing.assert_allclose(xt.grad, d, rtol=1e-12)
    xt = Tensor(np.abs(x), requires_grad=True)
    ag.log(xt).sum().backward()
    np.testing.assert_allclose(xt.grad, 1 / np.abs(x), rtol=1e-12)
    xt = Tensor(np.abs(x), requires_grad=True)
    ag.sqrt(xt).sum().backward()
    np.testing.assert_allclose(xt.grad, 0.5 / np.sqrt(np.abs(x)), rtol=1e-12)


def test_integer_input_of_smooth_functions_gives_float32(xp):
    y = ag.exp(Tensor(xp.asarray([0, 1, 2])))
    assert y.dtype == np.float32
    np.testing.assert_allclose(cpu(y), np.exp([0.0, 1.0, 2.0]), rtol=1e-6)


# ---------------------------------------------------------------------------
# kinks, stability, warnings
# ---------------------------------------------------------------------------


def test_relu_and_abs_gradient_at_zero_is_zero(xp):
    for op, expected in ((ag.relu, [0.0, 0.0, 1.0, 0.0]), (ag.abs, [-1.0, 0.0, 1.0, 0.0])):
        x = leaf(xp, [-2.0, 0.0, 3.0, -0.0])
        op(x).sum().backward()
        np.testing.assert_array_equal(cpu(x.grad), expected)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sigmoid_and_silu_stable_for_large_inputs(xp, dtype):
    a = np.array([-1000.0, -100.0, 0.0, 100.0, 1000.0], dtype=dtype)
    with warnings.catch_warnings(), np.errstate(over="raise", invalid="raise", divide="raise"):
        warnings.simplefilter("error")
        x = leaf(xp, a)
        y = ag.sigmoid(x)
        y.sum().backward()
        xs = leaf(xp, a)
        z = ag.silu(xs)
        z.sum().backward()
    assert y.dtype == dtype and x.grad.dtype == dtype
    tiny = 1e-43 if dtype == np.float32 else 0  # sigmoid(-100) ~ 3.7e-44 is subnormal in float32
    np.testing.assert_allclose(cpu(y), [0.0, 1 / (1 + math.exp(100)), 0.5, 1 / (1 + math.exp(-100)), 1.0],
                               rtol=1e-6, atol=tiny)
    g = cpu(x.grad)
    assert np.all(np.isfinite(g)) and g[0] == 0 and g[-1] == 0 and g[2] == 0.25
    np.testing.assert_allclose(cpu(z), [0.0, -100 / (1 + math.exp(100)), 0.0, 100.0, 1000.0], rtol=1e-6,
                               atol=100 * tiny)
    gz = cpu(xs.grad)
    assert np.all(np.isfinite(gz))
    np.testing.assert_allclose(gz[[0, 2, 4]], [0.0, 0.5, 1.0])


def test_log_and_sqrt_backward_at_zero_quiet(xp):
    x = leaf(xp, [0.0, -1.0, 4.0])
    with np.errstate(divide="ignore", invalid="ignore"):  # the forward follows NumPy (and may warn)
        y = ag.log(x)
    np.testing.assert_array_equal(cpu(y), [-np.inf, np.nan, np.log(4.0)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y.backward(xp.ones(3))
    np.testing.assert_array_equal(cpu(x.grad), [np.inf, -1.0, 0.25])

    x = leaf(xp, [0.0, 4.0])
    y = ag.sqrt(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y.backward(xp.ones(2))
    np.testing.assert_array_equal(cpu(x.grad), [np.inf, 0.25])


# ---------------------------------------------------------------------------
# gelu
# ---------------------------------------------------------------------------


def test_gelu_forms_are_close_but_distinct(xp):
    a = np.linspace(-5, 5, 101)
    x = Tensor(xp.asarray(a))
    tanh_form, exact = cpu(ag.gelu(x)), cpu(ag.gelu(x, approximate="none"))
    np.testing.assert_allclose(tanh_form, _gelu_tanh_ref(a), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(exact, _gelu_erf_ref(a), rtol=1e-12, atol=1e-15)
    diff = np.abs(tanh_form - exact).max()
    assert 1e-5 < diff < 1e-3  # the tanh form approximates the exact one to about 2e-4


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_gelu_tanh_in_pieces_matches_the_formula(xp, rng, monkeypatch, dtype):
    """An input of many cache-sized pieces (here 64 elements) and a ragged last one, non-contiguous:
    values and gradients agree with the closed forms, in float64 and float32."""
    from autograd import kernels

    monkeypatch.setattr(kernels, "CHUNK_ELEMENTS", 64)
    n = 2 * 400 + 123
    a = 3 * rng.standard_normal((2, n)).T  # (n, 2), non-contiguous
    g = rng.standard_normal((n, 2))
    x = Tensor(xp.asarray(a.astype(dtype)), requires_grad=True)
    y = ag.gelu(x)
    y.backward(grad=xp.asarray(g.astype(dtype)))
    assert y.dtype == dtype and x.grad.dtype == dtype and y.shape == (n, 2)
    a32 = a.astype(dtype).astype(np.float64)  # the values the op saw
    t = np.tanh(math.sqrt(2 / math.pi) * (a32 + 0.044715 * a32 ** 3))
    d = 0.5 * (1 + t) + 0.5 * a32 * (1 - t ** 2) * math.sqrt(2 / math.pi) * (1 + 3 * 0.044715 * a32 ** 2)
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == np.float64 else dict(rtol=2e-5, atol=3e-5)
    np.testing.assert_allclose(cpu(y), _gelu_tanh_ref(a32), **tol)
    np.testing.assert_allclose(cpu(x.grad), d * g.astype(dtype), **tol)


@pytest.mark.parametrize("bad", ["erf", "exact", "Tanh", None, True])
def test_gelu_rejects_unknown_form(bad):
    with pytest.raises(ValueError, match="'tanh'.*'none'"):
        ag.gelu(Tensor([1.0]), approximate=bad)


# ---------------------------------------------------------------------------
# erf
# ---------------------------------------------------------------------------


def test_erf_matches_math_erf(xp):
    pts = np.concatenate([
        np.linspace(-6, 6, 24001),
        np.linspace(-30, -6, 500), np.linspace(6, 30, 500),  # tails
        np.geomspace(1e-300, 1e-2, 300), -np.geomspace(1e-300, 1e-2, 300),  # near 0
        [0.0, 0.46875, np.nextafter(0.46875, 1), 4.0, np.nextafter(4.0, 5), 26.5, 27.0, 27.5],  # range edges
    ])
    ref = _erf_ref(pts)
    got = cpu(erf(xp.asarray(pts)))
    assert got.dtype == np.float64
    nonzero = ref != 0
    rel = np.abs(got[nonzero] - ref[nonzero]) / np.abs(ref[nonzero])
    assert rel.max() < 1e-13, f"max relative error {rel.max():.3g} at x = {pts[nonzero][rel.argmax()]!r}"
    assert np.all(got[~nonzero] == 0)
    np.testing.assert_array_equal(cpu(erf(xp.asarray(-pts))), -got)  # odd, exactly


def test_erf_special_values_and_dtypes(xp):
    got = cpu(erf(xp.asarray([np.inf, -np.inf, np.nan, -0.0])))
    assert got[0] == 1 and got[1] == -1 and np.isnan(got[2]) and got[3] == 0 and np.signbit(got[3])
    a32 = np.linspace(-4, 4, 33, dtype=np.float32)
    y32 = erf(xp.asarray(a32))
    assert y32.dtype == np.float32
    np.testing.assert_allclose(cpu(y32), _erf_ref(a32.astype(np.float64)), rtol=1e-6, atol=1e-7)
    y0 = erf(xp.asarray(0.5))  # 0-d in, 0-d array out
    assert y0.shape == () and not isinstance(y0, np.generic) and float(y0) == pytest.approx(math.erf(0.5), rel=1e-15)
    yi = erf(xp.asarray([0, 1, -2]))
    assert yi.dtype == np.float64
    np.testing.assert_allclose(cpu(yi), [0.0, math.erf(1), math.erf(-2)], rtol=1e-15)
    strided = np.linspace(-3, 3, 40).reshape(5, 8).T[::2]  # (4, 5), non-contiguous
    np.testing.assert_allclose(cpu(erf(xp.asarray(strided))), _erf_ref(strided), rtol=1e-14)


# ---------------------------------------------------------------------------
# maximum / minimum
# ---------------------------------------------------------------------------

BROADCAST_PAIRS = [((3, 4), (3, 4)), ((3, 1), (1, 4)), ((2, 3, 4), (4,)), ((), (2, 3))]


@pytest.mark.parametrize("op", [ag.maximum, ag.minimum], ids=["maximum", "minimum"])
@pytest.mark.parametrize("shapes", BROADCAST_PAIRS, ids=str)
def test_maximum_minimum_gradcheck(xp, rng, op, shapes):
    a, b = rng.standard_normal(shapes[0]), rng.standard_normal(shapes[1])
    assert np.abs(np.subtract(a, b)).min() > 1e-3  # no tie within the finite-difference step
    assert gradcheck(op, leaf(xp, a), leaf(xp, b))


@pytest.mark.parametrize("op", [ag.maximum, ag.minimum], ids=["maximum", "minimum"])
def test_maximum_minimum_noncontiguous_and_values(xp, rng, op):
    a = rng.standard_normal((6, 5)).T[:, ::2]  # (5, 3), non-contiguous
    b = rng.standard_normal((5, 1))
    assert gradcheck(op, leaf(xp, a), leaf(xp, b))
    ref = np.maximum(a, b) if op is ag.maximum else np.minimum(a, b)
    np.testing.assert_array_equal(cpu(op(Tensor(xp.asarray(a)), Tensor(xp.asarray(b)))), ref)
    # only one input needs a gradient: the other gets none
    x, c = leaf(xp, a), Tensor(xp.asarray(b))
    op(x, c).sum().backward()
    assert c.grad is None
    picked = (a > b) if op is ag.maximum else (a < b)
    np.testing.assert_array_equal(cpu(x.grad), picked.astype(np.float64))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_maximum_minimum_ties_split_the_gradient(xp, dtype):
    g = xp.asarray(np.array([2.0, 3.0, 4.0], dtype=dtype))
    for op, ga, gb in ((ag.maximum, [1.0, 0.0, 4.0], [1.0, 3.0, 0.0]),
                       (ag.minimum, [1.0, 3.0, 0.0], [1.0, 0.0, 4.0])):
        a, b = leaf(xp, [1.0, 2.0, 3.0], dtype), leaf(xp, [1.0, 5.0, 0.0], dtype)
        op(a, b).backward(g)
        assert a.grad.dtype == dtype and b.grad.dtype == dtype
        np.testing.assert_array_equal(cpu(a.grad), ga)
        np.testing.assert_array_equal(cpu(b.grad), gb)


def test_maximum_tie_with_broadcast_scalar(xp):
    x = leaf(xp, [0.0, 0.0, 1.0, -1.0])
    zero = leaf(xp, 0.0)
    ag.maximum(x, zero).sum().backward()
    np.testing.assert_array_equal(cpu(x.grad), [0.5, 0.5, 1.0, 0.0])
    assert float(cpu(zero.grad)) == 0.5 + 0.5 + 0.0 + 1.0
    y = ag.maximum(x, 0.5)  # a Python scalar takes the tensor's dtype
    np.testing.assert_array_equal(cpu(y), [0.5, 0.5, 1.0, 0.5])


# ---------------------------------------------------------------------------
# where
# ---------------------------------------------------------------------------


def test_where_gradcheck_broadcast(xp, rng):
    cond = xp.asarray(rng.standard_normal((3, 1)) > 0)
    x = rng.standard_normal((1, 4))
    y = rng.standard_normal((8, 3)).T[:, ::2]  # (3, 4), non-contiguous
    assert gradcheck(lambda a, b: ag.where(cond, a, b), leaf(xp, x), leaf(xp, y))


def test_where_values_and_gradient_routing(xp):
    c = np.array([True, False, True, False])
    xv, yv = np.array([1.0, 2.0, 3.0, 4.0]), np.array([10.0, 20.0, 30.0, 40.0])
    x, y = leaf(xp, xv), leaf(xp, yv)
    out = ag.where(Tensor(xp.asarray(c)), x, y)  # a boolean Tensor works as cond
    np.testing.assert_array_equal(cpu(out), np.where(c, xv, yv))
    out.backward(xp.asarray([1.0, 2.0, 3.0, 4.0]))
    np.testing.assert_array_equal(cpu(x.grad), [1.0, 0.0, 3.0, 0.0])
    np.testing.assert_array_equal(cpu(y.grad), [0.0, 2.0, 0.0, 4.0])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_where_with_scalar_branches(xp, dtype):
    c = xp.asarray([True, False, True])
    x = leaf(xp, [1.0, 2.0, 3.0], dtype)
    out = ag.where(c, x, 0.0)
    assert out.dtype == dtype
    np.testing.assert_array_equal(cpu(out), [1.0, 0.0, 3.0])
    out.sum().backward()
    assert x.grad.dtype == dtype
    np.testing.assert_array_equal(cpu(x.grad), [1.0, 0.0, 1.0])
    y = leaf(xp, [1.0, 2.0, 3.0], dtype)
    out = ag.where(c, -1.0, y)
    np.testing.assert_array_equal(cpu(out), [-1.0, 2.0, -1.0])
    out.sum().backward()
    np.testing.assert_array_equal(cpu(y.grad), [0.0, 1.0, 0.0])
    both = ag.where(c, 1.0, 0.0)  # no tensor at all: float32, like Tensor(1.0)
    assert both.dtype == np.float32
    np.testing.assert_array_equal(cpu(both), [1.0, 0.0, 1.0])


def test_where_rejects_non_boolean_condition():
    with pytest.raises(TypeError, match="boolean"):
        ag.where(np.array([1.0, 0.0]), Tensor([1.0, 2.0]), 0.0)


def test_shape_mismatch_names_the_shapes():
    with pytest.raises(ValueError, match=r"where: .*cond \(2,\), x \(3,\)"):
        ag.where(np.array([True, False]), Tensor([1.0, 2.0, 3.0]), 0.0)
    with pytest.raises(ValueError, match=r"maximum: .*a \(2,\), b \(3,\)"):
        ag.maximum(Tensor([1.0, 2.0]), Tensor([1.0, 2.0, 3.0]))


# ---------------------------------------------------------------------------
# clip
# ---------------------------------------------------------------------------


def test_clip_gradcheck_away_from_bounds(xp, rng):
    a = rng.standard_normal((6, 8)).T[:, ::3]  # (8, 2), non-contiguous
    for lo, hi in ((-0.5, 0.5), (None, 0.3), (-0.3, None)):
        for bound in (lo, hi):
            assert bound is None or np.abs(a - bound).min() > 1e-3
        assert gradcheck(lambda t: ag.clip(t, lo, hi), leaf(xp, a))


def test_clip_bounds_are_inclusive(xp):
    a = [-1.0, 0.0, 0.5, 1.0, 2.0]
    x = leaf(xp, a)
    y = ag.clip(x, 0.0, 1.0)
    np.testing.assert_array_equal(cpu(y), np.clip(a, 0.0, 1.0))
    y.backward(xp.asarray([1.0, 2.0, 3.0, 4.0, 5.0]))
    np.testing.assert_array_equal(cpu(x.grad), [0.0, 2.0, 3.0, 4.0, 0.0])
    for lo, hi, grad in ((0.0, None, [0.0, 1.0, 1.0, 1.0, 1.0]), (None, 0.5, [1.0, 1.0, 1.0, 0.0, 0.0])):
        x = leaf(xp, a)
        y = ag.clip(x, lo, hi)
        np.testing.assert_array_equal(cpu(y), np.clip(a, lo, hi))
        y.sum().backward()
        np.testing.assert_array_equal(cpu(x.grad), grad)


def test_clip_dtype_and_array_bounds(xp):
    x = leaf(xp, [-2.0, 0.5, 2.0], np.float32)
    y = ag.clip(x, np.float64(-1.0), np.float64(1.0))  # float64 bounds must not promote
    assert y.dtype == np.float32
    y.sum().backward()
    assert x.grad.dtype == np.float32
    lo = Tensor(xp.asarray([[0.0], [1.0]], dtype=np.float32))  # (2, 1): broadcasts x to (2, 3)
    x = leaf(xp, [-2.0, 0.5, 2.0], np.float32)
    y = ag.clip(x, lo, 1.5)
    np.testing.assert_array_equal(cpu(y), [[0.0, 0.5, 1.5], [1.0, 1.0, 1.5]])
    y.sum().backward()
    np.testing.assert_array_equal(cpu(x.grad), [0.0, 1.0, 0.0])


def test_clip_needs_a_bound():
    with pytest.raises(ValueError, match="min= and max="):
        ag.clip(Tensor([1.0]))
    with pytest.raises(TypeError, match="max must be"):
        ag.clip(Tensor([1.0]), 0.0, "1")


# ---------------------------------------------------------------------------
# methods and operators on Tensor
# ---------------------------------------------------------------------------


def test_tensor_methods_route_to_the_ops(xp, rng):
    a = rng.standard_normal((2, 3))
    x = Tensor(xp.asarray(a))
    np.testing.assert_allclose(cpu(x.exp()), np.exp(a), rtol=1e-14)
    np.testing.assert_array_equal(cpu(x.relu()), np.maximum(a, 0))
    np.testing.assert_array_equal(cpu(abs(x)), np.abs(a))
    np.testing.assert_array_equal(cpu(x.abs()), np.abs(a))
    np.testing.assert_array_equal(cpu(x.clip(0, 1)), np.clip(a, 0, 1))
    np.testing.assert_allclose(cpu(x.gelu()), _gelu_tanh_ref(a), rtol=1e-12)
    np.testing.assert_allclose(cpu(x.gelu(approximate="none")), _gelu_erf_ref(a), rtol=1e-12)
    np.testing.assert_allclose(cpu(x.tanh()), np.tanh(a), rtol=1e-14)
    np.testing.assert_allclose(cpu(x.sigmoid()), 1 / (1 + np.exp(-a)), rtol=1e-14)
    np.testing.assert_allclose(cpu(x.silu()), a / (1 + np.exp(-a)), rtol=1e-14)
    np.testing.assert_allclose(cpu(abs(x).log()), np.log(np.abs(a)), rtol=1e-14)
    np.testing.assert_allclose(cpu(abs(x).sqrt()), np.sqrt(np.abs(a)), rtol=1e-14)
    np.testing.assert_array_equal(cpu(x.maximum(0.0)), np.maximum(a, 0.0))
    np.testing.assert_array_equal(cpu(x.minimum(x * 2)), np.minimum(a, a * 2))
    xg = Tensor(xp.asarray(a), requires_grad=True)
    abs(xg).sum().backward()
    np.testing.assert_array_equal(cpu(xg.grad), np.sign(a))
