"""The CPU worker threads (autograd/threads.py) and the kernel API's cuts (autograd/kernels.py): every piece runs
once, errors come back, and results do not depend on the number of threads, down to the bit, from a single product up
to a whole GPT training step, on this machine's BLAS kernels and on others (OPENBLAS_CORETYPE)."""

import numpy as np
import pytest
from threadpoolctl import threadpool_info

import autograd
from autograd import kernels, threads
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


def test_blas_runs_single_threaded_whatever_the_thread_count(restore_threads):
    # autograd claims BLAS at import: a BLAS that splits one product over its own threads could round
    # differently with another thread count, and its spinning workers would slow ours
    for n in (1, 2, 3):
        threads.set_num_threads(n)
        threads.run(2, lambda i: None)
        assert all(k == 1 for k in _blas_threads()), _blas_threads()


SHAPES = [(7, 5, 3), (64, 33, 17), (300, 128, 384), (1000, 64, 10), (40, 16, 300), (1024, 128, 2048)]


def test_product_blocks_depend_on_the_shape_alone(restore_threads):
    for shape in SHAPES:
        cuts = set()
        for n in (1, 2, 3, 8):
            threads.set_num_threads(n)
            cuts.add(tuple(kernels.product_blocks(*shape)))
        assert len(cuts) == 1, f"{shape}: {cuts}"
        (blocks,) = cuts
        M, K, N = shape
        length = max(M, N)
        assert blocks[0][0] == 0 and blocks[-1][1] == length
        assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:])), blocks
        assert len(blocks) == 1 or (len(blocks) % kernels.PIECES_MULTIPLE == 0
                                    and min(b - a for a, b in blocks) >= kernels.MIN_BLOCK), blocks


@pytest.mark.parametrize("shape", SHAPES)
def test_products_in_blocks_match_one_product_and_are_the_same_bits_on_any_thread_count(restore_threads, shape):
    M, K, N = shape
    rng = np.random.default_rng(0)
    a = rng.standard_normal((M, K)).astype(np.float32)
    b = rng.standard_normal((K, N)).astype(np.float32)
    g = rng.standard_normal((M, N)).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)

    def products():
        return [kernels.matmul(a, b), kernels.matmul(a.T, g), kernels.matmul(g, b.T), kernels.matmul(a, b, bias=bias)]

    # against one uncut product: a tolerance (two BLAS calls that cut a product differently may round differently)
    a64, b64, g64 = (x.astype(np.float64) for x in (a, b, g))
    exact = [a64 @ b64, a64.T @ g64, g64 @ b64.T, a64 @ b64 + bias]
    threads.set_num_threads(1)
    one = products()
    for e, r in zip(exact, one):
        assert r.dtype == np.float32
        np.testing.assert_allclose(r, e, rtol=1e-4, atol=1e-4 * np.sqrt(K + max(M, N)))
    # between thread counts: the same cut, so the same bits
    for n in (2, 3):
        threads.set_num_threads(n)
        for r1, rn in zip(one, products()):
            assert np.array_equal(r1, rn), f"{n} threads differ from one"


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


def test_a_gpt_training_step_is_bitwise_the_same_on_one_two_or_three_threads(restore_threads):
    # batch 2 < 4: attention is cut into (batch, head) cells; the products into blocks of rows
    loss1, grads1, weights1 = _gpt_step(1)
    for n in (2, 3):
        loss_n, grads_n, weights_n = _gpt_step(n)
        assert loss_n == loss1
        for name in grads1:
            assert np.array_equal(grads_n[name], grads1[name]), f"gradient of {name} differs on {n} threads"
            assert np.array_equal(weights_n[name], weights1[name]), f"{name} after AdamW differs on {n} threads"


#: what the determinism tests run again in a fresh interpreter under another OpenBLAS kernel
_UNDER_CORETYPE = """
import sys
sys.path.insert(0, {root!r})
import tests.test_threads as t
from autograd import kernels, threads
for shape in t.SHAPES:
    t.test_products_in_blocks_match_one_product_and_are_the_same_bits_on_any_thread_count(None, shape)
t.test_a_gpt_training_step_is_bitwise_the_same_on_one_two_or_three_threads(None)
from threadpoolctl import threadpool_info
print("kernel:", [i.get("architecture") for i in threadpool_info() if i["user_api"] == "blas"])
"""


@pytest.mark.parametrize("coretype", [None, "Haswell", "Prescott"])
def test_determinism_holds_under_other_openblas_kernels(coretype):
    """The claims above hold on the BLAS kernels other machines run (OPENBLAS_CORETYPE), not just this one's."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parent.parent)
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    if coretype is not None:
        env["OPENBLAS_CORETYPE"] = coretype
    proc = subprocess.run([sys.executable, "-c", _UNDER_CORETYPE.format(root=root)], env=env, cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"OPENBLAS_CORETYPE={coretype}:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    assert "kernel:" in proc.stdout


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
