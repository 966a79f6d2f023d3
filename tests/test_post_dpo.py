"""DPO: the losses are TRL's formulas, ln 2 exactly while the policy is the reference, gradients pass finite
differences, the implicit rewards, the LoRA reference is the base with adapters off, runs learn and resume
bitwise, and bad input is one clear message."""

import copy
import json
import math
import os

import numpy as np
import pytest

from autograd import Tensor, gradcheck, no_grad
from llm.checkpoint import save_model
from llm.model import GPT, get_preset
from llm.post import dpo
from llm.post.chat import add_chat_tokens
from llm.post.data import Pair
from llm.tokenizer import Tokenizer
from llm.trainer import read_metrics
from llm.trainer import trainer as trainer_mod
from nn import lora_layers

WORDS = "the cat dog sat ran on a mat red blue green one two three four five what is color of sky grass".split()
PAIRS = [("what color is the sky", "blue", "red"), ("what is one and one", "two", "five"),
         ("what color is grass", "green", "blue"), ("what sat on the mat", "the cat", "the dog"),
         ("count to three", "one two three", "one two"), ("what is two and two", "four", "three"),
         ("say five", "five", "four"), ("what ran", "a dog", "a mat")]


@pytest.fixture(autouse=True)
def fast_flops(monkeypatch):
    monkeypatch.setattr(trainer_mod, "measure_matmul_flops", lambda device="cpu", n=512, seconds=0.5: 1e10)


@pytest.fixture(scope="module")
def tok():
    text = " ".join(np.random.default_rng(0).choice(WORDS, 4000))
    return Tokenizer.train(text, vocab_size=300)


def config(vocab):
    return get_preset("tiny", vocab_size=vocab, n_layer=2, n_head=2, n_embd=32, block_size=32)


@pytest.fixture(scope="module")
def files(tmp_path_factory, tok):
    """A tiny "SFT" checkpoint (chat tokens added), one without chat tokens, and a pairs file."""
    folder = tmp_path_factory.mktemp("dpo")
    model = GPT(config(tok.n_vocab), generator=np.random.default_rng(0))
    save_model(folder / "plain.safetensors", model, tok)
    chat_tok, _ = add_chat_tokens(tok, model)
    save_model(folder / "sft.safetensors", model, chat_tok)
    with open(folder / "pairs.jsonl", "w") as f:
        for p, c, r in PAIRS:
            f.write(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n")
    return folder


def argv(files, out, *extra):
    return ["--model", str(files / "sft.safetensors"), "--data-file", str(files / "pairs.jsonl"), "--val-size", "2",
            "--batch-size", "3", "--max-steps", "4", "--warmup-steps", "0", "--lr", "1e-3", "--eval-interval", "100",
            "--log-interval", "1", "--no-progress", "--out-dir", str(files / out), "--overwrite", *extra]


def metrics(folder):
    return read_metrics(os.path.join(folder, "metrics.jsonl"))


def rows_of(tok, pairs=PAIRS):
    chat_tok, _ = add_chat_tokens(tok)
    rendered = dpo.render_pairs(chat_tok, [Pair([{"role": "user", "content": p}], c, r, str(i))
                                           for i, (p, c, r) in enumerate(pairs)], "chat", 33)
    return chat_tok, dpo.pair_rows(rendered, max(x.shape[1] for x, _ in rendered), chat_tok.special_tokens["<|pad|>"])


# ---------------------------------------------------------------------------
# the loss
# ---------------------------------------------------------------------------


def reference_losses(z, beta, loss, eps):
    """TRL's per-pair losses in plain NumPy (float64)."""
    ls = lambda x: -np.logaddexp(0.0, -x)  # noqa: E731  (log sigmoid)
    if loss == "sigmoid":
        return -ls(beta * z) * (1 - eps) - ls(-beta * z) * eps
    if loss == "hinge":
        return np.maximum(0.0, 1 - beta * z)
    return (z - 1 / (2 * beta)) ** 2


@pytest.mark.parametrize("loss, eps", [("sigmoid", 0.0), ("sigmoid", 0.2), ("hinge", 0.0), ("ipo", 0.0)])
def test_the_losses_are_trls_formulas_and_pass_gradcheck(rng, loss, eps):
    z = rng.standard_normal(7) * 5
    z[0] = 0.0
    beta = 0.3
    got = dpo.preference_loss(Tensor(z), beta, loss, eps).data
    np.testing.assert_allclose(got, reference_losses(z, beta, loss, eps), rtol=1e-12, atol=1e-12)
    if loss == "hinge":
        z = z[np.abs(1 - beta * z) > 1e-3]  # away from the kink
    gradcheck(lambda t: dpo.preference_loss(t, beta, loss, eps), Tensor(z, requires_grad=True))


def test_log_sigmoid_is_finite_far_out_and_has_gradient_one_half_at_zero():
    x = Tensor(np.array([-1e4, -30.0, 0.0, 30.0, 1e4]), requires_grad=True)
    y = dpo.log_sigmoid(x)
    np.testing.assert_allclose(y.data, -np.logaddexp(0.0, -x.data), rtol=1e-12, atol=1e-15)
    y.sum().backward()
    np.testing.assert_allclose(x.grad, np.exp(-np.logaddexp(0.0, x.data)), rtol=1e-12, atol=1e-300)  # 1 - sigmoid
    assert x.grad[2] == 0.5


def pair_loss(model, ref_model, rows, beta=0.1, loss="sigmoid", eps=0.0):
    """The job's loss on one batch, the reference computed by ``ref_model``, as the trainer would call it."""
    job = dpo.DPOJob.__new__(dpo.DPOJob)
    job.beta, job.loss_type, job.smoothing, job.mean_logps = beta, loss, eps, False
    job._stats = dpo._Stats()
    P, _, T = rows["input_ids"].shape
    ref = job._ref_logps(ref_model, rows["input_ids"], rows["labels"], rows["n_tokens"])
    batch = dict(rows, ref_logps=ref)
    logits, _ = model(job.inputs(batch))
    total, count = job.loss(logits, batch)
    return total, count, job


def test_the_loss_is_ln2_exactly_while_the_policy_is_the_reference(tok):
    chat_tok, rows = rows_of(tok)
    model = GPT(config(chat_tok.n_vocab), generator=np.random.default_rng(0), dtype=np.float64)
    total, count, job = pair_loss(model, copy.deepcopy(model), rows)
    assert count == len(PAIRS)
    assert float(total.data) / count == math.log(2)
    stats = job._stats.reduced(type("One", (), {"size": 1})())
    assert stats["rewards/chosen"] == stats["rewards/rejected"] == stats["rewards/margins"] == 0.0
    assert stats["rewards/accuracies"] == 0.0  # TRL counts chosen > rejected strictly


def test_the_gradient_through_the_model_passes_a_finite_difference_check(tok, rng):
    chat_tok, rows = rows_of(tok, PAIRS[:3])
    model = GPT(config(chat_tok.n_vocab), generator=np.random.default_rng(0), dtype=np.float64)
    ref = copy.deepcopy(model)
    for p in model.parameters():  # move the policy away from the reference
        p.data += rng.standard_normal(p.shape) * 0.02
    import nn

    w = Tensor(model.ln_f.weight.data.copy(), requires_grad=True)
    b = Tensor(model.h[1].mlp.c_proj.bias.data.copy(), requires_grad=True)

    def f(w, b):
        with_params = lambda ids: nn.functional_call(model, {"ln_f.weight": w, "h.1.mlp.c_proj.bias": b}, ids)  # noqa
        job = dpo.DPOJob.__new__(dpo.DPOJob)
        job.beta, job.loss_type, job.smoothing, job.mean_logps = 0.5, "sigmoid", 0.1, True
        job._stats = dpo._Stats()
        batch = dict(rows, ref_logps=job._ref_logps(ref, rows["input_ids"], rows["labels"], rows["n_tokens"]))
        logits, _ = with_params(job.inputs(batch))
        return job.loss(logits, batch)[0]

    gradcheck(f, w, b)


def test_rewards_are_beta_times_the_log_ratio(tok, rng):
    chat_tok, rows = rows_of(tok)
    model = GPT(config(chat_tok.n_vocab), generator=np.random.default_rng(0), dtype=np.float64)
    ref = copy.deepcopy(model)
    for p in model.parameters():
        p.data += rng.standard_normal(p.shape) * 0.05
    total, count, job = pair_loss(model, ref, rows, beta=0.2)
    with no_grad():
        pol = job._ref_logps(model, rows["input_ids"], rows["labels"], rows["n_tokens"])
        base = job._ref_logps(ref, rows["input_ids"], rows["labels"], rows["n_tokens"])
    r = 0.2 * (pol - base)
    z = (pol[:, 0] - pol[:, 1]) - (base[:, 0] - base[:, 1])
    stats = job._stats.reduced(type("One", (), {"size": 1})())
    np.testing.assert_allclose(float(total.data), reference_losses(z, 0.2, "sigmoid", 0.0).sum(), rtol=1e-10)
    np.testing.assert_allclose(stats["rewards/chosen"], r[:, 0].mean(), rtol=1e-10)
    np.testing.assert_allclose(stats["rewards/margins"], (r[:, 0] - r[:, 1]).mean(), rtol=1e-10)
    assert stats["rewards/accuracies"] == np.mean(r[:, 0] > r[:, 1])
    assert stats["logps/accuracies"] == np.mean(pol[:, 0] > pol[:, 1])


def test_pairs_share_their_prompt_cut_and_only_the_answers_are_labelled(tok):
    chat_tok, _ = add_chat_tokens(tok)
    long = " ".join(["what color is the sky"] * 10)
    pair = Pair([{"role": "user", "content": long}], "blue", "one two three four five", "x")
    [(ids, labels)] = dpo.render_pairs(chat_tok, [pair], "chat", 20)
    assert ids.shape == (2, 19)
    n_rejected = int((labels[1] != -100).sum())
    assert n_rejected == len(chat_tok.encode_ordinary("one two three four five")) + 1
    first = [int(np.argmax(row != -100)) for row in labels]
    assert first[0] == first[1] and np.array_equal(ids[0, :first[0] + 1], ids[1, :first[1] + 1])  # same prompt


# ---------------------------------------------------------------------------
# runs
# ---------------------------------------------------------------------------


def test_a_run_starts_at_ln2_learns_the_preferences_and_logs_the_rewards(files):
    assert dpo.main(argv(files, "run", "--max-steps", "30", "--lr", "3e-3", "--eval-interval", "30")) == 0
    m = metrics(files / "run")
    assert abs(m[0]["loss"] - math.log(2)) < 1e-6  # the precomputed reference: float rounding only
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
        assert key in m[0] and f"val_{key}" in m[-1]
    assert m[-1]["loss"] < m[0]["loss"] - 0.2 and m[-1]["rewards/accuracies"] == 1.0
    assert m[-1]["rewards/margins"] > 0.5 and m[-1]["rewards/chosen"] > m[-1]["rewards/rejected"]


def test_resume_continues_bitwise(files):
    extra = ("--lr-decay-steps", "4")
    assert dpo.main(argv(files, "whole", *extra)) == 0
    assert dpo.main(argv(files, "parts", *extra, "--max-steps", "2")) == 0
    assert dpo.main([a for a in argv(files, "parts", *extra, "--resume") if a != "--overwrite"]) == 0
    assert [r["loss"] for r in metrics(files / "whole")] == [r["loss"] for r in metrics(files / "parts")]


@pytest.mark.parametrize("loss", ["ipo", "hinge"])
def test_ipo_and_hinge_runs(files, loss):
    assert dpo.main(argv(files, loss, "--loss", loss, "--beta", "0.5", "--reference", "model")) == 0
    m = metrics(files / loss)
    start = {"ipo": 1.0, "hinge": 1.0}[loss]  # (0 - 1/(2 beta))^2 = 1 and max(0, 1 - 0) = 1 at beta 0.5
    assert abs(m[0]["loss"] - start) < 1e-6


def test_with_lora_the_reference_is_the_base_with_adapters_off(files, capsys):
    args = dpo.build_parser().parse_args(argv(files, "lora", "--lora-rank", "2", "--reference", "model"))
    job = dpo.DPOJob(args)
    policy = job.build_model()
    for _, layer in lora_layers(policy):  # as if trained
        layer.lora_B.data[...] = 0.5
    rows = job.rows["train"]
    ref_model, off = job._reference_model()
    assert ref_model is policy  # no second copy of the weights
    with off:
        got = job._ref_logps(ref_model, rows["input_ids"], rows["labels"], rows["n_tokens"])
    base = job.start.build()  # the starting weights, adapters at B = 0
    want = job._ref_logps(base, rows["input_ids"], rows["labels"], rows["n_tokens"])
    assert np.array_equal(got, want)
    assert all(m.enabled for _, m in lora_layers(policy))
    assert dpo.main(argv(files, "lora-run", "--lora-rank", "2", "--reference", "model")) == 0
    assert os.path.exists(files / "lora-run" / "adapters.safetensors")


def test_more_held_out_sets_are_scored_at_each_evaluation(files, tmp_path, monkeypatch):
    from llm.post import data

    monkeypatch.setattr(data, "dataset_records", lambda name, subtasks=None, cache_dir=None, log=print: [
        (f"{name}:{i}", {"prompt": p, "chosen": c, "rejected": r}) for i, (p, c, r) in enumerate(PAIRS[:4])])
    assert dpo.main(argv(files, "extra", "--eval-data", "hhh_alignment", "--max-steps", "1")) == 0
    last = metrics(files / "extra")[-1]
    assert last["hhh_alignment_loss"] > 0 and "hhh_alignment_rewards/accuracies" in last


# ---------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------


def failing(files, capsys, *extra, data=None):
    args = argv(files, "bad", *extra)
    if data is not None:
        path = files / "bad.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in data))
        args[args.index("--data-file") + 1] = str(path)
    rc = dpo.main(args)
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    return err


def test_identical_chosen_and_rejected_is_a_clear_error(files, capsys):
    err = failing(files, capsys, data=[{"prompt": "x", "chosen": "a", "rejected": "b"},
                                       {"prompt": "y", "chosen": "same", "rejected": "same"}])
    assert "bad.jsonl:2" in err and "same answer" in err


def test_a_pair_missing_a_field_is_named(files, capsys):
    err = failing(files, capsys, data=[{"prompt": "x", "chosen": "a"}])
    assert "bad.jsonl:1" in err and "'rejected'" in err


def test_a_tokenizer_without_the_chat_tokens_is_a_clear_error(files, capsys):
    err = failing(files, capsys, "--model", str(files / "plain.safetensors"))
    assert "lacks the chat token" in err and "--add-chat-tokens" in err
    assert dpo.main(argv(files, "added", "--model", str(files / "plain.safetensors"), "--add-chat-tokens",
                         "--max-steps", "1")) == 0


def test_bad_loss_settings_are_clear_errors(files, capsys):
    assert "sigmoid loss only" in failing(files, capsys, "--loss", "hinge", "--label-smoothing", "0.1")
    assert "[0, 0.5)" in failing(files, capsys, "--label-smoothing", "0.7")
    assert "--pp 1" in failing(files, capsys, "--reference", "model", "--pp", "2")
    assert "would move the reference too" in failing(files, capsys, "--reference", "model", "--lora-rank", "2",
                                                      "--lora-train-embeddings")
    assert "not a preference dataset" in failing(files, capsys, "--eval-data", "natural_instructions")
    assert "match no linear layer" in failing(files, capsys, "--lora-rank", "2", "--lora-targets", "wq")
