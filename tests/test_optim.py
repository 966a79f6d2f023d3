"""Tests for nn.optim: AdamW and SGD against plain NumPy transcriptions of their update rules,
state_dict round trips, parameter groups, gradient clipping, schedules and gradient accumulation."""

import math

import numpy as np
import pytest

import nn
from autograd import Tensor
from autograd.backend import to_device
from nn import Linear, Parameter
from nn.optim import SGD, AdamW, clip_grad_norm_, constant, cosine_with_warmup, grad_norm, param_groups_for_gpt


def _dev(xp):
    return "cpu" if xp is np else "cuda"


def _cpu(a):
    return to_device(a, "cpu")


def _params(rng, xp, dtype, shapes):
    return [(f"p{i}", Parameter(xp.asarray(rng.standard_normal(s).astype(dtype)))) for i, s in enumerate(shapes)]


SHAPES = [(3, 4), (4,), (2, 3, 2)]


# -- NumPy references (float64), written from the papers / torch docs, not from our code ------------


def adamw_reference(p, g, m, v, t, lr, b1, b2, eps, wd):
    """torch.optim.AdamW's documented algorithm for one parameter at step t; returns new (p, m, v)."""
    p = p - lr * wd * p
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g ** 2
    m_hat = m / (1 - b1 ** t)
    v_hat = v / (1 - b2 ** t)
    return p - lr * m_hat / (np.sqrt(v_hat) + eps), m, v


def sgd_reference(p, g, buf, lr, momentum, dampening, wd, nesterov):
    """torch.optim.SGD's documented algorithm for one parameter; returns new (p, buf)."""
    d = g + wd * p
    if momentum:
        buf = d.copy() if buf is None else momentum * buf + (1 - dampening) * d
        d = d + momentum * buf if nesterov else buf
    return p - lr * d, buf


# -- AdamW -------------------------------------------------------------------------------------


def test_adamw_matches_numpy_reference_two_groups(xp, rng):
    named = _params(rng, xp, np.float64, SHAPES)
    groups = [{"params": named[:2], "weight_decay": 0.1}, {"params": named[2:], "weight_decay": 0.0, "lr": 3e-2}]
    opt = AdamW(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    ref = {n: [_cpu(p.data).copy(), 0.0, 0.0, 0] for n, p in named}  # p, m, v, t
    hyper = {"p0": (1e-2, 0.1), "p1": (1e-2, 0.1), "p2": (3e-2, 0.0)}
    for step in range(5):
        for name, p in named:
            skip = name == "p1" and step == 2  # a parameter without a gradient this step is left alone
            g = rng.standard_normal(p.shape)
            p.grad = None if skip else xp.asarray(g)
            if not skip:
                r = ref[name]
                r[3] += 1
                lr, wd = hyper[name]
                r[0], r[1], r[2] = adamw_reference(r[0], g, r[1], r[2], r[3], lr, 0.9, 0.95, 1e-8, wd)
        opt.step()
        for name, p in named:
            np.testing.assert_allclose(_cpu(p.data), ref[name][0], rtol=1e-12, atol=1e-14)
    assert opt.state["p1"]["step"] == 4 and opt.state["p0"]["step"] == 5 and opt.step_count == 5
    np.testing.assert_allclose(_cpu(opt.state["p2"]["exp_avg_sq"]), ref["p2"][2], rtol=1e-12)


def test_adamw_in_pieces_large_strided_and_float32(xp, rng, monkeypatch):
    """The CPU update runs in pieces (here of 1000 elements): a parameter of several pieces (a ragged last
    one), a strided view of a parameter and a strided gradient, in float64 and float32, follow the reference."""
    from nn.optim import adamw

    monkeypatch.setattr(adamw, "_PIECE", 1000)
    n = 1507
    big = Parameter(xp.asarray(rng.standard_normal((n, 2))))
    strided = Parameter(xp.asarray(rng.standard_normal((6, 8)))[:, ::2])  # (6, 4), not contiguous
    f32 = Parameter(xp.asarray(rng.standard_normal(n).astype(np.float32)))
    named = [("big", big), ("strided", strided), ("f32", f32)]
    opt = AdamW(named, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ref = {name: [_cpu(p.data).astype(np.float64), 0.0, 0.0] for name, p in named}
    for t in range(1, 4):
        for name, p in named:
            g = rng.standard_normal((p.shape[1], p.shape[0])).T if p.ndim == 2 else rng.standard_normal(p.shape)
            p.grad = xp.asarray(g.astype(p.dtype))  # the 2-D gradients are transposed views
            r = ref[name]
            r[0], r[1], r[2] = adamw_reference(r[0], g.astype(p.dtype), r[1], r[2], t, 1e-2, 0.9, 0.95, 1e-8, 0.1)
        opt.step()
        for name, p in named:
            tol = dict(rtol=1e-5, atol=1e-6) if name == "f32" else dict(rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(_cpu(p.data), ref[name][0], **tol, err_msg=name)
    assert f32.dtype == np.float32 and opt.state["f32"]["exp_avg"].dtype == np.float32
    assert not strided.data.flags.c_contiguous  # updated where it lives


def test_adamw_refuses_half_precision_parameters_and_names_the_fix(xp, rng):
    # a float16 weight rounds away updates below 2**-11 of itself: AdamW updates float32 masters instead
    p16 = Parameter(xp.asarray(rng.standard_normal((8, 8)).astype(np.float16)))
    p16.grad = xp.zeros((8, 8), dtype=np.float16)
    opt = AdamW([("b", p16)], lr=1e-2)
    with pytest.raises(TypeError, match=r"'b' is float16.*MixedPrecision\(model, 'fp16'\)"):
        opt.step()
    assert opt.state == {}


def test_adamw_lr_zero_and_set_lr(rng):
    named = _params(rng, np, np.float64, SHAPES)
    before = [p.data.copy() for _, p in named]
    opt = AdamW(named, lr=1e-3, weight_decay=0.1)
    opt.set_lr(0.0)
    for _, p in named:
        p.grad = np.ones(p.shape)
    opt.step()
    assert all(np.array_equal(b, p.data) for b, (_, p) in zip(before, named))
    opt.param_groups[0]["lr"] = 1e-3  # a schedule may also write the group's "lr" directly
    opt.step()
    assert not np.array_equal(before[0], named[0][1].data)


def test_step_skips_parameters_without_grad_and_zero_grad(rng):
    named = _params(rng, np, np.float32, SHAPES)
    before = named[1][1].data.copy()
    opt = AdamW(named, lr=1e-2)
    named[0][1].grad = np.ones(SHAPES[0], np.float32)
    opt.step()
    assert np.array_equal(before, named[1][1].data) and "p1" not in opt.state and "p0" in opt.state
    opt.zero_grad()
    assert all(p.grad is None for _, p in named)


# -- SGD ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("momentum,dampening,wd,nesterov", [
    (0.0, 0.0, 0.0, False), (0.9, 0.0, 0.01, False), (0.9, 0.0, 0.01, True), (0.8, 0.3, 0.0, False)])
def test_sgd_matches_numpy_reference(xp, rng, momentum, dampening, wd, nesterov):
    named = _params(rng, xp, np.float64, SHAPES)
    opt = SGD(named, lr=0.1, momentum=momentum, dampening=dampening, weight_decay=wd, nesterov=nesterov)
    ref = {n: [_cpu(p.data).copy(), None] for n, p in named}
    for _ in range(5):
        for name, p in named:
            g = rng.standard_normal(p.shape)
            p.grad = xp.asarray(g)
            ref[name][0], ref[name][1] = sgd_reference(ref[name][0], g, ref[name][1], 0.1, momentum, dampening, wd,
                                                       nesterov)
        grads = [p.grad.copy() for _, p in named]
        opt.step()
        for (name, p), g in zip(named, grads):
            np.testing.assert_allclose(_cpu(p.data), ref[name][0], rtol=1e-12, atol=1e-14)
            np.testing.assert_array_equal(_cpu(p.grad), _cpu(g))  # the gradient is never modified


def test_sgd_rejects_bad_nesterov():
    with pytest.raises(ValueError, match="Nesterov"):
        SGD([("w", Parameter(np.zeros(2)))], lr=0.1, nesterov=True)


# -- state_dict --------------------------------------------------------------------------------


def _model(seed):
    return nn.Sequential(Linear(4, 6, generator=np.random.default_rng(seed)),
                         Linear(6, 3, generator=np.random.default_rng(seed + 1)))


def _train(model, opt, grads):
    for step_grads in grads:
        for p, g in zip(model.parameters(), step_grads):
            p.grad = g.copy()
        opt.step()


def _is_plain(x):
    if isinstance(x, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in x.items())
    if isinstance(x, list):
        return all(_is_plain(v) for v in x)
    return isinstance(x, (int, float, str, bool, np.ndarray)) or x is None


@pytest.mark.parametrize("make", [
    lambda m: AdamW(param_groups_for_gpt(m, 0.1), lr=1e-2),
    lambda m: SGD(m.named_parameters(), lr=0.1, momentum=0.9, nesterov=True),
])
def test_optimizer_state_dict_round_trip_continues_identically(rng, make):
    shapes = [p.shape for p in _model(0).parameters()]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(6)]
    a = _model(0)
    opt_a = make(a)
    _train(a, opt_a, grads)

    b = _model(0)
    opt_b = make(b)
    _train(b, opt_b, grads[:3])
    model_sd = {k: v.copy() for k, v in b.state_dict().items()}
    opt_sd = opt_b.state_dict()
    assert _is_plain(opt_sd) and opt_sd["step"] == 3
    c = _model(7)  # different initial weights, fresh optimizer
    opt_c = make(c)
    c.load_state_dict(model_sd)
    opt_c.load_state_dict(opt_sd)
    first = next(iter(opt_sd["state"]))
    key = next(k for k in opt_c.state[first] if k != "step")
    assert opt_c.state[first][key] is not opt_sd["state"][first][key]  # loaded as a copy
    _train(c, opt_c, grads[3:])
    for (name, x), (_, y) in zip(a.named_parameters(), c.named_parameters()):
        assert x.data.tobytes() == y.data.tobytes(), name
    assert opt_c.step_count == 6


def test_optimizer_load_state_dict_reports_every_problem(rng):
    model = _model(0)
    opt = AdamW(model.named_parameters(), lr=1e-2)
    for p in model.parameters():
        p.grad = np.ones(p.shape, np.float32)
    opt.step()
    sd = opt.state_dict()
    groups = sd["param_groups"]
    groups[0]["params"] = [n for n in groups[0]["params"] if n != "1.bias"] + ["2.weight"]
    sd["state"]["0.weight"]["exp_avg"] = np.zeros((5, 6), np.float32)
    sd["state"]["0.bias"]["junk"] = np.zeros(6, np.float32)
    del sd["state"]["1.weight"]["exp_avg_sq"]
    before = {n: {k: (v.copy() if hasattr(v, "copy") else v) for k, v in e.items()} for n, e in opt.state.items()}
    with pytest.raises(ValueError) as info:
        fresh = AdamW(model.named_parameters(), lr=1e-2)
        fresh.load_state_dict(sd)
    msg = str(info.value)
    for text in ["2.weight", "1.bias", "0.weight.exp_avg", "(5, 6)", "(4, 6)", "junk", "exp_avg_sq"]:
        assert text in msg, text
    assert fresh.state == {}  # nothing loaded
    assert all(np.array_equal(before[n]["exp_avg"], opt.state[n]["exp_avg"]) for n in before)
    with pytest.raises(ValueError, match="1 parameter group.*this optimizer has 2"):
        AdamW(param_groups_for_gpt(model, 0.1)).load_state_dict(opt.state_dict())


def test_optimizer_argument_errors():
    p = Parameter(np.zeros(3, np.float32))
    with pytest.raises(TypeError, match="named_parameters"):
        AdamW([p])
    with pytest.raises(ValueError, match="twice"):
        AdamW([("a", p), ("a", Parameter(np.zeros(2, np.float32)))])
    with pytest.raises(ValueError, match="same object"):
        AdamW([("a", p), ("b", p)])
    with pytest.raises(ValueError, match="betas"):
        AdamW([("a", p)], betas=(0.9, 1.0))


# -- parameter groups ----------------------------------------------------------------------------


def test_param_groups_for_gpt():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            gen = np.random.default_rng(0)
            self.wte = nn.Embedding(10, 4, generator=gen)
            self.ln_gain = Parameter(np.ones(4, np.float32), no_decay=True)
            self.mlp = nn.MLP(4, generator=gen)
            self.frozen = Parameter(np.ones((2, 2), np.float32), requires_grad=False)

    model = Tiny()
    decay, no_decay = param_groups_for_gpt(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert [n for n, _ in decay["params"]] == ["mlp.c_fc.weight", "mlp.c_proj.weight"]
    assert [n for n, _ in no_decay["params"]] == ["ln_gain", "wte.weight", "mlp.c_fc.bias", "mlp.c_proj.bias"]
    decay, no_decay = param_groups_for_gpt(model, 0.1, decay_embeddings=True)
    assert [n for n, _ in decay["params"]] == ["wte.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"]
    opt = AdamW(param_groups_for_gpt(model, 0.1), lr=1e-3)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


# -- clipping ------------------------------------------------------------------------------------


def test_clip_grad_norm(xp, rng):
    named = _params(rng, xp, np.float32, SHAPES)
    grads = [rng.standard_normal(p.shape).astype(np.float32) for _, p in named]
    for (_, p), g in zip(named, grads):
        p.grad = xp.array(g)  # a copy: clipping scales it in place
    expected = float(np.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in grads)))
    extra = Parameter(xp.zeros(3, dtype=np.float32))  # grad None: skipped
    assert abs(grad_norm(named) - expected) < 1e-6 * expected

    # below the threshold: returned, nothing changes
    total = clip_grad_norm_(named + [("extra", extra)], max_norm=expected * 2)
    assert isinstance(total, float) and abs(total - expected) < 1e-6 * expected
    assert all(_cpu(p.grad).tobytes() == g.tobytes() for (_, p), g in zip(named, grads))

    # above: every grad scaled by max_norm / norm
    total = clip_grad_norm_([p for _, p in named], max_norm=1.0)
    assert abs(total - expected) < 1e-6 * expected
    for (_, p), g in zip(named, grads):
        np.testing.assert_allclose(_cpu(p.grad), g / expected, rtol=1e-5)
        assert p.grad.dtype == np.float32
    assert abs(grad_norm(named) - 1.0) < 1e-5


def test_clip_grad_norm_nonfinite_and_float16():
    a = Parameter(np.zeros(4, np.float32))
    a.grad = np.array([1.0, np.nan, 2.0, 3.0], np.float32)
    before = a.grad.copy()
    assert math.isnan(clip_grad_norm_([a], 1.0))
    assert np.array_equal(a.grad, before, equal_nan=True)
    b = Parameter(np.zeros(4, np.float32))
    b.grad = np.array([np.inf, 0, 0, 0], np.float32)
    assert clip_grad_norm_([b], 1.0) == math.inf and b.grad[0] == np.inf
    # float16 grads whose squares overflow float16 (300**2 * 1000 > 65504) still give the right norm
    c = Parameter(np.zeros(1000, np.float16))
    c.grad = np.full(1000, 300.0, np.float16)
    total = clip_grad_norm_([c], 1.0)
    assert abs(total - 300.0 * math.sqrt(1000)) < 1e-3 * total
    assert c.grad.dtype == np.float16
    np.testing.assert_allclose(c.grad.astype(np.float64), 1 / math.sqrt(1000), rtol=2e-3)


# -- schedules -----------------------------------------------------------------------------------


def test_cosine_with_warmup():
    kw = dict(max_lr=6e-4, warmup_steps=10, total_steps=110, min_lr=6e-5)
    assert cosine_with_warmup(0, **kw) == pytest.approx(6e-4 / 10)  # warm-up starts near 0, not at 0
    assert cosine_with_warmup(4, **kw) == pytest.approx(6e-4 * 5 / 10)
    assert cosine_with_warmup(9, **kw) == pytest.approx(6e-4)  # end of warm-up
    assert cosine_with_warmup(10, **kw) == pytest.approx(6e-4)  # start of decay
    assert cosine_with_warmup(60, **kw) == pytest.approx((6e-4 + 6e-5) / 2)  # half-way: cos(pi/2) = 0
    assert cosine_with_warmup(35, **kw) == pytest.approx(6e-5 + (6e-4 - 6e-5) * (1 + math.cos(math.pi / 4)) / 2)
    assert cosine_with_warmup(110, **kw) == pytest.approx(6e-5)  # end
    assert cosine_with_warmup(500, **kw) == 6e-5  # after
    lrs = [cosine_with_warmup(s, **kw) for s in range(10, 111)]
    assert all(x >= y for x, y in zip(lrs, lrs[1:]))  # monotone decay
    assert cosine_with_warmup(3, max_lr=1.0, warmup_steps=0, total_steps=0, min_lr=0.5) == 0.5
    assert constant(123, 3e-4) == 3e-4
    with pytest.raises(ValueError):
        cosine_with_warmup(0, max_lr=1.0, warmup_steps=10, total_steps=5)


# -- gradient accumulation -----------------------------------------------------------------------


def _mse(model, x, t):
    """mean over rows of the squared error, from arithmetic ops and .sum()."""
    err = model(Tensor(x)) - Tensor(t)
    return (err * err).sum() * (1.0 / x.shape[0])


def test_gradient_accumulation_matches_one_big_batch(rng):
    x = rng.standard_normal((8, 3))
    t = rng.standard_normal((8, 2))
    big = Linear(3, 2, generator=np.random.default_rng(0), dtype=np.float64)
    acc = Linear(3, 2, generator=np.random.default_rng(0), dtype=np.float64)
    opt_big = AdamW(big.named_parameters(), lr=1e-2, weight_decay=0.1)
    opt_acc = AdamW(acc.named_parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(2):
        opt_big.zero_grad()
        opt_acc.zero_grad()
        _mse(big, x, t).backward()
        for i in range(4):  # 4 micro-batches of 2 rows: loss / 4, backward each, grads add up
            (_mse(acc, x[2 * i:2 * i + 2], t[2 * i:2 * i + 2]) * 0.25).backward()
        for (name, p), (_, q) in zip(big.named_parameters(), acc.named_parameters()):
            np.testing.assert_allclose(q.grad, p.grad, rtol=1e-12, atol=1e-12, err_msg=name)
        opt_big.step()
        opt_acc.step()
        for (name, p), (_, q) in zip(big.named_parameters(), acc.named_parameters()):
            np.testing.assert_allclose(q.data, p.data, rtol=1e-12, atol=1e-12, err_msg=name)
    # and the gradient itself is right: d/dW mean_rows |x W + b - t|^2 = 2 x^T (y - t) / n
    y = x @ big.weight.data + big.bias.data
    big.zero_grad()
    _mse(big, x, t).backward()
    np.testing.assert_allclose(big.weight.grad, 2 * x.T @ (y - t) / 8, rtol=1e-12)
