"""Tests of the neural-network ops: softmax, log_softmax, cross_entropy, embedding, dropout.

Each op is checked three ways: gradcheck (float64 central differences), forward
values against a plain float64 NumPy computation written here, and dtypes
(float32 stays float32; float16 is computed in float32 where it must be).
"""

import numpy as np
import pytest

from autograd import random as ag_random
from autograd import Tensor, cross_entropy, dropout, embedding, gradcheck, log_softmax, softmax
from autograd.backend import to_device
from autograd.ops import nn_ops


def cpu(a):
    return to_device(a.data if isinstance(a, Tensor) else a, "cpu")


# -- plain NumPy float64 references ------------------------------------------------


def np_log_softmax(x, axis=-1):
    x = np.asarray(x, dtype=np.float64)
    z = x - x.max(axis=axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


def np_cross_entropy(logits, targets, ignore_index=-100):
    """Per-position losses (0 at ignored) and the gradient of their plain sum w.r.t. logits."""
    logits = np.asarray(logits, dtype=np.float64)
    V = logits.shape[-1]
    x = logits.reshape(-1, V)
    t = np.asarray(targets).reshape(-1)
    lp = np_log_softmax(x)
    losses = np.zeros(len(t))
    grad = np.zeros_like(x)
    for n, tn in enumerate(t):
        if tn == ignore_index:
            continue
        losses[n] = -lp[n, tn]
        onehot = np.zeros(V)
        onehot[tn] = 1.0
        grad[n] = np.exp(lp[n]) - onehot
    return losses.reshape(np.shape(targets)), grad.reshape(logits.shape)


def leaf(xp, a, dtype=None):
    a = xp.asarray(a if dtype is None else np.asarray(a, dtype=dtype))
    return Tensor(a, requires_grad=True)


# -- softmax / log_softmax ----------------------------------------------------------


@pytest.mark.parametrize("fn", [softmax, log_softmax], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_softmax_gradcheck_axes(xp, rng, fn, axis):
    x = leaf(xp, rng.standard_normal((3, 4, 5)))
    assert gradcheck(lambda x: fn(x, axis), x)


@pytest.mark.parametrize("fn", [softmax, log_softmax], ids=["softmax", "log_softmax"])
def test_softmax_gradcheck_noncontiguous(xp, rng, fn):
    x = leaf(xp, rng.standard_normal((6, 4)).T)  # (4, 6), Fortran order
    assert gradcheck(lambda x: fn(x, -1), x, mode="elementwise")
    y = leaf(xp, rng.standard_normal((3, 8))[:, ::2])  # strided
    assert gradcheck(lambda y: fn(y, 0), y)


@pytest.mark.parametrize("axis", [0, -1])
def test_softmax_forward_matches_numpy(xp, rng, axis):
    a = rng.standard_normal((5, 7)) * 10
    ref = np_log_softmax(a, axis)
    np.testing.assert_allclose(cpu(log_softmax(Tensor(xp.asarray(a)), axis)), ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(cpu(softmax(Tensor(xp.asarray(a)), axis)), np.exp(ref), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(cpu(Tensor(xp.asarray(a)).softmax(axis)), np.exp(ref), rtol=1e-12, atol=1e-15)


def test_softmax_stable_for_huge_logits(xp):
    a = np.array([[1000.0, 1000.0, -1000.0], [-1e4, 0.0, 1e4]])
    y = cpu(softmax(Tensor(xp.asarray(a))))
    np.testing.assert_allclose(y, [[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]], atol=1e-12)
    ly = cpu(log_softmax(Tensor(xp.asarray(a))))
    assert np.isfinite(ly[0, :2]).all() and np.isclose(ly[0, 0], -np.log(2))


@pytest.mark.parametrize("fn", [softmax, log_softmax], ids=["softmax", "log_softmax"])
def test_softmax_float32_stays_float32(xp, rng, fn):
    x = leaf(xp, rng.standard_normal((4, 9)), np.float32)
    y = fn(x, -1)
    assert y.dtype == np.float32
    g = xp.asarray(rng.standard_normal((4, 9)).astype(np.float32))
    g_before = g.copy()
    y.backward(grad=g)
    assert x.grad.dtype == np.float32
    assert (cpu(g) == cpu(g_before)).all(), "backward must not modify its grad argument"
    # the float32 gradient agrees with the float64 one
    x64 = leaf(xp, cpu(x).astype(np.float64))
    fn(x64, -1).backward(grad=g.astype(np.float64))
    np.testing.assert_allclose(cpu(x.grad), cpu(x64.grad), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fn", [softmax, log_softmax], ids=["softmax", "log_softmax"])
def test_softmax_float16_computed_in_float32(xp, rng, fn):
    a = (rng.standard_normal((4, 300)) * 4).astype(np.float16)
    a[0, 0] = 60.0  # exp(60) overflows float16 (max 65504): a float16 computation would give inf/nan
    x = leaf(xp, a)
    y = fn(x, -1)
    assert y.dtype == np.float16
    ref = np_log_softmax(a.astype(np.float64))
    ref = np.exp(ref) if fn is softmax else ref
    assert np.isfinite(cpu(y)).all()
    np.testing.assert_allclose(cpu(y).astype(np.float64), ref, rtol=2e-3, atol=2e-3)
    y.backward(grad=xp.ones_like(y.data))
    assert x.grad.dtype == np.float16 and np.isfinite(cpu(x.grad)).all()


@pytest.mark.parametrize("fn", [softmax, log_softmax], ids=["softmax", "log_softmax"])
def test_softmax_float16_long_rows_sum_in_float32(xp, fn):
    """70,000 equal logits: their exp-sum (70,000) overflows float16 (max 65504) but not float32."""
    y = cpu(fn(Tensor(xp.zeros((2, 70000), dtype=np.float16)), -1)).astype(np.float64)
    ref = np.full((2, 70000), -np.log(70000.0))
    ref = np.exp(ref) if fn is softmax else ref
    np.testing.assert_allclose(y, ref, rtol=2e-3)


@pytest.mark.parametrize("axis", [0, -1])
def test_softmax_backward_matches_numpy(xp, rng, axis):
    """The hand-derived backward against the explicit Jacobian, written out in float64."""
    a = rng.standard_normal((4, 5))
    g = rng.standard_normal((4, 5))
    x = leaf(xp, a)
    softmax(x, axis).backward(grad=xp.asarray(g))
    xl = leaf(xp, a)
    log_softmax(xl, axis).backward(grad=xp.asarray(g))
    s = np.exp(np_log_softmax(a, axis))
    ref = np.zeros_like(a)
    ref_log = np.zeros_like(a)
    for k in range(a.shape[1 - axis % 2]):  # each independent softmax row/column
        idx = (slice(None), k) if axis == 0 else (k, slice(None))
        sv, gv = s[idx], g[idx]
        jac = np.diag(sv) - np.outer(sv, sv)  # d s_i / d x_j
        ref[idx] = jac.T @ gv
        jac_log = np.eye(len(sv)) - np.outer(np.ones(len(sv)), sv)  # d log s_i / d x_j
        ref_log[idx] = jac_log.T @ gv
    np.testing.assert_allclose(cpu(x.grad), ref, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(cpu(xl.grad), ref_log, rtol=1e-10, atol=1e-14)


def test_softmax_bad_axis_and_dtype(xp):
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        softmax(Tensor(xp.zeros((2, 3))), axis=2)
    with pytest.raises(TypeError, match="floating-point"):
        log_softmax(Tensor(xp.zeros((2, 3), dtype=np.int64)))


# -- cross_entropy --------------------------------------------------------------------


def _targets_with_ignored(rng, shape, V, ignore_index=-100):
    t = rng.integers(0, V, size=shape)
    t.reshape(-1)[[1, -1]] = ignore_index
    return t


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_gradcheck_3d(xp, rng, reduction):
    B, T, V = 2, 3, 5
    x = leaf(xp, rng.standard_normal((B, T, V)))
    t = xp.asarray(_targets_with_ignored(rng, (B, T), V))
    assert gradcheck(lambda x: cross_entropy(x, t, reduction=reduction), x)
    assert gradcheck(lambda x: cross_entropy(x, Tensor(t), reduction=reduction), x, mode="elementwise")


def test_cross_entropy_gradcheck_noncontiguous(xp, rng):
    x = leaf(xp, rng.standard_normal((5, 4)).T)  # (4, 5) transposed
    t = xp.asarray(np.array([0, 4, 2, -100]))
    assert gradcheck(lambda x: cross_entropy(x, t), x, mode="elementwise")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_matches_numpy(xp, rng, reduction):
    B, T, V = 3, 4, 7
    a = rng.standard_normal((B, T, V)) * 3
    t = _targets_with_ignored(rng, (B, T), V)
    ref_losses, ref_grad_sum = np_cross_entropy(a, t)
    count = (t != -100).sum()
    x = leaf(xp, a)
    loss = cross_entropy(x, xp.asarray(t), reduction=reduction)
    if reduction == "none":
        assert loss.shape == (B, T)
        np.testing.assert_allclose(cpu(loss), ref_losses, rtol=1e-12, atol=1e-14)
        assert (cpu(loss)[t == -100] == 0).all()
        g = rng.standard_normal((B, T))
        loss.backward(grad=xp.asarray(g))
        np.testing.assert_allclose(cpu(x.grad), ref_grad_sum * g[..., None], rtol=1e-12, atol=1e-14)
    else:
        assert loss.shape == ()
        scale = 1.0 / count if reduction == "mean" else 1.0
        np.testing.assert_allclose(loss.item(), ref_losses.sum() * scale, rtol=1e-12)
        loss.backward()
        np.testing.assert_allclose(cpu(x.grad), ref_grad_sum * scale, rtol=1e-12, atol=1e-14)
    assert (cpu(x.grad)[t == -100] == 0).all(), "ignored positions get no gradient"


def test_cross_entropy_custom_ignore_index_inside_vocab(xp, rng):
    a = rng.standard_normal((6, 4))
    t = np.array([0, 1, 0, 3, 2, 0])
    loss = cross_entropy(Tensor(xp.asarray(a)), xp.asarray(t), ignore_index=0)
    ref, _ = np_cross_entropy(a, t, ignore_index=0)
    np.testing.assert_allclose(loss.item(), ref.sum() / 3, rtol=1e-12)


def test_cross_entropy_float32_stays_float32(xp, rng):
    x = leaf(xp, rng.standard_normal((8, 11)), np.float32)
    t = xp.asarray(rng.integers(0, 11, size=8))
    loss = cross_entropy(x, t)
    assert loss.dtype == np.float32
    loss.backward()
    assert x.grad.dtype == np.float32
    ref, ref_grad = np_cross_entropy(cpu(x), cpu(t))
    np.testing.assert_allclose(loss.item(), ref.mean(), rtol=1e-5)
    np.testing.assert_allclose(cpu(x.grad), ref_grad / 8, rtol=1e-4, atol=1e-6)


def test_cross_entropy_float16_logits(xp, rng):
    V = 500
    a = (rng.standard_normal((2, 6, V)) * 5).astype(np.float16)
    a[0, 0, 3] = 80.0  # exp(80) overflows float16 (and float32): the max must be subtracted first
    t = rng.integers(0, V, size=(2, 6))
    x = leaf(xp, a)
    loss = cross_entropy(x, xp.asarray(t))
    ref, ref_grad = np_cross_entropy(a.astype(np.float64), t)
    assert np.isfinite(loss.item())
    assert loss.dtype == np.float32, "float16 logits give a float32 loss (computed in float32)"
    np.testing.assert_allclose(loss.item(), ref.mean(), rtol=1e-5)
    loss.backward()
    assert x.grad.dtype == np.float16
    np.testing.assert_allclose(cpu(x.grad).astype(np.float64), ref_grad / 12, atol=1e-4)


def test_cross_entropy_float16_long_rows(xp):
    """70,000 equal float16 logits: the exp-sum overflows float16, so it must be done in float32."""
    x = leaf(xp, np.zeros((3, 70000), dtype=np.float16))
    loss = cross_entropy(x, xp.asarray(np.array([0, 5, 69999])))
    np.testing.assert_allclose(loss.item(), np.log(70000.0), rtol=1e-6)


def test_cross_entropy_bad_target_id_message(xp, rng):
    x = Tensor(xp.asarray(rng.standard_normal((2, 5, 65))))
    t = rng.integers(0, 65, size=(2, 5))
    t[1, 3] = 70
    t[1, 4] = 99
    with pytest.raises(ValueError, match=r"target id 70 at position \(1, 3\) is outside the vocabulary of 65"):
        cross_entropy(x, xp.asarray(t))
    t[1, 3], t[1, 4] = -3, 0
    with pytest.raises(ValueError, match=r"target id -3 at position \(1, 3\)"):
        cross_entropy(x, xp.asarray(t))
    t[1, 3] = -100  # the ignore_index is not an error
    assert np.isfinite(cross_entropy(x, xp.asarray(t)).item())


def test_cross_entropy_bad_shapes_and_dtypes(xp):
    x = Tensor(xp.zeros((2, 5, 7)))
    with pytest.raises(ValueError, match=r"\(2, 5, 7\).*\(2, 5\).*\(10,\)"):
        cross_entropy(x, xp.zeros(10, dtype=np.int64))
    with pytest.raises(TypeError, match="integer"):
        cross_entropy(x, xp.zeros((2, 5)))
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy(x, xp.zeros((2, 5), dtype=np.int64), reduction="avg")


def test_cross_entropy_all_ignored_matches_pytorch(xp, rng):
    """PyTorch: mean over zero targets is NaN; the gradient is still all zeros."""
    t = xp.full((3, 4), -100)
    x = leaf(xp, rng.standard_normal((3, 4, 5)))
    with np.errstate(all="raise"):  # no warning may escape either
        loss = cross_entropy(x, t)
        loss.backward()
    assert np.isnan(loss.item())
    assert (cpu(x.grad) == 0).all()
    x.grad = None
    s = cross_entropy(x, t, reduction="sum")
    s.backward()
    assert s.item() == 0 and (cpu(x.grad) == 0).all()
    assert (cpu(cross_entropy(x, t, reduction="none")) == 0).all()


def test_cross_entropy_python_int_targets():
    x = Tensor(np.array([[0.0, 1.0, 2.0], [2.0, 0.0, 0.0]], dtype=np.float32), requires_grad=True)
    loss = cross_entropy(x, [2, 0])
    ref, _ = np_cross_entropy(x.data, np.array([2, 0]))
    np.testing.assert_allclose(loss.item(), ref.mean(), rtol=1e-6)


# -- embedding ------------------------------------------------------------------------


def test_embedding_forward_and_repeated_ids_backward(xp, rng):
    V, C = 6, 3
    w_np = rng.standard_normal((V, C))
    ids = np.array([[1, 1, 2], [5, 1, 0]])
    w = leaf(xp, w_np)
    y = embedding(w, xp.asarray(ids))
    assert y.shape == (2, 3, C)
    np.testing.assert_array_equal(cpu(y), w_np[ids])
    g = rng.standard_normal((2, 3, C))
    y.backward(grad=xp.asarray(g))
    expected = np.zeros((V, C))
    for k, v in enumerate(ids.reshape(-1)):
        expected[v] += g.reshape(-1, C)[k]
    np.testing.assert_allclose(cpu(w.grad), expected, rtol=1e-14)
    assert (cpu(w.grad)[[3, 4]] == 0).all()
    np.testing.assert_allclose(cpu(w.grad)[1], g[0, 0] + g[0, 1] + g[1, 1], rtol=1e-14)  # id 1 three times


def test_embedding_gradcheck(xp, rng):
    w = leaf(xp, rng.standard_normal((5, 4)))
    ids = Tensor(xp.asarray(np.array([[0, 3, 3], [3, 4, 0]])))
    assert gradcheck(lambda w: embedding(w, ids), w, mode="elementwise")
    wt = leaf(xp, rng.standard_normal((4, 5)).T)  # non-contiguous table
    assert gradcheck(lambda w: embedding(w, xp.asarray(np.array([2, 2, 1]))), wt)


def test_embedding_float32_and_errors(xp, rng):
    w = leaf(xp, rng.standard_normal((10, 4)), np.float32)
    y = embedding(w, xp.asarray(np.array([3, 9, 3])))
    assert y.dtype == np.float32
    y.backward(grad=xp.ones((3, 4), dtype=np.float32))
    assert w.grad.dtype == np.float32 and cpu(w.grad)[3, 0] == 2
    with pytest.raises(ValueError, match=r"id 10 at position \(1,\).*10 rows"):
        embedding(w, xp.asarray(np.array([1, 10, 2])))
    with pytest.raises(ValueError, match="id -1"):
        embedding(w, xp.asarray(np.array([[1, -1]])))
    with pytest.raises(TypeError, match="integer"):
        embedding(w, xp.asarray(np.array([1.0, 2.0])))


# -- dropout ---------------------------------------------------------------------------


def test_dropout_gradcheck_fixed_generator(xp, rng):
    x = leaf(xp, rng.standard_normal((6, 5)))

    def fn(x):  # re-seeded inside fn: the same mask on every call
        return dropout(x, p=0.3, generator=xp.random.default_rng(7))

    assert gradcheck(fn, x)
    y = fn(Tensor(x.data))
    kept = cpu(y) != 0
    assert 0 < kept.sum() < kept.size
    np.testing.assert_allclose(cpu(y)[kept], cpu(x)[kept] / 0.7, rtol=1e-12)


def test_dropout_backward_uses_the_mask(xp, rng):
    x = leaf(xp, rng.standard_normal((50, 40)), np.float32)
    y = dropout(x, p=0.25, generator=np.random.default_rng(3))
    assert y.dtype == np.float32
    y.backward(grad=xp.ones_like(y.data))
    assert x.grad.dtype == np.float32
    mask = cpu(y) / cpu(x)
    np.testing.assert_allclose(cpu(x.grad), mask, rtol=1e-6)
    assert ((mask == 0) | np.isclose(mask, 1 / 0.75, rtol=1e-6)).all()
    assert x.grad[mask == 0].size > 0 and (cpu(x.grad)[mask == 0] == 0).all()


def test_dropout_statistics(xp):
    x = Tensor(xp.ones((400, 500), dtype=np.float32))
    y = cpu(dropout(x, p=0.2, generator=np.random.default_rng(0)))
    assert abs((y == 0).mean() - 0.2) < 0.005  # 200,000 draws: std of the rate is ~0.001
    assert abs(y.mean() - 1.0) < 0.01  # inverted dropout keeps the mean


def test_dropout_eval_and_edge_probabilities(xp, rng):
    x = leaf(xp, rng.standard_normal((4, 4)), np.float32)
    assert dropout(x, p=0.5, training=False) is x
    assert dropout(x, p=0.0) is x
    y = dropout(x, p=1.0)
    assert (cpu(y) == 0).all() and y.dtype == np.float32
    y.backward(grad=xp.ones((4, 4), dtype=np.float32))
    assert (cpu(x.grad) == 0).all()
    for bad in (-0.1, 1.5, "0.1"):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            dropout(x, p=bad)


def test_dropout_same_seed_same_mask(xp):
    x = Tensor(xp.ones((64, 64), dtype=np.float32))
    ag_random.manual_seed(123)
    a = cpu(dropout(x, 0.5))
    b = cpu(dropout(x, 0.5))
    ag_random.manual_seed(123)
    a2 = cpu(dropout(x, 0.5))
    b2 = cpu(dropout(x, 0.5))
    assert (a == a2).all() and (b == b2).all()
    assert not (a == b).all(), "successive calls continue the stream"
    ag_random.manual_seed(124)
    assert not (cpu(dropout(x, 0.5)) == a).all()
    assert ag_random.initial_seed() == 124


def test_manual_seed_rejects_bad_seeds():
    with pytest.raises(ValueError, match="non-negative integer"):
        ag_random.manual_seed(-1)
    with pytest.raises(ValueError, match="non-negative integer"):
        ag_random.manual_seed(1.5)


def test_ops_are_single_functions():
    """The fused ops record one node each, not a composition."""
    x = Tensor(np.ones((2, 3)), requires_grad=True)
    assert isinstance(cross_entropy(x, np.array([0, 1])).grad_fn, nn_ops.CrossEntropy)
    assert isinstance(softmax(x).grad_fn, nn_ops.Softmax)
    assert isinstance(log_softmax(x).grad_fn, nn_ops.LogSoftmax)
