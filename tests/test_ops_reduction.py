"""Reductions: sum, mean, var, max, min, logsumexp (values against NumPy, gradients against gradcheck)."""

import numpy as np
import pytest

import autograd as ag
from autograd import Tensor, gradcheck
from autograd.backend import to_device


def leaf(xp, a, dtype=None):
    a = np.asarray(a, dtype=dtype)
    return Tensor(xp.asarray(a), requires_grad=True)


def cpu(a):
    return to_device(a.data if isinstance(a, Tensor) else a, "cpu")


def np_logsumexp(a, axis=None, keepdims=False):
    """Reference in float64, written plainly: shift by the max, then log(sum(exp))."""
    a = np.asarray(a, dtype=np.float64)
    m = a.max(axis=axis, keepdims=True)
    out = np.log(np.exp(a - m).sum(axis=axis, keepdims=True)) + m
    return out if keepdims else np.squeeze(out, axis=axis) if axis is not None else out.reshape(())


REFERENCE = {
    "sum": lambda a, axis, keepdims: a.sum(axis=axis, keepdims=keepdims),
    "mean": lambda a, axis, keepdims: a.mean(axis=axis, keepdims=keepdims),
    "var": lambda a, axis, keepdims: a.var(axis=axis, keepdims=keepdims),
    "max": lambda a, axis, keepdims: a.max(axis=axis, keepdims=keepdims),
    "min": lambda a, axis, keepdims: a.min(axis=axis, keepdims=keepdims),
    "logsumexp": np_logsumexp,
}
AXES = [None, 0, -1, (0, 2), (-1, 0), 1]


@pytest.mark.parametrize("name", list(REFERENCE))
@pytest.mark.parametrize("axis", AXES, ids=str)
@pytest.mark.parametrize("keepdims", [False, True])
def test_values_and_gradcheck(xp, rng, name, axis, keepdims):
    a = rng.standard_normal((3, 4, 5))
    fn = getattr(ag, name)
    y = fn(leaf(xp, a), axis=axis, keepdims=keepdims)
    expected = REFERENCE[name](a, axis, keepdims)
    assert y.shape == np.shape(expected)
    np.testing.assert_allclose(cpu(y), expected, rtol=1e-12, atol=1e-12)
    assert gradcheck(lambda t: fn(t, axis=axis, keepdims=keepdims), leaf(xp, a))


def test_sum_gradient_is_ones_broadcast(xp, rng):
    x = leaf(xp, rng.standard_normal((2, 3, 4)))
    ag.sum(x, axis=1).backward(xp.asarray(np.arange(8.0).reshape(2, 4)))
    expected = np.broadcast_to(np.arange(8.0).reshape(2, 1, 4), (2, 3, 4))
    np.testing.assert_array_equal(cpu(x.grad), expected)


def test_mean_gradient_divides_by_count(xp, rng):
    x = leaf(xp, rng.standard_normal((2, 3, 4)))
    ag.mean(x, axis=(0, 2)).sum().backward()
    np.testing.assert_allclose(cpu(x.grad), np.full((2, 3, 4), 1 / 8))


@pytest.mark.parametrize("axis", [None, 1, (0, -1)], ids=str)
@pytest.mark.parametrize("keepdims", [False, True])
def test_var_ddof1(xp, rng, axis, keepdims):
    a = rng.standard_normal((3, 4, 5))
    y = ag.var(leaf(xp, a), axis=axis, keepdims=keepdims, ddof=1)
    np.testing.assert_allclose(cpu(y), a.var(axis=axis, keepdims=keepdims, ddof=1), rtol=1e-12)
    assert gradcheck(lambda t: ag.var(t, axis=axis, keepdims=keepdims, ddof=1), leaf(xp, a))


def test_var_default_is_population(xp):
    x = leaf(xp, [1.0, 2.0, 3.0, 4.0])
    assert float(cpu(ag.var(x))) == pytest.approx(1.25)  # sum of squares 5 / N=4
    assert float(cpu(ag.var(x, ddof=1))) == pytest.approx(5 / 3)


def test_var_gradient_formula(xp):
    a = np.array([1.0, 2.0, 4.0, 9.0])
    x = leaf(xp, a)
    ag.var(x, ddof=1).backward()
    np.testing.assert_allclose(cpu(x.grad), 2 * (a - a.mean()) / 3)


def test_var_too_few_elements(xp):
    with pytest.raises(ValueError, match="ddof"):
        ag.var(leaf(xp, [[1.0], [2.0]]), axis=1, ddof=1)


# -- max / min ties ---------------------------------------------------------


def test_max_ties_share_gradient(xp):
    x = leaf(xp, [[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, -1.0]])
    ag.max(x, axis=1).backward(xp.asarray([2.0, 3.0]))
    np.testing.assert_allclose(cpu(x.grad), [[0, 1, 1, 0], [1, 1, 1, 0]], rtol=1e-15)


def test_min_ties_share_gradient(xp):
    x = leaf(xp, [[1.0, 0.0, 0.0], [5.0, 5.0, 5.0]])
    ag.min(x, axis=-1, keepdims=True).sum().backward()
    np.testing.assert_allclose(cpu(x.grad), [[0, 0.5, 0.5], [1 / 3, 1 / 3, 1 / 3]], rtol=1e-15)


def test_max_all_axes_ties(xp):
    x = leaf(xp, [[4.0, 1.0], [4.0, 4.0]])
    y = ag.max(x)
    assert y.shape == ()
    y.backward()
    np.testing.assert_allclose(cpu(x.grad), [[1 / 3, 0], [1 / 3, 1 / 3]], rtol=1e-15)


def test_max_min_values_and_methods(xp, rng):
    a = rng.standard_normal((3, 4))
    x = leaf(xp, a)
    np.testing.assert_array_equal(cpu(x.max(axis=0)), a.max(axis=0))
    np.testing.assert_array_equal(cpu(x.min(-1, True)), a.min(-1, keepdims=True))


def test_max_empty_axis_is_an_error(xp):
    with pytest.raises(ValueError, match="size 0"):
        ag.max(Tensor(xp.zeros((2, 0))), axis=1)


# -- logsumexp ----------------------------------------------------------------


def test_logsumexp_large_values_finite(xp, rng):
    a = 1000.0 + rng.standard_normal((3, 6))
    for dtype in (np.float64, np.float32):
        x = leaf(xp, a, dtype=dtype)
        y = ag.logsumexp(x, axis=1)
        got = cpu(y)
        assert got.dtype == dtype
        assert np.isfinite(got).all()
        # log(sum(exp(a))) = 1000 + log(sum(exp(a - 1000))), exactly representable in float64
        expected = 1000.0 + np.log(np.exp(a - 1000.0).sum(axis=1))
        np.testing.assert_allclose(got, expected, rtol=1e-6 if dtype == np.float32 else 1e-13)
        y.sum().backward()
        assert np.isfinite(cpu(x.grad)).all()


def test_logsumexp_matches_log_sum_exp(xp, rng):
    a = rng.standard_normal((4, 5)) * 3
    y = ag.logsumexp(leaf(xp, a), axis=-1, keepdims=True)
    np.testing.assert_allclose(cpu(y), np.log(np.exp(a).sum(axis=-1, keepdims=True)), rtol=1e-13)
    y_all = ag.logsumexp(leaf(xp, a))
    np.testing.assert_allclose(cpu(y_all), np.log(np.exp(a).sum()), rtol=1e-13)


def test_logsumexp_gradient_is_softmax(xp, rng):
    a = rng.standard_normal((3, 5))
    x = leaf(xp, a)
    ag.logsumexp(x, axis=1).sum().backward()
    e = np.exp(a)
    np.testing.assert_allclose(cpu(x.grad), e / e.sum(axis=1, keepdims=True), rtol=1e-13)


def test_logsumexp_all_minus_inf(xp):
    x = leaf(xp, [[-np.inf, -np.inf], [0.0, -np.inf]])
    y = cpu(ag.logsumexp(x, axis=1))
    assert y[0] == -np.inf
    assert y[1] == 0.0


# -- dtypes, layouts, errors ----------------------------------------------------


@pytest.mark.parametrize("name", list(REFERENCE))
def test_float32_stays_float32(xp, rng, name):
    x = leaf(xp, rng.standard_normal((3, 4)), dtype=np.float32)
    fn = getattr(ag, name)
    for axis in (None, 1, (0, 1)):
        x.grad = None
        y = fn(x, axis=axis)
        assert y.dtype == np.float32, (name, axis)
        y.sum().backward()
        assert x.grad.dtype == np.float32, (name, axis)
        assert x.grad.shape == (3, 4)


def test_mean_float32_matches_numpy(xp, rng):
    a = rng.standard_normal((7, 9)).astype(np.float32)
    y = ag.mean(leaf(xp, a), axis=1)
    assert y.dtype == np.float32
    np.testing.assert_allclose(cpu(y), a.mean(axis=1), rtol=1e-6)


@pytest.mark.parametrize("name", list(REFERENCE))
def test_non_contiguous_inputs(xp, rng, name):
    fn = getattr(ag, name)
    base = rng.standard_normal((6, 4))
    for a in (base.T, base[::2, ::-1], base[:, 1::2]):
        x = Tensor(xp.asarray(a), requires_grad=True)
        assert not x.data.flags.c_contiguous
        for axis in (0, -1, None):
            np.testing.assert_allclose(cpu(fn(x, axis=axis)), REFERENCE[name](a, axis, False), rtol=1e-12)
        assert gradcheck(lambda t: fn(t, axis=0), x)
        x.grad = None
        fn(x, axis=1).sum().backward()
        y_ref = Tensor(xp.asarray(np.ascontiguousarray(a)), requires_grad=True)
        fn(y_ref, axis=1).sum().backward()
        np.testing.assert_allclose(cpu(x.grad), cpu(y_ref.grad), rtol=1e-12)


def test_method_forms(xp, rng):
    a = rng.standard_normal((2, 3, 4))
    x = leaf(xp, a)
    y = x.sum(axis=(0, 2), keepdims=True)
    assert y.shape == (1, 3, 1)
    np.testing.assert_allclose(cpu(y), a.sum(axis=(0, 2), keepdims=True))
    (y * Tensor(xp.asarray([[[1.0], [2.0], [3.0]]]))).sum().backward()
    np.testing.assert_allclose(cpu(x.grad), np.broadcast_to(np.array([1.0, 2.0, 3.0])[:, None], (2, 3, 4)))
    np.testing.assert_allclose(cpu(x.mean(1)), a.mean(1))
    np.testing.assert_allclose(cpu(x.var(axis=-1, ddof=1)), a.var(axis=-1, ddof=1))
    np.testing.assert_allclose(cpu(x.logsumexp(axis=0)), np_logsumexp(a, axis=0))
    assert x.max().shape == ()


@pytest.mark.parametrize("name", list(REFERENCE))
def test_bad_axis_errors(xp, name):
    fn = getattr(ag, name)
    x = leaf(xp, np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"axis 2 is out of range.*\(2, 3\)"):
        fn(x, axis=2)
    with pytest.raises(ValueError, match="same axis twice"):
        fn(x, axis=(1, -1))
    with pytest.raises(TypeError, match="axis must be an int"):
        fn(x, axis=1.0)


def test_0d_input(xp):
    x = leaf(xp, 3.0)
    y = ag.sum(x)
    y.backward()
    assert float(cpu(x.grad)) == 1.0
    assert float(cpu(ag.logsumexp(x))) == pytest.approx(3.0)


@pytest.mark.parametrize("name", list(REFERENCE))
def test_0d_all_reductions(xp, name):
    x = leaf(xp, 2.5)
    y = getattr(ag, name)(x)
    assert y.shape == ()
    assert float(cpu(y)) == pytest.approx(0.0 if name == "var" else 2.5)
    y.backward()
    assert x.grad.shape == ()
