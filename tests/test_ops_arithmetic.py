"""Arithmetic and matmul: gradient checks with broadcasting and non-contiguous inputs, values, errors."""

import numpy as np
import pytest

import autograd as ag
from autograd import Tensor, gradcheck
from autograd.backend import to_device

BINARY = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b,
    "pow": lambda a, b: a ** b,
}
SHAPES = [((3, 4), (3, 4)), ((3, 4), (4,)), ((2, 1, 4), (3, 1)), ((), (2, 3)), ((5,), ())]


def t(xp, array):
    return Tensor(xp.asarray(array), requires_grad=True)


@pytest.mark.parametrize("name", BINARY)
@pytest.mark.parametrize("shapes", SHAPES, ids=str)
def test_binary_gradcheck_with_broadcasting(xp, rng, name, shapes):
    sa, sb = shapes
    a = rng.uniform(0.5, 2.0, sa)  # positive, so pow's log(a) is defined
    b = rng.uniform(0.5, 2.0, sb)
    assert gradcheck(BINARY[name], t(xp, a), t(xp, b))


@pytest.mark.parametrize("name", BINARY)
def test_binary_on_non_contiguous_inputs(xp, rng, name):
    a = xp.asarray(rng.uniform(0.5, 2.0, (4, 3))).T  # (3, 4), Fortran order
    b = xp.asarray(rng.uniform(0.5, 2.0, (3, 8)))[:, ::2]  # (3, 4), strided
    assert not a.flags.c_contiguous and not b.flags.c_contiguous
    assert gradcheck(BINARY[name], Tensor(a, requires_grad=True), Tensor(b, requires_grad=True))


@pytest.mark.parametrize("name", BINARY)
def test_binary_values_match_numpy(xp, rng, name):
    a, b = rng.uniform(0.5, 2.0, (2, 3)), rng.uniform(0.5, 2.0, (3,))
    out = BINARY[name](t(xp, a), t(xp, b))
    np.testing.assert_allclose(to_device(out.data, "cpu"), BINARY[name](a, b), rtol=1e-14)


def test_unary_and_scalar_forms(xp, rng):
    x = t(xp, rng.uniform(0.5, 2.0, (3, 2)))
    for fn in (lambda x: -x, lambda x: x ** 3, lambda x: x ** -1.5, lambda x: 2.0 ** x, lambda x: 3.0 - x,
               lambda x: 1.0 / x, lambda x: 2 * x + 1):
        assert gradcheck(fn, x)


def test_pow_tensor_exponent_at_zero_base(xp):
    a = t(xp, np.array([0.0, 2.0]))
    b = t(xp, np.array([2.0, 3.0]))
    (a ** b).backward(xp.ones(2))
    np.testing.assert_array_equal(to_device(b.grad, "cpu"), [0.0, 8.0 * np.log(2.0)])
    np.testing.assert_array_equal(to_device(a.grad, "cpu"), [0.0, 12.0])


MATMUL_SHAPES = [((3, 4), (4, 5)), ((4,), (4, 5)), ((3, 4), (4,)), ((4,), (4,)), ((2, 3, 4), (4, 5)),
                 ((2, 1, 3, 4), (5, 4, 2)), ((4,), (2, 4, 3)), ((2, 3, 4), (4,))]


@pytest.mark.parametrize("shapes", MATMUL_SHAPES, ids=str)
def test_matmul_gradcheck_numpy_cases(xp, rng, shapes):
    sa, sb = shapes
    a, b = rng.standard_normal(sa), rng.standard_normal(sb)
    out = t(xp, a) @ t(xp, b)
    np.testing.assert_allclose(to_device(out.data, "cpu"), a @ b, rtol=1e-12)
    assert gradcheck(lambda a, b: a @ b, t(xp, a), t(xp, b))


def test_matmul_non_contiguous_and_reflected(xp, rng):
    a = Tensor(xp.asarray(rng.standard_normal((4, 3))).T, requires_grad=True)  # (3, 4) transposed view
    b = xp.asarray(rng.standard_normal((4, 2)))
    assert gradcheck(lambda a: a @ b, a)
    assert gradcheck(lambda a: b.T @ a.T, a)  # array @ tensor uses __rmatmul__


def test_matmul_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(3, 4\) @ \(5, 2\)"):
        Tensor(np.ones((3, 4))) @ Tensor(np.ones((5, 2)))
    with pytest.raises(ValueError, match="scalar"):
        ag.matmul(Tensor(np.ones(())), Tensor(np.ones(3)))
