"""The engine's contracts: order, freeing, accumulation, aliasing, grad mode, dtypes and errors."""

import weakref

import numpy as np
import pytest

import autograd as ag
from autograd import Function, Tensor, no_grad
from autograd.backend import to_device
from autograd.engine import sum_to


def leaf(xp, array, requires_grad=True):
    return Tensor(xp.asarray(array), requires_grad=requires_grad)


class Spy(Function):
    """y = 3 * x, saving a big array and recording which input gradients were asked for."""

    log = []

    def forward(self, x, w):
        self.saved = x * 1  # a fresh array that only this node holds
        Spy.log.append(("forward", weakref.ref(self.saved)))
        return x * 3 + w

    def backward(self, gy):
        Spy.log.append(("needs", self.needs_input_grad))
        gx = gy * 3 if self.needs_input_grad[0] else None
        gw = gy if self.needs_input_grad[1] else None
        return gx, gw


def test_sum_to_undoes_broadcasting(xp):
    g = xp.ones((2, 3, 4))
    assert sum_to(g, (3, 4)).shape == (3, 4)
    assert float(sum_to(g, (3, 1))[0, 0]) == 8.0
    assert float(sum_to(g, (1, 3, 1))[0, 1, 0]) == 8.0
    assert sum_to(g, ()).shape == () and float(sum_to(g, ())) == 24.0


def test_chain_of_10000_ops_has_no_recursion_limit(xp):
    x = leaf(xp, np.ones(3, dtype=np.float32))
    y = x
    for _ in range(10_000):
        y = y * 1.0001
    y.backward(xp.ones(3, dtype=np.float32))
    expected = 1.0001 ** 10_000
    np.testing.assert_allclose(to_device(x.grad, "cpu"), np.full(3, expected), rtol=1e-3)


def test_diamond_graph_visits_each_node_once_after_all_its_consumers(xp):
    # y = a*b used twice: d/da of (y + y*y) = b * (1 + 2y)
    a = leaf(xp, np.array([2.0]))
    b = leaf(xp, np.array([3.0]))
    y = a * b
    z = y + y * y
    z.backward(xp.ones(1))
    assert float(a.grad[0]) == 3.0 * (1 + 2 * 6.0)
    assert float(b.grad[0]) == 2.0 * (1 + 2 * 6.0)


def test_graph_is_freed_after_backward(xp):
    Spy.log.clear()
    x = leaf(xp, np.ones(1000))
    w = leaf(xp, np.ones(1000))
    y = Spy()(Spy()(x, w) * 2.0, w)  # intermediates are held only by the graph
    refs = [r for kind, r in Spy.log if kind == "forward"]
    assert all(r() is not None for r in refs)
    y.backward(xp.ones(1000))
    assert all(r() is None for r in refs), "saved arrays must be released as backward passes each node"
    with pytest.raises(RuntimeError, match="retain_graph=True"):
        y.backward(xp.ones(1000))


def test_retain_graph_allows_a_second_backward(xp):
    x = leaf(xp, np.array([1.0, 2.0]))
    y = x * x
    y.backward(xp.ones(2), retain_graph=True)
    y.backward(xp.ones(2))
    np.testing.assert_array_equal(to_device(x.grad, "cpu"), [4.0, 8.0])  # 2 * 2x


def test_gradients_accumulate_until_zeroed(xp):
    x = leaf(xp, np.array([1.0, 2.0]))
    for _ in range(3):
        (x * 5.0).backward(xp.ones(2))
    np.testing.assert_array_equal(to_device(x.grad, "cpu"), [15.0, 15.0])
    x.zero_grad()
    assert x.grad is None


def test_leaf_gradients_never_alias_each_other(xp):
    # Add.backward hands the same array to both inputs; in-place edits of one
    # leaf's grad (clipping, accumulation) must not reach the other.
    a = leaf(xp, np.ones(3))
    b = leaf(xp, np.ones(3))
    g = xp.ones(3)
    (a + b).backward(g)
    a.grad *= 10
    np.testing.assert_array_equal(to_device(b.grad, "cpu"), np.ones(3))
    np.testing.assert_array_equal(to_device(g, "cpu"), np.ones(3)), "the caller's grad must not be modified"
    c = leaf(xp, np.ones(3))
    (c + c).backward(xp.ones(3))  # one tensor used twice counts twice
    np.testing.assert_array_equal(to_device(c.grad, "cpu"), np.full(3, 2.0))


def test_leaf_gradients_never_alias_through_nested_adds(xp):
    # Below the root, Add passes one fresh array on unchanged, level after level:
    # a, b and c all receive the very array the Mul produced.
    a, b, c = (leaf(xp, np.ones(3)) for _ in range(3))
    ((a + (b + c)) * 2.0).backward(xp.ones(3))
    for p, q in ((a, b), (a, c), (b, c)):
        assert not np.shares_memory(p.grad, q.grad) if xp is np else p.grad.data.ptr != q.grad.data.ptr
    a.grad *= 10
    np.testing.assert_array_equal(to_device(b.grad, "cpu"), np.full(3, 2.0))
    np.testing.assert_array_equal(to_device(c.grad, "cpu"), np.full(3, 2.0))


def test_a_second_contribution_to_a_leaf_does_not_corrupt_a_pending_gradient(xp):
    # a receives the Mul's output gradient while h's slot still holds the same array;
    # a's second contribution (+=) must not change what h later passes to b.
    a, b = leaf(xp, np.ones(3)), leaf(xp, np.ones(3))
    h = (b * 1.0).retain_grad()
    ((a + h) * 2.0 + a * 3.0).backward(xp.ones(3))
    np.testing.assert_array_equal(to_device(a.grad, "cpu"), np.full(3, 5.0))
    np.testing.assert_array_equal(to_device(b.grad, "cpu"), np.full(3, 2.0))
    np.testing.assert_array_equal(to_device(h.grad, "cpu"), np.full(3, 2.0))


def test_only_needed_gradients_are_computed(xp):
    Spy.log.clear()
    x = leaf(xp, np.ones(4), requires_grad=False)  # data, e.g. a frozen weight
    w = leaf(xp, np.ones(4))
    Spy()(x, w).backward(xp.ones(4))
    assert ("needs", (False, True)) in Spy.log
    assert x.grad is None and w.grad is not None


def test_integer_inputs_never_get_gradients(xp):
    with pytest.raises(TypeError, match="floating-point"):
        Tensor(xp.arange(3), requires_grad=True)


def test_no_grad_records_nothing_and_enable_grad_reopens(xp):
    x = leaf(xp, np.ones(2))
    with no_grad():
        y = x * 2.0
        with ag.enable_grad():
            z = x * 2.0
    assert not y.requires_grad and y.grad_fn is None
    assert z.requires_grad and z.grad_fn is not None
    assert ag.is_grad_enabled()


def test_retain_grad_keeps_an_intermediate_gradient(xp):
    x = leaf(xp, np.array([1.0, 2.0]))
    h = (x * 3.0).retain_grad()
    (h * h).backward(xp.ones(2))
    np.testing.assert_array_equal(to_device(h.grad, "cpu"), [6.0, 12.0])


def test_float32_stays_float32(xp):
    x = leaf(xp, np.array([1.0, 2.0], dtype=np.float32))
    for y in (x * 2.0, 2.0 * x, x / 3, 1 / x, x ** 2, x ** 0.5, 2 ** x, x - 1.5, np.float64(2.0) * x, x @ x, -x):
        assert y.dtype == np.float32, y
    y = (x * 2.0 + x ** 2 - 1 / x) @ x
    y.backward()
    assert x.grad.dtype == np.float32


def test_python_data_defaults_to_float32_and_int64():
    assert Tensor([1.0, 2.0]).dtype == np.float32
    assert Tensor([1, 2]).dtype == np.int64
    assert Tensor(np.zeros(2)).dtype == np.float64  # arrays keep their dtype


def test_numpy_array_on_the_left_gives_a_tensor():
    x = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    y = np.array([3.0, 4.0]) * x
    assert isinstance(y, Tensor)
    y.backward(np.ones(2))
    np.testing.assert_array_equal(x.grad, [3.0, 4.0])


def test_backward_errors_say_what_to_do():
    x = Tensor(np.ones((2, 3)), requires_grad=True)
    with pytest.raises(RuntimeError, match=r"shape \(2, 3\).*pass grad="):
        (x * 2.0).backward()
    with pytest.raises(ValueError, match=r"got shape \(3,\)"):
        (x * 2.0).backward(np.ones(3))
    with pytest.raises(RuntimeError, match="does not require grad"):
        Tensor(np.ones(2)).backward(np.ones(2))


def test_tensor_facts_and_conversions():
    x = Tensor(np.arange(6, dtype=np.float32).reshape(2, 3), requires_grad=True)
    assert x.shape == (2, 3) and x.ndim == 2 and x.size == 6 and x.dtype == np.float32
    assert x.device == "cpu" and x.is_leaf and len(x) == 2
    assert isinstance(x.numpy(), np.ndarray)
    assert Tensor([[7.0]]).item() == 7.0
    d = x.detach()
    assert d.data is x.data and not d.requires_grad
    assert x.to("cpu") is x
    y = x.to("float64")
    assert y.dtype == np.float64
    (y * 2.0).backward(np.ones((2, 3)))
    assert x.grad.dtype == np.float32 and float(x.grad[0, 0]) == 2.0


@pytest.mark.skipif(ag.cupy_available(), reason="checks the message shown where CuPy is missing")
def test_cuda_without_cupy_says_how_to_install_it():
    with pytest.raises(RuntimeError, match="pip install"):
        Tensor([1.0]).to("cuda")


class SplitHalves(Function):
    """Two outputs: the first and second half of x."""

    def forward(self, x):
        n = x.shape[0] // 2
        return x[:n].copy(), x[n:].copy()

    def backward(self, g1, g2):
        xp = ag.get_array_module(g1)
        return xp.concatenate([g1, g2])


def test_multi_output_function_with_an_unused_output(xp):
    x = leaf(xp, np.arange(4.0))
    first, _ = SplitHalves()(x)
    (first * 2.0).backward(xp.ones(2))
    np.testing.assert_array_equal(to_device(x.grad, "cpu"), [2.0, 2.0, 0.0, 0.0])


def test_post_accumulate_grad_hook_fires_once_after_the_last_contribution(xp):
    w = leaf(xp, np.array([1.0, 2.0]))  # used twice, like a tied embedding
    b = leaf(xp, np.array([3.0, 4.0]))
    seen = []
    hw = w.register_post_accumulate_grad_hook(lambda t: seen.append(("w", to_device(t.grad, "cpu").copy())))
    b.register_post_accumulate_grad_hook(lambda t: seen.append(("b", to_device(t.grad, "cpu").copy())))
    y = (w * 2.0 + b) * w  # dy/dw = 4w + b, arriving in two contributions
    y.backward(xp.ones(2))
    assert [name for name, _ in seen] == ["b", "w"] or [name for name, _ in seen] == ["w", "b"]
    assert len(seen) == 2
    np.testing.assert_array_equal(dict(seen)["w"], [4.0 + 3.0, 8.0 + 4.0])  # the final gradient, not a partial one
    hw.remove()
    seen.clear()
    (w * b).backward(xp.ones(2))
    assert [name for name, _ in seen] == ["b"]
    with pytest.raises(RuntimeError, match="leaf"):
        (w * 2.0).register_post_accumulate_grad_hook(lambda t: None)


class ZeroGradient(Function):
    """y = x, whose backward declares the gradient zero by returning None (as an op may for an input it ignores)."""

    def forward(self, x):
        return x.copy()

    def backward(self, gy):
        return None


def test_post_accumulate_grad_hook_fires_when_a_backward_returns_none(xp):
    w = leaf(xp, np.array([1.0, 2.0]))
    v = leaf(xp, np.array([5.0, 6.0]))
    b = leaf(xp, np.array([3.0, 4.0]))
    seen = []
    for name, t in (("w", w), ("v", v), ("b", b)):
        t.register_post_accumulate_grad_hook(
            lambda t, name=name: seen.append((name, None if t.grad is None else to_device(t.grad, "cpu").copy())))
    # w: one edge returns None, the other brings 3; v: its only path runs through a node that gets no gradient
    y = ZeroGradient()(w) + w * 3.0 + ZeroGradient()(v * 2.0) + b
    y.backward(xp.ones(2))
    assert sorted(name for name, _ in seen) == ["b", "v", "w"]  # each once
    got = dict(seen)
    np.testing.assert_array_equal(got["w"], [3.0, 3.0])
    assert got["v"] is None and v.grad is None
