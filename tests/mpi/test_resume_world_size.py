"""A checkpoint saved by one dp x pp layout resumes on another (4 -> 2, 2 -> 4, 2 -> 1, 1 -> 2 ranks).

One run trains a few steps on ``n`` ranks (a sub-group of the world; ``n == 1``
is the one-process stand-in, no MPI), rank 0 writes ONE checkpoint file with
the full model and AdamW state by parameter name; a second run on another
number of ranks, with another stage layout, loads it (re-partitioned by its own
stages) and takes more steps. Its losses must be those of an uninterrupted
single-process run (float64, 1e-12 relative).
"""

import os
import shutil
import tempfile

import numpy as np
import pytest

import nn
from llm.checkpoint import CheckpointError, load_checkpoint
from llm.model import GPT, GPTConfig
from parallel import Communicator, make_grid
from llm.pipeline_stage import build_stage, load_pipeline_checkpoint, save_pipeline_checkpoint
from parallel.pipeline_exec import PipelineExecutor, split_micro_batches

pytestmark = pytest.mark.mpi

CONFIG = GPTConfig(vocab_size=32, block_size=8, n_layer=4, n_head=2, n_embd=16)
ROWS, MICRO = 8, 2  # global batch rows; micro-batches per replica
STEPS_BEFORE, STEPS_AFTER = 2, 2
TOL = 1e-12


def batch(step):
    g = np.random.default_rng(500 + step)
    x = g.integers(0, CONFIG.vocab_size, size=(ROWS, CONFIG.block_size))
    y = g.integers(0, CONFIG.vocab_size, size=(ROWS, CONFIG.block_size))
    y[1, 3:] = -100
    return x, y


def make_opt(module):
    return nn.optim.AdamW(nn.optim.param_groups_for_gpt(module, 0.1), lr=3e-2)


def reference_losses():
    model = GPT(CONFIG, generator=np.random.default_rng(0), dtype=np.float64)
    opt = make_opt(model)
    out = []
    for step in range(STEPS_BEFORE + STEPS_AFTER):
        x, y = batch(step)
        _, loss = model(x, targets=y)
        loss.backward()
        nn.optim.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        out.append(float(loss.data))
    return out


def sub_world(comm, n):
    """The first ``n`` ranks as a communicator (the one-process stand-in for n == 1); None on the others."""
    if n == 1:
        comm.split(color=None)  # a collective call: everyone takes part
        return Communicator() if comm.rank == 0 else None
    return comm.split(color=0 if comm.rank < n else None)


def run(sub, layout, steps, first_step, load=None, save=None):
    """Train ``steps`` steps on ``sub`` in layout ``(n, dp, pp)``; optionally load before and save after."""
    _, dp, pp = layout
    grid = make_grid(sub, dp, pp)
    # a different initialisation when loading: only the checkpoint can make the losses right
    seed = 0 if load is None else 12345
    stage = build_stage(CONFIG, grid.stage, pp, generator=np.random.default_rng(seed), dtype=np.float64)
    pipe = PipelineExecutor(stage, grid, n_micro=MICRO, schedule="1f1b")
    opt = make_opt(stage)
    losses = []
    if load is not None:
        meta = load_pipeline_checkpoint(load, grid, stage, opt)
        if meta["step"] != first_step:
            return [f"the checkpoint says step {meta['step']}, expected {first_step}"]
    for step in range(first_step, first_step + steps):
        x, y = batch(step)
        n = ROWS // dp
        xl, yl = x[grid.dp_rank * n:(grid.dp_rank + 1) * n], y[grid.dp_rank * n:(grid.dp_rank + 1) * n]
        result = pipe.step(split_micro_batches(xl, yl, MICRO))
        pipe.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad()
        losses.append(result.loss)
    if save is not None:
        save_pipeline_checkpoint(save, grid, stage, opt, metadata={"step": first_step + steps})
    grid.dp_comm.free()
    grid.pp_comm.free()
    return losses


@pytest.mark.parametrize("before,after", [
    ((4, 2, 2), (2, 1, 2)),   # 4 ranks (2 replicas x 2 stages) -> 2 ranks (2 stages)
    ((2, 1, 2), (4, 1, 4)),   # 2 stages -> 4 stages
    ((2, 1, 2), (1, 1, 1)),   # 2 stages -> one process, no MPI
    ((1, 1, 1), (2, 2, 1)),   # one process -> 2 data-parallel replicas
], ids=["4to2", "2to4", "2to1", "1to2"])
def test_resume_on_another_world_size(comm, assert_all_ranks, before, after):
    need = max(before[0], after[0])
    if need > comm.size:
        pytest.skip(f"needs {need} ranks")
    ref = reference_losses()
    folder = comm.bcast(tempfile.mkdtemp(prefix="pp-resume-") if comm.rank == 0 else None, root=0)
    path = os.path.join(folder, "ckpt.safetensors")
    ok, msg = True, ""
    try:
        sub = sub_world(comm, before[0])
        if sub is not None:
            got = run(sub, before, STEPS_BEFORE, 0, save=path)
            if not np.allclose(got, ref[:STEPS_BEFORE], rtol=TOL, atol=0):
                ok, msg = False, f"before: {got} vs {ref[:STEPS_BEFORE]}"
            if sub.size > 1:
                sub.free()
        comm.barrier()
        if comm.rank == 0:  # one file, in the single-process layout
            tensors, meta = load_checkpoint(path)
            files = os.listdir(folder)
            full = set(GPT(CONFIG).state_dict())
            names = {k[len("model."):] for k in tensors if k.startswith("model.")}
            if files != ["ckpt.safetensors"] or names != full or meta["step"] != STEPS_BEFORE:
                ok, msg = False, f"checkpoint folder {files}, model tensors {sorted(names ^ full)} differ"
        sub = sub_world(comm, after[0])
        if sub is not None:
            got = run(sub, after, STEPS_AFTER, STEPS_BEFORE, load=path)
            want = ref[STEPS_BEFORE:]
            if not np.allclose(got, want, rtol=TOL, atol=0):
                ok, msg = False, f"after resuming {before} -> {after}: {got} vs uninterrupted {want}"
            if sub.size > 1:
                sub.free()
    finally:
        comm.barrier()
        if comm.rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
    assert_all_ranks(comm, ok, msg)


def test_missing_checkpoint_raises_on_every_rank(comm, assert_all_ranks):
    grid = make_grid(comm, 1, comm.size)
    stage = build_stage(CONFIG, grid.stage, comm.size, generator=np.random.default_rng(0), dtype=np.float64)
    try:
        load_pipeline_checkpoint("/nonexistent/ckpt.safetensors", grid, stage)
        raised = ""
    except CheckpointError as e:
        raised = str(e)
    assert_all_ranks(comm, "does not exist" in raised, f"expected a CheckpointError, got {raised!r}")
