"""Weights that stay on disk until something needs them.

A model with external data is loaded without its weights: each external tensor keeps its reference (file, offset,
length) plus a ``basepath`` entry naming the folder the file lives in, so it can be read from any working directory.
``read`` brings one tensor into ordinary (anonymous) memory when a pass asks for it, and the caller drops it when
done; nothing keeps a second copy of the model alive. Weights that the rewrite computes for such a model (sliced,
compensated) are *spooled*: appended to a private temporary file and referenced the same way, so a pruned 4 GB model
never sits in memory either. ``write_external`` streams every tensor, one at a time, into the data file of a saved
model; ``mapped`` gives ONNX Runtime a read-only view of a tensor's bytes without copying them.

The spool folder lives in the system temporary directory and is removed when the process exits.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper, numpy_helper

from .errors import SpcError

BASEPATH = "basepath"
INLINE = "spc.inline"  # spc's own mark (never written): bytes that belong inside a single-file model
LAZY_TENSOR_BYTES = 16384  # single-file models: initializers this large stay in the file until read
ALIGN = 4096  # tensors start on page boundaries in written data files (runtimes can map them)
_CHUNK = 64 << 20
INLINE_ELEMENTS = 4096  # external tensors this small are read at load time (what light_copy keeps)
_NATIVE = {
    onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64, onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32, onnx.TensorProto.INT16: np.int16,
    onnx.TensorProto.INT8: np.int8, onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.BOOL: np.bool_,
}


def is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def all_tensors(model: onnx.ModelProto):
    """Every tensor of the model: initializers, Constant values and those of subgraphs."""
    return external_data_helper._get_all_tensors(model)


def has_external(model: onnx.ModelProto) -> bool:
    return any(is_external(tensor) for tensor in all_tensors(model))


@dataclass
class Location:
    path: Path
    offset: int
    length: int | None


def location(tensor: onnx.TensorProto, base: Path | None = None) -> Location:
    entries = {entry.key: entry.value for entry in tensor.external_data}
    folder = Path(entries[BASEPATH]) if BASEPATH in entries else (base or Path("."))
    length = entries.get("length")
    return Location(folder / entries.get("location", ""), int(entries.get("offset") or 0),
                    int(length) if length else None)


def _nbytes(tensor: onnx.TensorProto) -> int | None:
    dtype = _NATIVE.get(tensor.data_type)
    if dtype is None:
        return None
    return int(np.prod(tensor.dims, dtype=np.int64)) * np.dtype(dtype).itemsize


def anchor(model: onnx.ModelProto, base: Path, source: str) -> None:
    """Check that every external tensor's bytes exist, and record the folder they are read from."""
    base = base.resolve()
    for tensor in all_tensors(model):
        if not is_external(tensor):
            continue
        _drop_entry(tensor, BASEPATH)  # only spc's own record of where the bytes are is trusted
        where = location(tensor, base)
        if not where.path.resolve().is_relative_to(base):  # as onnx's loader: a model reads only beside itself
            raise SpcError(f"{source}: external data location '{_entry(tensor, 'location')}' of initializer "
                           f"'{tensor.name}' points outside the model's folder")
        name = where.path.relative_to(base)
        if not where.path.is_file():
            raise SpcError(f"{source}: external data file '{name}' of initializer '{tensor.name}' not found")
        size = where.path.stat().st_size
        needed = where.length if where.length is not None else _nbytes(tensor)
        if needed is not None and where.offset + needed > size:
            raise SpcError(f"{source}: external data file '{name}' is truncated (initializer '{tensor.name}' needs "
                           f"bytes up to {where.offset + needed}, file has {size})")
        entry = tensor.external_data.add()
        entry.key, entry.value = BASEPATH, str(base)
        if int(np.prod(tensor.dims, dtype=np.int64)) <= INLINE_ELEMENTS:  # shape constants, norm scales: the
            inline(tensor)  # checker and shape inference read those, and they cost nothing to hold


def _entry(tensor: onnx.TensorProto, key: str) -> str:
    return next((entry.value for entry in tensor.external_data if entry.key == key), "")


def _drop_entry(tensor: onnx.TensorProto, key: str) -> None:
    keep = [(entry.key, entry.value) for entry in tensor.external_data if entry.key != key]
    del tensor.external_data[:]
    for k, v in keep:
        entry = tensor.external_data.add()
        entry.key, entry.value = k, v


def read(tensor: onnx.TensorProto) -> np.ndarray:
    """The tensor as a fresh array in anonymous memory (external bytes are read, never mapped)."""
    if not is_external(tensor):
        return numpy_helper.to_array(tensor)
    where = location(tensor)
    dtype = _NATIVE.get(tensor.data_type)
    try:
        if dtype is not None:
            count = int(np.prod(tensor.dims, dtype=np.int64))
            array = np.fromfile(where.path, dtype=dtype, count=count, offset=where.offset)
            if array.size != count:
                raise SpcError(f"external data of '{tensor.name}' in '{where.path}' is truncated")
            return array.reshape(tuple(tensor.dims))
        with open(where.path, "rb") as handle:  # other element types: through a temporary in-memory tensor
            handle.seek(where.offset)
            data = handle.read() if where.length is None else handle.read(where.length)
    except OSError as exc:
        raise SpcError(f"cannot read external data of '{tensor.name}' from '{where.path}' ({exc})") from None
    plain = onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims, raw_data=data)
    return numpy_helper.to_array(plain)


def mapped(tensor: onnx.TensorProto) -> np.ndarray:
    """A read-only view of the tensor's bytes (mapped for external native types, else read)."""
    dtype = _NATIVE.get(tensor.data_type)
    if not is_external(tensor) or dtype is None:
        return read(tensor)
    where = location(tensor)
    shape = tuple(tensor.dims)
    if int(np.prod(shape, dtype=np.int64)) == 0:
        return np.zeros(shape, dtype=dtype)
    if where.offset % np.dtype(dtype).itemsize:  # bytes inside a protobuf need not be aligned: copy those
        return read(tensor)
    return np.memmap(where.path, dtype=dtype, mode="r", offset=where.offset, shape=shape)


class _Spool:
    """One append-only temporary file per process for weights computed from external ones."""

    def __init__(self):
        self.folder: Path | None = None
        self.path: Path | None = None

    def append(self, data: bytes | memoryview) -> tuple[Path, int]:
        if self.folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix="spc-spool-"))
            self.path = self.folder / "weights.bin"
            self.path.touch()
            atexit.register(shutil.rmtree, self.folder, True)
        with open(self.path, "ab") as handle:
            offset = handle.tell()
            handle.write(data)
        return self.path, offset

    def scratch(self, suffix: str) -> Path:
        self.append(b"")
        fd, name = tempfile.mkstemp(dir=self.folder, suffix=suffix)
        os.close(fd)
        return Path(name)

    def scratch_dir(self) -> Path:
        self.append(b"")
        return Path(tempfile.mkdtemp(dir=self.folder))


SPOOL = _Spool()


def spool(tensor: onnx.TensorProto, inline: bool = False) -> onnx.TensorProto:
    """Move an in-memory tensor's bytes to the spool file; ``tensor`` becomes an external reference to them."""
    if not tensor.HasField("raw_data"):
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name))
    path, offset = SPOOL.append(tensor.raw_data)
    make_external(tensor, path.name, offset, len(tensor.raw_data), str(path.parent), inline)
    return tensor


def make_external(tensor: onnx.TensorProto, location_name: str, offset: int, length: int,
                  basepath: str | None = None, inline: bool | str = False) -> None:
    """Point ``tensor`` at ``length`` bytes from ``offset`` of ``location_name`` (in ``basepath``); ``inline``
    marks bytes that came from inside a single-file model and go back inside one when saved."""
    if inline and tensor.HasField("data_location"):
        inline = "explicit"
    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    entries = [("location", location_name), ("offset", str(offset)), ("length", str(length))]
    entries += [(BASEPATH, basepath)] if basepath else []
    entries += [(INLINE, inline if isinstance(inline, str) else "1")] if inline else []
    for key, value in entries:
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def is_inline(tensor: onnx.TensorProto) -> bool:
    return any(entry.key == INLINE for entry in tensor.external_data)


def inline(tensor: onnx.TensorProto) -> None:
    """Read an external tensor's bytes into the tensor itself (the bytes on disk are exactly ``raw_data``)."""
    if not is_external(tensor):
        return
    where = location(tensor)
    length = where.length if where.length is not None else _nbytes(tensor)
    try:
        with open(where.path, "rb") as handle:
            handle.seek(where.offset)
            raw = handle.read() if length is None else handle.read(length)
    except OSError as exc:
        raise SpcError(f"cannot read external data of '{tensor.name}' from '{where.path}' ({exc})") from None
    if length is not None and len(raw) != length:
        raise SpcError(f"external data of '{tensor.name}' in '{where.path}' is truncated")
    explicit = _entry(tensor, INLINE) == "explicit"
    del tensor.external_data[:]
    tensor.ClearField("data_location")
    if explicit:  # the file stated data_location DEFAULT: keep the round trip exact
        tensor.data_location = onnx.TensorProto.DEFAULT
    tensor.raw_data = raw


def _entry(tensor: onnx.TensorProto, key: str) -> str | None:
    return next((entry.value for entry in tensor.external_data if entry.key == key), None)


def needs_data_file(model: onnx.ModelProto) -> bool:
    """Whether some weight came from an external data file (not from inside a single-file model)."""
    return any(is_external(t) and not is_inline(t) for t in all_tensors(model))


def total_bytes(model: onnx.ModelProto) -> int:
    """The size the model would have as one file."""
    size = model.ByteSize()
    for tensor in all_tensors(model):
        if is_external(tensor):
            where = location(tensor)
            size += where.length if where.length is not None else (_nbytes(tensor) or 0)
    return size


def store(tensor: onnx.TensorProto, like: onnx.TensorProto) -> onnx.TensorProto:
    """``tensor``, spooled when the weight it replaces (``like``) lives on disk: a model loaded with external data
    keeps its computed weights out of memory too."""
    small = int(np.prod(tensor.dims, dtype=np.int64)) <= INLINE_ELEMENTS  # held in the proto, like at load time
    return spool(tensor, is_inline(like)) if is_external(like) and not small else tensor


def write_external(model: onnx.ModelProto, data_path: Path, location_name: str, threshold: int = 1024) -> None:
    """Stream every tensor of ``model`` (external ones copied from their files, in-memory ones of ``threshold``
    bytes or more) into ``data_path``, one at a time, and point the tensors at ``location_name`` there."""
    with open(data_path, "wb") as out:
        for tensor in all_tensors(model):
            if is_external(tensor):
                where = location(tensor)
                length = where.length if where.length is not None else where.path.stat().st_size - where.offset
                offset = _pad(out)
                with open(where.path, "rb") as source:
                    source.seek(where.offset)
                    _copy(source, out, length)
            else:
                raw = tensor.raw_data if tensor.HasField("raw_data") else None
                if raw is None:
                    if tensor.ByteSize() < threshold or tensor.data_type == onnx.TensorProto.STRING:
                        continue
                    raw = numpy_helper.from_array(numpy_helper.to_array(tensor)).raw_data
                if len(raw) < threshold:
                    continue
                offset = _pad(out)
                out.write(raw)
                length = len(raw)
                for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                    tensor.ClearField(field)
            make_external(tensor, location_name, offset, length)
        out.flush()
        os.fsync(out.fileno())


def _pad(handle) -> int:
    offset = handle.tell()
    if offset % ALIGN:
        handle.write(b"\0" * (ALIGN - offset % ALIGN))
    return handle.tell()


def _copy(source, target, length: int) -> None:
    left = length
    while left > 0:
        chunk = source.read(min(_CHUNK, left))
        if not chunk:
            raise SpcError(f"external data file '{source.name}' ended {left} bytes early")
        target.write(chunk)
        left -= len(chunk)


@dataclass
class Spilled:
    """A large array kept in the spool folder (exact: float64 stays float64) and read back on demand."""

    path: Path
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def load(self) -> np.ndarray:
        return np.load(self.path)


def spill(array: np.ndarray) -> Spilled:
    path = SPOOL.scratch(".npy")
    np.save(path, array)
    return Spilled(path, tuple(array.shape))


def loaded(value) -> np.ndarray:
    """``value`` as an array, reading it back if it was spilled."""
    return value.load() if isinstance(value, Spilled) else value


def materialised(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every weight in memory, for consumers that need them all at once (code
    generation); the model itself keeps its references."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in all_tensors(copy):
        inline(tensor)
    return copy


def release_freed_memory() -> None:
    """Hand memory that numpy freed back to the OS (glibc keeps freed heap pages otherwise): after a pass over
    a large model, what stays resident is what is still in use."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
