"""What PPO maximises: a reward-model checkpoint, or any Python callable, checked before it is used.

    >>> reward = load_reward("arithmetic")                      # built in: exact match with the record's answer
    >>> reward = load_reward("my_rewards:length_bonus")         # any callable fn(prompts, responses, records)
    >>> reward = ModelReward.load("runs/reward/ckpt.safetensors", policy_tokenizer)
    >>> scores = reward(completions)                            # (B,) float64, finite, or a RewardError

A reward gets a ``Completions`` batch: the records' prompts (text or chat
messages), the responses as text (up to the end token, which is not part of
it), the prompt records themselves (whatever fields they carry: ``answer``,
``tests`` ...), the token ids of prompts and responses, and whether each
response ended with the end token. A plain callable is called as
``fn(prompts, responses, records)`` and must return one finite number per
response; anything else (NaN, infinity, a wrong count or shape, an exception)
is a ``RewardError`` that names the reward, the problem and the rows.

Built in (``BUILTIN``):

- ``arithmetic``: 1 if the response, stripped, is exactly the record's
  ``answer``, else 0 (``llm.post.arithmetic``'s problems);
- ``gsm8k``: 1 if the last number in the response equals the number of the
  record's ``answer`` (a worked solution ending ``#### N``, or N), compared as
  the evaluator's GSM8K ``flexible-extract`` does, else 0;
- ``unit-tests``: 1 if the response's code passes the record's ``tests`` (a
  string or a list of assert lines, after an optional ``setup``), run in the
  evaluator's sandbox (``llm.eval.sandbox``: a separate, resource-limited
  process), else 0. A fenced code block in the response is unwrapped first.

``ModelReward`` scores token ids with a reward model (``python -m llm
reward``): the prompt's ids followed by the response's, read at the last real
token, then the model's stored normalisation. Its tokenizer must be the
policy's (the same ids must mean the same text).
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..trainer import SetupError


class RewardError(SetupError):
    """A reward cannot be loaded or returned something unusable; the message names the reward and the fix."""


@dataclass
class Completions:
    """One batch of PPO's responses, as a reward sees them (see the module docstring)."""

    prompts: list
    responses: list
    records: list
    prompt_ids: list
    response_ids: list
    ended: np.ndarray

    def __len__(self) -> int:
        return len(self.responses)


def check_scores(scores, n: int, name: str) -> np.ndarray:
    """``scores`` as a (n,) float64 array; ``RewardError`` for a wrong shape or a value that is not finite."""
    try:
        arr = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError):
        raise RewardError(f"reward {name!r} returned {type(scores).__name__} that is not a list of numbers; it must "
                          f"return one number per response ({n})") from None
    if arr.shape != (n,):
        raise RewardError(f"reward {name!r} returned shape {arr.shape} for {n} responses; it must return one number "
                          f"per response, shape ({n},)")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        rows = ", ".join(f"{int(i)}: {arr[i]}" for i in bad[:5])
        raise RewardError(f"reward {name!r} returned {bad.size} value(s) that are not finite numbers (response {rows}"
                          f"{', ...' if bad.size > 5 else ''}); return a finite score for every response (e.g. 0 "
                          "for one that cannot be scored)")
    return arr


class CallableReward:
    """Any ``fn(prompts, responses, records) -> one number per response`` as a reward (checked)."""

    def __init__(self, fn, name: str | None = None):
        if not callable(fn):
            raise RewardError(f"a reward must be callable, got {type(fn).__name__}")
        self.fn, self.name = fn, name or getattr(fn, "__name__", type(fn).__name__)

    def __call__(self, completions: Completions) -> np.ndarray:
        try:
            scores = self.fn(list(completions.prompts), list(completions.responses), list(completions.records))
        except RewardError:
            raise
        except Exception as e:  # a user's function failing is bad input, said in one line
            raise RewardError(f"reward {self.name!r} raised {type(e).__name__}: {e}") from None
        return check_scores(scores, len(completions), self.name)


def _field(record, key: str, reward: str):
    if not isinstance(record, dict) or key not in record:
        raise RewardError(f"reward {reward!r} needs the field {key!r} in every prompt record; a record has "
                          f"{sorted(record) if isinstance(record, dict) else type(record).__name__}")
    return record[key]


def arithmetic_reward(prompts, responses, records) -> list:
    """1.0 where the stripped response is exactly the record's ``answer``, else 0.0."""
    return [float(r.strip() == str(_field(rec, "answer", "arithmetic")).strip()) for r, rec in zip(responses, records)]


def gsm8k_reward(prompts, responses, records) -> list:
    """1.0 where the last number of the response equals the record's answer (GSM8K's flexible extract), else 0.0."""
    from ..eval.metrics import exact_match, regex_extract
    from ..eval.tasks.gsm8k import FLEXIBLE, IGNORE

    out = []
    for r, rec in zip(responses, records):
        gold = str(_field(rec, "answer", "gsm8k"))
        out.append(exact_match(regex_extract(r, FLEXIBLE, group_select=-1), gold, IGNORE, ignore_case=True))
    return out


_FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)(?:```|$)", re.S)


def code_of(response: str) -> str:
    """The code of a response: the first fenced block if there is one, else the whole text."""
    m = _FENCE.search(response)
    return m.group(1) if m else response


def unit_test_reward(prompts, responses, records, timeout_s: float = 3.0) -> list:
    """1.0 where the response's code passes the record's ``tests`` in the sandbox, else 0.0."""
    from ..eval.code_exec import check_programs

    programs = []
    for r, rec in zip(responses, records):
        tests = _field(rec, "tests", "unit-tests")
        tests = "\n".join(tests) if isinstance(tests, list) else str(tests)
        setup = rec.get("setup") or ""
        programs.append(code_of(r) + ("\n" + setup if setup else "") + "\n" + tests)
    return [float(res.passed) for res in check_programs(programs, timeout_s=timeout_s)]


#: the rewards ``load_reward`` knows by name
BUILTIN = {"arithmetic": arithmetic_reward, "gsm8k": gsm8k_reward, "unit-tests": unit_test_reward}


def load_reward(spec: str) -> CallableReward:
    """A built-in reward by name (``BUILTIN``), or ``module:function`` / ``path/file.py:function``."""
    if spec in BUILTIN:
        return CallableReward(BUILTIN[spec], spec)
    if ":" not in spec:
        raise RewardError(f"unknown reward {spec!r}: use one of {sorted(BUILTIN)}, 'module:function' or "
                          "'path/to/file.py:function' (a callable fn(prompts, responses, records) returning one "
                          "number per response), or --reward-model CKPT")
    where, _, attr = spec.rpartition(":")
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise RewardError(f"reward {spec!r}: {path} does not exist")
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except RewardError:
        raise
    except Exception as e:
        raise RewardError(f"reward {spec!r}: cannot import {where}: {type(e).__name__}: {e}") from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise RewardError(f"reward {spec!r}: {where} has no attribute {attr!r}")
    return CallableReward(fn, spec)


class ModelReward:
    """A reward model's score of prompt + response ids (last real token), normalised (see the module docstring)."""

    def __init__(self, model, normalization=None, batch_size: int = 16, name: str = "reward model"):
        self.model, self.normalization, self.batch_size, self.name = model, normalization, int(batch_size), name
        self.model.eval()

    @classmethod
    def load(cls, path, tokenizer, device: str = "cpu", normalize: bool = True, batch_size: int = 16,
             log=print) -> "ModelReward":
        """The reward model at ``path``, checked against the policy's ``tokenizer`` (RewardError if they differ)."""
        from ..checkpoint import CheckpointError
        from ..data import tokenizer_sha256
        from .reward_model import load_reward_model

        try:
            model, rm_tok, norm, meta = load_reward_model(path, device)
        except (CheckpointError, FileNotFoundError, OSError) as e:
            raise RewardError(f"--reward-model: {e}") from None
        if rm_tok is None or tokenizer_sha256(rm_tok) != tokenizer_sha256(tokenizer):
            theirs = "no tokenizer" if rm_tok is None else f"a tokenizer of {rm_tok.n_vocab} tokens"
            raise RewardError(f"--reward-model {path} has {theirs}, not the policy's ({tokenizer.n_vocab} tokens, "
                              "sha differs): the same ids would mean other text to it; train the reward model from the "
                              "policy's SFT checkpoint (`python -m llm reward --model SFT_CKPT`)")
        if norm is not None and normalize:
            at = "" if norm.step is None else f" (measured at step {norm.step})"
            if norm.step is not None and norm.step != meta.get("step"):
                log(f"note: the reward model's normalisation was measured at step {norm.step}, its weights are of "
                    f"step {meta.get('step')}")
            log(f"reward model {path}: normalised with gain {norm.gain:.4f} and bias {norm.bias:.4f}{at}")
        return cls(model, norm if normalize else None, batch_size, name=str(path))

    def score_ids(self, sequences: list) -> np.ndarray:
        """The (normalised) score of each token-id sequence."""
        from autograd import backend
        from autograd.engine import no_grad

        from .reward_model import sequence_scores

        block = self.model.config.block_size
        out = np.empty(len(sequences))
        for k in range(0, len(sequences), self.batch_size):
            chunk = sequences[k:k + self.batch_size]
            T = max(len(s) for s in chunk)
            if T > block:
                raise RewardError(f"the reward model reads at most {block} tokens, a prompt and response have {T}: "
                                  "lower --response-length or --max-prompt-tokens")
            ids = np.zeros((len(chunk), T), dtype=np.int64)
            keep = np.zeros((len(chunk), T), dtype=bool)
            for i, s in enumerate(chunk):
                ids[i, :len(s)], keep[i, :len(s)] = s, True
            with no_grad():
                scores = sequence_scores(self.model(ids)[0], keep)
            out[k:k + len(chunk)] = np.asarray(backend.to_device(scores.data, "cpu"), dtype=np.float64)
        if self.normalization is not None:
            out = self.normalization(out)
        return check_scores(out, len(sequences), self.name)

    def __call__(self, completions: Completions) -> np.ndarray:
        return self.score_ids([list(p) + list(r) for p, r in zip(completions.prompt_ids, completions.response_ids)])


__all__ = ["RewardError", "Completions", "check_scores", "CallableReward", "arithmetic_reward", "gsm8k_reward",
           "unit_test_reward", "code_of", "BUILTIN", "load_reward", "ModelReward"]
