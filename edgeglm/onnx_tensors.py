"""The tensor table of an ONNX model's external data, read without the ``onnx`` package.

An edge box must not need ``onnx`` (or protobuf) to know where each weight lives in the
external-data file, so this module walks the protobuf wire format of ``ModelProto`` directly and
reads only what it needs: the graph's initializers (and those of nested subgraphs) whose
``data_location`` is EXTERNAL, with their ``location``, ``offset`` and ``length`` entries.

    ModelProto.graph (7) -> GraphProto
    GraphProto.initializer (5) -> TensorProto, .node (1) -> NodeProto.attribute (5)
        -> AttributeProto.g (6) / .graphs (11)  (subgraphs of If / Loop / Scan)
    TensorProto: dims (1), data_type (2), name (8), external_data (13), data_location (14)
    StringStringEntryProto: key (1), value (2)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from edgeglm.errors import IntegrityError

__all__ = ["ONNX_DTYPES", "ExternalTensor", "external_tensors", "read_external_tables"]

# TensorProto.DataType -> (name, bits per element)
ONNX_DTYPES: dict[int, tuple[str, int]] = {
    1: ("float32", 32),
    2: ("uint8", 8),
    3: ("int8", 8),
    4: ("uint16", 16),
    5: ("int16", 16),
    6: ("int32", 32),
    7: ("int64", 64),
    9: ("bool", 8),
    10: ("float16", 16),
    11: ("float64", 64),
    12: ("uint32", 32),
    13: ("uint64", 64),
    16: ("bfloat16", 16),
    17: ("float8e4m3fn", 8),
    18: ("float8e4m3fnuz", 8),
    19: ("float8e5m2", 8),
    20: ("float8e5m2fnuz", 8),
    21: ("uint4", 4),
    22: ("int4", 4),
}

_MAX_DEPTH = 16


@dataclass(frozen=True)
class ExternalTensor:
    """One initializer stored in an external-data file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    location: str
    offset: int
    length: int


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """Yield (field number, wire type, value) of one protobuf message."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield number, wire, value
        elif wire == 1:
            pos += 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            if pos + size > len(buf):
                raise ValueError("truncated field")
            yield number, wire, buf[pos : pos + size]
            pos += size
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
    if pos != len(buf):
        raise ValueError("truncated message")


def _packed_varints(buf: memoryview) -> list[int]:
    out, pos = [], 0
    while pos < len(buf):
        value, pos = _varint(buf, pos)
        out.append(value)
    return out


def _tensor(buf: memoryview) -> ExternalTensor | None:
    dims: list[int] = []
    dtype = 0
    name = ""
    external = False
    entries: dict[str, str] = {}
    for number, _wire, value in _fields(buf):
        if number == 1:
            dims.extend(_packed_varints(value) if isinstance(value, memoryview) else [value])
        elif number == 2 and isinstance(value, int):
            dtype = value
        elif number == 8 and isinstance(value, memoryview):
            name = bytes(value).decode("utf-8")
        elif number == 14 and isinstance(value, int):
            external = value == 1
        elif number == 13 and isinstance(value, memoryview):
            key = val = ""
            for n, _, v in _fields(value):
                if n == 1 and isinstance(v, memoryview):
                    key = bytes(v).decode("utf-8")
                elif n == 2 and isinstance(v, memoryview):
                    val = bytes(v).decode("utf-8")
            entries[key] = val
    if not external:
        return None
    dtype_name, bits = ONNX_DTYPES.get(dtype, (f"onnx-type-{dtype}", 8))
    count = 1
    for d in dims:
        count *= d
    length = int(entries["length"]) if "length" in entries else (count * bits + 7) // 8
    return ExternalTensor(
        name=name,
        dtype=dtype_name,
        shape=tuple(dims),
        location=entries.get("location", ""),
        offset=int(entries.get("offset", "0")),
        length=length,
    )


def _graph(buf: memoryview, depth: int) -> Iterator[ExternalTensor]:
    if depth > _MAX_DEPTH:
        raise ValueError("subgraphs nested too deeply")
    for number, _, value in _fields(buf):
        if not isinstance(value, memoryview):
            continue
        if number == 5:
            tensor = _tensor(value)
            if tensor is not None:
                yield tensor
        elif number == 1:  # NodeProto: look into subgraph attributes
            for n_num, _, n_val in _fields(value):
                if n_num == 5 and isinstance(n_val, memoryview):
                    for a_num, _, a_val in _fields(n_val):
                        if a_num in (6, 11) and isinstance(a_val, memoryview):
                            yield from _graph(a_val, depth + 1)


def external_tensors(model_path: Path) -> list[ExternalTensor]:
    """Every initializer of ``model_path`` kept in external data, in graph order."""
    try:
        data = memoryview(Path(model_path).read_bytes())
        tensors: list[ExternalTensor] = []
        for number, _, value in _fields(data):
            if number == 7 and isinstance(value, memoryview):
                tensors.extend(_graph(value, 0))
        return tensors
    except (ValueError, UnicodeDecodeError) as exc:
        raise IntegrityError(f"ONNX model {model_path}", f"cannot read its graph: {exc}") from exc


def read_external_tables(folder: Path) -> dict[str, list[ExternalTensor]]:
    """Map each external-data file (path relative to ``folder``) to its tensors, sorted by offset.

    Every ``*.onnx`` file in ``folder`` (recursively) is read; locations are relative to the
    model's own directory, as ONNX defines them.
    """
    folder = Path(folder)
    tables: dict[str, dict[tuple[int, int, str], ExternalTensor]] = {}
    for model in sorted(folder.rglob("*.onnx")):
        for t in external_tensors(model):
            rel = (model.parent / t.location).resolve()
            try:
                key = rel.relative_to(folder.resolve()).as_posix()
            except ValueError as exc:
                raise IntegrityError(
                    f"ONNX model {model}", f"tensor {t.name!r} points outside the bundle: {t.location!r}"
                ) from exc
            tables.setdefault(key, {})[(t.offset, t.length, t.name)] = t
    return {k: sorted(v.values(), key=lambda t: (t.offset, t.length)) for k, v in tables.items()}
