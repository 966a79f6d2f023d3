"""`python -m llm reward` and `python -m llm ppo` under mpirun with --dp: the same run as one process (float
rounding: gradients are summed in another order), and a run stopped and resumed on the same layout continues with
the uninterrupted run's losses bit for bit (for PPO: in the middle of an iteration, the pending rollouts restored).

PPO's rollouts are generated in chunks of --gen-batch rows, each from its own seeded stream, so every replica
samples exactly the tokens one process samples for those rows."""

import os
import sys
from pathlib import Path

import pytest

from llm.trainer import read_metrics
from parallel import Communicator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from rlhf_fixtures import chat_checkpoint, preference_file, prompt_file  # noqa: E402

pytestmark = pytest.mark.mpi

FIXTURES = str(Path(__file__).resolve().parent.parent / "rlhf_fixtures.py")
TOL = 1e-4


@pytest.fixture(scope="module")
def folder(comm, shared_folder):
    def fill(path):
        chat_checkpoint(os.path.join(path, "sft.safetensors"))
        preference_file(os.path.join(path, "prefs.jsonl"), n=32)
        prompt_file(os.path.join(path, "prompts.jsonl"))

    yield from shared_folder(comm, "rlhf-mpi-", fill)


def losses(folder, out):
    return [r["loss"] for r in read_metrics(os.path.join(folder, out, "metrics.jsonl")) if "loss" in r]


def close(a, b):
    return len(a) == len(b) and all(abs(x - y) <= TOL * max(abs(y), 1e-3) for x, y in zip(a, b))


def reward_argv(folder, out, steps, *extra):
    return ["--model", os.path.join(folder, "sft.safetensors"), "--data", os.path.join(folder, "prefs.jsonl"),
            "--out-dir", os.path.join(folder, out), "--batch-size", "4", "--max-steps", str(steps),
            "--lr-decay-steps", "6", "--warmup-steps", "2", "--lr", "3e-3", "--eval-interval", "3",
            "--log-interval", "1", "--no-progress", "--center-coef", "0.01", *extra]


def ppo_argv(folder, out, steps, *extra):
    return ["--model", os.path.join(folder, "sft.safetensors"), "--prompts", os.path.join(folder, "prompts.jsonl"),
            "--reward", f"{FIXTURES}:vowel_reward", "--out-dir", os.path.join(folder, out),
            "--rollout-batch", "16", "--gen-batch", "4", "--batch-size", "8", "--ppo-epochs", "2",
            "--response-length", "4", "--lr", "1e-2", "--max-steps", str(steps), "--lr-decay-steps", "7",
            "--eval-interval", "4", "--log-interval", "1", "--no-progress", "--val-fraction", "0.25",
            "--eval-prompts", "4", *extra]


@pytest.mark.parametrize("job", ["reward", "ppo"])
def test_dp_run_matches_one_process_and_resumes_bitwise(comm, assert_all_ranks, folder, job):
    from llm.post.ppo import main as ppo_main
    from llm.post.reward import main as reward_main

    main, argv, steps, stop = (reward_main, reward_argv, 6, 4) if job == "reward" else (ppo_main, ppo_argv, 7, 3)
    dp = ["--dp", str(comm.size)]
    rc = main(argv(folder, f"{job}-par", steps, *dp), comm=comm)
    rc = max(rc, main(argv(folder, f"{job}-cut", stop, *dp), comm=comm))  # stopped mid-run (mid-iteration: PPO)
    rc = max(rc, main(argv(folder, f"{job}-cut", steps, *dp, "--resume"), comm=comm))
    assert_all_ranks(comm, rc == 0, f"exit code {rc}")
    ok, msg = True, ""
    if comm.rank == 0:
        ref = main(argv(folder, f"{job}-single", steps), comm=Communicator())
        par, cut, one = losses(folder, f"{job}-par"), losses(folder, f"{job}-cut"), losses(folder, f"{job}-single")
        if ref != 0 or len(par) != steps:
            ok, msg = False, f"one process: exit {ref}; {len(par)} losses"
        elif cut != par:
            ok, msg = False, f"resumed {cut} vs uninterrupted {par} (not bitwise)"
        elif not close(par, one):
            ok, msg = False, f"--dp {comm.size}: {par} vs one process {one}"
    assert_all_ranks(comm, ok, msg)
