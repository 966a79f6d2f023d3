"""The reward model: a GPT whose head gives one number per position, read at each sequence's last real token.

    >>> rm = RewardModel.from_policy(sft_model, generator=np.random.default_rng(0))  # trunk copied, new head
    >>> out = rm(ids)                                    # (B, T, 1): a score after every prefix
    >>> r = sequence_scores(out, keep)                   # (B,): the score at each row's last real token

The architecture is the policy's GPT with the tied language-model head
replaced by a linear map ``n_embd -> 1`` with a bias (``lm_head``; the config
says ``tie_embeddings=False``), so the one ``GPT.forward`` serves it, pipeline
stages included. Rows are right-padded; the last real token is found from the
``keep`` mask (True on real tokens), never by looking for a pad id, which may
equal the end token (TRL finds it from the pad id).

The loss is Bradley-Terry's (Ouyang et al. 2022; TRL's ``RewardTrainer``): for
a pair where response i is preferred to response j of the same prompt,
``-log sigmoid(r_i - r_j - margin)`` with an optional per-pair margin, plus
``center_coef * (r_i + r_j)^2`` to keep the rewards centred (TRL's
``center_rewards_coefficient``). A K-way ranking of one prompt is one batch
element holding its K responses and every ordered pair of them, so all pairs
of a prompt share one forward of its K responses.

Normalisation (``RewardNormalization``): a gain and a bias that map the
model's rewards on reference samples to mean 0 and standard deviation 1
(lm-human-preferences normalises its reward model this way); it is measured
at every evaluation of ``python -m llm reward`` and stored in the checkpoint's
metadata, and PPO applies it.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

import nn
from autograd import backend
from autograd.tensor import Tensor

from ..checkpoint import CheckpointError, config_from_metadata, load_checkpoint, model_state_from_tensors
from ..checkpoint import tokenizer_from_metadata
from ..model import GPT, GPTConfig

#: the metadata key of a reward-model checkpoint: {"head": "scalar", "normalization": {...} or None}
METADATA_KEY = "reward_model"


class RewardModel(GPT):
    """A GPT with a scalar head (see the module docstring): ``forward(ids, ...)`` gives (B, T, 1).

    ``config`` is taken with ``tie_embeddings=False`` (the head no longer
    reads ``wte``). The head is initialised N(0, 1/sqrt(n_embd + 1)) with a zero
    bias, the scale at which a unit-variance hidden state gives a unit-variance
    reward (lm-human-preferences).
    """

    def __init__(self, config: GPTConfig, generator: np.random.Generator | None = None, dtype=np.float32):
        config = dataclasses.replace(config, tie_embeddings=False)
        super().__init__(config, generator=generator, dtype=dtype)
        head_gen = generator if generator is not None else np.random.default_rng(0)
        self.lm_head = nn.Linear(config.n_embd, 1, bias=True, generator=head_gen,
                                 init_std=1.0 / math.sqrt(config.n_embd + 1), dtype=dtype)

    @classmethod
    def from_policy(cls, policy: GPT, generator: np.random.Generator | None = None) -> "RewardModel":
        """A reward (or value) model whose trunk is a copy of ``policy``'s (embeddings, blocks, final norm) and
        whose head is new."""
        if not isinstance(policy, GPT):
            raise TypeError(f"RewardModel.from_policy needs a GPT, got {type(policy).__name__}")
        dtype = next(iter(policy.parameters())).dtype
        model = cls(policy.config, generator=generator, dtype=dtype)
        trunk = {k: v for k, v in policy.state_dict().items() if not k.startswith("lm_head.")}
        head = {k: v for k, v in model.state_dict().items() if k.startswith("lm_head.")}
        model.load_state_dict({**trunk, **head})
        return model.to(policy.device)


def sequence_scores(output: Tensor, keep) -> Tensor:
    """The score at each row's last real token: (B,) from the model's output (B, T, 1) and ``keep`` (B, T).

    ``keep`` is True on real tokens (right padding); a row without any real
    token reads position 0 (its score means nothing: give it no pair).
    """
    keep = np.asarray(backend.to_device(keep, "cpu"), dtype=bool)
    B, T, _ = output.shape
    if keep.shape != (B, T):
        raise ValueError(f"sequence_scores: a keep mask of shape {keep.shape} for an output of shape {output.shape}")
    last = np.where(keep.any(axis=1), T - 1 - np.argmax(keep[:, ::-1], axis=1), 0)
    return output[np.arange(B), last, 0]  # (B,)


def bradley_terry_loss(rewards: Tensor, better, margin=None, center_coef: float = 0.0):
    """``(summed loss, pairs)`` over every pair of a batch of rankings.

    ``rewards`` (N, K): the scores of the K responses of each of N prompts;
    ``better`` (N, K, K) boolean: ``better[n, i, j]`` says response i is
    preferred to response j; ``margin`` (N, K, K) the margin wanted between
    them (default 0). Per pair: ``-log sigmoid(r_i - r_j - margin)`` (DPO's
    ``log_sigmoid``, finite for any difference) plus ``center_coef * (r_i +
    r_j)^2``.
    """
    from .dpo import log_sigmoid

    better = np.asarray(backend.to_device(better, "cpu"), dtype=bool)
    e, i, j = np.nonzero(better)
    n = int(e.size)
    if n == 0:
        return rewards.sum() * 0.0, 0
    ri, rj = rewards[e, i], rewards[e, j]  # (P,), (P,)
    d = ri - rj
    if margin is not None:
        m = np.asarray(backend.to_device(margin, "cpu"))[e, i, j]
        d = d - backend.to_device(m.astype(rewards.dtype), rewards.device)
    total = -log_sigmoid(d).sum()
    if center_coef:
        s = ri + rj
        total = total + (s * s).sum() * float(center_coef)
    return total, n


@dataclasses.dataclass
class RewardStats:
    """Running sums over pairs and responses, for the logged accuracy, margin and reward statistics.

    ``add`` a batch; ``merged(comm)`` combines every rank's (sums, min, max;
    a collective call); ``summary(prefix)`` the logged numbers.
    """

    pairs: float = 0.0
    correct: float = 0.0
    margin: float = 0.0
    responses: float = 0.0
    reward_sum: float = 0.0
    reward_sq: float = 0.0
    reward_min: float = math.inf
    reward_max: float = -math.inf

    def add(self, rewards, better, valid):
        """Count a batch: ``rewards`` (N, K) array, ``better`` (N, K, K), ``valid`` (N, K) real responses."""
        r = np.asarray(rewards, dtype=np.float64)
        e, i, j = np.nonzero(np.asarray(better, dtype=bool))
        d = r[e, i] - r[e, j]
        self.pairs += d.size
        self.correct += float((d > 0).sum())
        self.margin += float(d.sum())
        v = r[np.asarray(valid, dtype=bool)]
        if v.size:
            self.responses += v.size
            self.reward_sum += float(v.sum())
            self.reward_sq += float((v * v).sum())
            self.reward_min = min(self.reward_min, float(v.min()))
            self.reward_max = max(self.reward_max, float(v.max()))

    def merged(self, comm) -> "RewardStats":
        """Every rank's statistics combined (a collective call over ``comm``; itself at world size 1)."""
        if comm is None or comm.size == 1:
            return dataclasses.replace(self)
        sums = comm.allreduce(np.array([self.pairs, self.correct, self.margin, self.responses, self.reward_sum,
                                        self.reward_sq]), op="sum")
        lo = comm.allreduce(np.array([self.reward_min]), op="min")
        hi = comm.allreduce(np.array([self.reward_max]), op="max")
        return RewardStats(*[float(x) for x in sums], float(lo[0]), float(hi[0]))

    @property
    def mean(self) -> float:
        """The mean reward over the responses counted."""
        return self.reward_sum / self.responses if self.responses else math.nan

    @property
    def std(self) -> float:
        """The standard deviation of the rewards counted (population)."""
        if not self.responses:
            return math.nan
        return math.sqrt(max(self.reward_sq / self.responses - self.mean ** 2, 0.0))

    def summary(self, prefix: str) -> dict:
        """``{prefix + "accuracy", "margin", "reward_mean", "reward_std", "reward_min", "reward_max"}``."""
        out = {}
        if self.pairs:
            out[prefix + "accuracy"] = self.correct / self.pairs
            out[prefix + "margin"] = self.margin / self.pairs
        if self.responses:
            out.update({prefix + "reward_mean": self.mean, prefix + "reward_std": self.std,
                        prefix + "reward_min": self.reward_min, prefix + "reward_max": self.reward_max})
        return out


@dataclasses.dataclass
class RewardNormalization:
    """``gain * reward + bias``: the affine map that gives rewards of mean 0 and std 1 on the reference samples."""

    gain: float = 1.0
    bias: float = 0.0
    mean: float = 0.0
    std: float = 1.0
    samples: int = 0
    step: int | None = None

    @classmethod
    def from_stats(cls, stats: RewardStats, step: int | None = None) -> "RewardNormalization":
        """The map measured from the rewards counted in ``stats`` (identity when their spread is ~0)."""
        mean, std = stats.mean, stats.std
        if not stats.responses or not std > 1e-8:
            return cls(1.0, 0.0, mean if stats.responses else 0.0, std if stats.responses else 0.0,
                       int(stats.responses), step)
        return cls(1.0 / std, -mean / std, mean, std, int(stats.responses), step)

    def __call__(self, rewards):
        """The normalised rewards."""
        return np.asarray(rewards, dtype=np.float64) * self.gain + self.bias

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d) -> "RewardNormalization | None":
        if not isinstance(d, dict):
            return None
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})


def load_reward_model(path, device: str = "cpu"):
    """``(RewardModel, tokenizer, normalization or None, metadata)`` from a ``python -m llm reward`` checkpoint.

    Raises ``CheckpointError`` naming the file when it is not a reward model
    (e.g. an SFT checkpoint: train one with ``python -m llm reward --model``).
    """
    where = f"reward model {path}"
    tensors, metadata = load_checkpoint(path)
    info = metadata.get(METADATA_KEY)
    if not isinstance(info, dict) or info.get("head") != "scalar":
        raise CheckpointError(f"{where} is not a reward model (its metadata has no {METADATA_KEY!r} entry; it was "
                              f"written by the {metadata.get('job', 'an unknown')!r} job); train one with "
                              "`python -m llm reward --model SFT_CHECKPOINT`")
    config = config_from_metadata(metadata, where)
    model = RewardModel(config)
    try:
        model.load_state_dict(model_state_from_tensors(tensors))
    except ValueError as e:
        raise CheckpointError(f"{where} does not fit a reward model of its config:\n{e}") from None
    tokenizer = tokenizer_from_metadata(metadata, where)
    if device != "cpu":
        model.to(device)
    return model, tokenizer, RewardNormalization.from_json(info.get("normalization")), metadata


__all__ = ["RewardModel", "sequence_scores", "bradley_terry_loss", "RewardStats", "RewardNormalization",
           "load_reward_model", "METADATA_KEY"]
