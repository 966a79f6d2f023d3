"""A reader of Arrow IPC *stream* files, with NumPy only: the ``data-*.arrow`` files of Hugging Face ``save_to_disk``.

Hugging Face datasets saved with ``Dataset.save_to_disk`` are Arrow IPC streams. This module reads
the types such datasets use: null, signed and unsigned integers, floats, booleans, UTF-8 strings and
binary (32- and 64-bit offsets), lists (variable, large and fixed size) and structs, with nulls
anywhere. It returns plain Python values, as ``pyarrow.Table.to_pylist()`` does.

The format (https://arrow.apache.org/docs/format/Columnar.html#serialization-and-interprocess-communication-ipc),
byte by byte::

    a stream   = message*, then the end-of-stream marker 0xFFFFFFFF 0x00000000
    a message  = 0xFFFFFFFF (continuation), int32 metadata length M (little-endian),
                 M bytes of a FlatBuffer ``Message`` (padded to 8 bytes), then the message's body
    Message    = {version, header: Schema | RecordBatch | DictionaryBatch | ..., bodyLength}
    Schema     = {fields: [Field]};  Field = {name, nullable, type (a union), children: [Field]}
    RecordBatch = {length, nodes: [FieldNode{length, null_count}], buffers: [Buffer{offset, length}]}

A record batch lists one node per field and the fields' buffers in depth-first order (a field, then
its children). Each array has a validity bitmap (bit i set = row i is not null; may be empty when
there are no nulls), then per type: integers and floats a data buffer, booleans a bit-packed data
buffer, strings and binary an offsets buffer (n + 1 offsets) and a data buffer, lists an offsets
buffer and one child array, fixed-size lists one child array of n * size values, structs one child
array per field; the null type has no buffers at all.

Not supported (each raises ``ArrowError`` naming the type): dictionary encoding, compressed bodies,
big-endian data, and the types Hugging Face text datasets do not use (dates, timestamps, decimals,
unions, maps, views, ...).

    >>> table = read_arrow_stream("data-00000-of-00001.arrow")
    >>> table.column_names, table.num_rows
    >>> rows = table.to_pylist()          # [{"question": ..., "choices": {...}, ...}, ...]
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

_CONTINUATION = 0xFFFFFFFF

# the Type union's members, in the order of Schema.fbs (index = the union's type id)
_TYPE_NAMES = [
    "NONE", "Null", "Int", "FloatingPoint", "Binary", "Utf8", "Bool", "Decimal", "Date", "Time",
    "Timestamp", "Interval", "List", "Struct_", "Union", "FixedSizeBinary", "FixedSizeList", "Map",
    "Duration", "LargeBinary", "LargeUtf8", "LargeList", "RunEndEncoded", "BinaryView", "Utf8View",
    "ListView", "LargeListView",
]
_SUPPORTED = {"Null", "Int", "FloatingPoint", "Binary", "Utf8", "Bool", "List", "Struct_", "FixedSizeList",
              "LargeBinary", "LargeUtf8", "LargeList"}
_MESSAGE_HEADERS = {1: "Schema", 2: "DictionaryBatch", 3: "RecordBatch", 4: "Tensor", 5: "SparseTensor"}
_FLOAT_DTYPES = {0: np.dtype("<f2"), 1: np.dtype("<f4"), 2: np.dtype("<f8")}


class ArrowError(ValueError):
    """An Arrow stream is malformed or uses something this reader does not support; the message says which."""


# ---------------------------------------------------------------------------
# FlatBuffers, as much as Arrow's metadata needs
# ---------------------------------------------------------------------------


class _Table:
    """A FlatBuffers table at ``pos`` in ``buf``: its vtable gives each field's offset (0 = absent)."""

    def __init__(self, buf: bytes, pos: int):
        self.buf, self.pos = buf, pos
        self.vtable = pos - struct.unpack_from("<i", buf, pos)[0]
        self.vtable_size = struct.unpack_from("<H", buf, self.vtable)[0]

    def _offset(self, i: int) -> int:
        slot = 4 + 2 * i
        return struct.unpack_from("<H", self.buf, self.vtable + slot)[0] if slot < self.vtable_size else 0

    def scalar(self, i: int, fmt: str, default):
        off = self._offset(i)
        return struct.unpack_from("<" + fmt, self.buf, self.pos + off)[0] if off else default

    def _indirect(self, i: int):
        off = self._offset(i)
        if not off:
            return None
        at = self.pos + off
        return at + struct.unpack_from("<I", self.buf, at)[0]

    def table(self, i: int):
        at = self._indirect(i)
        return None if at is None else _Table(self.buf, at)

    def string(self, i: int):
        at = self._indirect(i)
        if at is None:
            return None
        n = struct.unpack_from("<I", self.buf, at)[0]
        return self.buf[at + 4: at + 4 + n].decode("utf-8")

    def _vector(self, i: int):
        at = self._indirect(i)
        if at is None:
            return 0, 0
        return struct.unpack_from("<I", self.buf, at)[0], at + 4

    def tables(self, i: int) -> list:
        n, start = self._vector(i)
        out = []
        for k in range(n):
            at = start + 4 * k
            out.append(_Table(self.buf, at + struct.unpack_from("<I", self.buf, at)[0]))
        return out

    def structs(self, i: int, fmt: str) -> list:
        n, start = self._vector(i)
        size = struct.calcsize("<" + fmt)
        return [struct.unpack_from("<" + fmt, self.buf, start + k * size) for k in range(n)]


# ---------------------------------------------------------------------------
# the schema
# ---------------------------------------------------------------------------


@dataclass
class ArrowField:
    """One field of a schema: its name, type (``"int64"``, ``"utf8"``, ``"list"``, ``"struct"``, ...) and children."""

    name: str
    type: str
    nullable: bool = True
    children: list = field(default_factory=list)
    bit_width: int = 0        # Int: 8, 16, 32, 64
    signed: bool = True       # Int
    precision: int = 2        # FloatingPoint: 0 half, 1 single, 2 double
    list_size: int = 0        # FixedSizeList

    def describe(self) -> str:
        """The type as pyarrow prints it, e.g. ``list<item: string>`` or ``struct<text: list<item: string>>``."""
        if self.type == "struct":
            return "struct<" + ", ".join(f"{c.name}: {c.describe()}" for c in self.children) + ">"
        if self.type in ("list", "large_list"):
            return f"{self.type}<{self.children[0].name}: {self.children[0].describe()}>"
        if self.type == "fixed_size_list":
            return f"fixed_size_list<{self.children[0].name}: {self.children[0].describe()}>[{self.list_size}]"
        return {"utf8": "string", "large_utf8": "large_string"}.get(self.type, self.type)


def _parse_field(t: _Table) -> ArrowField:
    # Field: 0 name, 1 nullable, 2 type_type, 3 type, 4 dictionary, 5 children, 6 custom_metadata
    name = t.string(0) or ""
    type_id = t.scalar(2, "B", 0)
    type_name = _TYPE_NAMES[type_id] if type_id < len(_TYPE_NAMES) else f"type id {type_id}"
    if t.table(4) is not None:
        raise ArrowError(f"field {name!r} is dictionary-encoded, which this reader does not support")
    if type_name not in _SUPPORTED:
        raise ArrowError(f"field {name!r} has Arrow type {type_name}, which this reader does not support "
                         f"(supported: {', '.join(sorted(_SUPPORTED))})")
    f = ArrowField(name=name, type="", nullable=bool(t.scalar(1, "B", 0)),
                   children=[_parse_field(c) for c in t.tables(5)])
    params = t.table(3)
    if type_name == "Int":
        f.bit_width, f.signed = params.scalar(0, "i", 0), bool(params.scalar(1, "B", 0))
        if f.bit_width not in (8, 16, 32, 64):
            raise ArrowError(f"field {name!r}: integer width {f.bit_width} is not 8, 16, 32 or 64")
        f.type = f"{'' if f.signed else 'u'}int{f.bit_width}"
    elif type_name == "FloatingPoint":
        f.precision = params.scalar(0, "h", 0)
        if f.precision not in _FLOAT_DTYPES:
            raise ArrowError(f"field {name!r}: unknown floating-point precision {f.precision}")
        f.type = ("halffloat", "float", "double")[f.precision]
    elif type_name == "FixedSizeList":
        f.list_size, f.type = params.scalar(0, "i", 0), "fixed_size_list"
    else:
        f.type = {"Null": "null", "Binary": "binary", "Utf8": "utf8", "Bool": "bool", "List": "list",
                  "Struct_": "struct", "LargeBinary": "large_binary", "LargeUtf8": "large_utf8",
                  "LargeList": "large_list"}[type_name]
    expected_children = {"list": 1, "large_list": 1, "fixed_size_list": 1}.get(f.type, None)
    if expected_children is not None and len(f.children) != 1:
        raise ArrowError(f"field {name!r}: a {f.type} needs exactly one child field, found {len(f.children)}")
    return f


# ---------------------------------------------------------------------------
# record batches
# ---------------------------------------------------------------------------


class _BatchReader:
    """Walks one record batch's nodes and buffers in depth-first field order, decoding each array."""

    def __init__(self, body: memoryview, nodes: list, buffers: list, where: str):
        self.body, self.where = body, where
        self.nodes, self.buffers = iter(nodes), iter(buffers)

    def _node(self, f: ArrowField):
        try:
            return next(self.nodes)
        except StopIteration:
            raise ArrowError(f"{self.where}: the record batch has too few field nodes (at field {f.name!r})") from None

    def _buffer(self, f: ArrowField) -> memoryview:
        try:
            offset, length = next(self.buffers)
        except StopIteration:
            raise ArrowError(f"{self.where}: the record batch has too few buffers (at field {f.name!r})") from None
        if offset < 0 or length < 0 or offset + length > len(self.body):
            raise ArrowError(f"{self.where}: buffer [{offset}, {offset + length}) of field {f.name!r} lies outside "
                             f"the message body ({len(self.body)} bytes)")
        return self.body[offset: offset + length]

    def _array(self, buf: memoryview, dtype, count: int, f: ArrowField) -> np.ndarray:
        if count * dtype.itemsize > len(buf):
            raise ArrowError(f"{self.where}: field {f.name!r} needs {count} values of {dtype.itemsize} bytes "
                             f"but its buffer holds {len(buf)} bytes")
        return np.frombuffer(buf, dtype=dtype, count=count)

    def _bits(self, buf: memoryview, count: int, f: ArrowField) -> np.ndarray:
        if len(buf) * 8 < count:
            raise ArrowError(f"{self.where}: the bitmap of field {f.name!r} is too short for {count} rows")
        return np.unpackbits(np.frombuffer(buf, dtype=np.uint8), bitorder="little")[:count].astype(bool)

    def read(self, f: ArrowField) -> list:
        """The values of field ``f`` (and its children) in this batch, as a Python list."""
        length, null_count = self._node(f)
        if f.type == "null":
            return [None] * length
        validity = self._buffer(f)
        if null_count and not len(validity):
            raise ArrowError(f"{self.where}: field {f.name!r} has {null_count} nulls but no validity bitmap")
        valid = self._bits(validity, length, f) if null_count else None
        if f.type.startswith(("int", "uint")):
            dtype = np.dtype(f"<{'i' if f.signed else 'u'}{f.bit_width // 8}")
            values = self._array(self._buffer(f), dtype, length, f).tolist()
        elif f.type in ("halffloat", "float", "double"):
            values = self._array(self._buffer(f), _FLOAT_DTYPES[f.precision], length, f).tolist()
        elif f.type == "bool":
            values = self._bits(self._buffer(f), length, f).tolist()
        elif f.type in ("utf8", "large_utf8", "binary", "large_binary"):
            offsets = self._array(self._buffer(f), np.dtype("<i8" if f.type.startswith("large") else "<i4"),
                                  length + 1, f).tolist()
            data = bytes(self._buffer(f))
            if length and (offsets[0] < 0 or offsets[-1] > len(data)):
                raise ArrowError(f"{self.where}: the offsets of field {f.name!r} point outside its data buffer")
            values = [data[a:b] for a, b in zip(offsets, offsets[1:])]
            if f.type.endswith("utf8"):
                try:
                    values = [v.decode("utf-8") for v in values]
                except UnicodeDecodeError as e:
                    raise ArrowError(f"{self.where}: field {f.name!r} holds invalid UTF-8 ({e})") from None
        elif f.type in ("list", "large_list"):
            offsets = self._array(self._buffer(f), np.dtype("<i8" if f.type == "large_list" else "<i4"),
                                  length + 1, f).tolist()
            child = self.read(f.children[0])
            if length and (offsets[0] < 0 or offsets[-1] > len(child)):
                raise ArrowError(f"{self.where}: the offsets of list field {f.name!r} point outside its child")
            values = [child[a:b] for a, b in zip(offsets, offsets[1:])]
        elif f.type == "fixed_size_list":
            child, n = self.read(f.children[0]), f.list_size
            if len(child) < length * n:
                raise ArrowError(f"{self.where}: fixed-size list field {f.name!r} has too few child values")
            values = [child[i * n:(i + 1) * n] for i in range(length)]
        elif f.type == "struct":
            columns = [self.read(c) for c in f.children]
            names = [c.name for c in f.children]
            if any(len(col) < length for col in columns):
                raise ArrowError(f"{self.where}: a child of struct field {f.name!r} has fewer rows than the struct")
            values = [dict(zip(names, row)) for row in zip(*columns)] if columns else [{} for _ in range(length)]
            values = values[:length]
        else:  # _parse_field admits only the types above
            raise ArrowError(f"{self.where}: field {f.name!r}: type {f.type} cannot be decoded")
        if valid is not None:
            values = [v if ok else None for v, ok in zip(values, valid.tolist())]
        return values


# ---------------------------------------------------------------------------
# the stream
# ---------------------------------------------------------------------------


@dataclass
class ArrowTable:
    """A table read from an Arrow stream: its schema's fields and one Python list per column."""

    fields: list
    columns: dict

    @property
    def column_names(self) -> list:
        """The columns' names, in the schema's order."""
        return [f.name for f in self.fields]

    @property
    def num_rows(self) -> int:
        """The number of rows (0 for a table without columns)."""
        return len(next(iter(self.columns.values()))) if self.columns else 0

    def to_pylist(self) -> list:
        """The rows as dicts ``{column name: value}``, like ``pyarrow.Table.to_pylist()``."""
        names = self.column_names
        return [dict(zip(names, row)) for row in zip(*(self.columns[n] for n in names))]


def _messages(buf: bytes, where: str):
    """Yields ``(header type, header table, body)`` for each message of the stream, up to end-of-stream."""
    pos = 0
    while True:
        if pos + 4 > len(buf):
            if pos == len(buf):  # a stream may end without the end-of-stream marker
                return
            raise ArrowError(f"{where}: truncated at byte {pos} (expected a message length)")
        (length,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        if length == _CONTINUATION:
            if pos + 4 > len(buf):
                raise ArrowError(f"{where}: truncated at byte {pos} (expected a message length)")
            (length,) = struct.unpack_from("<i", buf, pos)
            pos += 4
        if length == 0:
            return
        if length < 0 or pos + length > len(buf):
            raise ArrowError(f"{where}: a message at byte {pos} claims {length} bytes of metadata, "
                             f"past the end of the data ({len(buf)} bytes)")
        meta = buf[pos: pos + length]
        pos += length
        # Message: 0 version, 1 header_type, 2 header, 3 bodyLength, 4 custom_metadata
        message = _Table(meta, struct.unpack_from("<I", meta, 0)[0])
        header_type = message.scalar(1, "B", 0)
        body_length = message.scalar(3, "q", 0)
        if body_length < 0 or pos + body_length > len(buf):
            raise ArrowError(f"{where}: a message body of {body_length} bytes at byte {pos} runs past the end "
                             f"of the data ({len(buf)} bytes): the file is truncated")
        body = memoryview(buf)[pos: pos + body_length]
        pos += body_length
        yield header_type, message.table(2), body


def read_arrow_stream(source) -> ArrowTable:
    """Reads an Arrow IPC stream (a path, or the bytes) into an ``ArrowTable`` of Python values.

    Raises ``ArrowError`` for a malformed or truncated stream and for features this reader does not
    support (the message names the file and the problem).
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        buf, where = bytes(source), "Arrow stream"
    else:
        where = str(source)
        try:
            buf = Path(source).read_bytes()
        except OSError as e:
            raise ArrowError(f"cannot read {where}: {e.strerror or e}") from None
    if buf[:6] == b"ARROW1":
        raise ArrowError(f"{where} is an Arrow *file* (random-access format); this reader reads the stream format "
                         f"that Hugging Face's save_to_disk writes")
    try:
        return _read(buf, where)
    except (struct.error, IndexError, UnicodeDecodeError) as e:
        raise ArrowError(f"{where}: malformed Arrow metadata ({e})") from None


def _read(buf: bytes, where: str) -> ArrowTable:
    fields = None
    columns = {}
    for header_type, header, body in _messages(buf, where):
        kind = _MESSAGE_HEADERS.get(header_type, f"header type {header_type}")
        if kind == "Schema":
            if fields is not None:
                raise ArrowError(f"{where}: a second schema message in one stream")
            if header.scalar(0, "h", 0) != 0:
                raise ArrowError(f"{where}: big-endian Arrow data is not supported")
            fields = [_parse_field(f) for f in header.tables(1)]
            columns = {f.name: [] for f in fields}
            if len(columns) != len(fields):
                raise ArrowError(f"{where}: the schema has duplicate column names")
        elif kind == "RecordBatch":
            if fields is None:
                raise ArrowError(f"{where}: a record batch before the schema")
            # RecordBatch: 0 length, 1 nodes, 2 buffers, 3 compression, 4 variadicBufferCounts
            if header.table(3) is not None:
                raise ArrowError(f"{where}: compressed record batches are not supported")
            length = header.scalar(0, "q", 0)
            reader = _BatchReader(body, header.structs(1, "qq"), header.structs(2, "qq"), where)
            for f in fields:
                values = reader.read(f)
                if len(values) != length:
                    raise ArrowError(f"{where}: column {f.name!r} has {len(values)} rows in a batch of {length}")
                columns[f.name].extend(values)
        elif kind == "DictionaryBatch":
            raise ArrowError(f"{where}: dictionary batches (dictionary encoding) are not supported")
        else:
            raise ArrowError(f"{where}: unexpected {kind} message in a table stream")
    if fields is None:
        raise ArrowError(f"{where}: no schema message (empty or not an Arrow stream)")
    return ArrowTable(fields, columns)
