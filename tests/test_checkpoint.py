"""safetensors reading/writing (format conformance, validation, interop) and atomic, verified checkpoints."""

import json
import os
import struct

import numpy as np
import pytest

from autograd.backend import to_device
from llm import checkpoint as ck
from llm import safetensors as st
from llm.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint, save_model
from llm.model import GPT, GPTConfig
from llm.tokenizer import Tokenizer


def raw_file(header: dict | str, data: bytes, pad: bool = True) -> bytes:
    """A safetensors file built by hand from the format's definition."""
    text = header if isinstance(header, str) else json.dumps(header, separators=(",", ":"))
    b = text.encode("utf-8")
    if pad:
        b += b" " * (-len(b) % 8)
    return struct.pack("<Q", len(b)) + b + data


ALL_DTYPES = {
    "f16": np.array([1.5, -2.0], np.float16), "f32": np.arange(6, dtype=np.float32).reshape(2, 3) / 7,
    "f64": np.array([np.pi, -np.e, 1e300]), "i8": np.array([-128, 127], np.int8),
    "i16": np.array([-3, 300], np.int16), "i32": np.array([[-7], [2 ** 31 - 1]], np.int32),
    "i64": np.array([-(2 ** 62), 5], np.int64), "u8": np.arange(256, dtype=np.uint8),
    "u16": np.array([65535, 1], np.uint16), "u32": np.array([2 ** 32 - 1], np.uint32),
    "u64": np.array([2 ** 64 - 1], np.uint64), "bool": np.array([[True, False, True]]),
    "scalar": np.array(3.25, np.float32), "empty": np.zeros((0, 4), np.float32),
}


# ---------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------


def test_hand_built_file_reads_and_our_writer_matches_byte_for_byte(tmp_path):
    # by the format's definition: 8-byte little-endian header length, JSON header, raw little-endian data;
    # I64 (wider dtype) laid out before F32, compact JSON, __metadata__ first, padded to 8 bytes
    header = ('{"__metadata__":{"k":"v"},"b":{"dtype":"I64","shape":[1],"data_offsets":[0,8]},'
              '"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}')
    data = struct.pack("<q", -7) + struct.pack("<2f", 1.5, -2.0)
    blob = raw_file(header, data)
    assert len(blob) % 8 == 0 and blob[8:9] == b"{"
    tensors, meta = st.load(blob, with_metadata=True)
    assert meta == {"k": "v"}
    assert tensors["b"].dtype == np.int64 and tensors["b"].tolist() == [-7]
    assert tensors["a"].dtype == np.float32 and tensors["a"].tolist() == [1.5, -2.0]
    ours = st.save({"a": np.array([1.5, -2.0], np.float32), "b": np.array([-7])}, {"k": "v"})
    assert ours == blob
    path = tmp_path / "x.safetensors"
    path.write_bytes(blob)
    assert st.load_file(path)["a"].tolist() == [1.5, -2.0]
    assert st.read_header(path) == ({"k": "v"}, {"b": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]},
                                                 "a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}})


@pytest.mark.parametrize("mmap", [False, True])
def test_round_trip_every_dtype(tmp_path, mmap):
    tensors = dict(ALL_DTYPES)
    tensors["strided"] = np.arange(20.0).reshape(4, 5)[:, ::2]  # non-contiguous
    tensors["transposed"] = np.arange(6, dtype=np.float32).reshape(2, 3).T
    tensors["big_endian"] = np.array([1.0, 2.0], dtype=">f4")
    path = tmp_path / "all.safetensors"
    st.save_file(tensors, path, metadata={"note": "ünïcode ok", "n": "3"})
    back, meta = st.load_file(path, mmap=mmap, with_metadata=True)
    assert meta == {"note": "ünïcode ok", "n": "3"}
    assert set(back) == set(tensors)
    for name, a in tensors.items():
        assert back[name].shape == a.shape
        assert back[name].dtype == a.dtype.newbyteorder("=") or back[name].dtype.str.lstrip("<|") == \
            a.dtype.newbyteorder("<").str.lstrip("<|"), name
        np.testing.assert_array_equal(back[name], a)
    assert st.load(st.save(tensors)).keys() == back.keys()
    # every tensor starts 8-byte aligned after the header (the header is padded)
    _, index = st.read_header(path)
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert (8 + n) % 8 == 0 and index["f64"]["data_offsets"][0] % 8 == 0


def test_writer_rejects_bad_input():
    with pytest.raises(st.SafetensorsError, match="complex128"):
        st.save({"c": np.array([1j])})
    with pytest.raises(st.SafetensorsError, match="NumPy array"):
        st.save({"l": [1, 2]})
    with pytest.raises(st.SafetensorsError, match="reserved"):
        st.save({"__metadata__": np.zeros(1)})
    with pytest.raises(st.SafetensorsError, match="str -> str"):
        st.save({"a": np.zeros(1)}, metadata={"step": 3})


GOOD = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}


@pytest.mark.parametrize("blob, pattern", [
    (b"\x05\x00", "too short"),
    (struct.pack("<Q", 10 ** 6) + b"{}", "header length field says 1000000"),
    (raw_file("not json at all!", b""), "does not start with"),
    (raw_file('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]', b"\0" * 8), "not valid JSON"),
    (raw_file(GOOD, b"\0" * 4), "truncated"),
    (raw_file(GOOD, b"\0" * 12), "4 extra bytes"),
    (raw_file({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8), "need 12"),
    (raw_file({"a": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8), "unknown dtype 'Q7'"),
    (raw_file({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8), "non-negative"),
    (raw_file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8), "begin <= end"),
    (raw_file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
               "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8), "overlaps"),
    (raw_file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8), "gap of 4 bytes"),
    (raw_file('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],'
              '"data_offsets":[4,8]}}', b"\0" * 8), "names 'a' twice"),
    (raw_file({"__metadata__": {"k": 1}}, b""), "string values"),
    (raw_file({"a": {"dtype": "F32", "shape": [1]}}, b""), "entry must be"),
    (raw_file(b"{\xff}".decode("latin-1"), b""), "not valid"),
])
def test_reader_validates_everything(blob, pattern, tmp_path):
    with pytest.raises(st.SafetensorsError, match=pattern):
        st.load(blob)
    path = tmp_path / "bad.safetensors"
    path.write_bytes(blob)
    with pytest.raises(st.SafetensorsError, match=str(path).replace("\\", "\\\\")):
        st.load_file(path)


def test_empty_file_and_zero_tensor_files():
    blob = st.save({})
    assert st.load(blob) == {}
    assert raw_file({}, b"") == blob


def test_bf16_is_refused_unless_asked():
    bits = np.array([0x3F80, 0xC020, 0x0000], np.uint16)  # bfloat16 of 1.0, -2.5, 0.0
    blob = raw_file({"w": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]}}, bits.tobytes() + b"")
    with pytest.raises(st.SafetensorsError, match="bfloat16.*bf16='float32'"):
        st.load(blob)
    assert st.load(blob, bf16="float32")["w"].tolist() == [1.0, -2.5, 0.0]
    raw = st.load(blob, bf16="uint16")["w"]
    assert raw.dtype == np.uint16 and raw.tolist() == bits.tolist()


def test_interop_with_the_reference_safetensors_package(tmp_path):
    ref = pytest.importorskip("safetensors.numpy")
    tensors = {k: v for k, v in ALL_DTYPES.items()}
    # byte-identical to the reference writer, without metadata and with one key (it writes several
    # metadata keys in hash-map order, which varies from run to run)
    assert st.save(tensors) == ref.save(tensors)
    assert st.save(tensors, {"format": "pt"}) == ref.save(tensors, metadata={"format": "pt"})
    meta = {"format": "pt", "a": "ü", "z": "1"}
    # each reads the other's files
    path = tmp_path / "ours.safetensors"
    st.save_file(tensors, path, meta)
    theirs = ref.load_file(str(path))
    for name, a in tensors.items():
        assert theirs[name].dtype == a.dtype and theirs[name].shape == a.shape
        np.testing.assert_array_equal(theirs[name], a)
    path2 = tmp_path / "theirs.safetensors"
    ref.save_file(tensors, str(path2), metadata=meta)
    ours, m = st.load_file(path2, with_metadata=True)
    assert m == meta
    for name, a in tensors.items():
        np.testing.assert_array_equal(ours[name], a)


# ---------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------


def sample_tensors():
    rng = np.random.default_rng(0)
    return {"w": rng.standard_normal((8, 16)).astype(np.float32), "step_ids": np.arange(5),
            "half": rng.standard_normal(7).astype(np.float16)}


def test_checkpoint_round_trip_and_metadata(tmp_path):
    path = tmp_path / "run" / "ckpt.safetensors"  # the folder is created
    meta = {"step": 12, "lr": 3e-4, "rng": {"state": [1, 2, 3]}, "name": "x", "none": None, "nan": float("nan")}
    save_checkpoint(path, sample_tensors(), meta)
    tensors, back = load_checkpoint(path)
    for k, v in sample_tensors().items():
        assert tensors[k].dtype == v.dtype
        np.testing.assert_array_equal(tensors[k], v)
    assert {k: back[k] for k in ("step", "lr", "rng", "name", "none")} == {k: meta[k] for k in
                                                                           ("step", "lr", "rng", "name", "none")}
    assert np.isnan(back["nan"])
    assert ck.CHECKSUM_KEY not in back and ck.HEADER_CHECKSUM_KEY not in back
    assert os.listdir(path.parent) == ["ckpt.safetensors"]  # no temporary file left
    # it is a plain safetensors file with string metadata
    raw_meta, _ = st.read_header(path)
    assert json.loads(raw_meta["step"]) == 12 and len(raw_meta[ck.CHECKSUM_KEY]) == 64


def test_checkpoint_metadata_must_be_json():
    with pytest.raises(TypeError, match="'arr'.*JSON"):
        save_checkpoint("/nonexistent/never-written", {}, {"arr": np.zeros(2)})
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint("/nonexistent/never-written", {}, {ck.CHECKSUM_KEY: "x"})


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, sample_tensors(), {"step": 1})
    before = path.read_bytes()

    def crash(f, tensors, metadata=None):
        f.write(b"partial garbage")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(st, "write", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"w": np.ones(3)}, {"step": 2})
    assert path.read_bytes() == before  # the old checkpoint is intact
    assert os.listdir(tmp_path) == ["ckpt.safetensors"]  # and the temporary file is gone


def test_checkpoint_overwrite_replaces(tmp_path):
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, {"a": np.zeros(3)}, {"step": 1})
    save_checkpoint(path, {"b": np.ones(2)}, {"step": 2})
    tensors, meta = load_checkpoint(path)
    assert list(tensors) == ["b"] and meta["step"] == 2


def _data_start(path):
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    return 8 + n


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, pattern", [
    ("missing", "does not exist"),
    ("truncated", "truncated"),
    ("flipped_data", "SHA-256"),
    ("flipped_last_byte", "SHA-256"),
    ("garbage_header", "corrupt"),
    ("flipped_metadata", "header checksum"),
    ("empty", "too short"),
    ("folder", "folder"),
])
def test_corruption_is_detected(tmp_path, damage, pattern):
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, sample_tensors(), {"step": 1234})
    if damage == "missing":
        path.unlink()
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:-10])
    elif damage == "flipped_data":
        _flip(path, _data_start(path) + 40)
    elif damage == "flipped_last_byte":
        _flip(path, len(path.read_bytes()) - 1)
    elif damage == "garbage_header":
        data = bytearray(path.read_bytes())
        data[8:40] = os.urandom(32)
        path.write_bytes(bytes(data))
    elif damage == "flipped_metadata":
        data = path.read_bytes()
        i = data.index(b'"step":"1234"')
        path.write_bytes(data[:i] + b'"step":"1235"' + data[i + 13:])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "folder":
        path.unlink()
        path.mkdir()
    with pytest.raises(CheckpointError, match=pattern) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_verify_false_skips_the_checksum(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, {"w": np.zeros(16, np.float32)}, {})
    _flip(path, _data_start(path) + 3)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    tensors, _ = load_checkpoint(path, verify=False)
    assert tensors["w"][0] != 0


# ---------------------------------------------------------------------------
# models in checkpoints
# ---------------------------------------------------------------------------


def make_tokenizer(vocab_size):
    text = "".join(chr(97 + (i * i + 3 * i) % 26) + (" " if i % 7 == 0 else "") for i in range(4000))
    tok = Tokenizer.train(text, vocab_size=vocab_size)
    assert tok.n_vocab == vocab_size
    return tok


def small_config(**kw):
    base = dict(vocab_size=280, block_size=16, n_layer=2, n_head=2, n_embd=16)
    base.update(kw)
    return GPTConfig(**base)


def test_save_and_load_model_round_trip(tmp_path, xp):
    tok = make_tokenizer(280)
    model = GPT(small_config(), generator=np.random.default_rng(3))
    if xp is not np:
        model.to("cuda")
    ids = np.random.default_rng(0).integers(0, 280, (2, 10))
    expected = to_device(model(ids)[0].data, "cpu")
    path = tmp_path / "m.safetensors"
    extra = {"optim.exp_avg.wte.weight": np.ones((280, 16), np.float32)}
    save_model(path, model, tokenizer=tok, extra_tensors=extra, extra_metadata={"step": 7, "data": {"pos": 3}})
    device = "cpu" if xp is np else "cuda"
    loaded, tok2, meta = load_model(path, device=device)
    assert loaded.device == device and loaded.config == model.config
    np.testing.assert_array_equal(to_device(loaded(ids)[0].data, "cpu"), expected)
    assert tok2.encode("the cat sat") == tok.encode("the cat sat") and tok2.n_vocab == tok.n_vocab
    assert tok2.mergeable_ranks == tok.mergeable_ranks and tok2.special_tokens == tok.special_tokens
    assert meta["step"] == 7 and meta["data"] == {"pos": 3} and meta["format"] == ck.FORMAT
    assert meta["config"]["n_embd"] == 16
    tensors, _ = load_checkpoint(path)
    np.testing.assert_array_equal(tensors["optim.exp_avg.wte.weight"], extra["optim.exp_avg.wte.weight"])
    assert "model.h.1.mlp.c_proj.bias" in tensors


def test_untied_float16_llama_round_trip(tmp_path):
    config = GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=4, n_kv_head=2, n_embd=16, mlp="swiglu",
                       norm="rmsnorm", pos="rope", bias=False, tie_embeddings=False, mlp_hidden_dim=24)
    model = GPT(config, generator=np.random.default_rng(0), dtype=np.float16)
    path = tmp_path / "m.safetensors"
    save_model(path, model)
    loaded, tok, _ = load_model(path)
    assert tok is None and loaded.wte.weight.dtype == np.float16
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), loaded.named_parameters()):
        assert n1 == n2
        np.testing.assert_array_equal(p1.data, p2.data)


def test_tokenizer_vocab_must_match(tmp_path):
    tok = make_tokenizer(270)
    model = GPT(small_config(), generator=np.random.default_rng(0))
    with pytest.raises(CheckpointError, match="n_vocab=270.*vocab_size is 280"):
        save_model(tmp_path / "m.safetensors", model, tokenizer=tok)
    # a checkpoint put together by hand with a mismatching tokenizer is refused on load
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    meta = {"format": ck.FORMAT, "config": {**model.config.__dict__}, "tokenizer": ck.tokenizer_to_json(tok)}
    save_checkpoint(tmp_path / "h.safetensors", tensors, meta)
    with pytest.raises(CheckpointError, match="n_vocab=270"):
        load_model(tmp_path / "h.safetensors")


def test_config_and_tensors_mismatch_lists_the_keys(tmp_path):
    model = GPT(small_config(), generator=np.random.default_rng(0))
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    bigger = dict(model.config.__dict__, n_layer=3)
    save_checkpoint(tmp_path / "a.safetensors", tensors, {"format": ck.FORMAT, "config": bigger, "tokenizer": None})
    with pytest.raises(CheckpointError, match=r"missing keys.*h\.2\.ln_1\.weight") as info:
        load_model(tmp_path / "a.safetensors")
    assert str(tmp_path / "a.safetensors") in str(info.value)
    wider = dict(model.config.__dict__, n_embd=32)
    save_checkpoint(tmp_path / "b.safetensors", tensors, {"format": ck.FORMAT, "config": wider, "tokenizer": None})
    with pytest.raises(CheckpointError, match=r"wrongly shaped.*wte\.weight"):
        load_model(tmp_path / "b.safetensors")
    save_checkpoint(tmp_path / "c.safetensors", tensors, {"step": 1})
    with pytest.raises(CheckpointError, match="not a model checkpoint"):
        load_model(tmp_path / "c.safetensors")
    save_checkpoint(tmp_path / "d.safetensors", tensors,
                    {"format": ck.FORMAT, "config": dict(bigger, n_experts=4), "tokenizer": None})
    with pytest.raises(CheckpointError, match="n_experts"):
        load_model(tmp_path / "d.safetensors")


def test_save_model_name_collisions(tmp_path):
    model = GPT(small_config(n_layer=1), generator=np.random.default_rng(0))
    with pytest.raises(ValueError, match="collides"):
        save_model(tmp_path / "m.safetensors", model, extra_tensors={"model.wte.weight": np.zeros(1)})
    with pytest.raises(ValueError, match="reserved"):
        save_model(tmp_path / "m.safetensors", model, extra_metadata={"config": {}})
