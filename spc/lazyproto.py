"""Reading and writing a single-file ONNX model without holding its weights.

An ``.onnx`` file is a protobuf ``ModelProto``; the bytes of each initializer's ``raw_data`` sit at a fixed place in
the file. ``load_light`` walks the protobuf wire format (tag, length, value) with small reads, parses everything
*except* those bytes, and turns each large initializer into an external reference to its own bytes inside the
``.onnx`` file (marked ``INLINE``: it came from inside the file, and is written back inside one). The weights are
then read one at a time by ``spc.weights`` like any external data.

``write_inline`` is the converse: it writes a model whose weights are references as one ordinary ``.onnx`` file,
one tensor in memory at a time. It relies on a protobuf rule every parser follows: a singular embedded message
(``ModelProto.graph``) that occurs several times is merged, and repeated fields (``GraphProto.initializer``)
concatenate. So the file is the model without its initializers, followed by one ``graph`` field per initializer.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx

from . import weights

_GRAPH = 7  # ModelProto.graph
_INITIALIZER = 5  # GraphProto.initializer
_RAW_DATA = 9  # TensorProto.raw_data
_LENGTH_DELIMITED = 2


class _Unsupported(Exception):
    """A wire construct the walker does not handle (groups): the caller falls back to onnx.load."""


def _varint(handle) -> int:
    shift = result = 0
    while True:
        byte = handle.read(1)
        if not byte:
            raise _Unsupported("truncated varint")
        result |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return result
        shift += 7


def _fields(handle, start: int, end: int):
    """(field number, wire type, start of the tag, start of the value, end of the value) of each field."""
    position = start
    while position < end:
        handle.seek(position)
        tag = _varint(handle)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            _varint(handle)
            value_start = value_end = handle.tell()
        elif wire == 1:
            value_start, value_end = handle.tell(), handle.tell() + 8
        elif wire == 5:
            value_start, value_end = handle.tell(), handle.tell() + 4
        elif wire == _LENGTH_DELIMITED:
            length = _varint(handle)
            value_start = handle.tell()
            value_end = value_start + length
        else:
            raise _Unsupported(f"wire type {wire}")
        if value_end > end:
            raise _Unsupported("field runs past its message")
        yield field, wire, position, value_start, value_end
        position = value_end


def _segment(handle, start: int, end: int) -> bytes:
    handle.seek(start)
    return handle.read(end - start)


def load_light(path: Path) -> onnx.ModelProto | None:
    """The model at ``path`` with its large initializers left in the file (None if the walker cannot read it)."""
    try:
        with open(path, "rb") as handle:
            model = onnx.ModelProto()
            for field, wire, tag_start, start, end in _fields(handle, 0, os.fstat(handle.fileno()).st_size):
                if field == _GRAPH and wire == _LENGTH_DELIMITED:
                    model.graph.MergeFrom(_light_graph(handle, start, end, path))
                else:
                    model.MergeFromString(_segment(handle, tag_start, end))
            return model
    except (_Unsupported, OSError, ValueError, RuntimeError):
        return None
    except Exception as exc:  # protobuf's DecodeError and friends: not a model this walker can read
        if type(exc).__name__ == "DecodeError":
            return None
        raise


def _light_graph(handle, start: int, end: int, path: Path) -> onnx.GraphProto:
    graph = onnx.GraphProto()
    for field, wire, tag_start, value_start, value_end in _fields(handle, start, end):
        if field == _INITIALIZER and wire == _LENGTH_DELIMITED:
            graph.initializer.append(_light_tensor(handle, value_start, value_end, path))
        else:
            graph.MergeFromString(_segment(handle, tag_start, value_end))
    return graph


def _light_tensor(handle, start: int, end: int, path: Path) -> onnx.TensorProto:
    tensor = onnx.TensorProto()
    raw = None
    for field, wire, tag_start, value_start, value_end in _fields(handle, start, end):
        if field == _RAW_DATA and wire == _LENGTH_DELIMITED:
            raw = (value_start, value_end - value_start)
        else:
            tensor.MergeFromString(_segment(handle, tag_start, value_end))
    if raw is None:
        return tensor
    offset, length = raw
    if length < weights.LAZY_TENSOR_BYTES or tensor.data_location == onnx.TensorProto.EXTERNAL:
        tensor.raw_data = _segment(handle, offset, offset + length)
        return tensor
    weights.make_external(tensor, path.name, offset, length, inline=True)
    return tensor


def write_inline(model: onnx.ModelProto, handle) -> None:
    """Write ``model`` as one ``.onnx`` file; external initializers are read and written one at a time."""
    header = onnx.ModelProto()
    header.CopyFrom(model)  # references and small tensors only
    initializers = []
    for init in header.graph.initializer:
        initializers.append(onnx.TensorProto())
        initializers[-1].CopyFrom(init)
    del header.graph.initializer[:]
    for tensor in weights.all_tensors(header):  # rare: external data outside the main graph's initializers
        weights.inline(tensor)
    handle.write(header.SerializeToString())
    tag = bytes([(_GRAPH << 3) | _LENGTH_DELIMITED])
    while initializers:
        tensor = initializers.pop(0)
        weights.inline(tensor)
        piece = onnx.GraphProto(initializer=[tensor]).SerializeToString()
        del tensor
        handle.write(tag + _encode_varint(len(piece)) + piece)


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
