"""Communicator collectives and messages under mpirun: exact results on odd and large sizes, no deadlock.

Every rank builds every rank's input locally from a seed (rank, size, dtype), so
the expected result of each collective is computed here in plain NumPy.
Integer-valued floats make sums exact in any order.
"""

import numpy as np
import pytest

from parallel.comm import make_grid

pytestmark = pytest.mark.mpi

SIZES = [1, 7, 1001, 3_000_001]
FLOATS = [np.float32, np.float64]


def rank_array(r, n, dtype, lo=-1000, hi=1000):
    """Rank ``r``'s input: integer values in [lo, hi) as ``dtype`` (exactly representable)."""
    if n > 100_000:  # large inputs: a cheap deterministic pattern (random draws of 3M values on 4 ranks add up)
        return ((np.arange(n, dtype=np.int64) * (2 * r + 3) + 7 * r) % (hi - lo) + lo).astype(dtype)
    return np.random.default_rng([r, n, np.dtype(dtype).num]).integers(lo, hi, size=n).astype(dtype)


def all_inputs(comm, n, dtype, **kw):
    return [rank_array(r, n, dtype, **kw) for r in range(comm.size)]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_allreduce_sum_mean_max_exact(comm, assert_all_ranks, n, dtype):
    xs = all_inputs(comm, n, dtype)
    mine = xs[comm.rank]
    want_sum = np.sum(np.stack(xs), axis=0, dtype=np.float64).astype(dtype)
    out = comm.allreduce(mine, op="sum")
    assert_all_ranks(comm, out.dtype == dtype and out.shape == (n,), f"sum gave {out.dtype} {out.shape}")
    assert_all_ranks(comm, np.array_equal(out, want_sum), f"allreduce sum n={n} {np.dtype(dtype).name} wrong")
    assert_all_ranks(comm, np.array_equal(mine, xs[comm.rank]), "allreduce (not in place) changed its input")

    mean = comm.allreduce(mine, op="mean")
    assert_all_ranks(comm, np.array_equal(mean, want_sum / dtype(comm.size)), "allreduce mean wrong")

    inplace = mine.copy()
    res = comm.allreduce(inplace, op="max", inplace=True)
    assert_all_ranks(comm, res is inplace, "inplace=True did not return its argument")
    assert_all_ranks(comm, np.array_equal(inplace, np.max(np.stack(xs), axis=0)), "allreduce max wrong")


def test_allreduce_float16_reduced_in_float32(comm, assert_all_ranks):
    # 60000 + 60000 overflows float16 (max 65504), but the mean 60000 is a float16 number:
    # only a reduction carried out in float32 gets it right
    x = np.full(3, 60000.0, dtype=np.float16)
    out = comm.allreduce(x, op="mean")
    assert_all_ranks(comm, out.dtype == np.float16, f"float16 allreduce returned {out.dtype}")
    assert_all_ranks(comm, np.all(out == np.float16(60000.0)), f"float16 mean {out} != 60000")
    comm.allreduce(x, op="mean", inplace=True)
    assert_all_ranks(comm, np.all(x == np.float16(60000.0)), f"float16 in-place mean {x}")
    xs = [rank_array(r, 101, np.float16, lo=-50, hi=50) for r in range(comm.size)]
    got = comm.allreduce(xs[comm.rank])
    want = np.sum(np.stack(xs).astype(np.float32), axis=0).astype(np.float16)
    assert_all_ranks(comm, np.array_equal(got, want), "float16 sum")
    ints = np.arange(5, dtype=np.int64) * (comm.rank + 1)
    got = comm.allreduce(ints)
    assert_all_ranks(comm, np.array_equal(got, np.arange(5) * comm.size * (comm.size + 1) // 2), "int64 sum")


def test_allreduce_scalars_and_errors(comm, assert_all_ranks):
    assert_all_ranks(comm, comm.allreduce(comm.rank + 1) == comm.size * (comm.size + 1) // 2, "int sum")
    assert_all_ranks(comm, comm.allreduce(float(comm.rank), op="max") == comm.size - 1, "float max")
    assert_all_ranks(comm, comm.allreduce(comm.rank == 1, op="max") is True, "bool max (found_inf style)")
    with pytest.raises(ValueError, match="unknown reduction op"):
        comm.allreduce(np.ones(3), op="prod")
    with pytest.raises(TypeError, match="floating"):
        comm.allreduce(np.ones(3, dtype=np.int64), op="mean")


def test_iallreduce_many_in_flight(comm, assert_all_ranks):
    n = 262_147  # 1 MiB of float32 and a bit
    bufs = [rank_array(comm.rank, n + k, np.float32) for k in range(4)]
    want = [np.sum(np.stack([rank_array(r, n + k, np.float32) for r in range(comm.size)]), axis=0)
            for k in range(4)]
    reqs = [comm.iallreduce(b, op="sum") for b in bufs]
    for k in reversed(range(4)):  # any wait order
        res = reqs[k].wait()
        assert_all_ranks(comm, res is bufs[k] and np.array_equal(bufs[k], want[k]), f"iallreduce {k} wrong")
    assert_all_ranks(comm, reqs[0].test() and reqs[0].wait() is bufs[0], "a finished request reports done")


@pytest.mark.parametrize("n,dtype", [(n, d) for n in SIZES for d in FLOATS] +
                         [(n, d) for n in SIZES[:-1] for d in (np.float16, np.int32)])
def test_bcast_array_from_every_root(comm, assert_all_ranks, n, dtype):
    for root in range(comm.size):
        x = rank_array(comm.rank, n, dtype, lo=-100, hi=100)
        out = comm.bcast(x, root=root)
        assert_all_ranks(comm, out is x and np.array_equal(x, rank_array(root, n, dtype, lo=-100, hi=100)),
                         f"bcast from root {root} n={n} wrong")


def test_bcast_object(comm, assert_all_ranks):
    obj = {"path": "/tmp/x", "step": 7, "ranks": list(range(comm.size))} if comm.rank == 0 else None
    got = comm.bcast(obj, root=0)
    assert_all_ranks(comm, got == {"path": "/tmp/x", "step": 7, "ranks": list(range(comm.size))}, f"got {got}")
    last = comm.size - 1
    assert_all_ranks(comm, comm.bcast(comm.rank * 10, root=last) == last * 10, "bcast from the last rank")


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_allgather(comm, assert_all_ranks, n, dtype):
    mine = rank_array(comm.rank, n, dtype)
    out = comm.allgather(mine)
    want = np.stack(all_inputs(comm, n, dtype))
    assert_all_ranks(comm, out.shape == (comm.size, n) and np.array_equal(out, want), f"allgather n={n} wrong")
    flat = np.empty(comm.size * n, dtype=dtype)
    res = comm.allgather(mine, out=flat)
    assert_all_ranks(comm, res is flat and np.array_equal(flat, want.reshape(-1)), "allgather out= wrong")


def test_allgather_objects_and_2d(comm, assert_all_ranks):
    got = comm.allgather(("rank", comm.rank))
    assert_all_ranks(comm, got == [("rank", r) for r in range(comm.size)], f"object allgather gave {got}")
    x = np.full((2, 3), comm.rank, dtype=np.float16)
    out = comm.allgather(x)
    assert_all_ranks(comm, out.shape == (comm.size, 2, 3) and all((out[r] == r).all() for r in range(comm.size)),
                     "2-D float16 allgather wrong")


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("op", ["sum", "mean"])
def test_reduce_scatter(comm, assert_all_ranks, n, dtype, op):
    mine = rank_array(comm.rank, n, dtype)
    total = np.sum(np.stack(all_inputs(comm, n, dtype)), axis=0)
    if op == "mean":
        total = total / dtype(comm.size)
    chunk = comm.chunk_size(n)
    padded = np.zeros(chunk * comm.size, dtype=dtype)
    padded[:n] = total
    got = comm.reduce_scatter(mine, op=op)
    want = padded[comm.rank * chunk:(comm.rank + 1) * chunk]
    assert_all_ranks(comm, got.shape == (chunk,) and got.dtype == dtype, f"chunk {got.shape} {got.dtype}")
    assert_all_ranks(comm, np.array_equal(got, want), f"reduce_scatter {op} n={n} wrong")
    out = np.empty(chunk, dtype=dtype)
    res = comm.reduce_scatter(mine, op=op, out=out)
    assert_all_ranks(comm, res is out and np.array_equal(out, want), "reduce_scatter out= wrong")


def test_reduce_scatter_float16(comm, assert_all_ranks):
    n = 4 * comm.size + 1
    got = comm.reduce_scatter(np.full(n, 60000.0, dtype=np.float16), op="mean")  # the float16 sum would overflow
    chunk = comm.chunk_size(n)
    want = np.zeros(chunk * comm.size, dtype=np.float16)
    want[:n] = 60000.0
    assert_all_ranks(comm, got.dtype == np.float16 and np.array_equal(got, want[comm.rank * chunk:][:chunk]),
                     f"got {got}")


PAYLOAD = 300_007  # float32 elements: 1.2 MB, far past any eager limit


def test_send_recv_ring_blocking_megabytes(comm, assert_all_ranks):
    right, left = (comm.rank + 1) % comm.size, (comm.rank - 1) % comm.size
    mine = rank_array(comm.rank, PAYLOAD, np.float32)
    got = np.empty(PAYLOAD, dtype=np.float32)
    if comm.rank % 2 == 0:  # blocking pairs must meet: even ranks send first, odd ranks receive first
        comm.send(mine, dest=right, tag=5)
        comm.recv(got, source=left, tag=5)
    else:
        comm.recv(got, source=left, tag=5)
        comm.send(mine, dest=right, tag=5)
    assert_all_ranks(comm, np.array_equal(got, rank_array(left, PAYLOAD, np.float32)), "blocking ring payload wrong")


def test_isend_irecv_ring_both_directions(comm, assert_all_ranks):
    right, left = (comm.rank + 1) % comm.size, (comm.rank - 1) % comm.size
    mine = rank_array(comm.rank, PAYLOAD, np.float64)
    from_left = np.empty(PAYLOAD, dtype=np.float64)
    from_right = np.empty(PAYLOAD, dtype=np.float64)
    # every rank sends first: only correct with non-blocking calls
    reqs = [comm.isend(mine, right, tag=1), comm.isend(mine, left, tag=2),
            comm.irecv(from_left, left, tag=1), comm.irecv(from_right, right, tag=2)]
    results = [r.wait() for r in reqs]
    assert_all_ranks(comm, results[2] is from_left and results[0] is None, "request results")
    assert_all_ranks(comm, np.array_equal(from_left, rank_array(left, PAYLOAD, np.float64)), "from left wrong")
    assert_all_ranks(comm, np.array_equal(from_right, rank_array(right, PAYLOAD, np.float64)), "from right wrong")


def test_send_recv_objects_and_float16(comm, assert_all_ranks):
    right, left = (comm.rank + 1) % comm.size, (comm.rank - 1) % comm.size
    half = np.arange(1000, dtype=np.float16) + comm.rank
    got = np.empty_like(half)
    req = comm.irecv(got, left, tag=9)
    comm.isend(half, right, tag=9).wait()
    req.wait()
    assert_all_ranks(comm, np.array_equal(got, np.arange(1000, dtype=np.float16) + left), "float16 message")
    if comm.rank == 0:
        comm.send({"from": 0}, dest=comm.size - 1, tag=3)
    if comm.rank == comm.size - 1:
        msg = comm.recv(source=0, tag=3)
        ok = msg == {"from": 0}
    else:
        ok = True
    assert_all_ranks(comm, ok, "object message")


def test_split_into_subgroups(comm, assert_all_ranks):
    color = comm.rank % 2
    sub = comm.split(color, key=-comm.rank)  # reversed order inside each group
    members = [r for r in range(comm.size) if r % 2 == color]
    assert_all_ranks(comm, sub.size == len(members), f"sub size {sub.size} != {len(members)}")
    assert_all_ranks(comm, sub.rank == sorted(members, reverse=True).index(comm.rank), "key orders the ranks")
    total = sub.allreduce(np.array([float(comm.rank)]))
    assert_all_ranks(comm, total[0] == sum(members), f"sub-group sum {total[0]} != {sum(members)}")
    gathered = sub.allgather(comm.rank)
    assert_all_ranks(comm, gathered == sorted(members, reverse=True), f"sub-group gather {gathered}")
    none = comm.split(None if comm.rank == 0 else 1)
    assert_all_ranks(comm, (none is None) == (comm.rank == 0), "color None leaves the group out")
    if none is not None:
        assert_all_ranks_sub = none.allreduce(1)
        ok = assert_all_ranks_sub == comm.size - 1
        none.free()
    else:
        ok = True
    assert_all_ranks(comm, ok, "the group without rank 0 has size - 1 members")
    sub.free()


@pytest.mark.parametrize("pp", [1, 2])
def test_grid_dp_pp(comm, assert_all_ranks, pp):
    if comm.size % pp:
        pytest.skip("size not divisible")
    dp = comm.size // pp
    grid = make_grid(comm, dp=dp, pp=pp)
    assert_all_ranks(comm, comm.rank == grid.stage * dp + grid.dp_rank, "rank = stage * dp + dp_rank")
    assert_all_ranks(comm, grid.dp_comm.size == dp and grid.pp_comm.size == pp, "group sizes")
    assert_all_ranks(comm, grid.pp_comm.rank == grid.stage and grid.dp_comm.rank == grid.dp_rank, "group ranks")
    peers = grid.dp_comm.allgather(comm.rank)
    assert_all_ranks(comm, peers == [grid.stage * dp + i for i in range(dp)], f"dp peers {peers}")
    stages = grid.pp_comm.allgather(comm.rank)
    assert_all_ranks(comm, stages == [s * dp + grid.dp_rank for s in range(pp)], f"pipeline {stages}")
    with pytest.raises(ValueError, match="grid needs"):
        make_grid(comm, dp=comm.size + 1, pp=1)
