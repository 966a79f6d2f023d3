"""Running tasks: documents -> prompts -> batched model requests -> per-document metrics -> aggregates.

``evaluate(lm, ["arc_easy", "mmlu", ...])`` runs each task the way
lm-evaluation-harness's ``simple_evaluate`` does with a plain-text prompt:

1. the task's documents (``llm.eval.datasets.load_docs``), processed, the first
   ``limit`` of them (an int, or a fraction of the split below 1.0);
2. for each document in order, its few-shot examples drawn by one sampler
   seeded with ``seed`` (the harness's ``fewshot_random_seed``, 1234), and its
   prompt;
3. every request of the task sent to the model at once per request type, so
   the model batches across documents (``lm.loglikelihood``,
   ``lm.loglikelihood_rolling``, ``lm.generate_until``; see ``llm.eval.lm``);
4. per-document values (``Task.process_results``), aggregated with standard
   errors (``llm.eval.metrics``); a group (``mmlu``, its categories) weighs its
   tasks' values by their sizes, with the pooled standard error.

A task that cannot run (its data missing or malformed, no documents, a prompt
that does not fit) gives a ``TaskResult`` with ``error`` set to a one-line
message; the other tasks still run.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from . import metrics as M
from .tasks import GROUPS, get_task, group_leaves, groups_of
from .tasks.base import FEWSHOT_SEED, GENERATE, LOGLIKELIHOOD, ROLLING, Task, TaskError
from .tasks.perplexity import read_text_documents

#: the harness's default for generation when a task sets no max_gen_toks (HFLM's max_gen_toks)
DEFAULT_MAX_GEN_TOKS = 256


@dataclass
class TaskResult:
    """One task's (or group's) scores: ``metrics[name] = (value, stderr or None)``; ``error`` when it could not run."""

    task: str
    metrics: dict = field(default_factory=dict)
    higher_is_better: dict = field(default_factory=dict)
    n: int = 0
    n_total: int = 0
    num_fewshot: int = 0
    data_sha256: str = ""
    notes: list = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0
    is_group: bool = False
    members: list = field(default_factory=list)
    #: the expected score of uniform random guessing, where it has one (accuracy of multiple choice)
    chance: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """A JSON-ready dict (``metric`` and ``metric_stderr`` keys, as the harness's results)."""
        out = {"n": self.n, "n_total": self.n_total, "num_fewshot": self.num_fewshot, "seconds": round(self.seconds, 2)}
        for name, (value, stderr) in self.metrics.items():
            out[name] = value
            out[f"{name}_stderr"] = stderr
        out["higher_is_better"] = dict(self.higher_is_better)
        if self.chance:
            out["chance"] = dict(self.chance)
        if self.data_sha256:
            out["data_sha256"] = self.data_sha256
        if self.is_group:
            out["members"] = list(self.members)
        if self.notes:
            out["notes"] = list(self.notes)
        if self.error:
            out["error"] = self.error
        return out


@dataclass
class EvalSettings:
    """How tasks run: few-shot count (None: each task's default; an int; or {task: int}), limit, seeds, data."""

    num_fewshot: int | dict | None = None
    limit: float | None = None
    seed: int = FEWSHOT_SEED
    bootstrap_iters: int = M.BOOTSTRAP_ITERS
    data_files: dict = field(default_factory=dict)
    text_files: list = field(default_factory=list)
    max_gen_toks: int | None = None
    code_samples: int = 1
    code_temperature: float = 0.2
    code_top_p: float = 0.95
    code_timeout_s: float = 3.0

    def shots_for(self, task: Task) -> int:
        """The number of few-shot examples for ``task`` (a task fixed at 0 shots stays at 0, as in the harness)."""
        k = self.num_fewshot
        if isinstance(k, dict):
            k = next((k[g] for g in [task.name, *groups_of(task.name)] if g in k), None)
        if k is None or task.num_fewshot == 0:
            return task.num_fewshot or 0
        return int(k)


def docs_sha256(*doc_lists: Sequence[dict]) -> str:
    """SHA-256 of documents as canonical JSON (sorted keys, UTF-8): identifies the data a score was measured on."""
    h = hashlib.sha256()
    for docs in doc_lists:
        for doc in docs:
            h.update(json.dumps(doc, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8"))
            h.update(b"\n")
        h.update(b"\x00")
    return h.hexdigest()


class DocumentCache:
    """Loads each (dataset, split) once per run (MMLU's 57 subjects share one file), with the user's data files."""

    def __init__(self, data_files: dict | None = None, loader: Callable | None = None, log=print):
        self.data_files = dict(data_files or {})
        self.loader = loader
        self.log = log
        self._cache = {}

    def _load(self, dataset, split, data_file):
        if self.loader is not None:
            return self.loader(dataset, split, data_file)
        from .datasets import load_docs

        return load_docs(dataset, split, data_file=data_file, log=self.log)

    def data_file(self, task: Task, split: str) -> str | None:
        """The user's file for ``split`` of ``task``: ``TASK:SPLIT`` or ``DATASET:SPLIT``; ``TASK``: scored split."""
        names = (task.name, task.dataset)
        for name in names:
            if f"{name}:{split}" in self.data_files:
                return self.data_files[f"{name}:{split}"]
        if split == task.eval_split:
            for name in names:
                if name in self.data_files:
                    return self.data_files[name]
        return None

    def get(self, task: Task, split: str) -> list[dict]:
        """Documents of ``task.dataset``'s ``split`` (a ``--data-file`` given for the task or its dataset wins)."""
        data_file = self.data_file(task, split)
        key = (task.dataset, split, data_file)
        if key not in self._cache:
            try:
                docs = self._load(task.dataset, split, data_file)
            except TaskError:
                raise
            except (OSError, ValueError, KeyError, RuntimeError) as e:
                raise TaskError(f"{task.name}: cannot load the {split} split of {task.dataset}: {e}") from None
            self._cache[key] = list(docs)
        return self._cache[key]


def resolve_limit(limit, n: int) -> int:
    """The number of documents to score: all (None), the first ``limit`` (an int >= 1), or a fraction (< 1.0)."""
    if limit is None:
        return n
    if limit < 1.0:
        return int(math.ceil(n * limit))
    return min(n, int(limit))


def _stderr(metric: str, aggregation: str, values: list, bootstrap_iters: int):
    if bootstrap_iters <= 0 or len(values) < 2:
        return None
    if aggregation == "mean":
        return M.mean_stderr(values)
    if aggregation == "perplexity":
        return M.bootstrap_stderr(M.perplexity_rows, values, bootstrap_iters)
    return None  # weighted perplexities and bits per byte: the harness gives none


def aggregate(task: Task, per_doc: list[dict], bootstrap_iters: int = M.BOOTSTRAP_ITERS) -> dict:
    """``{metric: (value, stderr)}`` from per-document values, with each metric's aggregation."""
    out = {}
    for m in task.metrics:
        values = [d[m.name] for d in per_doc]
        if m.aggregation == "mean":
            value = M.mean(values)
        elif m.aggregation == "perplexity":
            value = M.perplexity(values)
        elif m.aggregation == "weighted_perplexity":
            value = M.weighted_perplexity(values)
        elif m.aggregation == "bits_per_byte":
            value = M.bits_per_byte(values)
        else:
            raise ValueError(f"{task.name}: unknown aggregation {m.aggregation!r} for {m.name}")
        out[m.name] = (value, _stderr(m.name, m.aggregation, values, bootstrap_iters))
    return out


def _with_max_gen_toks(task: Task, kwargs: dict, settings: EvalSettings, lm, notes: list) -> dict:
    kwargs = dict(kwargs)
    wanted = settings.max_gen_toks or kwargs.get("max_gen_toks") or DEFAULT_MAX_GEN_TOKS
    max_length = getattr(lm, "max_length", None)
    if max_length is not None and wanted >= max_length:
        capped = max(1, max_length // 2)
        notes.append(f"max_gen_toks {wanted} leaves no room for a prompt in the model's context of {max_length} "
                     f"tokens: generating at most {capped} tokens after the prompt's last {max_length - capped} "
                     f"(choose with --max-gen-toks)")
        wanted = capped
    kwargs["max_gen_toks"] = int(wanted)
    return kwargs


def build_requests(task: Task, docs: list[dict], pool: list[dict] | None, shots: int, seed: int = FEWSHOT_SEED):
    """``(contexts, requests)`` for ``docs``: one prompt (or list) and one list of ``Request`` per document.

    Few-shot examples are drawn from ``pool`` in document order by one seeded
    sampler, as the harness's ``build_all_requests`` does.
    """
    from .tasks.base import FewshotSampler

    sampler = FewshotSampler(pool or [], seed=seed, first_n=task.first_n)
    contexts, requests = [], []
    for i, doc in enumerate(docs):
        try:
            fewshot = sampler.sample(shots, doc if task.exclude_eval_doc else None) if shots else []
            ctx = task.context(doc, fewshot)
            contexts.append(ctx)
            requests.append(task.requests(doc, ctx))
        except KeyError as e:
            raise TaskError(f"{task.name}: document {i} has no field {e.args[0]!r} (fields: {sorted(doc)})") from None
        except (IndexError, TypeError, AttributeError) as e:
            raise TaskError(f"{task.name}: document {i} does not have the fields this task expects: {e}") from None
    return contexts, requests


def run_requests(lm, requests: list[list]) -> list[list]:
    """Send all requests to ``lm`` grouped by type (one call each, so it can batch); answers in the same nesting."""
    flat = [(i, j, r) for i, rs in enumerate(requests) for j, r in enumerate(rs)]
    answers = [[None] * len(rs) for rs in requests]
    for kind, method in ((LOGLIKELIHOOD, "loglikelihood"), (ROLLING, "loglikelihood_rolling"),
                         (GENERATE, "generate_until")):
        batch = [(i, j, r) for i, j, r in flat if r.kind == kind]
        if not batch:
            continue
        if kind == ROLLING:
            outs = getattr(lm, method)([r.args[0] for _, _, r in batch])
        else:
            outs = getattr(lm, method)([r.args for _, _, r in batch])
        if len(outs) != len(batch):
            raise RuntimeError(f"the model answered {len(outs)} of {len(batch)} {kind} requests")
        for (i, j, _), out in zip(batch, outs):
            answers[i][j] = out
    return answers


def unscorable_docs(lm, requests: list[list]) -> list[int]:
    """Documents with a log-likelihood request whose continuation is longer than the model can score at once.

    Uses the model's own encoding (``lm.encode_pair``); an empty list when the model does not offer it.
    """
    encode, limit = getattr(lm, "encode_pair", None), getattr(lm, "max_length", None)
    if encode is None or limit is None:
        return []
    bad = []
    for i, rs in enumerate(requests):
        for r in rs:
            if r.kind == LOGLIKELIHOOD:
                _, cont = encode(*r.args)
                if not cont or len(cont) > limit:
                    bad.append(i)
                    break
    return bad


def evaluate_task(task: Task, lm, settings: EvalSettings | None = None, documents: DocumentCache | None = None,
                  log=print) -> TaskResult:
    """Run one task on ``lm``; a problem with the task becomes ``TaskResult.error`` (one line), never an exception."""
    settings = settings or EvalSettings()
    documents = documents or DocumentCache(settings.data_files, log=log)
    start = time.perf_counter()
    result = TaskResult(task=task.name, higher_is_better={m.name: m.higher_is_better for m in task.metrics})
    try:
        if task.dataset == "text":
            all_docs = read_text_documents(settings.text_files)
            if not settings.text_files:
                raise TaskError("text: no files given; pass --text FILE [FILE ...]")
        else:
            all_docs = task.process_docs(documents.get(task, task.eval_split))
        if not all_docs:
            raise TaskError(f"{task.name}: the task has no documents (is the data file or split empty?)")
        docs = all_docs[:resolve_limit(settings.limit, len(all_docs))]
        if not docs:
            raise TaskError(f"{task.name}: --limit {settings.limit} leaves no documents to score")
        shots = settings.shots_for(task)
        pool = []
        if shots > 0:
            pool = task.fixed_fewshot()
            if pool is None:
                if task.fewshot_split is None:
                    raise TaskError(f"{task.name}: this task has no few-shot examples; use --num-fewshot 0")
                try:
                    pool = task.process_docs(documents.get(task, task.fewshot_split))
                except TaskError as e:
                    raise TaskError(f"{e}; {shots}-shot prompts draw their examples from the {task.fewshot_split} "
                                    f"split: pass --data-file {task.name}:{task.fewshot_split}=FILE, or "
                                    f"--num-fewshot {task.name}=0" + (", or use gsm8k_cot (fixed examples)"
                                                                       if task.dataset == "gsm8k" else "")) from None
        result.num_fewshot = shots
        result.n, result.n_total = len(docs), len(all_docs)
        result.data_sha256 = docs_sha256(all_docs, pool)
        task = prepare_generation(task, settings, lm, result.notes)
        _, requests = build_requests(task, docs, pool, shots, settings.seed)
        truncated_before = getattr(lm, "n_truncated", 0)
        try:
            answers = run_requests(lm, requests)
        except ValueError as e:  # the model cannot answer these requests (its message says why)
            bad = set(unscorable_docs(lm, requests))
            if not bad or len(bad) == len(docs):
                raise TaskError(f"{task.name}: {e}") from None
            docs = [d for i, d in enumerate(docs) if i not in bad]
            requests = [r for i, r in enumerate(requests) if i not in bad]
            result.notes.append(f"{len(bad)} of {result.n} documents have an answer longer than the model's context "
                                f"of {lm.max_length} tokens, which no window can score, and are left out "
                                f"(lm-evaluation-harness stops with an assertion on them)")
            result.n = len(docs)
            truncated_before = getattr(lm, "n_truncated", 0)  # the refused pass counted some inputs already
            try:
                answers = run_requests(lm, requests)
            except ValueError as e2:
                raise TaskError(f"{task.name}: {e2}") from None
        truncated = getattr(lm, "n_truncated", 0) - truncated_before
        if truncated:
            n_inputs = sum(len(rs) for rs in requests)
            notes_len = getattr(lm, "max_length", "?")
            result.notes.append(f"{truncated} of {n_inputs} inputs were longer than the model's context of "
                                f"{notes_len} tokens and lost tokens on the left (as the harness truncates)")
        per_doc = task.process_all(docs, answers, settings) if hasattr(task, "process_all") else \
            [task.process_results(doc, ans) for doc, ans in zip(docs, answers)]
        result.metrics = aggregate(task, per_doc, settings.bootstrap_iters)
        result.higher_is_better = {m.name: m.higher_is_better for m in task.metrics}
        result.chance = chance_levels(task, docs)
    except TaskError as e:
        result.error = str(e)
    result.seconds = time.perf_counter() - start
    return result


def chance_levels(task: Task, docs: list[dict]) -> dict:
    """Accuracy of a uniform random guess on ``docs``: mean of 1 / (number of choices), for acc and acc_norm."""
    if task.output_type != "multiple_choice":
        return {}
    level = M.mean([1.0 / len(task.doc_to_choice(doc)) for doc in docs])
    return {m.name: level for m in task.metrics if m.name in ("acc", "acc_norm")}


def prepare_generation(task: Task, settings: EvalSettings, lm, notes: list) -> Task:
    """Fix a generation task's max_gen_toks (the setting, the task's, or 256; capped to fit the model's context)."""
    if task.output_type != GENERATE:
        return task
    task.generation_kwargs = _with_max_gen_toks(task, task.generation_kwargs, settings, lm, notes)
    if hasattr(task, "configure_sampling"):
        task.configure_sampling(settings)
    return task


def aggregate_group(name: str, leaves: list[TaskResult]) -> TaskResult:
    """A group's row: each metric its leaves share, weighted by their sizes, with the pooled standard error."""
    ok = [r for r in leaves if r.error is None]
    group = TaskResult(task=name, is_group=True, members=[r.task for r in leaves])
    failed = [r.task for r in leaves if r.error is not None]
    if failed:
        group.notes.append(f"{len(failed)} of {len(leaves)} tasks failed and are left out: {', '.join(failed[:5])}"
                           + (" ..." if len(failed) > 5 else ""))
    if not ok:
        group.error = f"{name}: none of its {len(leaves)} tasks ran"
        return group
    names = [m for m in ok[0].metrics if all(m in r.metrics for r in ok)]
    sizes = [r.n for r in ok]
    for m in names:
        values = [r.metrics[m][0] for r in ok]
        stderrs = [r.metrics[m][1] for r in ok]
        group.metrics[m] = (M.weighted_mean(values, sizes), M.pooled_stderr(stderrs, sizes))
        group.higher_is_better[m] = ok[0].higher_is_better.get(m, True)
        if all(m in r.chance for r in ok):
            group.chance[m] = M.weighted_mean([r.chance[m] for r in ok], sizes)
    group.n = sum(sizes)
    group.n_total = sum(r.n_total for r in ok)
    shots = {r.num_fewshot for r in ok}
    group.num_fewshot = shots.pop() if len(shots) == 1 else -1
    group.seconds = sum(r.seconds for r in leaves)
    return group


def evaluate(lm, names: Sequence[str], settings: EvalSettings | None = None, log=print,
             loader=None) -> list[TaskResult]:
    """Run tasks and groups by name (see ``llm.eval.tasks.known_tasks``), in order; returns one result per row.

    A group gives its own row followed by its members' (MMLU: ``mmlu``, then
    each category, then its subjects). ``loader(dataset, split, data_file)``
    replaces ``load_docs`` (tests use fixture documents).
    """
    settings = settings or EvalSettings()
    documents = DocumentCache(settings.data_files, loader=loader, log=log)
    rows: list[TaskResult] = []
    done: dict[str, TaskResult] = {}
    for name in names:
        if name in GROUPS:
            for leaf in group_leaves(name):
                if leaf not in done:
                    log(f"eval: {leaf}")
                    done[leaf] = evaluate_task(get_task(leaf), lm, settings, documents, log=log)
            rows.extend(_group_rows(name, done))
        else:
            if name not in done:
                log(f"eval: {name}")
                done[name] = evaluate_task(get_task(name), lm, settings, documents, log=log)
            rows.append(done[name])
    return rows


def _group_rows(name: str, done: dict) -> list[TaskResult]:
    rows = [aggregate_group(name, [done[t] for t in group_leaves(name)])]
    for member in GROUPS[name]:
        if member in GROUPS:
            rows.extend(_group_rows(member, done))
        else:
            rows.append(done[member])
    return rows


__all__ = ["DEFAULT_MAX_GEN_TOKS", "TaskResult", "EvalSettings", "DocumentCache", "docs_sha256", "resolve_limit",
           "aggregate", "chance_levels", "build_requests", "run_requests", "unscorable_docs", "evaluate_task",
           "prepare_generation", "aggregate_group",
           "evaluate"]
