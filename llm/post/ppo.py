"""`python -m llm ppo`: RLHF with PPO, a job of the one trainer, with TRL's semantics.

    python -m llm ppo --model runs/sft/ckpt.safetensors --reward-model runs/reward/ckpt.safetensors --prompts p.jsonl
    python -m llm ppo --model runs/sft/ckpt.safetensors --reward arithmetic --task arithmetic
    python -m llm ppo --model ... --reward my_rewards.py:score --prompts p.jsonl --dp 2

The models: the policy (from ``--model``, an SFT checkpoint) and a value model
are trained together (``PolicyAndValue``, one optimizer, TRL's
``PolicyAndValueWrapper``); the reference (``--ref``, default ``--model``) is a
frozen copy of the starting policy; the value model starts from the reward
model (``--reward-model``, as TRL does) or, with a programmatic reward, from
the policy's trunk with a new zero head (``--value-model``). The reward is a reward-model
checkpoint or any callable (``llm.post.rewards``: built-in ``arithmetic``,
``gsm8k``, ``unit-tests`` in the evaluator's sandbox, or ``module:function``).

One PPO iteration (TRL's ``PPOTrainer.train`` loop body)::

    prompts     the next --rollout-batch prompts (reshuffled every pass over the data)
    rollouts    sample_responses at --temperature with the KV cache, truncated after the first end token
    score       log-probs of the policy and the reference (temperature applied), values, the reward's score
                (minus --missing-eos-penalty for a response that never wrote the end token)
    rewards     -kl_coef * KL per token (k1 or k3), the score added at the last real token
    advantages  GAE (--gamma, --lam), whitened over the real tokens; returns = advantages + values
    update      --ppo-epochs passes over the rollouts in minibatches of --batch-size x --grad-accum rows,
                each one optimizer step of the trainer on pg_loss + --vf-coef * vf_loss (both clipped)
    KL coef     fixed (--kl-coef), or adapted towards --target-kl (Ziegler et al.)

The rollout batch is produced inside the trainer's sampler (``RolloutSampler``):
when its minibatches are used up it generates the next rollouts with the
current policy, so the trainer's loop, layouts, checkpoints and signals are
the ones of every job. Under ``--dp`` each replica generates its share of the
prompts (in chunks of ``--gen-batch``, each sampled from its own seeded
stream), the rollouts are all-gathered, and every replica computes the same
advantages and takes its share of every minibatch, so a ``--dp`` run is one
process's run up to float rounding; the rollouts waiting to be trained on are
part of the checkpoint, so ``--resume`` continues bitwise. ``--pp`` is not
supported (every replica generates with the whole policy).

Where this differs from TRL and why:

- the score goes on the last real token (TRL puts it one slot after it when
  there is room, with a value mask one longer to match); here the episode ends
  at its last token and GAE sees it there, as in lm-human-preferences;
- the losses are averaged over every real token of the optimizer step (all
  micro-batches and ranks: the trainer's contract), not per micro-batch;
- the rollout's log-probs come from a forward of the policy over the packed
  prompts and responses (TRL reads them from the generation's logits): one
  more forward, and the ratio of the first minibatch is 1 to float rounding
  because the update's forward is the same computation;
- the value model is the reward model's copy or the policy's trunk (TRL: the
  reward model's); dropout is switched off in every model (PPO's ratios assume
  a deterministic policy; TRL recommends the same).

Logged (``metrics.jsonl``) on every metrics line, over the rollouts generated
since the previous line: ``score`` (the reward), ``kl`` (summed per response,
mean over responses), ``non_score_reward``, ``rlhf_reward`` (score +
non-score), ``kl_coef``, ``eos_fraction``, ``response_length``,
``entropy_sampled``; over the minibatches since then: ``approx_kl``,
``clipfrac`` (policy), ``vf_clipfrac``, ``value_error`` (mean squared),
``entropy`` (per token), ``ratio``; over the iterations completed since then:
``generate_share`` and ``score_share`` (the shares of an iteration's wall time
spent sampling, and scoring with the models and the reward) and
``iteration_s``. At each evaluation, on the held-out prompts:
``heldout_score`` (greedy responses), ``heldout_ended``,
``heldout_score_sampled`` and ``heldout_kl`` (responses sampled at the
temperature), with the reference's greedy ``ref_heldout_score`` beside them. The trained policy is written as a
plain model checkpoint ``OUT_DIR/policy.safetensors`` at every evaluation
(``python -m llm eval`` / ``generate`` read it).
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import io
import sys
import time

import numpy as np

import nn
from autograd import backend
from autograd.tensor import Tensor

from ..trainer import Job, SetupError, add_trainer_flags
from ..trainer.config import nonneg_float, positive_float, positive_int, threads_note, unit_float
from . import rollout as ro
from .advantages import KL_ESTIMATORS, AdaptiveKLController, FixedKLController, gae, kl_penalized_rewards
from .advantages import masked_whiten
from .ppo_loss import entropy, policy_loss, token_logprobs, value_loss
from .prompts import completions, read_prompt_records, render_prompts, score_responses
from .rewards import ModelReward, RewardError, load_reward
from .reward_model import RewardModel

# ---------------------------------------------------------------------------
# the trained model: policy and value model together
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class PolicyValueOutput:
    """What ``PolicyAndValue.forward`` returns: the policy's ``logits`` (B, T, V) and the ``values`` (B, T, 1)."""

    logits: Tensor
    values: Tensor


class PolicyAndValue(nn.Module):
    """The policy (a GPT) and the value model (a ``RewardModel``) as one trained module (one optimizer, one
    checkpoint): parameters ``policy.*`` and ``value.*``. A one-stage pipeline module for the trainer."""

    stage, n_stages, is_first, is_last = 0, 1, True, True
    tied_weight, holds_tied_copy = None, False

    def __init__(self, policy, value):
        super().__init__()
        self.policy, self.value = policy, value

    @property
    def config(self):
        """The policy's config (what the checkpoint records)."""
        return self.policy.config

    @property
    def device(self) -> str:
        return self.policy.device

    @property
    def activation_dtype(self):
        return self.policy.activation_dtype

    def activation_shape(self, ids_shape) -> tuple:
        return self.policy.activation_shape(ids_shape)

    def forward(self, ids, position_ids=None, attention_mask=None) -> PolicyValueOutput:
        logits, _ = self.policy(ids, position_ids=position_ids, attention_mask=attention_mask)
        values, _ = self.value(ids, position_ids=position_ids, attention_mask=attention_mask)
        return PolicyValueOutput(logits, values)


# ---------------------------------------------------------------------------
# the rollout buffer: what the trainer's sampler hands out
# ---------------------------------------------------------------------------


def encode_arrays(arrays: dict) -> str:
    """A dict of arrays as one text (base64 of ``.npz`` bytes, no pickle), for the checkpoint's JSON metadata."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_arrays(text: str) -> dict:
    """The arrays ``encode_arrays`` wrote."""
    with np.load(io.BytesIO(base64.b64decode(text)), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


class RolloutSampler:
    """The trainer's sampler for PPO: minibatches of the current rollouts, and new rollouts when they are used up.

    Iteration i generates the rollouts of the global prompt rows ``i * N ..
    (i + 1) * N - 1`` (N = ``--rollout-batch``; row g is prompt
    ``permutation(seed, g // n_prompts)[g % n_prompts]``); replica ``rank``
    generates rows ``rank * N / world ..`` of them. Then ``ppo_epochs`` passes,
    each in the order ``permutation(seed, i, epoch)``, cut into global
    minibatches of ``batch_size`` rows, of which this replica takes its
    consecutive share. The state: the iteration, the position in it, the KL
    coefficient and the rollout arrays themselves.
    """

    def __init__(self, job, rank: int, world: int):
        a = job.args
        self.job, self.rank, self.world = job, int(rank), int(world)
        self.N, self.M, self.G = a.rollout_batch, a.batch_size, a.gen_batch
        if self.N % self.M:
            raise SetupError(f"--rollout-batch {self.N} is not a multiple of --batch-size {self.M}: every PPO "
                             "minibatch must be full")
        if self.N % (self.world * self.G):
            raise SetupError(f"--rollout-batch {self.N} cannot be split into {self.world} replica(s) x chunks of "
                             f"--gen-batch {self.G}; choose --gen-batch dividing {self.N // self.world}")
        self.calls = a.ppo_epochs * (self.N // self.M)  # next_batch calls per iteration
        self.iteration, self.cursor, self.buffer = 0, 0, None
        self.kl = (AdaptiveKLController(a.kl_coef, a.target_kl, a.kl_horizon) if a.target_kl is not None
                   else FixedKLController(a.kl_coef))

    def next_batch(self) -> dict:
        if self.buffer is None or self.cursor >= self.calls:
            self.job.make_rollouts(self)
        per_epoch = self.N // self.M
        epoch, k = divmod(self.cursor, per_epoch)
        order = np.random.default_rng([self.job.args.seed, self.iteration - 1, epoch, 1]).permutation(self.N)
        rows = order[k * self.M:(k + 1) * self.M]
        share = self.M // self.world
        rows = np.sort(rows[self.rank * share:(self.rank + 1) * share])
        self.cursor += 1
        return {key: v[rows] for key, v in self.buffer.items()}

    def state_dict(self) -> dict:
        return {"iteration": self.iteration, "cursor": self.cursor, "kl": self.kl.state_dict(),
                "buffer": None if self.buffer is None else encode_arrays(self.buffer)}

    def load_state_dict(self, state: dict):
        self.iteration, self.cursor = int(state["iteration"]), int(state["cursor"])
        self.kl.load_state_dict(state["kl"])
        self.buffer = None if state.get("buffer") is None else decode_arrays(state["buffer"])


# ---------------------------------------------------------------------------
# the job
# ---------------------------------------------------------------------------


class _Sums:
    """Named running sums (statistics between two evaluations), combined over ranks on demand."""

    def __init__(self):
        self.values = {}

    def add(self, **kw):
        for k, v in kw.items():
            self.values[k] = self.values.get(k, 0.0) + float(v)

    def merged(self, comm, keys) -> dict:
        v = np.array([self.values.get(k, 0.0) for k in keys])
        if comm is not None and comm.size > 1:
            v = comm.allreduce(v, op="sum")
        return dict(zip(keys, (float(x) for x in v)))


class _IterationClock:
    """Where a PPO iteration's wall time goes: generating, scoring (forwards and the reward), the rest (updates).

    An iteration runs from the start of one rollout phase to the start of the
    next, less the time spent evaluating ("pause"); ``take()`` gives the shares
    over the iterations completed since the last call.
    """

    def __init__(self):
        self.open = None
        self.closed = {"iterations": 0, "wall": 0.0, "generate": 0.0, "score": 0.0}
        self.total = dict(self.closed)  # the whole run's, for the summary

    def start_iteration(self):
        now = time.perf_counter()
        if self.open is not None:
            for c in (self.closed, self.total):
                c["iterations"] += 1
                c["wall"] += now - self.open["start"] - self.open["pause"]
                c["generate"] += self.open["generate"]
                c["score"] += self.open["score"]
        self.open = {"start": now, "generate": 0.0, "score": 0.0, "pause": 0.0}

    def add(self, what: str, seconds: float):
        if self.open is not None:
            self.open[what] += seconds

    def take(self) -> dict:
        c = self.closed
        self.closed = {"iterations": 0, "wall": 0.0, "generate": 0.0, "score": 0.0}
        if not c["iterations"] or c["wall"] <= 0:
            return {}
        return {"generate_share": c["generate"] / c["wall"], "score_share": c["score"] / c["wall"],
                "iteration_s": c["wall"] / c["iterations"]}


PP_ERROR = ("PPO runs with --pp 1: every replica generates its rollouts with the whole policy; use --dp for more "
            "processes")
_LOSS_KEYS = ("tokens", "pg_clipped", "ratio", "approx_kl", "vf_clipped", "sq_error", "entropy")


class PPOJob(Job):
    """PPO on a policy and value model (see the module docstring); ``reward`` may be given directly (tests)."""

    name = "ppo"

    def __init__(self, args, comm=None, log=print, reward=None):
        from . import chat
        from .start import load_start_model

        self.args, self.comm, self.log = args, comm, log
        if args.pp != 1:
            raise SetupError(PP_ERROR)
        self.policy, self.tokenizer = load_start_model(args.model, "--model")
        ref_path = args.ref or args.model
        self.ref, ref_tok = load_start_model(ref_path, "--ref")
        self._check_reference(ref_path, ref_tok)
        for m in (self.policy, self.ref):
            _no_dropout(m)
        try:
            tokens = chat.chat_tokens(self.tokenizer)
        except chat.ChatFormatError as e:
            raise SetupError(f"--model: {e}") from None
        self.eos, self.pad = tokens.eos, tokens.pad
        self.reward = reward if reward is not None else self._load_reward()
        self.eval_reward = load_reward(args.eval_reward) if args.eval_reward else self.reward
        block = self.policy.config.block_size
        R = args.response_length
        if R >= block:
            raise SetupError(f"--response-length {R} leaves no room for a prompt in the model's {block} positions")
        max_prompt = min(args.max_prompt_tokens or block - R, block - R)
        records, heldout = self._prompt_records()
        try:
            self.prompts = render_prompts(records, self.tokenizer, max_prompt, args.template)
            self.heldout = render_prompts(heldout, self.tokenizer, max_prompt, args.template)
        except chat.ChatFormatError as e:
            raise SetupError(str(e)) from None
        self.P = max(len(p) for p in self.prompts.ids + self.heldout.ids)
        self.R = R
        cut = self.prompts.truncated + self.heldout.truncated
        log(f"ppo: {len(self.prompts)} training prompts, {len(self.heldout)} held out; prompts up to {self.P} tokens"
            + (f" ({cut} cut from the left to {max_prompt})" if cut else "") + f", responses up to {R}; reward "
            f"{getattr(self.reward, 'name', type(self.reward).__name__)}; reference {ref_path}")
        self.model = None
        self.rollout_stats, self.loss_stats = _Sums(), _Sums()
        self.timing = _IterationClock()
        self.ref_heldout = None
        self._orders = {}

    # -- setup ---------------------------------------------------------------------------------
    def _check_reference(self, ref_path, ref_tok):
        from ..data import tokenizer_sha256

        ours, theirs = dataclasses.asdict(self.policy.config), dataclasses.asdict(self.ref.config)
        ours.pop("dropout"), theirs.pop("dropout")
        diff = [f"{k}: reference {theirs[k]!r}, policy {ours[k]!r}" for k in ours if ours[k] != theirs[k]]
        if diff:
            raise SetupError(f"--ref {ref_path} is not the policy's architecture:\n  " + "\n  ".join(diff)
                             + "\nthe reference must be the model PPO starts from (by default --model itself)")
        if tokenizer_sha256(ref_tok) != tokenizer_sha256(self.tokenizer):
            raise SetupError(f"--ref {ref_path} has another tokenizer than the policy: the KL between them would "
                             "compare different texts; use the SFT checkpoint the policy starts from")

    def _load_reward(self):
        a = self.args
        if (a.reward is None) == (a.reward_model is None):
            raise SetupError("give exactly one reward: --reward-model CKPT (a `python -m llm reward` checkpoint) or "
                             "--reward NAME|module:function")
        if a.reward_model is not None:
            return ModelReward.load(a.reward_model, self.tokenizer, normalize=not a.no_reward_norm,
                                    batch_size=a.gen_batch, log=self.log)
        return load_reward(a.reward)

    def _prompt_records(self):
        a = self.args
        if a.task is not None:
            from . import arithmetic

            train, heldout = arithmetic.ppo_prompts(seed=a.seed)
            if a.prompts is None:
                return train, (heldout[:a.eval_prompts] if a.eval_prompts else heldout)
        if a.prompts is None:
            raise SetupError("give the prompts: --prompts FILE.jsonl (records with a 'prompt') or --task arithmetic")
        records = [r for path in a.prompts for r in read_prompt_records(path)]
        if a.eval_data:
            heldout = [r for path in a.eval_data for r in read_prompt_records(path)]
        else:
            order = np.random.default_rng([a.seed, 11]).permutation(len(records))
            n = max(1, int(round(len(records) * a.val_fraction)))
            if n >= len(records):
                raise SetupError(f"--val-fraction {a.val_fraction} of {len(records)} prompts leaves none to train on")
            held = set(order[:n].tolist())
            heldout = [r for k, r in enumerate(records) if k in held]
            records = [r for k, r in enumerate(records) if k not in held]
        return records, (heldout[:a.eval_prompts] if a.eval_prompts else heldout)

    def build_model(self):
        a = self.args
        source = a.value_model or (a.reward_model if a.value_model != "policy" else None)
        if source is not None and source != "policy":
            from ..checkpoint import CheckpointError
            from .reward_model import load_reward_model

            try:
                value = load_reward_model(source)[0]
            except (CheckpointError, OSError) as e:
                raise SetupError(f"--value-model: {e}") from None
            if value.config.vocab_size != self.policy.config.vocab_size or value.config.block_size < self.P + self.R:
                raise SetupError(f"the reward model {source} cannot start the value model (another vocabulary, or a "
                                 f"context shorter than {self.P + self.R}); pass --value-model policy")
        else:
            value = RewardModel.from_policy(self.policy, generator=np.random.default_rng(a.seed))
            value.lm_head.weight.data[...] = 0.0  # values start at 0: the baseline learns from the first returns
        _no_dropout(value)
        self.model = PolicyAndValue(self.policy, value)
        return self.model

    def train_sampler(self, rank, world):
        return RolloutSampler(self, rank, world)

    # -- rollouts --------------------------------------------------------------------------------
    def _generator(self, *key):
        return np.random.default_rng([self.args.seed, *key])

    def _prompt_of(self, g: int) -> int:
        """The prompt of global rollout row ``g``: passes over the prompts, each in a seeded order."""
        n = len(self.prompts)
        epoch = g // n
        if epoch not in self._orders:
            self._orders = {epoch: self._generator(epoch, 3).permutation(n)}
        return int(self._orders[epoch][g % n])

    def _score_chunk(self, policy, idx, prompts, generator, temperature):
        """Sample and score one chunk of prompts: a dict of per-row arrays (and the timing)."""
        t0 = time.perf_counter()
        resp = ro.sample_responses(policy, [prompts.ids[i] for i in idx], self.R, temperature, self.eos,
                                   self.pad, generator)
        t1 = time.perf_counter()
        self.timing.add("generate", t1 - t0)
        batch = ro.pack([prompts.ids[i] for i in idx], resp, self.P, self.pad)
        logp = ro.response_logprobs(policy, batch, self.args.temperature)
        ref = ro.response_logprobs(self.ref, batch, self.args.temperature)
        comp = completions(self.tokenizer, prompts, idx, resp, self.args.template)
        try:
            scores, error = self.reward(comp), None
        except RewardError as e:
            scores, error = np.zeros(len(idx)), str(e)
        self.timing.add("score", time.perf_counter() - t1)
        return {"input_ids": batch.ids, "real": batch.real, "response": batch.response, "mask": batch.mask,
                "ended": resp.ended, "old_logprobs": logp, "ref_logprobs": ref, "scores": scores}, error

    def _gather(self, parts: list, errors: list) -> dict:
        """Join this rank's chunks, gather every rank's (in global row order), and agree on a reward error."""
        mine = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        comm = self.comm
        if comm is not None and comm.size > 1:
            gathered = comm.allgather((mine, [e for e in errors if e]))
            errors = [e for _, errs in gathered for e in errs]
            mine = {k: np.concatenate([g[0][k] for g in gathered]) for k in mine}
        if any(errors):
            raise RewardError(next(e for e in errors if e))
        return mine

    def make_rollouts(self, sampler: RolloutSampler):
        """Generate, score and turn into advantages the rollouts of ``sampler``'s next iteration (all ranks)."""
        a = self.args
        self.timing.start_iteration()
        i, N, n = sampler.iteration, sampler.N, sampler.N // sampler.world
        prompt_of = np.array([self._prompt_of(g) for g in range(i * N, (i + 1) * N)])
        start = sampler.rank * n
        parts, errors = [], []
        policy, value = self.model.policy, self.model.value
        for c in range(start, start + n, sampler.G):
            part, err = self._score_chunk(policy, prompt_of[c:c + sampler.G], self.prompts,
                                          self._generator(i, c // sampler.G, 2), a.temperature)
            t = time.perf_counter()
            batch = ro.PackedBatch(part["input_ids"], part["real"], part["response"], part["mask"], self.P)
            part["old_values"] = ro.response_values(value, batch)
            self.timing.add("score", time.perf_counter() - t)
            parts.append(part)
            errors.append(err)
        roll = self._gather(parts, errors)
        mask, ended = roll["mask"], roll["ended"]
        scores = roll["scores"].copy()
        if a.missing_eos_penalty is not None:
            scores[~ended] -= a.missing_eos_penalty
        coef = sampler.kl.value
        rewards, kl = kl_penalized_rewards(scores, roll["old_logprobs"], roll["ref_logprobs"], mask, coef,
                                           a.kl_estimator)
        if a.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        adv, ret = gae(rewards, roll["old_values"], mask, a.gamma, a.lam)
        adv = masked_whiten(adv, mask)
        kl_per_response = kl.sum(axis=1)
        non_score = -coef * kl_per_response
        self.rollout_stats.add(iterations=1, responses=N, score=scores.sum(), kl=kl_per_response.sum(),
                               non_score=non_score.sum(), rlhf=(non_score + scores).sum(), eos=ended.sum(),
                               length=mask.sum(), kl_coef=coef, logprob=roll["old_logprobs"][mask].sum())
        sampler.kl.update(float(kl_per_response.mean()), N)
        sampler.buffer = {"input_ids": roll["input_ids"], "real": roll["real"], "response": roll["response"],
                          "mask": mask, "old_logprobs": roll["old_logprobs"], "old_values": roll["old_values"],
                          "advantages": adv.astype(np.float32), "returns": ret.astype(np.float32)}
        sampler.iteration, sampler.cursor = i + 1, 0

    # -- the loss ----------------------------------------------------------------------------------
    def inputs(self, batch):
        return batch["input_ids"]

    def model_kwargs(self, batch):
        return ro.model_kwargs(batch["real"])

    def count(self, batch) -> int:
        return int(np.asarray(backend.to_device(batch["mask"], "cpu")).sum())

    def loss(self, output, batch):
        a = self.args
        mask = batch["mask"]
        logits = ro.response_slice(output.logits, self.P, self.R)  # (B, R, V)
        values = ro.response_slice(output.values, self.P, self.R)[..., 0]  # (B, R)
        new = token_logprobs(logits, batch["response"], mask, a.temperature)
        pg, ps = policy_loss(new, batch["old_logprobs"], batch["advantages"], mask, a.clip_range)
        vf, vs = value_loss(values, batch["old_values"], batch["returns"], mask, a.value_clip or None)
        self.loss_stats.add(tokens=ps["tokens"], pg_clipped=ps["clipped"], ratio=ps["ratio"],
                            approx_kl=ps["approx_kl"], vf_clipped=vs["clipped"], sq_error=vs["sq_error"],
                            entropy=entropy(logits.data, mask, a.temperature))
        return pg + vf * float(a.vf_coef), int(ps["tokens"])

    def flops_per_token(self, config) -> float:
        from ..sizing import flops_per_token

        return 2 * flops_per_token(config)  # the policy and a value model of the same size

    # -- evaluation ----------------------------------------------------------------------------------
    def _heldout(self, policy, sampled: bool) -> dict:
        """Scores of greedy or (with the KL to the reference) sampled responses to the held-out prompts."""
        a = self.args
        return score_responses(policy, self.heldout, self.eval_reward, self.tokenizer, length=self.R, sampled=sampled,
                               temperature=a.temperature, ref=self.ref if sampled else None, template=a.template,
                               gen_batch=a.gen_batch, seed=a.seed, comm=self.comm)

    def train_metrics(self, trainer) -> dict:
        """The rollouts since the last metrics line (when a new one was generated) and the minibatches' statistics
        (a collective call at every logged step)."""
        out = {}
        r = self.rollout_stats.values  # identical on every rank (computed after the all-gather)
        if r.get("iterations"):
            n, its = r["responses"], r["iterations"]
            out.update(score=r["score"] / n, kl=r["kl"] / n, non_score_reward=r["non_score"] / n,
                       rlhf_reward=r["rlhf"] / n, kl_coef=r["kl_coef"] / its, eos_fraction=r["eos"] / n,
                       response_length=r["length"] / n, entropy_sampled=-r["logprob"] / n)
        s = self.loss_stats.merged(trainer.comm, _LOSS_KEYS)
        if s["tokens"]:
            t = s["tokens"]
            out.update(clipfrac=s["pg_clipped"] / t, ratio=s["ratio"] / t, approx_kl=s["approx_kl"] / t,
                       vf_clipfrac=s["vf_clipped"] / t, value_error=s["sq_error"] / t, entropy=s["entropy"] / t)
        out.update(self.timing.take())
        self.rollout_stats, self.loss_stats = _Sums(), _Sums()
        return out

    def evaluate(self, trainer, step):
        t0 = time.perf_counter()
        policy = self.model.policy
        greedy = self._heldout(policy, sampled=False)
        sampled = self._heldout(policy, sampled=True)
        if self.ref_heldout is None:
            self.ref_heldout = self._heldout(self.ref, sampled=False)["score"]
        out = {"heldout_score": greedy["score"], "heldout_score_sampled": sampled["score"],
               "heldout_kl": sampled["kl"], "heldout_ended": greedy["ended"], "ref_heldout_score": self.ref_heldout}
        self.timing.add("pause", time.perf_counter() - t0)
        return out

    def on_evaluated(self, trainer, step, metrics, last):
        """Write the policy alone as a model checkpoint ``OUT_DIR/policy.safetensors`` (a collective call)."""
        t0 = time.perf_counter()
        state, _ = trainer.layout.gather_state(trainer.optimizer)
        if trainer.comm.rank == 0:
            from ..checkpoint import save_model
            from ..model import GPT

            policy = GPT(self.policy.config)
            policy.load_state_dict({k[len("policy."):]: v for k, v in state.items() if k.startswith("policy.")})
            save_model(trainer.out_dir / "policy.safetensors", policy, self.tokenizer,
                       extra_metadata={"job": "ppo", "step": int(step)})
        self.timing.add("pause", time.perf_counter() - t0)

    def checkpoint_metadata(self):
        from ..checkpoint import tokenizer_to_json

        a = self.args
        return {"tokenizer": tokenizer_to_json(self.tokenizer),
                "ppo": {"model": str(a.model), "ref": str(a.ref or a.model), "reward": a.reward,
                        "reward_model": a.reward_model, "prompt_width": self.P, "response_length": self.R}}

    def summary(self, trainer, step, metrics):
        if "heldout_score" not in metrics:
            return None
        line = (f"held-out reward {metrics['heldout_score']:.4f} (greedy; the reference/SFT model: "
                f"{metrics['ref_heldout_score']:.4f}), KL to the reference {metrics['heldout_kl']:.4f} nats per "
                f"response (sampled at T={self.args.temperature})")
        t = self.timing.total
        if t["iterations"]:
            line += (f"; generation took {100 * t['generate'] / t['wall']:.0f}% of a PPO iteration's "
                     f"{t['wall'] / t['iterations']:.2f} s (scoring {100 * t['score'] / t['wall']:.0f}%, the rest "
                     "the updates)")
        return line


def _no_dropout(model):
    """Switch dropout off (PPO's ratios assume a deterministic policy); the config records it."""
    if model.config.dropout:
        model.config = dataclasses.replace(model.config, dropout=0.0)
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0


# ---------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------


def add_ppo_flags(parser):
    """The PPO job's own flags: models, reward, prompts, rollouts and the PPO update."""
    m = parser.add_argument_group("models and reward")
    m.add_argument("--model", required=True, metavar="CKPT",
                   help="the policy's starting checkpoint (an SFT model: `python -m llm sft`)")
    m.add_argument("--ref", default=None, metavar="CKPT",
                   help="the frozen reference of the KL penalty (default --model); it must be the policy's "
                        "architecture and tokenizer")
    m.add_argument("--reward-model", default=None, metavar="CKPT",
                   help="a reward model (`python -m llm reward`); its stored normalisation is applied")
    m.add_argument("--reward", default=None, metavar="NAME",
                   help="a programmatic reward: arithmetic, gsm8k, unit-tests (run in the evaluator's sandbox), or "
                        "'module:function' / 'file.py:function', a callable fn(prompts, responses, records) returning "
                        "one number per response")
    m.add_argument("--no-reward-norm", action="store_true",
                   help="use the reward model's raw scores, not its stored normalisation")
    m.add_argument("--value-model", default=None, metavar="CKPT|policy",
                   help="the reward-model checkpoint the value model starts from, or 'policy': the policy's trunk "
                        "with a zero head (default: --reward-model as TRL does, else the policy)")
    m.add_argument("--eval-reward", default=None, metavar="NAME",
                   help="the reward of the held-out evaluations when it differs from the training reward, e.g. "
                        "'arithmetic' while training on --reward-model: the true score beside the proxy's")
    d = parser.add_argument_group("prompts")
    d.add_argument("--prompts", nargs="+", default=None, metavar="JSONL",
                   help="prompt records {'prompt': text or chat messages, ...fields the reward reads}")
    d.add_argument("--task", choices=["arithmetic"], default=None,
                   help="built-in prompts: arithmetic (generated sums, held-out operand pairs; with --reward "
                        "arithmetic)")
    d.add_argument("--eval-data", nargs="+", default=None, metavar="JSONL",
                   help="held-out prompt records (default: --val-fraction of --prompts)")
    d.add_argument("--val-fraction", type=unit_float, default=0.1, metavar="X",
                   help="share of --prompts held out when --eval-data is not given (default 0.1)")
    d.add_argument("--eval-prompts", type=positive_int, default=64, metavar="N",
                   help="held-out prompts evaluated at each evaluation (default 64)")
    d.add_argument("--template", choices=["chat", "alpaca"], default="chat",
                   help="the chat template of the SFT model (default chat)")
    d.add_argument("--max-prompt-tokens", type=positive_int, default=None, metavar="N",
                   help="longer prompts lose tokens on the left (default: block size - --response-length)")
    r = parser.add_argument_group("rollouts")
    r.add_argument("--rollout-batch", type=positive_int, default=64, metavar="N",
                   help="prompts per PPO iteration, over all replicas (default 64)")
    r.add_argument("--gen-batch", type=positive_int, default=16, metavar="G",
                   help="rows generated together (each chunk has its own seeded stream, so the samples do not "
                        "depend on --dp); must divide --rollout-batch / DP (default 16)")
    r.add_argument("--response-length", type=positive_int, default=24, metavar="R",
                   help="the most tokens a response may have; one that has not written the end token by then is cut "
                        "(default 24)")
    r.add_argument("--temperature", type=positive_float, default=0.7, metavar="T",
                   help="sampling temperature, applied to the log-probabilities too (default 0.7, TRL's)")
    r.add_argument("--missing-eos-penalty", type=float, default=None, metavar="X",
                   help="subtracted from the score of a response that never wrote the end token (default none)")
    u = parser.add_argument_group("PPO update (TRL's defaults)")
    u.add_argument("--ppo-epochs", type=positive_int, default=4, metavar="N",
                   help="passes over each rollout batch; each minibatch (--batch-size x --grad-accum rows) is one "
                        "optimizer step (default 4)")
    u.add_argument("--clip-range", type=positive_float, default=0.2, metavar="EPS",
                   help="the policy ratio's clip range (default 0.2)")
    u.add_argument("--value-clip", type=nonneg_float, default=0.2, metavar="C",
                   help="the value prediction's clip range around the rollout's values; 0: no clipping (default 0.2)")
    u.add_argument("--vf-coef", type=nonneg_float, default=0.1, metavar="X", help="value loss weight (default 0.1)")
    u.add_argument("--gamma", type=unit_or_one, default=1.0, metavar="X", help="discount (default 1)")
    u.add_argument("--lam", type=unit_or_one, default=0.95, metavar="X", help="GAE's lambda (default 0.95)")
    u.add_argument("--kl-coef", type=nonneg_float, default=0.05, metavar="BETA",
                   help="the KL penalty's coefficient (the start value with --target-kl) (default 0.05)")
    u.add_argument("--kl-estimator", choices=KL_ESTIMATORS, default="k1",
                   help="k1: log p - log p_ref; k3: (r - 1) - log r, never negative (default k1)")
    u.add_argument("--target-kl", type=positive_float, default=None, metavar="KL",
                   help="adapt the coefficient towards this KL per response (Ziegler et al.; default: fixed)")
    u.add_argument("--kl-horizon", type=positive_float, default=10000, metavar="N",
                   help="the adaptive controller's horizon in responses (default 10000)")
    u.add_argument("--whiten-rewards", action="store_true", help="whiten the per-token rewards (TRL's option)")
    return parser


def unit_or_one(s):
    """argparse type: a number in [0, 1]."""
    v = float(s)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {s}")
    return v


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m llm ppo`` argument parser."""
    p = argparse.ArgumentParser(
        prog="python -m llm ppo",
        description="RLHF with PPO (TRL's semantics): sample responses with the KV cache, score them with a reward "
                    "model or a programmatic reward, put the KL to the frozen reference into the per-token reward, "
                    "GAE, whitened advantages, clipped policy and value losses over several epochs of minibatches. "
                    "Logs score, KL, clip fractions, value error, entropy, ratio and held-out rewards; prints the "
                    "share of each iteration spent generating.",
        epilog="--batch-size is the PPO minibatch (rows per optimizer step with --grad-accum); --max-steps counts "
               "optimizer steps: each PPO iteration is --ppo-epochs x --rollout-batch / (--batch-size x --grad-accum) "
               "of them. Files: OUT_DIR/ckpt.safetensors (policy, value model, optimizer and the pending rollouts: "
               "--resume continues bitwise), OUT_DIR/policy.safetensors (the policy alone, for eval/generate), "
               "OUT_DIR/metrics.jsonl. Exit codes as `python -m llm train`. " + threads_note())
    add_ppo_flags(p)
    add_trainer_flags(p, {"out_dir": "runs/ppo", "batch_size": 16, "max_steps": 64, "lr": 3e-5, "warmup_steps": 0,
                          "eval_interval": 16, "ckpt_interval": 16, "weight_decay": 0.0, "log_interval": 4})
    p.set_defaults(out_dir="runs/ppo")
    return p


def main(argv=None, comm=None, reward=None) -> int:
    """``python -m llm ppo``: returns the exit code (as ``python -m llm train``). ``reward``: a reward callable
    object to use instead of the flags' (tests, scripts)."""
    from ..train import run_job

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    if args.pp != 1:  # before mpirun is started for it
        print(f"python -m llm ppo: error: {PP_ERROR}", file=sys.stderr)
        return 2
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_job("ppo", args, lambda a, c, log: PPOJob(a, c, log, reward=reward), argv, comm=comm)


__all__ = ["PPOJob", "PolicyAndValue", "PolicyValueOutput", "RolloutSampler", "encode_arrays", "decode_arrays",
           "build_parser", "main"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
