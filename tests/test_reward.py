"""The reward model: the score read at the last real token (from the mask), Bradley-Terry with margins and centring
(value and gradient), K-way rankings as all pairs in one batch element, bad records, and the job end to end."""

import json
import math

import numpy as np
import pytest

import autograd
from autograd import Tensor
from llm.model import GPT, get_preset
from llm.post.data import DataError
from llm.post.rankings import encode_rankings, ranking_from_record, read_rankings
from llm.post.reward_model import (RewardModel, RewardNormalization, RewardStats, bradley_terry_loss,
                                   sequence_scores)
from rlhf_fixtures import TEXT, chat_checkpoint, preference_file, read_metrics


def tiny_policy(vocab=40, seed=0, block=32):
    return GPT(get_preset("tiny", vocab_size=vocab, n_layer=1, n_head=2, n_embd=16, block_size=block),
               generator=np.random.default_rng(seed))


# ---------------------------------------------------------------------------
# the model and where it reads the score
# ---------------------------------------------------------------------------


def test_reward_model_copies_the_trunk_and_has_a_scalar_head():
    policy = tiny_policy()
    rm = RewardModel.from_policy(policy, generator=np.random.default_rng(1))
    ps, rs = policy.state_dict(), rm.state_dict()
    assert all(np.array_equal(ps[k], rs[k]) for k in ps)  # the tied policy has no lm_head: every tensor is trunk
    assert rs["lm_head.weight"].shape == (16, 1) and rs["lm_head.bias"].shape == (1,)
    assert rm.config.tie_embeddings is False
    out = rm(np.array([[1, 2, 3]]))
    assert out[0].shape == (1, 3, 1)


def test_the_score_is_read_at_the_last_real_token_found_from_the_mask_even_when_pad_equals_eos():
    rm = RewardModel.from_policy(tiny_policy(), generator=np.random.default_rng(1))
    eos = 7
    short = [3, 4, eos]  # ends with eos; padded with eos too
    long = [5, 6, 8, 9, eos]
    ids = np.array([short + [eos, eos], long])
    keep = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    out, _ = rm(ids)
    got = sequence_scores(out, keep).data
    alone_short = rm(np.array([short]))[0].data[0, -1, 0]
    alone_long = rm(np.array([long]))[0].data[0, -1, 0]
    np.testing.assert_allclose(got, [alone_short, alone_long], rtol=1e-5)
    # a reader that looked for the first pad id (= eos) would have stopped one token early in the short row
    assert not np.isclose(out.data[0, 1, 0], alone_short)


# ---------------------------------------------------------------------------
# Bradley-Terry
# ---------------------------------------------------------------------------


def test_bradley_terry_is_ln2_per_pair_at_equal_rewards_and_matches_a_hand_computation():
    better = np.zeros((2, 3, 3), bool)
    better[0, 0, 1] = better[0, 0, 2] = better[0, 1, 2] = True  # a ranking of three: 3 pairs
    better[1, 0, 1] = True
    total, n = bradley_terry_loss(Tensor(np.zeros((2, 3))), better)
    assert n == 4 and float(total.data) == pytest.approx(4 * math.log(2))
    r = np.array([[2.0, 0.5, -1.0], [0.3, 1.3, 0.0]])
    margin = np.zeros((2, 3, 3))
    margin[1, 0, 1] = 0.5
    total, _ = bradley_terry_loss(Tensor(r), better, margin, center_coef=0.1)

    def nls(x):
        return math.log1p(math.exp(-x))  # -log sigmoid(x)

    want = nls(1.5) + nls(3.0) + nls(1.5) + nls(0.3 - 1.3 - 0.5)
    want += 0.1 * ((2.5) ** 2 + (1.0) ** 2 + (-0.5) ** 2 + (1.6) ** 2)
    assert float(total.data) == pytest.approx(want, rel=1e-12)


def test_bradley_terry_gradient_passes_a_finite_difference_check():
    rng = np.random.default_rng(0)
    better = np.zeros((3, 3, 3), bool)
    better[0, 0, 1] = better[0, 1, 2] = better[0, 0, 2] = better[1, 1, 0] = better[2, 2, 1] = True
    margin = rng.uniform(0, 1, (3, 3, 3)) * better
    r = Tensor(rng.normal(size=(3, 3)), requires_grad=True)
    assert autograd.gradcheck(lambda x: bradley_terry_loss(x, better, margin, 0.05)[0], r, mode="elementwise")


def test_bradley_terry_is_stable_for_huge_differences():
    better = np.zeros((1, 2, 2), bool)
    better[0, 0, 1] = True
    r = Tensor(np.array([[-500.0, 500.0]], dtype=np.float32), requires_grad=True)
    total, _ = bradley_terry_loss(r, better)
    total.backward()
    assert float(total.data) == pytest.approx(1000.0) and np.isfinite(r.grad).all()
    np.testing.assert_allclose(r.grad, [[-1.0, 1.0]])


# ---------------------------------------------------------------------------
# rankings and records
# ---------------------------------------------------------------------------


def test_a_k_way_ranking_becomes_every_pair_inside_one_batch_element():
    rk = ranking_from_record({"prompt": "p", "responses": ["a", "bb", "ccc", "dddd"]})
    assert [(i, j) for i, j, _ in rk.pairs] == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    by_score = ranking_from_record({"prompt": "p", "responses": ["a", "b", "c"], "scores": [1, 3, 1]})
    assert sorted((i, j) for i, j, _ in by_score.pairs) == [(1, 0), (1, 2)]  # equal scores make no pair
    pair = ranking_from_record({"prompt": "p", "chosen": "x", "rejected": "y", "margin": 2})
    arrays = encode_rankings([rk, pair], lambda p, r: ([1] + [2] * len(r) + [9], False), pad_id=0)
    assert arrays.input_ids.shape == (2, 4, 6) and arrays.better.shape == (2, 4, 4)
    assert arrays.better[0].sum() == 6 and arrays.better[1].sum() == 1 and arrays.margin[1, 0, 1] == 2
    np.testing.assert_array_equal(arrays.keep[1].sum(-1), [3, 3, 0, 0])  # the pair's two slots, two empty
    np.testing.assert_array_equal(arrays.keep[0].sum(-1), [3, 4, 5, 6])
    # a batch of elements never splits a ranking
    batch = arrays.rows(np.array([0]))
    assert batch["better"].sum() == 6


@pytest.mark.parametrize("record, words", [
    ({"chosen": "a", "rejected": "b"}, "lacks 'prompt'"),
    ({"prompt": "p", "chosen": "a"}, "lacks 'rejected'"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "the same answer"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}, '"margin" must be a finite number'),
    ({"prompt": "p", "responses": ["a"]}, "at least 2"),
    ({"prompt": "p", "responses": ["a", "a"]}, "appears twice"),
    ({"prompt": "p", "responses": ["a", "b"], "scores": [1]}, '"scores" must be a list of 2'),
    ({"prompt": "p", "responses": ["a", "b"], "scores": [1, 1]}, "same score"),
    ({"prompt": "p", "responses": ["a", 2]}, r'"responses"\[1\] must be a string'),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, '"prompt" must be a string or a list of messages'),
    ({"prompt": "p", "chosen": 1, "rejected": "b"}, '"chosen" must be a string or a list of messages'),
    ({"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
      "responses": ["a", "b"]}, "must end with a user turn"),
])
def test_bad_preference_records_get_one_clear_message(record, words):
    with pytest.raises(DataError, match=words):
        ranking_from_record(record, "prefs.jsonl:3")


def test_read_rankings_names_the_file_and_line(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n{not json\n")
    with pytest.raises(DataError, match=r"prefs.jsonl:2: not valid JSON"):
        read_rankings(path)
    with pytest.raises(DataError, match="does not exist"):
        read_rankings(tmp_path / "nope.jsonl")


# ---------------------------------------------------------------------------
# statistics and normalisation
# ---------------------------------------------------------------------------


def test_reward_stats_and_normalization():
    s = RewardStats()
    better = np.zeros((2, 2, 2), bool)
    better[:, 0, 1] = True
    s.add(np.array([[1.0, 0.0], [2.0, 3.0]]), better, np.ones((2, 2), bool))
    out = s.summary("val_")
    assert out["val_accuracy"] == 0.5 and out["val_margin"] == pytest.approx(0.0)
    assert out["val_reward_mean"] == pytest.approx(1.5) and out["val_reward_min"] == 0 and out["val_reward_max"] == 3
    norm = RewardNormalization.from_stats(s, step=5)
    z = norm(np.array([1.0, 0.0, 2.0, 3.0]))
    assert abs(z.mean()) < 1e-12 and z.std() == pytest.approx(1.0)
    assert RewardNormalization.from_json(norm.to_json()) == norm


# ---------------------------------------------------------------------------
# the job: python -m llm reward
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sft_ckpt(tmp_path_factory):
    return chat_checkpoint(tmp_path_factory.mktemp("sft") / "sft.safetensors")


def test_reward_job_learns_held_out_preferences_and_stores_its_normalization(sft_ckpt, tmp_path, capsys):
    from llm.post.reward import main
    from llm.post.reward_model import load_reward_model

    prefs = preference_file(tmp_path / "prefs.jsonl")
    out = tmp_path / "rm"
    code = main(["--model", str(sft_ckpt), "--data", str(prefs), "--val-fraction", "0.25", "--out-dir", str(out),
                 "--max-steps", "40", "--batch-size", "4", "--lr", "3e-3", "--warmup-steps", "4",
                 "--eval-interval", "20", "--no-progress", "--center-coef", "0.01"])
    assert code == 0, capsys.readouterr().err
    records = read_metrics(out / "metrics.jsonl")
    lines = [m for m in records if "val_accuracy" in m]
    last = lines[-1]
    for key in ("loss", "val_loss", "train_accuracy", "train_margin", "train_reward_mean", "train_reward_max",
                "val_accuracy", "val_margin", "val_reward_mean", "val_reward_min", "val_reward_max", "norm_gain",
                "norm_bias"):
        assert key in last, key
    assert all("train_accuracy" in m for m in records)  # every metrics line: the pairs since the previous one
    assert last["val_accuracy"] >= 0.9 and last["val_margin"] > 1.0 and last["val_loss"] < 0.1 * math.log(2)
    assert abs(last["val_reward_mean"]) < 0.5  # the centring term keeps the rewards near 0
    assert "held-out pairs: accuracy" in capsys.readouterr().out
    model, tok, norm, meta = load_reward_model(out / "ckpt.safetensors")
    assert meta["job"] == "reward" and norm is not None and norm.step == 40
    assert norm.gain == pytest.approx(last["norm_gain"]) and norm.bias == pytest.approx(last["norm_bias"])


def test_reward_job_bad_input_is_one_clear_message(sft_ckpt, tmp_path, capsys):
    from llm.post.reward import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"}) + "\n")
    assert main(["--model", str(sft_ckpt), "--data", str(bad), "--out-dir", str(tmp_path / "o")]) == 2
    assert "the same answer" in capsys.readouterr().err
    assert main(["--model", str(tmp_path / "nope.safetensors"), "--data", str(bad),
                 "--out-dir", str(tmp_path / "o")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
    # a model whose tokenizer lacks the chat tokens
    from llm.checkpoint import save_model
    from llm.tokenizer import Tokenizer

    tok = Tokenizer.train(TEXT, vocab_size=280)
    plain = tmp_path / "plain.safetensors"
    save_model(plain, GPT(get_preset("tiny", vocab_size=tok.n_vocab, n_layer=1, n_head=2, n_embd=16, block_size=16),
                          generator=np.random.default_rng(0)), tok)
    good = preference_file(tmp_path / "good.jsonl", n=8)
    assert main(["--model", str(plain), "--data", str(good), "--out-dir", str(tmp_path / "o")]) == 2
    assert "lacks the chat token" in capsys.readouterr().err
