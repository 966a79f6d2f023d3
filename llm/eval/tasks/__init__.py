"""The task registry: every benchmark ``python -m llm eval --tasks`` knows, by the harness's names.

    >>> from llm.eval.tasks import get_task, known_tasks, resolve_names
    >>> resolve_names(["lambada", "mmlu"])    # aliases and groups are checked; unknown names raise
    ['lambada_openai', 'mmlu']

One module per family: ``multiple_choice`` (ARC, HellaSwag, PIQA, WinoGrande,
BoolQ, SciQ, OpenBookQA, COPA, Social IQa, CommonsenseQA), ``mmlu`` (57
subjects in groups), ``perplexity`` (LAMBADA, perplexity on text files),
``gsm8k`` (gsm8k, gsm8k_cot), ``code`` (HumanEval, MBPP). ``base`` holds the
``Task`` class and the few-shot sampler.
"""

from __future__ import annotations

from . import code, gsm8k, mmlu, multiple_choice, perplexity
from .base import Task, TaskError

#: task name -> factory (a fresh Task per call)
TASKS = {**perplexity.TASKS, **multiple_choice.TASKS, **gsm8k.TASKS, **code.TASKS, **mmlu.TASKS}
#: group name -> members (task or group names), in the order they are reported
GROUPS = dict(mmlu.GROUPS)
#: other names for tasks (the name the issue and the harness's group use)
ALIASES = {"lambada": "lambada_openai"}


def known_tasks() -> list[str]:
    """Every task and group name ``resolve_names`` accepts (MMLU's subjects summarised as ``mmlu_<subject>``)."""
    return sorted(set(TASKS) | set(GROUPS) | set(ALIASES))


def describe_known() -> str:
    """A short human-readable list of the task names (for error messages and ``--list-tasks``)."""
    plain = sorted(n for n in TASKS if not n.startswith("mmlu_"))
    return (", ".join(sorted(set(plain) | set(ALIASES))) + "; mmlu (57 subjects) and its groups "
            + ", ".join(g for g in GROUPS if g != "mmlu") + "; each subject as mmlu_<subject>, e.g. mmlu_anatomy")


def resolve_names(names) -> list[str]:
    """Canonical task/group names for ``names`` (aliases replaced, duplicates dropped); unknown ones raise.

    The error lists every unknown name and the known ones.
    """
    out, unknown = [], []
    for raw in names:
        name = ALIASES.get(raw.strip(), raw.strip())
        if not name:
            continue
        if name not in TASKS and name not in GROUPS:
            unknown.append(raw)
        elif name not in out:
            out.append(name)
    if unknown:
        raise TaskError(f"unknown task{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                        f"known tasks: {describe_known()}")
    return out


def get_task(name: str) -> Task:
    """A fresh ``Task`` by name (or alias); ``TaskError`` listing the known names for an unknown one."""
    name = ALIASES.get(name, name)
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; known tasks: {describe_known()}")
    return TASKS[name]()


def group_leaves(group: str) -> list[str]:
    """The tasks under a group, depth first in report order (``mmlu`` -> its 57 subjects)."""
    out = []
    for member in GROUPS[group]:
        out.extend(group_leaves(member) if member in GROUPS else [member])
    return out


def groups_of(task: str) -> list[str]:
    """The groups a task belongs to, innermost first (``mmlu_anatomy`` -> ``mmlu_stem``, ``mmlu``)."""
    return sorted((g for g in GROUPS if task in group_leaves(g)), key=lambda g: len(group_leaves(g)))


__all__ = ["TASKS", "GROUPS", "ALIASES", "Task", "TaskError", "known_tasks", "describe_known", "resolve_names",
           "get_task", "group_leaves", "groups_of"]
