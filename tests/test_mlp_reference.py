"""An independent reference: a 2-layer MLP classifier, the engine against a hand-written NumPy backward.

    a = x @ W1 + b1,  h = act(a),  z = h @ W2 + b2,  L = mean_n -log softmax(z_n)[y_n]

The NumPy side derives every gradient by hand in float64:

    dz  = (softmax(z) - onehot(y)) / N
    dW2 = h^T dz,        db2 = sum_n dz
    dh  = dz W2^T,       da  = dh * act'(a)   (tanh: 1 - h^2;  relu: [a > 0])
    dW1 = x^T da,        db1 = sum_n da

and the engine's gradients must agree to rtol 1e-10. A few SGD steps then
check that the two stay together over a short training trajectory.
"""

import numpy as np
import pytest

import autograd
from autograd import Tensor, cross_entropy
from autograd.backend import to_device

N, D, H, K = 16, 10, 32, 5  # batch, inputs, hidden units, classes


def cpu(a):
    return to_device(a.data if isinstance(a, Tensor) else a, "cpu")


def make_problem(rng):
    x = rng.standard_normal((N, D))
    y = rng.integers(0, K, size=N)
    params = {
        "W1": rng.standard_normal((D, H)) / np.sqrt(D),
        "b1": rng.standard_normal(H) * 0.1,
        "W2": rng.standard_normal((H, K)) / np.sqrt(H),
        "b2": rng.standard_normal(K) * 0.1,
    }
    return x, y, params


def numpy_loss_and_grads(x, y, p, activation):
    """Forward and backward of the MLP in plain float64 NumPy, derived by hand."""
    a = x @ p["W1"] + p["b1"]  # (N, H)
    h = np.tanh(a) if activation == "tanh" else np.maximum(a, 0.0)  # (N, H)
    z = h @ p["W2"] + p["b2"]  # (N, K)
    zs = z - z.max(axis=1, keepdims=True)
    logp = zs - np.log(np.exp(zs).sum(axis=1, keepdims=True))  # (N, K)
    loss = -logp[np.arange(len(y)), y].mean()
    onehot = np.zeros_like(z)
    onehot[np.arange(len(y)), y] = 1.0
    dz = (np.exp(logp) - onehot) / len(y)  # (N, K)
    dh = dz @ p["W2"].T  # (N, H)
    da = dh * (1.0 - h ** 2) if activation == "tanh" else dh * (a > 0)  # (N, H)
    grads = {"W1": x.T @ da, "b1": da.sum(axis=0), "W2": h.T @ dz, "b2": dz.sum(axis=0)}
    return loss, grads


def engine_loss(x, y, t, activation):
    """The same MLP on the engine: ``t`` maps names to Tensors."""
    a = x @ t["W1"] + t["b1"]
    h = autograd.tanh(a) if activation == "tanh" else autograd.relu(a)
    return cross_entropy(h @ t["W2"] + t["b2"], y)


def engine_loss_and_grads(xp, x, y, params, activation, dtype=np.float64):
    t = {k: Tensor(xp.asarray(v.astype(dtype)), requires_grad=True) for k, v in params.items()}
    loss = engine_loss(Tensor(xp.asarray(x.astype(dtype))), xp.asarray(y), t, activation)
    loss.backward()
    return loss, {k: cpu(v.grad) for k, v in t.items()}


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_mlp_gradients_match_hand_written_numpy(xp, rng, activation):
    x, y, params = make_problem(rng)
    ref_loss, ref = numpy_loss_and_grads(x, y, params, activation)
    loss, grads = engine_loss_and_grads(xp, x, y, params, activation)
    assert loss.dtype == np.float64
    np.testing.assert_allclose(loss.item(), ref_loss, rtol=1e-12)
    for name in params:
        assert grads[name].shape == params[name].shape, name
        assert np.abs(ref[name]).max() > 1e-3, f"{name}: the reference gradient is trivially small"
        np.testing.assert_allclose(grads[name], ref[name], rtol=1e-10, atol=1e-13, err_msg=name)


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_mlp_float32_close_to_float64_reference(xp, rng, activation):
    x, y, params = make_problem(rng)
    ref_loss, ref = numpy_loss_and_grads(x, y, params, activation)
    loss, grads = engine_loss_and_grads(xp, x, y, params, activation, dtype=np.float32)
    assert loss.dtype == np.float32
    np.testing.assert_allclose(loss.item(), ref_loss, rtol=1e-5)
    for name in params:
        assert grads[name].dtype == np.float32, name
        np.testing.assert_allclose(grads[name], ref[name], rtol=1e-3, atol=1e-5, err_msg=name)


def test_mlp_sgd_trajectory_matches_numpy(xp, rng):
    """Ten SGD steps on both sides: the losses agree step by step and go down."""
    x, y, params = make_problem(rng)
    ref_params = {k: v.copy() for k, v in params.items()}
    t = {k: Tensor(xp.asarray(v.copy()), requires_grad=True) for k, v in params.items()}
    lr = 0.5
    ref_losses, losses = [], []
    for _ in range(10):
        ref_loss, ref_grads = numpy_loss_and_grads(x, y, ref_params, "tanh")
        for k in ref_params:
            ref_params[k] = ref_params[k] - lr * ref_grads[k]
        loss = engine_loss(Tensor(xp.asarray(x)), xp.asarray(y), t, "tanh")
        loss.backward()
        for k, v in t.items():
            v.data = v.data - lr * v.grad
            v.grad = None
        ref_losses.append(ref_loss)
        losses.append(loss.item())
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-10)
    assert losses[-1] < 0.7 * losses[0]
    for k in params:
        np.testing.assert_allclose(cpu(t[k]), ref_params[k], rtol=1e-9, atol=1e-12, err_msg=k)
