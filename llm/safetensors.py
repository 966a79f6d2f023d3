"""The safetensors file format, read and written with NumPy only (no pickle, nothing executed).

The format (https://github.com/huggingface/safetensors), byte by byte::

    8 bytes        N, the header's length: an unsigned 64-bit little-endian integer
    N bytes        the header: a UTF-8 JSON object, starting with "{", possibly padded
                   with trailing spaces (0x20)
    the rest       the data buffer: every tensor's raw little-endian bytes, C order

The header maps each tensor name to
``{"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}``, offsets in
bytes relative to the start of the data buffer, ``end - begin`` being exactly
``itemsize * prod(shape)``; the tensors must cover the buffer with no gap and
no overlap. An optional ``"__metadata__"`` entry maps strings to strings.

What this writer does, as the reference (Rust) writer does, so that our files
are byte-identical to its files for the same tensors: tensors are laid out by
dtype, widest first (in the reference's dtype order), then by name; the header
is compact JSON (``"__metadata__"`` first, then the tensors in layout order,
each ``dtype``, ``shape``, ``data_offsets``), padded with spaces to a multiple
of 8 bytes so every tensor starts 8-byte aligned. (Metadata keys are written
sorted; the reference writes them in hash-map order, so with two or more
metadata keys the bytes can differ in that order only.)

Reading validates everything before it trusts it: the length field, the JSON,
every entry's dtype, shape and offsets, that sizes match dtype and shape, and
that the offsets tile the data buffer exactly. Any problem raises
``SafetensorsError`` naming the file and the problem.

dtypes: F16, F32, F64, I8, I16, I32, I64, U8, U16, U32, U64, BOOL. BF16 has
no NumPy dtype: reading one raises an error unless ``bf16="float32"`` (exact
conversion: a bfloat16 is the top half of a float32) or ``bf16="uint16"``
(the raw bits) is passed; writing accepts ``ml_dtypes.bfloat16`` arrays.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct

import numpy as np

#: safetensors dtype name -> NumPy dtype (little-endian)
DTYPES = {
    "F16": np.dtype("<f2"), "F32": np.dtype("<f4"), "F64": np.dtype("<f8"),
    "I8": np.dtype("i1"), "I16": np.dtype("<i2"), "I32": np.dtype("<i4"), "I64": np.dtype("<i8"),
    "U8": np.dtype("u1"), "U16": np.dtype("<u2"), "U32": np.dtype("<u4"), "U64": np.dtype("<u8"),
    "BOOL": np.dtype("?"),
}
_ITEMSIZE = {**{k: v.itemsize for k, v in DTYPES.items()}, "BF16": 2}
# the reference implementation's dtype order (its enum's declaration order); tensors are laid out by
# dtype in descending order of this rank, then by name
_RANK = {name: i for i, name in enumerate(
    ["BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64"])}
# other dtypes of the format that this module does not convert (reported by name when met)
_UNSUPPORTED = ("F8_E5M2", "F8_E4M3", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "C64")

#: the reference implementation refuses headers larger than this
MAX_HEADER_BYTES = 100_000_000
_BF16_MODES = ("error", "float32", "uint16")


class SafetensorsError(ValueError):
    """A safetensors file (or bytes) is malformed, or a tensor cannot be written; the message says what and where."""


# ---------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------


def _dtype_name(a: np.ndarray, name: str) -> str:
    dt = a.dtype
    if dt.name == "bfloat16":  # ml_dtypes.bfloat16
        return "BF16"
    for key, ref in DTYPES.items():
        if dt.kind == ref.kind and dt.itemsize == ref.itemsize:
            return key
    raise SafetensorsError(f"tensor {name!r} has dtype {dt}, which safetensors cannot store; "
                           f"use one of {', '.join(DTYPES)} (cast first, e.g. a.astype(np.float32))")


def _prepare(tensors: dict, metadata: dict | None):
    """Check the inputs; return ``(header bytes incl. the 8-byte length, [(name, little-endian C array)])``."""
    if not hasattr(tensors, "items"):
        raise TypeError(f"safetensors: tensors must be a dict name -> array, got {type(tensors).__name__}")
    entries = []
    for name, a in tensors.items():
        if not isinstance(name, str) or not name:
            raise SafetensorsError(f"tensor names must be non-empty strings, got {name!r}")
        if name == "__metadata__":
            raise SafetensorsError('"__metadata__" is reserved for the metadata; rename that tensor')
        if not isinstance(a, np.ndarray):
            raise SafetensorsError(f"tensor {name!r} is a {type(a).__name__}, not a NumPy array; "
                                   "move it to the CPU first (autograd.backend.to_device(a, 'cpu'))")
        dname = _dtype_name(a, name)
        if not a.flags.c_contiguous:
            a = a.copy(order="C")  # (np.ascontiguousarray would turn a 0-d array into 1-d)
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        entries.append((name, dname, a))
    entries.sort(key=lambda e: (-_RANK[e[1]], e[0]))
    header = {}
    if metadata is not None:
        if not hasattr(metadata, "items") or not all(isinstance(k, str) and isinstance(v, str)
                                                     for k, v in metadata.items()):
            raise SafetensorsError("safetensors metadata must be a dict of str -> str "
                                   "(encode other values yourself, e.g. with json.dumps)")
        header["__metadata__"] = {k: metadata[k] for k in sorted(metadata)}
    offset = 0
    for name, dname, a in entries:
        header[name] = {"dtype": dname, "shape": [int(n) for n in a.shape], "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, [(name, a) for name, _, a in entries]


def _bytes_of(a: np.ndarray):
    """The raw bytes of a C-contiguous array, without a copy."""
    return memoryview(a.reshape(-1).view(np.uint8))


def layout(tensors: dict) -> dict:
    """``{name: {"dtype", "shape", "data_offsets"}}`` as ``save`` would write it (``read_header``'s form)."""
    head, _ = _prepare(tensors, None)
    header = json.loads(head[8:].decode("utf-8"))
    return {name: header[name] for name in header}


def data_sha256(tensors: dict) -> str:
    """The hex SHA-256 of the data buffer that ``save`` would write for ``tensors`` (no file is written)."""
    _, ordered = _prepare(tensors, None)
    h = hashlib.sha256()
    for _, a in ordered:
        h.update(_bytes_of(a))
    return h.hexdigest()


def write(f, tensors: dict, metadata: dict | None = None) -> int:
    """Write ``tensors`` (name -> NumPy array) and ``metadata`` (str -> str) to the binary file object ``f``.

    Returns the number of bytes written.
    """
    head, ordered = _prepare(tensors, metadata)
    f.write(head)
    n = len(head)
    for _, a in ordered:
        if a.nbytes:
            f.write(_bytes_of(a))
        n += a.nbytes
    return n


def save(tensors: dict, metadata: dict | None = None) -> bytes:
    """The safetensors bytes of ``tensors`` and ``metadata`` (in memory)."""
    import io

    buf = io.BytesIO()
    write(buf, tensors, metadata)
    return buf.getvalue()


def save_file(tensors: dict, path, metadata: dict | None = None) -> None:
    """Write ``tensors`` and ``metadata`` to ``path`` (not atomically: ``llm.checkpoint`` adds that)."""
    with open(path, "wb") as f:
        write(f, tensors, metadata)


# ---------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------


def _parse_header(raw: bytes, data_len: int, where: str):
    """Validate the header bytes; return ``(metadata, [(name, dtype name, shape, begin, end)] in offset order)``."""

    def bad(msg):
        return SafetensorsError(f"{where}: {msg}")

    if not raw.startswith(b"{"):
        raise bad("the header does not start with '{': this is not a safetensors file (or it is corrupt)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad(f"the header is not valid UTF-8 ({e}); the file is corrupt") from None

    def no_duplicates(pairs):
        d = {}
        for k, v in pairs:
            if k in d:
                raise bad(f"the header names {k!r} twice")
            d[k] = v
        return d

    try:
        header = json.loads(text.rstrip(" "), object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as e:
        raise bad(f"the header is not valid JSON ({e}); the file is corrupt or truncated") from None
    if not isinstance(header, dict):
        raise bad("the header must be a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and (not isinstance(metadata, dict)
                                 or not all(isinstance(v, str) for v in metadata.values())):
        raise bad('"__metadata__" must be an object of string values')
    entries = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"tensor {name!r}: entry must be {{dtype, shape, data_offsets}}, got {info!r}")
        dname, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if dname not in _ITEMSIZE:
            extra = " (a dtype this reader does not convert)" if dname in _UNSUPPORTED else ""
            raise bad(f"tensor {name!r}: unknown dtype {dname!r}{extra}; supported: {', '.join(_ITEMSIZE)}")
        if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
            raise bad(f"tensor {name!r}: shape must be a list of non-negative integers, got {shape!r}")
        if (not isinstance(offs, list) or len(offs) != 2 or not all(type(o) is int for o in offs)
                or not 0 <= offs[0] <= offs[1]):
            raise bad(f"tensor {name!r}: data_offsets must be [begin, end] with 0 <= begin <= end, got {offs!r}")
        nbytes = _ITEMSIZE[dname] * math.prod(shape)
        if offs[1] - offs[0] != nbytes:
            raise bad(f"tensor {name!r}: data_offsets {offs} span {offs[1] - offs[0]} bytes, but dtype {dname} "
                      f"and shape {shape} need {nbytes}")
        entries.append((name, dname, tuple(shape), offs[0], offs[1]))
    entries.sort(key=lambda e: (e[3], e[4]))
    pos = 0
    for name, _, _, begin, end in entries:
        if begin != pos:
            what = "overlaps the previous tensor" if begin < pos else f"leaves a gap of {begin - pos} bytes before it"
            raise bad(f"tensor {name!r} starts at byte {begin} of the data but the previous one ends at {pos}: "
                      f"it {what}")
        pos = end
    if pos != data_len:
        if pos > data_len:
            raise bad(f"the tensors need {pos} bytes of data but the file holds only {data_len}: it is truncated")
        raise bad(f"the tensors cover {pos} bytes of data but the file holds {data_len}: {data_len - pos} extra bytes")
    return metadata, entries


def _read_head(f, size: int, where: str):
    """Read and validate the length field and the header; returns (metadata, entries, data_start)."""
    if size < 8:
        raise SafetensorsError(f"{where}: {size} bytes is too short for a safetensors file (the 8-byte header "
                               "length is missing); the file is truncated or empty")
    (n,) = struct.unpack("<Q", f.read(8))
    if n > min(MAX_HEADER_BYTES, size - 8):
        raise SafetensorsError(f"{where}: the header length field says {n} bytes, but the file has only "
                               f"{size - 8} after it (limit {MAX_HEADER_BYTES}); the file is truncated or corrupt")
    raw = f.read(n)
    metadata, entries = _parse_header(raw, size - 8 - n, where)
    return metadata, entries, 8 + n


def _convert(a: np.ndarray, dname: str, name: str, bf16: str, where: str):
    if dname != "BF16":
        return a
    if bf16 == "uint16":
        return a
    if bf16 == "float32":
        return (a.astype(np.uint32) << np.uint32(16)).view(np.float32)
    raise SafetensorsError(f"{where}: tensor {name!r} is bfloat16 (BF16), which NumPy has no dtype for; pass "
                           "bf16='float32' to convert it exactly to float32, or bf16='uint16' for the raw bits")


def read_header(path) -> tuple[dict, dict]:
    """``(metadata or {}, {name: {"dtype", "shape", "data_offsets"}})`` of a file, validated, without reading data."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        metadata, entries, _ = _read_head(f, os.fstat(f.fileno()).st_size, path)
    return metadata or {}, {name: {"dtype": d, "shape": list(s), "data_offsets": [b, e]}
                            for name, d, s, b, e in entries}


def load_file(path, mmap: bool = False, bf16: str = "error", with_metadata: bool = False):
    """Read a safetensors file into ``{name: np.ndarray}`` (in the file's data order).

    ``mmap=True`` maps the file read-only instead of reading it: arrays are
    views of the mapping (pages are read when touched). ``bf16`` says what to do
    with bfloat16 tensors: "error" (default), "float32" or "uint16".
    ``with_metadata=True`` returns ``(tensors, metadata)`` (metadata ``{}`` when absent).
    """
    if bf16 not in _BF16_MODES:
        raise ValueError(f"bf16 must be one of {_BF16_MODES}, got {bf16!r}")
    path = os.fspath(path)
    out = {}
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        metadata, entries, start = _read_head(f, size, path)
        if mmap and size > start:
            buf = np.memmap(path, dtype=np.uint8, mode="r")
            for name, dname, shape, begin, end in entries:
                dt = np.dtype("<u2") if dname == "BF16" else DTYPES[dname]
                a = buf[start + begin:start + end].view(dt).reshape(shape)  # a view of the mapping
                out[name] = _convert(a, dname, name, bf16, path)
        else:
            for name, dname, shape, begin, end in entries:
                dt = np.dtype("<u2") if dname == "BF16" else DTYPES[dname]
                f.seek(start + begin)
                count = math.prod(shape)
                a = np.fromfile(f, dtype=dt, count=count) if count else np.empty(0, dt)
                if a.size != count:
                    raise SafetensorsError(f"{path}: tensor {name!r} is cut short; the file is truncated")
                out[name] = _convert(a.reshape(shape), dname, name, bf16, path)
    return (out, metadata or {}) if with_metadata else out


def load(data: bytes, bf16: str = "error", with_metadata: bool = False):
    """Parse safetensors bytes (see ``load_file``); the arrays are copies, independent of ``data``."""
    if bf16 not in _BF16_MODES:
        raise ValueError(f"bf16 must be one of {_BF16_MODES}, got {bf16!r}")
    import io

    data = bytes(data)
    f = io.BytesIO(data)
    metadata, entries, start = _read_head(f, len(data), "<bytes>")
    out = {}
    for name, dname, shape, begin, end in entries:
        dt = np.dtype("<u2") if dname == "BF16" else DTYPES[dname]
        a = np.frombuffer(data, dtype=dt, count=math.prod(shape), offset=start + begin).reshape(shape).copy()
        out[name] = _convert(a, dname, name, bf16, "<bytes>")
    return (out, metadata or {}) if with_metadata else out


def file_data_sha256(path, chunk: int = 1 << 24) -> str:
    """The hex SHA-256 of the data buffer of a safetensors file (everything after the header), read in chunks."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        _, _, start = _read_head(f, size, path)
        f.seek(start)
        h = hashlib.sha256()
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


__all__ = ["SafetensorsError", "DTYPES", "save", "save_file", "write", "load", "load_file", "read_header",
           "layout", "data_sha256", "file_data_sha256", "MAX_HEADER_BYTES"]
