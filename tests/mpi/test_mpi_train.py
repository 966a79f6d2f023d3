"""`python -m llm train --dp a --pp b` under mpirun, called in-process on every rank (``main(argv, comm=...)``).

A tiny GPT (2 layers, 32 wide, block 16) on a small generated corpus, a few
steps. The parallel run's losses must be the single-process run's (float32:
the sums run in another order, so 1e-5 relative, not bitwise), rank 0 alone
writes the one checkpoint, and that checkpoint resumes on another number of
processes (and in one process) with the uninterrupted run's losses.
"""

import os

import pytest

from llm import train as train_mod
from llm.checkpoint import load_model
from llm.trainer import read_metrics
from parallel import Communicator

pytestmark = pytest.mark.mpi

TOL = 1e-5


@pytest.fixture(scope="module")
def folder(comm, shared_folder, write_word_corpus):
    """A corpus and a cache folder shared by all ranks (made by rank 0), removed at the end."""
    yield from shared_folder(comm, "train-parallel-", lambda path: write_word_corpus(path, seed=0))


def argv(folder, out, steps, *extra):
    return ["--data", os.path.join(folder, "corpus.txt"), "--data-dir", os.path.join(folder, "cache"),
            "--vocab-size", "280", "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "16",
            "--batch-size", "4", "--grad-accum", "2", "--eval-batches", "2", "--eval-interval", "1000",
            "--log-interval", "1", "--sample-tokens", "0", "--warmup-steps", "2", "--lr-decay-steps", "6",
            "--no-progress", "--max-steps", str(steps), "--out-dir", os.path.join(folder, out), *extra]


def losses(folder, out):
    return [r["loss"] for r in read_metrics(os.path.join(folder, out, "metrics.jsonl")) if "loss" in r]


def single_process(folder, out, steps, *extra):
    """The single-process run (the one-process stand-in communicator: no MPI), on rank 0 only."""
    return train_mod.main(argv(folder, out, steps, *extra), comm=Communicator())


def sub_world(comm, n):
    if n == 1:
        comm.split(color=None)
        return Communicator() if comm.rank == 0 else None
    return comm.split(color=0 if comm.rank < n else None)


def close(a, b):
    return len(a) == len(b) and all(abs(x - y) <= TOL * abs(y) for x, y in zip(a, b))


def test_dp_pp_run_writes_one_checkpoint_and_matches_one_process(comm, assert_all_ranks, folder):
    dp, pp = (2, 2) if comm.size == 4 else (1, comm.size)
    rc = train_mod.main(argv(folder, "par", 3, "--dp", str(dp), "--pp", str(pp), "--sample-tokens", "4"), comm=comm)
    assert_all_ranks(comm, rc == 0, f"exit code {rc}")
    ok, msg = True, ""
    if comm.rank == 0:
        ref_rc = single_process(folder, "single", 3)
        files = sorted(os.listdir(os.path.join(folder, "par")))
        model, tok, meta = load_model(os.path.join(folder, "par", "ckpt.safetensors"))
        got, want = losses(folder, "par"), losses(folder, "single")
        if ref_rc != 0 or files != ["ckpt.safetensors", "metrics.jsonl"] or meta["step"] != 3:
            ok, msg = False, f"reference exit {ref_rc}; files {files}; step {meta.get('step')}"
        elif model.config.n_layer != 2 or len(dict(model.named_parameters())) != len(list(model.parameters())):
            ok, msg = False, "the checkpoint is not the whole model"
        elif not close(got, want):
            ok, msg = False, f"losses {got} vs one process {want}"
    assert_all_ranks(comm, ok, msg)


@pytest.mark.parametrize("order", ["world-2-1", "2-world-1", "zero2-world-1"])
def test_resume_on_other_world_sizes_continues_the_losses(comm, assert_all_ranks, folder, order):
    """Steps 1-2, 3-4 and 5 on different numbers of processes and layouts: the uninterrupted run's losses.

    At -n 4: 4 processes (dp 2 x pp 2, 1F1B) -> 2 (pp 2, GPipe) -> 1, and 2 (dp 2) -> 4 -> 1, and 2 (dp 2 with
    ZeRO-1) -> 4 -> 1. At -n 2 the world is 2 processes: pp 2 -> pp 2 (GPipe) -> 1, dp 2 -> pp 2 -> 1, and dp 2
    with ZeRO-1 -> pp 2 -> 1.
    """
    out = f"resume-{order}"
    world_flags = ["--dp", "2", "--pp", "2"] if comm.size == 4 else ["--pp", "2"]
    if order == "world-2-1":
        legs = [(comm.size, world_flags), (2, ["--pp", "2", "--schedule", "gpipe"])]
    elif order == "2-world-1":
        legs = [(2, ["--dp", "2"]), (comm.size, world_flags)]
    else:
        legs = [(2, ["--dp", "2", "--zero", "1"]), (comm.size, world_flags)]
    rc = 0
    for k, (n, flags) in enumerate(legs):
        sub = comm if n == comm.size else sub_world(comm, n)
        if sub is not None:
            resume = ["--resume"] if k else []
            rc = max(rc, train_mod.main(argv(folder, out, 2 * (k + 1), *flags, *resume), comm=sub))
            if sub is not comm:
                sub.free()
        comm.barrier()
    ok, msg = rc == 0, f"exit code {rc}"
    if comm.rank == 0 and ok:
        rc3 = single_process(folder, out, 5, "--resume")
        ref = single_process(folder, f"single5-{order}", 5)
        got, want = losses(folder, out), losses(folder, f"single5-{order}")
        ok, msg = rc3 == 0 and ref == 0 and close(got, want), f"exit {rc3}/{ref}; losses {got} vs {want}"
    assert_all_ranks(comm, ok, msg)


@pytest.mark.parametrize("flags,words", [
    (["--dp", "3", "--pp", "1"], "--dp 3 x --pp 1 = 3 processes, but the job has"),
    (["--pp", "3"], "--pp 3 does not divide the job's"),
    (["--pp", "2", "--micro-batches", "3"], "cannot be split into --micro-batches 3 equal parts"),
    (["--pp", "2", "--stage-layout", "2,1"], "add up to 3 blocks, but the model has n_layer=2"),
])
def test_bad_layout_is_a_clear_error_on_every_rank(comm, assert_all_ranks, folder, capsys, flags, words):
    if flags[:2] == ["--pp", "2"] and comm.size != 2:
        flags = ["--dp", str(comm.size // 2)] + flags
    rc = train_mod.main(argv(folder, "bad", 1, *flags), comm=comm)
    err = capsys.readouterr().err
    assert_all_ranks(comm, rc == 2 and words in err, f"exit {rc}, stderr {err[-300:]!r}")
