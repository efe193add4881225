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
import pickle
import struct
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.checkpoints.files import ByteSource, Window, prefetch_headers
from pipeline.checkpoints.readers import RAW_NUMPY, deepspeed_module
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
def member_offsets(
    src: ByteSource, begin: int, length: int, path: str
) -> tuple[zipfile.ZipFile, dict[str, tuple[int, int, int]]]:
    """The zip in ``[begin, begin + length)`` of ``src`` and, for each stored (uncompressed)
    member, ``(absolute data offset, size, crc)``."""
    try:
        zf = zipfile.ZipFile(io.BufferedReader(Window(src, begin, length)))
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise InputError(
            f"no zip archive at bytes {begin}-{begin + length} (truncated or corrupted?): {e}",
            path=path,
        ) from e
    out: dict[str, tuple[int, int, int]] = {}
    stored = [zi for zi in zf.infolist() if zi.compress_type == zipfile.ZIP_STORED]
    prefetch_headers(src, [begin + zi.header_offset for zi in stored])
    for zi in stored:
        hdr = src.read(begin + zi.header_offset, 30)
        if len(hdr) < 30 or hdr[:4] != b"PK\x03\x04":
            raise InputError(f"corrupt zip local header for {zi.filename}", path=path)
        nlen, xlen = struct.unpack("<HH", hdr[26:30])
        data = begin + zi.header_offset + 30 + nlen + xlen
        if data + zi.compress_size > begin + length:
            raise InputError(f"zip member {zi.filename} runs past its archive", path=path)
        out[zi.filename] = (data, zi.compress_size, zi.CRC)
    prefetch_headers(src, [])
    return zf, out


@dataclass(frozen=True)
class TensorData:
    """A tensor of a ``torch.save`` zip and the absolute byte offset of its storage."""

    ref: TensorRef
    storage_begin: int  # absolute offset of the storage's first byte


def describe_tensor_zip(src: ByteSource, begin: int, length: int, path: str) -> TensorData:
    """The one tensor a ``torch.save(tensor)`` zip in ``[begin, begin + length)`` of ``src``
    holds, checked against the zip (storage size, byte order); nothing in it is run."""
    zf, members = member_offsets(src, begin, length, path)
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


# --------------------------------------------------------------------------- whole state dicts
class _ODict(dict[Any, Any]):
    """``collections.OrderedDict`` of a pickle (a state_dict keeps its ``_metadata``)."""


class _TypeMarker:
    """``torch.Tensor`` / ``torch.nn.Parameter`` named in a pickle (never constructed)."""

    def __init__(self, qualname: str) -> None:
        self.qualname = qualname


def _rebuild_parameter(data: Any, _requires_grad: Any, _hooks: Any, *_state: Any) -> Any:
    if not isinstance(data, TensorRef):
        raise pickle.UnpicklingError("a parameter without a tensor")
    return data


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, _state: Any) -> Any:
    if func not in (_rebuild_v2, _rebuild_v3, _rebuild_parameter) or not isinstance(
        new_type, _TypeMarker
    ):
        raise pickle.UnpicklingError("a tensor of an unsupported type")
    return func(*args)


def _latin1(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as pickles of bytes use it (a string back to its bytes)."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("unexpected _codecs.encode call")
    return text.encode("latin1")


#: what a state_dict checkpoint may name besides tensors: torch's weights-only unpickler's
#: plain containers and scalars (anything else is refused, as ``torch.load`` refuses it)
_PLAIN = {
    ("collections", "OrderedDict"): _ODict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "bytearray"): bytearray,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("_codecs", "encode"): _latin1,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): _TypeMarker("torch.Tensor"),
    ("torch.nn.parameter", "Parameter"): _TypeMarker("torch.nn.parameter.Parameter"),
    ("torch", "device"): str,
    ("torch.serialization", "_get_layout"): str,
}


def _state_dict_globals(module: str, name: str) -> Any:
    found = _PLAIN.get((module, name))
    if found is not None:
        return found
    return _tensor_globals(module, name)


def describe_state_zip(src: ByteSource, path: str) -> tuple[Any, dict[str, int]]:
    """The object a ``torch.save`` zip holds, its tensors as :class:`TensorRef` (nothing in
    the pickle is run; globals beyond tensors and plain containers are refused), and the
    absolute data offset of each storage by key."""
    zf, members = member_offsets(src, 0, src.size, path)
    with zf:
        names = zf.namelist()
        pkl = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
        if pkl is None:
            raise InputError("not a torch.save archive (no data.pkl)", path=path)
        prefix = pkl[: -len("data.pkl")]
        try:
            raw = zf.read(pkl)
            order = zf.read(prefix + "byteorder") if prefix + "byteorder" in names else b"little"
        except (zipfile.BadZipFile, OSError, ValueError) as e:  # a CRC error among them
            raise InputError(f"corrupt archive: {e}", path=path) from e
    if order.strip() != b"little":
        raise InputError("big-endian tensor data is not supported", path=path)
    try:
        obj = _Unpickler(raw, _state_dict_globals, storages=True).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError) as e:
        raise InputError(
            "refused to unpickle: the checkpoint holds objects other than tensors and plain "
            f"containers (it could execute code): {e}",
            path=path,
        ) from e
    storages = {
        name[len(prefix) + len("data/") :]: b
        for name, (b, _n, _crc) in members.items()
        if name.startswith(prefix + "data/")
    }
    sizes = {
        name[len(prefix) + len("data/") :]: n
        for name, (_b, n, _crc) in members.items()
        if name.startswith(prefix + "data/")
    }
    _check_storages(obj, storages, sizes, path)
    return obj, storages


def _check_storages(obj: Any, begins: dict[str, int], sizes: dict[str, int], path: str) -> None:
    """Every tensor's storage is a stored member of the archive, as large as it says."""
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, dict):
            stack.extend(o.values())
        elif isinstance(o, list | tuple):
            stack.extend(o)
        elif isinstance(o, TensorRef):
            if o.key not in begins:
                raise InputError(
                    f"the archive lacks the storage data/{o.key} of a tensor (or it is "
                    "compressed)",
                    path=path,
                )
            itemsize = RAW_NUMPY[o.dtype].itemsize
            if sizes[o.key] < o.storage_numel * itemsize:
                raise InputError(
                    f"storage data/{o.key} holds {sizes[o.key]} bytes, not "
                    f"{o.storage_numel} x {o.dtype}",
                    path=path,
                )
            last = o.storage_offset + sum(
                (n - 1) * st for n, st in zip(o.shape, o.stride, strict=True)
            )
            if o.size and last >= o.storage_numel:
                raise InputError(f"a tensor runs past its storage data/{o.key}", path=path)


#: keys a training loop nests the state_dict under (as the local reader unwraps them)
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module")


class TorchZipReader:
    """A zip-format PyTorch checkpoint on a remote filesystem, read range by range without
    torch: the pickle is described by the allow-list unpickler and each tensor's elements
    are read straight from its storage's bytes (only the requested ranges are fetched).

    The same state_dicts as the local reader (``torch.load(weights_only=True)``): the object
    itself, or nested under ``state_dict``, ``model_state_dict``, ``model`` or ``module``;
    format ``deepspeed``: the weights under ``module``.
    """

    def __init__(self, spec: Any, path: str | None = None) -> None:
        from pipeline.checkpoints.files import open_source

        self.spec = spec
        path = path or spec.files[0]
        epoch = spec.epoch
        self._path = path
        self._src = open_source(path, epoch)
        try:
            if self._src.size == 0:
                raise InputError("empty file", path=path, epoch=epoch)
            try:
                obj, self._begins = describe_state_zip(self._src, path)
            except InputError as e:
                if e.reason.startswith("no zip archive"):
                    raise InputError(
                        "not a zip-format PyTorch checkpoint: truncated, corrupted, or saved in "
                        "the legacy format (re-save it with torch.save)",
                        path=path,
                        epoch=epoch,
                    ) from None
                raise InputError(e.reason, path=path, epoch=epoch) from None
            if spec.format == "deepspeed":
                obj = deepspeed_module(obj, path, epoch)
            self._sd = self._unwrap(obj, path, epoch)
        except BaseException:
            self._src.close()
            raise


    @staticmethod
    def _unwrap(obj: Any, path: str, epoch: int | None) -> dict[str, TensorRef]:
        if not isinstance(obj, dict):
            raise InputError(
                f"holds a {type(obj).__name__}, not a state_dict", path=path, epoch=epoch
            )
        if not all(isinstance(v, TensorRef) for v in obj.values()):
            for k in _WRAPPER_KEYS:
                inner = obj.get(k)
                if isinstance(inner, dict):
                    obj = inner
                    break
        out: dict[str, TensorRef] = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise InputError(f"non-string key {k!r}", path=path, epoch=epoch)
            if not isinstance(v, TensorRef):
                raise InputError(
                    f"non-tensor entry of type {type(v).__name__} in the state_dict",
                    path=path,
                    epoch=epoch,
                    key=k,
                )
            out[k] = v
        if not out:
            raise InputError("the state_dict is empty", path=path, epoch=epoch)
        return out

    def tensors(self) -> list[Any]:
        from pipeline.checkpoints.readers import TensorInfo

        return [TensorInfo(k, v.shape, v.dtype) for k, v in self._sd.items()]

    def _raw_range(self, name: str, start: int, stop: int) -> np.ndarray:
        ref = self._sd[name]
        raw_dt = RAW_NUMPY[ref.dtype]
        begin = self._begins[ref.key]
        if ref.contiguous():
            out = np.empty(stop - start, dtype=raw_dt)
            offset = begin + (ref.storage_offset + start) * raw_dt.itemsize
            self._src.readinto(memoryview(out.view(np.uint8)), offset)  # type: ignore[arg-type]
            return out
        storage = np.empty(ref.storage_numel, dtype=raw_dt)
        self._src.readinto(memoryview(storage.view(np.uint8)), begin)  # type: ignore[arg-type]
        view = np.lib.stride_tricks.as_strided(
            storage[ref.storage_offset :],
            shape=ref.shape,
            strides=tuple(st * raw_dt.itemsize for st in ref.stride),
            writeable=False,
        )
        return np.ascontiguousarray(view).reshape(-1)[start:stop]

    def prefetch(self, pieces: Sequence[tuple[str, int, int]]) -> None:
        """Fetch the bytes of ``(name, start, stop)`` ranges of contiguous tensors at once
        for this thread's next reads (see :meth:`RemoteSource.prefetch`)."""
        fetch = getattr(self._src, "prefetch", None)
        if fetch is None:
            return
        ranges = []
        for name, start, stop in pieces:
            ref = self._sd[name]
            if ref.contiguous():
                isz = RAW_NUMPY[ref.dtype].itemsize
                first = self._begins[ref.key] + ref.storage_offset * isz
                ranges.append((first + start * isz, first + stop * isz))
        fetch(ranges)

    def read_into(self, name: str, start: int, stop: int, out: np.ndarray) -> None:
        from pipeline.checkpoints.readers import to_float32

        to_float32(self._raw_range(name, start, stop), self._sd[name].dtype, out[: stop - start])

    def read_raw(self, name: str) -> np.ndarray:
        ref = self._sd[name]
        return np.array(self._raw_range(name, 0, ref.size), copy=True).reshape(ref.shape)

    def tensor_info(self, name: str) -> Any:
        """The :class:`~pipeline.checkpoints.readers.TensorInfo` of ``name`` (None: no such
        tensor)."""
        from pipeline.checkpoints.readers import TensorInfo

        ref = self._sd.get(name)
        return None if ref is None else TensorInfo(name, ref.shape, ref.dtype)

    def spans(self, name: str) -> tuple[tuple[str, int, int], ...] | None:
        """The byte range of the file holding the tensor's elements in order (None: a view
        with other strides)."""
        ref = self._sd.get(name)
        if ref is None or not ref.contiguous():
            return None
        isz = RAW_NUMPY[ref.dtype].itemsize
        first = self._begins[ref.key] + ref.storage_offset * isz
        return ((self._path, first, first + ref.size * isz),)

    def close(self) -> None:
        self._src.close()
