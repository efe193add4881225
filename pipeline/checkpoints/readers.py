"""Checkpoint readers: the only modules that read checkpoint files (this one, and the layouts
of :mod:`.distcp` and :mod:`.torchzip`).

Every reader exposes the same small interface (:class:`CheckpointReader`): the tensors of the
state_dict in order, and flat element ranges of one tensor converted to float32 into a
caller's buffer. Readers never load a whole checkpoint into memory:

- safetensors (single file, or sharded with ``model.safetensors.index.json``): the header is
  parsed (and validated by the safetensors library), then ranges are read with ``preadv``
  straight into the destination buffer;
- PyTorch zip-format files (``.pt``/``.pth``, Hugging Face ``.bin`` alone or sharded with
  ``pytorch_model.bin.index.json``, Lightning ``.ckpt``, DeepSpeed
  ``mp_rank_00_model_states.pt``): ``torch.load(mmap=True, weights_only=True)``, so only the
  touched pages are read and pickled code is refused. These need torch (the ``torch`` extra);
  nothing else here does;
- PyTorch Distributed Checkpoint folders (:mod:`.distcp`): tensor by tensor, range by range.

``strip_prefix`` (a spec field) removes a prefix (``model.``, ``module.``) from the names.
Every error is re-raised as :class:`~pipeline.errors.InputError` naming the file (and the
epoch and key where known).
"""

from __future__ import annotations

import itertools
import json
import os
import struct
import threading
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol, TypeVar

import numpy as np

from pipeline.buffers import scratch
from pipeline.checkpoints.content import digest_file
from pipeline.checkpoints.files import (
    ByteSource,
    LocalSource,
    RemoteSource,
    exists,
    is_url,
    open_source,
    read_bytes,
)
from pipeline.errors import InputError
from pipeline.store.remote import options_key

__all__ = [
    "CheckpointReader",
    "CheckpointSpec",
    "TensorInfo",
    "digest_file",
    "import_torch",
    "open_checkpoint",
    "raw_of",
    "spans_of",
    "to_float32",
]

_T = TypeVar("_T")
#: what to install for the PyTorch formats
TORCH_EXTRA = "pip install 'cmd-pipeline[torch]'"

#: safetensors dtype tags -> canonical dtype names (torch's, without the ``torch.`` prefix).
_ST_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}
ST_TAGS = {v: k for k, v in _ST_DTYPES.items()}

#: canonical dtype -> numpy dtype of the raw little-endian storage (bf16 as its uint16 bits).
RAW_NUMPY: dict[str, np.dtype[Any]] = {
    "float64": np.dtype("<f8"),
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
    "int64": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
    "int16": np.dtype("<i2"),
    "int8": np.dtype("i1"),
    "uint8": np.dtype("u1"),
    "uint16": np.dtype("<u2"),
    "uint32": np.dtype("<u4"),
    "uint64": np.dtype("<u8"),
    "bool": np.dtype("?"),
    "float8_e4m3fn": np.dtype("u1"),
    "float8_e5m2": np.dtype("u1"),
}
FLOATING = ("float64", "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class TensorInfo:
    """Name, shape and canonical dtype of one state_dict entry."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def floating(self) -> bool:
        return self.dtype in FLOATING


@dataclass(frozen=True)
class CheckpointSpec:
    """The file(s) of one epoch's checkpoint.

    ``format`` is one of :data:`FORMATS`: ``"torch"`` (one zip-format .pt/.pth/.bin/.ckpt),
    ``"safetensors"`` (one file), ``"hf-sharded"`` / ``"hf-sharded-bin"`` (``files[0]`` is
    ``model.safetensors.index.json`` / ``pytorch_model.bin.index.json``, the rest its shards),
    ``"deepspeed"`` (``mp_rank_00_model_states.pt``: the weights under ``module``) or
    ``"dcp"`` (``files[0]`` is a Distributed Checkpoint's ``.metadata``, the rest its
    ``.distcp`` files). ``sha256`` holds what identifies the files' contents once they are
    inspected (size, modification time and digest when known): it is part of the spec's
    identity, so :func:`cached_reader` never serves a reader opened on older contents.
    ``strip_prefix``: removed from the start of every tensor name that has it.
    """

    format: str
    files: tuple[str, ...]
    epoch: int | None = None
    sha256: tuple[str, ...] = ()
    strip_prefix: str | None = None

    @property
    def label(self) -> str:
        return self.files[0]


class CheckpointReader(Protocol):
    """What ingest and export need from a checkpoint."""

    spec: CheckpointSpec

    def tensors(self) -> list[TensorInfo]:
        """State_dict entries in their order."""
        ...

    def read_into(self, name: str, start: int, stop: int, out: np.ndarray) -> None:
        """Elements ``[start, stop)`` of the flattened tensor, as float32, into ``out``."""
        ...

    def read_raw(self, name: str) -> np.ndarray:
        """The whole tensor in its raw storage dtype (see ``RAW_NUMPY``), shaped."""
        ...

    # optional: ``spans(name)``, the ``(file, begin, end)`` byte ranges that hold the raw
    # elements of the flattened tensor in order (None when they do not: a view with other
    # strides); see :func:`spans_of`

    def close(self) -> None:
        """Release open files and mappings (the reader is not used afterwards)."""
        ...


# --------------------------------------------------------------------------- conversions
def to_float32(raw: np.ndarray, dtype: str, out: np.ndarray) -> None:
    """Convert raw storage values of ``dtype`` to float32 into ``out`` (exact for fp16/bf16).

    bfloat16 is the upper half of a float32: its bits shifted left by 16 are the exact value.
    """
    if dtype == "float32":
        np.copyto(out, raw.view(np.float32) if raw.dtype != np.float32 else raw)
    elif dtype == "bfloat16":
        np.left_shift(raw.view(np.uint16), 16, out=out.view(np.uint32), dtype=np.uint32)
    elif dtype in ("float16", "float64"):
        # float64 beyond float32's range becomes ±Inf (counted as such) and a signalling
        # NaN a NaN: expected, not worth numpy's warnings
        with np.errstate(over="ignore", invalid="ignore"):
            np.copyto(out, raw, casting="unsafe")
    else:
        raise TypeError(f"dtype {dtype} is not floating")


#: dtypes whose raw bytes float32 values give back exactly (:func:`raw_of`)
EXACT_RAW = ("float32", "bfloat16", "float16")


def raw_of(values: np.ndarray, dtype: str) -> np.ndarray | None:
    """The raw storage values that :func:`to_float32` turned into the float32 ``values``,
    bit for bit (NaN payloads included); None for dtypes it cannot give back (float64 was
    rounded).

    >>> raw = np.array([0x3F80, 0x7FC1, 0xFF80], dtype=np.uint16)
    >>> wide = np.empty(3, np.float32)
    >>> to_float32(raw, "bfloat16", wide)
    >>> raw_of(wide, "bfloat16").tolist() == raw.tolist()
    True
    """
    if dtype == "float32":
        return values
    if dtype == "bfloat16":
        return np.right_shift(values.view(np.uint32), 16).astype(np.uint16)
    if dtype == "float16":
        # float16 -> float32 -> float16 gives every one of the 65536 bit patterns back
        with np.errstate(invalid="ignore", over="ignore"):
            return values.astype(np.float16)
    return None


def spans_of(reader: object, name: str) -> tuple[tuple[str, int, int], ...] | None:
    """The ``(file, begin, end)`` byte ranges holding tensor ``name``'s raw elements in order,
    when the reader knows them (None otherwise: the bytes are then digested apart)."""
    fn = getattr(reader, "spans", None)
    if fn is None:
        return None
    out: tuple[tuple[str, int, int], ...] | None = fn(name)
    return out


def _scratch_buffer(nbytes: int) -> np.ndarray:
    """A per-thread reusable byte buffer (first-touch allocation is slow: reuse it)."""
    return scratch("reader-bytes", nbytes, np.uint8)




# --------------------------------------------------------------------------- safetensors
@dataclass(frozen=True)
class _StEntry:
    info: TensorInfo
    file: str
    begin: int  # absolute byte offset in file


def _parse_safetensors_header(
    path: str, epoch: int | None, source: ByteSource | None = None
) -> tuple[list[_StEntry], int]:
    """Parse and validate a safetensors header; return entries in header order.

    A remote file (``source`` given) is read in two ranged requests (the length, then the
    header); the safetensors library's own check of the header needs a local file, so there
    this parser's checks (dtypes, shapes, offsets inside the file, no overlaps, no trailing
    bytes) are the ones made.
    """
    src = source if source is not None else LocalSource(path, epoch)
    try:
        size = src.size
        if size == 0:
            raise InputError("empty file", path=path, epoch=epoch)
        if size < 8:
            raise InputError("truncated safetensors file (no header)", path=path, epoch=epoch)
        (hlen,) = struct.unpack("<Q", src.read(0, 8))
        if hlen > 100 * 1024 * 1024 or 8 + hlen > size:
            raise InputError(
                f"corrupt or truncated safetensors header (header length {hlen}, file size {size})",
                path=path,
                epoch=epoch,
            )
        raw = src.read(8, hlen)
    finally:
        if source is None:
            src.close()
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"corrupt safetensors header: {e}", path=path, epoch=epoch) from e
    if not isinstance(header, dict):
        raise InputError("corrupt safetensors header: not a JSON object", path=path, epoch=epoch)
    data_start = 8 + hlen
    data_len = size - data_start
    entries: list[_StEntry] = []
    spans: list[tuple[int, int, str]] = []
    for name, desc in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(desc, dict) or not {"dtype", "shape", "data_offsets"} <= desc.keys():
            raise InputError("malformed tensor description", path=path, epoch=epoch, key=name)
        tag = desc["dtype"]
        if tag not in _ST_DTYPES:
            raise InputError(f"unsupported dtype {tag}", path=path, epoch=epoch, key=name)
        dtype = _ST_DTYPES[tag]
        shape = desc["shape"]
        offs = desc["data_offsets"]
        if not (
            isinstance(shape, list)
            and all(isinstance(s, int) and s >= 0 for s in shape)
            and isinstance(offs, list)
            and len(offs) == 2
            and all(isinstance(o, int) for o in offs)
        ):
            raise InputError("malformed shape or offsets", path=path, epoch=epoch, key=name)
        info = TensorInfo(name, tuple(shape), dtype)
        b, end = offs
        if not (0 <= b <= end <= data_len) or end - b != info.size * RAW_NUMPY[dtype].itemsize:
            raise InputError(
                f"data offsets {offs} do not fit the tensor or the file (truncated?)",
                path=path,
                epoch=epoch,
                key=name,
            )
        entries.append(_StEntry(info, path, data_start + b))
        spans.append((b, end, name))
    spans.sort()
    for (_b0, e0, n0), (b1, _e1, n1) in itertools.pairwise(spans):
        if b1 < e0:
            raise InputError(f"tensors {n0!r} and {n1!r} overlap", path=path, epoch=epoch)
    if spans and spans[-1][1] != data_len:
        raise InputError(
            f"file has {data_len - spans[-1][1]} bytes after the last tensor's data",
            path=path,
            epoch=epoch,
        )
    if not is_url(path):
        _validate_with_library(path, epoch)
    return entries, size


def _validate_with_library(path: str, epoch: int | None) -> None:
    """Let the safetensors library check the header too (it reads the header only)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            f.keys()
    except Exception as e:  # the library raises its own SafetensorError and others
        raise InputError(f"safetensors refused the file: {e}", path=path, epoch=epoch) from e


def _sharded(
    index_path: str, epoch: int | None, open_shard: Callable[[str], Mapping[str, _T]]
) -> list[tuple[str, _T]]:
    """The tensors of a Hugging Face sharded checkpoint in the index's order, each with what
    ``open_shard`` (a shard's path -> its tensors by name) gives for it; the index and the
    shards must agree."""
    try:
        index = json.loads(read_bytes(index_path, epoch).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"unreadable shard index: {e}", path=index_path, epoch=epoch) from e
    wmap = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wmap, dict) or not wmap:
        raise InputError("shard index has no weight_map", path=index_path, epoch=epoch)
    base = os.path.dirname(index_path)
    shard_entries: dict[str, Mapping[str, _T]] = {}
    for shard in dict.fromkeys(wmap.values()):
        if not isinstance(shard, str) or os.path.isabs(shard) or ".." in shard.split("/"):
            raise InputError(f"bad shard name {shard!r}", path=index_path, epoch=epoch)
        p = f"{base}/{shard}" if is_url(index_path) else os.path.join(base, shard)
        if not exists(p):
            raise InputError(
                f"shard {shard} listed in the index is missing", path=index_path, epoch=epoch
            )
        shard_entries[shard] = open_shard(p)
    out = []
    for name, shard in wmap.items():
        ent = shard_entries[shard].get(name)
        if ent is None:
            raise InputError(
                f"the index places this tensor in {shard}, which lacks it",
                path=index_path,
                epoch=epoch,
                key=name,
            )
        out.append((name, ent))
    for shard, by_name in shard_entries.items():
        extra = sorted(set(by_name) - set(wmap))
        if extra:
            raise InputError(
                f"shard {shard} holds tensors missing from the index: {extra[:5]}",
                path=index_path,
                epoch=epoch,
            )
    return out


class SafetensorsReader:
    """One safetensors file, or the shards of a Hugging Face sharded checkpoint."""

    def __init__(self, spec: CheckpointSpec) -> None:
        self.spec = spec
        self._entries: dict[str, _StEntry] = {}
        self._order: list[str] = []
        self._sources: dict[str, ByteSource] = {}
        self._lock = threading.Lock()  # the threads of a process share a cached reader
        if spec.format == "safetensors":
            path = spec.files[0]
            entries, _ = _parse_safetensors_header(path, spec.epoch, self._remote(path))
            for ent in entries:
                self._entries[ent.info.name] = ent
                self._order.append(ent.info.name)
        else:
            self._open_sharded()

    def _remote(self, path: str) -> ByteSource | None:
        """The source of a remote file (opened once: its size is its first request)."""
        if not is_url(path):
            return None
        return self._source(path)

    def _open_sharded(self) -> None:
        epoch = self.spec.epoch

        def shard(p: str) -> dict[str, _StEntry]:
            return {e.info.name: e for e in _parse_safetensors_header(p, epoch, self._remote(p))[0]}

        for name, ent in _sharded(self.spec.files[0], epoch, shard):
            self._entries[name] = ent
            self._order.append(name)

    def tensors(self) -> list[TensorInfo]:
        return [self._entries[n].info for n in self._order]

    def _source(self, path: str) -> ByteSource:
        with self._lock:  # one source per file, even when two threads ask at once
            src = self._sources.get(path)
            if src is None:
                src = self._sources[path] = open_source(path, self.spec.epoch)
            return src

    def prefetch(self, pieces: Sequence[tuple[str, int, int]]) -> None:
        """Fetch the bytes of ``(name, start, stop)`` element ranges of remote files at once,
        for this thread's next :meth:`read_into` calls (local files: nothing to do)."""
        by_file: dict[str, list[tuple[int, int]]] = {}
        for name, start, stop in pieces:
            ent = self._entries[name]
            isz = RAW_NUMPY[ent.info.dtype].itemsize
            by_file.setdefault(ent.file, []).append(
                (ent.begin + start * isz, ent.begin + stop * isz)
            )
        for path, src in list(self._sources.items()):
            if isinstance(src, RemoteSource):
                src.prefetch(by_file.get(path, []))
        for path, ranges in by_file.items():
            if path not in self._sources and is_url(path):
                src = self._source(path)
                if isinstance(src, RemoteSource):
                    src.prefetch(ranges)

    def read_into(self, name: str, start: int, stop: int, out: np.ndarray) -> None:
        ent = self._entries[name]
        raw_dt = RAW_NUMPY[ent.info.dtype]
        n = stop - start
        offset = ent.begin + start * raw_dt.itemsize
        src = self._source(ent.file)
        if ent.info.dtype == "float32":
            view = memoryview(out[:n].view(np.uint8))  # type: ignore[arg-type]
            src.readinto(view, offset)
            return
        buf = _scratch_buffer(n * raw_dt.itemsize)
        src.readinto(memoryview(buf), offset)  # type: ignore[arg-type]
        to_float32(buf.view(raw_dt), ent.info.dtype, out[:n])

    def spans(self, name: str) -> tuple[tuple[str, int, int], ...] | None:
        ent = self._entries[name]
        n = ent.info.size * RAW_NUMPY[ent.info.dtype].itemsize
        return ((ent.file, ent.begin, ent.begin + n),)

    def read_raw(self, name: str) -> np.ndarray:
        ent = self._entries[name]
        raw_dt = RAW_NUMPY[ent.info.dtype]
        arr = np.empty(ent.info.size, dtype=raw_dt)
        self._source(ent.file).readinto(memoryview(arr.view(np.uint8)), ent.begin)  # type: ignore[arg-type]
        return arr.reshape(ent.info.shape)

    def close(self) -> None:
        for src in self._sources.values():
            src.close()
        self._sources.clear()

    def __del__(self) -> None:  # pragma: no cover - best effort
        # no module globals here (contextlib...): they may be gone at interpreter exit
        try:  # noqa: SIM105
            self.close()
        except Exception:
            pass


# --------------------------------------------------------------------------- torch zip
#: keys a training loop nests the state_dict under (Lightning: ``state_dict``; DeepSpeed:
#: ``module``)
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module")


def import_torch(path: str, epoch: int | None = None) -> Any:
    """torch, or a one-line :class:`InputError` naming the file and the extra to install."""
    try:
        import torch
    except ImportError:
        raise InputError(
            f"reading PyTorch checkpoints needs torch, which is not installed: {TORCH_EXTRA}",
            path=path,
            epoch=epoch,
        ) from None
    return torch


class TorchReader:
    """A zip-format PyTorch checkpoint, memory-mapped, loaded with ``weights_only=True``.

    ``.pt``/``.pth``/``.bin``/``.ckpt`` (the state_dict itself, or nested under one of
    ``state_dict``, ``model_state_dict``, ``model``, ``module``); format ``deepspeed``: the
    weights under ``module`` of DeepSpeed's ``mp_rank_00_model_states.pt``.
    """

    def __init__(self, spec: CheckpointSpec, path: str | None = None) -> None:
        self.spec = spec
        path = path or spec.files[0]
        epoch = spec.epoch
        torch = import_torch(path, epoch)
        try:
            size = os.path.getsize(path)
        except OSError as e:
            raise InputError(f"cannot read file: {e.strerror}", path=path, epoch=epoch) from e
        if size == 0:
            raise InputError("empty file", path=path, epoch=epoch)
        if not zipfile.is_zipfile(path):
            raise InputError(
                "not a zip-format PyTorch checkpoint: truncated, corrupted, or saved in the "
                "legacy format (re-save it with torch.save)",
                path=path,
                epoch=epoch,
            )
        import pickle

        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as e:
            raise InputError(
                "refused to unpickle: the checkpoint holds objects other than tensors and plain "
                f"containers (it could execute code); torch said: {str(e).splitlines()[0]}",
                path=path,
                epoch=epoch,
            ) from e
        except Exception as e:
            raise InputError(
                f"corrupt PyTorch checkpoint: {str(e).splitlines()[0]}", path=path, epoch=epoch
            ) from e
        if spec.format == "deepspeed":
            obj = deepspeed_module(obj, path, epoch)
        self._sd = self._unwrap(obj, path, epoch, torch)
        self._flat: dict[str, Any] = {}
        self._path = path
        self._spans: dict[str, tuple[tuple[str, int, int], ...] | None] | None = None

    @staticmethod
    def _unwrap(obj: Any, path: str, epoch: int | None, torch: Any) -> dict[str, Any]:
        if not isinstance(obj, Mapping):
            raise InputError(
                f"holds a {type(obj).__name__}, not a state_dict", path=path, epoch=epoch
            )
        if not all(isinstance(v, torch.Tensor) for v in obj.values()):
            for k in _WRAPPER_KEYS:
                inner = obj.get(k)
                if isinstance(inner, Mapping):
                    obj = inner
                    break
        out: dict[str, Any] = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise InputError(f"non-string key {k!r}", path=path, epoch=epoch)
            if not isinstance(v, torch.Tensor):
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

    def tensors(self) -> list[TensorInfo]:
        return [
            TensorInfo(k, tuple(int(s) for s in v.shape), str(v.dtype).removeprefix("torch."))
            for k, v in self._sd.items()
        ]

    def _flat_tensor(self, name: str) -> Any:
        t = self._flat.get(name)
        if t is None:
            t = self._sd[name].reshape(-1)
            self._flat[name] = t
        return t

    def _raw_numpy(self, t: Any) -> np.ndarray:
        import torch

        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(np.uint16)
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            return t.view(torch.uint8).numpy()
        return t.numpy()

    def read_into(self, name: str, start: int, stop: int, out: np.ndarray) -> None:
        t = self._flat_tensor(name)[start:stop]
        dtype = str(t.dtype).removeprefix("torch.")
        try:
            to_float32(self._raw_numpy(t), dtype, out[: stop - start])
        except RuntimeError as e:  # a truncated mmap surfaces here
            raise InputError(
                f"cannot read tensor data: {e}", path=self._path, epoch=self.spec.epoch, key=name
            ) from e

    def read_raw(self, name: str) -> np.ndarray:
        return np.array(self._raw_numpy(self._sd[name].contiguous()), copy=True)

    def spans(self, name: str) -> tuple[tuple[str, int, int], ...] | None:
        """Where the tensor's bytes lie in the file, from the torch-free description of the
        archive (:mod:`.torchzip`); None when it cannot tell, or tells something else than
        torch loaded."""
        spans = self._spans
        if spans is None:
            # built whole, then published: threads of one process share a cached reader, and
            # one that saw a half-built table would take a tensor for one without spans
            spans = {}
            from pipeline.checkpoints.torchzip import TorchZipReader

            try:
                described = TorchZipReader(self.spec, self._path)
            except InputError:
                described = None
            if described is not None:
                try:
                    for k, t in self._sd.items():
                        got = described.spans(k)
                        info = described.tensor_info(k)
                        same = info is not None and (
                            info.shape == tuple(int(d) for d in t.shape)
                            and info.dtype == str(t.dtype).removeprefix("torch.")
                        )
                        spans[k] = got if same else None
                finally:
                    described.close()
            self._spans = spans
        return spans.get(name)

    def close(self) -> None:
        self._sd = {}
        self._flat = {}


def _torch_reader(spec: CheckpointSpec, path: str | None = None) -> CheckpointReader:
    """A zip-format PyTorch file: local ones through ``torch.load(mmap=True)``; remote ones
    range by range without torch (:class:`~pipeline.checkpoints.torchzip.TorchZipReader`)."""
    path = path or spec.files[0]
    if is_url(path):
        from pipeline.checkpoints.torchzip import TorchZipReader

        return TorchZipReader(spec, path)
    return TorchReader(spec, path)


class ShardedTorchReader:
    """A Hugging Face sharded ``.bin`` checkpoint: ``pytorch_model.bin.index.json`` and its
    zip-format shards (each read as :class:`TorchReader` reads a file)."""

    def __init__(self, spec: CheckpointSpec) -> None:
        self.spec = spec
        self._readers: list[CheckpointReader] = []

        def shard(p: str) -> dict[str, tuple[CheckpointReader, TensorInfo]]:
            r = _torch_reader(spec, p)
            self._readers.append(r)
            return {t.name: (r, t) for t in r.tensors()}

        self._entries = dict(_sharded(spec.files[0], spec.epoch, shard))

    def tensors(self) -> list[TensorInfo]:
        return [t for _r, t in self._entries.values()]

    def read_into(self, name: str, start: int, stop: int, out: np.ndarray) -> None:
        self._entries[name][0].read_into(name, start, stop, out)

    def prefetch(self, pieces: Sequence[tuple[str, int, int]]) -> None:
        for r in self._readers:
            mine = [p for p in pieces if self._entries[p[0]][0] is r]
            prefetch(r, mine)

    def read_raw(self, name: str) -> np.ndarray:
        return self._entries[name][0].read_raw(name)

    def spans(self, name: str) -> tuple[tuple[str, int, int], ...] | None:
        return spans_of(self._entries[name][0], name)

    def close(self) -> None:
        for r in self._readers:
            r.close()


class _PrefixStripped:
    """Another reader's tensors with ``prefix`` removed from the names that start with it."""

    def __init__(self, inner: CheckpointReader, prefix: str) -> None:
        self.spec = inner.spec
        self._inner = inner
        where = {"path": inner.spec.label, "epoch": inner.spec.epoch}
        infos = inner.tensors()
        if not any(t.name.startswith(prefix) for t in infos):
            raise InputError(
                f"no tensor name starts with the prefix {prefix!r} to strip (strip_prefix); "
                f"the names look like {infos[0].name!r}",
                **where,  # type: ignore[arg-type]
            )
        self._original: dict[str, str] = {}
        self._infos: list[TensorInfo] = []
        for t in infos:
            name = t.name.removeprefix(prefix)
            if not name or name in self._original:
                raise InputError(
                    f"stripping {prefix!r} leaves "
                    + ("an empty name" if not name else f"two tensors named {name!r}"),
                    key=t.name,
                    **where,  # type: ignore[arg-type]
                )
            self._original[name] = t.name
            self._infos.append(TensorInfo(name, t.shape, t.dtype))

    def tensors(self) -> list[TensorInfo]:
        return list(self._infos)

    def read_into(self, name: str, start: int, stop: int, out: np.ndarray) -> None:
        self._inner.read_into(self._original[name], start, stop, out)

    def prefetch(self, pieces: Sequence[tuple[str, int, int]]) -> None:
        prefetch(self._inner, [(self._original[n], a, b) for n, a, b in pieces])

    def read_raw(self, name: str) -> np.ndarray:
        return self._inner.read_raw(self._original[name])

    def spans(self, name: str) -> tuple[tuple[str, int, int], ...] | None:
        return spans_of(self._inner, self._original[name])

    def close(self) -> None:
        self._inner.close()


# --------------------------------------------------------------------------- entry points
def prefetch(reader: CheckpointReader, pieces: Sequence[tuple[str, int, int]]) -> None:
    """Let ``reader`` fetch the ``(name, start, stop)`` element ranges the calling thread is
    about to read, all at once, when it can (remote files); ``[]`` drops what it kept."""
    fetch = getattr(reader, "prefetch", None)
    if fetch is not None:
        fetch(pieces)


#: every checkpoint format a spec can name (see :class:`CheckpointSpec`)
FORMATS = ("torch", "safetensors", "hf-sharded", "hf-sharded-bin", "deepspeed", "dcp")


def open_checkpoint(spec: CheckpointSpec) -> CheckpointReader:
    """Open the checkpoint of one epoch (reads headers only)."""
    reader: CheckpointReader
    if spec.format in ("torch", "deepspeed"):
        reader = _torch_reader(spec)
    elif spec.format in ("safetensors", "hf-sharded"):
        reader = SafetensorsReader(spec)
    elif spec.format == "hf-sharded-bin":
        reader = ShardedTorchReader(spec)
    elif spec.format == "dcp":
        from pipeline.checkpoints.distcp import DcpReader

        reader = DcpReader(spec)
    else:
        raise InputError(
            f"unknown checkpoint format {spec.format!r}", path=spec.label, epoch=spec.epoch
        )
    return _PrefixStripped(reader, spec.strip_prefix) if spec.strip_prefix else reader


def cached_reader(spec: CheckpointSpec) -> CheckpointReader:
    """Per-process cache of open readers, so a worker parses each header once.

    Pass a spec with ``sha256`` set: a file rewritten since a reader was cached then gets a
    new reader instead of the stale header (and file descriptor or mmap) of the old one. A
    remote checkpoint's reader is also opened afresh when its storage options change.
    """
    return _cached_reader(spec, options_key(spec.label))


@lru_cache(maxsize=8)
def _cached_reader(spec: CheckpointSpec, _options: str) -> CheckpointReader:
    return open_checkpoint(spec)


def deepspeed_module(obj: Any, path: str, epoch: int | None) -> Any:
    """The weights of a DeepSpeed ``mp_rank_XX_model_states.pt`` (its ``module`` entry), or a
    one-line :class:`InputError` (not such a file; a pipeline-parallel checkpoint)."""
    module = obj.get("module", ...) if isinstance(obj, Mapping) else ...
    if module is ...:
        raise InputError(
            "not a DeepSpeed model-states file (it has no 'module' entry)",
            path=path,
            epoch=epoch,
        )
    if module is None:
        raise InputError(
            "holds no weights under 'module': a pipeline-parallel DeepSpeed checkpoint "
            "(its layers are in layer_*-model_states.pt files), which is not supported",
            path=path,
            epoch=epoch,
        )
    return module
