"""ZeRO-1 (``parallel.ShardedMasters``) under mpirun: equal to plain AdamW, 1/N of its state, skips agreed by all.

The sharded masters plug into ``nn.amp.MixedPrecision`` like the default ones;
a plain ``nn.optim.AdamW`` over them keeps moments for this rank's shard only.
Each rank's loss is its rows' summed loss over the global batch size, and the
reduce-scatter sums the gradients, so the result is one process's on the
whole batch (float64: 1e-12 relative).
"""

import numpy as np
import pytest

import autograd
import nn
from nn.amp import DynamicLossScaler, MixedPrecision
from parallel import ShardedMasters
from parallel.ddp import agree_found_inf, broadcast_module
from parallel.pipeline_exec import clip_grad_norm_global_, global_grad_norm

pytestmark = pytest.mark.mpi

B = 12
D_IN, HIDDEN, D_OUT = 5, 7, 3  # 5*7 + 7 + 7*3 + 3 = 66 weights: shards split parameters in the middle
TOL = 1e-12
HYPER = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8)


def make_model(seed, dtype=np.float64, extra=False):
    g = np.random.default_rng(seed)
    layers = [nn.Linear(D_IN, HIDDEN, generator=g, init_std=0.5, dtype=dtype), nn.GELU(),
              nn.Linear(HIDDEN, D_OUT, generator=g, init_std=0.5, dtype=dtype)]
    if extra:  # a layer that is never called: its parameters never get a gradient
        layers.append(nn.Linear(D_OUT, 2, generator=g, init_std=0.5, dtype=dtype))
    model = nn.Sequential(*layers)
    if extra:
        model.forward = lambda x: layers[2](layers[1](layers[0](x)))
    return model


def global_batch(step, dtype=np.float64):
    g = np.random.default_rng(200 + step)
    return g.standard_normal((B, D_IN)).astype(dtype), g.integers(0, D_OUT, size=B)


def local_slice(comm, x, y):
    n = len(x) // comm.size
    return x[comm.rank * n:(comm.rank + 1) * n], y[comm.rank * n:(comm.rank + 1) * n]


def run_reference(steps, max_norm=None, extra=False):
    """One process, the whole batch, nn.optim.AdamW."""
    model = make_model(0, extra=extra)
    opt = nn.optim.AdamW(nn.optim.param_groups_for_gpt(model, 0.1), **HYPER)
    for step in range(steps):
        x, y = global_batch(step)
        autograd.cross_entropy(model(autograd.Tensor(x)), y).backward()
        if max_norm is not None:
            nn.optim.clip_grad_norm_(model.parameters(), max_norm)
        opt.step()
        opt.zero_grad()
    return model, opt


def zero_setup(comm, model, precision="fp64", scaler=None):
    """Rank 0's weights everywhere, then sharded masters under MixedPrecision and AdamW over them."""
    broadcast_module(comm, model)
    dtype = np.float64 if precision == "fp64" else np.float32
    masters = ShardedMasters(model.named_parameters(), comm, master_dtype=dtype)
    mp = MixedPrecision(model, precision, scaler=scaler, masters=masters)
    return mp, nn.optim.AdamW(mp.param_groups_for_gpt(0.1), **HYPER)


def zero_step(comm, model, mp, opt, x, y, max_norm=None, n_global=B):
    """Local rows' summed loss over the global count ``n_global``, backward, then the sharded step; returns stepped."""
    loss = autograd.cross_entropy(model(mp.cast_input(autograd.Tensor(x))), y, reduction="sum") / n_global
    mp.backward(loss)

    def norm(named, mn):
        return clip_grad_norm_global_(named, mn, comm) if mn else global_grad_norm(named, comm)

    return mp.step(opt, max_norm, agree_found_inf=lambda f: agree_found_inf(comm, f), grad_norm=norm)


def run_zero(comm, steps, max_norm=None, extra=False):
    model = make_model(seed=comm.rank, extra=extra)  # rank 0's weights are broadcast
    mp, opt = zero_setup(comm, model)
    for step in range(steps):
        assert zero_step(comm, model, mp, opt, *local_slice(comm, *global_batch(step)), max_norm)
    return model, mp, opt


def rel_diff(a, b):
    """max |a - b| / max |b| (max |a - b| where b is all zeros); NaN counts as infinitely wrong."""
    d = float(np.max(np.abs(a - b))) / (float(np.max(np.abs(b))) or 1.0)
    return d if d == d else float("inf")


def max_rel_diff(model, ref):
    ref = dict(ref.named_parameters())
    return max(rel_diff(p.data, ref[n].data) for n, p in model.named_parameters())


def full_groups(model):
    return [[n for n, _ in g["params"]] for g in nn.optim.param_groups_for_gpt(model, 0.1)]


@pytest.mark.parametrize("max_norm", [None, 0.05], ids=["no-clip", "clip"])
def test_zero_equals_adamw(comm, assert_all_ranks, max_norm):
    ref, ref_opt = run_reference(5, max_norm)
    model, mp, opt = run_zero(comm, 5, max_norm)
    err = max_rel_diff(model, ref)
    assert_all_ranks(comm, err <= TOL, f"ZeRO-1 vs AdamW after 5 steps: {err:.3e}")
    if max_norm is not None:
        assert_all_ranks(comm, mp.last_grad_norm > max_norm, f"clipping not exercised: {mp.last_grad_norm}")
    sd = mp.masters.optimizer_state(opt, full_groups(model))  # collective: the full state on every rank
    want = ref_opt.state_dict()
    ok = sd["step"] == want["step"] and set(sd["state"]) == set(want["state"])
    worst = 0.0
    for name, entry in want["state"].items():
        for k in ("exp_avg", "exp_avg_sq"):
            worst = max(worst, rel_diff(sd["state"][name][k], entry[k]))
        ok = ok and sd["state"][name]["step"] == entry["step"]
    assert_all_ranks(comm, ok and worst <= 1e-10, f"gathered state differs from AdamW's: {worst:.3e}")
    assert_all_ranks(comm, [g["params"] for g in sd["param_groups"]] == [g["params"] for g in want["param_groups"]],
                     "param_groups differ")


def test_weight_decay_per_group_and_unused_parameters(comm, assert_all_ranks):
    ref, _ = run_reference(3, extra=True)
    model, mp, opt = run_zero(comm, 3, extra=True)
    err = max_rel_diff(model, ref)
    assert_all_ranks(comm, err <= TOL, f"ZeRO-1 with an unused layer vs AdamW: {err:.3e}")
    unused = [n for n, p in model.named_parameters() if n.startswith("3.")]
    sd = mp.masters.optimizer_state(opt, full_groups(model))
    assert_all_ranks(comm, unused and not any(n in sd["state"] for n in unused), "unused parameters got state")


def test_optimizer_memory_is_one_nth(comm, assert_all_ranks):
    model, mp, opt = run_zero(comm, 1)
    _, ref_opt = run_reference(1)
    n = sum(p.size for p in model.parameters())
    unsharded = sum(a.nbytes for st in ref_opt.state.values() for k, a in st.items() if k != "step")
    moments = sum(a.nbytes for st in opt.state.values() for k, a in st.items() if k != "step")
    chunk = -(-n // comm.size)
    assert_all_ranks(comm, unsharded == 2 * 8 * n, f"AdamW state {unsharded} bytes for {n} weights")
    assert_all_ranks(comm, moments <= 2 * 8 * chunk and mp.masters.state_bytes() == 8 * chunk,
                     f"moments {moments} bytes, masters {mp.masters.state_bytes()}, chunk {chunk}")
    total = comm.allreduce(moments)
    assert_all_ranks(comm, total == unsharded, f"the shards' moments add up to {total}, AdamW's to {unsharded}")


def test_mixed_precision_master_shards_match_mixedprecision(comm, assert_all_ranks):
    """float16 model, float32 master shards: the same float32 masters as MixedPrecision's.

    Every rank takes the whole batch (its loss divided by world x B), so the float16 gradients are the reference's
    up to their scaling; the rest is float32 arithmetic summed in another order (1e-5)."""
    ref_model = make_model(0, dtype=np.float32)
    mp_ref = MixedPrecision(ref_model, "fp16", scaler=DynamicLossScaler(init_scale=2.0 ** 8))
    ref_opt = nn.optim.AdamW(mp_ref.param_groups_for_gpt(0.1), **HYPER)
    model = make_model(comm.rank, dtype=np.float32)
    mp, opt = zero_setup(comm, model, "fp16", scaler=DynamicLossScaler(init_scale=2.0 ** 8))
    assert_all_ranks(comm, all(p.dtype == np.float16 for p in model.parameters()), "model not cast to float16")
    for step in range(3):
        x, y = global_batch(step, np.float32)
        mp_ref.backward(autograd.cross_entropy(ref_model(autograd.Tensor(x.astype(np.float16))), y))
        mp_ref.step(ref_opt, max_norm=1.0)
        stepped = zero_step(comm, model, mp, opt, x, y, max_norm=1.0, n_global=B * comm.size)
        assert_all_ranks(comm, stepped, "clean step skipped")
    masters = mp.masters.state_dict()
    err = max(rel_diff(masters[name], m.data) for name, m in mp_ref.master_named_parameters())
    assert_all_ranks(comm, err <= 1e-5, f"float32 masters differ from MixedPrecision's by {err:.3e}")
    rounded = all(np.array_equal(p.data, masters[n].astype(np.float16)) for n, p in model.named_parameters())
    assert_all_ranks(comm, rounded, "float16 parameters are not the rounded master weights")


@pytest.mark.parametrize("where", ["input", "one-element"])
def test_overflow_on_one_rank_skips_on_all(comm, assert_all_ranks, where):
    model = make_model(comm.rank, dtype=np.float32)
    scaler = DynamicLossScaler(init_scale=2.0 ** 8)
    mp, opt = zero_setup(comm, model, "fp16", scaler=scaler)
    before = [p.data.copy() for p in model.parameters()]
    results = []
    last = comm.size - 1
    for step in range(2):
        x, y = local_slice(comm, *global_batch(step, np.float32))
        if step == 0 and comm.rank == last and where == "input":
            x[0, 0] = 1e30  # inf once cast to float16: every gradient of this rank overflows
        with np.errstate(over="ignore", invalid="ignore"):
            loss = autograd.cross_entropy(model(mp.cast_input(autograd.Tensor(x))), y, reduction="sum") / B
            mp.backward(loss)
        if step == 0 and comm.rank == last and where == "one-element":
            # the first flat element lies in rank 0's shard: only rank 0 sees the inf after the reduce-scatter
            next(iter(model.parameters())).grad.reshape(-1)[0] = np.inf
        results.append(mp.step(opt, agree_found_inf=lambda f: agree_found_inf(comm, f),
                               grad_norm=lambda named, mn: global_grad_norm(named, comm)))
        if step == 0:
            unchanged = all(np.array_equal(a, p.data) for a, p in zip(before, model.parameters()))
    assert_all_ranks(comm, results == [False, True], f"applied: {results}")
    assert_all_ranks(comm, unchanged, "the skipped step changed parameters")
    scales = comm.allgather(scaler.get_scale())
    assert_all_ranks(comm, scales == [2.0 ** 7] * comm.size, f"scales {scales}")


def test_mismatched_parameters_raise_on_every_rank(comm, assert_all_ranks):
    model = make_model(0)
    params = list(model.named_parameters())
    if comm.rank == comm.size - 1:
        params = params[:-1]
    try:
        ShardedMasters(params, comm)
        msg = ""
    except ValueError as e:
        msg = str(e)
    assert_all_ranks(comm, "differs across ranks" in msg and "2.bias" in msg, f"error: {msg!r}")
