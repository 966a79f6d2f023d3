"""The CPU worker threads (autograd/threads.py): every piece runs once, errors come back, and results do not
depend on the number of threads, down to the bit, from a single op up to a whole GPT training step."""

import numpy as np
import pytest
from threadpoolctl import threadpool_info

import autograd
from autograd import threads
from autograd.gradcheck import gradcheck


@pytest.fixture
def restore_threads():
    before = threads.num_threads()
    yield
    threads.set_num_threads(before)


def _blas_threads():
    return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]


@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_run_calls_every_piece_once(restore_threads, n_threads):
    threads.set_num_threads(n_threads)
    for n_pieces in (0, 1, 2, 7, 100):
        seen = np.zeros(n_pieces, dtype=np.int64)

        def work(i):
            seen[i] += 1

        threads.run(n_pieces, work)
        assert seen.tolist() == [1] * n_pieces


def test_an_error_in_a_piece_reaches_the_caller_and_the_pool_goes_on(restore_threads):
    threads.set_num_threads(2)

    def work(i):
        if i == 3:
            raise ValueError("piece 3 failed")

    with pytest.raises(ValueError, match="piece 3 failed"):
        threads.run(8, work)
    out = np.zeros(8)
    threads.run(8, lambda i: out.__setitem__(i, i))
    assert out.tolist() == list(range(8))


def test_run_inside_a_piece_is_a_plain_loop(restore_threads):
    threads.set_num_threads(2)
    out = np.zeros((4, 4))

    def outer(i):
        threads.run(4, lambda j: out.__setitem__((i, j), 10 * i + j))

    threads.run(4, outer)
    assert out.tolist() == [[10 * i + j for j in range(4)] for i in range(4)]


def test_set_num_threads_rejects_nonsense():
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="positive whole number"):
            threads.set_num_threads(bad)


def test_blas_runs_single_threaded_beside_the_pool_and_gets_its_threads_back(restore_threads):
    threads.set_num_threads(1)
    before = _blas_threads()
    threads.set_num_threads(2)
    threads.run(2, lambda i: None)  # starts the pool
    assert all(n == 1 for n in _blas_threads())
    threads.set_num_threads(1)
    assert _blas_threads() == before


@pytest.mark.parametrize("shape", [(7, 5, 3), (64, 33, 17), (300, 128, 384), (1000, 64, 10), (40, 16, 300)])
def test_matmul_in_row_blocks_equals_one_product_bitwise(restore_threads, shape):
    M, K, N = shape
    rng = np.random.default_rng(0)
    a = rng.standard_normal((M, K)).astype(np.float32)
    b = rng.standard_normal((K, N)).astype(np.float32)
    g = rng.standard_normal((M, N)).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    threads.set_num_threads(1)
    expect = [a @ b, a.T @ g, g @ b.T, a @ b + bias]
    for n in (2, 3):
        threads.set_num_threads(n)
        got = [threads.matmul(a, b), threads.matmul(a.T, g), threads.matmul(g, b.T), threads.matmul(a, b, bias=bias)]
        for e, r in zip(expect, got):
            assert r.dtype == np.float32 and np.array_equal(e, r)


def _gpt_step(n_threads):
    """Loss, every gradient and the weights after one AdamW step of a small GPT, run with ``n_threads``."""
    from llm.model import GPT, GPTConfig
    from nn.optim import AdamW

    threads.set_num_threads(n_threads)
    config = GPTConfig(vocab_size=97, block_size=130, n_layer=2, n_head=4, n_embd=64)
    model = GPT(config, generator=np.random.default_rng(0))
    ids = np.random.default_rng(1).integers(0, 97, size=(2, 131))
    opt = AdamW(model.named_parameters(), lr=1e-2)
    _, loss = model(ids[:, :-1], ids[:, 1:])
    loss.backward()
    grads = {n: p.grad.copy() for n, p in model.named_parameters()}
    opt.step()
    return float(loss.item()), grads, {n: p.data.copy() for n, p in model.named_parameters()}


def test_a_gpt_training_step_is_bitwise_the_same_on_two_or_three_threads(restore_threads):
    # batch 2: attention pieces per batch element on 2 threads, per (batch, head) pair on 3
    loss2, grads2, weights2 = _gpt_step(2)
    loss3, grads3, weights3 = _gpt_step(3)
    assert loss3 == loss2
    for name in grads2:
        assert np.array_equal(grads3[name], grads2[name]), f"gradient of {name} differs"
        assert np.array_equal(weights3[name], weights2[name]), f"{name} after AdamW differs"
    # one thread hands each whole product to BLAS's own threads, which may split its sums differently
    loss1, grads1, _ = _gpt_step(1)
    assert loss1 == pytest.approx(loss2, rel=1e-6)
    for name in grads2:
        np.testing.assert_allclose(grads1[name], grads2[name], rtol=1e-4, atol=1e-6 * np.abs(grads2[name]).max())


def test_ops_still_pass_gradcheck_on_several_threads(restore_threads):
    threads.set_num_threads(3)
    rng = np.random.default_rng(0)
    x = autograd.Tensor(rng.standard_normal((70, 2000)), requires_grad=True)  # several pieces of rows
    w = autograd.Tensor(rng.standard_normal(2000), requires_grad=True)
    b = autograd.Tensor(rng.standard_normal(2000), requires_grad=True)
    from nn.functional import layer_norm

    gradcheck(lambda x, w, b: layer_norm(x, w, b), x, w, b)
    gradcheck(lambda x: autograd.gelu(x, approximate="tanh"), x)


def test_default_thread_count_follows_the_environment(monkeypatch):
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMPI_COMM_WORLD_LOCAL_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert threads._default_num_threads() == cores
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", str(2 * cores))  # more ranks than cores: one thread each
    assert threads._default_num_threads() == 1
    monkeypatch.delenv("OMPI_COMM_WORLD_LOCAL_SIZE")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert threads._default_num_threads() == 1
