"""Every hint an error gives on the command line names something the user can type there.

A folder of other file types needs ``--extensions``, JSON lines with another field ``--text-field``,
and a precision the array library lacks ``--precision fp16``; each error says so, and the flag then
works. Errors of the Python API may name the Python parameter as well as the flag.
"""

import json
import re

import pytest

from llm import train as train_mod
from llm.data import DatasetError, build_dataset
from llm.tokenizer import Tokenizer

SENTENCES = "the cat sees the moon.\na dog likes the river.\nmy friend greets a red ball.\n"


@pytest.fixture(autouse=True)
def fast_flops(monkeypatch):
    monkeypatch.setattr("llm.trainer.trainer.measure_matmul_flops", lambda device="cpu", n=512, seconds=0.5: 1e10)


def run(tmp_path, *flags):
    """``python -m llm train`` on a tiny model for one step, in-process: the exit code."""
    return train_mod.main(["--data-dir", str(tmp_path / "cache"), "--vocab-size", "280", "--n-layer", "1",
                           "--n-head", "2", "--n-embd", "16", "--block-size", "8", "--batch-size", "2",
                           "--eval-batches", "1", "--sample-tokens", "0", "--no-progress", "--max-steps", "1",
                           "--out-dir", str(tmp_path / "run"), "--overwrite", *flags])


def flags_named(message):
    """The ``--flag`` names a message mentions."""
    return set(re.findall(r"--[a-z][a-z-]+", message))


def test_a_folder_of_other_files_names_the_extensions_flag(tmp_path, capsys):
    logs = tmp_path / "logs"
    logs.mkdir()
    for i in range(4):
        (logs / f"day{i}.log").write_text(SENTENCES * 20)
    assert run(tmp_path, "--data", str(logs)) == 2
    err = capsys.readouterr().err
    assert "--extensions .log,.txt" in err, err
    assert flags_named(err) <= {o for a in train_mod.build_parser()._actions for o in a.option_strings}
    assert run(tmp_path, "--data", str(logs), "--extensions", "log,.txt") == 0, capsys.readouterr().err


def test_jsonl_with_another_field_names_the_text_field_flag(tmp_path, capsys):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"body": SENTENCES * 5}) + "\n" for _ in range(6)))
    assert run(tmp_path, "--data", str(path)) == 2
    err = capsys.readouterr().err
    assert "--text-field NAME" in err, err
    assert run(tmp_path, "--data", str(path), "--text-field", "body") == 0, capsys.readouterr().err


def test_text_field_gets_its_own_cache_folder(tmp_path, capsys):
    """The same file read through two fields is two corpora: their tokenizers must not share a cache name."""
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": SENTENCES * 5, "other": "zzz qqq xxx. " * 40}) + "\n"
                            for _ in range(6)))
    assert run(tmp_path, "--data", str(path)) == 0
    assert run(tmp_path, "--data", str(path), "--text-field", "other") == 0
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_bad_extension_flag_is_a_usage_error(tmp_path, capsys):
    assert run(tmp_path, "--extensions", ",") == 2
    assert "--extensions: give file endings separated by commas" in capsys.readouterr().err


def test_bfloat16_on_numpy_names_the_precision_flag(tmp_path, capsys):
    (tmp_path / "a.txt").write_text(SENTENCES * 30)
    assert run(tmp_path, "--data", str(tmp_path / "a.txt"), "--precision", "bf16") == 2
    err = capsys.readouterr().err
    assert "--precision fp16" in err, err


def test_python_api_errors_name_the_parameter_and_the_flag(tmp_path):
    tok = Tokenizer.train(SENTENCES * 10, 280)
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "a.log").write_text(SENTENCES)
    with pytest.raises(DatasetError, match=r"--extensions.*extensions="):
        build_dataset([tmp_path / "logs"], tok, tmp_path / "ds", log=None)
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DatasetError, match=r"--text-field.*text_field="):
        build_dataset([tmp_path / "a.jsonl"], tok, tmp_path / "ds", log=None)
