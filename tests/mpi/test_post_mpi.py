"""`python -m llm sft` and `python -m llm dpo` under mpirun: --dp / --pp runs equal one process (float32 sums in
another order: 1e-5) and resume bitwise; LoRA and the precomputed DPO reference work on every layout."""

import json
import os

import numpy as np
import pytest

from llm.checkpoint import save_model
from llm.model import GPT, get_preset
from llm.post import dpo, sft
from llm.post.chat import add_chat_tokens
from llm.tokenizer import Tokenizer
from llm.trainer import read_metrics
from parallel import Communicator

pytestmark = pytest.mark.mpi

TOL = 1e-5
WORDS = "the cat dog sat ran on a mat red blue green one two three four five what is color of sky grass".split()
QA = [("what is one and one", "two", "five"), ("what color is the sky", "blue", "red"),
      ("what color is grass", "green", "red"), ("count to three", "one two three", "one"),
      ("what sat on the mat", "the cat", "a dog"), ("what ran", "a dog", "the mat"),
      ("what is two and two", "four", "two"), ("say five", "five five", "four")]


@pytest.fixture(scope="module")
def folder(comm, shared_folder):
    """A tiny checkpoint with chat tokens, instructions and pairs, shared by all ranks (made by rank 0)."""
    def fill(path):
        text = " ".join(np.random.default_rng(0).choice(WORDS, 4000))
        tok = Tokenizer.train(text, vocab_size=300)
        model = GPT(get_preset("tiny", vocab_size=tok.n_vocab, n_layer=2, n_head=2, n_embd=32, block_size=32),
                    generator=np.random.default_rng(0))
        tok, _ = add_chat_tokens(tok, model)
        save_model(os.path.join(path, "base.safetensors"), model, tok)
        with open(os.path.join(path, "qa.jsonl"), "w") as f:
            f.writelines(json.dumps({"instruction": q, "output": a}) + "\n" for q, a, _ in QA * 2)
        with open(os.path.join(path, "pairs.jsonl"), "w") as f:
            f.writelines(json.dumps({"prompt": q, "chosen": a, "rejected": r}) + "\n" for q, a, r in QA * 2)

    yield from shared_folder(comm, "post-mpi-", fill)


def argv(folder, out, steps, *extra):
    return ["--model", os.path.join(folder, "base.safetensors"), "--val-size", "4", "--batch-size", "4",
            "--max-steps", str(steps), "--lr-decay-steps", "4", "--warmup-steps", "1", "--lr", "3e-3",
            "--eval-interval", "2", "--eval-batches", "1", "--log-interval", "1", "--no-progress",
            "--out-dir", os.path.join(folder, out), *extra]


def sft_argv(folder, out, steps, *extra):
    return argv(folder, out, steps, "--data-file", os.path.join(folder, "qa.jsonl"), "--eval-replies", "2",
                "--max-new-tokens", "4", *extra)


def dpo_argv(folder, out, steps, *extra):
    return argv(folder, out, steps, "--data-file", os.path.join(folder, "pairs.jsonl"), *extra)


def records(folder, out):
    return [r for r in read_metrics(os.path.join(folder, out, "metrics.jsonl"))]


def close(a, b):
    return len(a) == len(b) and all(abs(x - y) <= TOL * max(abs(y), 1.0) for x, y in zip(a, b))


def layouts(comm):
    """(name, flags) of the parallel runs at this world size: every rank data-parallel, and a 2-stage pipeline."""
    return [("dp", ["--dp", str(comm.size)]), ("pp", ["--pp", "2", "--dp", str(comm.size // 2)])]


def check_against_one_process(comm, assert_all_ranks, main, make_argv, folder, out, keys, *extra, skip_first=()):
    """Run ``main`` on every layout of the world and once in one process; the logged ``keys`` must agree.

    ``skip_first``: keys compared from the second logged value on (a count of ties broken by float rounding).
    """
    ok, msg = True, ""
    for name, flags in layouts(comm):
        rc = main(make_argv(folder, f"{out}-{name}", 4, *flags, *extra), comm=comm)
        assert_all_ranks(comm, rc == 0, f"{name}: exit code {rc}")
    if comm.rank == 0:
        rc = main(make_argv(folder, f"{out}-single", 4, *extra), comm=Communicator())
        want = records(folder, f"{out}-single")
        for name, _ in layouts(comm):
            got = records(folder, f"{out}-{name}")
            for key in keys:
                a, b = [r[key] for r in got if key in r], [r[key] for r in want if key in r]
                if key in skip_first:
                    a, b = a[1:], b[1:]
                if rc != 0 or not b or not close(a, b):
                    ok, msg = False, f"{name}: {key} {a} vs one process {b} (exit {rc})"
    assert_all_ranks(comm, ok, msg)


def test_sft_on_every_layout_equals_one_process(comm, assert_all_ranks, folder):
    check_against_one_process(comm, assert_all_ranks, sft.main, sft_argv, folder, "sft",
                              ["loss", "val_loss", "replies_stop"], "--packing")


def test_sft_with_lora_on_every_layout_equals_one_process(comm, assert_all_ranks, folder):
    check_against_one_process(comm, assert_all_ranks, sft.main, sft_argv, folder, "sft-lora", ["loss", "val_loss"],
                              "--lora-rank", "2", "--lora-targets", "c_attn,c_fc")
    ok = comm.rank != 0 or all(os.path.exists(os.path.join(folder, f"sft-lora-{n}", "adapters.safetensors"))
                               for n, _ in layouts(comm))
    assert_all_ranks(comm, ok, "a LoRA run under mpirun left no adapters file")


def test_dpo_with_the_precomputed_reference_on_every_layout_equals_one_process(comm, assert_all_ranks, folder):
    # at the first step the policy is the reference: every margin is 0 up to rounding, and the accuracy (strict
    # wins, as TRL counts them) is a count of rounding signs, which another cut of the products may flip
    check_against_one_process(comm, assert_all_ranks, dpo.main, dpo_argv, folder, "dpo",
                              ["loss", "rewards/margins", "rewards/accuracies", "val_loss", "val_rewards/margins"],
                              skip_first=("rewards/accuracies",))


def test_sft_and_dpo_resume_bitwise_under_mpirun(comm, assert_all_ranks, folder):
    flags = ["--dp", str(comm.size)]
    ok, msg = True, ""
    for main, make_argv, out in ((sft.main, sft_argv, "sft-resume"), (dpo.main, dpo_argv, "dpo-resume")):
        rc = main(make_argv(folder, f"{out}-whole", 4, *flags), comm=comm)
        rc = max(rc, main(make_argv(folder, f"{out}-parts", 2, *flags), comm=comm))
        rc = max(rc, main(make_argv(folder, f"{out}-parts", 4, *flags, "--resume"), comm=comm))
        assert_all_ranks(comm, rc == 0, f"{out}: exit code {rc}")
        if comm.rank == 0:
            a = [r["loss"] for r in records(folder, f"{out}-whole")]
            b = [r["loss"] for r in records(folder, f"{out}-parts")]
            if a != b:
                ok, msg = False, f"{out}: {a} vs resumed {b}"
    assert_all_ranks(comm, ok, msg)
