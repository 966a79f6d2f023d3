"""What every task is made of: documents, the harness's prompt, its requests, and per-document metrics.

A ``Task`` follows lm-evaluation-harness's ``ConfigurableTask`` (plain-text
prompts, no chat template):

- its documents come from ``llm.eval.datasets.load_docs(task.dataset, split)``
  with the Hugging Face datasets' field names, then ``process_docs``;
- ``doc_to_text`` / ``doc_to_target`` / ``doc_to_choice`` are the harness's
  templates, written as Python;
- ``context(doc, shots)`` is the prompt: the description, then each few-shot
  example as ``text + target_delimiter + answer + fewshot_delimiter``, then the
  document's own text (a list of prompts for a task whose choices are in the
  context, like WinoGrande);
- ``requests(doc, context)`` are the model calls (``Request``), and
  ``process_results(doc, results)`` turns their answers into per-document
  metric values, which ``llm.eval.metrics`` aggregates (``aggregation``).

Few-shot examples are drawn by ``FewshotSampler`` with the harness's seeded
sampler, so the same seed gives the same examples as the harness.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Sequence

#: the three request types of the harness
LOGLIKELIHOOD = "loglikelihood"
ROLLING = "loglikelihood_rolling"
GENERATE = "generate_until"
#: the harness's fewshot_random_seed
FEWSHOT_SEED = 1234


class TaskError(ValueError):
    """A task cannot run as asked (missing data, no few-shot pool, an empty task...); the message says why."""


@dataclass(frozen=True)
class Request:
    """One model call: ``kind`` LOGLIKELIHOOD (context, continuation), ROLLING (text,) or GENERATE (context, kwargs)."""

    kind: str
    args: tuple


@dataclass
class Metric:
    """A metric a task reports: how its per-document values are aggregated, and which way is better.

    ``aggregation``: "mean", "perplexity", "weighted_perplexity" or "bits_per_byte" (see ``llm.eval.metrics``).
    """

    name: str
    aggregation: str = "mean"
    higher_is_better: bool = True


class FewshotSampler:
    """The harness's few-shot samplers: seeded random draws (``ContextSampler``) or the first n (``FirstNSampler``).

    Random: one ``random.Random(seed)`` serves all documents in order; a
    document draws ``rng.sample(pool, n)``, or, when the pool may hold the
    document itself (``exclude_eval_doc``), ``rng.sample(pool, n + 1)`` minus
    the document, cut to n (drawing again from the pool without it if that
    left fewer than n). First n: ``pool[:n]``, without the document when it is
    in the pool.
    """

    def __init__(self, pool: Sequence[dict], seed: int | None = FEWSHOT_SEED, first_n: bool = False):
        self.pool = list(pool)
        self.first_n = first_n
        self.rng = random.Random(seed)

    def sample(self, n: int, eval_doc: dict | None = None) -> list[dict]:
        """The n few-shot documents for ``eval_doc`` (None: the pool cannot contain it)."""
        if n < 0:
            raise ValueError(f"the number of few-shot examples must be >= 0, got {n}")
        if n == 0:
            return []
        if self.first_n:
            pool = self.pool if eval_doc is None else [d for d in self.pool if d != eval_doc]
            if n > len(pool):
                raise TaskError(f"{n} few-shot examples asked for, but the few-shot pool holds only {len(pool)}")
            return pool[:n]
        if n + (eval_doc is not None) > len(self.pool):
            raise TaskError(f"{n} few-shot examples asked for, but the few-shot pool holds only {len(self.pool)}")
        if eval_doc is None:
            return self.rng.sample(self.pool, n)
        shots = [d for d in self.rng.sample(self.pool, n + 1) if d != eval_doc][:n]
        if len(shots) < n:  # the pool held the document more than once
            shots = self.rng.sample([d for d in self.pool if d != eval_doc], n)
        return shots


@dataclass
class Task:
    """A benchmark with the harness's prompt and metrics. Subclasses define the templates.

    Attributes mirror the harness's task configuration: ``dataset`` (the name
    ``load_docs`` knows), ``eval_split`` (the split scored), ``fewshot_split``
    (the split few-shot examples come from; None when the task has fixed
    examples, ``fixed_fewshot``, or none), ``first_n`` (take the pool's first
    examples instead of a seeded draw), ``exclude_eval_doc`` (the pool may hold
    the evaluated document: the harness then draws one more and drops it),
    ``num_fewshot`` (the task's default: None means 0; an explicit 0, as
    HumanEval's, is kept even when another number is asked for, as the harness
    does), ``description`` (text before everything), the two delimiters,
    ``output_type`` and ``metrics``.
    """

    name: str
    dataset: str
    eval_split: str
    fewshot_split: str | None = None
    first_n: bool = False
    exclude_eval_doc: bool = False
    num_fewshot: int | None = None
    description: str = ""
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    output_type: str = "multiple_choice"
    metrics: list[Metric] = field(default_factory=list)
    #: the harness task this one reproduces (its name in lm-evaluation-harness)
    harness_name: str = ""
    #: the generation settings of a GENERATE task (until, max_gen_toks, do_sample, temperature)
    generation_kwargs: dict = field(default_factory=dict)

    # ---- documents -------------------------------------------------------------------------------

    def process_docs(self, docs: list[dict]) -> list[dict]:
        """Turn the dataset's documents into the task's (the harness's ``process_docs``); default: as they are."""
        return docs

    def fixed_fewshot(self) -> list[dict] | None:
        """Few-shot examples written into the task itself (GSM8K-CoT, MBPP), or None."""
        return None

    # ---- templates -------------------------------------------------------------------------------

    def doc_to_text(self, doc: dict) -> str | int:
        """The document's question; an int for a task whose choices are in the context (the gold choice)."""
        raise NotImplementedError

    def doc_to_target(self, doc: dict) -> str | int:
        """The document's answer: the index of the gold choice, or its text."""
        raise NotImplementedError

    def doc_to_choice(self, doc: dict) -> list[str] | None:
        """The answer choices of a multiple-choice document, or None."""
        return None

    def fewshot_text(self, doc: dict) -> str:
        """A few-shot example's question (default: ``doc_to_text``)."""
        text = self.doc_to_text(doc)
        if isinstance(text, int):  # choices in the context: the example shows the gold one
            return self.doc_to_choice(doc)[text]
        return text

    def fewshot_answer(self, doc: dict) -> str:
        """A few-shot example's answer text (default: the gold choice, or the target text)."""
        target = self.doc_to_target(doc)
        choices = self.doc_to_choice(doc)
        if isinstance(target, int) and choices and not isinstance(self.doc_to_text(doc), int):
            return choices[target]
        return target if isinstance(target, str) else str(target)

    def context(self, doc: dict, shots: Sequence[dict]) -> str | list[str]:
        """The prompt for ``doc`` after the few-shot examples ``shots``, exactly as the harness builds it.

        An example whose answer is empty adds its question alone, with no
        delimiter (as the harness does). For a task whose ``doc_to_text`` is an
        int (choices in the context), one prompt per choice.
        """
        prefix = self.description
        for shot in shots:
            answer = self.fewshot_answer(shot)
            prefix += self.fewshot_text(shot)
            if answer != "":
                prefix += self.target_delimiter + answer + self.fewshot_delimiter
        text = self.doc_to_text(doc)
        if isinstance(text, int):
            return [prefix + choice for choice in self.doc_to_choice(doc)]
        return prefix + text

    # ---- requests and results ----------------------------------------------------------------------

    def requests(self, doc: dict, context: str | list[str]) -> list[Request]:
        """The model calls for ``doc`` (default: one log-likelihood per choice, for multiple choice)."""
        if isinstance(context, list):  # choices in the context, the same continuation after each
            cont = self.target_delimiter + self.doc_to_target(doc)
            return [Request(LOGLIKELIHOOD, (ctx, cont)) for ctx in context]
        return [Request(LOGLIKELIHOOD, (context, self.target_delimiter + c)) for c in self.doc_to_choice(doc)]

    def gold_index(self, doc: dict) -> int:
        """The index of the gold choice (the harness: an int target, or the target's position among the choices)."""
        gold = self.doc_to_text(doc) if isinstance(self.doc_to_text(doc), int) else self.doc_to_target(doc)
        if isinstance(gold, str):
            choices = self.doc_to_choice(doc)
            if gold not in choices:
                raise TaskError(f"{self.name}: the answer {gold!r} is not one of the choices {choices!r}")
            gold = choices.index(gold)
        return gold

    def process_results(self, doc: dict, results: list) -> dict[str, Any]:
        """Per-document metric values from the answers to ``requests(doc, ...)`` (default: acc, acc_norm)."""
        from ..metrics import multiple_choice_scores

        lls = [ll for ll, _ in results]
        scores = multiple_choice_scores(lls, self.doc_to_choice(doc), self.gold_index(doc))
        return {m.name: scores[m.name] for m in self.metrics}


__all__ = ["LOGLIKELIHOOD", "ROLLING", "GENERATE", "FEWSHOT_SEED", "TaskError", "Request", "Metric",
           "FewshotSampler", "Task"]
