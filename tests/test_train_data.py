"""Tests for llm.train_data: the per-corpus cache of tokenizers and token shards that a training run uses.

A failed data run leaves nothing in the cache; a cached tokenizer is named by what it holds.
"""

import numpy as np
import pytest

from llm import train as train_mod
from llm.train_data import DataSetupError, corpus_folder, default_tokenizer, prepare_training_data

SMALL = "hello world, hello there.\nthe quick brown fox jumps over the lazy dog.\n" * 30


@pytest.fixture(autouse=True)
def fast_flops(monkeypatch):
    """The MFU denominator, measured for ~0.5 s per run otherwise (never reached when the data fails)."""
    monkeypatch.setattr("llm.trainer.trainer.measure_matmul_flops", lambda device="cpu", n=512, seconds=0.5: 1e10)


def files_under(folder):
    """Every file and folder under ``folder``, relative, sorted ([] when it does not exist)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def bad_sources(tmp_path):
    """A missing file, an empty file, a binary file and an empty folder."""
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "binary.txt").write_bytes(bytes(range(256)) * 8)
    (tmp_path / "nothing").mkdir()
    return {name: str(tmp_path / name) for name in ("missing.txt", "empty.txt", "binary.txt", "nothing")}


@pytest.mark.parametrize("with_tokenizer", [False, True], ids=["train-tokenizer", "given-tokenizer"])
def test_failed_data_runs_leave_nothing_in_the_cache(tmp_path, capsys, with_tokenizer):
    """`python -m llm train --data BAD`: exit 2 with the reason, and no cache folder left behind, whether it
    failed while training the tokenizer or while tokenising with a given one."""
    extra = []
    if with_tokenizer:
        from llm.tokenizer import Tokenizer

        Tokenizer.train(SMALL, 300).save(tmp_path / "tok.json")
        extra = ["--tokenizer", str(tmp_path / "tok.json")]
    for name, source in bad_sources(tmp_path).items():
        cache = tmp_path / "cache"
        code = train_mod.main(["--data", source, "--data-dir", str(cache), "--max-steps", "1", "--no-progress",
                               "--out-dir", str(tmp_path / "run"), *extra])
        err = capsys.readouterr().err
        assert code == 2, (name, err)
        assert "error:" in err, name
        assert files_under(cache) == [], (name, files_under(cache))
        assert not cache.exists(), name


def test_failed_runs_keep_what_earlier_runs_cached(tmp_path, capsys):
    """A failure removes only the folders it made: a cache that held another corpus keeps it whole."""
    good = tmp_path / "good.txt"
    good.write_text(SMALL)
    cache = tmp_path / "cache"
    folder, resolved = corpus_folder([str(good)], cache)
    tok = default_tokenizer(resolved, folder, 300, log=None)
    prepare_training_data([str(good)], tok, folder, 8, log=None)
    before = files_under(cache)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataSetupError, match="empty"):
        folder2, resolved2 = corpus_folder([str(tmp_path / "empty.txt")], cache)
        default_tokenizer(resolved2, folder2, 300, log=None)
    with pytest.raises(DataSetupError, match="empty"):
        prepare_training_data([str(tmp_path / "empty.txt")], tok, folder2, 8, log=None)
    assert files_under(cache) == before


def test_a_capped_tokenizer_is_cached_under_the_size_it_has(tmp_path):
    """A tiny corpus runs out of pairs long before 2048 tokens: the file says how many it holds, and a second
    run asking for 2048 (or any size above what the corpus allows) reuses it."""
    (tmp_path / "small.txt").write_text(SMALL)
    folder, resolved = corpus_folder([str(tmp_path / "small.txt")], tmp_path / "cache")
    logs = []
    tok = default_tokenizer(resolved, folder, 2048, log=logs.append)
    n = tok.n_vocab
    assert n < 2048
    names = [p.name for p in folder.glob("tokenizer-*")]
    assert names == [f"tokenizer-bpe{n}-gpt4-complete.json"], names
    assert f"{n} tokens" in logs[-1] and "2048" in logs[-1] and "ran out of pairs" in logs[-1]
    for asked in (2048, 4096, n):
        logs.clear()
        again = default_tokenizer(resolved, folder, asked, log=logs.append)
        assert again.mergeable_ranks == tok.mergeable_ranks
        assert "cached" in logs[-1], (asked, logs)
    smaller = default_tokenizer(resolved, folder, n - 10, log=None)  # below the cap: a tokenizer of its own
    assert smaller.n_vocab == n - 10
    assert sorted(p.name for p in folder.glob("tokenizer-*")) == sorted(
        [f"tokenizer-bpe{n}-gpt4-complete.json", f"tokenizer-bpe{n - 10}-gpt4.json"])


def test_a_full_size_tokenizer_keeps_its_plain_name(tmp_path):
    (tmp_path / "small.txt").write_text(SMALL)
    folder, resolved = corpus_folder([str(tmp_path / "small.txt")], tmp_path / "cache")
    tok = default_tokenizer(resolved, folder, 280, log=None)
    assert tok.n_vocab == 280
    assert [p.name for p in folder.glob("tokenizer-*")] == ["tokenizer-bpe280-gpt4.json"]
    assert (folder / "sources.json").exists()
    train_ds, _, data_dir = prepare_training_data([str(tmp_path / "small.txt")], tok, folder, 8, log=None)
    assert len(np.asarray(train_ds.tokens[:10])) == 10 and data_dir.parent == folder
