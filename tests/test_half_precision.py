"""float16 inputs accumulate in float32: sums, means, variances, broadcast gradients, bias and embedding grads.

A float16 running sum stalls once the total dwarfs each term (4096 x 0.01 gives 32.0,
not 40.96); every reduction in the engine must accumulate in float32 and cast back.
"""

import numpy as np
import pytest

import autograd as ag
import nn
from autograd import Tensor
from autograd.backend import accumulation_dtype, to_device

N = 4096


def half(xp, array):
    return Tensor(xp.asarray(array, dtype=np.float16), requires_grad=True)


def test_accumulation_dtype():
    assert accumulation_dtype(np.float16) == np.float32
    assert accumulation_dtype(np.float32) == np.float32
    assert accumulation_dtype(np.float64) == np.float64
    assert accumulation_dtype(np.float16, np.float64) == np.float64


@pytest.mark.parametrize("reduce, expected", [
    (lambda x: x.sum(), N * 0.01),
    (lambda x: x.mean() * float(N), N * 0.01),
])
def test_reductions_of_many_small_values(xp, reduce, expected):
    x = half(xp, np.full(N, 0.01))
    y = reduce(x)
    assert y.dtype == np.float16
    assert abs(float(y.item()) - expected) / expected < 2e-3  # float16 rounding of the result only


def test_var_and_logsumexp_do_not_overflow(xp, rng):
    x = rng.standard_normal(1000) * 100.0  # var ~1e4 fits float16, but squares of the largest deviations (~1e5) do not
    v = ag.var(half(xp, x))
    np.testing.assert_allclose(float(v.item()), np.var(x.astype(np.float16).astype(np.float64)), rtol=2e-3)
    big = np.zeros(70_000)  # logsumexp = log(70000) while the float16 sum of exps overflows
    assert abs(float(ag.logsumexp(half(xp, big)).item()) - np.log(70_000)) < 1e-2


def test_broadcast_gradient_sums_in_float32(xp):
    b = half(xp, np.zeros(1))
    x = Tensor(xp.zeros((N, 1), dtype=np.float16))
    (x + b).backward(xp.full((N, 1), 0.01, dtype=np.float16))
    assert b.grad.dtype == np.float16
    assert abs(float(b.grad[0]) - N * 0.01) / (N * 0.01) < 2e-3


def test_linear_bias_and_embedding_gradients_sum_in_float32(xp):
    layer = nn.Linear(2, 1).to("float16")
    if xp is not np:
        layer.to("cuda")
    x = Tensor(xp.zeros((N, 2), dtype=np.float16))
    layer(x).backward(xp.full((N, 1), 0.01, dtype=np.float16))
    assert abs(float(layer.bias.grad[0]) - N * 0.01) / (N * 0.01) < 2e-3
    w = half(xp, np.zeros((3, 1)))
    ids = xp.zeros(N, dtype=np.int64)  # one frequent id
    ag.embedding(w, ids).backward(xp.full((N, 1), 0.01, dtype=np.float16))
    assert w.grad.dtype == np.float16
    assert abs(float(to_device(w.grad, "cpu")[0, 0]) - N * 0.01) / (N * 0.01) < 2e-3
