"""Shape ops: reshape family, transposes, broadcast_to, getitem, concatenate/stack/split, pad, triu/tril."""

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


# -- reshape family ---------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4, 6), (2, -1), (-1,), (2, 3, 2, 2), (24, 1)], ids=str)
def test_reshape(xp, rng, shape):
    a = rng.standard_normal((2, 3, 4))
    y = ag.reshape(leaf(xp, a), shape)
    np.testing.assert_array_equal(cpu(y), a.reshape(shape))
    assert gradcheck(lambda t: ag.reshape(t, shape), leaf(xp, a))


def test_reshape_non_contiguous(xp, rng):
    a = rng.standard_normal((4, 6))[:, ::2].T  # (3, 4), strided and transposed
    x = Tensor(xp.asarray(a), requires_grad=True)
    np.testing.assert_array_equal(cpu(ag.reshape(x, (2, 6))), a.reshape(2, 6))
    assert gradcheck(lambda t: ag.reshape(t, (6, 2)), x)
    ag.reshape(x, (12,)).backward(xp.asarray(np.arange(12.0)))
    np.testing.assert_array_equal(cpu(x.grad), np.arange(12.0).reshape(3, 4))


def test_reshape_errors(xp):
    x = leaf(xp, np.zeros((3, 4)))
    with pytest.raises(ValueError, match=r"\(3, 4\).*\(5, 3\)"):
        ag.reshape(x, (5, 3))
    with pytest.raises(ValueError, match=r"\(5, -1\)"):
        ag.reshape(x, (5, -1))
    with pytest.raises(ValueError, match="at most one -1"):
        ag.reshape(x, (-1, -1))


def test_squeeze_unsqueeze_flatten(xp, rng):
    a = rng.standard_normal((2, 1, 3, 1))
    x = leaf(xp, a)
    assert ag.squeeze(x).shape == (2, 3)
    assert ag.squeeze(x, 1).shape == (2, 3, 1)
    assert ag.squeeze(x, (-1, 1)).shape == (2, 3)
    assert ag.unsqueeze(x, 0).shape == (1, 2, 1, 3, 1)
    assert ag.unsqueeze(x, -1).shape == (2, 1, 3, 1, 1)
    assert ag.unsqueeze(x, 2).shape == (2, 1, 1, 3, 1)
    assert ag.flatten(x).shape == (6,)
    assert ag.flatten(x, 1).shape == (2, 3)
    assert ag.flatten(x, 1, 2).shape == (2, 3, 1)
    assert ag.flatten(x, 0, -2).shape == (6, 1)
    assert ag.flatten(leaf(xp, 1.5)).shape == (1,)
    np.testing.assert_array_equal(cpu(ag.flatten(x, 1, 2)), a.reshape(2, 3, 1))
    for fn in (lambda t: ag.squeeze(t, 1), lambda t: ag.unsqueeze(t, 1), lambda t: ag.flatten(t, 1, -1)):
        assert gradcheck(fn, leaf(xp, a))
    with pytest.raises(ValueError, match="axis 2.*size 3"):
        ag.squeeze(x, 2)
    with pytest.raises(ValueError, match="start_axis"):
        ag.flatten(x, 2, 1)


# -- transposes ---------------------------------------------------------------------


@pytest.mark.parametrize("axes", [None, (2, 0, 1), (-1, 0, -2), (0, 1, 2)], ids=str)
def test_transpose(xp, rng, axes):
    a = rng.standard_normal((2, 3, 4))
    np.testing.assert_array_equal(cpu(ag.transpose(leaf(xp, a), axes)), np.transpose(a, axes))
    assert gradcheck(lambda t: ag.transpose(t, axes), leaf(xp, a))


def test_permute_swapaxes(xp, rng):
    a = rng.standard_normal((2, 3, 4))
    np.testing.assert_array_equal(cpu(ag.permute(leaf(xp, a), (1, 2, 0))), a.transpose(1, 2, 0))
    np.testing.assert_array_equal(cpu(ag.swapaxes(leaf(xp, a), 0, -1)), a.swapaxes(0, -1))
    assert gradcheck(lambda t: ag.permute(t, (1, 2, 0)), leaf(xp, a))
    assert gradcheck(lambda t: ag.swapaxes(t, -1, 1), leaf(xp, a))
    x = leaf(xp, a)
    ag.permute(x, (2, 0, 1)).backward(xp.asarray(a.transpose(2, 0, 1)))
    np.testing.assert_array_equal(cpu(x.grad), a)  # the gradient travels back to the original positions


def test_transpose_errors(xp):
    x = leaf(xp, np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="not a permutation"):
        ag.transpose(x, (0, 0, 1))
    with pytest.raises(ValueError, match="not a permutation"):
        ag.permute(x, (0, 1))
    with pytest.raises(ValueError, match="out of range"):
        ag.swapaxes(x, 0, 3)


# -- broadcast_to ---------------------------------------------------------------------


def test_broadcast_to(xp, rng):
    a = rng.standard_normal((3, 1))
    y = ag.broadcast_to(leaf(xp, a), (2, 3, 4))
    np.testing.assert_array_equal(cpu(y), np.broadcast_to(a, (2, 3, 4)))
    assert gradcheck(lambda t: ag.broadcast_to(t, (2, 3, 4)), leaf(xp, a))
    x = leaf(xp, a)
    ag.broadcast_to(x, (2, 3, 4)).sum().backward()
    np.testing.assert_array_equal(cpu(x.grad), np.full((3, 1), 8.0))  # each element copied 2 * 4 times
    with pytest.raises(ValueError, match=r"\(3, 1\) to shape \(3, 5\)|\(3, 1\).*\(5, 3\)"):
        ag.broadcast_to(x, (5, 3))


# -- getitem ------------------------------------------------------------------------------

IDX = np.array([2, 0, 2, 3])
MASK = np.array([True, False, True, True, False])
INDEXES = {
    "int": 1,
    "negative_int": -1,
    "slice_step": (slice(None), slice(0, 5, 2)),
    "negative_step": (slice(None, None, -1), slice(4, 0, -2)),
    "int_and_slice": (1, slice(1, 4)),
    "none": (None, slice(1, 3), None),
    "ellipsis": (Ellipsis, 2),
    "ellipsis_none": (Ellipsis, None, slice(None, 3)),
    "int_array_repeated": IDX,
    "python_list": [3, 3, 0],
    "int_2d_array": np.array([[0, 1], [3, 3]]),
    "bool_mask_rows": np.array([True, False, True, False]),
    "bool_mask_cols": (slice(None), MASK),
    "ellipsis_bool": (Ellipsis, np.array([True, False, True])),
    "bool_mask_full": None,  # filled in by the test: x > 0
    "mixed_array_slice": (IDX, slice(1, 3)),
    "two_arrays": (IDX, np.array([0, 4, 0, 1])),
    "array_int": (slice(None), np.array([4, 4, 1]), 1),
}


@pytest.mark.parametrize("name", list(INDEXES))
def test_getitem_values_and_gradcheck(xp, rng, name):
    a = rng.standard_normal((4, 5, 3))
    index = INDEXES[name]
    if name == "bool_mask_full":
        index = a > 0
    y = ag.getitem(leaf(xp, a), index)
    np.testing.assert_array_equal(cpu(y), a[index])
    assert gradcheck(lambda t: ag.getitem(t, index), leaf(xp, a))


def test_getitem_repeated_indices_accumulate(xp):
    x = leaf(xp, np.zeros((4, 2)))
    x[np.array([0, 2, 0, 0])].backward(xp.asarray(np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])))
    np.testing.assert_array_equal(cpu(x.grad), [[13.0, 16.0], [0, 0], [3.0, 4.0], [0, 0]])


def test_getitem_2d_index_counts(xp):
    x = leaf(xp, np.zeros(3))
    x[np.array([[0, 1], [0, 0]])].sum().backward()
    np.testing.assert_array_equal(cpu(x.grad), [3.0, 1.0, 0.0])


def test_getitem_mixed_tuple_counts(xp, rng):
    x = leaf(xp, rng.standard_normal((3, 4)))
    x[[1, 1, 2], 1:3].sum().backward()
    np.testing.assert_array_equal(cpu(x.grad), [[0, 0, 0, 0], [0, 2, 2, 0], [0, 1, 1, 0]])


def test_getitem_tensor_indices(xp, rng):
    a = rng.standard_normal((4, 3))
    x = leaf(xp, a)
    idx = Tensor(xp.asarray(np.array([3, 1, 3])))
    mask = Tensor(xp.asarray(a[:, 0] > 0))
    assert mask.dtype == np.bool_
    np.testing.assert_array_equal(cpu(x[idx]), a[[3, 1, 3]])
    np.testing.assert_array_equal(cpu(x[mask]), a[a[:, 0] > 0])
    np.testing.assert_array_equal(cpu(x[idx, 2]), a[[3, 1, 3], 2])
    (x[idx].sum() + x[mask].sum()).backward()
    expected = np.zeros((4, 3))
    expected[[1]] += 1
    expected[3] += 2
    expected[a[:, 0] > 0] += 1
    np.testing.assert_array_equal(cpu(x.grad), expected)


def test_getitem_basic_gradient_exact(xp, rng):
    x = leaf(xp, rng.standard_normal((3, 4)))
    x[1:, ::-2].backward(xp.asarray(np.array([[1.0, 2.0], [3.0, 4.0]])))
    np.testing.assert_array_equal(cpu(x.grad), [[0, 0, 0, 0], [0, 2, 0, 1], [0, 4, 0, 3]])


def test_getitem_non_contiguous(xp, rng):
    a = rng.standard_normal((6, 5)).T[:, ::2]  # (5, 3), non-contiguous
    x = Tensor(xp.asarray(a), requires_grad=True)
    np.testing.assert_array_equal(cpu(x[[0, 4, 0], 1:]), a[[0, 4, 0], 1:])
    assert gradcheck(lambda t: t[[0, 4, 0], 1:], x)
    assert gradcheck(lambda t: t[::-1, 1], x)


def test_getitem_errors(xp):
    x = leaf(xp, np.zeros((3, 4)))
    with pytest.raises(IndexError, match=r"shape \(3, 4\)"):
        x[5]
    with pytest.raises(TypeError, match="integer or boolean"):
        x[np.array([0.0, 1.0])]
    with pytest.raises(TypeError, match="cannot index"):
        x["a"]


# -- concatenate / stack / split ----------------------------------------------------------


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_concatenate_three(xp, rng, axis):
    shapes = {0: [(1, 3, 2), (2, 3, 2), (3, 3, 2)], 1: [(2, 1, 2), (2, 4, 2), (2, 2, 2)],
              -1: [(2, 3, 1), (2, 3, 3), (2, 3, 2)]}[axis]
    arrays = [rng.standard_normal(s) for s in shapes]
    y = ag.concatenate([leaf(xp, a) for a in arrays], axis=axis)
    np.testing.assert_array_equal(cpu(y), np.concatenate(arrays, axis=axis))
    assert gradcheck(lambda *ts: ag.concatenate(ts, axis=axis), *[leaf(xp, a) for a in arrays])


def test_concatenate_partial_grad(xp, rng):
    a, b = leaf(xp, rng.standard_normal((2, 3))), Tensor(xp.asarray(rng.standard_normal((1, 3))))
    ag.concatenate([b, a], axis=0).backward(xp.asarray(np.arange(9.0).reshape(3, 3)))
    np.testing.assert_array_equal(cpu(a.grad), np.arange(3.0, 9.0).reshape(2, 3))
    assert b.grad is None


@pytest.mark.parametrize("axis", [0, 2, -1])
def test_stack_three(xp, rng, axis):
    arrays = [rng.standard_normal((2, 3)) for _ in range(3)]
    y = ag.stack([leaf(xp, a) for a in arrays], axis=axis)
    np.testing.assert_array_equal(cpu(y), np.stack(arrays, axis=axis))
    assert gradcheck(lambda *ts: ag.stack(ts, axis=axis), *[leaf(xp, a) for a in arrays])


def test_concatenate_stack_errors(xp):
    a, b = leaf(xp, np.zeros((2, 3))), leaf(xp, np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"\(2, 3\), \(2, 4\)"):
        ag.concatenate([a, b], axis=0)
    with pytest.raises(ValueError, match=r"\(2, 3\), \(2, 4\)"):
        ag.stack([a, b])
    with pytest.raises(ValueError, match="at least one"):
        ag.concatenate([])
    with pytest.raises(TypeError, match="sequence"):
        ag.stack(a)


def test_split_sections(xp, rng):
    a = rng.standard_normal((2, 6, 3))
    parts = ag.split(leaf(xp, a), 3, axis=1)
    assert isinstance(parts, tuple) and len(parts) == 3
    for p, ref in zip(parts, np.split(a, 3, axis=1)):
        np.testing.assert_array_equal(cpu(p), ref)
    assert gradcheck(lambda t: ag.split(t, 3, axis=1), leaf(xp, a))
    assert gradcheck(lambda t: ag.split(t, 3, axis=1)[1], leaf(xp, a))  # only the middle output is used


def test_split_indices_some_outputs_used(xp, rng):
    a = rng.standard_normal((7, 2))
    x = leaf(xp, a)
    first, middle, last = ag.split(x, [2, 5], axis=0)
    assert (first.shape, middle.shape, last.shape) == ((2, 2), (3, 2), (2, 2))
    (first.sum() + last.sum() * 3.0).backward()
    np.testing.assert_array_equal(cpu(x.grad), [[1, 1]] * 2 + [[0, 0]] * 3 + [[3, 3]] * 2)
    assert gradcheck(lambda t: ag.split(t, [2, 5], axis=0)[::2], leaf(xp, a))
    assert gradcheck(lambda t: ag.split(t, [-3], axis=-2), leaf(xp, a))


def test_split_overlapping_indices(xp, rng):
    a = rng.standard_normal(6)
    parts = ag.split(leaf(xp, a), [4, 2])  # NumPy: a[:4], a[4:2] (empty), a[2:]
    for p, ref in zip(parts, np.split(a, [4, 2])):
        np.testing.assert_array_equal(cpu(p), ref)
    assert gradcheck(lambda t: ag.split(t, [4, 2]), leaf(xp, a))


def test_split_errors(xp):
    x = leaf(xp, np.zeros((3, 10)))
    with pytest.raises(ValueError, match="size 10.*3 equal sections"):
        ag.split(x, 3, axis=1)
    with pytest.raises(ValueError, match="out of range"):
        ag.split(x, 2, axis=2)


# -- pad -------------------------------------------------------------------------------------


@pytest.mark.parametrize("width", [1, (2, 0), ((1, 2), (0, 3), (2, 1)), ((0, 1),)], ids=str)
def test_pad(xp, rng, width):
    a = rng.standard_normal((2, 3, 4))
    y = ag.pad(leaf(xp, a), width, value=-2.5)
    np.testing.assert_array_equal(cpu(y), np.pad(a, width, constant_values=-2.5))
    assert gradcheck(lambda t: ag.pad(t, width), leaf(xp, a))


def test_pad_gradient_is_interior(xp, rng):
    x = leaf(xp, rng.standard_normal((2, 2)))
    g = np.arange(20.0).reshape(4, 5)
    ag.pad(x, ((1, 1), (2, 1))).backward(xp.asarray(g))
    np.testing.assert_array_equal(cpu(x.grad), g[1:3, 2:4])


def test_pad_errors(xp):
    x = leaf(xp, np.zeros((2, 3)))
    with pytest.raises(ValueError, match="pad_width"):
        ag.pad(x, ((1, 1), (1, 1), (1, 1)))
    with pytest.raises(ValueError, match="pad_width"):
        ag.pad(x, -1)
    with pytest.raises(ValueError, match="pad_width"):
        ag.pad(x, 1.5)


# -- triu / tril -------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [-1, 0, 1])
@pytest.mark.parametrize("name", ["triu", "tril"])
def test_triangles(xp, rng, name, k):
    a = rng.standard_normal((2, 3, 4))
    fn = getattr(ag, name)
    ref = getattr(np, name)
    np.testing.assert_array_equal(cpu(fn(leaf(xp, a), k)), ref(a, k))
    assert gradcheck(lambda t: fn(t, k), leaf(xp, a))
    x = leaf(xp, a)
    g = rng.standard_normal((2, 3, 4))
    fn(x, k=k).backward(xp.asarray(g))
    np.testing.assert_array_equal(cpu(x.grad), ref(g, k))


def test_triangle_errors(xp):
    with pytest.raises(ValueError, match="at least 2 axes"):
        ag.triu(leaf(xp, np.zeros(3)))


# -- dtypes, non-contiguous inputs, method forms -----------------------------------------------

FLOAT32_CASES = {
    "reshape": lambda t: ag.reshape(t, (-1,)),
    "transpose": lambda t: ag.transpose(t),
    "broadcast_to": lambda t: ag.broadcast_to(t, (2, 3, 4)),
    "getitem_basic": lambda t: t[1:, ::2],
    "getitem_advanced": lambda t: t[[0, 0, 2]],
    "concatenate": lambda t: ag.concatenate([t, t], axis=1),
    "stack": lambda t: ag.stack([t, t]),
    "split": lambda t: ag.split(t, 2, axis=1)[0],
    "pad": lambda t: ag.pad(t, 1),
    "triu": lambda t: ag.triu(t),
    "tril": lambda t: ag.tril(t, -1),
    "squeeze_unsqueeze": lambda t: ag.squeeze(ag.unsqueeze(t, 0)),
}


@pytest.mark.parametrize("name", list(FLOAT32_CASES))
def test_float32_stays_float32(xp, rng, name):
    x = leaf(xp, rng.standard_normal((3, 4)), dtype=np.float32)
    y = FLOAT32_CASES[name](x)
    assert y.dtype == np.float32
    y.sum().backward()
    assert x.grad.dtype == np.float32 and x.grad.shape == (3, 4)


@pytest.mark.parametrize("name", list(FLOAT32_CASES))
def test_non_contiguous_inputs(xp, rng, name):
    fn = FLOAT32_CASES[name]
    strided = rng.standard_normal((6, 8))[::2, ::2]  # (3, 4), strided
    transposed = rng.standard_normal((4, 3)).T  # (3, 4), a transposed view
    for a in (strided, transposed):
        x = Tensor(xp.asarray(a), requires_grad=True)
        assert not x.data.flags.c_contiguous
        assert gradcheck(fn, x)
        c = Tensor(xp.asarray(np.ascontiguousarray(a)), requires_grad=True)
        y, yc = fn(x), fn(c)
        np.testing.assert_array_equal(cpu(y), cpu(yc))
        g = xp.asarray(rng.standard_normal(y.shape))
        y.backward(g)
        yc.backward(g)
        np.testing.assert_array_equal(cpu(x.grad), cpu(c.grad))


def test_method_forms(xp, rng):
    a = rng.standard_normal((2, 3, 4))
    x = leaf(xp, a)
    np.testing.assert_array_equal(cpu(x.reshape(2, -1)), a.reshape(2, 12))
    np.testing.assert_array_equal(cpu(x.reshape((2, -1))), a.reshape(2, 12))
    np.testing.assert_array_equal(cpu(x.T), a.T)
    np.testing.assert_array_equal(cpu(x.permute(2, 0, 1)), a.transpose(2, 0, 1))
    np.testing.assert_array_equal(cpu(x.transpose(0, 2)), a.swapaxes(0, 2))  # torch style on 3-D
    assert x.transpose(0, 2).shape == (4, 3, 2)
    np.testing.assert_array_equal(cpu(x.sum(axis=(0, 2), keepdims=True)), a.sum(axis=(0, 2), keepdims=True))
    np.testing.assert_array_equal(cpu(x[..., :3]), a[..., :3])
    assert x.unsqueeze(0).shape == (1, 2, 3, 4)
    assert x.flatten().shape == (24,)
    y = x[..., :3].sum() + x.T.sum() + x.permute(2, 0, 1)[0].sum() + x.transpose(0, 2).sum()
    y.backward()
    expected = np.full((2, 3, 4), 2.0)  # x.T and x.transpose(0, 2) each use every element once
    expected[..., :3] += 1
    expected[..., 0] += 1
    np.testing.assert_array_equal(cpu(x.grad), expected)
    m = leaf(xp, a[0])
    np.testing.assert_array_equal(cpu(m.transpose(1, 0)), a[0].T)
    parts = x.split(2, axis=2)
    assert len(parts) == 2 and parts[1].shape == (2, 3, 2)
