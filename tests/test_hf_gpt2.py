"""Hugging Face GPT-2 folders: save / load round trip, both naming schemes, and a float64 reference forward.

The reference is GPT-2 written out plainly in NumPy from the published architecture (Radford et al. 2019;
the layout of Hugging Face's ``GPT2Model`` checkpoints), reading the weights by their Hugging Face names,
independent of ``llm.model`` and ``nn``.
"""

import json
import math

import numpy as np
import pytest

from llm import safetensors as st
from llm.hf_gpt2 import HFCheckpointError, load_hf_gpt2, save_hf_gpt2
from llm.model import GPT, GPTConfig


def config(**kw):
    base = dict(vocab_size=53, block_size=12, n_layer=2, n_head=3, n_embd=24)
    base.update(kw)
    return GPTConfig(**base)


def random_model(cfg, seed=0, dtype=np.float32, scale=0.3):
    """A GPT whose every parameter (biases and norm parameters included) holds sizeable random values."""
    model = GPT(cfg, generator=np.random.default_rng(seed), dtype=dtype)
    rng = np.random.default_rng(seed + 100)
    for name, p in model.named_parameters():
        values = rng.standard_normal(p.shape) * scale
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            values += 1.0
        p.data[...] = values.astype(p.dtype)
    return model


# ---------------------------------------------------------------------------
# the independent reference
# ---------------------------------------------------------------------------


def ref_layer_norm(x, g, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * g + b


def ref_gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def ref_gelu_erf(x):
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def ref_gpt2_logits(w, hf_config, ids, gelu=ref_gelu_tanh):
    """GPT-2's forward in float64 on a dict of Hugging Face tensors (Conv1D weights are (in, out))."""
    w = {k[len("transformer."):] if k.startswith("transformer.") else k: v.astype(np.float64) for k, v in w.items()}
    C, H, L = hf_config["n_embd"], hf_config["n_head"], hf_config["n_layer"]
    eps = hf_config["layer_norm_epsilon"]
    B, T = ids.shape
    D = C // H
    x = w["wte.weight"][ids] + w["wpe.weight"][np.arange(T)]
    mask = np.triu(np.ones((T, T), dtype=bool), k=1)  # True above the diagonal: the future
    for i in range(L):
        p = f"h.{i}."
        a = ref_layer_norm(x, w[p + "ln_1.weight"], w[p + "ln_1.bias"], eps)
        qkv = a @ w[p + "attn.c_attn.weight"] + w[p + "attn.c_attn.bias"]
        q, k, v = qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:]
        out = np.zeros_like(q)
        for h in range(H):
            sl = slice(h * D, (h + 1) * D)
            s = q[..., sl] @ k[..., sl].transpose(0, 2, 1) / math.sqrt(D)
            s = np.where(mask, -np.inf, s)
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            out[..., sl] = s @ v[..., sl]
        x = x + out @ w[p + "attn.c_proj.weight"] + w[p + "attn.c_proj.bias"]
        m = ref_layer_norm(x, w[p + "ln_2.weight"], w[p + "ln_2.bias"], eps)
        m = gelu(m @ w[p + "mlp.c_fc.weight"] + w[p + "mlp.c_fc.bias"])
        x = x + m @ w[p + "mlp.c_proj.weight"] + w[p + "mlp.c_proj.bias"]
    x = ref_layer_norm(x, w["ln_f.weight"], w["ln_f.bias"], eps)
    return x @ w["wte.weight"].T


def test_our_model_matches_the_reference_gpt2_in_float64(tmp_path):
    cfg = config(norm_eps=1e-5)
    model = random_model(cfg, dtype=np.float64)
    save_hf_gpt2(model, tmp_path)
    hf_config = json.loads((tmp_path / "config.json").read_text())
    weights = st.load_file(tmp_path / "model.safetensors")
    assert weights["h.0.attn.c_attn.weight"].dtype == np.float64
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, cfg.block_size))
    expected = ref_gpt2_logits(weights, hf_config, ids)
    logits, _ = model(ids)
    assert logits.dtype == np.float64
    assert np.abs(expected).max() > 1.0  # a non-trivial function
    np.testing.assert_allclose(logits.data, expected, rtol=0, atol=1e-9)


def test_reference_is_sensitive_to_the_architecture(tmp_path):
    """The comparison above can fail: a wrong GELU (the exact erf form) or a transposed c_attn is detected."""
    cfg = config()
    model = random_model(cfg, dtype=np.float64)
    save_hf_gpt2(model, tmp_path)
    hf_config = json.loads((tmp_path / "config.json").read_text())
    weights = st.load_file(tmp_path / "model.safetensors")
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (1, 8))
    logits = model(ids)[0].data
    swapped = dict(weights)
    c = cfg.n_embd
    # q and k swapped inside c_attn: a layout error the comparison must catch
    w_attn = weights["h.0.attn.c_attn.weight"]
    swapped["h.0.attn.c_attn.weight"] = np.concatenate([w_attn[:, c:2 * c], w_attn[:, :c], w_attn[:, 2 * c:]], 1)
    assert np.abs(ref_gpt2_logits(swapped, hf_config, ids) - logits).max() > 1e-3
    # the exact-erf GELU instead of GPT-2's tanh approximation: a difference far above the 1e-9 tolerance
    assert np.abs(ref_gpt2_logits(weights, hf_config, ids, gelu=ref_gelu_erf) - logits).max() > 1e-6
    np.testing.assert_allclose(ref_gpt2_logits(weights, hf_config, ids), logits, rtol=0, atol=1e-9)


# ---------------------------------------------------------------------------
# save / load
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["", "transformer."])
def test_save_load_round_trip_identical_logits(tmp_path, prefix):
    model = random_model(config())
    save_hf_gpt2(model, tmp_path, prefix=prefix)
    names = st.read_header(tmp_path / "model.safetensors")[1]
    assert f"{prefix}h.1.attn.c_attn.weight" in names and "lm_head.weight" not in names
    loaded = load_hf_gpt2(tmp_path)
    ids = np.random.default_rng(2).integers(0, 53, (2, 12))
    np.testing.assert_array_equal(loaded(ids)[0].data, model(ids)[0].data)
    assert loaded.config == model.config


def test_config_json_has_gpt2_keys(tmp_path):
    save_hf_gpt2(random_model(config(mlp_hidden_dim=40)), tmp_path, eos_token_id=50)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "gpt2" and cfg["architectures"] == ["GPT2LMHeadModel"]
    assert (cfg["vocab_size"], cfg["n_positions"], cfg["n_embd"], cfg["n_layer"], cfg["n_head"]) == (53, 12, 24, 2, 3)
    assert cfg["n_inner"] == 40 and cfg["activation_function"] == "gelu_new" and cfg["eos_token_id"] == 50
    assert st.read_header(tmp_path / "model.safetensors")[0] == {"format": "pt"}


def write_hf_folder(folder, tensors, cfg_dict):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg_dict))
    st.save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def hf_style(model, prefix="transformer."):
    """The tensors as GPT2LMHeadModel's state dict has them: prefix, attention buffers, an lm_head copy of wte."""
    sd = {prefix + k: v.copy() for k, v in model.state_dict().items()}
    T = model.config.block_size
    for i in range(model.config.n_layer):
        sd[f"{prefix}h.{i}.attn.bias"] = np.tril(np.ones((T, T), np.float32))[None, None]
        sd[f"{prefix}h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    sd["lm_head.weight"] = model.wte.weight.data.copy()
    return sd


def hf_config_of(model):
    c = model.config
    return {"model_type": "gpt2", "vocab_size": c.vocab_size, "n_positions": c.block_size, "n_ctx": c.block_size,
            "n_embd": c.n_embd, "n_layer": c.n_layer, "n_head": c.n_head, "n_inner": None,
            "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "resid_pdrop": 0.1}


@pytest.mark.parametrize("prefix", ["", "transformer."])
def test_loads_files_in_the_wild_layout(tmp_path, prefix):
    model = random_model(config())
    write_hf_folder(tmp_path / "m", hf_style(model, prefix), hf_config_of(model))
    loaded = load_hf_gpt2(tmp_path / "m")
    ids = np.random.default_rng(3).integers(0, 53, (1, 9))
    np.testing.assert_array_equal(loaded(ids)[0].data, model(ids)[0].data)


def test_untied_lm_head_is_refused(tmp_path):
    model = random_model(config())
    sd = hf_style(model)
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1.0
    write_hf_folder(tmp_path, sd, hf_config_of(model))
    with pytest.raises(HFCheckpointError, match="lm_head.weight differs"):
        load_hf_gpt2(tmp_path)


def test_missing_and_wrong_tensors_are_listed(tmp_path):
    model = random_model(config())
    sd = hf_style(model, "")
    del sd["h.1.mlp.c_fc.bias"]
    sd["h.0.attn.c_proj.weight"] = sd["h.0.attn.c_proj.weight"][:, :5].copy()
    write_hf_folder(tmp_path, sd, hf_config_of(model))
    with pytest.raises(HFCheckpointError, match=r"(?s)h\.1\.mlp\.c_fc\.bias.*h\.0\.attn\.c_proj\.weight"):
        load_hf_gpt2(tmp_path)


def test_folder_problems_are_clear(tmp_path):
    with pytest.raises(HFCheckpointError, match="not a folder"):
        load_hf_gpt2(tmp_path / "nothing")
    with pytest.raises(HFCheckpointError, match="no config.json"):
        load_hf_gpt2(tmp_path)
    model = random_model(config())
    (tmp_path / "config.json").write_text(json.dumps(hf_config_of(model)))
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(HFCheckpointError, match="pickle"):
        load_hf_gpt2(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(hf_config_of(model), activation_function="relu")))
    with pytest.raises(HFCheckpointError, match="activation_function 'relu'"):
        load_hf_gpt2(tmp_path)


def test_non_gpt2_architecture_cannot_be_saved(tmp_path):
    llama = GPT(config(n_head=4, n_kv_head=2, mlp="swiglu", norm="rmsnorm", pos="rope", bias=False,
                       tie_embeddings=False, mlp_hidden_dim=32), generator=np.random.default_rng(0))
    with pytest.raises(HFCheckpointError, match="not a GPT-2 architecture.*mlp='swiglu'"):
        save_hf_gpt2(llama, tmp_path)


def test_reference_package_reads_our_hf_file(tmp_path):
    ref = pytest.importorskip("safetensors.numpy")
    model = random_model(config())
    save_hf_gpt2(model, tmp_path)
    theirs = ref.load_file(str(tmp_path / "model.safetensors"))
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(theirs[name], value)
