"""ZeRO-1 (sharded AdamW) under mpirun: equal to plain AdamW, 1/N of its state, checkpoints that re-shard."""

import json
import os
import shutil
import tempfile

import numpy as np
import pytest

import autograd
import nn
from nn.amp import DynamicLossScaler, MixedPrecision
from parallel import ZeroAdamW

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


def groups(model):
    return nn.optim.param_groups_for_gpt(model, weight_decay=0.1)


def global_batch(step, dtype=np.float64):
    g = np.random.default_rng(200 + step)
    return g.standard_normal((B, D_IN)).astype(dtype), g.integers(0, D_OUT, size=B)


def local_slice(comm, x, y):
    n = len(x) // comm.size
    return x[comm.rank * n:(comm.rank + 1) * n], y[comm.rank * n:(comm.rank + 1) * n]


def loss_of(model, x, y):
    return autograd.cross_entropy(model(autograd.Tensor(x)), y)


def run_reference(steps, max_norm=None, extra=False, model=None, opt=None, start=0):
    """One process, the whole batch, nn.optim.AdamW."""
    model = make_model(0, extra=extra) if model is None else model
    opt = nn.optim.AdamW(groups(model), **HYPER) if opt is None else opt
    for step in range(start, start + steps):
        loss_of(model, *global_batch(step)).backward()
        if max_norm is not None:
            nn.optim.clip_grad_norm_(model.parameters(), max_norm)
        opt.step()
        opt.zero_grad()
    return model, opt


def run_zero(comm, steps, max_norm=None, extra=False, model=None, opt=None, start=0):
    model = make_model(seed=comm.rank, extra=extra) if model is None else model  # rank 0's weights are broadcast
    opt = ZeroAdamW(groups(model), comm, **HYPER) if opt is None else opt
    for step in range(start, start + steps):
        loss_of(model, *local_slice(comm, *global_batch(step))).backward()
        opt.step(max_norm=max_norm)  # no scaler: always applied
        opt.zero_grad()
    return model, opt


def max_rel_diff(model, ref):
    ref = dict(ref.named_parameters())
    return max(rel_diff(p.data, ref[n].data) for n, p in model.named_parameters())


def rel_diff(a, b):
    """max |a - b| / max |b| (max |a - b| where b is all zeros); NaN counts as infinitely wrong."""
    d = float(np.max(np.abs(a - b))) / (float(np.max(np.abs(b))) or 1.0)
    return d if d == d else float("inf")


@pytest.mark.parametrize("max_norm", [None, 0.05], ids=["no-clip", "clip"])
def test_zero_equals_adamw(comm, assert_all_ranks, max_norm):
    ref, ref_opt = run_reference(5, max_norm)
    model, opt = run_zero(comm, 5, max_norm)
    err = max_rel_diff(model, ref)
    assert_all_ranks(comm, err <= TOL, f"ZeRO-1 vs AdamW after 5 steps: {err:.3e}")
    if max_norm is not None:
        assert_all_ranks(comm, opt.last_grad_norm > max_norm, f"clipping not exercised: {opt.last_grad_norm}")
    sd = opt.state_dict()
    want = ref_opt.state_dict()
    ok = sd["step"] == want["step"] and set(sd["state"]) == set(want["state"])
    worst = 0.0
    for name, entry in want["state"].items():
        for k in ("exp_avg", "exp_avg_sq"):
            worst = max(worst, rel_diff(sd["state"][name][k], entry[k]))
        ok = ok and sd["state"][name]["step"] == entry["step"]
    assert_all_ranks(comm, ok and worst <= 1e-10, f"gathered state differs from AdamW's: {worst:.3e}")
    assert_all_ranks(comm, sd["param_groups"] == want["param_groups"], "param_groups differ")


def test_weight_decay_per_group_and_unused_parameters(comm, assert_all_ranks):
    ref, _ = run_reference(3, extra=True)
    model, opt = run_zero(comm, 3, extra=True)
    err = max_rel_diff(model, ref)
    assert_all_ranks(comm, err <= TOL, f"ZeRO-1 with an unused layer vs AdamW: {err:.3e}")
    unused = [n for n, p in model.named_parameters() if n.startswith("3.")]
    sd = opt.state_dict()
    assert_all_ranks(comm, unused and not any(n in sd["state"] for n in unused), "unused parameters got state")
    wd = [g["weight_decay"] for g in opt.param_groups]
    assert_all_ranks(comm, sorted(wd) == [0.0, 0.1], f"groups {wd}")


def test_optimizer_memory_is_one_nth(comm, assert_all_ranks):
    model, opt = run_zero(comm, 1)
    ref, ref_opt = run_reference(1)
    n = sum(p.size for p in model.parameters())
    unsharded = sum(a.nbytes for st in ref_opt.state.values() for k, a in st.items() if k != "step")
    per_rank = opt.state_bytes()
    chunk = -(-n // comm.size)
    assert_all_ranks(comm, unsharded == 2 * 8 * n, f"AdamW state {unsharded} bytes for {n} weights")
    assert_all_ranks(comm, per_rank == 2 * 8 * chunk, f"ZeRO state {per_rank} bytes, chunk {chunk}")
    assert_all_ranks(comm, per_rank * comm.size - unsharded < 2 * 8 * comm.size,
                     f"{per_rank} x {comm.size} is more than AdamW's {unsharded} plus padding")
    total = comm.allreduce(per_rank)
    assert_all_ranks(comm, total == 2 * 8 * chunk * comm.size, f"total {total}")


def test_mixed_precision_master_shards_match_mixedprecision(comm, assert_all_ranks):
    """float16 model, float32 master shards: every rank sees the same data, so the mean gradient is exact."""
    ref_model = make_model(0, dtype=np.float32)
    mp = MixedPrecision(ref_model, "fp16", scaler=DynamicLossScaler(init_scale=2.0 ** 8))
    ref_opt = nn.optim.AdamW(mp.param_groups_for_gpt(0.1), **HYPER)
    model = make_model(comm.rank, dtype=np.float32)
    opt = ZeroAdamW(groups(model), comm, compute_dtype="float16", **HYPER)
    scaler = DynamicLossScaler(init_scale=2.0 ** 8)
    n = sum(p.size for p in model.parameters())
    chunk = -(-n // comm.size)
    assert_all_ranks(comm, all(p.dtype == np.float16 for p in model.parameters()), "model not cast to float16")
    assert_all_ranks(comm, opt.state_bytes() == 3 * 4 * chunk, f"moments + master: {opt.state_bytes()} bytes")
    for step in range(3):
        x, y = global_batch(step, np.float32)
        mp.backward(loss_of(ref_model, x.astype(np.float16), y))
        mp.step(ref_opt, max_norm=1.0)
        scaler.scale(loss_of(model, x.astype(np.float16), y)).backward()
        stepped = opt.step(scaler=scaler, max_norm=1.0)
        opt.zero_grad()
        assert_all_ranks(comm, stepped, "clean step skipped")
    masters = opt.state_dict()["master"]
    # the gradients agree exactly; only the clipping norm is summed in a different order
    err = max(rel_diff(masters[name], m.data) for name, m in mp.master_named_parameters())
    assert_all_ranks(comm, err <= 1e-5, f"float32 masters differ from MixedPrecision's by {err:.3e}")
    rounded = all(np.array_equal(p.data, masters[n].astype(np.float16)) for n, p in model.named_parameters())
    assert_all_ranks(comm, rounded, "float16 parameters are not the rounded master weights")


@pytest.mark.parametrize("where", ["input", "one-element"])
def test_overflow_on_one_rank_skips_on_all(comm, assert_all_ranks, where):
    model = make_model(comm.rank, dtype=np.float32)
    opt = ZeroAdamW(groups(model), comm, compute_dtype="float16", **HYPER)
    scaler = DynamicLossScaler(init_scale=2.0 ** 8)
    before = [p.data.copy() for p in model.parameters()]
    results = []
    last = comm.size - 1
    for step in range(2):
        x, y = local_slice(comm, *global_batch(step, np.float32))
        if step == 0 and comm.rank == last and where == "input":
            x[0, 0] = 1e30  # inf once cast to float16: every gradient of this rank overflows
        with np.errstate(over="ignore", invalid="ignore"):
            scaler.scale(loss_of(model, x.astype(np.float16), y)).backward()
        if step == 0 and comm.rank == last and where == "one-element":
            # the first flat element lies in rank 0's shard: only rank 0 sees the inf after the reduce-scatter
            opt.param_groups[0]["params"][0][1].grad.reshape(-1)[0] = np.inf
        results.append(opt.step(scaler=scaler))
        opt.zero_grad()
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
        ZeroAdamW(params, comm)
        msg = ""
    except ValueError as e:
        msg = str(e)
    assert_all_ranks(comm, "differs across ranks" in msg and "2.bias" in msg, f"error: {msg!r}")


# -- checkpoints: save on N ranks, resume on fewer ---------------------------------------------


def save_checkpoint(path, model, opt_state):
    """npz for the arrays, JSON for the rest (no pickle)."""
    arrays = {f"model/{n}": p.data for n, p in model.named_parameters()}
    meta = {"step": opt_state["step"], "param_groups": opt_state["param_groups"], "state": {}}
    for name, entry in opt_state["state"].items():
        meta["state"][name] = {"step": entry["step"]}
        for k in ("exp_avg", "exp_avg_sq"):
            arrays[f"opt/{name}/{k}"] = entry[k]
    np.savez(path + ".npz", **arrays)
    with open(path + ".json", "w") as f:
        json.dump(meta, f)


def load_checkpoint(path):
    with np.load(path + ".npz") as z:
        arrays = {k: z[k] for k in z.files}
    with open(path + ".json") as f:
        meta = json.load(f)
    model_sd = {k[len("model/"):]: v for k, v in arrays.items() if k.startswith("model/")}
    for name, entry in meta["state"].items():
        entry["exp_avg"] = arrays[f"opt/{name}/exp_avg"]
        entry["exp_avg_sq"] = arrays[f"opt/{name}/exp_avg_sq"]
    return model_sd, meta


def test_state_dict_resumes_on_a_different_world_size(comm, assert_all_ranks):
    ref, _ = run_reference(4)
    model, opt = run_zero(comm, 2)
    sd = opt.state_dict()  # collective: every rank gets the full state
    folder = comm.bcast(tempfile.mkdtemp(prefix="zero-ckpt-") if comm.rank == 0 else None)
    path = os.path.join(folder, "ckpt")
    if comm.rank == 0:
        save_checkpoint(path, model, sd)
    comm.barrier()
    model_sd, opt_sd = load_checkpoint(path)

    # every rank alone: a plain AdamW resumes from the sharded run's checkpoint
    solo = make_model(99)
    solo.load_state_dict(model_sd)
    solo_opt = nn.optim.AdamW(groups(solo), **HYPER)
    solo_opt.load_state_dict(opt_sd)
    run_reference(2, model=solo, opt=solo_opt, start=2)
    err_solo = max_rel_diff(solo, ref)

    # fewer ranks: the first half of the world (one rank when there are two) resumes with ZeRO
    m = max(1, comm.size // 2)
    sub = comm.split(0 if comm.rank < m else None)
    err_sub, bytes_ok = 0.0, True
    if sub is not None:
        resumed = make_model(50 + comm.rank)
        resumed.load_state_dict(model_sd)
        ropt = ZeroAdamW(groups(resumed), sub, **HYPER)
        ropt.load_state_dict(opt_sd)
        n = sum(p.size for p in resumed.parameters())
        bytes_ok = ropt.state_bytes() == 2 * 8 * -(-n // m)
        run_zero(sub, 2, model=resumed, opt=ropt, start=2)
        err_sub = max_rel_diff(resumed, ref)
        sub.free()
    comm.barrier()
    if comm.rank == 0:
        shutil.rmtree(folder, ignore_errors=True)
    assert_all_ranks(comm, err_solo <= TOL, f"AdamW resumed from a {comm.size}-rank ZeRO checkpoint: {err_solo:.3e}")
    assert_all_ranks(comm, err_sub <= TOL, f"ZeRO resumed on {m} rank(s) from {comm.size}: {err_sub:.3e}")
    assert_all_ranks(comm, bytes_ok, "re-sharded state has the wrong size")
