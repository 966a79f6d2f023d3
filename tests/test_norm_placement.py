"""Norm placement (``GPTConfig.norm_placement``, ``nn.Block(norm_placement=...)``): pre, post and none.

Like every layer: gradient-checked (float64 ``gradcheck`` over the input and
every parameter), and equal, forward and backward, to the same block built
from primitive autograd ops (matmul, softmax, tanh, mean, var, sqrt). The
whole GPT is compared with a plain float64 NumPy forward, so the placement of
every norm (and the missing ``ln_f`` of post-norm) is pinned independently of
the engine. Then the config: the default is unchanged, old checkpoints load,
the flag and the parameter counts follow the placement.
"""

import dataclasses
import math

import numpy as np
import pytest

import autograd
from autograd import Tensor, gradcheck
from autograd.backend import to_device
from nn.layers.block import Block
from nn.module import functional_call

PLACEMENTS = ["pre", "post", "none"]


def cpu(a):
    return np.array(to_device(a.data if isinstance(a, Tensor) else a, "cpu"))


def leaf(xp, a):
    return Tensor(xp.asarray(np.asarray(a, dtype=np.float64)), requires_grad=True)


def float64_block(xp, rng, **kwargs):
    """A small Block in float64 on xp's device, every weight random (gains near 1) so no term hides behind 0 or 1."""
    blk = Block(8, 2, mlp_hidden_dim=12, n_layer=2, generator=np.random.default_rng(0), **kwargs)
    blk.to(np.float64).to("cpu" if xp is np else "cuda")
    for name, p in blk.named_parameters():
        value = 1 + 0.2 * rng.standard_normal(p.shape) if ".weight" in name and "ln_" in name \
            else 0.5 * rng.standard_normal(p.shape)
        p.data[...] = xp.asarray(value)
    return blk


# ---------------------------------------------------------------------------
# the block from primitive ops (the independent reference)
# ---------------------------------------------------------------------------


def norm_ref(x, p, prefix, norm, eps):
    if norm == "layernorm":
        y = (x - x.mean(axis=-1, keepdims=True)) / autograd.sqrt(x.var(axis=-1, keepdims=True) + eps)
        return y * p[prefix + ".weight"] + p[prefix + ".bias"]
    return x / autograd.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * p[prefix + ".weight"]


def attention_ref(x, p, n_head):
    B, T, C = x.shape
    hd = C // n_head
    qkv = x @ p["attn.c_attn.weight"] + p["attn.c_attn.bias"]  # (B, T, 3C)
    q, k, v = (qkv[..., i * C:(i + 1) * C].reshape(B, T, n_head, hd).transpose(0, 2, 1, 3)  # (B, nh, T, hd)
               for i in range(3))
    scores = (q @ k.swapaxes(-1, -2)) * (1.0 / math.sqrt(hd))  # (B, nh, T, T)
    future = np.triu(np.ones((T, T), dtype=bool), k=1)
    xp = autograd.get_array_module(x.data)
    att = autograd.softmax(autograd.where(xp.asarray(future), -1e9, scores), axis=-1)
    y = (att @ v).transpose(0, 2, 1, 3).reshape(B, T, C)  # (B, nh, T, hd) -> (B, T, nh, hd) -> (B, T, C)
    return y @ p["attn.c_proj.weight"] + p["attn.c_proj.bias"]


def mlp_ref(x, p):
    h = x @ p["mlp.c_fc.weight"] + p["mlp.c_fc.bias"]
    h = 0.5 * h * (1.0 + autograd.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h * h * h)))  # tanh GELU
    return h @ p["mlp.c_proj.weight"] + p["mlp.c_proj.bias"]


def block_ref(x, p, placement, norm, eps, n_head=2):
    """One block by the textbook formulas of each placement, from primitive ops only."""
    if placement == "pre":
        x = x + attention_ref(norm_ref(x, p, "ln_1", norm, eps), p, n_head)
        return x + mlp_ref(norm_ref(x, p, "ln_2", norm, eps), p)
    if placement == "post":
        x = norm_ref(x + attention_ref(x, p, n_head), p, "ln_1", norm, eps)
        return norm_ref(x + mlp_ref(x, p), p, "ln_2", norm, eps)
    x = x + attention_ref(x, p, n_head)
    return x + mlp_ref(x, p)


# ---------------------------------------------------------------------------
# the block
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_block_gradcheck(xp, rng, placement, norm):
    blk = float64_block(xp, rng, norm=norm, norm_placement=placement)
    names = [n for n, _ in blk.named_parameters()]
    params = [Tensor(p.data, requires_grad=True) for _, p in blk.named_parameters()]
    x = leaf(xp, rng.standard_normal((2, 4, 8)))
    assert gradcheck(lambda x, *ps: functional_call(blk, dict(zip(names, ps)), x), x, *params)


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_block_equals_its_composition_from_primitives(xp, rng, placement, norm):
    """Forward and every gradient (input and parameters) of the fused block equal the primitive composition."""
    blk = float64_block(xp, rng, norm=norm, norm_placement=placement)
    x = rng.standard_normal((2, 5, 8))
    g = rng.standard_normal((2, 5, 8))  # an arbitrary cotangent: every output element weighs differently
    xa, xb = leaf(xp, x), leaf(xp, x)
    ya = blk(xa)
    (ya * Tensor(xp.asarray(g))).sum().backward()
    params = {n: Tensor(p.data.copy(), requires_grad=True) for n, p in blk.named_parameters()}
    yb = block_ref(xb, params, placement, norm, blk.ln_1.eps if blk.ln_1 is not None else 0.0)
    (yb * Tensor(xp.asarray(g))).sum().backward()
    np.testing.assert_allclose(cpu(ya), cpu(yb), rtol=0, atol=1e-10)
    np.testing.assert_allclose(cpu(xa.grad), cpu(xb.grad), rtol=0, atol=1e-9)
    for n, p in blk.named_parameters():
        np.testing.assert_allclose(cpu(p.grad), cpu(params[n].grad), rtol=0, atol=1e-9, err_msg=n)


def test_the_placements_differ_and_none_has_no_norms(rng):
    """The three placements are three functions (a placement that silently fell back to pre would pass above)."""
    x = rng.standard_normal((1, 4, 8))
    outs = {}
    for placement in PLACEMENTS:
        blk = float64_block(np, np.random.default_rng(5), norm_placement=placement)
        outs[placement] = cpu(blk(leaf(np, x)))
        names = [n for n, _ in blk.named_parameters()]
        assert any(n.startswith("ln_") for n in names) == (placement != "none"), placement
    assert not np.allclose(outs["pre"], outs["post"]) and not np.allclose(outs["pre"], outs["none"])
    # post-norm's output is normalised: every row has mean ln_2.bias-ish and unit spread before the gain
    blk = float64_block(np, np.random.default_rng(5), norm_placement="post")
    y = cpu(blk(leaf(np, x)))
    xhat = (y - cpu(blk.ln_2.bias)) / cpu(blk.ln_2.weight)
    np.testing.assert_allclose(xhat.mean(-1), 0, atol=1e-9)
    np.testing.assert_allclose(xhat.var(-1), 1, atol=1e-4)
    with pytest.raises(ValueError, match="norm_placement must be one of"):
        Block(8, 2, norm_placement="sandwich")


# ---------------------------------------------------------------------------
# the GPT: against a plain float64 NumPy forward
# ---------------------------------------------------------------------------


def np_norm(x, w, b, norm, eps):
    if norm == "layernorm":
        y = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)
        return y * w + b
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def np_gpt_logits(p, ids, n_layer, n_head, norm, placement, eps):
    """Logits of a GPT-2-style model with the given norm placement, in plain float64 NumPy (tied head)."""
    x = p["wte.weight"][ids] + p["wpe.weight"][:ids.shape[1]]  # (B, T, C)
    B, T, C = x.shape
    hd = C // n_head
    mask = np.tril(np.ones((T, T), dtype=bool))

    def ln(x, name):
        return np_norm(x, p[name + ".weight"], p.get(name + ".bias"), norm, eps)

    def attn(x, h):
        qkv = x @ p[h + "attn.c_attn.weight"] + p[h + "attn.c_attn.bias"]
        q, k, v = (qkv[..., i * C:(i + 1) * C].reshape(B, T, n_head, hd).transpose(0, 2, 1, 3) for i in range(3))
        s = np.where(mask, q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd), -np.inf)  # (B, nh, T, T)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        y = (a @ v).transpose(0, 2, 1, 3).reshape(B, T, C)  # (B, T, C)
        return y @ p[h + "attn.c_proj.weight"] + p[h + "attn.c_proj.bias"]

    def mlp(x, h):
        u = x @ p[h + "mlp.c_fc.weight"] + p[h + "mlp.c_fc.bias"]
        u = 0.5 * u * (1 + np.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u ** 3)))
        return u @ p[h + "mlp.c_proj.weight"] + p[h + "mlp.c_proj.bias"]

    for layer in range(n_layer):
        h = f"h.{layer}."
        if placement == "pre":
            x = x + attn(ln(x, h + "ln_1"), h)
            x = x + mlp(ln(x, h + "ln_2"), h)
        elif placement == "post":
            x = ln(x + attn(x, h), h + "ln_1")
            x = ln(x + mlp(x, h), h + "ln_2")
        else:
            x = x + attn(x, h)
            x = x + mlp(x, h)
    if placement == "pre":
        x = ln(x, "ln_f")
    return x @ p["wte.weight"].T  # (B, T, V)


def tiny_gpt(placement, norm="layernorm", dtype=np.float64, seed=0, **kw):
    from llm.model import GPT, GPTConfig

    config = GPTConfig(vocab_size=23, block_size=8, n_layer=3, n_head=2, n_embd=8, norm=norm,
                       norm_placement=placement, **kw)
    model = GPT(config, generator=np.random.default_rng(seed), dtype=dtype)
    r = np.random.default_rng(seed + 1)
    for name, prm in model.named_parameters():  # weights large enough that every layer matters
        scale = 1 + 0.2 * r.standard_normal(prm.shape) if "ln_" in name and name.endswith("weight") \
            else 0.4 * r.standard_normal(prm.shape)
        prm.data = scale.astype(dtype)
    return model


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_gpt_logits_equal_a_plain_numpy_forward(rng, placement, norm):
    model = tiny_gpt(placement, norm)
    ids = rng.integers(0, 23, (2, 8))
    p = {k: cpu(v) for k, v in model.state_dict().items()}
    expected = np_gpt_logits(p, ids, 3, 2, norm, placement, model.config.norm_eps)
    logits, _ = model(ids)
    np.testing.assert_allclose(cpu(logits), expected, rtol=0, atol=1e-10)
    assert ("ln_f.weight" in p) == (placement == "pre")


@pytest.mark.parametrize("placement", ["post", "none"])
def test_gpt_gradcheck(rng, placement):
    model = tiny_gpt(placement)
    ids = rng.integers(0, 23, (2, 6))
    targets = rng.integers(0, 23, (2, 6))
    names = [n for n, _ in model.named_parameters()]
    params = [Tensor(p.data, requires_grad=True) for _, p in model.named_parameters()]
    assert gradcheck(lambda *ps: functional_call(model, dict(zip(names, ps)), ids, targets)[1], *params)


@pytest.mark.parametrize("placement", ["post", "none"])
def test_kv_cache_and_pipeline_stages_give_the_full_forward(rng, placement):
    from autograd import no_grad

    model = tiny_gpt(placement)
    ids = rng.integers(0, 23, (2, 8))
    with no_grad():
        full = cpu(model(ids)[0])
        caches = model.new_kv_caches()
        steps = [cpu(model(ids[:, :5], kv_caches=caches)[0])] + \
                [cpu(model(ids[:, t:t + 1], kv_caches=caches)[0]) for t in range(5, 8)]
        np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=0, atol=1e-10)
        layout = [range(0, 1), range(1, 3)]
        first, last = model.pipeline_stage(0, layout), model.pipeline_stage(1, layout)
        np.testing.assert_allclose(cpu(last(first(ids))[0]), full, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------
# the config, its flag, its counts, old checkpoints
# ---------------------------------------------------------------------------


def test_default_is_pre_and_bad_values_are_clear():
    from llm.model import PRESETS, GPTConfig, get_preset

    assert GPTConfig().norm_placement == "pre"
    assert all(c.norm_placement == "pre" for c in PRESETS.values())
    with pytest.raises(ValueError, match=r"norm_placement must be one of \('pre', 'post', 'none'\), got 'postln'"):
        get_preset("tiny", norm_placement="postln")


def test_a_checkpoint_without_the_field_loads_as_pre(tmp_path):
    """Checkpoints written before norm_placement existed store a config without it: they load as pre-norm."""
    from llm.checkpoint import load_checkpoint, load_model, save_checkpoint, save_model
    from llm.model import GPT, get_preset

    model = GPT(get_preset("tiny", vocab_size=50, n_layer=1), generator=np.random.default_rng(0))
    save_model(tmp_path / "new.safetensors", model)
    tensors, metadata = load_checkpoint(tmp_path / "new.safetensors")
    del metadata["config"]["norm_placement"]  # what an older version wrote
    save_checkpoint(tmp_path / "old.safetensors", tensors, {k: v for k, v in metadata.items() if "sha256" not in k})
    old, _, _ = load_model(tmp_path / "old.safetensors")
    assert old.config.norm_placement == "pre" and old.ln_f is not None
    np.testing.assert_array_equal(cpu(old.ln_f.weight), cpu(model.ln_f.weight))
    post = GPT(get_preset("tiny", vocab_size=50, n_layer=1, norm_placement="post"), generator=np.random.default_rng(0))
    save_model(tmp_path / "post.safetensors", post)
    loaded, _, _ = load_model(tmp_path / "post.safetensors")
    assert loaded.config.norm_placement == "post" and loaded.ln_f is None


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("norm,bias", [("layernorm", True), ("layernorm", False), ("rmsnorm", False)])
def test_parameter_counts_and_stage_layout_follow_the_placement(placement, norm, bias):
    from llm.model import GPT, get_preset
    from llm.sizing import count_parameters
    from llm.trainer.layout import block_parameters, stage_layout

    config = get_preset("tiny", vocab_size=64, n_layer=4, norm=norm, bias=bias, norm_placement=placement)
    model = GPT(config, generator=np.random.default_rng(0))
    assert count_parameters(config) == sum(p.size for p in model.parameters())
    assert block_parameters(config) == sum(p.size for p in model.h[0].parameters())
    assert [len(r) for r in stage_layout(config, 2)] in ([2, 2], [3, 1])


def test_the_flag_sets_the_field():
    import argparse

    from llm.model_flags import FIELD_FLAGS, add_model_flags, config_from_args

    assert "norm_placement" in FIELD_FLAGS
    parser = add_model_flags(argparse.ArgumentParser())
    config = config_from_args(parser.parse_args(["--norm-placement", "post", "--norm", "rmsnorm"]), vocab_size=40)
    assert (config.norm_placement, config.norm) == ("post", "rmsnorm")
    assert config_from_args(parser.parse_args([]), vocab_size=40).norm_placement == "pre"
    with pytest.raises(SystemExit):
        parser.parse_args(["--norm-placement", "middle"])
