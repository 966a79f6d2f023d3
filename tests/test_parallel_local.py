"""parallel/ without mpirun: the world-size-1 stand-in, bucket and shard layouts, and fail-fast.

These run in the plain pytest run. The fail-fast tests start a nested
``mpirun -n 2`` of a small script in which rank 1 raises, and check that the
whole job ends within seconds with the rank's message and a non-zero status.
"""

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import autograd
import nn
from autograd.backend import to_device
from nn.amp import DynamicLossScaler, MixedPrecision
from parallel import (Communicator, DataParallel, FlatLayout, ShardedMasters, abort_on_error, agree_found_inf,
                      assign_buckets, check_replicas_agree, global_token_count, install_excepthook, is_rank0,
                      make_grid, rank0_print)
from parallel import comm as comm_mod
from parallel.ddp import bucket_dtype

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def solo():
    """The one-process stand-in (no MPI at all)."""
    return Communicator()


# ---------------------------------------------------------------------------
# the stand-in communicator: every collective
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.int64])
def test_standin_collectives(solo, rng, xp, dtype):
    x = xp.asarray((rng.standard_normal(7) * 10).astype(dtype))
    want = to_device(x, "cpu")
    assert solo.rank == 0 and solo.size == 1 and not solo.is_mpi
    for op in ("sum", "max", "min") + (("mean",) if np.dtype(dtype).kind == "f" else ()):
        out = solo.allreduce(x, op=op)
        assert out is not x and out.dtype == x.dtype and np.array_equal(to_device(out, "cpu"), want), op
    y = x.copy()
    assert solo.allreduce(y, op="sum", inplace=True) is y and np.array_equal(to_device(y, "cpu"), want)
    assert solo.iallreduce(y).wait() is y
    assert solo.bcast(y) is y and np.array_equal(to_device(y, "cpu"), want)
    gathered = solo.allgather(x)
    assert gathered.shape == (1, 7) and np.array_equal(to_device(gathered[0], "cpu"), want)
    chunk = solo.reduce_scatter(x)
    assert chunk.shape == (7,) and chunk.dtype == x.dtype and np.array_equal(to_device(chunk, "cpu"), want)
    if np.dtype(dtype).kind == "f":
        assert np.array_equal(to_device(solo.reduce_scatter(x, op="mean"), "cpu"), want)


def test_standin_messages_to_self_go_through_the_host(solo, xp):
    """On CuPy this is the staging path: device -> host copy -> (mailbox) -> host buffer -> device."""
    payload = xp.arange(300_000, dtype=np.float32)
    solo.send(payload, dest=0, tag=4)
    got = solo.recv(xp.empty_like(payload), source=0, tag=4)
    assert np.array_equal(to_device(got, "cpu"), to_device(payload, "cpu"))
    out = xp.empty(5, dtype=np.float16)
    req = solo.irecv(out, source=0, tag=1)
    solo.isend(xp.arange(5, dtype=np.float16), dest=0, tag=1).wait()
    assert req.wait() is out and np.array_equal(to_device(out, "cpu"), np.arange(5)) and req.test()


def test_standin_objects_scalars_and_groups(solo):
    assert solo.allreduce(3) == 3 and solo.allreduce(2.5, op="mean") == 2.5 and solo.allreduce(True, op="max")
    assert solo.bcast({"a": [1, 2]}) == {"a": [1, 2]}
    assert solo.allgather("x") == ["x"]
    sub = solo.split(color=5)
    assert sub is not None and sub.size == 1 and sub.allreduce(4) == 4
    assert solo.split(color=None) is None
    solo.barrier()
    grid = make_grid(solo, dp=1, pp=1)
    assert grid.dp_comm.size == grid.pp_comm.size == 1 and grid.stage == grid.dp_rank == 0
    with pytest.raises(ValueError, match="grid needs 2 ranks"):
        make_grid(solo, dp=2, pp=1)
    assert agree_found_inf(solo, True) is True and agree_found_inf(solo, 0) is False
    assert global_token_count(solo, np.int64(17)) == 17


def test_standin_object_messages(solo):
    solo.send({"k": 1}, dest=0)
    solo.send([2], dest=0)
    assert solo.recv(source=0) == {"k": 1} and solo.recv(source=0) == [2]  # in order


def test_standin_errors(solo):
    with pytest.raises(RuntimeError, match="no matching send"):
        solo.recv(np.empty(3), source=0, tag=99)
    with pytest.raises(ValueError, match="rank 1 does not exist"):
        solo.send(np.ones(3), dest=1)
    with pytest.raises(ValueError, match="unknown reduction op"):
        solo.allreduce(np.ones(3), op="avg")
    with pytest.raises(TypeError, match="floating"):
        solo.reduce_scatter(np.ones(3, dtype=np.int32), op="mean")
    with pytest.raises(ValueError, match="C-contiguous"):
        solo.allreduce(np.ones((4, 4))[:, ::2], inplace=True)
    with pytest.raises(ValueError, match="root rank 2"):
        solo.bcast(np.ones(2), root=2)
    with pytest.raises(TypeError, match="NumPy or CuPy array"):
        solo.irecv([1, 2, 3])


def test_reduce_scatter_padding_rule():
    """The documented chunk rule, checked on the formula the MPI path uses."""
    c = Communicator()
    assert c.chunk_size(7) == 7
    c.size = 4  # only chunk_size reads it
    assert [c.chunk_size(n) for n in (1, 4, 7, 8, 1001)] == [1, 1, 2, 2, 251]


def test_world_without_launcher_is_single_process(monkeypatch):
    for k in comm_mod._LAUNCHER_VARS:
        monkeypatch.delenv(k, raising=False)
    world = comm_mod._make_world()
    assert world.size == 1 and world.rank == 0
    assert Communicator.world() is Communicator.world()  # cached


def test_world_without_mpi4py(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # `import mpi4py` now fails
    monkeypatch.setitem(sys.modules, "mpi4py.MPI", None)
    for k in comm_mod._LAUNCHER_VARS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "1")
    assert comm_mod._make_world().size == 1  # one process: works without mpi4py
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match=r"mpirun with 2 processes.*pip install"):
        comm_mod._make_world()
    with pytest.raises(RuntimeError, match="mpi4py"):
        Communicator(mpi_comm=object())


def test_cuda_aware_env_override(monkeypatch):
    monkeypatch.setenv("LLM_CUDA_AWARE_MPI", "1")
    assert comm_mod.cuda_aware_mpi() is True
    monkeypatch.setenv("LLM_CUDA_AWARE_MPI", "0")
    assert comm_mod.cuda_aware_mpi() is False


def test_reduction_dtype():
    assert comm_mod._reduction_dtype(np.float16) == np.float32
    assert comm_mod._reduction_dtype(np.float32) == np.float32
    assert comm_mod._reduction_dtype(np.float64) == np.float64
    assert comm_mod._reduction_dtype(np.int32) == np.int32


# ---------------------------------------------------------------------------
# bucket assignment
# ---------------------------------------------------------------------------


def test_buckets_reverse_order_and_size_limit():
    params = [("a", 10, np.float32), ("b", 20, np.float32), ("c", 5, np.float32), ("d", 30, np.float32)]
    buckets = assign_buckets(params, bucket_bytes=4 * 40)
    # from the last parameter: d (30) + c (5) = 35 <= 40; + b (20) would be 55: new bucket b + a = 30
    assert [b.names for b in buckets] == [["d", "c"], ["b", "a"]]
    assert [b.indices for b in buckets] == [[3, 2], [1, 0]]
    assert buckets[0].offsets == [0, 30] and buckets[0].numel == 35 and buckets[0].nbytes == 140
    assert all(b.nbytes <= 160 for b in buckets)
    assert assign_buckets(params, bucket_bytes=4 * 40) == buckets  # deterministic


def test_buckets_big_parameter_alone_and_one_big_bucket():
    params = [("a", 3, np.float32), ("huge", 1000, np.float32), ("b", 3, np.float32)]
    small = assign_buckets(params, bucket_bytes=64)
    assert [b.names for b in small] == [["b"], ["huge"], ["a"]]
    one = assign_buckets(params, bucket_bytes=25 * 2 ** 20)
    assert len(one) == 1 and one[0].names == ["b", "huge", "a"] and one[0].offsets == [0, 3, 1003]
    every = assign_buckets(params, bucket_bytes=1)
    assert [b.names for b in every] == [["b"], ["huge"], ["a"]]
    with pytest.raises(ValueError, match="bucket size"):
        assign_buckets(params, bucket_bytes=0)


def test_buckets_split_on_dtype_and_reduce_half_in_float32():
    params = [("w16", 4, np.float16), ("w32", 4, np.float32), ("w64", 4, np.float64), ("v64", 2, np.float64)]
    buckets = assign_buckets(params, bucket_bytes=2 ** 20)
    assert [b.names for b in buckets] == [["v64", "w64"], ["w32", "w16"]]
    assert [b.dtype for b in buckets] == [np.float64, np.float32]
    assert bucket_dtype(np.float16) == np.float32


def test_buckets_from_a_real_model():
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    params = [(n, p.size, p.dtype) for n, p in model.named_parameters()]
    buckets = assign_buckets(params, bucket_bytes=4 * 100)
    flat = [n for b in buckets for n in b.names]
    assert flat == [n for n, _ in reversed(list(model.named_parameters()))]
    assert all(b.nbytes <= 400 or len(b.names) == 1 for b in buckets)


# ---------------------------------------------------------------------------
# flat layout of ZeRO
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_flat_layout_pieces_cover_every_element_once(world):
    entries = [("a", 35, 0), ("b", 7, 1), ("c", 21, 0), ("d", 3, 1)]
    layout = FlatLayout(entries, world)
    assert layout.numel == 66 and layout.chunk == -(-66 // world) and layout.padded == layout.chunk * world
    seen = [np.zeros(n, dtype=int) for _, n, _ in entries]
    for r in range(world):
        lo, hi = layout.shard(r)
        assert hi - lo == layout.chunk
        prev = 0
        for pc in layout.pieces(r):
            assert pc.shard_lo >= prev and pc.shard_hi - pc.shard_lo == pc.param_hi - pc.param_lo > 0
            assert layout.offsets[pc.param] + pc.param_lo == lo + pc.shard_lo  # flat positions agree
            assert pc.group == entries[pc.param][2]
            seen[pc.param][pc.param_lo:pc.param_hi] += 1
            prev = pc.shard_hi
    assert all((s == 1).all() for s in seen)


def test_flat_layout_group_mask():
    layout = FlatLayout([("w", 5, 0), ("b", 2, 1)], world=2)  # 7 elements, chunk 4, one element of padding
    assert layout.group_mask(0, [0.1, 0.0]).tolist() == [0.1, 0.1, 0.1, 0.1]
    assert layout.group_mask(1, [0.1, 0.0]).tolist() == [0.1, 0.0, 0.0, 0.0]


# ---------------------------------------------------------------------------
# DataParallel and ShardedMasters (ZeRO-1) at world size 1
# ---------------------------------------------------------------------------


def _model(seed, dtype=np.float64):
    g = np.random.default_rng(seed)
    return nn.Sequential(nn.Linear(5, 6, generator=g, init_std=0.5, dtype=dtype), nn.GELU(),
                         nn.Linear(6, 3, generator=g, init_std=0.5, dtype=dtype))


def _batch(step):
    g = np.random.default_rng(step)
    return g.standard_normal((8, 5)), g.integers(0, 3, size=8)


def test_dataparallel_world_size_one_is_plain_training(solo):
    ref, model = _model(0), _model(0)
    ddp = DataParallel(model, solo)
    assert ddp._handles == []  # nothing to reduce: no hooks on the parameters
    x, y = _batch(0)
    autograd.cross_entropy(ref(autograd.Tensor(x)), y).backward()
    autograd.cross_entropy(ddp(autograd.Tensor(x)), y).backward()
    ddp.finish_grads()
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert np.array_equal(p.grad, q.grad), n
    with ddp.no_sync():
        with pytest.raises(RuntimeError, match="no_sync"):
            ddp.finish_grads()
    with pytest.raises(ValueError, match="reduction"):
        DataParallel(model, solo, reduction="avg")


def test_check_replicas_agree_single_rank(solo):
    check_replicas_agree(solo, _model(0))  # nothing to compare with: passes


def _zero(model, solo, precision, scaler=None):
    """MixedPrecision over ZeRO's sharded masters (one shard: the whole model) and an AdamW over them."""
    dtype = np.float64 if precision == "fp64" else np.float32
    mp = MixedPrecision(model, precision, scaler=scaler, masters=ShardedMasters(model.named_parameters(), solo, dtype))
    return mp, nn.optim.AdamW(mp.param_groups_for_gpt(0.1), lr=1e-2)


def test_zero_world_size_one_equals_adamw(solo):
    ref, model = _model(0), _model(0)
    ref_opt = nn.optim.AdamW(nn.optim.param_groups_for_gpt(ref, 0.1), lr=1e-2)
    mp, opt = _zero(model, solo, "fp64")
    for step in range(3):
        x, y = _batch(step)
        autograd.cross_entropy(ref(autograd.Tensor(x)), y).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        mp.backward(autograd.cross_entropy(model(autograd.Tensor(x)), y))
        assert mp.step(opt)
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert np.array_equal(p.data, q.data), n  # same arithmetic, same order: bitwise equal
    n = sum(p.size for p in model.parameters())
    assert mp.masters.state_bytes() == 8 * n
    assert sum(a.nbytes for st in opt.state.values() for k, a in st.items() if k != "step") == 2 * 8 * n
    # the gathered state is AdamW's format: a plain AdamW loads it and continues identically
    groups = [[name for name, _ in g["params"]] for g in nn.optim.param_groups_for_gpt(model, 0.1)]
    sd = mp.masters.optimizer_state(opt, groups)
    other = _model(0)
    other.load_state_dict({k: v for k, v in model.state_dict().items()})
    other_opt = nn.optim.AdamW(nn.optim.param_groups_for_gpt(other, 0.1), lr=1e-2)
    other_opt.load_state_dict(sd)
    x, y = _batch(9)
    mp.backward(autograd.cross_entropy(model(autograd.Tensor(x)), y))
    mp.step(opt)
    autograd.cross_entropy(other(autograd.Tensor(x)), y).backward()
    other_opt.step()
    for (n, p), (_, q) in zip(model.named_parameters(), other.named_parameters()):
        assert np.array_equal(p.data, q.data), n


def test_zero_float16_compute_matches_mixed_precision(solo):
    ref, model = _model(0, np.float32), _model(0, np.float32)
    mp_ref = MixedPrecision(ref, "fp16", scaler=DynamicLossScaler(init_scale=2.0 ** 8))
    ref_opt = nn.optim.AdamW(mp_ref.param_groups_for_gpt(0.1), lr=1e-2)
    mp, opt = _zero(model, solo, "fp16", scaler=DynamicLossScaler(init_scale=2.0 ** 8))
    for step in range(3):
        x, y = _batch(step)
        x = x.astype(np.float16)
        mp_ref.backward(autograd.cross_entropy(ref(autograd.Tensor(x)), y))
        assert mp_ref.step(ref_opt)
        mp.backward(autograd.cross_entropy(model(autograd.Tensor(x)), y))
        assert mp.step(opt)
    masters = mp.masters.state_dict()
    for name, m in mp_ref.master_named_parameters():
        assert np.array_equal(masters[name], m.data), name  # no clipping: identical arithmetic
    for p, q in zip(model.parameters(), ref.parameters()):
        assert p.dtype == np.float16 and np.array_equal(p.data, q.data)
    assert mp.masters.state_bytes() == 4 * sum(p.size for p in model.parameters())


def test_zero_rejects_mixed_dtypes(solo):
    a = nn.Parameter(np.zeros(3, dtype=np.float32))
    b = nn.Parameter(np.zeros(3, dtype=np.float64))
    with pytest.raises(TypeError, match="one dtype"):
        ShardedMasters([("a", a), ("b", b)], solo)


# ---------------------------------------------------------------------------
# launch helpers at world size 1
# ---------------------------------------------------------------------------


def test_rank0_helpers_single_process(solo, capsys):
    assert is_rank0(solo)
    rank0_print("hello", 3, comm=solo)
    assert capsys.readouterr().out == "hello 3\n"


def test_excepthook_and_abort_on_error_single_process(solo):
    previous = sys.excepthook
    try:
        calls = []
        sys.excepthook = lambda *a: calls.append(a[0])
        install_excepthook(solo)
        sys.excepthook(ValueError, ValueError("x"), None)  # size 1: handed to the previous hook
        assert calls == [ValueError]
    finally:
        sys.excepthook = previous
    with pytest.raises(KeyError):
        with abort_on_error(solo):
            raise KeyError("propagates at world size 1")


# ---------------------------------------------------------------------------
# fail-fast: a nested mpirun in which rank 1 raises
# ---------------------------------------------------------------------------

MPIRUN = Path(sys.executable).parent / "mpirun"
needs_mpirun = pytest.mark.skipif(
    not MPIRUN.exists() or importlib.util.find_spec("mpi4py") is None,
    reason=f"no mpirun next to the interpreter ({MPIRUN}) or no mpi4py: pip install -e '.[mpi]'")

FAILING_SCRIPT = """
import sys, time
from parallel import get_world, install_excepthook
comm = get_world()
if {hook}:
    install_excepthook(comm)
comm.barrier()
if comm.rank == 1:
    raise RuntimeError("deliberate failure on rank 1")
comm.barrier()  # rank 0 waits here for a rank that is gone: only an abort ends it
time.sleep(120)
"""


def _run_mpi_job(args, timeout=60):
    """Run an mpirun command in its own process group; kill the whole group on timeout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_", "PMI_", "PRTE_"))}
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1",
               OPENBLAS_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    start = time.monotonic()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                            start_new_session=True, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, time.monotonic() - start, out
    return proc.returncode, time.monotonic() - start, out


@needs_mpirun
@pytest.mark.parametrize("how", ["python -m mpi4py", "install_excepthook"])
def test_exception_on_one_rank_ends_the_job(tmp_path, how):
    script = tmp_path / "fail.py"
    script.write_text(FAILING_SCRIPT.format(hook=how == "install_excepthook"))
    launcher = ["-m", "mpi4py"] if how == "python -m mpi4py" else []
    rc, elapsed, out = _run_mpi_job([str(MPIRUN), "-n", "2", "--oversubscribe", sys.executable, *launcher,
                                     str(script)])
    assert rc is not None, f"the job hung (killed after {elapsed:.0f} s):\n{out[-3000:]}"
    assert rc != 0, f"exit status 0 although rank 1 raised:\n{out[-3000:]}"
    assert elapsed < 10, f"the job took {elapsed:.1f} s to end"
    assert "deliberate failure on rank 1" in out, out[-3000:]
    if how == "install_excepthook":
        assert "rank 1: RuntimeError: deliberate failure on rank 1" in out, out[-3000:]
