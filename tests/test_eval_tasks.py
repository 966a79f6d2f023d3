"""Tasks: the harness's prompts byte for byte, its few-shot draws, and the evaluator on a fake model."""

import json
import math
import statistics
from pathlib import Path

import pytest

from llm.eval import evaluator as E
from llm.eval.tasks import GROUPS, TaskError, get_task, group_leaves, known_tasks, resolve_names
from llm.eval.tasks.base import FewshotSampler
from llm.eval.tasks.mmlu import SUBJECTS

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
DOCS = json.loads((FIXTURES / "docs.json").read_text(encoding="utf-8"))
HARNESS = json.loads((FIXTURES / "harness_requests.json").read_text(encoding="utf-8"))


def fixture_loader(dataset, split, data_file=None):
    try:
        return DOCS[dataset][split]
    except KeyError:
        raise TaskError(f"no fixture split {dataset}:{split}") from None


def _ours(case):
    task = get_task(case["task"])
    docs = task.process_docs(fixture_loader(task.dataset, task.eval_split))
    pool = task.fixed_fewshot()
    if pool is None and case["num_fewshot"]:
        pool = task.process_docs(fixture_loader(task.dataset, task.fewshot_split))
    settings = E.EvalSettings(num_fewshot=case["num_fewshot"])
    _, requests = E.build_requests(task, docs, pool, settings.shots_for(task))
    return [[list(r.args) for r in rs] for rs in requests]


@pytest.mark.parametrize("case", HARNESS["cases"], ids=lambda c: f"{c['task']}-{c['num_fewshot']}shot")
def test_requests_equal_the_harness_byte_for_byte(case):
    """The fixture holds what lm-eval 0.4.13 built for these documents (benchmarks/vs_lm_eval.py prompts)."""
    ours = _ours(case)
    theirs = case["requests"]
    assert len(ours) == len(theirs)
    for doc_ours, doc_theirs in zip(ours, theirs):
        assert doc_ours == doc_theirs


def test_fixture_covers_every_task_family():
    covered = {c["task"] for c in HARNESS["cases"]}
    plain = {n for n in known_tasks() if not n.startswith("mmlu") and n not in ("text", "lambada")}
    assert plain <= covered | {"arc_challenge"}  # arc_challenge is arc_easy's template on other data
    assert any(c["num_fewshot"] > 0 and get_task(c["task"]).exclude_eval_doc for c in HARNESS["cases"])


def test_sampler_draws_the_harness_sequence():
    import random

    pool = [{"i": i} for i in range(10)]
    s = FewshotSampler(pool, seed=1234)
    ref = random.Random(1234)
    assert s.sample(3) == ref.sample(pool, 3)
    doc = pool[4]
    got = s.sample(3, eval_doc=doc)  # n + 1 drawn, the document dropped, first n kept
    want = [d for d in ref.sample(pool, 4) if d != doc][:3]
    assert got == want and doc not in got
    first = FewshotSampler(pool, first_n=True)
    assert first.sample(2, eval_doc=pool[0]) == pool[1:3]
    with pytest.raises(TaskError, match="holds only 10"):
        s.sample(10, eval_doc=doc)


def test_mmlu_groups_are_the_harness_categories():
    assert len(SUBJECTS) == 57
    assert GROUPS["mmlu"] == ["mmlu_stem", "mmlu_other", "mmlu_social_sciences", "mmlu_humanities"]
    assert sorted(group_leaves("mmlu")) == sorted(f"mmlu_{s}" for s in SUBJECTS)
    assert [len(GROUPS[g]) for g in GROUPS["mmlu"]] == [19, 13, 12, 13]  # the tags of its 57 task files


def test_unknown_task_lists_the_known_ones():
    assert resolve_names(["lambada", "mmlu", "lambada_openai"]) == ["lambada_openai", "mmlu"]
    with pytest.raises(TaskError) as e:
        resolve_names(["arc_easy", "arc_eazy", "mmlu_anatomi"])
    msg = str(e.value)
    assert "'arc_eazy'" in msg and "'mmlu_anatomi'" in msg and "arc_challenge" in msg and "hellaswag" in msg


class FakeLM:
    """Deterministic answers: log P(continuation) = -len(continuation); greedy if it is at most 2 characters."""

    max_length = 64

    def __init__(self, completions=None):
        self.completions = completions or {}
        self.calls = []

    def loglikelihood(self, requests):
        self.calls.append(("loglikelihood", len(requests)))
        return [(-float(len(cont)), len(cont) <= 2) for _, cont in requests]

    def loglikelihood_rolling(self, texts):
        self.calls.append(("rolling", len(texts)))
        return [-0.5 * len(t) for t in texts]

    def generate_until(self, requests):
        self.calls.append(("generate", len(requests)))
        return [self.completions.get(ctx[-60:], " #### 13") for ctx, _ in requests]


def test_multiple_choice_scores_with_a_fake_model():
    lm = FakeLM()
    rows = E.evaluate(lm, ["arc_easy", "piqa"], loader=fixture_loader)
    arc = rows[0]
    docs = DOCS["arc_easy"]["test"]
    # the fake model prefers the shortest continuation (" " + choice); acc_norm divides by the choice's length
    acc = []
    for d in docs:
        lens = [len(" " + t) for t in d["choices"]["text"]]
        acc.append(float(lens.index(min(lens)) == d["choices"]["label"].index(d["answerKey"])))
    assert arc.metrics["acc"] == (pytest.approx(statistics.mean(acc)),
                                  pytest.approx(statistics.stdev(acc) / math.sqrt(len(acc))))
    assert arc.n == arc.n_total == len(docs) and arc.num_fewshot == 0 and arc.error is None
    assert arc.chance["acc"] == pytest.approx(statistics.mean(1 / len(d["choices"]["text"]) for d in docs))
    assert len(arc.data_sha256) == 64
    assert lm.calls[0] == ("loglikelihood", sum(len(d["choices"]["text"]) for d in docs))  # one call per task


def test_a_broken_task_is_one_error_and_the_others_run(tmp_path):
    def loader(dataset, split, data_file=None):
        if dataset == "piqa":
            return [{"goal": "g", "sol1": "a", "label": 0}]  # sol2 missing
        if dataset == "winogrande":
            return []
        return fixture_loader(dataset, split)

    rows = E.evaluate(FakeLM(), ["piqa", "winogrande", "arc_easy", "copa"],
                      E.EvalSettings(num_fewshot={"copa": 9}), loader=loader)
    by = {r.task: r for r in rows}
    assert "no field 'sol2'" in by["piqa"].error and "document 0" in by["piqa"].error
    assert "no documents" in by["winogrande"].error
    assert "holds only 5" in by["copa"].error
    assert by["arc_easy"].error is None and by["arc_easy"].metrics


def test_limit_and_fewshot_settings():
    lm = FakeLM()
    rows = E.evaluate(lm, ["arc_easy", "humaneval"], E.EvalSettings(limit=2, num_fewshot=3), loader=fixture_loader)
    assert rows[0].n == 2 and rows[0].n_total == 4 and rows[0].num_fewshot == 3
    assert rows[1].num_fewshot == 0  # HumanEval is fixed at 0 shots in the harness, whatever is asked
    assert E.resolve_limit(0.5, 5) == 3 and E.resolve_limit(10, 4) == 4


def test_mmlu_group_rows_weigh_subjects_by_size():
    rows = E.evaluate(FakeLM(), ["mmlu"], loader=fixture_loader)
    assert [r.task for r in rows[:3]] == ["mmlu", "mmlu_stem", "mmlu_abstract_algebra"]
    by = {r.task: r for r in rows}
    ran = [by[t] for t in group_leaves("mmlu") if by[t].error is None]
    assert sorted(r.task for r in ran) == ["mmlu_abstract_algebra", "mmlu_anatomy", "mmlu_us_foreign_policy"]
    group = by["mmlu"]
    sizes = [r.n for r in ran]
    value = sum(r.metrics["acc"][0] * n for r, n in zip(ran, sizes)) / sum(sizes)
    assert group.n == 4 and group.metrics["acc"][0] == pytest.approx(value)
    assert group.metrics["acc"][1] is None  # one subject has a single document: no stderr, so none for the group
    assert "54 of 57 tasks failed" in group.notes[0]
    assert by["mmlu_humanities"].error  # no humanities subject in the fixture


def test_lambada_and_text_perplexity(tmp_path):
    lm = FakeLM()
    rows = E.evaluate(lm, ["lambada_openai"], E.EvalSettings(bootstrap_iters=1000), loader=fixture_loader)
    docs = DOCS["lambada_openai"]["test"]
    lls = [-float(len(" " + d["text"].split(" ")[-1])) for d in docs]
    assert rows[0].metrics["perplexity"][0] == pytest.approx(math.exp(-statistics.mean(lls)))
    assert rows[0].metrics["perplexity"][1] > 0 and rows[0].higher_is_better["perplexity"] is False
    (tmp_path / "a.txt").write_text("one two  three\nfour", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text('{"text": "héllo world"}\n\n{"text": "x"}\n', encoding="utf-8")
    settings = E.EvalSettings(text_files=[str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")])
    (text,) = E.evaluate(lm, ["text"], settings)
    texts = ["one two  three\nfour", "héllo world", "x"]
    ll = sum(-0.5 * len(t) for t in texts)
    words = 4 + 2 + 1
    nbytes = sum(len(t.encode()) for t in texts)
    assert text.n == 3
    assert text.metrics["word_perplexity"] == (pytest.approx(math.exp(-ll / words)), None)
    assert text.metrics["byte_perplexity"][0] == pytest.approx(math.exp(-ll / nbytes))
    assert text.metrics["bits_per_byte"][0] == pytest.approx(-ll / nbytes / math.log(2))
    (bad,) = E.evaluate(lm, ["text"], E.EvalSettings(text_files=[str(tmp_path / "missing.txt")]))
    assert "cannot read the text file" in bad.error


def test_gsm8k_scores_generations_and_caps_max_gen_toks():
    lm = FakeLM()
    rows = E.evaluate(lm, ["gsm8k_cot"], loader=fixture_loader)
    r = rows[0]
    # the fake answer " #### 13": strict "The answer is" finds nothing; flexible finds 13 = the first gold only
    assert r.metrics["exact_match,strict-match"][0] == 0.0
    assert r.metrics["exact_match,flexible-extract"][0] == pytest.approx(1 / 3)
    assert r.num_fewshot == 8 and "max_gen_toks 256 leaves no room" in r.notes[0]
    rows = E.evaluate(FakeLM(), ["gsm8k"], E.EvalSettings(num_fewshot=0, max_gen_toks=16), loader=fixture_loader)
    assert rows[0].metrics["exact_match,strict-match"][0] == pytest.approx(1 / 3) and not rows[0].notes


class CodeLM(FakeLM):
    """Completes each HumanEval prompt with a fixed body per problem and call (a list of answers, cycled)."""

    def __init__(self, answers):
        super().__init__()
        self.answers = answers
        self.seen = {}

    def generate_until(self, requests):
        out = []
        for ctx, kwargs in requests:
            k = self.seen.get(ctx, 0)
            self.seen[ctx] = k + 1
            choices = next(v for key, v in self.answers.items() if key in ctx)
            out.append(choices[k % len(choices)])
        return out


def test_humaneval_pass_at_k_runs_the_programs():
    right = {"def add": ["    return a + b\n"], "def double": ["    return [2 * x for x in xs]\n"]}
    rows = E.evaluate(CodeLM(right), ["humaneval"], loader=fixture_loader)
    assert rows[0].metrics["pass@1"][0] == 1.0 and rows[0].error is None
    mixed = {"def add": ["    return a - b\n", "    return a + b\n", "    while True: pass\n"],
             "def double": ["    return xs\n"]}
    rows = E.evaluate(CodeLM(mixed), ["humaneval"], E.EvalSettings(code_samples=3), loader=fixture_loader)
    # add: 1 of 3 samples passes -> pass@1 = 1/3; double: 0 of 3
    assert rows[0].metrics["pass@1"][0] == pytest.approx((1 / 3 + 0) / 2)
    assert list(rows[0].metrics) == ["pass@1"]  # pass@10 needs 10 samples


def test_mbpp_program_is_the_completion_then_the_tests():
    lm = CodeLM({"add two numbers": ["def add(a, b):\n  return a + b\n"], "square": ["def square(x):\n  return x\n"]})
    rows = E.evaluate(lm, ["mbpp"], loader=fixture_loader)
    assert rows[0].metrics["pass@1"][0] == 0.5 and rows[0].num_fewshot == 3


class ShortWindowLM(FakeLM):
    """A model that, like ModelLM, refuses a continuation longer than its window (here: characters as tokens)."""

    max_length = 16

    def encode_pair(self, context, continuation):
        return list(context), list(continuation)

    def loglikelihood(self, requests):
        for i, (_, cont) in enumerate(requests):
            if len(cont) > self.max_length:
                raise ValueError(f"request {i}'s continuation has {len(cont)} tokens")
        return super().loglikelihood(requests)


class CountingShortWindowLM(ShortWindowLM):
    """``ShortWindowLM`` that also counts, as ModelLM does, the inputs it cuts on the left (``n_truncated``)."""

    n_truncated = 0
    last_requests = ()

    def loglikelihood(self, requests):
        for ctx, cont in requests:
            if len(cont) > self.max_length:
                raise ValueError(f"a continuation has {len(cont)} tokens")
            self.n_truncated += len(ctx) + len(cont) > self.max_length + 1
        self.last_requests = list(requests)
        return FakeLM.loglikelihood(self, requests)


def test_documents_whose_answer_cannot_fit_are_left_out_with_a_note():
    (piqa,) = E.evaluate(ShortWindowLM(), ["piqa"], loader=fixture_loader)
    docs = DOCS["piqa"]["validation"]
    fits = [d for d in docs if max(len(" " + d["sol1"]), len(" " + d["sol2"])) <= 16]
    assert 0 < len(fits) < len(docs)
    assert piqa.error is None and piqa.n == len(fits) and piqa.n_total == len(docs)
    assert f"{len(docs) - len(fits)} of {len(docs)} documents have an answer longer" in piqa.notes[0]
    # as ModelLM, count the inputs cut on the left while reading the requests, until one is refused: the note
    # counts the inputs of the documents that were scored, not those of the refused pass as well
    counting = CountingShortWindowLM()
    (piqa,) = E.evaluate(counting, ["piqa"], loader=fixture_loader)
    kept = counting.last_requests  # the retried pass: the documents that fit
    want = sum(len(ctx) + len(cont) > counting.max_length + 1 for ctx, cont in kept)
    assert 0 < want and f"{want} of {len(kept)} inputs were longer" in piqa.notes[1]
    tiny = ShortWindowLM()
    tiny.max_length = 4
    (copa,) = E.evaluate(tiny, ["copa"], loader=fixture_loader)  # no answer fits: an error, not an empty score
    assert "continuation has" in copa.error
