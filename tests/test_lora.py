"""LoRA: the output at the start is the base model's, gradients pass gradcheck, merge is W + (alpha/r) A B and
unmerge restores W bit for bit, only A and B train, and a target that matches nothing is a clear error."""

import numpy as np
import pytest

import nn
from autograd import Tensor, gradcheck, no_grad
from llm.model import GPT, get_preset
from nn import LoRALinear, apply_lora, lora_disabled, lora_layers, lora_state_dict, merged_state_dict


def tiny(dtype=np.float64, tied=True):
    config = get_preset("tiny", vocab_size=40, n_layer=2, n_head=2, n_embd=16, block_size=12, tie_embeddings=tied)
    return GPT(config, generator=np.random.default_rng(0), dtype=dtype)


def ids(rng, B=3, T=10):
    return rng.integers(0, 40, (B, T))


def randomise_b(model, rng):
    """Give every adapter a non-zero B (after training it would be)."""
    for _, layer in lora_layers(model):
        layer.lora_B.data[...] = rng.standard_normal(layer.lora_B.shape) * 0.1


def test_at_the_start_the_output_is_exactly_the_base_models(rng):
    model = tiny()
    x = ids(rng)
    with no_grad():
        before = model(x)[0].data.copy()
    adapted = apply_lora(model, ["c_attn", "c_proj"], rank=4, alpha=8, generator=np.random.default_rng(1))
    assert adapted == ["h.0.attn.c_attn", "h.0.attn.c_proj", "h.0.mlp.c_proj",
                       "h.1.attn.c_attn", "h.1.attn.c_proj", "h.1.mlp.c_proj"]
    with no_grad():
        after = model(x)[0].data
    assert np.array_equal(before, after)  # B = 0: the update is exactly zero


def test_only_the_adapters_train_and_their_count_is_r_times_in_plus_out():
    model = tiny()
    adapted = apply_lora(model, "attn.c_attn,mlp.c_fc", rank=3, alpha=6)
    assert adapted == ["h.0.attn.c_attn", "h.0.mlp.c_fc", "h.1.attn.c_attn", "h.1.mlp.c_fc"]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == [f"{a}.lora_{m}" for a in adapted for m in "AB"]
    # c_attn: 16 -> 48, c_fc: 16 -> 64
    assert model.num_parameters(trainable_only=True) == 2 * (3 * (16 + 48) + 3 * (16 + 64))
    names = [n for n, _ in model.named_parameters()]
    assert "h.0.attn.c_attn.weight" in names and "h.0.attn.c_attn.bias" in names  # the base keeps its names


def test_a_target_that_matches_no_layer_is_a_clear_error():
    model = tiny()
    with pytest.raises(ValueError, match=r"q_proj match no linear layer.*c_attn, c_fc, c_proj"):
        apply_lora(model, ["c_attn", "q_proj"], rank=2, alpha=2)
    assert all(p.requires_grad for p in model.parameters())  # nothing was changed
    with pytest.raises(ValueError, match="at least one target"):
        apply_lora(model, "", rank=2, alpha=2)
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        apply_lora(model, "c_attn", rank=0, alpha=2)


def test_lora_linear_gradients_pass_gradcheck(rng):
    base = nn.Linear(5, 7, generator=rng, dtype=np.float64)
    layer = LoRALinear(base, rank=3, alpha=6.0, generator=rng)
    layer.lora_B.data[...] = rng.standard_normal((3, 7))
    x = Tensor(rng.standard_normal((2, 4, 5)), requires_grad=True)
    A = Tensor(layer.lora_A.data.copy(), requires_grad=True)
    B = Tensor(layer.lora_B.data.copy(), requires_grad=True)
    gradcheck(lambda x, A, B: nn.functional_call(layer, {"lora_A": A, "lora_B": B}, x), x, A, B)
    out = layer(x)
    out.sum().backward()
    assert layer.weight.grad is None and layer.bias.grad is None  # frozen: no gradient is even computed
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None


def test_the_update_is_scaled_by_alpha_over_r(rng):
    base = nn.Linear(5, 7, generator=rng, dtype=np.float64)
    layer = LoRALinear(base, rank=2, alpha=3.0, generator=rng)
    layer.lora_B.data[...] = rng.standard_normal((2, 7))
    x = rng.standard_normal((4, 5))
    want = x @ base.weight.data + base.bias.data + 1.5 * (x @ layer.lora_A.data @ layer.lora_B.data)
    np.testing.assert_allclose(layer(Tensor(x)).data, want, rtol=1e-12, atol=1e-12)


def test_merge_is_w_plus_scaled_ab_and_unmerge_restores_w_bit_for_bit(rng):
    model = tiny()
    apply_lora(model, ["c_attn", "c_proj"], rank=4, alpha=8, generator=np.random.default_rng(1))
    randomise_b(model, rng)
    x = ids(rng)
    with no_grad():
        unmerged_out = model(x)[0].data.copy()
    originals = {n: m.weight.data.copy() for n, m in lora_layers(model)}
    merged = merged_state_dict(model)
    for name, layer in lora_layers(model):
        want = originals[name] + 2.0 * (layer.lora_A.data @ layer.lora_B.data)
        np.testing.assert_allclose(merged[f"{name}.weight"], want, rtol=0, atol=1e-14)
        assert np.array_equal(layer.weight.data, originals[name])  # merged_state_dict changed nothing
        layer.merge()
        np.testing.assert_allclose(layer.weight.data, want, rtol=0, atol=1e-14)
    with no_grad():
        merged_out = model(x)[0].data.copy()
    np.testing.assert_allclose(merged_out, unmerged_out, rtol=1e-10, atol=1e-12)
    for name, layer in lora_layers(model):
        layer.unmerge()
        assert np.array_equal(layer.weight.data, originals[name])
    with pytest.raises(RuntimeError, match="not merged"):
        lora_layers(model)[0][1].unmerge()
    # the merged weights load into a plain GPT and give the same logits
    plain = tiny()
    plain.load_state_dict(merged)
    with no_grad():
        np.testing.assert_allclose(plain(x)[0].data, unmerged_out, rtol=1e-10, atol=1e-12)


def test_disabled_adapters_give_the_base_model(rng):
    model = tiny()
    x = ids(rng)
    with no_grad():
        base_out = model(x)[0].data.copy()
    apply_lora(model, ["c_attn", "c_fc"], rank=2, alpha=4)
    randomise_b(model, rng)
    with no_grad():
        assert not np.allclose(model(x)[0].data, base_out)
        with lora_disabled(model):
            assert np.array_equal(model(x)[0].data, base_out)
        assert not np.allclose(model(x)[0].data, base_out)
    assert all(m.enabled for _, m in lora_layers(model))


def test_training_changes_only_a_and_b_and_keeps_no_state_for_frozen_weights(rng):
    model = tiny(np.float32)
    apply_lora(model, ["c_attn", "c_proj"], rank=4, alpha=8, dropout=0.1, generator=np.random.default_rng(1))
    frozen = {n: p.data.copy() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = {k: v.copy() for k, v in lora_state_dict(model).items()}
    opt = nn.optim.AdamW(nn.optim.param_groups_for_gpt(model, 0.1), lr=1e-2)
    x = ids(rng)
    for _ in range(3):
        _, loss = model(x[:, :-1], targets=x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(np.array_equal(p.data, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert all(not np.array_equal(v, adapters[k]) for k, v in lora_state_dict(model).items())
    assert set(opt.state_dict()["state"]) == set(adapters)


def test_dropout_is_on_the_update_only(rng):
    base = nn.Linear(6, 6, generator=rng)
    layer = LoRALinear(base, rank=2, alpha=2.0, dropout=0.5, generator=rng)
    layer.lora_B.data[...] = 1.0
    x = Tensor(rng.standard_normal((8, 6)).astype(np.float32))
    train_out = layer(x).data
    layer.eval()
    eval_out = layer(x).data
    layer.enabled = False
    base_out = layer(x).data
    assert not np.allclose(train_out, eval_out)
    assert np.array_equal(base_out, base(x).data)
