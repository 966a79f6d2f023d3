"""Instruction and preference records with Hugging Face field names, and the BIG-bench converter on a small
archive built here (the real one is fetched only by the documented runs)."""

import io
import json
import tarfile

import pytest

from llm.post import data
from llm.post.data import DataError, conversation_from_record, load_conversations, load_pairs, pair_from_record


def test_the_three_instruction_forms_become_conversations():
    want = [{"role": "user", "content": "add\n\n2 and 2"}, {"role": "assistant", "content": "4"}]
    assert conversation_from_record({"instruction": "add", "input": "2 and 2", "output": "4"}, "r") == want
    assert conversation_from_record({"instruction": "add", "output": "4"}, "r")[0]["content"] == "add"
    assert conversation_from_record({"prompt": "add\n\n2 and 2", "completion": "4"}, "r") == want
    assert conversation_from_record({"messages": want}, "r") == want
    chat = [{"role": "system", "content": "be brief"}, *want]
    assert conversation_from_record({"prompt": chat[:2], "completion": chat[2:]}, "r") == chat


@pytest.mark.parametrize("record, match", [
    ({"instruction": "add"}, 'no "output" field'),
    ({"output": "4"}, 'no "instruction" field'),
    ({"instruction": 3, "output": "4"}, '"instruction" must be a string'),
    ({"prompt": "x"}, 'no "completion"'),
    ({"messages": [{"role": "user", "content": "x"}]}, "must end with the assistant's reply"),
    ({"messages": [{"role": "user"}]}, 'no "content" field'),
    ({"text": "x"}, "not an instruction record"),
    (["x"], "must be a JSON object"),
])
def test_bad_instruction_records_are_named(record, match):
    with pytest.raises(DataError, match=match):
        conversation_from_record(record, "file.jsonl:7")


def test_preference_records_in_both_forms():
    a = pair_from_record({"prompt": "q", "chosen": "yes", "rejected": "no"}, "r")
    b = pair_from_record({"prompt": [{"role": "user", "content": "q"}],
                          "chosen": [{"role": "assistant", "content": "yes"}],
                          "rejected": [{"role": "assistant", "content": "no"}]}, "r")
    assert (a.prompt, a.chosen, a.rejected) == (b.prompt, b.chosen, b.rejected) == (
        [{"role": "user", "content": "q"}], "yes", "no")


@pytest.mark.parametrize("record, match", [
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "the same answer"),
    ({"prompt": "q", "chosen": "a"}, "lacks 'rejected'"),
    ({"chosen": "a", "rejected": "b"}, "lacks 'prompt'"),
    ({"prompt": [{"role": "assistant", "content": "q"}], "chosen": "a", "rejected": "b"}, "end with a user turn"),
    ({"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "one assistant message"),
])
def test_bad_preference_records_are_named(record, match):
    with pytest.raises(DataError, match=match):
        pair_from_record(record, "file.jsonl:3")


def test_jsonl_files_name_their_bad_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "a", "output"\n')
    with pytest.raises(DataError, match=r"d.jsonl:3: not valid JSON"):
        load_conversations(data_file=path)
    path.write_text("\n")
    with pytest.raises(DataError, match="holds no records"):
        load_pairs(data_file=path)
    with pytest.raises(DataError, match="does not exist"):
        load_pairs(data_file=tmp_path / "missing.jsonl")
    for load in (load_conversations, load_pairs):  # --subtasks filters a named dataset, never silently a file
        with pytest.raises(DataError, match="does not apply to --data-file"):
            load(data_file=path, subtasks="subtask041*")


def test_a_dataset_of_the_wrong_kind_is_refused():
    with pytest.raises(DataError, match="holds preference pairs, not instructions"):
        load_conversations(dataset="ni_pairs")
    with pytest.raises(DataError, match="holds instructions, not preference pairs"):
        load_pairs(dataset="natural_instructions")
    with pytest.raises(DataError, match="unknown dataset"):
        data.dataset_records("alpaca")


def _task(examples, prefix=None, **extra):
    task = {"examples": examples, **extra}
    if prefix is not None:
        task["task_prefix"] = prefix
    return task


def fake_bigbench(path):
    """A tar.gz laid out like the bigbench sdist, with a few records of the tasks the converter reads."""
    ni = "bigbench-1.0.0/bigbench/benchmark_tasks/natural_instructions"
    files = {}
    for good, bad in data.NI_PAIR_SUBTASKS:
        files[f"{ni}/{good}/task.json"] = _task(
            [{"input": f"Fact: {good[:10]}. \nQuestion: what?", "target": ["right.", "also right."]},
             {"input": "Fact: x. \nQuestion: unmatched?", "target": ["r."]}],
            "Definition: Answer it. Things to Avoid: nothing. Prompt: Write a correct answer.")
        wrong_input = f"Fact: {good[:10]}. \nQuestion: what?"
        if "qasc" in bad or "cosmosqa" in bad:
            wrong_input += " \nCorrect Answer: right."
        files[f"{ni}/{bad}/task.json"] = _task([{"input": wrong_input, "target": ["wrong.", "bad."]}],
                                               "Definition: Write a wrong answer. Prompt: Write a wrong answer.")
    for part in ("harmless", "helpful", "honest", "other"):
        files[f"bigbench-1.0.0/bigbench/benchmark_tasks/hhh_alignment/{part}/task.json"] = _task(
            [{"input": f"{part} question", "target_scores": {"bad answer": 0, "good answer": 1}}])
    files["bigbench-1.0.0/bigbench/benchmark_tasks/truthful_qa/task_mc.json"] = _task(
        [{"input": "Is the earth flat?", "target_scores": {"No.": 1, "Yes.": 0, "Only in Kansas.": 0}}])
    files["bigbench-1.0.0/bigbench/benchmark_tasks/other_task/task.json"] = _task([])
    with tarfile.open(path, "w:gz") as tar:
        for name, obj in files.items():
            raw = json.dumps(obj).encode()
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))


def test_bigbench_is_converted_once_into_records(tmp_path, monkeypatch):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    fake_bigbench(downloads / "bigbench-1.0.0.tar.gz")
    monkeypatch.setattr(data, "pip_download", lambda *a, **k: pytest.fail("must not download: the archive is there"))
    logs = []
    pairs = data.dataset_records("ni_pairs", cache_dir=tmp_path, log=logs.append)
    assert len(pairs) == len(data.NI_PAIR_SUBTASKS) and any("converting" in line for line in logs)
    where, first = pairs[0]
    assert where == "ni_pairs.jsonl:1"
    assert first["prompt"].startswith("Write a correct answer.\n\nFact:") and first["prompt"].endswith("what?")
    assert (first["chosen"], first["rejected"]) == ("right.", "wrong.")
    ni = data.dataset_records("natural_instructions", subtasks="subtask041*", cache_dir=tmp_path, log=None)
    assert [r["instruction"] for _, r in ni] == ["Write a correct answer."] * 2
    assert ni[0][1]["output"] == "right." and set(ni[0][1]) == {"instruction", "input", "output", "task"}
    definitions = json.loads((tmp_path / f"v{data.CONVERSION_VERSION}" / "natural_instructions" /
                              "definitions.json").read_text())
    assert definitions["subtask041_qasc_answer_generation"].startswith("Definition: Answer it.")
    convs = load_conversations(dataset="natural_instructions", subtasks="subtask04*", cache_dir=tmp_path, log=None)
    assert convs[0][1][-1] == {"role": "assistant", "content": "right."}
    hhh = load_pairs(dataset="hhh_alignment", cache_dir=tmp_path, log=None)
    assert [(p.prompt[0]["content"], p.chosen, p.rejected) for p in hhh][0] == ("harmless question", "good answer",
                                                                                "bad answer")
    tqa = load_pairs(dataset="truthful_qa", cache_dir=tmp_path, log=None)
    assert [(p.chosen, p.rejected) for p in tqa] == [("No.", "Yes."), ("No.", "Only in Kansas.")]
    logs.clear()
    data.dataset_records("hhh_alignment", cache_dir=tmp_path, log=logs.append)
    assert logs == []  # converted once
    with pytest.raises(DataError, match="no Natural Instructions subtask matches"):
        data.dataset_records("natural_instructions", subtasks="nothing*", cache_dir=tmp_path, log=None)


def test_an_unreachable_pypi_says_what_to_fetch_and_where(tmp_path, monkeypatch):
    def fail(*a, **k):
        raise data.DownloadFailed("`pip download bigbench==1.0.0` failed: no network")

    monkeypatch.setattr(data, "pip_download", fail)
    with pytest.raises(data.DatasetUnavailable, match=r"no network.*pip download --no-deps --no-binary :all: "
                                                      r"bigbench==1.0.0.*downloads"):
        data.dataset_records("truthful_qa", cache_dir=tmp_path, log=None)
