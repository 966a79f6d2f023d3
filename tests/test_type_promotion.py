"""Type promotion follows PyTorch's rules: a table of cases, each checked on our engine and,
where PyTorch is installed (it is not a dependency), against PyTorch itself.

PyTorch ranks operands in three tiers: tensors with at least one axis, 0-d tensors (here also
0-d arrays), and scalars (Python numbers and NumPy scalars, whose floats count as the default
float32 whatever their precision). A lower tier changes the result's dtype only when it is of a
higher category (bool < integer < floating): ``float32 * np.float64(2.5)`` stays float32, but
``int64 * 2.5`` is float32 and ``int64 * np.array(2.5)`` float64. True division and a float
exponent of an integer give float32. Every input's gradient has that input's dtype.
"""

import numpy as np
import pytest

import autograd as ag
from autograd import Function, Tensor

# operands: ("dim", dtype) a tensor of shape (3,); ("zero", dtype) a 0-d array; ("zeroT", dtype) a 0-d
# Tensor; ("py", value) a Python number; ("np", value) a NumPy scalar
F16, F32, F64, I32, I64, B = "float16", "float32", "float64", "int32", "int64", "bool"

BINARY = [  # (op, left, right, expected dtype)
    # a float32 tensor stays float32 with any scalar or 0-d operand
    ("mul", ("dim", F32), ("py", 2.5), F32),
    ("mul", ("dim", F32), ("py", 2), F32),
    ("add", ("dim", F32), ("py", True), F32),
    ("mul", ("dim", F32), ("np", np.float64(2.5)), F32),
    ("mul", ("dim", F32), ("np", np.int64(2)), F32),
    ("add", ("dim", F32), ("zero", F64), F32),
    ("add", ("dim", F32), ("zeroT", F64), F32),
    ("sub", ("dim", F32), ("zero", I64), F32),
    ("div", ("dim", F32), ("zero", F64), F32),
    ("sub", ("np", np.float64(2.5)), ("dim", F32), F32),
    ("add", ("zero", F64), ("dim", F32), F32),
    ("mul", ("np", np.int64(2)), ("dim", F32), F32),
    # two tensors with axes: the usual table, except that integers give way to any float
    ("add", ("dim", F32), ("dim", F64), F64),
    ("add", ("dim", I64), ("dim", F32), F32),
    ("mul", ("dim", I32), ("dim", F16), F16),
    ("add", ("dim", I32), ("dim", I64), I64),
    # float16 is kept the same way
    ("add", ("dim", F16), ("py", 2.5), F16),
    ("mul", ("dim", F16), ("np", np.float64(2.5)), F16),
    ("mul", ("dim", F16), ("zero", F32), F16),
    ("add", ("dim", F16), ("dim", F32), F32),
    # integer tensors: a float scalar gives float32, a float 0-d operand its own dtype
    ("mul", ("dim", I64), ("py", 2.5), F32),
    ("mul", ("dim", I64), ("np", np.float64(2.5)), F32),
    ("mul", ("dim", I64), ("np", np.float16(2.5)), F32),
    ("mul", ("dim", I64), ("zero", F64), F64),
    ("mul", ("dim", I64), ("zero", F16), F16),
    ("sub", ("py", 2.5), ("dim", I64), F32),
    ("mul", ("dim", I64), ("py", 2), I64),
    ("mul", ("dim", I32), ("py", 2), I32),
    ("mul", ("dim", I32), ("np", np.int64(2)), I32),
    ("add", ("dim", I32), ("zero", I64), I32),
    # booleans
    ("add", ("dim", B), ("py", 1), I64),
    ("mul", ("dim", B), ("py", 2.5), F32),
    ("mul", ("dim", B), ("np", np.float64(2.5)), F32),
    ("add", ("dim", B), ("zero", I32), I32),
    ("add", ("dim", B), ("zero", F64), F64),
    # 0-d with 0-d: the usual table; 0-d with a scalar: the scalar counts only across categories
    ("add", ("zero", F32), ("zero", F64), F64),
    ("add", ("zeroT", F32), ("zeroT", F64), F64),
    ("add", ("zero", I64), ("py", 2.5), F32),
    ("mul", ("zeroT", I64), ("np", np.float64(2.5)), F32),
    ("add", ("zero", F32), ("py", 2.5), F32),
    # true division always gives a float
    ("div", ("dim", I64), ("dim", I64), F32),
    ("div", ("dim", I64), ("py", 2), F32),
    ("div", ("dim", I32), ("zero", I64), F32),
    ("div", ("dim", B), ("dim", B), F32),
    ("div", ("py", 1), ("dim", I64), F32),
    ("div", ("dim", F16), ("dim", I64), F16),
    ("div", ("dim", F64), ("zero", I64), F64),
    # powers: the exponent takes part like any operand
    ("pow", ("dim", F32), ("np", np.float64(2.5)), F32),
    ("pow", ("dim", F32), ("py", 2), F32),
    ("pow", ("dim", F16), ("np", np.float64(0.5)), F16),
    ("pow", ("dim", I64), ("py", 2), I64),
    ("pow", ("dim", I64), ("py", 2.5), F32),
    ("pow", ("dim", I64), ("np", np.float64(0.5)), F32),
    ("pow", ("dim", I64), ("zero", F64), F64),
    ("pow", ("py", 2.5), ("dim", I64), F32),
    ("pow", ("py", 2), ("dim", F32), F32),
    ("pow", ("np", np.float64(2.5)), ("dim", F32), F32),
    ("pow", ("dim", F32), ("dim", I64), F32),
    ("pow", ("zero", F64), ("dim", F32), F32),
    # maximum and minimum
    ("maximum", ("dim", F32), ("zero", F64), F32),
    ("maximum", ("dim", F32), ("np", np.float64(0.5)), F32),
    ("minimum", ("dim", I64), ("py", 0.5), F32),
    ("minimum", ("zero", F32), ("dim", I64), F32),
    ("maximum", ("dim", I64), ("zero", F64), F64),
]

WHERE = [  # (x, y, expected dtype); the condition is a boolean tensor of shape (3,)
    (("dim", F32), ("np", np.float64(2.0)), F32),
    (("dim", F32), ("zero", F64), F32),
    (("zero", F64), ("dim", F32), F32),
    (("py", 2.0), ("dim", I64), F32),
    (("py", 2.0), ("py", 3.0), F32),
    (("py", 2), ("py", 3), I64),
    (("py", 2.0), ("py", 3), F32),
    (("zero", I64), ("zero", F64), F64),
    (("dim", F16), ("dim", F32), F32),
]

CLIP = [  # (x, bound given as min=, expected dtype)
    (("dim", I64), ("py", 0.5), F32),
    (("dim", I64), ("py", 1), I64),
    (("dim", F32), ("zero", F64), F32),
    (("dim", F32), ("np", np.float64(0.5)), F32),
    (("dim", F16), ("py", 0.5), F16),
    (("dim", I64), ("zero", F64), F64),
]


def case_id(case):
    """``mul-dim:int64-np.float64:2.5->float32``."""
    *operands, expected = case

    def name(o):
        if isinstance(o, str):
            return o
        kind, what = o
        return f"{kind}:{what}" if kind != "np" else f"np.{type(what).__name__}:{what}"

    return "-".join(name(o) for o in operands) + f"->{expected}"


def ours(xp, operand):
    kind, what = operand
    if kind == "dim":
        return Tensor(xp.asarray(np.array([1, 2, 3]).astype(what)))
    if kind == "zero":
        return xp.asarray(np.array(2).astype(what))
    if kind == "zeroT":
        return Tensor(xp.asarray(np.array(2).astype(what)))
    return what


OPERATORS = {
    "add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b, "pow": lambda a, b: a ** b,
}


def _operands(xp, left, right):
    """Both operands; where neither is a tensor (two 0-d arrays), the left one becomes a 0-d tensor."""
    a, b = ours(xp, left), ours(xp, right)
    if not isinstance(a, Tensor) and not isinstance(b, Tensor):
        a = Tensor(a)
    return a, b


@pytest.mark.parametrize("case", BINARY, ids=case_id)
def test_binary_functions_promote_as_pytorch(xp, case):
    op, left, right, expected = case
    y = getattr(ag, op)(*_operands(xp, left, right))
    assert isinstance(y, Tensor) and y.dtype == np.dtype(expected), (op, left, right, y.dtype)


@pytest.mark.parametrize("case", [c for c in BINARY if c[0] in OPERATORS], ids=case_id)
def test_binary_operators_promote_as_pytorch(xp, case):
    """``x * 2.5``, ``2.5 - x``, ``np.float64(2) ** x``, ``np.array(2.0) + x``: the reflected forms too."""
    op, left, right, expected = case
    y = OPERATORS[op](*_operands(xp, left, right))
    assert isinstance(y, Tensor) and y.dtype == np.dtype(expected), (op, left, right, y.dtype)


@pytest.mark.parametrize("case", WHERE, ids=case_id)
def test_where_promotes_as_pytorch(xp, case):
    x, y, expected = case
    cond = xp.asarray([True, False, True])
    out = ag.where(cond, ours(xp, x), ours(xp, y))
    assert out.dtype == np.dtype(expected)


@pytest.mark.parametrize("case", CLIP, ids=case_id)
def test_clip_promotes_as_pytorch(xp, case):
    x, bound, expected = case
    out = ag.clip(ours(xp, x), min=ours(xp, bound))
    assert out.dtype == np.dtype(expected)


@pytest.mark.parametrize("op", ["__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__"])
def test_comparisons_compute_in_the_promoted_dtype(xp, op):
    """0.1 in float32 is not 0.1 in float64: a float32 tensor compared with np.float64(0.1) or a
    float64 0-d array compares in float32, as PyTorch does, so 0.1 == 0.1."""
    x = Tensor(xp.asarray(np.full(2, 0.1, dtype=np.float32)))
    expected = getattr(np.float32(0.1), op)(np.float32(0.1))
    for other in (0.1, np.float64(0.1), xp.asarray(0.1), Tensor(xp.asarray(0.1))):
        got = getattr(x, op)(other)
        assert got.dtype == np.bool_
        assert bool(got.data[0]) == expected, (op, type(other))
    half = Tensor(xp.asarray(np.full(1, 0.1, dtype=np.float16)))
    assert bool(getattr(half, op)(np.float64(0.1)).data[0]) == expected


def test_integer_tensor_compared_with_a_float():
    assert (Tensor([2]) < 2.5).data.tolist() == [True]
    assert (Tensor([3]) > np.float64(2.5)).data.tolist() == [True]


def test_promotion_keeps_the_values(xp):
    """Casting the scalar to float32 first is what NumPy does for a Python float: the same numbers."""
    a = np.array([0.1, 1.7, -3.3], dtype=np.float32)
    x = Tensor(xp.asarray(a))
    for other in (np.float64(0.3), xp.asarray(0.3), 0.3):
        np.testing.assert_array_equal(ag.backend.to_device((x * other).data, "cpu"), a * np.float32(0.3))
    positive = Tensor(xp.asarray(np.abs(a)))
    np.testing.assert_array_equal(ag.backend.to_device((positive ** np.float64(2.5)).data, "cpu"),
                                  np.abs(a) ** np.float32(2.5))
    i = Tensor(xp.asarray(np.array([1, 2, 3])))
    np.testing.assert_allclose(ag.backend.to_device((i / 2).data, "cpu"), [0.5, 1.0, 1.5])
    assert (Tensor([7]) ** 2).data.tolist() == [49]


# -- gradients: every input's gradient has that input's dtype ------------------------------------


def _leaf(xp, values, dtype):
    return Tensor(xp.asarray(np.asarray(values, dtype=dtype)), requires_grad=True)


GRAD_CASES = {
    # name: (build output from the leaves, leaves as (values, dtype), expected output dtype)
    "f32 * f64 0-d": (lambda a, b: a * b, [([1.0, 2.0, 3.0], F32), (2.0, F64)], F32),
    "f32 + f64": (lambda a, b: a + b, [([1.0, 2.0, 3.0], F32), ([1.0, 2.0, 3.0], F64)], F64),
    "f16 / f32 0-d": (lambda a, b: a / b, [([1.0, 2.0, 3.0], F16), (2.0, F32)], F16),
    "f32 ** f64 0-d": (lambda a, b: a ** b, [([1.0, 2.0, 3.0], F32), (2.0, F64)], F32),
    "f64 0-d - f32": (lambda a, b: a - b, [(2.0, F64), ([1.0, 2.0, 3.0], F32)], F32),
    "maximum f32 f64 0-d": (ag.maximum, [([1.0, 2.0, 3.0], F32), (2.0, F64)], F32),
    "where f32 f64 0-d": (lambda a, b: ag.where(a.data > 1, a, b), [([1.0, 2.0, 3.0], F32), (0.5, F64)], F32),
}


@pytest.mark.parametrize("name", sorted(GRAD_CASES))
def test_each_gradient_has_its_input_dtype(xp, name):
    build, leaves, expected = GRAD_CASES[name]
    tensors = [_leaf(xp, values, dtype) for values, dtype in leaves]
    y = build(*tensors)
    assert y.dtype == np.dtype(expected)
    y.sum().backward()
    for t in tensors:
        assert t.grad is not None and t.grad.dtype == t.dtype and t.grad.shape == t.shape, (name, t.dtype)


def test_gradient_values_survive_the_casts(xp):
    """d(sum(a * b))/db for a 0-d float64 b is sum(a), summed in the forward's float32 and cast back."""
    a, b = _leaf(xp, [1.0, 2.0, 3.0], F32), _leaf(xp, 2.0, F64)
    (a * b).sum().backward()
    np.testing.assert_array_equal(ag.backend.to_device(a.grad, "cpu"), [2.0, 2.0, 2.0])
    assert float(b.grad) == 6.0


class Float64Grad(Function):
    """y = 2x, whose backward (carelessly) returns float64: the engine casts it to the input's dtype."""

    def forward(self, x):
        return x * 2

    def backward(self, gy):
        return gy.astype(np.float64) * 2


def test_a_leaf_gradient_has_the_leaf_dtype_whatever_the_op_returns(xp):
    x = _leaf(xp, [1.0, 2.0], F32)
    Float64Grad()(x).sum().backward()
    assert x.grad.dtype == np.float32
    w = _leaf(xp, [[1.0], [2.0]], F64)  # a product of float32 and float64: float64, as in NumPy
    y = x.reshape(1, 2) @ w
    assert y.dtype == np.float64
    y.sum().backward()
    assert x.grad.dtype == np.float32 and w.grad.dtype == np.float64


def test_result_type_is_public():
    assert ag.result_type(Tensor(np.ones(3, np.float32)), np.float64(2.5)) == np.float32
    assert ag.result_type(Tensor([1, 2]), 2.5) == np.float32
    assert ag.result_type(Tensor([1, 2]), np.array(2.5)) == np.float64


# -- the table against PyTorch itself (where it is installed: a test-only agreement check) -----


def _torch_operand(torch, operand):
    kind, what = operand
    if kind == "dim":
        return torch.tensor(np.array([1, 2, 3]).astype(what))
    if kind in ("zero", "zeroT"):
        return torch.tensor(np.array(2).astype(what))
    return what


def test_the_table_is_what_pytorch_does():
    torch = pytest.importorskip("torch", reason="the agreement check runs where PyTorch is installed")
    fns = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div, "pow": torch.pow,
           "maximum": torch.maximum, "minimum": torch.minimum}
    wrong = []
    for op, left, right, expected in BINARY:
        a, b = _torch_operand(torch, left), _torch_operand(torch, right)
        if not isinstance(a, torch.Tensor):
            a = torch.tensor(a)  # torch's functions want a tensor first; a wrapped scalar's own rule
            if left[0] in ("py", "np"):  # ... is kept by the reflected operator instead
                y = getattr(b, f"__r{op if op != 'div' else 'truediv'}__")(left[1])
            else:
                y = fns[op](a, b)
        elif op in ("maximum", "minimum") and not isinstance(b, torch.Tensor):
            y = fns[op](a, torch.tensor(b))  # torch's maximum takes tensors only: a Python float is 0-d float32
        else:
            y = fns[op](a, b)
        if str(y.dtype).replace("torch.", "") != expected:
            wrong.append((op, left, right, expected, y.dtype))
    for x, y, expected in WHERE:
        got = torch.where(torch.tensor([True, False, True]), _torch_operand(torch, x), _torch_operand(torch, y))
        if str(got.dtype).replace("torch.", "") != expected:
            wrong.append(("where", x, y, expected, got.dtype))
    for x, bound, expected in CLIP:
        got = torch.clamp(_torch_operand(torch, x), min=_torch_operand(torch, bound))
        if str(got.dtype).replace("torch.", "") != expected:
            wrong.append(("clamp", x, bound, expected, got.dtype))
    assert not wrong, wrong
