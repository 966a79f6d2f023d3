"""Activation recomputation (nn.recompute, GPT.recompute, --recompute): the plain run's gradients, dropout replayed."""

import numpy as np
import pytest

import autograd
import nn
from autograd import gradcheck
from autograd import random as agrandom
from llm.model import GPT, GPTConfig


def tiny(dropout=0.0, dtype=np.float64, **kw):
    config = GPTConfig(vocab_size=29, block_size=8, n_layer=2, n_head=2, n_embd=12, dropout=dropout, **kw)
    return GPT(config, generator=np.random.default_rng(0), dtype=dtype)


def grads(model, x, y):
    agrandom.manual_seed(5)
    _, loss = model(x, targets=y)
    loss.backward()
    out = {n: p.grad.copy() for n, p in model.named_parameters()}
    model.zero_grad()
    return float(loss.item()), out


@pytest.mark.parametrize("kw", [{}, dict(mlp="swiglu", norm="rmsnorm", pos="rope", bias=False, n_kv_head=1)],
                         ids=["gpt2", "llama"])
def test_gradients_equal_the_plain_run(rng, kw):
    x = rng.integers(0, 29, (3, 8))
    y = rng.integers(0, 29, (3, 8))
    model = tiny(**kw)
    loss, plain = grads(model, x, y)
    model.recompute = True
    loss_r, recomputed = grads(model, x, y)
    assert loss_r == loss
    for name in plain:
        np.testing.assert_allclose(recomputed[name], plain[name], rtol=1e-12, atol=1e-15, err_msg=name)


def test_dropout_masks_are_replayed_in_backward(rng):
    """With dropout the recomputed forward must draw the forward's masks, or the gradient is not the loss's."""
    x = rng.integers(0, 29, (2, 8))
    y = rng.integers(0, 29, (2, 8))
    model = tiny(dropout=0.3)
    model.recompute = True
    emb = autograd.Tensor(model.wte.weight.data.copy(), requires_grad=True)

    def loss_of(table):  # the model's forward with the token table as the checked input
        agrandom.manual_seed(11)  # the same masks at every evaluation of the loss
        h = autograd.embedding(table, x) + model.wpe.weight[0:8]
        for block in model._blocks():
            h = nn.recompute(block, h)
        logits = model.ln_f(h) @ table.transpose(1, 0)
        return autograd.cross_entropy(logits.reshape(-1, 29), y.reshape(-1))

    gradcheck(loss_of, emb, atol=1e-7, rtol=1e-4)


def test_block_parameters_get_their_gradient_hooks_once(rng):
    """Data parallelism starts a bucket's all-reduce from these hooks: they fire in the nested backward."""
    model = tiny()
    model.recompute = True
    fired = []
    p = model.h[1].mlp.c_fc.weight
    p.register_post_accumulate_grad_hook(lambda t: fired.append(t.grad.copy()))
    x = rng.integers(0, 29, (2, 8))
    _, loss = model(x, targets=x)
    loss.backward()
    assert len(fired) == 1 and np.array_equal(fired[0], p.grad)


def test_no_grad_and_eval_are_plain_forwards(rng):
    model = tiny(dropout=0.1)
    model.recompute = True
    x = rng.integers(0, 29, (2, 8))
    model.eval()
    with autograd.no_grad():
        logits, _ = model(x)
    model.recompute = False
    with autograd.no_grad():
        plain, _ = model(x)
    assert np.array_equal(logits.data, plain.data)
