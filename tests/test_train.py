"""Tests for `python -m llm train` (llm.train, llm.trainer_state, llm.train_data).

Every run is a tiny GPT (2 layers, 32 wide, block 16) on a small generated corpus, called
in-process through ``main(argv)``; the tokenizer and the token shards are built once per module
in a shared cache folder. The start-up matmul timing is replaced by a constant (it only feeds MFU).
"""

import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import nn
from llm import train as train_mod
from llm.checkpoint import load_checkpoint, load_model
from llm.data import BatchSampler
from llm.model import GPT, get_preset
from llm.trainer_state import MetricsWriter, TrainingCheckpoint, measure_matmul_flops, read_metrics, step_seed

SUBJECTS = "the cat|a dog|my friend|the old king|a young girl|the sailor|our neighbour".split("|")
VERBS = "sees|likes|finds|follows|remembers|greets".split("|")
OBJECTS = "the moon|a red ball|the river|an apple|the small house|a letter|the garden".split("|")


def make_corpus(seed=0, n_sentences=1500):
    """A text with structure beyond token frequencies: subject, verb, object, full stop, in that order."""
    r = np.random.default_rng(seed)
    lines = []
    for _ in range(n_sentences):
        s, v, o = SUBJECTS[r.integers(len(SUBJECTS))], VERBS[r.integers(len(VERBS))], OBJECTS[r.integers(len(OBJECTS))]
        lines.append(f"{s} {v} {o}.")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    path = d / "corpus.txt"
    path.write_text(make_corpus())
    return {"path": str(path), "cache": str(d / "cache")}


@pytest.fixture(autouse=True)
def fast_flops(monkeypatch):
    """The MFU denominator, measured for ~0.5 s per run otherwise."""
    monkeypatch.setattr(train_mod, "measure_matmul_flops", lambda device="cpu", n=512, seconds=0.5: 1e10)


def argv(corpus, out_dir, *extra, steps=6):
    return ["--data", corpus["path"], "--data-dir", corpus["cache"], "--vocab-size", "300",
            "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "16", "--batch-size", "4",
            "--eval-batches", "2", "--eval-interval", "1000", "--log-interval", "1", "--sample-tokens", "0",
            "--warmup-steps", "2", "--no-progress", "--max-steps", str(steps), "--out-dir", str(out_dir), *extra]


def losses(out_dir):
    return [r["loss"] for r in read_metrics(os.path.join(out_dir, "metrics.jsonl")) if "loss" in r]


class Crash(RuntimeError):
    pass


def crash_at_call(monkeypatch, n, exc):
    """Make the n-th call of train_step (1-based) raise ``exc`` before doing anything."""
    real = train_mod.train_step
    calls = {"n": 0}

    def wrapper(*a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise exc
        return real(*a, **k)

    monkeypatch.setattr(train_mod, "train_step", wrapper)


# ---------------------------------------------------------------------------
# training works
# ---------------------------------------------------------------------------


def test_short_run_lowers_validation_loss_and_beats_unigram(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    rc = train_mod.main(argv(corpus, out, "--lr", "1e-2", "--eval-interval", "10", "--log-interval", "5",
                             "--batch-size", "8", steps=80))
    assert rc == 0
    recs = read_metrics(out / "metrics.jsonl")
    vals = [r["val_loss"] for r in recs if "val_loss" in r]
    assert len(vals) == 8
    assert vals[-1] < vals[0] - 0.5, vals
    assert vals[-1] < math.log(300)
    meta = load_checkpoint(out / "ckpt.safetensors")[1]
    assert vals[-1] < meta["unigram_entropy"], (vals[-1], meta["unigram_entropy"])  # structure beyond frequencies
    stdout = capsys.readouterr().out
    assert "unigram entropy of the train split" in stdout
    assert "beats the unigram baseline" in stdout
    assert f"checkpoint {out / 'ckpt.safetensors'}" in stdout


def test_metrics_have_the_documented_keys(corpus, tmp_path):
    out = tmp_path / "run"
    assert train_mod.main(argv(corpus, out, "--eval-interval", "3", "--precision", "fp16", steps=6)) == 0
    recs = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    for r in recs:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "skipped", "loss_scale"} <= set(r), r
        assert r["tokens_per_s"] > 0 and r["mfu"] > 0 and isinstance(r["skipped"], bool)
        assert r["tokens"] == r["step"] * 4 * 16
    assert [("val_loss" in r, "val_ppl" in r) for r in recs] == [(s % 3 == 0,) * 2 for s in range(1, 7)]
    r = recs[2]
    assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]))
    # the warm-up (2 steps) to the peak, then the cosine down towards lr/10 (reached after the last step)
    lrs = [r["lr"] for r in recs]
    assert lrs[0] == pytest.approx(1e-3) and lrs[1] == lrs[2] == pytest.approx(2e-3)
    assert lrs[2] > lrs[3] > lrs[4] > lrs[5] > 2e-4


def test_sample_is_printed(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    rc = train_mod.main(argv(corpus, out, "--sample-tokens", "12", "--sample-prompt", "the cat", "--eval-interval",
                             "2", steps=4))
    assert rc == 0
    stdout = capsys.readouterr().out
    assert stdout.count("--- sample at step") == 2  # at the evaluation of step 2, and after the summary
    after = stdout.split("--- sample at step 4 ---\n")[1]
    assert after.startswith("the cat") and len(after.split("\n---")[0]) > len("the cat")


def test_grad_accumulation_averages_the_micro_batch_gradients():
    cfg = get_preset("tiny", vocab_size=50, n_layer=1, n_head=2, n_embd=16, block_size=8)
    r = np.random.default_rng(0)
    x = r.integers(0, 50, (4, 8))
    y = r.integers(0, 50, (4, 8))
    params = []
    for batches in ([(x, y)], [(x[:2], y[:2]), (x[2:], y[2:])]):
        model = GPT(cfg, generator=np.random.default_rng(1))
        mp = nn.amp.MixedPrecision(model, "fp32")
        opt = nn.optim.SGD(mp.master_named_parameters(), lr=1.0)
        res = train_mod.train_step(model, mp, opt, batches, grad_clip=None)
        params.append({k: v.copy() for k, v in model.state_dict().items()})
        assert not res.skipped and res.grad_norm > 0
    full, halves = params
    for k in full:
        np.testing.assert_allclose(halves[k], full[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_grad_clip_bounds_the_update():
    cfg = get_preset("tiny", vocab_size=50, n_layer=1, n_head=2, n_embd=16, block_size=8)
    x = np.random.default_rng(0).integers(0, 50, (2, 8))
    model = GPT(cfg, generator=np.random.default_rng(1))
    before = {k: v.copy() for k, v in model.state_dict().items()}
    mp = nn.amp.MixedPrecision(model, "fp32")
    opt = nn.optim.SGD(mp.master_named_parameters(), lr=1.0)
    res = train_mod.train_step(model, mp, opt, [(x, x)], grad_clip=1e-3)
    assert res.grad_norm > 1e-3  # the norm before clipping is reported
    moved = math.sqrt(sum(float(((v - before[k]) ** 2).sum()) for k, v in model.state_dict().items()))
    assert moved == pytest.approx(1e-3, rel=1e-3)  # SGD with lr 1: the step is the clipped gradient


# ---------------------------------------------------------------------------
# resume: bitwise identical
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("precision,dropout,interrupt", [
    ("fp32", "0.0", "crash"),
    ("fp32", "0.2", "crash"),
    ("fp16", "0.2", "ctrl-c"),
])
def test_resume_is_bitwise_identical(corpus, tmp_path, monkeypatch, precision, dropout, interrupt):
    flags = ["--precision", precision, "--dropout", dropout, "--ckpt-interval", "3"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train_mod.main(argv(corpus, straight, *flags)) == 0

    with monkeypatch.context() as m:
        if interrupt == "crash":  # dies in step 5, after the checkpoint of step 3 and the metrics of step 4
            crash_at_call(m, 5, Crash("simulated crash"))
            with pytest.raises(Crash):
                train_mod.main(argv(corpus, resumed, *flags))
            assert [r["step"] for r in read_metrics(resumed / "metrics.jsonl")] == [1, 2, 3, 4]
        else:  # Ctrl-C during step 3: the step finishes, a checkpoint is written, the run stops
            real = train_mod.train_step
            calls = {"n": 0}

            def ctrl_c_in_step_3(*a, **k):
                calls["n"] += 1
                if calls["n"] == 3:
                    signal.raise_signal(signal.SIGINT)
                return real(*a, **k)

            m.setattr(train_mod, "train_step", ctrl_c_in_step_3)
            assert train_mod.main(argv(corpus, resumed, *flags, "--ckpt-interval", "0")) == 130
            assert [r["step"] for r in read_metrics(resumed / "metrics.jsonl")] == [1, 2, 3]
    assert TrainingCheckpoint.load(resumed / "ckpt.safetensors").step == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back

    assert train_mod.main(argv(corpus, resumed, *flags, "--resume")) == 0
    recs = read_metrics(resumed / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]  # the crashed run's step 4 was dropped, then redone
    assert losses(resumed) == losses(straight)  # exactly, not approximately
    a = read_metrics(straight / "metrics.jsonl")
    assert [r["grad_norm"] for r in recs] == [r["grad_norm"] for r in a]
    if precision == "fp16":
        assert [r["loss_scale"] for r in recs] == [r["loss_scale"] for r in a]
    ta, ma = load_checkpoint(straight / "ckpt.safetensors")
    tb, mb = load_checkpoint(resumed / "ckpt.safetensors")
    assert sorted(ta) == sorted(tb) and any(k.startswith("optim.exp_avg_sq.") for k in ta)
    for k in ta:
        assert np.array_equal(ta[k], tb[k]), k
    for k in ("step", "optimizer", "mixed_precision", "data", "rng"):
        assert ma[k] == mb[k], k


def test_dropout_masks_depend_on_seed_and_step_only():
    assert step_seed(1, 5) == step_seed(1, 5)
    assert len({step_seed(1, 5), step_seed(1, 6), step_seed(2, 5)}) == 3


def test_resume_when_already_finished_only_evaluates(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_mod.main(argv(corpus, out, steps=3)) == 0
    before = (out / "ckpt.safetensors").read_bytes()
    assert train_mod.main(argv(corpus, out, "--resume", steps=3)) == 0
    assert (out / "ckpt.safetensors").read_bytes() == before
    assert "done: 3 steps" in capsys.readouterr().out


# ---------------------------------------------------------------------------
# bad checkpoints and flags: exit code 2, a clear message, nothing destroyed
# ---------------------------------------------------------------------------


@pytest.fixture
def trained(corpus, tmp_path):
    out = tmp_path / "run"
    assert train_mod.main(argv(corpus, out, steps=3)) == 0
    return out


def test_corrupt_checkpoint_is_detected_and_kept(corpus, trained, capsys):
    path = trained / "ckpt.safetensors"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01  # one bit of a tensor
    path.write_bytes(bytes(data))
    assert train_mod.main(argv(corpus, trained, "--resume")) == 2
    err = capsys.readouterr().err
    assert "corrupt" in err and str(path) in err and "Traceback" not in err
    assert path.read_bytes() == bytes(data)  # untouched


def test_truncated_checkpoint_is_detected_and_kept(corpus, trained, capsys):
    path = trained / "ckpt.safetensors"
    data = path.read_bytes()[:-1000]
    path.write_bytes(data)
    assert train_mod.main(argv(corpus, trained, "--resume")) == 2
    assert str(path) in capsys.readouterr().err
    assert path.read_bytes() == data


@pytest.mark.parametrize("flags,words", [
    (["--n-embd", "48"], ["another model config", "n_embd: checkpoint 32, now 48"]),
    (["--vocab-size", "290"], ["another model config", "vocab_size: checkpoint 300, now 290"]),
    (["--precision", "fp16"], ["precision"]),
])
def test_mismatched_resume_is_an_error(corpus, trained, capsys, flags, words):
    path = trained / "ckpt.safetensors"
    before = path.read_bytes()
    assert train_mod.main(argv(corpus, trained, "--resume", *flags)) == 2
    err = capsys.readouterr().err
    for w in words:
        assert w in err, err
    assert path.read_bytes() == before


def test_resume_with_another_tokenizer_is_an_error(corpus, trained, tmp_path, capsys):
    from llm.tokenizer import Tokenizer

    other = tmp_path / "other.json"
    Tokenizer.train(make_corpus(seed=5)[::-1], 300).save(other)  # same size, other merges
    before = (trained / "ckpt.safetensors").read_bytes()
    assert train_mod.main(argv(corpus, trained, "--resume", "--tokenizer", str(other))) == 2
    assert "another tokenizer" in capsys.readouterr().err
    assert (trained / "ckpt.safetensors").read_bytes() == before


def test_resume_without_a_checkpoint_and_refusing_to_overwrite(corpus, trained, tmp_path, capsys):
    assert train_mod.main(argv(corpus, tmp_path / "empty", "--resume")) == 2
    assert "no checkpoint" in capsys.readouterr().err
    before = (trained / "ckpt.safetensors").read_bytes()
    assert train_mod.main(argv(corpus, trained)) == 2  # a fresh run into a folder with a checkpoint
    assert "--resume" in capsys.readouterr().err and (trained / "ckpt.safetensors").read_bytes() == before
    assert train_mod.main(argv(corpus, trained, "--overwrite", steps=2)) == 0
    assert TrainingCheckpoint.load(trained / "ckpt.safetensors").step == 2


def test_bad_flags_exit_2(corpus, tmp_path, capsys):
    assert train_mod.main(argv(corpus, tmp_path / "a", "--n-head", "3")) == 2  # 32 is not divisible by 3
    assert "divisible" in capsys.readouterr().err
    assert train_mod.main(argv(corpus, tmp_path / "b", "--precision", "bf16")) == 2
    assert "bfloat16" in capsys.readouterr().err
    assert train_mod.main(argv(corpus, tmp_path / "c", "--data", str(tmp_path / "missing.txt"))) == 2
    assert "not found" in capsys.readouterr().err
    assert train_mod.main(["--max-steps", "-1"]) == 2


def test_a_model_checkpoint_without_training_state_cannot_be_resumed(corpus, trained, tmp_path, capsys):
    from llm.checkpoint import save_model

    model, tok, _ = load_model(trained / "ckpt.safetensors")
    save_model(tmp_path / "model.safetensors", model, tok)
    assert train_mod.main(argv(corpus, trained, "--resume", str(tmp_path / "model.safetensors"))) == 2
    assert "no training state" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# divergence
# ---------------------------------------------------------------------------


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    rc = train_mod.main(argv(corpus, out, "--lr", "1e6", "--warmup-steps", "0", "--grad-clip", "0",
                             "--ckpt-interval", "1", steps=20))
    assert rc == 1
    err = capsys.readouterr().err
    path = out / "ckpt.safetensors"
    assert "Traceback" not in err
    assert f"the last good checkpoint is {path}; lower --lr or enable --grad-clip" in err
    bad_step = int(err.split(" at step ")[1].split(";")[0])
    assert ("loss is nan" in err or "loss is inf" in err or "gradient norm is" in err or "weights are not finite"
            in err), err
    model, tok, meta = load_model(path)  # loadable, finite, from before the divergence
    assert 1 <= meta["step"] < bad_step and tok.n_vocab == 300
    assert all(np.isfinite(v).all() for v in model.state_dict().values())


def test_nan_loss_is_an_error_at_the_step_it_happens(corpus, tmp_path, monkeypatch, capsys):
    real = GPT.forward
    calls = {"n": 0}

    def forward(self, ids, targets=None, **kw):
        logits, loss = real(self, ids, targets, **kw)
        if targets is not None and self.training:
            calls["n"] += 1
            if calls["n"] == 4:
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(GPT, "forward", forward)
    out = tmp_path / "run"
    assert train_mod.main(argv(corpus, out, "--ckpt-interval", "2", steps=6)) == 1
    err = capsys.readouterr().err
    assert f"loss is nan at step 4; the last good checkpoint is {out / 'ckpt.safetensors'}; lower --lr" in err
    assert TrainingCheckpoint.load(out / "ckpt.safetensors").step == 2


def test_fp16_overflow_is_a_skipped_step_and_persistent_overflow_an_error(corpus, tmp_path, monkeypatch, capsys):
    real = nn.amp.MixedPrecision.unscale_grads_to_master
    calls = {"n": 0}

    def unscale(self, scaler=None):
        found = real(self, scaler)
        calls["n"] += 1
        return True if calls["n"] == 2 or calls["n"] >= 5 else found

    monkeypatch.setattr(nn.amp.MixedPrecision, "unscale_grads_to_master", unscale)
    out = tmp_path / "run"
    rc = train_mod.main(argv(corpus, out, "--precision", "fp16", "--ckpt-interval", "1", steps=40))
    assert rc == 1
    err = capsys.readouterr().err
    assert f"{train_mod.MAX_CONSECUTIVE_SKIPS} steps in a row overflowed in float16" in err
    recs = read_metrics(out / "metrics.jsonl")
    assert [r["skipped"] for r in recs[:4]] == [False, True, False, False]
    assert recs[1]["grad_norm"] is None and recs[2]["loss_scale"] == recs[0]["loss_scale"] / 2
    assert recs[-1]["step"] == 4 + train_mod.MAX_CONSECUTIVE_SKIPS  # the failing step is logged
    assert recs[-1]["skipped_total"] == 1 + train_mod.MAX_CONSECUTIVE_SKIPS
    assert TrainingCheckpoint.load(out / "ckpt.safetensors").step == 4 + train_mod.MAX_CONSECUTIVE_SKIPS - 1


# ---------------------------------------------------------------------------
# pieces
# ---------------------------------------------------------------------------


def test_metrics_writer_keeps_lines_up_to_the_resume_step(tmp_path):
    path = tmp_path / "m.jsonl"
    w = MetricsWriter(path)
    for s in range(1, 6):
        w.write({"step": s, "loss": float(s)})
    w.write({"step": 6, "loss": float("nan")})
    w.close()
    with open(path, "a") as f:
        f.write('{"step": 7, "lo')  # a line cut by a crash
    assert read_metrics(path)[-1] == {"step": 6, "loss": None}
    w = MetricsWriter(path, resume_step=3)
    w.write({"step": 4, "loss": 40.0})
    w.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(path)] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    MetricsWriter(path).close()  # a fresh run starts the file empty
    assert read_metrics(path) == []


def test_measure_matmul_flops_is_a_plausible_rate():
    rate = measure_matmul_flops("cpu", n=128, seconds=0.05)
    assert 1e7 < rate < 1e14


def test_sampler_rows_split_across_ranks(corpus, tmp_path):
    """The loop hands rank/world_size to the sampler: the ranks' rows together are the single-process batch."""
    from llm.train_data import corpus_folder, default_tokenizer, prepare_training_data

    folder, resolved = corpus_folder([corpus["path"]], corpus["cache"])
    tok = default_tokenizer(resolved, folder, 300, log=None)
    train_ds, _, _ = prepare_training_data([corpus["path"]], tok, folder, 16, log=None)
    whole = BatchSampler(train_ds, 4, 16, seed=3).next_batch()[0]
    parts = [BatchSampler(train_ds, 4, 16, seed=3, rank=r, world_size=2).next_batch()[0] for r in range(2)]
    assert np.array_equal(np.concatenate(parts), whole)


def test_tokenizer_and_dataset_are_cached(corpus, tmp_path, capsys):
    assert train_mod.main(argv(corpus, tmp_path / "a", steps=1)) == 0
    out = capsys.readouterr().out
    assert "(byte-level BPE, 300 tokens, cached)" in out and "using the tokenised dataset" in out


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------


def test_help_explains_every_flag(capsys):
    assert train_mod.main(["--help"]) == 0
    text = capsys.readouterr().out
    parser = train_mod.build_parser()
    for action in parser._actions:
        for opt in action.option_strings:
            assert opt in text
        assert action.help, action.option_strings


def test_python_m_llm_train_help_smoke():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "llm", "train", "--help"], cwd=root, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--resume" in proc.stdout and "--grad-accum" in proc.stdout and "--max-minutes" in proc.stdout


def test_checkpoint_is_a_model_checkpoint_for_generate(corpus, trained):
    model, tok, meta = load_model(trained / "ckpt.safetensors")
    assert meta["kind"] == "training-state" and meta["step"] == 3
    assert json.loads(json.dumps(meta["rng"]))["seed"] == 1337
    assert model.config.n_embd == 32 and tok.n_vocab == model.config.vocab_size == 300


def test_max_minutes_stops_with_a_checkpoint(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_mod.main(argv(corpus, out, "--max-minutes", "0.0001", steps=50)) == 0  # 6 ms: up after one step
    stdout = capsys.readouterr().out
    assert "done (stopped by --max-minutes 0.0001): 1 steps" in stdout
    assert TrainingCheckpoint.load(out / "ckpt.safetensors").step == 1
    assert "val_loss" in read_metrics(out / "metrics.jsonl")[-1]
