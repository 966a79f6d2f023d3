"""MMLU (Hendrycks et al. 2021): 57 subjects, each a task, grouped as the harness groups them.

The harness's ``mmlu`` (its ``default`` variant): the test split is scored;
few-shot examples are the first k of the subject's dev split (five exist); the
prompt is::

    The following are multiple choice questions (with answers) about {subject, "_" -> " "}.

    {question.strip()}
    A. {choice 0}
    B. {choice 1}
    C. {choice 2}
    D. {choice 3}
    Answer:

and the choices scored are " A", " B", " C", " D" (acc only). The subjects
form four categories (stem, other, social_sciences, humanities) and the whole
``mmlu``; a group's acc is the mean of its subjects' weighted by their sizes,
with the pooled standard error.
"""

from __future__ import annotations

from .base import Metric, Task

#: subject -> category, as in the harness's MMLU task files
SUBJECTS = {
    "abstract_algebra": "stem", "anatomy": "stem", "astronomy": "stem", "business_ethics": "other",
    "clinical_knowledge": "other", "college_biology": "stem", "college_chemistry": "stem",
    "college_computer_science": "stem", "college_mathematics": "stem", "college_medicine": "other",
    "college_physics": "stem", "computer_security": "stem", "conceptual_physics": "stem",
    "econometrics": "social_sciences", "electrical_engineering": "stem", "elementary_mathematics": "stem",
    "formal_logic": "humanities", "global_facts": "other", "high_school_biology": "stem",
    "high_school_chemistry": "stem", "high_school_computer_science": "stem",
    "high_school_european_history": "humanities", "high_school_geography": "social_sciences",
    "high_school_government_and_politics": "social_sciences", "high_school_macroeconomics": "social_sciences",
    "high_school_mathematics": "stem", "high_school_microeconomics": "social_sciences",
    "high_school_physics": "stem", "high_school_psychology": "social_sciences", "high_school_statistics": "stem",
    "high_school_us_history": "humanities", "high_school_world_history": "humanities", "human_aging": "other",
    "human_sexuality": "social_sciences", "international_law": "humanities", "jurisprudence": "humanities",
    "logical_fallacies": "humanities", "machine_learning": "stem", "management": "other", "marketing": "other",
    "medical_genetics": "other", "miscellaneous": "other", "moral_disputes": "humanities",
    "moral_scenarios": "humanities", "nutrition": "other", "philosophy": "humanities", "prehistory": "humanities",
    "professional_accounting": "other", "professional_law": "humanities", "professional_medicine": "other",
    "professional_psychology": "social_sciences", "public_relations": "social_sciences",
    "security_studies": "social_sciences", "sociology": "social_sciences", "us_foreign_policy": "social_sciences",
    "virology": "other", "world_religions": "humanities",
}
#: the harness's order of the categories inside the ``mmlu`` group
CATEGORIES = ("stem", "other", "social_sciences", "humanities")


class MMLUSubject(Task):
    """One MMLU subject: the subject's documents of the ``mmlu`` dataset (field ``subject``)."""

    subject: str = ""

    def process_docs(self, docs):
        return [d for d in docs if d["subject"] == self.subject]

    def doc_to_text(self, doc):
        c = doc["choices"]
        return f"{doc['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"

    def doc_to_target(self, doc):
        return int(doc["answer"])

    def doc_to_choice(self, doc):
        return ["A", "B", "C", "D"]


def subject_task(subject: str) -> MMLUSubject:
    """The task ``mmlu_<subject>``."""
    task = MMLUSubject(name=f"mmlu_{subject}", dataset="mmlu", eval_split="test", fewshot_split="dev", first_n=True,
                       description=f"The following are multiple choice questions (with answers) about "
                                   f"{' '.join(subject.split('_'))}.\n\n",
                       metrics=[Metric("acc")], harness_name=f"mmlu_{subject}")
    task.subject = subject
    return task


#: name -> factory, for the registry
TASKS = {f"mmlu_{s}": (lambda s=s: subject_task(s)) for s in SUBJECTS}
#: group -> members (tasks or groups), in the harness's order; a group's acc weighs its subjects by size
GROUPS = {f"mmlu_{c}": [f"mmlu_{s}" for s, cat in SUBJECTS.items() if cat == c] for c in CATEGORIES}
GROUPS["mmlu"] = [f"mmlu_{c}" for c in CATEGORIES]

__all__ = ["SUBJECTS", "CATEGORIES", "MMLUSubject", "subject_task", "TASKS", "GROUPS"]
