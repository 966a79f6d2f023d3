"""Tests for llm.data: sources, shards and meta.json, rebuild rules, TokenDataset, BatchSampler, eval batches."""

import gzip
import json
import math
import os

import numpy as np
import pytest

from llm.data import (
    BatchSampler,
    DatasetError,
    DatasetMismatchError,
    ShardedTokens,
    TokenDataset,
    build_dataset,
    default_corpus_documents,
    eval_batches,
    prepare,
    split_documents,
    token_dtype,
    tokenizer_sha256,
    unigram_entropy,
)
from llm.tokenizer import ENDOFTEXT, Tokenizer

WORDS = ("the quick brown fox jumps over the lazy dog while seven wizards quietly hex "
         "a jovial sphinx of black quartz and judge my vow ").split()


def make_text(seed, n_words):
    r = np.random.default_rng(seed)
    return " ".join(WORDS[i] for i in r.integers(0, len(WORDS), n_words)) + ".\n"


DOCS = [make_text(i, 40 + 7 * i) for i in range(12)]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train("".join(DOCS), vocab_size=300)


@pytest.fixture
def text_dir(tmp_path):
    d = tmp_path / "texts"
    (d / "sub").mkdir(parents=True)
    for i, doc in enumerate(DOCS[:6]):
        (d / f"a{i:02d}.txt").write_text(doc)
    for i, doc in enumerate(DOCS[6:]):
        (d / "sub" / f"b{i:02d}.md").write_text(doc)
    (d / "skip.bin").write_bytes(b"\xff\xfe not text")
    (d / ".hidden").mkdir()
    (d / ".hidden" / "x.txt").write_text("hidden text that must not be read")
    return d


def expected_stream(tok, docs):
    return [t for d in docs for t in tok.encode_ordinary(d) + [tok.eot_token]]


def all_tokens(out_dir):
    """train + val tokens of a token-fraction split, in stream order."""
    tr, va = TokenDataset(out_dir, "train"), TokenDataset(out_dir, "val")
    assert tr.meta["split_method"] == "tokens"
    return np.concatenate([np.asarray(tr.tokens[:len(tr)]), np.asarray(va.tokens[:len(va)])])


# ----------------------------------------------------------------------------------------------- sources


def test_text_file_round_trip_and_meta(tmp_path, tok):
    f = tmp_path / "one.txt"
    f.write_text(DOCS[0] + ENDOFTEXT + DOCS[1])  # a literal <|endoftext|> separates documents
    meta = build_dataset([f], tok, tmp_path / "ds", val_fraction=0.2, log=None)
    assert meta["documents"] == 2
    ids = all_tokens(tmp_path / "ds")
    assert ids.dtype == np.uint16
    assert ids.tolist() == expected_stream(tok, DOCS[:2])
    assert tok.decode(ids.tolist()) == DOCS[0] + ENDOFTEXT + DOCS[1] + ENDOFTEXT
    on_disk = json.loads((tmp_path / "ds" / "meta.json").read_text())
    assert on_disk["tokenizer"]["sha256"] == tokenizer_sha256(tok)
    assert on_disk["vocab_size"] == tok.n_vocab == 300
    assert on_disk["dtype"] == "uint16"
    for split in ("train", "val"):
        assert on_disk["splits"][split]["tokens"] == sum(s["tokens"] for s in on_disk["shards"][split]) > 0
    assert on_disk["tokens"] == len(ids)


def test_folder_recursive_with_extensions(tmp_path, tok, text_dir):
    build_dataset([text_dir], tok, tmp_path / "ds", val_fraction=0.0, log=None)
    tr = TokenDataset(tmp_path / "ds", "train")
    # sorted paths: a00..a05.txt, then sub/b00..b05.md; .bin and hidden folders skipped
    assert np.asarray(tr.tokens).tolist() == expected_stream(tok, DOCS)
    assert len(TokenDataset(tmp_path / "ds", "val")) == 0
    # only .md files
    build_dataset([text_dir], tok, tmp_path / "ds_md", val_fraction=0.0, extensions=[".md"], log=None)
    assert np.asarray(TokenDataset(tmp_path / "ds_md", "train").tokens).tolist() == expected_stream(tok, DOCS[6:])


def test_glob_source(tmp_path, tok, text_dir):
    build_dataset([str(text_dir / "**" / "b0[0-2].md")], tok, tmp_path / "ds", val_fraction=0.0, log=None)
    assert np.asarray(TokenDataset(tmp_path / "ds", "train").tokens).tolist() == expected_stream(tok, DOCS[6:9])
    with pytest.raises(DatasetError, match="matched no files"):
        build_dataset([str(text_dir / "*.nothing")], tok, tmp_path / "ds2", log=None)


def test_jsonl_and_gz_sources(tmp_path, tok):
    plain = tmp_path / "d.jsonl"
    plain.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" + ("\n" if i == 1 else "")
                             for i, d in enumerate(DOCS[:3])))
    packed = tmp_path / "d.jsonl.gz"
    with gzip.open(packed, "wt", encoding="utf-8") as f:
        for d in DOCS[3:5]:
            f.write(json.dumps({"body": d}) + "\n")
    build_dataset([plain, packed], tok, tmp_path / "ds", val_fraction=0.0, text_field="body", log=None)
    assert np.asarray(TokenDataset(tmp_path / "ds", "train").tokens).tolist() == expected_stream(tok, DOCS[:5])
    with pytest.raises(DatasetError, match=r"d\.jsonl, line 1: no 'text' field"):
        build_dataset([plain], tok, tmp_path / "ds2", log=None)  # default field "text"


def test_bad_jsonl_line_names_file_and_line(tmp_path, tok):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"txt": "no"}) + "\n")
    with pytest.raises(DatasetError, match=r"bad\.jsonl, line 2: no 'text' field"):
        build_dataset([f], tok, tmp_path / "ds", log=None)
    f.write_text(json.dumps({"text": "ok"}) + "\n\n{not json\n")
    with pytest.raises(DatasetError, match=r"bad\.jsonl, line 3: not valid JSON"):
        build_dataset([f], tok, tmp_path / "ds", log=None)
    f.write_text(json.dumps({"text": 5}) + "\n")
    with pytest.raises(DatasetError, match=r"line 1: field 'text' is a int"):
        build_dataset([f], tok, tmp_path / "ds", log=None)


def test_missing_source_and_empty_corpus(tmp_path, tok):
    with pytest.raises(DatasetError, match="data source not found: .*nope.txt"):
        build_dataset([tmp_path / "nope.txt"], tok, tmp_path / "ds", log=None)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DatasetError, match="corpus is empty"):
        build_dataset([tmp_path / "empty.txt"], tok, tmp_path / "ds", log=None)
    (tmp_path / "binary.txt").write_bytes(bytes(range(256)))
    with pytest.raises(DatasetError, match="binary.txt is not UTF-8 text"):
        build_dataset([tmp_path / "binary.txt"], tok, tmp_path / "ds", log=None)
    assert not (tmp_path / "ds").exists()  # a failed first build leaves no folder (no lock, no temporaries)


def test_a_failed_rebuild_keeps_the_folder_it_did_not_make(tmp_path, tok):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "notes.txt").write_text("mine")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DatasetError, match="corpus is empty"):
        build_dataset([tmp_path / "empty.txt"], tok, tmp_path / "ds", log=None)
    assert (tmp_path / "ds" / "notes.txt").read_text() == "mine"
    assert [p.name for p in (tmp_path / "ds").iterdir() if p.name.startswith(".tmp")] == []


def test_needs_eot_token(tmp_path, tok):
    (tmp_path / "a.txt").write_text(DOCS[0])
    no_eot = Tokenizer(tok.mergeable_ranks, {}, tok.pattern)
    with pytest.raises(DatasetError, match="no <\\|endoftext\\|>"):
        build_dataset([tmp_path / "a.txt"], no_eot, tmp_path / "ds", log=None)


# ----------------------------------------------------------------------------------------------- shards, dtype, split


def test_uint32_for_big_vocab(tmp_path, tok):
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    big = Tokenizer(tok.mergeable_ranks, {ENDOFTEXT: 70_000}, tok.pattern)  # n_vocab 70001
    (tmp_path / "a.txt").write_text(DOCS[0] + ENDOFTEXT + DOCS[1])
    build_dataset([tmp_path / "a.txt"], big, tmp_path / "ds", val_fraction=0.1, log=None)
    ids = all_tokens(tmp_path / "ds")
    assert ids.dtype == np.uint32
    assert TokenDataset(tmp_path / "ds", "train").vocab_size == 70_001
    assert ids.tolist() == expected_stream(big, DOCS[:2])
    assert (ids == 70_000).sum() == 2
    shard = json.loads((tmp_path / "ds" / "meta.json").read_text())["shards"]["train"][0]
    assert os.path.getsize(tmp_path / "ds" / shard["file"]) == 4 * shard["tokens"]


def test_many_shards_read_as_one(tmp_path, tok, text_dir):
    build_dataset([text_dir], tok, tmp_path / "one", val_fraction=0.0, log=None)
    build_dataset([text_dir], tok, tmp_path / "many", val_fraction=0.0, shard_tokens=37, log=None)
    one = TokenDataset(tmp_path / "one", "train")
    many = TokenDataset(tmp_path / "many", "train")
    assert isinstance(one.tokens, np.memmap)
    assert isinstance(many.tokens, ShardedTokens)
    assert len(many.meta["shards"]["train"]) == math.ceil(len(one) / 37)
    ref = np.asarray(one.tokens)
    assert len(many) == len(ref)
    assert np.array_equal(np.asarray(many.tokens), ref)
    for a, b in [(0, 5), (30, 80), (36, 37), (74, 200), (len(ref) - 3, len(ref) + 5), (10, 10)]:
        assert np.array_equal(many.tokens[a:b], ref[a:b])
    assert many.tokens[100] == ref[100] and many.tokens[-1] == ref[-1]
    s1 = BatchSampler(one, 4, 50, seed=3)
    s2 = BatchSampler(many, 4, 50, seed=3)
    for _ in range(3):
        assert all(np.array_equal(a, b) for a, b in zip(s1.next_batch(), s2.next_batch()))


def test_split_by_documents(tmp_path, tok, text_dir):
    meta = build_dataset([text_dir], tok, tmp_path / "ds", val_fraction=0.25, split_seed=1, log=None)
    assert meta["split_method"] == "documents"
    n_val, n_train = meta["splits"]["val"]["documents"], meta["splits"]["train"]["documents"]
    assert n_val >= 1 and n_val + n_train == len(DOCS)
    tr, va = TokenDataset(tmp_path / "ds", "train"), TokenDataset(tmp_path / "ds", "val")
    assert 0.25 <= len(va) / (len(tr) + len(va)) <= 0.5
    # every split is whole documents: it ends with <eot> and decodes to whole documents of DOCS
    for ds, n in ((tr, n_train), (va, n_val)):
        text = tok.decode(np.asarray(ds.tokens).tolist())
        pieces = text.split(ENDOFTEXT)
        assert pieces[-1] == "" and len(pieces) == n + 1
        assert all(p in DOCS for p in pieces[:-1])
    assert sorted(tok.decode(np.asarray(tr.tokens).tolist() + np.asarray(va.tokens).tolist())
                  .split(ENDOFTEXT)[:-1]) == sorted(DOCS)


def test_split_documents_rules():
    method, mask = split_documents(np.array([10] * 20), 0.1, seed=0)
    assert method == "documents" and mask.sum() == 2
    # one huge document would make validation 90%: fall back to the tail of the token stream
    for seed in range(10):
        method, how = split_documents(np.array([900, 50, 50]), 0.1, seed=seed)
        if method == "documents":
            assert np.array([900, 50, 50])[how].sum() <= 200
        else:
            assert how == 100
    assert split_documents(np.array([1000]), 0.1) == ("tokens", 100)
    assert split_documents(np.array([3]), 0.1) == ("tokens", 1)  # never empty while there are tokens
    assert split_documents(np.array([1000]), 0.0) == ("tokens", 0)


# ----------------------------------------------------------------------------------------------- reuse and rebuild


def test_reuse_skips_rebuild(tmp_path, tok, text_dir):
    out = tmp_path / "ds"
    prepare([text_dir], tok, out, log=None)
    files = sorted(out.glob("*.bin")) + [out / "meta.json"]
    before = {p: p.stat().st_mtime_ns for p in files}
    logs = []
    tr, va = prepare([text_dir], tok, out, log=logs.append)
    assert {p: p.stat().st_mtime_ns for p in files} == before
    assert "using the tokenised dataset" in logs[0]
    assert len(tr) > 0 and len(va) > 0


def test_rebuild_on_other_tokenizer_or_changed_source(tmp_path, tok, text_dir):
    out = tmp_path / "ds"
    prepare([text_dir], tok, out, log=None)
    other = Tokenizer.train("".join(DOCS[:3]), vocab_size=280)
    with pytest.raises(DatasetMismatchError, match="another tokenizer"):
        TokenDataset(out, "train", tokenizer=other)
    with pytest.raises(DatasetMismatchError, match="another tokenizer"):
        build_dataset([text_dir], other, out, rebuild="never", log=None)
    logs = []
    tr, _ = prepare([text_dir], other, out, val_fraction=0.0, log=logs.append)
    assert "another tokenizer" in logs[0]
    assert tr.meta["tokenizer"]["sha256"] == tokenizer_sha256(other) != tokenizer_sha256(tok)
    assert np.asarray(tr.tokens).tolist() == expected_stream(other, DOCS)
    assert sorted(p.name for p in out.glob("*.bin")) == ["train_000.bin", "val_000.bin"]
    # a changed source file rebuilds too
    (text_dir / "a00.txt").write_text(DOCS[0] + "more words at the end.\n")
    logs = []
    tr, _ = prepare([text_dir], other, out, val_fraction=0.0, log=logs.append)
    assert "sources changed" in logs[0]
    assert other.decode(np.asarray(tr.tokens).tolist()).startswith(DOCS[0] + "more words at the end.\n" + ENDOFTEXT)


def test_interrupted_rebuild_leaves_no_valid_looking_dataset(tmp_path, tok, text_dir, monkeypatch):
    import llm.data as data

    out = tmp_path / "ds"
    prepare([text_dir], tok, out, log=None)
    real = data._write_split

    def crash_on_val(name, *args):
        if name == "val":
            raise KeyboardInterrupt  # killed after the train shards were written
        return real(name, *args)

    monkeypatch.setattr(data, "_write_split", crash_on_val)
    other = Tokenizer.train("".join(DOCS[:3]), vocab_size=280)
    with pytest.raises(KeyboardInterrupt):
        prepare([text_dir], other, out, log=None)
    with pytest.raises(DatasetError, match="meta.json is missing"):
        TokenDataset(out, "train")
    assert [p.name for p in out.iterdir() if p.name.startswith(".tmp")] == []
    monkeypatch.setattr(data, "_write_split", real)
    tr, va = prepare([text_dir], other, out, log=None)
    assert tr.meta["tokenizer"]["sha256"] == tokenizer_sha256(other) and len(va) > 0


def test_foreign_meta_json_is_left_alone(tmp_path, tok, text_dir):
    out = tmp_path / "ds"
    out.mkdir()
    (out / "meta.json").write_text('{"something": "else"}')
    with pytest.raises(DatasetError, match="not a token dataset's metadata; choose another folder"):
        build_dataset([text_dir], tok, out, log=None)
    assert (out / "meta.json").read_text() == '{"something": "else"}'
    assert not list(out.glob("*.bin"))


def test_tokenizer_hash_is_canonical(tok, tmp_path):
    assert tokenizer_sha256(tok) == tokenizer_sha256(Tokenizer(tok.mergeable_ranks, tok.special_tokens, tok.pattern))
    tok.save(tmp_path / "t.json")
    assert tokenizer_sha256(Tokenizer.load(tmp_path / "t.json")) == tokenizer_sha256(tok)
    assert tokenizer_sha256(Tokenizer(tok.mergeable_ranks, tok.special_tokens, "gpt2")) != tokenizer_sha256(tok)


def test_truncated_shard_is_detected(tmp_path, tok, text_dir):
    out = tmp_path / "ds"
    prepare([text_dir], tok, out, log=None)
    shard = out / "train_000.bin"
    n = os.path.getsize(shard) // 2
    with open(shard, "r+b") as f:
        f.truncate(2 * (n - 10))
    with pytest.raises(DatasetError, match=rf"train_000\.bin is truncated: expected {n} tokens, found {n - 10}; "
                                           rf"delete .* to rebuild"):
        TokenDataset(out, "train")
    # prepare repairs it
    tr, _ = prepare([text_dir], tok, out, log=None)
    assert len(tr) == n
    (out / "meta.json").unlink()
    with pytest.raises(DatasetError, match="meta.json is missing"):
        TokenDataset(out, "val")


# ----------------------------------------------------------------------------------------------- batches


@pytest.fixture
def train_ds(tmp_path, tok, text_dir):
    tr, _ = prepare([text_dir], tok, tmp_path / "ds", log=None)
    return tr


def test_batch_sampler_shapes_shift_and_determinism(train_ds):
    s = BatchSampler(train_ds, batch_size=6, block_size=16, seed=7)
    x, y = s.next_batch()
    assert x.shape == y.shape == (6, 16) and x.dtype == y.dtype == np.int64
    assert np.array_equal(x[:, 1:], y[:, :-1])
    ref = np.asarray(train_ds.tokens).astype(np.int64)
    for row_x, row_y in zip(x, y):  # each row is a real window of the data
        starts = [i for i in range(len(ref) - 16) if np.array_equal(ref[i:i + 16], row_x)]
        assert any(np.array_equal(ref[i + 1:i + 17], row_y) for i in starts)
    x2, _ = BatchSampler(train_ds, 6, 16, seed=7).next_batch()
    x3, _ = BatchSampler(train_ds, 6, 16, seed=8).next_batch()
    assert np.array_equal(x, x2) and not np.array_equal(x, x3)
    assert not np.array_equal(x, s.next_batch()[0])


def test_batch_sampler_state_round_trip(train_ds):
    s = BatchSampler(train_ds, 4, 8, seed=11)
    for _ in range(3):
        s.next_batch()
    state = s.state_dict()
    assert state == {"seed": 11, "step": 3}
    after = [s.next_batch() for _ in range(2)]
    r = BatchSampler(train_ds, 4, 8, seed=0)
    r.load_state_dict(json.loads(json.dumps(state)))
    again = [r.next_batch() for _ in range(2)]
    for (xa, ya), (xb, yb) in zip(after, again):
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
    with pytest.raises(ValueError, match="'seed' and 'step'"):
        r.load_state_dict({"step": 1})


def test_rank_sharding_matches_global_batch(train_ds):
    glob = BatchSampler(train_ds, 8, 12, seed=5)
    ranks = [BatchSampler(train_ds, 8, 12, seed=5, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        gx, gy = glob.next_batch()
        parts = [rk.next_batch() for rk in ranks]
        assert all(p[0].shape == (4, 12) for p in parts)
        assert np.array_equal(np.concatenate([p[0] for p in parts]), gx)
        assert np.array_equal(np.concatenate([p[1] for p in parts]), gy)
    with pytest.raises(ValueError, match="batch_size 6 .* not divisible by world_size 4"):
        BatchSampler(train_ds, 6, 12, seed=5, rank=0, world_size=4)
    with pytest.raises(ValueError, match="rank 2 is not below world_size 2"):
        BatchSampler(train_ds, 8, 12, rank=2, world_size=2)


def test_eval_batches_cover_non_overlapping_windows(train_ds):
    T, B = 10, 3
    ref = np.asarray(train_ds.tokens).astype(np.int64)
    batches = list(eval_batches(train_ds, B, T))
    n_windows = (len(ref) - 1) // T
    xs = np.concatenate([x for x, _ in batches])
    ys = np.concatenate([y for _, y in batches])
    assert len(batches) == math.ceil(n_windows / B) and xs.shape == (n_windows, T)
    assert np.array_equal(xs.reshape(-1), ref[:n_windows * T])
    assert np.array_equal(ys.reshape(-1), ref[1:n_windows * T + 1])
    assert len(list(eval_batches(train_ds, B, T, max_batches=2))) == 2
    again = next(iter(eval_batches(train_ds, B, T)))
    assert np.array_equal(again[0], batches[0][0])


def test_split_too_short_for_block(tmp_path, tok):
    (tmp_path / "a.txt").write_text(DOCS[0])
    tr, va = prepare([tmp_path / "a.txt"], tok, tmp_path / "ds", val_fraction=0.1, log=None)
    n = len(va)
    with pytest.raises(DatasetError, match=rf"^validation split has {n} tokens, fewer than block_size \+ 1 = 65; "
                                           "use a smaller --block-size or more data$"):
        prepare([tmp_path / "a.txt"], tok, tmp_path / "ds", val_fraction=0.1, block_size=64, log=None)
    with pytest.raises(DatasetError, match=rf"training split has {len(tr)} tokens"):
        BatchSampler(tr, 2, len(tr), seed=0)
    BatchSampler(tr, 2, len(tr) - 1, seed=0).next_batch()  # exactly block_size + 1 tokens is enough


def test_unigram_entropy(train_ds):
    ref = np.asarray(train_ds.tokens)
    _, counts = np.unique(ref, return_counts=True)
    p = counts / counts.sum()
    want = float(-(p * np.log(p)).sum())
    assert unigram_entropy(train_ds) == pytest.approx(want, rel=1e-12)
    assert unigram_entropy(train_ds, chunk=7) == pytest.approx(want, rel=1e-12)
    assert 0 < want < math.log(train_ds.vocab_size)
    assert unigram_entropy(np.array([3, 3, 3, 3])) == 0.0
    assert unigram_entropy(np.array([0, 1, 0, 1])) == pytest.approx(math.log(2))
    # a plain array (no vocab_size) read in chunks whose largest id grows from chunk to chunk
    assert unigram_entropy(np.array([0, 0, 1, 1, 5, 5, 9, 9]), chunk=2) == pytest.approx(math.log(4))


# ----------------------------------------------------------------------------------------------- default corpus


def test_default_corpus_documents_split_per_play():
    from llm.corpus import Corpus

    play = "{}\n\nby William Shakespeare\n\n\nACT I.\nSome lines.\n\n"
    sonnets = "THE SONNETS\nby William Shakespeare\n\nI\nFrom fairest creatures we desire increase,\n\n"
    text = "\n" + play.format("HAMLET") + play.format("MACBETH") + sonnets + play.format("THE TEMPEST")
    docs = default_corpus_documents(Corpus("shakespeare", text, "test"))
    assert [d.strip().split("\n")[0] for d in docs] == ["HAMLET", "MACBETH", "THE SONNETS", "THE TEMPEST"]
    assert "".join(docs) == text
    assert default_corpus_documents(Corpus("python-stdlib", "import os\n", "test")) == ["import os\n"]


def _check_default_source(tmp_path, tok, corpus, max_bytes):
    train, val = prepare(["default"], tok, tmp_path / "ds", default_max_bytes=max_bytes, block_size=32, log=None)
    ids = np.concatenate([np.asarray(train.tokens), np.asarray(val.tokens)])
    assert sorted(tok.decode(ids.tolist()).split(ENDOFTEXT)[:-1]) == sorted(default_corpus_documents(corpus))
    assert train.meta["sources"]["items"][0]["corpus"] == corpus.name
    x, y = BatchSampler(train, 2, 32, seed=0).next_batch()
    assert np.array_equal(x[:, 1:], y[:, :-1])


def test_default_corpus_shakespeare(tmp_path, tok):
    from llm import corpus as corpus_mod

    if not (corpus_mod.cache_dir() / corpus_mod._SHAKESPEARE_CACHE_NAME).is_file():
        pytest.skip("the Shakespeare corpus is not cached (the first use downloads it); the fallback is tested below")
    corpus = corpus_mod.default_corpus(200_000)
    assert corpus.name == "shakespeare"
    assert len(default_corpus_documents(corpus)) == 2  # 200 kB: All's Well (~130 kB) and the start of the next play
    _check_default_source(tmp_path, tok, corpus, 200_000)


def test_default_corpus_offline_fallback(tmp_path, tok, monkeypatch):
    from llm import corpus as corpus_mod

    def offline(*args, **kwargs):
        raise corpus_mod.CorpusUnavailable("offline (test)")

    monkeypatch.setattr(corpus_mod, "shakespeare_text", offline)
    with pytest.warns(UserWarning, match="standard library"):
        corpus = corpus_mod.default_corpus(60_000)
    assert corpus.name == "python-stdlib"
    with pytest.warns(UserWarning, match="standard library"):
        _check_default_source(tmp_path, tok, corpus, 60_000)
