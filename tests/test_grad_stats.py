"""``--grad-stats`` (``llm/trainer/grad_stats.py``): the statistics against computations made here, independently.

A small GPT learns to copy digits through the real trainer with grad-stats
on. The test then recomputes step k's statistics from scratch: it loads the
weights before step k (the checkpoint of a run stopped at k - 1, on the same
learning-rate schedule) and after it, draws the same batch, and computes the
mean loss's gradient with one plain forward and backward over the whole batch
(the trainer uses two micro-batches), the activations by running the model's
parts by hand, and the norms with NumPy over parameter names grouped here.
Clipping is set far below the gradient norm, so a statistic taken after
clipping would fail; so would one taken from one micro-batch only.
"""

import math

import numpy as np
import pytest

import autograd
from autograd.backend import to_device
from llm.model import GPT, get_preset
from llm.trainer import Job, Trainer, TrainerConfig, read_metrics
from llm.trainer import grad_stats as gs
from llm.trainer import trainer as trainer_mod

ROWS, HALF = 8, 6


class CopyDigits(Job):
    name = "copy"

    def __init__(self, placement="pre"):
        self.placement = placement

    def build_model(self):
        return GPT(get_preset("tiny", vocab_size=10, n_layer=3, n_embd=32, n_head=2, block_size=2 * HALF,
                              norm_placement=self.placement), generator=np.random.default_rng(0))

    def train_sampler(self, rank, world):
        return DigitRows(ROWS // world, rank)


def digit_batch(rows, seed, step):
    half = np.random.default_rng([seed, step]).integers(0, 10, (rows, HALF))
    ids = np.concatenate([half, half], axis=1)  # (rows, 2 HALF)
    labels = np.full_like(ids, -100)
    labels[:, HALF - 1:-1] = ids[:, HALF:]
    return {"input_ids": ids, "labels": labels}


class DigitRows:
    def __init__(self, rows, seed):
        self.rows, self.seed, self.step = rows, seed, 0

    def next_batch(self):
        self.step += 1
        return digit_batch(self.rows, self.seed, self.step - 1)

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state):
        self.step = state["step"]


@pytest.fixture(autouse=True)
def fast_flops(monkeypatch):
    monkeypatch.setattr(trainer_mod, "measure_matmul_flops", lambda device="cpu", n=512, seconds=0.5: 1e10)


def train(out, steps, placement="pre", **kw):
    cfg = dict(out_dir=str(out), batch_size=ROWS, grad_accum=2, max_steps=steps, lr=3e-3, warmup_steps=2,
               lr_decay_steps=6, grad_clip=0.05, eval_interval=100, log_interval=3, progress=False, grad_stats=True)
    cfg.update(kw)
    assert Trainer(CopyDigits(placement), TrainerConfig(**cfg)).run() == 0
    return read_metrics(out / "metrics.jsonl")


def weights_of(path):
    from llm.trainer import TrainingCheckpoint

    return {k: np.asarray(v, dtype=np.float64) for k, v in TrainingCheckpoint.load(path).model_state().items()}


def expected_stats(before, after, batch, placement):
    """Step statistics computed here: gradients of one whole-batch forward, norms grouped by hand."""
    model = CopyDigits(placement).build_model()
    model.load_state_dict({k: v.astype(np.float32) for k, v in before.items()})
    acts = {}
    x = model.wte(batch["input_ids"]) + model.wpe.weight[:2 * HALF]  # (B, T, C)
    acts["embed"] = x.data
    for i, block in enumerate(model.h):
        x = block(x)
        acts[f"h.{i}"] = x.data
    logits, _ = model(batch["input_ids"])
    labels = batch["labels"].reshape(-1)
    count = int((labels != -100).sum())
    loss = autograd.cross_entropy(logits.reshape(-1, 10), labels, ignore_index=-100, reduction="sum") / count
    loss.backward()
    grads = {n: to_device(p.grad, "cpu").astype(np.float64) for n, p in model.named_parameters()}

    def layer_group(name):
        head, *rest = name.split(".")
        if head == "h":
            return f"h.{rest[0]}", rest[1]
        return ("embed" if head in ("wte", "wpe") else "head"), head

    sums = {}
    for name, g in grads.items():
        for key in (layer_group(name)[0], layer_group(name)):
            s = sums.setdefault(key, np.zeros(3))
            s += [(g * g).sum(), (before[name] ** 2).sum(), ((after[name] - before[name]) ** 2).sum()]
    out = {key: {"grad_norm": math.sqrt(s[0]), "update_ratio": math.sqrt(s[2] / s[1])} for key, s in sums.items()}
    for name, a in acts.items():
        out[name]["act_rms"] = math.sqrt(float((a.astype(np.float64) ** 2).mean()))
    return out, math.sqrt(sum((g * g).sum() for g in grads.values()))


@pytest.mark.parametrize("placement", ["pre", "post"])
def test_statistics_equal_an_independent_computation(tmp_path, placement):
    records = train(tmp_path / "a", 3, placement)
    assert [r["step"] for r in records] == [1, 3]  # the first step (initial weights), then every --log-interval
    train(tmp_path / "b", 2, placement)  # the weights before step 3
    train(tmp_path / "c", 1, placement)  # the weights after step 1
    init = {n: to_device(p.data, "cpu").astype(np.float64)
            for n, p in CopyDigits(placement).build_model().named_parameters()}
    cases = [(records[0], init, weights_of(tmp_path / "c" / "ckpt.safetensors"), 0),
             (records[1], weights_of(tmp_path / "b" / "ckpt.safetensors"),
              weights_of(tmp_path / "a" / "ckpt.safetensors"), 2)]
    for record, before, after, drawn in cases:
        batch = {k: np.concatenate([digit_batch(ROWS, 0, 2 * drawn)[k], digit_batch(ROWS, 0, 2 * drawn + 1)[k]])
                 for k in ("input_ids", "labels")}  # --grad-accum 2: two draws per step
        expected, total = expected_stats(before, after, batch, placement)
        stats = record["grad_stats"]
        layers = ["embed", "h.0", "h.1", "h.2"] + (["head"] if placement == "pre" else [])
        assert list(stats) == layers
        assert record["grad_norm"] > 10 * 0.05  # clipping was active: the stats must be the unclipped gradient's
        np.testing.assert_allclose(record["grad_norm"], total, rtol=1e-5)
        for layer in layers:
            got = stats[layer]
            for key, want in expected[layer].items():
                np.testing.assert_allclose(got[key], want, rtol=2e-4, err_msg=f"step {record['step']} {layer} {key}")
            for group, values in got["groups"].items():
                for key in ("grad_norm", "update_ratio"):
                    np.testing.assert_allclose(values[key], expected[(layer, group)][key], rtol=2e-4,
                                               err_msg=f"step {record['step']} {layer}.{group} {key}")
        assert list(stats["h.1"]["groups"]) == ["ln_1", "attn", "ln_2", "mlp"]
        assert list(stats["embed"]["groups"]) == ["wte", "wpe"]
        # the layers' norms combine to the line's global norm
        np.testing.assert_allclose(math.sqrt(sum(stats[l]["grad_norm"] ** 2 for l in layers)), record["grad_norm"],
                                   rtol=1e-6)


def test_off_costs_nothing_and_writes_nothing(tmp_path, monkeypatch):
    def no_stats(*a, **k):
        raise AssertionError("GradStats built without --grad-stats")

    monkeypatch.setattr(trainer_mod, "GradStats", no_stats)
    seen = []
    real_step = trainer_mod.Layout.step

    def spy(self, *a, **k):
        seen.append(k.get("observe_grads"))
        return real_step(self, *a, **k)

    monkeypatch.setattr(trainer_mod.Layout, "step", spy)
    records = train(tmp_path, 4, grad_stats=False, log_interval=2)
    assert [r["step"] for r in records] == [2, 4] and not any("grad_stats" in r for r in records)
    assert seen == [None] * 4


def test_which_steps_are_armed():
    cfg = TrainerConfig(log_interval=10, eval_interval=25, max_steps=42)
    assert [s for s in range(1, 43) if gs.wants_stats(s, cfg)] == [1, 10, 20, 25, 30, 40, 42]


def test_layer_and_group_names():
    assert [gs.layer_of(n) for n in ("wte.weight", "wpe.weight", "h.11.attn.c_attn.weight", "ln_f.bias",
                                     "lm_head.weight", "score.weight", "embed", "h.3")] == \
        ["embed", "embed", "h.11", "head", "head", "score", "embed", "h.3"]
    assert [gs.group_of(n) for n in ("h.0.mlp.c_fc.weight", "h.0.attn.c_attn.lora_A", "wte.weight", "ln_f.weight")] \
        == ["mlp", "attn", "wte", "ln_f"]


def test_merge_adds_stages_and_shards_and_takes_one_replica():
    """Two stages x two replicas: the stages' parameters are distinct; the replicas' are the same (plain data
    parallelism: taken once) or pieces of one parameter (ZeRO: added); activations of every replica add."""
    def part(dp_rank, params, acts):
        return {"dp_rank": dp_rank, "params": params, "acts": acts}

    parts = [part(0, {"wte.weight": (9.0, 16.0, 1.0)}, {"embed": (8.0, 2), "h.0": (2.0, 2)}),
             part(1, {"wte.weight": (16.0, 9.0, 3.0)}, {"embed": (10.0, 2), "h.0": (6.0, 2)}),
             part(0, {"h.1.mlp.w": (4.0, 4.0, 0.25), "h.1.attn.w": (5.0, 12.0, 0.75)}, {"h.1": (1.0, 4)}),
             part(1, {"h.1.mlp.w": (4.0, 4.0, 0.25), "h.1.attn.w": (5.0, 12.0, 0.75)}, {"h.1": (3.0, 4)})]
    plain = gs.merge(parts, sharded=False)
    assert list(plain) == ["embed", "h.0", "h.1"]
    assert plain["embed"]["grad_norm"] == 3.0 and plain["embed"]["update_ratio"] == 0.25
    assert plain["embed"]["act_rms"] == math.sqrt(18.0 / 4) and plain["h.0"] == {"act_rms": math.sqrt(8.0 / 4)}
    assert plain["h.1"]["grad_norm"] == 3.0 and plain["h.1"]["update_ratio"] == 0.25
    assert plain["h.1"]["groups"] == {"mlp": {"grad_norm": 2.0, "update_ratio": 0.25},
                                      "attn": {"grad_norm": math.sqrt(5.0), "update_ratio": 0.25}}
    assert plain["h.1"]["act_rms"] == math.sqrt(4.0 / 8)
    sharded = gs.merge(parts, sharded=True)
    assert sharded["embed"]["grad_norm"] == 5.0 and sharded["embed"]["update_ratio"] == 0.4
    assert sharded["h.1"]["grad_norm"] == math.sqrt(18.0)


def test_none_placement_has_no_norm_groups(tmp_path):
    records = train(tmp_path, 1, "none")
    stats = records[0]["grad_stats"]
    assert list(stats) == ["embed", "h.0", "h.1", "h.2"]
    assert list(stats["h.0"]["groups"]) == ["attn", "mlp"]
