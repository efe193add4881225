"""PyTorch Distributed Checkpoint folders (``torch.distributed.checkpoint.save``, e.g. FSDP2).

A folder holds ``.metadata`` (a pickle of the checkpoint's layout: every tensor's global
shape, dtype and chunks, and where each chunk's bytes lie) and ``__<rank>_<i>.distcp`` files.
Each chunk is one ``torch.save`` archive at an offset of a ``.distcp`` file.

The reader reads the layout with an allow-list unpickler (:mod:`.torchzip`: nothing in the
file runs) and each tensor's elements range by range straight from the archives' storages:
tensor by tensor, never the whole state. The state_dict is the folder's top-level tensors,
or the entries under a ``model`` (``state_dict``, ``model_state_dict``, ``module``) key when
the checkpoint nests it beside training state (``{"model": ..., "optimizer": ...}``).
"""

from __future__ import annotations

import os
import pickle
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.checkpoints.files import ByteSource, is_url, open_source, read_bytes
from pipeline.checkpoints.readers import RAW_NUMPY, TensorInfo, to_float32
from pipeline.checkpoints.torchzip import (
    Stub,
    TensorData,
    describe_tensor_zip,
    member_offsets,
    safe_unpickle,
)
from pipeline.errors import InputError

__all__ = ["METADATA_NAME", "SUFFIX", "DcpReader", "distcp_members", "is_dcp_dir"]

METADATA_NAME = ".metadata"
SUFFIX = ".distcp"
#: keys under which a checkpoint nests the model's state_dict beside training state
NESTED_KEYS = ("model", "state_dict", "model_state_dict", "module")
_MODULES = ("torch.distributed.checkpoint",)


def is_dcp_dir(d: str) -> bool:
    """Whether the local folder ``d`` is a Distributed Checkpoint (``.metadata`` and
    ``*.distcp``)."""
    return os.path.isfile(os.path.join(d, METADATA_NAME)) and any(
        n.endswith(SUFFIX) for n in os.listdir(d)
    )


def _join(base: str, rel: str) -> str:
    return f"{base}/{rel}" if is_url(base) else os.path.join(base, rel)


def _dirname(path: str) -> str:
    return path.rsplit("/", 1)[0] if is_url(path) else os.path.dirname(path)


@dataclass(frozen=True)
class _Chunk:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str  # absolute path of the .distcp file
    begin: int  # the chunk's torch.save archive: [begin, begin + length)
    length: int


@dataclass(frozen=True)
class _Tensor:
    fqn: str  # its key in the checkpoint
    shape: tuple[int, ...]
    dtype: str
    chunks: tuple[_Chunk, ...]
    by_rows: bool  # every chunk holds whole rows (dim 0 slices): flat ranges map to chunks

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


def _metadata(path: str, epoch: int | None) -> Stub:
    raw = read_bytes(path, epoch)
    if not raw:
        raise InputError("empty file", path=path, epoch=epoch)
    try:
        md = safe_unpickle(raw, _MODULES)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError) as e:
        raise InputError(
            f"refused or corrupt Distributed Checkpoint metadata (only its own classes are "
            f"read): {e}",
            path=path,
            epoch=epoch,
        ) from e
    if not (isinstance(md, Stub) and md.qualname.endswith(".Metadata")):
        raise InputError("not Distributed Checkpoint metadata", path=path, epoch=epoch)
    if not isinstance(md.field("state_dict_metadata"), dict) or not isinstance(
        md.field("storage_data"), dict
    ):
        raise InputError(
            "Distributed Checkpoint metadata without its tables", path=path, epoch=epoch
        )
    return md


def _ints(v: Any) -> tuple[int, ...] | None:
    if isinstance(v, tuple | list) and all(isinstance(i, int) and i >= 0 for i in v):
        return tuple(v)
    return None


def _dtype_of(props: Any) -> Any:
    if not isinstance(props, Stub):
        return None
    if isinstance(props.state, tuple) and props.state:  # torch >= 2.4: a tuple state
        return props.state[0]
    return props.field("dtype")


def _regions(md: Stub, base: str, meta_path: str, epoch: int | None) -> dict[tuple[str, Any], Any]:
    """``(fqn, chunk offsets) -> _StorageInfo`` stub."""
    out: dict[tuple[str, Any], Any] = {}
    for idx, info in md.field("storage_data").items():
        if not (isinstance(idx, Stub) and isinstance(info, Stub)):
            raise InputError("malformed storage table", path=meta_path, epoch=epoch)
        out[(idx.field("fqn"), _ints(idx.field("offset")))] = info
    return out


def _region(info: Stub, base: str, meta_path: str, epoch: int | None) -> tuple[str, int, int]:
    rel, begin, length = info.field("relative_path"), info.field("offset"), info.field("length")
    if not (isinstance(rel, str) and isinstance(begin, int) and isinstance(length, int)):
        raise InputError("malformed storage entry", path=meta_path, epoch=epoch)
    if os.path.isabs(rel) or ".." in rel.replace("\\", "/").split("/"):
        raise InputError(f"bad storage file name {rel!r}", path=meta_path, epoch=epoch)
    if info.field("transform_descriptors"):
        raise InputError(
            f"chunks saved with storage transforms {info.field('transform_descriptors')} "
            "(e.g. compression) are not supported",
            path=meta_path,
            epoch=epoch,
        )
    return _join(base, rel), begin, length


def distcp_members(path: str, src: ByteSource) -> list[tuple[str, int, int, int]]:
    """``(name, data begin, data end, crc)`` of every stored member of the archives in the
    ``.distcp`` file ``path`` (open as ``src``; the archives are found through the folder's
    ``.metadata``), for the CRC check of :mod:`~pipeline.checkpoints.content`;
    ``[]`` when it cannot tell."""
    base = _dirname(path)
    try:
        md = _metadata(_join(base, METADATA_NAME), None)
        regions = {
            _region(info, base, "", None)
            for info in md.field("storage_data").values()
            if isinstance(info, Stub)
        }
    except InputError:
        return []  # the reader reports it, naming the file
    out: list[tuple[str, int, int, int]] = []
    mine = path if is_url(path) else os.path.abspath(path)
    for file, begin, length in sorted(regions):
        if (file if is_url(file) else os.path.abspath(file)) != mine:
            continue
        try:
            zf, members = member_offsets(src, begin, length, path)
        except InputError:
            continue
        zf.close()
        out.extend((f"{name}@{begin}", b, b + n, crc) for name, (b, n, crc) in members.items())
    return out


class DcpReader:
    """A Distributed Checkpoint folder: ``spec.files`` is ``.metadata`` then the
    ``.distcp`` files."""

    def __init__(self, spec: Any) -> None:
        self.spec = spec
        meta_path = spec.files[0]
        epoch = spec.epoch
        base = _dirname(meta_path)
        md = _metadata(meta_path, epoch)
        regions = _regions(md, base, meta_path, epoch)
        entries: dict[str, Any] = md.field("state_dict_metadata")
        planner = md.field("planner_data")
        paths: dict[str, tuple[str, ...]] = {}
        for fqn in entries:
            p = planner.get(fqn) if isinstance(planner, dict) else None
            paths[fqn] = tuple(str(x) for x in p) if isinstance(p, tuple | list) and p else (fqn,)
        names = self._select(entries, paths, meta_path, epoch)
        files = set(spec.files[1:])
        self._tensors: dict[str, _Tensor] = {}
        for name, fqn in names.items():
            md_t = entries[fqn]
            shape = _ints(md_t.field("size"))
            dtype = _dtype_of(md_t.field("properties"))
            raw_chunks = md_t.field("chunks")
            if shape is None or not isinstance(raw_chunks, list):
                raise InputError("malformed tensor entry", path=meta_path, epoch=epoch, key=name)
            if dtype not in RAW_NUMPY:
                raise InputError(
                    f"unsupported dtype {dtype}", path=meta_path, epoch=epoch, key=name
                )
            chunks = []
            for c in raw_chunks:
                offsets, sizes = _ints(c.field("offsets")), _ints(c.field("sizes"))
                info = regions.get((fqn, offsets))
                if offsets is None or sizes is None or info is None:
                    raise InputError(
                        "a chunk without its storage entry", path=meta_path, epoch=epoch, key=name
                    )
                file, begin, length = _region(info, base, meta_path, epoch)
                if file not in files:
                    raise InputError(
                        f"the metadata places this tensor in {os.path.basename(file)}, which is "
                        "missing",
                        path=meta_path,
                        epoch=epoch,
                        key=name,
                    )
                chunks.append(_Chunk(offsets, sizes, file, begin, length))
            self._tensors[name] = _check_tiling(
                _Tensor(fqn, shape, dtype, tuple(chunks), False), meta_path, epoch, name
            )
        self._sources: dict[str, ByteSource] = {}
        self._data: dict[_Chunk, TensorData] = {}
        self._lock = threading.Lock()
        self._local = threading.local()

    @staticmethod
    def _select(
        entries: dict[str, Any], paths: dict[str, tuple[str, ...]], where: str, epoch: int | None
    ) -> dict[str, str]:
        """State_dict name -> fqn: the entries nested under a model key, else the top-level
        tensors (optimizer state, counters and the like are left out)."""
        tensors = {
            f for f, m in entries.items() if isinstance(m, Stub) and m.field("chunks") is not None
        }
        for key in NESTED_KEYS:
            nested = {
                ".".join(paths[f][1:]): f
                for f in entries
                if paths[f][0] == key and len(paths[f]) > 1
            }
            if nested:
                bad = [f for f in nested.values() if f not in tensors]
                if bad:
                    raise InputError(
                        "non-tensor entry in the state_dict", path=where, epoch=epoch, key=bad[0]
                    )
                return nested
        top = {f: f for f in entries if len(paths[f]) == 1 and f in tensors}
        if not top:
            heads = sorted({p[0] for p in paths.values()})
            raise InputError(
                f"no state_dict found: the checkpoint holds {heads[:8]} (expected tensors at "
                f"the top level or under one of {list(NESTED_KEYS)})",
                path=where,
                epoch=epoch,
            )
        return top

    # ------------------------------------------------------------------- reading
    def tensors(self) -> list[TensorInfo]:
        return [TensorInfo(n, t.shape, t.dtype) for n, t in self._tensors.items()]

    def _source(self, path: str) -> ByteSource:
        with self._lock:
            src = self._sources.get(path)
            if src is None:
                src = self._sources[path] = open_source(path, self.spec.epoch)
            return src

    def _chunk_data(self, name: str, t: _Tensor, c: _Chunk) -> TensorData:
        d = self._data.get(c)
        if d is not None:
            return d
        src = self._source(c.file)
        try:
            d = describe_tensor_zip(src, c.begin, c.length, c.file)
        except InputError as e:
            raise InputError(e.reason, path=c.file, epoch=self.spec.epoch, key=name) from e
        ref = d.ref
        if ref.dtype != t.dtype or ref.shape != c.sizes:
            raise InputError(
                f"a chunk holds {ref.shape} of {ref.dtype}, the metadata says {c.sizes} of "
                f"{t.dtype}",
                path=c.file,
                epoch=self.spec.epoch,
                key=name,
            )
        with self._lock:
            self._data[c] = d
        return d

    def _read_chunk(self, name: str, t: _Tensor, c: _Chunk, a: int, b: int) -> np.ndarray:
        """Elements ``[a, b)`` of the chunk (C order) in their raw storage dtype."""
        d = self._chunk_data(name, t, c)
        raw_dt = RAW_NUMPY[t.dtype]
        src = self._source(c.file)
        ref = d.ref
        if ref.contiguous():
            out = np.empty(b - a, dtype=raw_dt)
            offset = d.storage_begin + (ref.storage_offset + a) * raw_dt.itemsize
            src.readinto(memoryview(out.view(np.uint8)), offset)  # type: ignore[arg-type]
            return out
        storage = np.empty(ref.storage_numel, dtype=raw_dt)
        src.readinto(memoryview(storage.view(np.uint8)), d.storage_begin)  # type: ignore[arg-type]
        view = np.lib.stride_tricks.as_strided(
            storage[ref.storage_offset :],
            shape=ref.shape,
            strides=tuple(s * raw_dt.itemsize for s in ref.stride),
            writeable=False,
        )
        return np.ascontiguousarray(view).reshape(-1)[a:b]

    def _raw_range(self, name: str, start: int, stop: int) -> np.ndarray:
        t = self._tensors[name]
        if t.by_rows:
            inner = int(np.prod(t.shape[1:], dtype=np.int64)) if len(t.shape) > 1 else 1
            parts = []
            for c in t.chunks:
                c0 = (c.offsets[0] if c.offsets else 0) * inner
                c1 = c0 + (c.sizes[0] if c.sizes else 1) * inner
                lo, hi = max(start, c0), min(stop, c1)
                if lo < hi:
                    parts.append(self._read_chunk(name, t, c, lo - c0, hi - c0))
            if len(parts) == 1:
                return parts[0]
            return np.concatenate(parts) if parts else np.empty(0, RAW_NUMPY[t.dtype])
        # chunks along other dims: assemble the whole tensor once (kept for the next range)
        cached = getattr(self._local, "whole", None)
        if cached is None or cached[0] != name:
            whole = np.empty(t.shape, dtype=RAW_NUMPY[t.dtype])
            for c in t.chunks:
                piece = self._read_chunk(name, t, c, 0, int(np.prod(c.sizes, dtype=np.int64)))
                where = tuple(slice(o, o + s) for o, s in zip(c.offsets, c.sizes, strict=True))
                whole[where] = piece.reshape(c.sizes)
            cached = self._local.whole = (name, whole.reshape(-1))
        return cached[1][start:stop]

    def read_into(self, name: str, start: int, stop: int, out: np.ndarray) -> None:
        t = self._tensors[name]
        to_float32(self._raw_range(name, start, stop), t.dtype, out[: stop - start])

    def read_raw(self, name: str) -> np.ndarray:
        t = self._tensors[name]
        return np.array(self._raw_range(name, 0, t.size), copy=True).reshape(t.shape)

    def spans(self, name: str) -> tuple[tuple[str, int, int], ...] | None:
        """The byte ranges of the ``.distcp`` files holding the tensor's elements in order:
        one per chunk of whole rows (None: chunks along other dimensions, or a view with
        other strides). Reads the chunks' archive directories, not their data."""
        t = self._tensors[name]
        if not t.by_rows:
            return None
        isz = RAW_NUMPY[t.dtype].itemsize
        out = []
        for c in t.chunks:
            d = self._chunk_data(name, t, c)
            if not d.ref.contiguous():
                return None
            first = d.storage_begin + d.ref.storage_offset * isz
            out.append((c.file, first, first + d.ref.size * isz))
        return tuple(out)

    def close(self) -> None:
        with self._lock:
            for src in self._sources.values():
                src.close()
            self._sources.clear()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:  # noqa: SIM105
            self.close()
        except Exception:
            pass


def _check_tiling(t: _Tensor, where: str, epoch: int | None, name: str) -> _Tensor:
    """The chunks must tile the tensor exactly; note whether they are whole-row slices."""
    ndim = len(t.shape)
    for c in t.chunks:
        if (
            len(c.offsets) != ndim
            or len(c.sizes) != ndim
            or any(o + s > n for o, s, n in zip(c.offsets, c.sizes, t.shape, strict=True))
        ):
            raise InputError(
                f"chunk at {list(c.offsets)} of size {list(c.sizes)} lies outside the tensor's "
                f"shape {list(t.shape)}",
                path=where,
                epoch=epoch,
                key=name,
            )
    volume = sum(int(np.prod(c.sizes, dtype=np.int64)) for c in t.chunks)
    if ndim == 0:
        ok, rows = len(t.chunks) == 1, True
    else:
        rows = all(
            c.offsets[1:] == (0,) * (ndim - 1) and c.sizes[1:] == t.shape[1:] for c in t.chunks
        )
        ok = volume == t.size
        if rows:
            spans = sorted((c.offsets[0], c.offsets[0] + c.sizes[0]) for c in t.chunks)
            edge = 0
            for a, b in spans:
                ok = ok and a == edge
                edge = b
            ok = ok and edge == t.shape[0]
    if not ok and t.size > 0:
        raise InputError(
            f"its {len(t.chunks)} chunk(s) do not tile its shape {list(t.shape)} exactly",
            path=where,
            epoch=epoch,
            key=name,
        )
    chunks = tuple(sorted(t.chunks, key=lambda c: c.offsets)) if rows else t.chunks
    return _Tensor(t.fqn, t.shape, t.dtype, chunks, rows)
