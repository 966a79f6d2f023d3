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
