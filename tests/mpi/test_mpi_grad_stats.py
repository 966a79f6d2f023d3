"""``--grad-stats`` under mpirun: every stage's and replica's statistics reach rank 0's metrics file, and they are
the one-process run's (float rounding: the gradients are summed in another order).

At -n 2: --dp 2, --pp 2 and --dp 2 --zero 1; at -n 4: --dp 2 --pp 2 and --dp 4 --zero 1. Each against the
same run in one process (``python -m llm train --grad-stats`` in-process on every rank).
"""

import os

import pytest

from llm import train as train_mod
from llm.trainer import read_metrics
from parallel import Communicator

pytestmark = pytest.mark.mpi



@pytest.fixture(scope="module")
def folder(comm, shared_folder, write_word_corpus):
    yield from shared_folder(comm, "grad-stats-", lambda path: write_word_corpus(path, seed=1))


def argv(folder, out, *extra):
    return ["--data", os.path.join(folder, "corpus.txt"), "--data-dir", os.path.join(folder, "cache"),
            "--vocab-size", "280", "--n-layer", "4", "--n-head", "2", "--n-embd", "32", "--block-size", "16",
            "--batch-size", "4", "--grad-accum", "2", "--eval-batches", "2", "--eval-interval", "1000",
            "--log-interval", "2", "--sample-tokens", "0", "--warmup-steps", "2", "--no-progress", "--max-steps",
            "2", "--grad-stats", "--out-dir", os.path.join(folder, out), *extra]


def flatten(stats, prefix=""):
    """``{"h.0/grad_norm": 0.1, "h.0/groups/attn/grad_norm": ...}`` of a nested grad_stats object."""
    out = {}
    for k, v in stats.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}/"))
        else:
            out[prefix + k] = v
    return out


def compare(got, want):
    """'' when the two runs' statistics agree (float rounding), else what differs."""
    if [r["step"] for r in got] != [r["step"] for r in want]:
        return f"logged steps {[r['step'] for r in got]} vs {[r['step'] for r in want]}"
    for a, b in zip(got, want):
        fa, fb = flatten(a.get("grad_stats", {})), flatten(b.get("grad_stats", {}))
        if not fb or sorted(fa) != sorted(fb):
            return f"step {b['step']}: keys {sorted(fa)} vs {sorted(fb)}"
        for key, want_v in fb.items():
            rtol = 1e-3 if key.endswith("update_ratio") else 1e-4  # AdamW's step amplifies rounding a little
            if not abs(fa[key] - want_v) <= rtol * abs(want_v) + 1e-12:
                return f"step {b['step']} {key}: {fa[key]} vs one process {want_v}"
    return ""


@pytest.mark.parametrize("layout", ["dp", "pp", "zero"])
def test_statistics_of_every_rank_reach_the_metrics_and_equal_one_process(comm, assert_all_ranks, folder, layout):
    if comm.size == 4:
        flags = {"dp": ["--dp", "4"], "pp": ["--dp", "2", "--pp", "2"], "zero": ["--dp", "4", "--zero", "1"]}[layout]
    else:
        flags = {"dp": ["--dp", "2"], "pp": ["--pp", "2"], "zero": ["--dp", "2", "--zero", "1"]}[layout]
    out = f"par-{layout}"
    rc = train_mod.main(argv(folder, out, *flags), comm=comm)
    assert_all_ranks(comm, rc == 0, f"exit code {rc}")
    msg = ""
    if comm.rank == 0:
        ref = f"single-{layout}"
        rc = train_mod.main(argv(folder, ref), comm=Communicator())
        got = read_metrics(os.path.join(folder, out, "metrics.jsonl"))
        want = read_metrics(os.path.join(folder, ref, "metrics.jsonl"))
        layers = list(want[0].get("grad_stats", {}))
        msg = f"reference exit {rc}" if rc else compare(got, want)
        if not msg and layers != ["embed", "h.0", "h.1", "h.2", "h.3", "head"]:
            msg = f"layers {layers}"
    assert_all_ranks(comm, msg == "", msg)
