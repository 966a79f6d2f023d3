"""`python -m llm train --dp/--pp`: the flags, the error without enough processes, and the real command under mpirun.

The numerics of parallel training (losses equal to one process, resuming on
other world sizes) are tested under mpirun in tests/mpi/test_mpi_train.py;
here ``mpirun -n 2 python -m mpi4py -m llm train --pp 2`` runs as a user types it.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from llm import train as train_mod
from llm.checkpoint import load_model
from parallel import Communicator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mpirun_path():
    here = os.path.join(os.path.dirname(sys.executable), "mpirun")
    return here if os.path.exists(here) else None


def small_flags(tmp_path, steps=2):
    corpus = tmp_path / "corpus.txt"
    r = np.random.default_rng(0)
    words = "the cat sees a dog . my friend likes the moon .".split()
    corpus.write_text("\n".join(" ".join(words[i] for i in r.integers(len(words), size=10)) for _ in range(400)))
    return ["--data", str(corpus), "--data-dir", str(tmp_path / "cache"), "--vocab-size", "270", "--n-layer", "2",
            "--n-head", "2", "--n-embd", "16", "--block-size", "8", "--batch-size", "4", "--eval-batches", "1",
            "--log-interval", "1", "--sample-tokens", "0", "--warmup-steps", "1", "--no-progress",
            "--max-steps", str(steps), "--out-dir", str(tmp_path / "out")]


def test_help_explains_the_parallel_flags(capsys):
    assert train_mod.main(["--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--dp", "--pp", "--schedule", "--micro-batches", "--stage-layout", "mpirun -n 4"):
        assert flag in text, flag


def test_a_layout_the_world_cannot_take_is_a_clear_error(tmp_path, capsys):
    # a one-process communicator given: --dp/--pp must fit it (without one, --dp/--pp start mpirun)
    rc = train_mod.main(small_flags(tmp_path) + ["--pp", "3"], comm=Communicator())
    err = capsys.readouterr().err
    assert rc == 2
    assert "--pp 3 does not divide the job's 1 process(es)" in err and "mpirun -n" in err
    rc = train_mod.main(small_flags(tmp_path) + ["--dp", "2", "--pp", "2"], comm=Communicator())
    err = capsys.readouterr().err
    assert rc == 2 and "--dp 2 x --pp 2 = 4 processes, but the job has 1" in err
    rc = train_mod.main(small_flags(tmp_path) + ["--zero", "1"], comm=Communicator())
    assert rc == 2 and "--zero 1 shards the optimizer state over the data-parallel replicas" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bad_flag_values_are_rejected_by_argparse(capsys):
    assert train_mod.main(["--pp", "0"]) == 2
    assert train_mod.main(["--schedule", "zero-bubble"]) == 2
    assert "invalid choice: 'zero-bubble'" in capsys.readouterr().err


@pytest.mark.skipif(mpirun_path() is None, reason="mpirun is not installed (the mpi extra)")
def test_mpirun_python_m_llm_train_pp2(tmp_path):
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1",
               OPENBLAS_NUM_THREADS="1")
    cmd = [mpirun_path(), "-n", "2", "--oversubscribe", sys.executable, "-m", "mpi4py", "-m", "llm", "train",
           "--pp", "2", "--micro-batches", "4"] + small_flags(tmp_path)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("done: 2 steps") == 1  # only rank 0 prints
    assert "1 data-parallel replica(s) x 2 pipeline stage(s)" in proc.stdout
    model, tok, meta = load_model(tmp_path / "out" / "ckpt.safetensors")  # the whole model, one file
    assert meta["step"] == 2 and model.config.n_layer == 2 and tok.n_vocab == 270
    assert sorted(os.listdir(tmp_path / "out")) == ["ckpt.safetensors", "metrics.jsonl"]
