"""DataParallel under mpirun: N ranks with B/N examples each train exactly like one process with B.

The single-process reference is computed on every rank, locally, from the same
global batch (every batch is drawn from a seed), so each rank can compare its
replica with it. Models are float64, so the only differences are the rounding
of the gradient sums: 1e-12 relative.
"""

import hashlib

import numpy as np
import pytest

import autograd
import nn
from nn.amp import DynamicLossScaler, MixedPrecision
from parallel import DataParallel, agree_found_inf, global_token_count

pytestmark = pytest.mark.mpi

B = 12  # global batch: divisible by 1, 2, 3 and 4 ranks
D_IN, D_OUT = 5, 3
STEPS = 5
TOL = 1e-12


def make_model(seed, hidden=7, dtype=np.float64):
    g = np.random.default_rng(seed)
    return nn.Sequential(nn.Linear(D_IN, hidden, generator=g, init_std=0.5, dtype=dtype), nn.GELU(),
                         nn.Linear(hidden, D_OUT, generator=g, init_std=0.5, dtype=dtype))


def make_opt(model):
    return nn.optim.AdamW(nn.optim.param_groups_for_gpt(model, weight_decay=0.1), lr=1e-2, betas=(0.9, 0.95))


def global_batch(step, rows=B):
    g = np.random.default_rng(100 + step)
    return g.standard_normal((rows, D_IN)), g.integers(0, D_OUT, size=rows)


def local_slice(comm, x, y):
    n = len(x) // comm.size
    return x[comm.rank * n:(comm.rank + 1) * n], y[comm.rank * n:(comm.rank + 1) * n]


def reference_params(steps=STEPS):
    """One process, the whole batch, plain AdamW: the parameters after ``steps`` steps."""
    model = make_model(seed=0)
    opt = make_opt(model)
    for step in range(steps):
        x, y = global_batch(step)
        autograd.cross_entropy(model(autograd.Tensor(x)), y).backward()
        opt.step()
        opt.zero_grad()
    return {n: p.data.copy() for n, p in model.named_parameters()}


def max_rel_diff(model, ref):
    return max(rel_diff(p.data, ref[n]) for n, p in model.named_parameters())


def rel_diff(a, b):
    """max |a - b| / max |b| (max |a - b| where b is all zeros); NaN counts as infinitely wrong."""
    d = float(np.max(np.abs(a - b))) / (float(np.max(np.abs(b))) or 1.0)
    return d if d == d else float("inf")


def params_digest(model):
    h = hashlib.sha256()
    for _, p in model.named_parameters():
        h.update(np.ascontiguousarray(p.data).tobytes())
    return h.hexdigest()


def train_ddp(comm, bucket_mb=25.0, steps=STEPS):
    model = make_model(seed=comm.rank)  # different on every rank: DataParallel broadcasts rank 0's weights
    ddp = DataParallel(model, comm, bucket_mb=bucket_mb)
    opt = make_opt(model)
    for step in range(steps):
        x, y = local_slice(comm, *global_batch(step))
        loss = autograd.cross_entropy(ddp(autograd.Tensor(x)), y)
        loss.backward()
        ddp.finish_grads()
        opt.step()
        opt.zero_grad()
    return model, ddp


def test_initial_broadcast_and_check(comm, assert_all_ranks):
    model = make_model(seed=comm.rank)
    model[0].register_buffer("stats", np.full(4, float(comm.rank)))
    model[2].register_buffer("table", np.full((3, 4), float(comm.rank)).T)  # not contiguous
    DataParallel(model, comm)
    ref = make_model(seed=0)
    same = all(np.array_equal(p.data, q.data) for (_, p), (_, q) in zip(model.named_parameters(),
                                                                       ref.named_parameters()))
    assert_all_ranks(comm, same, "parameters after construction are not rank 0's")
    bufs = dict(model.named_buffers())
    assert_all_ranks(comm, set(bufs) == {"0.stats", "2.table"} and all((b == 0).all() for b in bufs.values())
                     and model[2].table.shape == (4, 3), f"buffers are not rank 0's: {bufs}")


@pytest.mark.parametrize("bucket_mb", [1e-6, 25.0], ids=["tiny-buckets", "one-bucket"])
def test_ddp_equals_single_process_full_batch(comm, assert_all_ranks, bucket_mb):
    model, ddp = train_ddp(comm, bucket_mb=bucket_mb)
    n_params = len(list(model.parameters()))
    expected_buckets = n_params if bucket_mb < 1 else 1
    assert_all_ranks(comm, len(ddp.buckets) == expected_buckets, f"{len(ddp.buckets)} buckets")
    assert_all_ranks(comm, ddp.num_allreduces == STEPS * expected_buckets, f"{ddp.num_allreduces} all-reduces")
    err = max_rel_diff(model, reference_params())
    assert_all_ranks(comm, err <= TOL, f"DDP vs single process: max relative difference {err:.3e}")
    digests = comm.allgather(params_digest(model))
    assert_all_ranks(comm, len(set(digests)) == 1, f"replicas differ: {digests}")


def test_bucket_size_does_not_change_result(comm, assert_all_ranks):
    tiny, _ = train_ddp(comm, bucket_mb=1e-6, steps=3)
    big, _ = train_ddp(comm, bucket_mb=25.0, steps=3)
    err = max_rel_diff(tiny, {n: p.data for n, p in big.named_parameters()})
    assert_all_ranks(comm, err <= TOL, f"tiny vs one bucket: {err:.3e}")


def test_buckets_launch_during_backward(comm, assert_all_ranks):
    model = make_model(seed=0)
    ddp = DataParallel(model, comm, bucket_mb=1e-6)
    x, y = local_slice(comm, *global_batch(0))
    autograd.cross_entropy(ddp(autograd.Tensor(x)), y).backward()
    launched = ddp._launched  # the hooks started every bucket before finish_grads()
    ddp.finish_grads()
    assert_all_ranks(comm, launched == len(ddp.buckets), f"only {launched} of {len(ddp.buckets)} started in backward")
    # a second backward without finish_grads() in between is an error, not a silent double reduction
    autograd.cross_entropy(ddp(autograd.Tensor(x)), y).backward()
    try:
        autograd.cross_entropy(ddp(autograd.Tensor(x)), y).backward()
        msg = ""
    except RuntimeError as e:
        msg = str(e)
    ddp.finish_grads()
    assert_all_ranks(comm, "no_sync" in msg, f"second backward: {msg!r}")


def test_no_sync_accumulation_equals_big_batch(comm, assert_all_ranks):
    model = make_model(seed=comm.rank)
    ddp = DataParallel(model, comm, bucket_mb=1e-6)
    opt = make_opt(model)
    micro = 2
    for step in range(3):
        x, y = local_slice(comm, *global_batch(step))
        xs, ys = np.array_split(x, micro), np.array_split(y, micro)
        before = ddp.num_allreduces
        w = [len(part) / len(x) for part in xs]  # micro-batches may differ in size: weight each mean by it
        with ddp.no_sync():
            (autograd.cross_entropy(ddp(autograd.Tensor(xs[0])), ys[0]) * w[0]).backward()
        assert_all_ranks(comm, ddp.num_allreduces == before, "no_sync() communicated")
        (autograd.cross_entropy(ddp(autograd.Tensor(xs[1])), ys[1]) * w[1]).backward()
        ddp.finish_grads()
        assert_all_ranks(comm, ddp.num_allreduces - before == len(ddp.buckets), "one all-reduce per bucket per step")
        opt.step()
        opt.zero_grad()
    err = max_rel_diff(model, reference_params(steps=3))
    assert_all_ranks(comm, err <= TOL, f"no_sync accumulation vs big batch: {err:.3e}")


def uneven_rows(comm):
    """Rank r gets 3 (r + 1) rows: (start, stop) of this rank, and the total."""
    sizes = [3 * (r + 1) for r in range(comm.size)]
    start = sum(sizes[:comm.rank])
    return start, start + sizes[comm.rank], sum(sizes)


def uneven_batch(step, rows, comm):
    x, y = global_batch(step, rows)
    g = np.random.default_rng(500 + step)
    y = np.where(g.random(rows) < 0.3, -100, y)  # ~30% ignored targets
    if step == 0:  # the last rank (the last 3 * size rows) has no target at all in the first step
        y[rows - 3 * comm.size:] = -100
    return x, y


def test_sum_mode_with_uneven_token_counts(comm, assert_all_ranks):
    start, stop, rows = uneven_rows(comm)
    ref = make_model(seed=0)
    ref_opt = make_opt(ref)
    model = make_model(seed=comm.rank)
    ddp = DataParallel(model, comm, reduction="sum", bucket_mb=1e-6)
    opt = make_opt(model)
    for step in range(4):
        x, y = uneven_batch(step, rows, comm)
        ref_loss = autograd.cross_entropy(ref(autograd.Tensor(x)), y)  # mean over all non-ignored targets
        ref_loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()

        xl, yl = x[start:stop], y[start:stop]
        n_global = ddp.global_token_count(int((yl != -100).sum()))
        assert_all_ranks(comm, n_global == global_token_count(comm, (yl != -100).sum()) == int((y != -100).sum()),
                         f"global token count {n_global}")
        loss = autograd.cross_entropy(ddp(autograd.Tensor(xl)), yl, reduction="sum") / n_global
        loss.backward()
        ddp.finish_grads()
        total = comm.allreduce(loss.item())
        assert_all_ranks(comm, abs(total - ref_loss.item()) <= TOL * abs(ref_loss.item()),
                         f"step {step}: summed loss {total!r} vs single-process {ref_loss.item()!r}")
        opt.step()
        opt.zero_grad()
    err = max_rel_diff(model, {n: p.data for n, p in ref.named_parameters()})
    assert_all_ranks(comm, err <= TOL, f"uneven tokens, sum mode vs single process: {err:.3e}")


class Branchy(nn.Module):
    """A trunk used by every rank, a head only rank 0 uses, and a parameter nobody uses."""

    def __init__(self, seed):
        super().__init__()
        g = np.random.default_rng(seed)
        self.trunk = nn.Linear(D_IN, D_OUT, generator=g, init_std=0.5, dtype=np.float64)
        self.extra = nn.Linear(D_IN, D_OUT, generator=g, init_std=0.5, dtype=np.float64)
        self.unused = nn.Linear(D_IN, D_OUT, generator=g, init_std=0.5, dtype=np.float64)

    def forward(self, x, use_extra):
        out = self.trunk(x)
        return out + self.extra(x) if use_extra else out


def test_unused_parameters_stay_in_lockstep(comm, assert_all_ranks):
    model = Branchy(seed=comm.rank)
    ddp = DataParallel(model, comm, bucket_mb=1e-6)
    x, y = global_batch(0)

    def local_grads(rank):
        m = Branchy(seed=0)
        xl, yl = x[rank * 2:(rank + 1) * 2], y[rank * 2:(rank + 1) * 2]
        autograd.cross_entropy(m(autograd.Tensor(xl), use_extra=rank == 0), yl).backward()
        return {n: p.grad for n, p in m.named_parameters()}

    xl, yl = x[comm.rank * 2:(comm.rank + 1) * 2], y[comm.rank * 2:(comm.rank + 1) * 2]
    autograd.cross_entropy(ddp(autograd.Tensor(xl), use_extra=comm.rank == 0), yl).backward()
    ddp.finish_grads()
    grads = [local_grads(r) for r in range(comm.size)]
    got = dict(model.named_parameters())
    assert_all_ranks(comm, got["unused.weight"].grad is None and got["unused.bias"].grad is None,
                     "a parameter no rank used got a gradient")
    for name in ("trunk.weight", "trunk.bias", "extra.weight", "extra.bias"):
        want = sum(g[name] if g[name] is not None else 0 for g in grads) / comm.size
        g = got[name].grad
        ok = g is not None and rel_diff(g, want) <= TOL
        assert_all_ranks(comm, ok, f"{name}: averaged gradient wrong (rank-local grads missing count as zeros)")


@pytest.mark.parametrize("kind", ["shape", "dtype", "name"])
def test_mismatched_models_raise_on_every_rank(comm, assert_all_ranks, kind):
    last = comm.size - 1
    if comm.rank == last and kind == "shape":
        model = make_model(seed=0, hidden=8)
    elif comm.rank == last and kind == "dtype":
        model = make_model(seed=0, dtype=np.float32)
    elif comm.rank == last:
        model = Branchy(seed=0)
    else:
        model = make_model(seed=0)
    try:
        DataParallel(model, comm)
        msg = ""
    except ValueError as e:
        msg = str(e)
    want = "0.weight" if kind != "name" else "entry 0"
    assert_all_ranks(comm, "differs across ranks" in msg and f"ranks [{last}]" in msg and want in msg,
                     f"mismatch ({kind}) error: {msg!r}")


def test_overflow_decision_agreed(comm, assert_all_ranks):
    last = comm.size - 1
    assert_all_ranks(comm, agree_found_inf(comm, comm.rank == last) is True, "one rank's inf must count for all")
    assert_all_ranks(comm, agree_found_inf(comm, False) is False, "no inf anywhere")
    scaler = DynamicLossScaler(init_scale=2.0 ** 10)
    applied = scaler.update(agree_found_inf(comm, comm.rank == last))
    scales = comm.allgather((applied, scaler.get_scale()))
    assert_all_ranks(comm, scales == [(False, 2.0 ** 9)] * comm.size, f"skip decisions {scales}")


def test_overflow_on_one_rank_skips_everywhere_with_mixed_precision(comm, assert_all_ranks):
    model = make_model(seed=comm.rank, dtype=np.float32)
    ddp = DataParallel(model, comm)
    mp = MixedPrecision(model, "fp16", scaler=DynamicLossScaler(init_scale=2.0 ** 8))
    opt = nn.optim.AdamW(mp.master_named_parameters(), lr=1e-2)
    before = params_digest(model)
    decisions = []
    for step in range(2):
        x, y = local_slice(comm, *global_batch(step))
        x = x.astype(np.float32)
        if step == 0 and comm.rank == comm.size - 1:
            x[0, 0] = 1e30  # this rank alone overflows: inf in float16, NaN gradients
        with np.errstate(over="ignore", invalid="ignore"):
            mp.backward(autograd.cross_entropy(ddp(mp.cast_input(autograd.Tensor(x))), y))
            ddp.finish_grads()
        decisions.append(mp.step(opt))
        if step == 0:
            unchanged = params_digest(model) == before
    assert_all_ranks(comm, decisions == [False, True], f"step applied: {decisions}")
    assert_all_ranks(comm, unchanged, "the skipped step changed the parameters")
    state = comm.allgather((mp.scaler.get_scale(), params_digest(model)))
    assert_all_ranks(comm, len(set(state)) == 1, f"scales / replicas differ after the skip: {state}")
