"""Tests for `python -m llm train` (llm.train, llm.trainer, llm.train_data).

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
from llm.trainer import Job, Layout, MetricsWriter, TrainingCheckpoint, measure_matmul_flops, read_metrics, step_seed
from llm.trainer import trainer as trainer_mod
from parallel import get_world

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
    monkeypatch.setattr(trainer_mod, "measure_matmul_flops", lambda device="cpu", n=512, seconds=0.5: 1e10)


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
    """Make the n-th training step (1-based) raise ``exc`` before doing anything."""
    real = Layout.step
    calls = {"n": 0}

    def wrapper(*a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise exc
        return real(*a, **k)

    monkeypatch.setattr(Layout, "step", wrapper)


def one_process_step(model, precision, batches, optimizer="sgd", grad_clip=None):
    """One optimizer step of ``model`` through the trainer's layout in one process; ``batches``: (x, y) pairs,
    one per micro-batch."""
    layout = Layout.build(model, get_world(), precision=precision, n_micro=len(batches))
    opt = nn.optim.SGD(layout.mp.master_named_parameters(), lr=1.0)
    batch = {"input_ids": np.concatenate([x for x, _ in batches]), "labels": np.concatenate([y for _, y in batches])}
    return layout.step(Job(), opt, batch, len(batches), grad_clip)


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
        res = one_process_step(model, "fp32", batches)
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
    res = one_process_step(model, "fp32", [(x, x)], grad_clip=1e-3)
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
    sigint_before = signal.getsignal(signal.SIGINT)  # the default handler, or SIG_IGN under `nohup ... &`
    assert train_mod.main(argv(corpus, straight, *flags)) == 0

    with monkeypatch.context() as m:
        if interrupt == "crash":  # dies in step 5, after the checkpoint of step 3 and the metrics of step 4
            crash_at_call(m, 5, Crash("simulated crash"))
            with pytest.raises(Crash):
                train_mod.main(argv(corpus, resumed, *flags))
            assert [r["step"] for r in read_metrics(resumed / "metrics.jsonl")] == [1, 2, 3, 4]
        else:  # Ctrl-C during step 3: the step finishes, a checkpoint is written, the run stops
            real = Layout.step
            calls = {"n": 0}

            def ctrl_c_in_step_3(*a, **k):
                calls["n"] += 1
                if calls["n"] == 3:
                    signal.raise_signal(signal.SIGINT)
                return real(*a, **k)

            m.setattr(Layout, "step", ctrl_c_in_step_3)
            assert train_mod.main(argv(corpus, resumed, *flags, "--ckpt-interval", "0")) == 130
            assert [r["step"] for r in read_metrics(resumed / "metrics.jsonl")] == [1, 2, 3]
    assert TrainingCheckpoint.load(resumed / "ckpt.safetensors").step == 3
    assert signal.getsignal(signal.SIGINT) is sigint_before  # put back
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL

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
    real = train_mod.PretrainJob.loss
    calls = {"n": 0}

    def loss(self, logits, batch):
        total, count = real(self, logits, batch)
        calls["n"] += 1
        if calls["n"] == 4:
            total = total * float("nan")
        return total, count

    monkeypatch.setattr(train_mod.PretrainJob, "loss", loss)
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
    assert f"{trainer_mod.MAX_CONSECUTIVE_SKIPS} steps in a row overflowed in float16" in err
    recs = read_metrics(out / "metrics.jsonl")
    assert [r["skipped"] for r in recs[:4]] == [False, True, False, False]
    assert recs[1]["grad_norm"] is None and recs[2]["loss_scale"] == recs[0]["loss_scale"] / 2
    assert recs[-1]["step"] == 4 + trainer_mod.MAX_CONSECUTIVE_SKIPS  # the failing step is logged
    assert recs[-1]["skipped_total"] == 1 + trainer_mod.MAX_CONSECUTIVE_SKIPS
    assert TrainingCheckpoint.load(out / "ckpt.safetensors").step == 4 + trainer_mod.MAX_CONSECUTIVE_SKIPS - 1


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


# ---------------------------------------------------------------------------
# signals, full disks, interrupted writes, resumed bookkeeping
# ---------------------------------------------------------------------------


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _start(cmd, out):
    """Start a training command in a subprocess; return it once its metrics show two steps done."""
    import time

    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(read_metrics(metrics)) >= 2:
            return proc
        time.sleep(0.05)
    out_text, err_text = proc.communicate(timeout=60)
    raise AssertionError(f"the run did not get going (exit {proc.returncode}):\n{out_text[-2000:]}\n{err_text[-2000:]}")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["sigterm-one-process", "ctrl-c-dp2"])
def test_a_signal_stops_every_rank_at_one_step_with_a_checkpoint_and_resume_is_bitwise(corpus, tmp_path, monkeypatch,
                                                                                       how):
    """SIGTERM to one process, or Ctrl-C (SIGINT) to `python -m llm train --dp 2` (which runs mpirun): every rank
    stops after the same step, one checkpoint is written, the exit code is 143 / 130, and --resume continues with
    exactly the losses of an uninterrupted run."""
    for var in ("OMPI_ALLOW_RUN_AS_ROOT", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"):
        monkeypatch.setenv(var, "1")  # mpirun refuses to start as root without them
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    dp = ["--dp", "2"] if how == "ctrl-c-dp2" else []
    flags = [*dp, "--lr-decay-steps", "400", "--ckpt-interval", "0"]  # a schedule independent of --max-steps
    out = tmp_path / "stopped"
    proc = _start([sys.executable, "-m", "llm", "train", *argv(corpus, out, *flags, steps=400)], out)
    proc.send_signal(signal.SIGTERM if how == "sigterm-one-process" else signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == (143 if how == "sigterm-one-process" else 130), stdout[-2000:] + stderr[-3000:]
    step = TrainingCheckpoint.load(out / "ckpt.safetensors").step
    assert 2 <= step < 400 and f"stopped at step {step} by a signal" in stdout
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")][-1] == step
    assert sorted(os.listdir(out)) == ["ckpt.safetensors", "metrics.jsonl"]  # no temporary left behind

    # in-process calls: with --dp 2 they start mpirun themselves
    assert train_mod.main(argv(corpus, out, *flags, "--resume", steps=step + 2)) == 0
    straight = tmp_path / "straight"
    assert train_mod.main(argv(corpus, straight, *flags, steps=step + 2)) == 0
    assert losses(out) == losses(straight)


def test_a_second_signal_interrupts_at_once():
    from llm.trainer.signals import GracefulStop

    seen = []
    with pytest.raises(KeyboardInterrupt):
        with GracefulStop(seen.append) as stop:
            signal.raise_signal(signal.SIGUSR2)  # mpirun forwards this one: "stop as for SIGTERM"
            assert stop.requested == signal.SIGUSR2 and stop.exit_code == 143
            signal.raise_signal(signal.SIGINT)
    assert seen == ["SIGUSR2 (stop as for SIGTERM)"]
    assert signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_a_signal_that_lands_while_the_ranks_agree_is_not_lost(corpus, tmp_path, monkeypatch):
    """A signal that arrives during the all-gather of ``agree_on_stop`` (after the ranks compared notes) stops the
    run after the next step; it is not overwritten by that round's "no signal" (which ran the job to the end)."""
    real, calls = trainer_mod.agree_on_stop, {"n": 0}

    def agree_while_a_signal_lands(comm, requested, *flags):
        out = real(comm, requested, *flags)
        calls["n"] += 1
        if calls["n"] == 3:
            signal.raise_signal(signal.SIGINT)  # lands after this round's answer was made
        return out

    monkeypatch.setattr(trainer_mod, "agree_on_stop", agree_while_a_signal_lands)
    out = tmp_path / "run"
    assert train_mod.main(argv(corpus, out, "--ckpt-interval", "0", steps=20)) == 130
    assert TrainingCheckpoint.load(out / "ckpt.safetensors").step == 4


def test_a_full_disk_is_one_clear_error_with_its_own_exit_code_and_the_last_checkpoint_stays(corpus, tmp_path,
                                                                                            monkeypatch, capsys):
    import errno

    from llm.trainer import checkpoint as ckpt_mod

    out = tmp_path / "run"
    real = ckpt_mod.save_checkpoint
    calls = {"n": 0}

    def save(path, tensors, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint: the disk fills up while writing
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, tensors, metadata)

    monkeypatch.setattr(ckpt_mod, "save_checkpoint", save)
    rc = train_mod.main(argv(corpus, out, "--ckpt-interval", "2", steps=6))
    err = capsys.readouterr().err
    assert rc == 3, err
    assert "Traceback" not in err
    assert f"could not write the checkpoint {out / 'ckpt.safetensors'}: the disk is full: it needs about" in err
    assert "bytes free in" in err and "the previous checkpoint is intact" in err
    assert TrainingCheckpoint.load(out / "ckpt.safetensors").step == 2  # the step-2 checkpoint, intact
    assert "3 the checkpoint could not be written" in " ".join(train_mod.build_parser().epilog.split())


def test_stale_temporaries_of_a_killed_write_are_removed_at_the_next_start(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_mod.main(argv(corpus, out, steps=2)) == 0
    stale = out / ".tmp-k2j4h1x9-ckpt.safetensors"
    stale.write_bytes(b"\0" * 1000)
    (out / ".tmp-k2j4h1x9-metrics.jsonl").write_text("{")
    keep = [out / ".tmp-notes.txt", out / "tmp-ckpt.safetensors"]  # not ours: left alone
    for k in keep:
        k.write_text("mine")
    capsys.readouterr()
    assert train_mod.main(argv(corpus, out, "--resume", steps=3)) == 0
    stdout = capsys.readouterr().out
    assert f"removed {stale} (1,000 bytes), a temporary file left by a run killed while writing" in stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(["ckpt.safetensors", "metrics.jsonl"] +
                                                           [k.name for k in keep])


def test_tokens_count_what_was_trained_after_resuming_with_another_batch_size(corpus, tmp_path):
    out = tmp_path / "run"
    assert train_mod.main(argv(corpus, out, steps=3)) == 0
    assert train_mod.main(argv(corpus, out, "--resume", "--batch-size", "8", steps=5)) == 0
    tokens = [r["tokens"] for r in read_metrics(out / "metrics.jsonl")]
    assert tokens == [4 * 16, 8 * 16, 12 * 16, 12 * 16 + 8 * 16, 12 * 16 + 16 * 16]


def test_progress_without_a_terminal_is_one_plain_line_per_log_interval(corpus, tmp_path, capsys):
    flags = [f for f in argv(corpus, tmp_path / "run", "--log-interval", "2", steps=6) if f != "--no-progress"]
    assert train_mod.main(flags) == 0
    err = capsys.readouterr().err  # capsys: not a terminal
    lines = [line for line in err.splitlines() if line.startswith("pretrain step")]
    assert [line.split(":")[0] for line in lines] == ["pretrain step 2/6", "pretrain step 4/6", "pretrain step 6/6"]
    assert "\r" not in err and "tokens/s" in lines[0]


def test_every_output_file_gets_the_same_mode(corpus, tmp_path):
    out = tmp_path / "run"
    assert train_mod.main(argv(corpus, out, steps=1)) == 0
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes == {"ckpt.safetensors": 0o644, "metrics.jsonl": 0o644}


def test_extending_a_run_says_which_flag_keeps_its_schedule(corpus, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert train_mod.main(argv(corpus, a, steps=4)) == 0
    capsys.readouterr()
    assert train_mod.main(argv(corpus, a, "--resume", steps=6)) == 0
    assert "to continue its schedule exactly, pass --lr-decay-steps 4" in capsys.readouterr().out
    # with the flag, the extended run's learning rates are those of a straight run with the same schedule
    assert train_mod.main(argv(corpus, b, steps=4)) == 0
    capsys.readouterr()
    assert train_mod.main(argv(corpus, b, "--resume", "--lr-decay-steps", "4", steps=6)) == 0
    assert "--lr-decay-steps" not in capsys.readouterr().out
    c = tmp_path / "c"
    assert train_mod.main(argv(corpus, c, "--lr-decay-steps", "4", steps=6)) == 0
    lrs = [r["lr"] for r in read_metrics(b / "metrics.jsonl")]
    assert lrs == [r["lr"] for r in read_metrics(c / "metrics.jsonl")]
    assert losses(b) == losses(c)


def test_every_model_field_has_a_flag_and_head_counts_are_checked_once(corpus, tmp_path, capsys):
    import dataclasses

    from llm.model import GPTConfig

    text = " ".join(train_mod.build_parser().format_help().split())
    for field in dataclasses.fields(GPTConfig):
        if field.name != "vocab_size":  # the tokenizer's
            assert "--" + field.name.replace("_", "-") in text, field.name
    # llama-tiny has 2 kv heads; with --n-embd 40 --n-head 5 they no longer divide: the error names the flag to fix
    rc = train_mod.main(argv(corpus, tmp_path / "x", "--preset", "llama-tiny", "--n-embd", "40", "--n-head", "5",
                             steps=1))
    err = capsys.readouterr().err
    assert rc == 2 and "n_head=5 is not divisible by n_kv_head=2" in err and "--n-kv-head" in err
    assert train_mod.main(argv(corpus, tmp_path / "y", "--preset", "llama-tiny", "--n-head", "4", "--n-kv-head", "1",
                               steps=1)) == 0
    model, _, _ = load_model(tmp_path / "y" / "ckpt.safetensors")
    assert model.config.n_kv_head == 1 and model.config.n_head == 4 and model.config.norm == "rmsnorm"


def test_model_config_file(corpus, tmp_path, capsys):
    good = tmp_path / "model.json"
    good.write_text(json.dumps({"norm": "rmsnorm", "bias": False, "n_layer": 3}))
    assert train_mod.main(argv(corpus, tmp_path / "run", "--model-config", str(good), steps=1)) == 0
    model, _, _ = load_model(tmp_path / "run" / "ckpt.safetensors")
    # --n-layer 2 (a flag) overrides the file's 3; the file's norm and bias stay
    assert (model.config.n_layer, model.config.norm, model.config.bias) == (2, "rmsnorm", False)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"n_layers": 3}))
    assert train_mod.main(argv(corpus, tmp_path / "run2", "--model-config", str(bad), steps=1)) == 2
    assert "has unknown field(s) ['n_layers']" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--recompute"], ["--precision", "fp64"]])
def test_recompute_and_fp64_train(corpus, tmp_path, flags):
    """--recompute trains the same model (to float rounding) as the plain run; fp64 runs everywhere in float64."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert train_mod.main(argv(corpus, a, steps=3)) == 0
    assert train_mod.main(argv(corpus, b, *flags, steps=3)) == 0
    np.testing.assert_allclose(losses(b), losses(a), rtol=1e-5)


def test_one_piece_of_thread_advice_in_the_readme_and_in_help():
    from llm.trainer.config import threads_note

    readme = " ".join(open(os.path.join(ROOT, "README.md"), encoding="utf-8").read().split())
    assert threads_note() in readme
    assert threads_note() in " ".join(train_mod.build_parser().format_help().split())
    assert "OPENBLAS_NUM_THREADS" not in readme


def test_resume_on_another_number_of_threads_is_bitwise(corpus, tmp_path, monkeypatch):
    """Every op cuts its work by shape alone: 3 steps on one thread and 3 more on three give the losses of a run
    on two threads throughout, to the bit."""
    from autograd import threads

    flags = ["--lr-decay-steps", "6", "--dropout", "0.1", "--batch-size", "16", "--n-embd", "64"]  # products cut in 4
    before = threads.num_threads()
    try:
        threads.set_num_threads(2)
        straight, mixed = tmp_path / "straight", tmp_path / "mixed"
        assert train_mod.main(argv(corpus, straight, *flags, steps=6)) == 0
        threads.set_num_threads(1)
        assert train_mod.main(argv(corpus, mixed, *flags, steps=3)) == 0
        threads.set_num_threads(3)
        assert train_mod.main(argv(corpus, mixed, *flags, "--resume", steps=6)) == 0
    finally:
        threads.set_num_threads(before)
    assert losses(mixed) == losses(straight)
    a = load_checkpoint(straight / "ckpt.safetensors")[0]
    b = load_checkpoint(mixed / "ckpt.safetensors")[0]
    assert all(np.array_equal(a[k], b[k]) for k in a)
