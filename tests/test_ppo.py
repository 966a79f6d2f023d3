"""PPO: the rollout arithmetic (KL estimators, rewards, GAE, whitening, the KL coefficient), the clipped losses and
their gradients, a one-step bandit that must reach the KL-regularised optimum, and the PPO job end to end."""

import math

import numpy as np
import pytest

import autograd
import nn
from autograd import Tensor
from llm.post.advantages import (AdaptiveKLController, FixedKLController, gae, kl_estimate, kl_penalized_rewards,
                                 last_token_index, masked_mean, masked_var, masked_whiten)
from llm.post.ppo_loss import entropy, policy_loss, token_logprobs, value_loss

# ---------------------------------------------------------------------------
# GAE
# ---------------------------------------------------------------------------


def test_gae_matches_a_hand_computed_four_step_example():
    # rewards 0, 0, 0, 1; values .5 .6 .7 .8; gamma .9, lambda .8 (gamma * lambda = .72). By hand:
    #   delta_3 = 1 + 0 - .8 = .2            A_3 = .2
    #   delta_2 = 0 + .9 * .8 - .7 = .02     A_2 = .02 + .72 * .2 = .164
    #   delta_1 = 0 + .9 * .7 - .6 = .03     A_1 = .03 + .72 * .164 = .14808
    #   delta_0 = 0 + .9 * .6 - .5 = .04     A_0 = .04 + .72 * .14808 = .1466176
    rewards = np.array([[0.0, 0.0, 0.0, 1.0]])
    values = np.array([[0.5, 0.6, 0.7, 0.8]])
    adv, ret = gae(rewards, values, np.ones((1, 4), bool), gamma=0.9, lam=0.8)
    np.testing.assert_allclose(adv[0], [0.1466176, 0.14808, 0.164, 0.2], rtol=0, atol=1e-12)
    np.testing.assert_allclose(ret[0], [0.6466176, 0.74808, 0.864, 1.0], rtol=0, atol=1e-12)


def test_gae_ends_the_episode_at_the_last_real_token():
    # the same 3 real steps followed by padding whose (garbage) rewards and values must not leak in
    rewards = np.array([[0.0, 0.0, 1.0, 5.0, 7.0]])
    values = np.array([[0.5, 0.6, 0.7, 9.0, 9.0]])
    mask = np.array([[True, True, True, False, False]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # gamma = lambda = 1: A_t = (sum of rewards from t) - V_t = 1 - V_t
    np.testing.assert_allclose(adv[0], [0.5, 0.4, 0.3, 0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(ret[0], [1.0, 1.0, 1.0, 0.0, 0.0], atol=1e-12)


def test_gae_rejects_a_discount_outside_zero_one():
    with pytest.raises(ValueError, match="gamma must be in"):
        gae(np.zeros((1, 2)), np.zeros((1, 2)), np.ones((1, 2), bool), gamma=1.5)


# ---------------------------------------------------------------------------
# whitening
# ---------------------------------------------------------------------------


def test_masked_whitening_uses_only_the_real_tokens():
    x = np.array([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, -50.0]])
    mask = np.array([[True, True, True, False], [True, True, False, False]])
    w = masked_whiten(x, mask)
    real = np.array([1.0, 2.0, 3.0, 4.0, 5.0])  # mean 3, unbiased variance 2.5
    np.testing.assert_allclose(w[mask], (real - 3.0) / math.sqrt(2.5 + 1e-8), rtol=1e-6)
    assert (w[~mask] == 0).all()
    assert abs(w[mask].mean()) < 1e-6 and abs(w[mask].std(ddof=1) - 1.0) < 1e-5
    # without the mean shift only the scale changes
    np.testing.assert_allclose(masked_whiten(x, mask, shift_mean=False)[mask], (real - 3.0) / math.sqrt(2.5) + 3.0,
                               rtol=1e-6)
    assert masked_mean(x, mask) == pytest.approx(3.0)
    assert masked_var(x, mask) == pytest.approx(2.5)


def test_masked_whitening_of_fewer_than_two_tokens_is_a_clear_error():
    with pytest.raises(ValueError, match="at least 2"):
        masked_whiten(np.ones((1, 3)), np.array([[True, False, False]]))


# ---------------------------------------------------------------------------
# KL estimators, rewards, the KL coefficient
# ---------------------------------------------------------------------------


def test_k1_and_k3_are_unbiased_and_k3_is_never_negative():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(6))
    q = rng.dirichlet(np.ones(6))
    exact = float((p * np.log(p / q)).sum())  # KL(p || q)
    logp, logq = np.log(p), np.log(q)
    # the expectation under p, summed exactly over the 6 outcomes
    for est in ("k1", "k3"):
        assert float((p * kl_estimate(logp, logq, est)).sum()) == pytest.approx(exact, rel=1e-12)
    # and by sampling from p
    draws = rng.choice(6, size=400_000, p=p)
    for est in ("k1", "k3"):
        sample = kl_estimate(logp[draws], logq[draws], est)
        assert abs(sample.mean() - exact) < 4 * sample.std() / math.sqrt(draws.size)
    assert (kl_estimate(logp[draws], logq[draws], "k1") < 0).any()  # k1 is negative on some tokens
    wild = rng.normal(0, 5, size=(2, 10_000))
    assert (kl_estimate(wild[0], wild[1], "k3") >= 0).all()
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_estimate(logp, logq, "k2")


def test_rewards_are_the_kl_penalty_plus_the_score_at_the_last_real_token():
    logp = np.array([[-1.0, -2.0, -0.5], [-1.0, -1.0, -1.0]])
    ref = np.array([[-1.5, -1.0, -0.5], [-2.0, -1.0, -4.0]])
    mask = np.array([[True, True, True], [True, True, False]])
    rewards, kl = kl_penalized_rewards(np.array([3.0, -1.0]), logp, ref, mask, kl_coef=0.1)
    np.testing.assert_allclose(kl, [[0.5, -1.0, 0.0], [1.0, 0.0, 0.0]])
    np.testing.assert_allclose(rewards, [[-0.05, 0.1, 3.0], [-0.1, -1.0, 0.0]])
    np.testing.assert_array_equal(last_token_index(mask), [2, 1])
    with pytest.raises(ValueError, match="one score each"):
        kl_penalized_rewards(np.zeros(3), logp, ref, mask, 0.1)


def test_the_adaptive_kl_coefficient_moves_towards_the_target():
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10_000)
    ctl.update(6.0, 256)  # at the target: unchanged
    assert ctl.value == pytest.approx(0.2)
    ctl.update(12.0, 256)  # twice the target: the error is clipped to +0.2
    assert ctl.value == pytest.approx(0.2 * (1 + 0.2 * 256 / 10_000))
    before = ctl.value
    ctl.update(4.5, 1000)  # below the target: error 4.5 / 6 - 1 = -0.25, clipped to -0.2
    assert ctl.value == pytest.approx(before * (1 - 0.2 * 1000 / 10_000))
    before = ctl.value
    ctl.update(6.6, 1000)  # error +0.1, not clipped
    assert ctl.value == pytest.approx(before * (1 + 0.1 * 1000 / 10_000))
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 64)
    assert fixed.value == 0.05
    restored = AdaptiveKLController(1.0, 6.0, 10_000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value
    with pytest.raises(ValueError, match="target KL must be > 0"):
        AdaptiveKLController(0.1, target=0.0, horizon=10)


# ---------------------------------------------------------------------------
# the losses and their gradients
# ---------------------------------------------------------------------------


def _policy_grad(new, old, adv, clip=0.2):
    x = Tensor(np.array([[new]], dtype=np.float64), requires_grad=True)
    total, stats = policy_loss(x, np.array([[old]]), np.array([[adv]]), np.ones((1, 1), bool), clip)
    total.backward()
    return float(total.data), float(x.grad[0, 0]), stats


def test_policy_gradient_is_zero_where_the_ratio_is_clipped():
    up, down = math.log(1.5), math.log(0.5)  # ratios 1.5 and 0.5, outside [0.8, 1.2]
    # the ratio moved the way the advantage rewards: the clipped term is the max, no gradient
    loss, grad, stats = _policy_grad(up, 0.0, 2.0)
    assert grad == 0.0 and loss == pytest.approx(-2.0 * 1.2) and stats["clipped"] == 1
    loss, grad, stats = _policy_grad(down, 0.0, -2.0)
    assert grad == 0.0 and loss == pytest.approx(2.0 * 0.8) and stats["clipped"] == 1
    # moved against the advantage: the unclipped (pessimistic) term keeps its gradient -A * ratio
    loss, grad, stats = _policy_grad(up, 0.0, -2.0)
    assert grad == pytest.approx(2.0 * 1.5) and loss == pytest.approx(2.0 * 1.5) and stats["clipped"] == 0
    loss, grad, stats = _policy_grad(down, 0.0, 2.0)
    assert grad == pytest.approx(-2.0 * 0.5) and stats["clipped"] == 0
    # inside the range: the ordinary surrogate -A * ratio
    loss, grad, stats = _policy_grad(math.log(1.1), 0.0, 2.0)
    assert grad == pytest.approx(-2.0 * 1.1) and loss == pytest.approx(-2.2)
    assert stats["ratio"] == pytest.approx(1.1) and stats["approx_kl"] == pytest.approx(0.5 * math.log(1.1) ** 2)


def test_policy_loss_sums_only_the_real_tokens():
    new = Tensor(np.zeros((2, 3)), requires_grad=True)
    adv = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = np.array([[True, True, False], [True, False, False]])
    total, stats = policy_loss(new, np.zeros((2, 3)), adv, mask, 0.2)
    assert float(total.data) == pytest.approx(-(1 + 2 + 4))
    total.backward()
    np.testing.assert_allclose(new.grad, -adv * mask)
    assert stats["tokens"] == 3


def test_value_loss_is_clipped_around_the_old_values():
    def run(v, old, ret, clip):
        x = Tensor(np.array([[v]]), requires_grad=True)
        total, stats = value_loss(x, np.array([[old]]), np.array([[ret]]), np.ones((1, 1), bool), clip)
        total.backward()
        return float(total.data), float(x.grad[0, 0]), stats

    # v moved from 0 to 1 towards the return 2, beyond the clip 0.2: the clipped prediction 0.2 is farther from
    # the return, so its loss 0.5 * 1.8^2 is the max, and it does not depend on v: no gradient
    loss, grad, stats = run(1.0, 0.0, 2.0, 0.2)
    assert loss == pytest.approx(0.5 * 1.8 ** 2) and grad == 0.0 and stats["clipped"] == 1
    assert stats["sq_error"] == pytest.approx(1.0)
    # v overshot past the return: the unclipped loss is larger and keeps its gradient (v - R)
    loss, grad, stats = run(3.0, 2.1, 2.0, 0.2)
    assert loss == pytest.approx(0.5 * 1.0) and grad == pytest.approx(1.0) and stats["clipped"] == 0
    # inside the clip range both agree: the plain loss
    loss, grad, _ = run(0.1, 0.0, 2.0, 0.2)
    assert loss == pytest.approx(0.5 * 1.9 ** 2) and grad == pytest.approx(-1.9)
    # no clipping at all
    loss, grad, _ = run(1.0, 0.0, 2.0, None)
    assert loss == pytest.approx(0.5) and grad == pytest.approx(-1.0)


def test_token_logprobs_and_entropy_at_a_temperature():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 3, 5))
    tokens = rng.integers(0, 5, size=(2, 3))
    mask = np.array([[True, True, False], [True, True, True]])
    T = 0.7
    got = token_logprobs(Tensor(logits), tokens, mask, temperature=T).data
    x = logits / T
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    want = np.take_along_axis(logp, tokens[..., None], -1)[..., 0] * mask
    np.testing.assert_allclose(got, want, rtol=1e-12)
    p = np.exp(logp)
    assert entropy(logits, mask, T) == pytest.approx(float(-(p * logp).sum(-1)[mask].sum()))


# ---------------------------------------------------------------------------
# a one-step bandit: PPO with the KL penalty in the reward reaches pi_ref * exp(r / beta)
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_one_step_bandit_reaches_the_kl_regularised_optimum():
    """With the k1 KL penalty in the reward, the optimum of E[r] - beta KL(pi || pi_ref) is
    pi* proportional to pi_ref * exp(r / beta); PPO's updates (GAE with one step, whitening, the clipped
    objective, a learned value baseline) must bring the policy to it, to a total variation under 0.1."""
    rng = np.random.default_rng(0)
    ref_logits = np.log(np.array([0.4, 0.3, 0.2, 0.1]))
    r = np.array([0.0, 0.5, 1.0, 0.2])
    beta = 0.5
    target = np.exp(ref_logits + r / beta)
    target /= target.sum()
    logits = nn.Parameter(ref_logits.astype(np.float64).copy())
    value = nn.Parameter(np.zeros(1))
    opt = nn.optim.AdamW([{"params": [("logits", logits), ("value", value)], "weight_decay": 0.0}], lr=0.05)
    n, minibatch = 256, 64

    def probs():
        z = logits.data - logits.data.max()
        return np.exp(z) / np.exp(z).sum()

    for it in range(150):
        p = probs()
        actions = rng.choice(4, size=n, p=p)
        logp, ref = np.log(p)[actions][:, None], ref_logits[actions][:, None]
        mask = np.ones((n, 1), bool)
        rewards, _ = kl_penalized_rewards(r[actions], logp, ref, mask, beta)
        values = np.full((n, 1), value.data[0])
        adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
        adv = masked_whiten(adv, mask)
        for epoch in range(2):
            order = rng.permutation(n)
            for k in range(0, n, minibatch):
                rows = order[k:k + minibatch]
                batch_logits = autograd.broadcast_to(logits, (len(rows), 1, 4))  # (m, 1, 4): one step each
                new = token_logprobs(batch_logits, actions[rows][:, None], mask[rows])
                pg, _ = policy_loss(new, logp[rows], adv[rows], mask[rows], 0.2)
                v = autograd.broadcast_to(value, (len(rows), 1))
                vf, _ = value_loss(v, values[rows], ret[rows], mask[rows], 0.2)
                opt.zero_grad()
                ((pg + vf * 0.1) * (1.0 / len(rows))).backward()
                opt.step()
    tv = 0.5 * np.abs(probs() - target).sum()
    start = 0.5 * np.abs(np.exp(ref_logits) - target).sum()
    assert start > 0.2  # the optimum is far from the reference ...
    assert tv < 0.1, (probs(), target)  # ... and PPO got there


# ---------------------------------------------------------------------------
# rollouts: truncation, the layout, log-probs under padding
# ---------------------------------------------------------------------------

from llm.post import rollout as ro  # noqa: E402
from rlhf_fixtures import chat_checkpoint, prompt_file, read_metrics, vowel_reward  # noqa: E402


def test_responses_are_cut_after_the_first_end_token():
    eos, pad = 9, 0
    got = ro.truncate_after_eos(np.array([[5, 9, 7, 9], [4, 4, 4, 4], [9, 9, 9, 9]]), eos, pad, length=5)
    np.testing.assert_array_equal(got.tokens, [[5, 9, 0, 0, 0], [4, 4, 4, 4, 0], [9, 0, 0, 0, 0]])
    np.testing.assert_array_equal(got.mask.sum(1), [2, 4, 1])  # the end token is a real token
    np.testing.assert_array_equal(got.ended, [True, False, True])


def test_packed_log_probs_equal_each_row_alone():
    model = GPT_tiny()
    prompts = [[1, 2, 3], [4, 5], [6]]
    resp = ro.truncate_after_eos(np.array([[7, 8, 9], [7, 9, 8], [8, 8, 8]]), eos_id=9, pad_id=0, length=4)
    batch = ro.pack(prompts, resp, prompt_width=4, pad_id=0)
    assert batch.ids.shape == (3, 8) and batch.real.sum() == 3 + 2 + 1 + 3 + 2 + 3
    got = ro.response_logprobs(model, batch, temperature=0.5)
    for b, p in enumerate(prompts):
        r = resp.tokens[b][resp.mask[b]]
        logits, _ = model(np.array([list(p) + list(r)]))
        x = logits.data[0, len(p) - 1:len(p) - 1 + len(r)].astype(np.float64) / 0.5
        logp = x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)
        want = logp[np.arange(len(r)), r]
        np.testing.assert_allclose(got[b, :len(r)], want, rtol=1e-4, atol=1e-5)
        assert (got[b, len(r):] == 0).all()


def GPT_tiny():
    from llm.model import GPT, get_preset

    return GPT(get_preset("tiny", vocab_size=12, n_layer=1, n_head=2, n_embd=16, block_size=16),
               generator=np.random.default_rng(0))


# ---------------------------------------------------------------------------
# rewards
# ---------------------------------------------------------------------------

from llm.post import rewards as rw  # noqa: E402


def test_builtin_rewards():
    assert rw.arithmetic_reward([], [" 19 ", "18", "19 apples"], [{"answer": "19"}] * 3) == [1.0, 0.0, 0.0]
    assert rw.gsm8k_reward([], ["so it is 1,234.", "42", "no idea"],
                           [{"answer": "worked... #### 1234"}, {"answer": "41"}, {"answer": "3"}]) == [1.0, 0.0, 0.0]
    assert rw.code_of("here:\n```python\ndef f():\n    return 1\n```\nbye") == "def f():\n    return 1\n"


@pytest.mark.slow
def test_unit_test_reward_runs_the_code_in_the_sandbox():
    got = rw.unit_test_reward([], ["def f(x):\n    return x + 1", "def f(x):\n    return x", "while True: pass"],
                              [{"tests": ["assert f(1) == 2"]}] * 3, timeout_s=2.0)
    assert got == [1.0, 0.0, 0.0]


def test_a_reward_that_returns_nan_or_the_wrong_shape_is_a_clear_error():
    comp = rw.Completions(["p", "q"], ["a", "b"], [{}, {}], [[1], [2]], [[3], [4]], np.array([True, True]))
    with pytest.raises(rw.RewardError, match=r"'nan_reward' returned 1 value\(s\) that are not finite.*response 1: nan"):
        rw.CallableReward(lambda p, r, rec: [1.0, float("nan")], "nan_reward")(comp)
    with pytest.raises(rw.RewardError, match=r"returned shape \(3,\) for 2 responses"):
        rw.CallableReward(lambda p, r, rec: [1.0, 2.0, 3.0], "long")(comp)
    with pytest.raises(rw.RewardError, match=r"returned shape \(2, 1\)"):
        rw.CallableReward(lambda p, r, rec: [[1.0], [2.0]], "nested")(comp)
    with pytest.raises(rw.RewardError, match="raised ZeroDivisionError"):
        rw.CallableReward(lambda p, r, rec: [1 / 0], "boom")(comp)
    with pytest.raises(rw.RewardError, match="needs the field 'answer'"):
        rw.load_reward("arithmetic")(comp)
    with pytest.raises(rw.RewardError, match="unknown reward"):
        rw.load_reward("nonsense")
    with pytest.raises(rw.RewardError, match="has no attribute"):
        rw.load_reward("llm.post.rewards:nope")
    assert rw.load_reward("llm.post.rewards:arithmetic_reward").name == "llm.post.rewards:arithmetic_reward"


# ---------------------------------------------------------------------------
# the PPO job
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ppo")
    return {"ckpt": chat_checkpoint(folder / "sft.safetensors"), "prompts": prompt_file(folder / "prompts.jsonl"),
            "folder": folder}


def ppo_argv(toy, out, *extra, steps=8):
    return ["--model", str(toy["ckpt"]), "--prompts", str(toy["prompts"]), "--out-dir", str(out),
            "--rollout-batch", "16", "--gen-batch", "8", "--batch-size", "8", "--ppo-epochs", "2",
            "--response-length", "4", "--lr", "1e-2", "--max-steps", str(steps), "--eval-interval", "4",
            "--log-interval", "1", "--no-progress", "--val-fraction", "0.25", "--eval-prompts", "4", *extra]


def vowel():
    return rw.CallableReward(vowel_reward, "vowel")


@pytest.fixture(autouse=True)
def fast_flops(monkeypatch):
    from llm.trainer import trainer as trainer_mod

    monkeypatch.setattr(trainer_mod, "measure_matmul_flops", lambda device="cpu", n=512, seconds=0.5: 1e10)


def test_the_first_minibatch_has_ratio_one(toy, tmp_path):
    from llm.post.ppo import PPOJob, build_parser

    args = build_parser().parse_args(ppo_argv(toy, tmp_path / "o"))
    job = PPOJob(args, reward=vowel(), log=lambda *a: None)
    model = job.build_model()
    model.train()
    batch = job.train_sampler(0, 1).next_batch()
    out = model(batch["input_ids"], **job.model_kwargs(batch))
    total, n = job.loss(out, batch)
    s = job.loss_stats.values
    assert n == batch["mask"].sum() and s["tokens"] == n
    assert abs(s["ratio"] / n - 1.0) < 1e-5 and s["approx_kl"] / n < 1e-10 and s["pg_clipped"] == 0
    # the value model starts at 0 (a zero head on the policy's trunk): the value loss is 0.5 * returns^2
    assert np.abs(batch["old_values"]).max() == 0


@pytest.mark.slow
def test_toy_task_reward_rises_from_chance_while_the_kl_stays_bounded(toy, tmp_path, capsys):
    """The reward: 1 when the response starts with a vowel. A random tiny policy does that for ~10% of responses;
    PPO must bring the rollouts' mean reward to >= 0.6 while the KL to the reference stays bounded."""
    from llm.post.ppo import main

    out = tmp_path / "run"
    code = main(ppo_argv(toy, out, "--rollout-batch", "32", "--gen-batch", "16", "--batch-size", "16",
                         "--lr", "2e-2", "--eval-interval", "4", steps=100), reward=vowel())
    assert code == 0, capsys.readouterr().err
    records = read_metrics(out / "metrics.jsonl")
    rollouts = [m for m in records if "score" in m]  # the lines after a new rollout batch: one per iteration
    assert len(rollouts) == 25
    assert rollouts[0]["score"] <= 0.3  # the first iteration's rollouts: chance
    assert np.mean([m["score"] for m in rollouts[-3:]]) >= 0.6, [m["score"] for m in rollouts]
    assert max(m["kl"] for m in rollouts) < 12.0 and records[-1]["heldout_kl"] < 12.0  # nats per 4-token response
    for key in ("score", "kl", "rlhf_reward", "non_score_reward", "kl_coef", "eos_fraction", "response_length",
                "approx_kl", "clipfrac", "vf_clipfrac", "value_error", "entropy", "ratio", "generate_share"):
        assert key in rollouts[-1], key
    for key in ("heldout_score", "heldout_score_sampled", "ref_heldout_score", "heldout_kl", "heldout_ended"):
        assert key in records[-1], key
    printed = capsys.readouterr().out
    assert "generation took" in printed and "held-out reward" in printed
    from llm.checkpoint import load_model

    policy, tok, meta = load_model(out / "policy.safetensors")  # the policy alone, for eval and generate
    assert meta["job"] == "ppo" and meta["step"] == 100


def test_ppo_resume_is_bitwise(toy, tmp_path):
    from llm.post.ppo import main

    whole, part = tmp_path / "whole", tmp_path / "part"
    assert main(ppo_argv(toy, whole, "--ckpt-interval", "3", steps=7), reward=vowel()) == 0
    assert main(ppo_argv(toy, part, "--lr-decay-steps", "7", steps=3), reward=vowel()) == 0  # mid-iteration
    assert main(ppo_argv(toy, part, "--lr-decay-steps", "7", "--resume", steps=7), reward=vowel()) == 0
    a = [m["loss"] for m in read_metrics(whole / "metrics.jsonl")]
    b = [m["loss"] for m in read_metrics(part / "metrics.jsonl")]
    assert len(a) == 7 and a == b


def test_missing_eos_penalty_lowers_the_score_of_responses_that_never_end(toy, tmp_path):
    from llm.post.ppo import PPOJob, build_parser

    zero = rw.CallableReward(lambda p, r, rec: [0.0] * len(r), "zero")
    args = build_parser().parse_args(ppo_argv(toy, tmp_path / "o", "--missing-eos-penalty", "2.5"))
    job = PPOJob(args, reward=zero, log=lambda *a: None)
    job.build_model()
    job.train_sampler(0, 1).next_batch()
    s = job.rollout_stats.values
    assert s["responses"] == 16
    # a random policy almost never writes the end token within 4 tokens: nearly every response is penalised
    assert s["eos"] < s["responses"]
    assert s["score"] == pytest.approx(-2.5 * (s["responses"] - s["eos"]))


def test_ppo_bad_input_gets_one_clear_message(toy, tmp_path, capsys):
    from llm.post.ppo import main

    nan = rw.CallableReward(lambda p, r, rec: [float("nan")] * len(r), "nan_reward")
    assert main(ppo_argv(toy, tmp_path / "a"), reward=nan) == 2
    assert "'nan_reward' returned 8 value(s) that are not finite" in capsys.readouterr().err
    # a reference that is not the policy's architecture
    other = chat_checkpoint(tmp_path / "other.safetensors", n_embd=16)
    assert main(ppo_argv(toy, tmp_path / "b", "--ref", str(other)), reward=vowel()) == 2
    assert "is not the policy's architecture" in capsys.readouterr().err
    # a reward model whose tokenizer differs from the policy's
    from llm.post.reward import main as reward_main
    from rlhf_fixtures import preference_file

    foreign = chat_checkpoint(tmp_path / "foreign.safetensors", vocab=290)
    rm_out = tmp_path / "rm"
    assert reward_main(["--model", str(foreign), "--data", str(preference_file(tmp_path / "p.jsonl", n=8)),
                        "--out-dir", str(rm_out), "--max-steps", "1", "--batch-size", "2", "--no-progress"]) == 0
    assert main(ppo_argv(toy, tmp_path / "c", "--reward-model", str(rm_out / "ckpt.safetensors"))) == 2
    assert "not the policy's" in capsys.readouterr().err
    # no reward, two rewards, pipeline stages
    assert main(ppo_argv(toy, tmp_path / "d")) == 2
    assert "give exactly one reward" in capsys.readouterr().err
    assert main(ppo_argv(toy, tmp_path / "e", "--reward", "arithmetic", "--reward-model", "x")) == 2
    assert main(ppo_argv(toy, tmp_path / "f", "--pp", "2"), reward=vowel()) == 2
    assert "--pp 1" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# the whole roadmap: python -m llm pipeline
# ---------------------------------------------------------------------------


def test_pipeline_dry_run_prints_every_stage_as_a_command(tmp_path, capsys):
    from llm.post.pipeline import main

    assert main(["--out-dir", str(tmp_path / "p"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    for cmd in ("python -m llm train --preset tiny", "python -m llm sft --model", "python -m llm reward --model",
                "python -m llm ppo --model", "--reward arithmetic --value-model", "python -m llm dpo --model",
                "python -m llm eval --checkpoint", "python -m llm report"):
        assert cmd in out, cmd
    order = [out.index(f"== {s}") for s in ("pretrain", "data", "sft", "reward", "ppo", "dpo", "eval", "report")]
    assert order == sorted(order)
    assert not (tmp_path / "p").exists()  # a dry run writes nothing
    assert main(["--out-dir", str(tmp_path / "p"), "--dry-run", "--stages", "ppo,nonsense"]) == 2
    assert "unknown stage" in capsys.readouterr().err
    assert main(["--out-dir", str(tmp_path / "p"), "--dry-run", "--ppo-reward", "model", "--stages", "ppo"]) == 0
    out = capsys.readouterr().out
    assert "--reward-model" in out and "--eval-reward arithmetic" in out


def test_arithmetic_problems_are_held_out_from_every_stage():
    from llm.post import arithmetic

    train, held = arithmetic.split()
    assert len(train) + len(held) == (arithmetic.MAX_OPERAND + 1) ** 2 and not set(train) & set(held)
    questions = {arithmetic.question(a, b) for a, b in held}
    sft = {r["messages"][0]["content"] for r in arithmetic.sft_records()}
    prefs = {r["prompt"] for r in arithmetic.preference_records()}
    prompts, heldout = arithmetic.ppo_prompts()
    assert not questions & sft and not questions & prefs and not questions & {r["prompt"] for r in prompts}
    assert {r["prompt"] for r in heldout} == questions
    for r in arithmetic.preference_records() + arithmetic.preference_records(heldout=True):
        assert r["chosen"] != r["rejected"] and int(r["rejected"]) >= 0
    assert all(int(r["answer"]) == sum(int(x) for x in r["prompt"][8:-1].split(" + ")) for r in heldout)


def test_the_held_out_evaluation_is_a_file_the_report_card_reads(toy, tmp_path):
    from llm.eval.report import build_report
    from llm.post.pipeline import evaluate_arithmetic, heldout_table

    out = tmp_path / "run" / "2-sft" / "eval-arithmetic.json"
    got = evaluate_arithmetic(str(toy["ckpt"]), str(toy["ckpt"]), str(out))
    (out.parent / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')  # the stage's training curve
    assert got["n"] == 80 and 0 <= got["exact_match"] <= 1 and abs(got["kl_to_sft"]) < 1e-4  # the model itself
    card = build_report([tmp_path / "run"], tmp_path, plots=False)
    assert "arithmetic_heldout" in card and "exact_match" in card and "kl_to_sft" in card
    assert "| sft | " in heldout_table({"sft": got})
