"""Tests for nn.Module / Parameter / containers, nn.init and the basic layers (Linear, Embedding, MLP, SwiGLU)."""

import math

import numpy as np
import pytest

import autograd
import nn
from autograd import Tensor, gradcheck
from autograd.backend import to_device
from nn import MLP, Embedding, Linear, Module, ModuleDict, ModuleList, Parameter, Sequential, SwiGLU


def _dev(xp):
    return "cpu" if xp is np else "cuda"


class Block(Module):
    def __init__(self, gen):
        super().__init__()
        self.attn = Linear(4, 12, generator=gen)
        self.scale = Parameter(np.ones(4, dtype=np.float32), no_decay=True)  # assigned after a child
        self.mlp = MLP(4, hidden_dim=8, generator=gen)

    def forward(self, x):
        return x


class Net(Module):
    def __init__(self, seed=0, n_layer=2):
        super().__init__()
        gen = np.random.default_rng(seed)
        self.wte = Embedding(10, 4, generator=gen)
        self.h = ModuleList([Block(gen) for _ in range(n_layer)])
        self.head = Linear(4, 10, bias=False, generator=gen)
        self.register_buffer("mask", np.tril(np.ones((3, 3), dtype=np.float32)))
        self.register_buffer("cache", np.zeros(2, dtype=np.float32), persistent=False)

    def forward(self, x):
        return x


def _block_names(i):
    p = f"h.{i}."
    return [p + "scale", p + "attn.weight", p + "attn.bias", p + "mlp.c_fc.weight", p + "mlp.c_fc.bias",
            p + "mlp.c_proj.weight", p + "mlp.c_proj.bias"]


EXPECTED_NAMES = ["wte.weight"] + _block_names(0) + _block_names(1) + ["head.weight"]


def _same_bits(a, b):
    a, b = to_device(a, "cpu"), to_device(b, "cpu")
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# -- registration and traversal ------------------------------------------------------------------


def test_named_parameters_order_and_dotted_names():
    net = Net()
    # own parameters first (in assignment order), then children depth first, in assignment order
    assert [n for n, _ in net.named_parameters()] == EXPECTED_NAMES
    assert [n for n, _ in Net(seed=5).named_parameters()] == EXPECTED_NAMES  # same on every construction
    assert net.h[1].mlp.c_proj.weight is dict(net.named_parameters())["h.1.mlp.c_proj.weight"]
    assert [n for n, _ in net.named_children()] == ["wte", "h", "head"]
    mods = [n for n, _ in net.named_modules()]
    assert mods[:5] == ["", "wte", "h", "h.0", "h.0.attn"]
    assert "h.1.mlp.dropout" in mods


def test_parameter_counts():
    net = Net()
    params = list(net.parameters())
    assert len(params) == len(EXPECTED_NAMES) == 16
    per_block = 4 * 12 + 12 + 4 + (4 * 8 + 8) + (8 * 4 + 4)
    expected = 10 * 4 + 2 * per_block + 4 * 10
    assert net.num_parameters() == expected
    net.h[0].scale.requires_grad = False
    assert net.num_parameters(trainable_only=True) == expected - 4
    assert all(isinstance(p, Parameter) and p.requires_grad for p in net.h[1].parameters())


def test_tied_parameter_is_listed_once():
    net = Net()
    net.head.weight = net.h[0].attn.weight  # same object under two names (shapes do not matter here)
    names = [n for n, _ in net.named_parameters()]
    assert "head.weight" not in names and len(names) == 15
    assert len(list(net.named_parameters(remove_duplicate=False))) == 16
    assert "head.weight" in net.state_dict()  # as in PyTorch, state_dict keeps every name


def test_reassignment_keeps_position_and_type_checks():
    net = Net()
    new = Parameter(np.zeros((10, 4), dtype=np.float32))
    net.wte.weight = new
    assert [n for n, _ in net.named_parameters()] == EXPECTED_NAMES
    assert net.wte.weight is new
    with pytest.raises(TypeError, match="nn.Parameter"):
        net.wte.weight = Tensor(np.zeros((10, 4), dtype=np.float32))
    del net.head
    assert "head.weight" not in [n for n, _ in net.named_parameters()]


def test_assignment_before_super_init_is_a_clear_error():
    class Bad(Module):
        def __init__(self):
            self.w = Parameter(np.zeros(2, dtype=np.float32))

    with pytest.raises(AttributeError, match="super\\(\\).__init__"):
        Bad()


def test_containers():
    gen = np.random.default_rng(0)
    layers = ModuleList([Linear(2, 2, generator=gen) for _ in range(3)])
    assert len(layers) == 3 and layers[-1] is layers[2]
    assert [n for n, _ in layers.named_parameters()][:2] == ["0.weight", "0.bias"]
    with pytest.raises(IndexError):
        layers[3]
    d = ModuleDict({"keys": Linear(2, 3, generator=gen), "b": Linear(3, 1, generator=gen)})
    assert list(d.keys()) == ["keys", "b"]  # a key named like a method does not shadow it
    assert [n for n, _ in d.named_parameters()] == ["keys.weight", "keys.bias", "b.weight", "b.bias"]
    seq = Sequential(d["keys"], d["b"])
    x = Tensor(np.arange(4, dtype=np.float32).reshape(2, 2))
    ref = (x.data @ d["keys"].weight.data + d["keys"].bias.data) @ d["b"].weight.data + d["b"].bias.data
    np.testing.assert_allclose(seq(x).data, ref, rtol=1e-6)
    text = repr(Net())
    assert "(h): ModuleList" in text and "(0): Block" in text and "in_features=4, out_features=12" in text


# -- state_dict ----------------------------------------------------------------------------------


def test_state_dict_round_trip_is_bitwise_exact():
    src, dst = Net(seed=1), Net(seed=2)
    sd = src.state_dict()
    # each module: its parameters, then its persistent buffers, then its children
    assert list(sd) == ["mask", "wte.weight"] + _block_names(0) + _block_names(1) + ["head.weight"]
    assert "cache" not in sd  # non-persistent buffer
    assert not _same_bits(sd["wte.weight"], dst.state_dict()["wte.weight"])
    dst.load_state_dict(sd)
    for (name, a), (_, b) in zip(src.state_dict().items(), dst.state_dict().items()):
        assert _same_bits(a, b), name
    # the copy is a copy: changing the source afterwards leaves the destination alone
    before = dst.head.weight.data.copy()
    src.head.weight.data += 1.0
    assert _same_bits(dst.head.weight.data, before)


def test_load_state_dict_keeps_parameter_objects_and_casts_dtype():
    net = Net(seed=3)
    weight_obj, weight_arr = net.wte.weight, net.wte.weight.data
    state = {k: np.asarray(v, dtype=np.float64) * 2.0 for k, v in Net(seed=4).state_dict().items()}
    net.load_state_dict(state)
    assert net.wte.weight is weight_obj and net.wte.weight.data is weight_arr  # copied in place
    assert net.wte.weight.dtype == np.float32
    assert _same_bits(net.wte.weight.data, state["wte.weight"].astype(np.float32))


def test_load_state_dict_reports_every_problem_at_once():
    net = Net()
    sd = dict(Net(seed=9).state_dict())
    del sd["h.0.attn.bias"], sd["head.weight"]
    sd["h.5.attn.weight"] = np.zeros((4, 12), np.float32)
    sd["bogus"] = np.zeros(1, np.float32)
    sd["wte.weight"] = np.zeros((11, 4), np.float32)
    sd["h.1.scale"] = np.zeros(5, np.float32)
    before = {k: v.copy() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError) as info:
        net.load_state_dict(sd)
    msg = str(info.value)
    for key in ["h.0.attn.bias", "head.weight", "h.5.attn.weight", "bogus", "wte.weight", "h.1.scale"]:
        assert key in msg, key
    assert "(11, 4)" in msg and "(10, 4)" in msg and "(5,)" in msg and "(4,)" in msg
    assert "missing" in msg and "unexpected" in msg and "shape" in msg
    # nothing was copied
    assert all(_same_bits(v, net.state_dict()[k]) for k, v in before.items())


def test_load_state_dict_non_strict():
    net, other = Net(seed=0), Net(seed=1)
    sd = dict(other.state_dict())
    del sd["head.weight"]
    sd["extra"] = np.zeros(3, np.float32)
    result = net.load_state_dict(sd, strict=False)
    assert result.missing_keys == ["head.weight"] and result.unexpected_keys == ["extra"]
    assert _same_bits(net.wte.weight.data, other.wte.weight.data)
    assert not _same_bits(net.head.weight.data, other.head.weight.data)
    sd["wte.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(ValueError, match="wte.weight"):  # shapes are checked even when not strict
        net.load_state_dict(sd, strict=False)


# -- modes, grads, devices -----------------------------------------------------------------------


def test_train_eval_recurse():
    net = Net()
    assert all(m.training for m in net.modules())
    assert net.eval() is net
    assert not any(m.training for m in net.modules())
    net.train()
    assert all(m.training for m in net.modules())
    net.h.train(False)
    assert net.training and not net.h[1].mlp.dropout.training


def test_dropout_is_identity_in_eval_and_at_p0():
    x = Tensor(np.ones((2, 3), dtype=np.float32))
    drop = nn.Dropout(0.5).eval()
    assert drop(x) is x
    assert nn.Dropout(0.0)(x) is x
    with pytest.raises(ValueError, match="\\[0, 1\\]"):
        nn.Dropout(1.5)


def test_dropout_in_training_uses_its_generator():
    x = Tensor(np.ones((64, 64), dtype=np.float32))
    y1 = nn.Dropout(0.25, generator=np.random.default_rng(3))(x)
    y2 = autograd.dropout(x, 0.25, training=True, generator=np.random.default_rng(3))
    assert _same_bits(y1.data, y2.data)
    kept = y1.data != 0
    assert 0.7 < kept.mean() < 0.8 and np.allclose(y1.data[kept], 1 / 0.75)


def test_zero_grad():
    net = Net()
    for p in net.parameters():
        p.grad = np.ones_like(p.data)
    net.zero_grad()
    assert all(p.grad is None for p in net.parameters())


def test_apply_visits_every_module_children_first():
    seen = []
    Net().apply(lambda m: seen.append(type(m).__name__))
    assert seen[-1] == "Net" and seen[0] == "Embedding" and seen.count("Linear") == 2 * 3 + 1


def test_to_device_keeps_parameter_identity(xp):
    net = Net(seed=0)
    ref = {k: v.copy() for k, v in net.state_dict().items()}
    objs = list(net.parameters())
    net.wte.weight.grad = np.ones((10, 4), np.float32)
    assert net.to(_dev(xp)) is net
    assert all(a is b for a, b in zip(objs, net.parameters()))
    for name, arr in net.state_dict().items():
        assert autograd.get_array_module(arr) is xp
        assert _same_bits(arr, ref[name]), name
    assert autograd.get_array_module(net.wte.weight.grad) is xp
    assert autograd.get_array_module(net.mask) is xp and autograd.get_array_module(net.cache) is xp
    net.to("float64")
    assert net.head.weight.dtype == np.float64 and net.mask.dtype == np.float64
    net.to("cpu")
    assert isinstance(net.head.weight.data, np.ndarray)


# -- initialisation ------------------------------------------------------------------------------


def test_same_seed_bitwise_identical_different_seed_differs():
    a, b, c = Net(seed=7), Net(seed=7), Net(seed=8)
    for (name, x), (_, y), (_, z) in zip(a.state_dict().items(), b.state_dict().items(), c.state_dict().items()):
        assert _same_bits(x, y), name
        if name.endswith("weight"):
            assert not np.array_equal(x, z), name


def test_default_generator_is_seedable():
    nn.init.manual_seed(123)
    a = Linear(5, 6)
    nn.init.manual_seed(123)
    b = Linear(5, 6)
    c = Linear(5, 6)
    assert _same_bits(a.weight.data, b.weight.data)
    assert not np.array_equal(b.weight.data, c.weight.data)
    with pytest.raises(TypeError, match="default_rng"):
        Linear(2, 2, generator=3)


def test_gpt2_init_statistics():
    gen = np.random.default_rng(0)
    n_layer = 12
    mlp = MLP(256, n_layer=n_layer, generator=gen)
    w = mlp.c_fc.weight.data.astype(np.float64)
    assert w.dtype == np.float64 and mlp.c_fc.weight.dtype == np.float32
    assert abs(w.std() - 0.02) < 0.02 * 0.01  # 262144 samples: std of the std is ~0.14%
    assert abs(w.mean()) < 0.02 * 0.01
    proj = mlp.c_proj.weight.data.astype(np.float64)
    expected = 0.02 / math.sqrt(2 * n_layer)
    assert abs(proj.std() - expected) < expected * 0.01
    assert not mlp.c_fc.bias.data.any() and not mlp.c_proj.bias.data.any()
    emb = Embedding(1000, 64, generator=gen).weight.data.astype(np.float64)
    assert abs(emb.std() - 0.02) < 0.02 * 0.02


def test_init_helpers_fill_in_place():
    t = Tensor(np.empty((3, 4), dtype=np.float64))
    arr = t.data
    nn.init.ones_(t)
    assert t.data is arr and (arr == 1).all()
    nn.init.zeros_(t)
    assert (arr == 0).all()
    nn.init.normal_(t, std=2.0, mean=5.0, generator=np.random.default_rng(0))
    expected = (np.random.default_rng(0).standard_normal((3, 4), dtype=np.float32) * np.float32(2.0)
                + np.float32(5.0))
    assert _same_bits(arr, expected.astype(np.float64))


# -- layers --------------------------------------------------------------------------------------


def test_linear_forward_layout(xp, rng):
    layer = Linear(3, 5, generator=np.random.default_rng(0)).to(_dev(xp))
    assert layer.weight.shape == (3, 5)  # (in, out): x @ W, no transpose
    x = rng.standard_normal((2, 4, 3)).astype(np.float32)
    y = layer(Tensor(xp.asarray(x)))
    assert y.shape == (2, 4, 5) and y.dtype == np.float32
    ref = x.astype(np.float64) @ layer.weight.numpy() + layer.bias.numpy()
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="last axis must be 3"):
        layer(Tensor(xp.zeros((2, 4), dtype=np.float32)))


def test_linear_gradcheck_float64(rng):
    layer = Linear(3, 4, generator=np.random.default_rng(0), dtype=np.float64)
    assert layer.weight.dtype == np.float64
    x_nc = Tensor(rng.standard_normal((5, 3, 2)).transpose(0, 2, 1), requires_grad=True)  # (5, 2, 3), strided
    gradcheck(nn.linear, x_nc, layer.weight, layer.bias)
    gradcheck(nn.linear, Tensor(rng.standard_normal(3), requires_grad=True), layer.weight, layer.bias)  # 1-D x
    gradcheck(nn.linear, Tensor(rng.standard_normal((4, 3)), requires_grad=True), layer.weight)  # no bias
    gradcheck(lambda x, w, b: nn.functional_call(layer, {"weight": w, "bias": b}, x),
              Tensor(rng.standard_normal((6, 3)), requires_grad=True), layer.weight, layer.bias)
    assert isinstance(layer.weight, Parameter)  # functional_call restored the parameters


def test_linear_matches_composition_of_primitives(xp, rng):
    x = Tensor(xp.asarray(rng.standard_normal((2, 3, 4))), requires_grad=True)
    w = Tensor(xp.asarray(rng.standard_normal((4, 5))), requires_grad=True)
    b = Tensor(xp.asarray(rng.standard_normal(5)), requires_grad=True)
    gy = xp.asarray(rng.standard_normal((2, 3, 5)))
    nn.linear(x, w, b).backward(gy)
    fused = [t.grad for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    y = x @ w + b
    y.backward(gy)
    np.testing.assert_allclose(to_device(nn.linear(x, w, b).data, "cpu"), to_device(y.data, "cpu"), rtol=1e-12)
    for f, t in zip(fused, (x, w, b)):
        np.testing.assert_allclose(to_device(f, "cpu"), to_device(t.grad, "cpu"), rtol=1e-12, atol=1e-12)


def test_linear_skips_unneeded_grads(rng):
    layer = Linear(3, 2, generator=np.random.default_rng(0))
    layer.weight.requires_grad = False
    x = Tensor(rng.standard_normal((4, 3)).astype(np.float32), requires_grad=True)
    layer(x).backward(np.ones((4, 2), np.float32))
    assert layer.weight.grad is None and layer.bias.grad is not None and x.grad.dtype == np.float32


def test_embedding_lookup_and_gradcheck(rng):
    emb = Embedding(7, 3, generator=np.random.default_rng(0), dtype=np.float64)
    assert emb.weight.no_decay
    ids = np.array([[1, 4, 1], [6, 0, 1]])
    out = emb(ids)
    assert out.shape == (2, 3, 3)
    np.testing.assert_array_equal(out.data, emb.weight.data[ids])
    gradcheck(lambda w: autograd.embedding(w, ids), emb.weight)


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def test_mlp_forward_matches_numpy_and_gradchecks(rng):
    mlp = MLP(4, hidden_dim=6, generator=np.random.default_rng(0), dtype=np.float64)
    assert [n for n, _ in mlp.named_parameters()] == ["c_fc.weight", "c_fc.bias", "c_proj.weight", "c_proj.bias"]
    x = rng.standard_normal((2, 3, 4))
    p = {n: q.data for n, q in mlp.named_parameters()}
    ref = _gelu_tanh(x @ p["c_fc.weight"] + p["c_fc.bias"]) @ p["c_proj.weight"] + p["c_proj.bias"]
    np.testing.assert_allclose(mlp(Tensor(x)).data, ref, rtol=1e-12, atol=1e-12)
    names = [n for n, _ in mlp.named_parameters()]
    gradcheck(lambda x, *ws: nn.functional_call(mlp, dict(zip(names, ws)), x), Tensor(x, requires_grad=True),
              *mlp.parameters())


def test_swiglu_forward_matches_numpy_and_gradchecks(rng):
    assert nn.llama_hidden_dim(4096) == 11008  # Llama-7B's FFN size
    ff = SwiGLU(4, hidden_dim=6, generator=np.random.default_rng(0), dtype=np.float64)
    assert [n for n, _ in ff.named_parameters()] == ["w1.weight", "w2.weight", "w3.weight"]
    assert ff.w1.weight.shape == (4, 6)
    x = rng.standard_normal((5, 4))
    w1, w2, w3 = ff.w1.weight.data, ff.w2.weight.data, ff.w3.weight.data
    a = x @ w1
    ref = (a / (1.0 + np.exp(-a)) * (x @ w3)) @ w2
    np.testing.assert_allclose(ff(Tensor(x)).data, ref, rtol=1e-12, atol=1e-12)
    names = ["w1.weight", "w2.weight", "w3.weight"]
    gradcheck(lambda x, *ws: nn.functional_call(ff, dict(zip(names, ws)), x), Tensor(x, requires_grad=True),
              ff.w1.weight, ff.w2.weight, ff.w3.weight)
