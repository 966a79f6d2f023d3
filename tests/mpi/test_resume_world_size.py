"""A checkpoint saved by one layout resumes on another (4 -> 2, 2 -> 4, 2 -> 1, 1 -> 2 ranks; ZeRO -> no ZeRO).

One run trains a few steps through the trainer's ``Layout`` on ``n`` ranks (a
sub-group of the world; ``n == 1`` is the one-process stand-in, no MPI); rank 0
writes ONE checkpoint file with the full model and AdamW state by parameter
name (``Layout.gather_state`` + ``save_training_checkpoint``); a second run on
another number of ranks, with another layout, loads it (``Layout.load_state``,
re-partitioned by its own stages or shards) and takes more steps. Its losses
must be those of an uninterrupted single-process run (float64, 1e-12 relative).
"""

import os
import shutil
import tempfile

import numpy as np
import pytest

import nn
from llm.checkpoint import load_checkpoint
from llm.model import GPT, GPTConfig
from llm.trainer import Job, Layout, ResumeError, TrainingCheckpoint
from llm.trainer.checkpoint import save_training_checkpoint
from parallel import Communicator

pytestmark = pytest.mark.mpi

CONFIG = GPTConfig(vocab_size=32, block_size=8, n_layer=4, n_head=2, n_embd=16)
ROWS, MICRO = 8, 2  # global batch rows; micro-batches per replica
STEPS_BEFORE, STEPS_AFTER = 2, 2
TOL = 1e-12
JOB = Job()


def batch(step):
    g = np.random.default_rng(500 + step)
    x = g.integers(0, CONFIG.vocab_size, size=(ROWS, CONFIG.block_size))
    y = g.integers(0, CONFIG.vocab_size, size=(ROWS, CONFIG.block_size))
    y[1, 3:] = -100
    return x, y


def reference_losses():
    model = GPT(CONFIG, generator=np.random.default_rng(0), dtype=np.float64)
    opt = nn.optim.AdamW(nn.optim.param_groups_for_gpt(model, 0.1), lr=3e-2)
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
    """Train ``steps`` steps on ``sub`` in layout ``(n, dp, pp, zero)``; optionally load before and save after."""
    _, dp, pp, zero = layout
    # a different initialisation when loading: only the checkpoint can make the losses right
    model = GPT(CONFIG, generator=np.random.default_rng(0 if load is None else 12345), dtype=np.float64)
    ckpt = None
    if load is not None:
        ckpt = TrainingCheckpoint.load(load)
        if ckpt.step != first_step:
            return [f"the checkpoint says step {ckpt.step}, expected {first_step}"]
        ckpt.load_model(model)
    lay = Layout.build(model, sub, dp=dp, pp=pp, zero=zero, precision="fp64", n_micro=MICRO)
    opt = nn.optim.AdamW(lay.mp.master_params_for(JOB.param_groups(lay.model, 0.1)), lr=3e-2)
    if ckpt is not None:
        lay.load_state(ckpt.model_state(), ckpt.optimizer_state(), opt, ckpt.scaler_state)
    losses = []
    for step in range(first_step, first_step + steps):
        x, y = batch(step)
        n = ROWS // dp
        rows = slice(lay.grid.dp_rank * n, (lay.grid.dp_rank + 1) * n)
        losses.append(lay.step(JOB, opt, {"input_ids": x[rows], "labels": y[rows]}, MICRO, 1.0).loss)
    if save is not None:
        model_state, opt_state = lay.gather_state(opt)
        if sub.rank == 0:
            save_training_checkpoint(save, model_state=model_state, opt_state=opt_state, config=CONFIG,
                                     precision={"compute_dtype": "float64", "master_dtype": "float64"},
                                     scaler_state=lay.mp.scaler.state_dict(), sampler_state={"step": first_step + steps},
                                     step=first_step + steps, seed=0, job="test", tokenizer_json=None)
        sub.barrier()
    lay.grid.dp_comm.free()
    lay.grid.pp_comm.free()
    return losses


@pytest.mark.parametrize("before,after", [
    ((4, 2, 2, False), (2, 1, 2, False)),  # 4 ranks (2 replicas x 2 stages) -> 2 ranks (2 stages)
    ((2, 1, 2, False), (4, 1, 4, False)),  # 2 stages -> 4 stages
    ((2, 1, 2, False), (1, 1, 1, False)),  # 2 stages -> one process, no MPI
    ((1, 1, 1, False), (2, 2, 1, False)),  # one process -> 2 data-parallel replicas
    ((2, 2, 1, True), (1, 1, 1, False)),   # ZeRO-1 over 2 replicas -> one process without ZeRO
    ((4, 2, 2, True), (4, 4, 1, True)),    # ZeRO-1 on 2 x 2 -> ZeRO-1 over 4 replicas (other shards)
], ids=["4to2", "2to4", "2to1", "1to2", "zero2to1", "zero2x2to4"])
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
            moments = {k[len("optim.exp_avg."):] for k in tensors if k.startswith("optim.exp_avg.")}
            if files != ["ckpt.safetensors"] or names != full or moments != full or meta["step"] != STEPS_BEFORE:
                ok, msg = False, f"checkpoint folder {files}, tensors {sorted(names ^ full)} {sorted(moments ^ full)}"
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
    try:
        TrainingCheckpoint.load("/nonexistent/ckpt.safetensors")
        raised = ""
    except ResumeError as e:
        raised = str(e)
    assert_all_ranks(comm, "does not exist" in raised, f"expected a ResumeError, got {raised!r}")
