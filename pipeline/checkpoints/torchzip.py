"""Describing ``torch.save`` zips without running their pickles or importing torch.

A zip-format ``torch.save`` archive holds ``<prefix>/data.pkl`` (the pickled object, whose
tensors refer to storages by key) and one stored (uncompressed) member ``<prefix>/data/<key>``
per storage. :func:`describe_tensor_zip` parses the pickle with an allow-list unpickler whose
globals are inert stand-ins (nothing in the file is ever called), and returns where the
tensor's bytes lie, so that they can be read range by range with ``os.preadv``.

:func:`safe_unpickle` is the same unpickler for other small pickles of known classes (the
``.metadata`` of a PyTorch Distributed Checkpoint): allow-listed classes become
:class:`Stub` objects that only record their arguments and state.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.checkpoints.readers import RAW_NUMPY
from pipeline.errors import InputError

__all__ = [
    "TORCH_DTYPES",
    "Stub",
    "TensorRef",
    "Window",
    "describe_tensor_zip",
    "member_offsets",
    "safe_unpickle",
]

#: torch's dtype names (as ``torch.<name>`` globals) -> canonical dtype names
TORCH_DTYPES = {
    "float64": "float64",
    "double": "float64",
    "float32": "float32",
    "float": "float32",
    "float16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "int64": "int64",
    "long": "int64",
    "int32": "int32",
    "int": "int32",
    "int16": "int16",
    "short": "int16",
    "int8": "int8",
    "uint8": "uint8",
    "uint16": "uint16",
    "uint32": "uint32",
    "uint64": "uint64",
    "bool": "bool",
    "float8_e4m3fn": "float8_e4m3fn",
    "float8_e5m2": "float8_e5m2",
}
#: legacy typed storage classes (``torch.FloatStorage``...) -> canonical dtype names
_STORAGE_DTYPES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
}


class Stub:
    """An object of an allow-listed class, recorded instead of constructed: ``args`` are its
    constructor's arguments (a ``REDUCE``), ``state`` what pickle would have set on it."""

    qualname = "?"
    #: (instances made by NEWOBJ skip ``__init__``: these class defaults stand in)
    args: tuple[Any, ...] = ()
    state: Any = None

    def __init__(self, *args: Any) -> None:
        self.args = args
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def field(self, name: str, default: Any = None) -> Any:
        """An attribute from the recorded state (a dict, or ``(None, slots)``)."""
        state = self.state
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            merged = {**(state[0] or {}), **state[1]}
            return merged.get(name, default)
        if isinstance(state, dict):
            return state.get(name, default)
        return default


def _stub_class(module: str, name: str) -> type[Stub]:
    return type(name, (Stub,), {"qualname": f"{module}.{name}"})


@dataclass(frozen=True)
class _DType:
    name: str  # canonical


@dataclass(frozen=True)
class _StorageType:
    dtype: str | None  # None: an untyped storage (its tensor names the dtype)


@dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: str | None
    numel: int  # elements of ``dtype``; bytes for an untyped storage


@dataclass(frozen=True)
class TensorRef:
    """A tensor of a ``torch.save`` pickle: its storage and its view of it."""

    key: str
    dtype: str
    storage_numel: int  # elements of dtype
    storage_offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    def contiguous(self) -> bool:
        """Whether the tensor is C-contiguous in its storage (size-1 dims may have any
        stride)."""
        expect = 1
        for n, s in zip(reversed(self.shape), reversed(self.stride), strict=True):
            if n != 1 and s != expect:
                return False
            expect *= n
        return True


def _rebuild_v2(
    storage: _StorageRef, offset: int, size: Any, stride: Any, *_rest: Any
) -> TensorRef:
    if not isinstance(storage, _StorageRef) or storage.dtype is None:
        raise pickle.UnpicklingError("a tensor without a typed storage")
    return _tensor_ref(storage, storage.dtype, storage.numel, offset, size, stride)


def _rebuild_v3(
    storage: _StorageRef,
    offset: int,
    size: Any,
    stride: Any,
    _grad: Any,
    _hooks: Any,
    dtype: Any,
    *_rest: Any,
) -> TensorRef:
    if not isinstance(storage, _StorageRef) or not isinstance(dtype, _DType):
        raise pickle.UnpicklingError("a tensor without a storage or a dtype")
    numel = storage.numel
    if storage.dtype is None:  # untyped: numel counts bytes
        numel //= RAW_NUMPY[dtype.name].itemsize
    return _tensor_ref(storage, dtype.name, numel, offset, size, stride)


def _tensor_ref(
    storage: _StorageRef, dtype: str, numel: int, offset: Any, size: Any, stride: Any
) -> TensorRef:
    if not (
        isinstance(offset, int)
        and isinstance(size, tuple)
        and isinstance(stride, tuple)
        and len(size) == len(stride)
        and all(isinstance(v, int) and v >= 0 for v in (*size, *stride))
    ):
        raise pickle.UnpicklingError("malformed tensor view")
    return TensorRef(storage.key, dtype, numel, offset, size, stride)


def _torch_global(name: str) -> Any:
    if name == "Size":
        return tuple
    if name in TORCH_DTYPES:
        return _DType(TORCH_DTYPES[name])
    if name in _STORAGE_DTYPES:
        return _StorageType(_STORAGE_DTYPES[name])
    if name == "UntypedStorage":
        return _StorageType(None)
    return None


class _Unpickler(pickle.Unpickler):
    """Resolves only allow-listed globals, each to an inert stand-in."""

    def __init__(self, data: bytes, allow: Callable[[str, str], Any], storages: bool) -> None:
        super().__init__(io.BytesIO(data))
        self._allow = allow
        self._storages = storages

    def find_class(self, module: str, name: str) -> Any:
        found = self._allow(module, name)
        if found is None:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        return found

    def persistent_load(self, pid: Any) -> Any:
        if (
            self._storages
            and isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)
            and isinstance(pid[2], str)
            and isinstance(pid[4], int)
        ):
            return _StorageRef(pid[2], pid[1].dtype, pid[4])
        raise pickle.UnpicklingError(f"unexpected persistent id {pid!r:.60}")


def _tensor_globals(module: str, name: str) -> Any:
    if module == "torch._utils" and name == "_rebuild_tensor_v2":
        return _rebuild_v2
    if module == "torch._utils" and name == "_rebuild_tensor_v3":
        return _rebuild_v3
    if module == "torch.storage" and name == "UntypedStorage":
        return _StorageType(None)
    if module == "torch":
        return _torch_global(name)
    if module == "collections" and name == "OrderedDict":
        return dict
    return None


_STUBS: dict[tuple[str, str], type[Stub]] = {}


def _stub(module: str, name: str) -> type[Stub]:
    cls = _STUBS.get((module, name))
    if cls is None:
        cls = _STUBS[(module, name)] = _stub_class(module, name)
    return cls


def safe_unpickle(data: bytes, stub_modules: tuple[str, ...]) -> Any:
    """Unpickle ``data`` without running anything in it.

    Classes of ``stub_modules`` (and ``pathlib`` paths) become :class:`Stub` objects; torch
    dtypes become their canonical names' markers, ``torch.Size`` a tuple. Any other global is
    refused with :class:`pickle.UnpicklingError`.
    """

    def allow(module: str, name: str) -> Any:
        if module == "torch":
            found = _torch_global(name)
            return found.name if isinstance(found, _DType) else found
        if module == "torch.serialization" and name == "_get_layout":
            return str
        if module.startswith(stub_modules) or module == "pathlib":
            return _stub(module, name)
        if module == "collections" and name == "OrderedDict":
            return dict
        return None

    return _Unpickler(data, allow, storages=False).load()


# --------------------------------------------------------------------------- zip windows
class Window(io.RawIOBase):
    """``[begin, begin + length)`` of an open file, as a read-only seekable file (pread)."""

    def __init__(self, fd: int, begin: int, length: int) -> None:
        super().__init__()
        self._fd, self._begin, self._length, self._pos = fd, begin, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), self._length - self._pos))
        if n == 0:
            return 0
        got = os.preadv(self._fd, [memoryview(b)[:n]], self._begin + self._pos)
        self._pos += got
        return got


def member_offsets(
    fd: int, begin: int, length: int, path: str
) -> tuple[zipfile.ZipFile, dict[str, tuple[int, int, int]]]:
    """The zip in ``[begin, begin + length)`` of ``fd`` and, for each stored (uncompressed)
    member, ``(absolute data offset, size, crc)``."""
    try:
        zf = zipfile.ZipFile(io.BufferedReader(Window(fd, begin, length)))
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise InputError(
            f"no zip archive at bytes {begin}-{begin + length} (truncated or corrupted?): {e}",
            path=path,
        ) from e
    out: dict[str, tuple[int, int, int]] = {}
    for zi in zf.infolist():
        if zi.compress_type != zipfile.ZIP_STORED:
            continue
        hdr = os.pread(fd, 30, begin + zi.header_offset)
        if len(hdr) < 30 or hdr[:4] != b"PK\x03\x04":
            raise InputError(f"corrupt zip local header for {zi.filename}", path=path)
        nlen, xlen = struct.unpack("<HH", hdr[26:30])
        data = begin + zi.header_offset + 30 + nlen + xlen
        if data + zi.compress_size > begin + length:
            raise InputError(f"zip member {zi.filename} runs past its archive", path=path)
        out[zi.filename] = (data, zi.compress_size, zi.CRC)
    return zf, out


@dataclass(frozen=True)
class TensorData:
    """A tensor of a ``torch.save`` zip and the absolute byte offset of its storage."""

    ref: TensorRef
    storage_begin: int  # absolute offset of the storage's first byte


def describe_tensor_zip(fd: int, begin: int, length: int, path: str) -> TensorData:
    """The one tensor a ``torch.save(tensor)`` zip in ``[begin, begin + length)`` of ``fd``
    holds, checked against the zip (storage size, byte order); nothing in it is run."""
    zf, members = member_offsets(fd, begin, length, path)
    with zf:
        names = zf.namelist()
        pkl = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
        if pkl is None:
            raise InputError(
                f"the archive at byte {begin} is not a torch.save archive (no data.pkl)", path=path
            )
        prefix = pkl[: -len("data.pkl")]
        try:
            raw = zf.read(pkl)
            order = zf.read(prefix + "byteorder") if prefix + "byteorder" in names else b"little"
        except (zipfile.BadZipFile, OSError, ValueError) as e:  # a CRC error among them
            raise InputError(f"corrupt archive at byte {begin}: {e}", path=path) from e
    if order.strip() != b"little":
        raise InputError(f"big-endian tensor data at byte {begin} is not supported", path=path)
    try:
        obj = _Unpickler(raw, _tensor_globals, storages=True).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError) as e:
        raise InputError(
            f"refused the pickle of the archive at byte {begin} (only plain tensors are read): {e}",
            path=path,
        ) from e
    if not isinstance(obj, TensorRef):
        raise InputError(
            f"the archive at byte {begin} holds a {type(obj).__name__}, not a tensor", path=path
        )
    member = members.get(f"{prefix}data/{obj.key}")
    if member is None:
        raise InputError(
            f"the archive at byte {begin} lacks the storage of its tensor (data/{obj.key})",
            path=path,
        )
    itemsize = RAW_NUMPY[obj.dtype].itemsize
    if member[1] != obj.storage_numel * itemsize:
        raise InputError(
            f"the storage at byte {member[0]} holds {member[1]} bytes, not "
            f"{obj.storage_numel} x {obj.dtype}",
            path=path,
        )
    last = obj.storage_offset + sum((n - 1) * s for n, s in zip(obj.shape, obj.stride, strict=True))
    if obj.size and last >= obj.storage_numel:
        raise InputError(f"the tensor at byte {begin} runs past its storage", path=path)
    return TensorData(obj, member[0])
