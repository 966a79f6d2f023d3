"""SFT: labels exactly -100 off the answers, the masked loss against a hand computation and its zero gradients,
packed rows equal padded rows, best-fit decreasing, the sampler, a 2-layer model overfitting 8 instruction
pairs, bitwise resume, LoRA runs, a Hugging Face start, and every bad input as one clear message."""

import json
import math
import os

import numpy as np
import pytest

import autograd
from autograd import Tensor, no_grad
from llm.checkpoint import load_checkpoint, load_model, save_model
from llm.generate import generate
from llm.hf_gpt2 import save_hf_gpt2
from llm.model import GPT, get_preset
from llm.post import sft
from llm.post.chat import add_chat_tokens, chat_tokens, render
from llm.post.packing import (RowSampler, attention_mask, batches_of, best_fit_decreasing, pack_rows, pad_rows)
from llm.post.start import load_adapters
from llm.tokenizer import Tokenizer
from llm.trainer import Job, SetupError, Trainer, TrainerConfig, read_metrics
from llm.trainer import trainer as trainer_mod

WORDS = "the cat dog sat ran on a mat red blue green one two three four five what is color of sky grass and".split()
QA = [("what is one and one", "two"), ("what color is the sky", "blue"), ("what color is grass", "green"),
      ("count to three", "one two three"), ("what sat on the mat", "the cat"), ("what ran", "a dog"),
      ("what is two and two", "four"), ("say five", "five five")]


@pytest.fixture(autouse=True)
def fast_flops(monkeypatch):
    """The MFU denominator, measured for ~0.5 s per run otherwise."""
    monkeypatch.setattr(trainer_mod, "measure_matmul_flops", lambda device="cpu", n=512, seconds=0.5: 1e10)


@pytest.fixture(scope="module")
def tokenizer():
    text = " ".join(np.random.default_rng(0).choice(WORDS, 4000))
    return Tokenizer.train(text, vocab_size=300)


@pytest.fixture(scope="module")
def chat_tok(tokenizer):
    return add_chat_tokens(tokenizer)[0]


def tiny_config(vocab, **kw):
    return get_preset("tiny", vocab_size=vocab, n_layer=2, n_head=2, n_embd=32, block_size=32, **kw)


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer):
    """A tiny pre-trained checkpoint (no chat tokens) and an instruction file of the 8 pairs."""
    folder = tmp_path_factory.mktemp("sft")
    model = GPT(tiny_config(tokenizer.n_vocab), generator=np.random.default_rng(0))
    save_model(folder / "base.safetensors", model, tokenizer)
    with open(folder / "qa.jsonl", "w") as f:
        for q, a in QA:
            f.write(json.dumps({"instruction": q, "output": a}) + "\n")
    return folder


def argv(files, out, *extra):
    return ["--model", str(files / "base.safetensors"), "--data-file", str(files / "qa.jsonl"), "--val-size", "0",
            "--batch-size", "4", "--max-steps", "4", "--warmup-steps", "0", "--lr", "3e-3", "--eval-interval", "100",
            "--log-interval", "1", "--no-progress", "--out-dir", str(files / out), "--overwrite", *extra]


def losses(folder):
    return [r["loss"] for r in read_metrics(os.path.join(folder, "metrics.jsonl")) if "loss" in r]


def conversation(q, a):
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def examples(tok, pairs, template="chat", max_tokens=33):
    return sft.render_examples(tok, [(str(i), conversation(q, a)) for i, (q, a) in enumerate(pairs)], template,
                               max_tokens)


def float64_model(tok, seed=0):
    return GPT(tiny_config(tok.n_vocab), generator=np.random.default_rng(seed), dtype=np.float64)


# ---------------------------------------------------------------------------
# labels, loss, gradients
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("template", ["chat", "alpaca"])
def test_labels_are_minus_100_exactly_on_the_prompt_and_the_padding(chat_tok, template):
    exs = examples(chat_tok, QA, template, max_tokens=1000)
    rows = pad_rows(exs, max(len(x) for x, _ in exs) + 3, chat_tokens(chat_tok).pad)
    for (q, a), (x, y), ids, labels in zip(QA, exs, rows["input_ids"], rows["labels"]):
        r = render(chat_tok, conversation(q, a), template)
        n = len(x)
        assert np.array_equal(ids[:n], r.ids[:-1]) and (ids[n:] == chat_tokens(chat_tok).pad).all()
        assert (labels[n:] == -100).all()  # padding
        p = r.prompt_len - 1  # the position of the assistant header predicts the reply's first token
        assert (labels[:p] == -100).all()  # the prompt
        assert labels[p:n].tolist() == r.ids[r.prompt_len:]  # exactly the reply and its end token
        assert labels[n - 1] == chat_tokens(chat_tok).eos


def hand_loss(logits, labels):
    """Sum over labelled positions of -log softmax(logits)[label], in float64 NumPy."""
    z = logits - logits.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    keep = labels != -100
    return -logp[keep, labels[keep]].sum(), int(keep.sum())


def test_the_masked_loss_equals_a_hand_computation(chat_tok):
    rows = pad_rows(examples(chat_tok, QA), 20, chat_tokens(chat_tok).pad)
    model = float64_model(chat_tok)
    with no_grad():
        logits, _ = model(rows["input_ids"])
    total, count = Job().loss(logits, rows)
    want, n = hand_loss(logits.data, rows["labels"])
    assert count == n == int((rows["labels"] != -100).sum())
    assert abs(float(total.data) - want) <= 1e-10 * abs(want)
    # the trainer's mean: over every answer token of the batch, not a mean of per-row means
    per_row = [hand_loss(logits.data[i:i + 1], rows["labels"][i:i + 1]) for i in range(len(QA))]
    assert abs(float(total.data) / count - sum(s for s, _ in per_row) / sum(c for _, c in per_row)) < 1e-12


def test_masked_positions_get_zero_gradient(chat_tok, rng):
    rows = pad_rows(examples(chat_tok, QA), 20, chat_tokens(chat_tok).pad)
    B, T = rows["labels"].shape
    logits = Tensor(rng.standard_normal((B, T, chat_tok.n_vocab)), requires_grad=True)
    total, _ = Job().loss(logits, rows)
    total.backward()
    masked = rows["labels"] == -100
    assert (logits.grad[masked] == 0).all()
    assert (np.abs(logits.grad[~masked]).sum(axis=-1) > 0).all()


# ---------------------------------------------------------------------------
# packing
# ---------------------------------------------------------------------------


def test_best_fit_decreasing_places_every_item_once_and_fits():
    lengths = [5, 3, 8, 2, 7, 1, 4, 6, 2, 2]
    bins = best_fit_decreasing(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    # decreasing order, best fit: 8 -> A, 7 -> B, 6 -> C, 5 -> D, 4 -> C (10), 3 -> B (10), 2 -> A (10), 2 -> D (7),
    # 2 -> D (9), 1 -> D (10)
    assert [sorted(lengths[i] for i in b) for b in bins] == [[2, 8], [3, 7], [4, 6], [1, 2, 2, 5]]
    with pytest.raises(ValueError, match="does not fit"):
        best_fit_decreasing([11], 10)


def test_packed_and_padded_rows_give_the_same_summed_loss(chat_tok):
    pairs = QA + [(q + " " + q, a + " " + a) for q, a in QA[:5]]
    exs = examples(chat_tok, pairs)
    pad = chat_tokens(chat_tok).pad
    padded = pad_rows(exs, max(len(x) for x, _ in exs), pad)
    packed = pack_rows(exs, 32, pad)
    assert len(packed["input_ids"]) < len(padded["input_ids"])  # fewer, fuller rows
    model = float64_model(chat_tok)
    job = sft.SFTJob.__new__(sft.SFTJob)
    with no_grad():
        a, n_a = Job().loss(model(padded["input_ids"])[0], padded)
        kwargs = job.model_kwargs(packed)
        assert kwargs["attention_mask"].shape == (len(packed["input_ids"]), 1, 32, 32)
        b, n_b = Job().loss(model(packed["input_ids"], **kwargs)[0], packed)
    assert n_a == n_b
    assert abs(float(a.data) - float(b.data)) <= 1e-6  # float64: ~1e-13 in practice
    # without the block-diagonal mask the packed examples would see each other
    with no_grad():
        c, _ = Job().loss(model(packed["input_ids"], position_ids=packed["position_ids"])[0], packed)
    assert abs(float(c.data) - float(a.data)) > 1e-3


def test_packed_rows_restart_positions_and_number_segments(chat_tok):
    exs = examples(chat_tok, QA)
    packed = pack_rows(exs, 32, chat_tokens(chat_tok).pad)
    for pos, seg, lab in zip(packed["position_ids"], packed["segment_ids"], packed["labels"]):
        starts = np.flatnonzero(np.diff(seg, prepend=-1))
        for s, e in zip(starts, list(starts[1:]) + [len(seg)]):
            assert np.array_equal(pos[s:e], np.arange(e - s))
    mask = attention_mask(np.array([[0, 0, 1, 1, 2]]))
    assert mask[0, 0].astype(int).tolist() == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 0],
                                              [0, 0, 0, 0, 1]]


def test_the_global_batch_does_not_depend_on_the_number_of_replicas():
    rows = {"x": np.arange(10)[:, None]}
    one = RowSampler(rows, 4, seed=3)
    two = [RowSampler(rows, 4, seed=3, rank=r, world=2) for r in range(2)]
    for _ in range(6):  # across epoch boundaries
        want = one.next_batch()["x"][:, 0].tolist()
        assert sum((s.next_batch()["x"][:, 0].tolist() for s in two), []) == want
    fresh = RowSampler(rows, 4, seed=3)
    fresh.load_state_dict(one.state_dict())
    assert np.array_equal(fresh.next_batch()["x"], one.next_batch()["x"])
    with pytest.raises(ValueError, match="same data"):
        RowSampler({"x": np.arange(9)[:, None]}, 4, seed=3).load_state_dict(one.state_dict())
    assert [len(b["x"]) for b in batches_of(rows, 4)] == [4, 4, 2]


# ---------------------------------------------------------------------------
# runs
# ---------------------------------------------------------------------------


def greedy_answers(model, tok, template="chat"):
    out = []
    eos = chat_tokens(tok).eos
    for q, _ in QA:
        prompt = render(tok, [{"role": "user", "content": q}], template, add_generation_prompt=True).ids
        new = [int(t) for t in generate(model, prompt, 8, greedy=True, eos_id=eos)]
        out.append(tok.decode(new[:new.index(eos)]) if eos in new else None)
    return out


@pytest.mark.slow
def test_a_two_layer_model_overfits_eight_instruction_pairs_to_exact_greedy_answers(files):
    rc = sft.main(argv(files, "overfit", "--max-steps", "150", "--lr", "1e-2", "--warmup-steps", "10",
                       "--batch-size", "8"))
    assert rc == 0
    model, tok, meta = load_model(files / "overfit" / "ckpt.safetensors")
    assert meta["chat_template"] == "chat" and meta["job"] == "sft"
    assert greedy_answers(model, tok) == [a for _, a in QA]


def test_resume_continues_bitwise(files):
    extra = ("--packing", "--batch-size", "2", "--lr-decay-steps", "4")
    assert sft.main(argv(files, "whole", *extra)) == 0
    assert sft.main(argv(files, "parts", *extra, "--max-steps", "2")) == 0
    assert sft.main([a for a in argv(files, "parts", *extra, "--resume") if a != "--overwrite"]) == 0
    assert losses(files / "whole") == losses(files / "parts")
    a, _ = load_checkpoint(files / "whole" / "ckpt.safetensors")
    b, _ = load_checkpoint(files / "parts" / "ckpt.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_a_lora_run_trains_only_the_adapters_and_leaves_them_and_the_merged_model(files, capsys):
    assert sft.main(argv(files, "lora", "--lora-rank", "2", "--lora-alpha", "4", "--lora-targets", "c_attn")) == 0
    out = capsys.readouterr().out
    assert "LoRA: rank 2, alpha 4 on 2 layers (c_attn)" in out and "adapters alone" in out
    base, base_tok, _ = load_model(files / "base.safetensors")
    tok, _ = add_chat_tokens(base_tok, base)
    tensors, meta = load_checkpoint(files / "lora" / "ckpt.safetensors")
    assert meta["lora"]["rank"] == 2
    adapters = {k for k in tensors if ".lora_" in k and k.startswith("model.")}
    assert adapters == {f"model.h.{i}.attn.c_attn.lora_{m}" for i in range(2) for m in "AB"}
    for name, value in base.state_dict().items():  # everything else is the start, bit for bit
        assert np.array_equal(tensors[f"model.{name}"], value), name
    assert {k.split(".", 2)[2] for k in tensors if k.startswith("optim.exp_avg.")} == {k[6:] for k in adapters}
    # the adapters file is small; loaded on the base it gives the merged model
    assert os.path.getsize(files / "lora" / "adapters.safetensors") < os.path.getsize(files / "lora" /
                                                                                     "model.safetensors") / 5
    merged, merged_tok, _ = load_model(files / "lora" / "model.safetensors")
    with_adapters = load_adapters(base, files / "lora" / "adapters.safetensors")
    x = np.asarray([render(tok, conversation(*QA[0])).ids])
    with no_grad():
        np.testing.assert_allclose(merged(x)[0].data, with_adapters(x)[0].data, rtol=1e-5, atol=1e-5)
    # the training checkpoint itself loads as a plain GPT (for generate and eval): its adapters merged
    from_ckpt, _, _ = load_model(files / "lora" / "ckpt.safetensors")
    assert not any(".lora_" in k for k in from_ckpt.state_dict())
    with no_grad():
        np.testing.assert_allclose(from_ckpt(x)[0].data, merged(x)[0].data, rtol=1e-6, atol=1e-6)
    # a post-training run can start from the LoRA training checkpoint: its adapters are merged on load
    assert sft.main(argv(files, "after-lora", "--model", str(files / "lora" / "ckpt.safetensors"),
                         "--max-steps", "1")) == 0


def test_sft_starts_from_a_hugging_face_gpt2_folder(files, tokenizer, tmp_path):
    model, tok, _ = load_model(files / "base.safetensors")
    save_hf_gpt2(model, tmp_path / "hf")
    tok.save_gpt2_files(tmp_path / "hf" / "vocab.json", tmp_path / "hf" / "merges.txt")
    assert sft.main(argv(files, "from-hf", "--model", str(tmp_path / "hf"), "--max-steps", "1")) == 0
    _, got_tok, meta = load_model(files / "from-hf" / "ckpt.safetensors")
    assert chat_tokens(got_tok).eos == tok.n_vocab + 3


def test_a_batch_with_every_label_masked_is_a_clear_error(tmp_path):
    class NothingToLearn(Job):
        name = "masked"

        def build_model(self):
            return GPT(get_preset("tiny", vocab_size=10, n_layer=1, n_embd=16, n_head=2, block_size=8),
                       generator=np.random.default_rng(0))

        def train_sampler(self, rank, world):
            class Rows:
                def next_batch(self):
                    ids = np.ones((4, 8), dtype=np.int64)
                    return {"input_ids": ids, "labels": np.full_like(ids, -100)}

                def state_dict(self):
                    return {}

                def load_state_dict(self, state):
                    pass

            return Rows()

    config = TrainerConfig(out_dir=str(tmp_path), batch_size=4, max_steps=2, progress=False)
    with pytest.raises(SetupError, match="every label is masked"):
        Trainer(NothingToLearn(), config).run()


# ---------------------------------------------------------------------------
# bad input: one clear message each
# ---------------------------------------------------------------------------


def run_failing(files, capsys, *extra, data=None):
    args = argv(files, "bad", *extra)
    if data is not None:
        path = files / "bad.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in data))
        args[args.index("--data-file") + 1] = str(path)
    rc = sft.main(args)
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    return err


def test_a_record_missing_a_field_is_named_with_its_line(files, capsys):
    err = run_failing(files, capsys, data=[{"instruction": "hi", "output": "yo"}, {"instruction": "hi"}])
    assert "bad.jsonl:2" in err and 'no "output" field' in err
    err = run_failing(files, capsys, data=[{"messages": [{"role": "user", "content": "x"}]}])
    assert "bad.jsonl:1" in err and "must end with the assistant's reply" in err
    err = run_failing(files, capsys, data=[{"question": "x"}])
    assert "not an instruction record" in err


def test_prompts_longer_than_the_context_are_cut_from_the_left_and_counted(files, capsys):
    long = " ".join(["what color is the sky"] * 20)
    path = files / "long.jsonl"
    path.write_text(json.dumps({"instruction": long, "output": "blue"}) + "\n"
                    + "".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in QA))
    args = argv(files, "long", "--max-steps", "1")
    args[args.index("--data-file") + 1] = str(path)
    assert sft.main(args) == 0
    assert "1 of 9 prompts were longer than the context (32 positions) and lost tokens from the left" in \
        capsys.readouterr().out


def test_lora_targets_that_match_no_layer_are_a_clear_error(files, capsys):
    err = run_failing(files, capsys, "--lora-rank", "2", "--lora-targets", "q_proj")
    assert "q_proj match no linear layer" in err and "c_attn" in err


def test_other_bad_flags_are_clear_errors(files, capsys):
    assert "no such checkpoint" in run_failing(files, capsys, "--model", str(files / "nope.safetensors"))
    assert "longer than the model's context" in run_failing(files, capsys, "--max-length", "64")
    assert "--lora-rank must be >= 0" in run_failing(files, capsys, "--lora-rank", "-1")
