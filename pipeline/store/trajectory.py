"""Zarr I/O for a trajectory store: its metadata, the trajectory array, its chunks, and the
ingest transaction (:meth:`TrajectoryStore.begin_append`, :meth:`~TrajectoryStore.commit`,
:meth:`~TrajectoryStore.rollback`).

Layout, schema 2 (Zarr v3 group at the store's URL; every array has ``dimension_names``)::

    /                  attributes["cmd_pipeline"] = StoreMeta.root_attrs() (small)
    /trajectory        (param, epoch)   float32|float16|bfloat16, chunks (chunk_rows, time_chunk)
    /epoch             (epoch,)         int64   the committed epochs' numbers (coordinate)
    /tensor_id         (param,)         int32   each row's tensor: an index into /tensor
    /tensor            (tensor,)        string  the state_dict's names (coordinate)
    /tensor_offset     (tensor,)        int64   first row, -1 for tensors not in the trajectory
    /tensor_size, /tensor_shape (JSON), /tensor_dtype, /tensor_kind      (tensor,)
    /meta/sources      (epoch,)         string  JSON list of the epoch's files {path,size,sha256}
    /meta/nonfinite    (epoch, tensor)  int64   NaN/Inf counts
    /meta/digest       (epoch, tensor)  string  digest of each stored tensor's values ("" unknown)
    /buffers/t<k>      (epoch, ...)     the integer buffers kept out of the trajectory
    /analyses/<name>/  studies (written by later stages), never touched by ingest

Only committed epochs are inside the arrays' shapes: the columns of an ingest that is still
running are written beyond the trajectory's shape (invisible to any Zarr client) and the
arrays grow when it commits. The consolidated metadata in the root ``zarr.json`` is rewritten
after every change (xarray opens the store from it); this package itself never reads it.

The root is only ever opened with ``mode="a"`` or ``"r"`` (never ``"w"``), so siblings of
``trajectory`` survive every operation. Chunks are written whole, by one task each, with
``write_empty_chunks=True``: a chunk key exists if and only if that chunk was completely
written (zarr >= 3.1.3 renames a temporary file into place).

Schema 1 stores (everything in the root attributes, float32, pending columns inside the shape)
are read in place; writing to them is refused until ``cmd-pipeline upgrade`` (:func:`upgrade`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.codecs
from zarr.core.buffer.cpu import Buffer

from pipeline.buffers import scratch
from pipeline.errors import StoreError
from pipeline.store import keys, mapped, remote
from pipeline.store.dtypes import narrow, numpy_dtype, register_bfloat16
from pipeline.store.meta_arrays import consolidate, open_root, read_tables, resize, write_tables
from pipeline.store.schema import (
    ATTR_KEY,
    SCHEMA_NAME,
    SCHEMA_VERSION,
    EpochEntry,
    IngestSettings,
    StoreMeta,
)

register_bfloat16()

__all__ = [
    "ANALYSES",
    "TRAJECTORY",
    "TrajectoryStore",
    "open_array",
    "read_block",
    "upgrade",
    "write_block",
]

TRAJECTORY = "trajectory"
ANALYSES = "analyses"


def _codecs(codec: str) -> dict[str, Any]:
    if codec == "none":
        return {"compressors": None}
    if codec == "lz4":
        return {
            "compressors": zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),
        }
    raise StoreError(f"unknown codec {codec!r}")


def _normalise_url(url: str | os.PathLike[str]) -> str:
    """An absolute local path for paths and ``file://`` URLs (zarr's LocalStore: atomic chunk
    writes, raw reads), the URL itself for any other fsspec protocol."""
    s = os.fspath(url)
    if s.startswith("file://"):
        from urllib.parse import unquote, urlparse

        parsed = urlparse(s)
        if parsed.netloc not in ("", "localhost"):
            raise StoreError(f"{s}: a file:// URL names a local path (file:///abs/path)")
        return os.path.abspath(unquote(parsed.path))
    if "://" in s:
        return s
    return os.path.abspath(s)


def _remote_store_error(url: str, e: BaseException) -> StoreError:
    """One line for a store on object storage that cannot be reached (never the options)."""
    if isinstance(e, PermissionError):
        why = "access denied: check the credentials in the storage options (--storage-options)"
    elif isinstance(e, FileNotFoundError):
        why = "no such bucket or container"
    else:
        text = " ".join(str(e).split())[:300] or type(e).__name__
        why = f"cannot reach it: {type(e).__name__}: {text}"
    return StoreError(f"store {url}: {why}")


@dataclass
class TrajectoryStore:
    """A handle on one store: its URL, its root group and its metadata.

    Use :meth:`open` for an existing store and :meth:`open_or_create` in ingest.
    """

    url: str
    root: Any  # zarr.Group
    meta: StoreMeta | None

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, url: str | os.PathLike[str], *, writable: bool = False) -> TrajectoryStore:
        """Open an existing store; fail clearly if it is missing or of another schema."""
        u = _normalise_url(url)
        try:
            root = open_root(u, "r+" if writable else "r")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError) as e:
            raise StoreError(f"no cmd-pipeline store at {u}") from e
        except ValueError as e:  # a zarr.json that is not JSON (json.JSONDecodeError)
            raise StoreError(f"{u}: unreadable Zarr metadata ({e})") from e
        except Exception as e:
            if not remote.is_remote(u):
                raise
            raise _remote_store_error(u, e) from None
        raw = root.attrs.get(ATTR_KEY)
        if raw is None:
            raise StoreError(
                f"{u} is a Zarr group but not a cmd-pipeline store (no {ATTR_KEY!r} attribute)"
            )
        return cls(u, root, _read_meta(root, raw, u))

    @classmethod
    def open_or_create(cls, url: str | os.PathLike[str]) -> TrajectoryStore:
        """Open a store for writing, creating an empty group when nothing is there."""
        u = _normalise_url(url)
        try:
            root = open_root(u, "a")
        except OSError as e:  # a file in the way, no permission, ...
            if remote.is_remote(u):
                raise _remote_store_error(u, e) from None
            raise StoreError(f"cannot open or create a store at {u}: {e}") from e
        except Exception as e:
            if not remote.is_remote(u):
                raise
            raise _remote_store_error(u, e) from None
        raw = root.attrs.get(ATTR_KEY)
        return cls(u, root, None if raw is None else _read_meta(root, raw, u))

    # ------------------------------------------------------------------ metadata
    def write_meta(self, meta: StoreMeta, *, consolidated: bool = True) -> None:
        """Validate and write the metadata (client side only; workers never write attributes).

        The metadata arrays first, then the trajectory's shape (the committed epochs), then the
        root attributes, which say how many epochs are committed; last the consolidated
        metadata. A schema 1 store must be upgraded first (:func:`upgrade`).
        """
        self.require_current()
        meta.validate()
        meta = meta.with_(version=SCHEMA_VERSION)
        chunk_rows = meta.settings.chunk_rows
        if self.has_trajectory():
            chunk_rows = int(self.trajectory().chunks[0])
        write_tables(self.root, meta, self.meta, chunk_rows)
        if self.has_trajectory():
            arr = self.trajectory()
            resize(arr, (int(arr.shape[0]), meta.n_epochs))
        self.root.attrs[ATTR_KEY] = _root_attrs(meta)
        self.meta = meta
        if consolidated:
            consolidate(self.url)

    def require_current(self) -> None:
        """Refuse to change the trajectory of a store of an older schema (it reads fine)."""
        if self.meta is not None and self.meta.version != SCHEMA_VERSION:
            raise StoreError(
                f"{self.url} has store schema version {self.meta.version}; upgrade it before "
                f"writing to it: `cmd-pipeline upgrade --store {self.url}` "
                "(or pipeline.upgrade(store))"
            )

    def require_meta(self) -> StoreMeta:
        if self.meta is None:
            raise StoreError(f"{self.url} holds no trajectory yet: run `cmd-pipeline ingest` first")
        return self.meta

    # ------------------------------------------------------------------ ingest transaction
    def begin_append(self, base: StoreMeta, *, rebuild: bool, discard_pending: bool) -> None:
        """Declare ``base.pending`` epochs as columns being written, before any chunk is.

        ``rebuild`` deletes the old trajectory first (``--force``); ``discard_pending`` deletes
        the chunks of an interrupted ingest being replaced. The metadata records the pending
        epochs (so an interruption is seen and resumed), the array gets their columns, and
        temporary files of writes an earlier interruption cut off are removed.
        """
        self.require_current()
        settings = base.settings
        committed = len(base.epochs)
        if rebuild:
            self.delete_trajectory()
        elif discard_pending:
            self.delete_chunk_columns(committed // settings.time_chunk)
        if not self.has_trajectory():
            self.create_trajectory(base.n_rows, committed, settings, base.store_dtype)
        # the consolidated metadata keeps showing the committed state until the commit
        self.write_meta(base, consolidated=False)
        self.remove_partials()

    def commit(self, base: StoreMeta, done: tuple[EpochEntry, ...]) -> StoreMeta:
        """Make the written epochs ``done`` (``base.pending`` with their NaN/Inf counts) part
        of the trajectory; returns the committed metadata."""
        meta = base.with_(epochs=base.epochs + done, pending=None)
        self.write_meta(meta)
        return meta

    def rollback(self, before: StoreMeta | None, base: StoreMeta) -> None:
        """Undo :meth:`begin_append` after bad input: the store is left as it was.

        Without committed columns (a new store, or a ``--force`` rebuild, which deleted the old
        trajectory before writing) no trajectory is left, and no metadata either: metadata that
        still listed the old epochs would make a re-run believe they are stored.
        """
        committed = base.epochs
        if before is None or not committed:
            self.delete_trajectory()
            for name in _META_NODES:
                if name in self.root.array_keys() or name in self.root.group_keys():
                    keys.delete_dir(self.root.store, name)
            self.root = open_root(self.url, "a")
            self.root.attrs.__delitem__(ATTR_KEY)
            self.meta = None
            return
        self.delete_chunk_columns(-(-len(committed) // base.settings.time_chunk))
        self.write_meta(before.with_(pending=None) if committed == before.epochs else before)

    # ------------------------------------------------------------------ the array
    def has_trajectory(self) -> bool:
        return TRAJECTORY in self.root.array_keys()

    def trajectory(self) -> Any:
        """The raw zarr array (N, T) of the committed epochs (schema 1: and pending columns)."""
        try:
            return self.root[TRAJECTORY]
        except KeyError as e:
            raise StoreError(f"{self.url} has no {TRAJECTORY!r} array") from e

    def create_trajectory(
        self, n_rows: int, n_cols: int, settings: IngestSettings, dtype: str = "float32"
    ) -> Any:
        """Create the trajectory array (fails if one exists: use :meth:`delete_trajectory`).

        ``n_cols`` is the committed epochs' count; columns written beyond it stay invisible
        until :meth:`write_meta` commits them."""
        if self.has_trajectory():
            raise StoreError(f"{self.url} already has a trajectory")
        dt = numpy_dtype(dtype)
        arr = self.root.create_array(
            TRAJECTORY,
            shape=(n_rows, n_cols),
            chunks=(min(settings.chunk_rows, max(n_rows, 1)), settings.time_chunk),
            dtype=dt,
            fill_value=float("nan"),
            config={"write_empty_chunks": True},
            dimension_names=("param", "epoch"),
            **_codecs(settings.codec),
        )
        arr.attrs["coordinates"] = _COORDINATES
        arr.attrs["description"] = "parameter values: one row per parameter, one column per epoch"
        return arr

    def delete_trajectory(self) -> None:
        if self.has_trajectory():
            keys.delete_dir(self.root.store, TRAJECTORY)
            self.root = open_root(self.url, "a")

    def chunk_grid(self) -> ChunkGrid:
        """The trajectory's chunk geometry, for tasks that read or write whole chunks."""
        arr = self.trajectory()
        meta = self.require_meta()
        rows, cols = (int(c) for c in arr.chunks)
        return ChunkGrid(
            self.url, int(arr.shape[0]), rows, cols, meta.settings.codec, meta.store_dtype
        )

    # ------------------------------------------------------------------ chunks
    def _chunk_keys(self) -> list[str]:
        return keys.list_prefix(self.root.store, f"{TRAJECTORY}/c/")

    def existing_chunks(self) -> set[tuple[int, int]]:
        """Grid coordinates (row block, time block) of every completely written chunk."""
        out = set()
        for k in self._chunk_keys():
            parts = k.split("/")
            if len(parts) == 4 and parts[2].isdigit() and parts[3].isdigit():
                out.add((int(parts[2]), int(parts[3])))
        return out

    def remove_partials(self) -> int:
        """Delete temporary files left by a writer that was killed mid-write."""
        return keys.remove_partials(self.root.store, f"{TRAJECTORY}/c/")

    def delete_chunk_columns(self, first_time_block: int) -> None:
        """Delete every chunk whose time block is ``>= first_time_block``."""
        for i, j in sorted(self.existing_chunks()):
            if j >= first_time_block:
                keys.delete(self.root.store, f"{TRAJECTORY}/c/{i}/{j}")

    # ------------------------------------------------------------------ the rest
    def analyses(self) -> list[str]:
        """The studies' names, from the listing (a study whose metadata is unreadable is
        listed too: opening it gives the error)."""
        listed = keys.list_dir(self.root.store, f"{ANALYSES}/")
        return sorted(k.rstrip("/") for k in listed if k.rstrip("/") != "zarr.json")

    def size_on_disk(self) -> int:
        """Bytes under the store's root, every array and study included."""
        if "://" not in self.url or self.url.startswith("file://"):
            path = self.url.removeprefix("file://")
            total = 0
            for dirpath, _dirs, files in os.walk(path):
                for f in files:
                    with contextlib.suppress(OSError):
                        total += os.path.getsize(os.path.join(dirpath, f))
            return total
        return keys.size(self.root.store)


#: the trajectory's non-index coordinates, for xarray (CF ``coordinates`` attribute)
_COORDINATES = "tensor_id tensor_offset tensor_size tensor_shape tensor_dtype tensor_kind"

#: the metadata nodes of schema 2 beside the trajectory (deleted with it on a rollback)
_META_NODES = (
    "epoch",
    "tensor",
    "tensor_id",
    "tensor_offset",
    "tensor_size",
    "tensor_shape",
    "tensor_dtype",
    "tensor_kind",
    "meta",
    "buffers",
)


#: schema 2 metadata already read in this process, by store URL and root attributes: every
#: write of the metadata writes, last, the root attributes with a ``generation`` that digests
#: the whole metadata (so equal metadata gives equal bytes, and any change a new generation;
#: a change made to the metadata arrays by hand, outside cmd-pipeline, is not seen by a
#: process that has read them already)
_META_CACHE: OrderedDict[tuple[str, str], StoreMeta] = OrderedDict()


def _root_attrs(meta: StoreMeta) -> dict[str, Any]:
    """The root attributes to write: the metadata's, and its generation (a digest of all of
    it, tables included)."""
    full = json.dumps(meta.to_dict(), sort_keys=True).encode()
    return {**meta.root_attrs(), "generation": hashlib.sha256(full).hexdigest()[:32]}


def _read_meta(root: Any, raw: Any, url: str) -> StoreMeta:
    """The store's metadata from its root attributes (schema 1) or from them and the metadata
    arrays (schema 2; those are read once per generation and process)."""
    if not isinstance(raw, dict):
        raise StoreError(f"{url}: the {ATTR_KEY!r} attribute is not an object")
    if raw.get("version") == SCHEMA_VERSION and raw.get("schema") == SCHEMA_NAME:
        key = (url, json.dumps(raw, sort_keys=True)) if "generation" in raw else None
        if key is not None and key in _META_CACHE:
            _META_CACHE.move_to_end(key)
            return _META_CACHE[key]
        meta = StoreMeta.from_dict(read_tables(root, raw))
        if key is not None:
            _META_CACHE[key] = meta
            while len(_META_CACHE) > 64:
                _META_CACHE.popitem(last=False)
        return meta
    return StoreMeta.from_dict(raw)


def upgrade(url: str | os.PathLike[str]) -> tuple[int, int]:
    """Migrate a store to the current schema in place; returns (old version, new version).

    Schema 1 -> 2 rewrites metadata only (the trajectory's chunks and the studies are kept
    byte for byte): the metadata arrays and the tensor ids are written, every array gets
    ``dimension_names``, the trajectory's shape drops any pending columns (an interrupted
    ingest resumes as before: its chunks stay), and the root attributes are replaced last, so
    an interrupted upgrade leaves a schema 1 store that upgrades again.
    """
    st = TrajectoryStore.open(url, writable=True)
    meta = st.require_meta()
    old = meta.version
    if old == SCHEMA_VERSION:
        return old, old
    for path, dims in _dims_to_add(st):
        _set_dimension_names(st.root.store, path, dims)
    st.root = open_root(st.url, "a")
    st.meta = None  # write_meta below writes every table afresh
    chunk_rows = int(st.trajectory().chunks[0]) if st.has_trajectory() else 1
    new = meta.with_(version=SCHEMA_VERSION)
    new.validate()
    write_tables(st.root, new, None, chunk_rows)
    if st.has_trajectory():
        arr = st.trajectory()
        arr.attrs.update(
            {
                "coordinates": _COORDINATES,
                "description": "parameter values: one row per parameter, one column per epoch",
            }
        )
        resize(arr, (int(arr.shape[0]), new.n_epochs))
    st.root.attrs[ATTR_KEY] = _root_attrs(new)
    consolidate(st.url)
    return old, SCHEMA_VERSION


def _dims_to_add(st: TrajectoryStore) -> list[tuple[str, tuple[str, ...]]]:
    """(array path, dimension names) for the arrays a schema 1 store holds."""
    from pipeline.store.analysis import result_dims

    out: list[tuple[str, tuple[str, ...]]] = []
    if st.has_trajectory():
        out.append((TRAJECTORY, ("param", "epoch")))
    for name in st.analyses():
        g = st.root[f"{ANALYSES}/{name}"]
        for arr_name in g.array_keys():
            out.append((f"{ANALYSES}/{name}/{arr_name}", result_dims(arr_name, g[arr_name].ndim)))
    if "online" in st.root.group_keys():
        for arr_name in st.root["online"].array_keys():
            out.append((f"online/{arr_name}", ("param",)))
    return out


def _set_dimension_names(store: Any, path: str, dims: tuple[str, ...]) -> None:
    """Add ``dimension_names`` to one array's ``zarr.json`` (its chunks are not touched)."""
    from zarr.core.buffer import default_buffer_prototype

    key = f"{path}/zarr.json"
    buf = keys.get(store, key)
    if buf is None:
        return
    doc = json.loads(buf.to_bytes())
    if doc.get("dimension_names") and len(doc["dimension_names"]) == len(doc["shape"]):
        return
    doc["dimension_names"] = list(dims[: len(doc["shape"])])
    data = json.dumps(doc, indent=2).encode()
    keys.put(store, key, default_buffer_prototype().buffer.from_bytes(data))


# ---------------------------------------------------------------------- task-side helpers
def open_array(
    url: str, path: str = TRAJECTORY, *, writable: bool = False, min_cols: int = 0
) -> Any:
    """Open one array of a store inside a task (cheap: reads one small JSON document).

    Writable arrays get ``write_empty_chunks=True``: zarr does not persist that setting, and
    without it an all-NaN chunk would silently not be written, so a chunk's existence would no
    longer mean that it is finished. ``min_cols`` widens the task's view of a 2-D array (not
    the stored shape) to reach the pending columns beyond the committed ones.
    """
    arr = zarr.open_array(url, path=path, mode="r+" if writable else "r", zarr_format=3)
    if arr.ndim == 2 and arr.shape[1] < min_cols:
        from dataclasses import replace as _replace

        a = arr._async_array
        wide = _replace(a.metadata, shape=(arr.shape[0], min_cols))
        arr = zarr.Array(zarr.AsyncArray(metadata=wide, store_path=a.store_path, config=a.config))
    return arr.with_config({"write_empty_chunks": True}) if writable else arr


def write_block(array: Any, r0: int, t0: int, block: np.ndarray) -> None:
    """Write a whole chunk ``block`` at row ``r0``, column ``t0``."""
    array[r0 : r0 + block.shape[0], t0 : t0 + block.shape[1]] = block


def _store_of(url: str) -> Any:
    """The zarr store object behind a URL (stateless, so safe to keep per process; opened
    afresh when the storage options of its protocol change)."""
    return _store_with(url, remote.options_key(url))


@lru_cache(maxsize=8)
def _store_with(url: str, _options: str) -> Any:
    return zarr.open_group(url, mode="r+", use_consolidated=False, zarr_format=3).store


#: neighbouring rows of a chunk are fetched in one range when fewer bytes than this lie
#: between them (one request instead of two costs more than reading that much more)
_RANGE_MERGE_GAP = 64 * 1024


@dataclass(frozen=True)
class ChunkGrid:
    """How the trajectory is chunked, known to tasks without opening the array's metadata.

    For uncompressed stores (``codec == "none"``) a whole chunk is written straight to the
    store as its little-endian bytes: exactly what zarr's ``bytes`` codec would write (edge
    chunks padded to the full chunk shape with the NaN fill value), minus zarr's encoding
    copy and indexing. Compressed stores go through zarr. ``dtype`` is the stored dtype
    (float32, float16 or bfloat16); reads into a buffer of another dtype convert (exactly,
    for float32 buffers).
    """

    url: str
    n_rows: int
    chunk_rows: int
    time_chunk: int
    codec: str
    dtype: str = "float32"

    @property
    def np_dtype(self) -> np.dtype[Any]:
        return numpy_dtype(self.dtype)

    @property
    def itemsize(self) -> int:
        return self.np_dtype.itemsize

    def key(self, r0: int, col0: int) -> str:
        return f"{TRAJECTORY}/c/{r0 // self.chunk_rows}/{col0 // self.time_chunk}"

    @property
    def local_root(self) -> str | None:
        """Filesystem path of the trajectory's chunks when the store is local and raw."""
        if self.codec != "none" or ("://" in self.url and not self.url.startswith("file://")):
            return None
        return os.path.join(self.url.removeprefix("file://"), TRAJECTORY, "c")

    def read_rows(self, r0: int, r1: int, cols: np.ndarray, out: np.ndarray) -> int:
        """Rows ``[r0, r1)`` at columns ``cols`` into ``out`` of shape (len(cols), r1 - r0).

        The output is time-major so that each column lands contiguously. Local raw stores are
        read with one ``preadv`` per (chunk, column) of exactly the requested rows; other
        stores go through zarr. Returns the number of bytes read from storage.
        """
        root = self.local_root
        if root is None:
            arr = open_array(self.url)
            out[:] = np.asarray(arr.get_orthogonal_selection((slice(r0, r1), cols))).T
            return self._zarr_bytes(r0, r1, cols)
        if out.dtype != self.np_dtype:  # read the stored values, then convert
            native = scratch("read-native", out.size, self.np_dtype).reshape(out.shape)
            nbytes = self.read_rows(r0, r1, cols, native)
            out[...] = native
            return nbytes
        cr, tc, isz = self.chunk_rows, self.time_chunk, self.itemsize
        nbytes = 0
        chunk_part: np.ndarray | None = None
        for c0 in range(r0 - r0 % cr, r1, cr):
            lo, hi = max(r0, c0), min(r1, c0 + cr)
            i = c0 // cr
            by_block: dict[int, list[int]] = {}
            for k, c in enumerate(cols.tolist()):
                by_block.setdefault(c // tc, []).append(k)
            for j, ks in by_block.items():
                path = os.path.join(root, str(i), str(j))
                if tc == 1:
                    dest = out[ks[0], lo - r0 : hi - r0]
                    _pread_exact(path, dest, (lo - c0) * isz)
                    nbytes += dest.nbytes
                    for k in ks[1:]:  # a column asked for twice is read once
                        out[k, lo - r0 : hi - r0] = dest
                    continue
                if chunk_part is None or chunk_part.shape[0] < hi - lo:
                    chunk_part = np.empty((hi - lo, tc), dtype=self.np_dtype)
                part = chunk_part[: hi - lo]
                _pread_exact(path, part, (lo - c0) * tc * isz)
                nbytes += part.nbytes
                for k in ks:
                    out[k, lo - r0 : hi - r0] = part[:, int(cols[k]) % tc]
        return nbytes

    def map_rows(self, r0: int, r1: int, cols: np.ndarray) -> np.ndarray | None:
        """Rows ``[r0, r1)`` at columns ``cols`` as a time-major ``(len(cols), r1 - r0)`` array
        of the stored dtype whose rows are the chunk files' own pages, mapped
        (:func:`pipeline.store.mapped.map_ranges`), not copied; None where that cannot be done
        (remote or compressed stores, several epochs per chunk, a block across chunks or not
        on page boundaries, no ``mmap``): then :meth:`read_rows`.

        The bytes are those :meth:`read_rows` would read (a file shorter than its range, or a
        missing one, raises StoreError). Writing into the array never reaches the store.
        """
        root = self.local_root
        if root is None or self.time_chunk != 1 or r1 <= r0 or not mapped.available():
            return None
        cr, isz = self.chunk_rows, self.itemsize
        i = r0 // cr
        offset, nbytes = (r0 - i * cr) * isz, (r1 - r0) * isz
        if (r1 - 1) // cr != i or offset % mapped.PAGE or nbytes % mapped.PAGE:
            return None
        parts = [[(os.path.join(root, str(i), str(int(c))), offset, nbytes)] for c in cols]
        try:
            return mapped.map_ranges(parts, r1 - r0, self.np_dtype)
        except OSError:  # a file system without mmap, no address space: read instead
            return None

    def rows_block(
        self, r0: int, r1: int, cols: np.ndarray, key: str, dtype: Any = None
    ) -> tuple[np.ndarray, int]:
        """Rows ``[r0, r1)`` at columns ``cols``, time-major ``(len(cols), r1 - r0)``, and the
        bytes it holds from storage: the mapped chunk pages (:meth:`map_rows`) when the store
        holds ``dtype`` (default: the stored dtype), else read (:meth:`read_rows`) into the
        calling thread's reused buffer ``key``, valid until that key's next use."""
        dt = self.np_dtype if dtype is None else np.dtype(dtype)
        if dt == self.np_dtype:
            x = self.map_rows(r0, r1, cols)
            if x is not None:  # the bytes of each column once, as read_rows counts them
                return x, len(set(cols.tolist())) * (r1 - r0) * self.itemsize
        x = scratch(key, len(cols) * (r1 - r0), dt).reshape(len(cols), r1 - r0)
        return x, self.read_rows(r0, r1, cols, x)

    def read_scattered(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, int]:
        """Profiles of a few rows: (len(rows), len(cols)) float32, and the bytes read.

        Local raw stores read exactly one value's bytes per value (the rows of a sample, never
        the whole trajectory); remote raw stores read each row's bytes of each time block by
        ranged requests; compressed stores decode the chunks holding the rows through zarr
        (the fit calls this in tasks, one per chunk-row block: :mod:`pipeline.graph.sampling`).
        """
        out = np.empty((len(rows), len(cols)), dtype=np.float32)
        root = self.local_root
        isz = self.itemsize
        if root is None and self.codec == "none":
            return self._read_row_ranges(rows, cols, out)
        if root is None:
            arr = open_array(self.url)
            out[:] = np.asarray(arr.get_orthogonal_selection((rows, cols)))
            nchunks = len({int(r) // self.chunk_rows for r in rows}) * len(
                {int(c) // self.time_chunk for c in cols}
            )
            return out, nchunks * self.chunk_rows * self.time_chunk * isz
        tc = self.time_chunk
        le = self.np_dtype.newbyteorder("<") if isz > 1 and self.dtype != "bfloat16" else self.np_dtype
        row_list = rows.tolist()
        chunk_of = [divmod(r, self.chunk_rows) for r in row_list]  # (row chunk, row in it)
        fds: dict[tuple[int, int], int] = {}

        def fd_of(i: int, j: int) -> int:
            fd = fds.get((i, j))
            if fd is None:
                try:
                    fd = fds[i, j] = os.open(os.path.join(root, str(i), str(j)), os.O_RDONLY)
                except FileNotFoundError as e:
                    raise StoreError(
                        f"trajectory chunk {i}/{j} is missing (unfinished ingest?)"
                    ) from e
            return fd

        col_list = cols.tolist()

        def read_part(k: int, a: int = 0, b: int | None = None) -> None:
            """Rows ``[a, b)`` of the sample at column ``k``."""
            j, jj = divmod(col_list[k], tc)
            values = []
            for i, ii in chunk_of[a:b]:
                got = os.pread(fd_of(i, j), isz, (ii * tc + jj) * isz)
                if len(got) != isz:
                    raise StoreError(f"trajectory chunk {i}/{j} is truncated")
                values.append(got)
            out[a:b, k] = np.frombuffer(b"".join(values), dtype=le)

        try:
            t_first = time.perf_counter()
            if col_list:
                read_part(0)
            rest = range(1, len(col_list))
            if rest and time.perf_counter() - t_first > _DISK_READ_S * len(row_list):
                # the first column came from the disk, one value at a time: ask the kernel for
                # every other value's page at once (readahead, many requests in flight), then
                # read them on a few threads, in parts of a column (when the disk is busy the
                # readahead alone left most reads waiting one after the other). Every file is
                # opened here first (``fd_of`` is not shared between threads).
                advise = hasattr(os, "posix_fadvise")
                in_order = sorted(chunk_of)
                for k in rest:
                    j2, jj2 = divmod(col_list[k], tc)
                    for i, ii in in_order:
                        fd = fd_of(i, j2)
                        if advise:
                            os.posix_fadvise(fd, (ii * tc + jj2) * isz, isz, os.POSIX_FADV_WILLNEED)
                per_col = -(-4 * _DISK_READERS // len(rest))
                step = max(1, -(-len(row_list) // per_col))
                parts = [(k, a, a + step) for k in rest for a in range(0, len(row_list), step)]
                with ThreadPoolExecutor(min(_DISK_READERS, len(parts))) as pool:
                    list(pool.map(lambda p: read_part(*p), parts))  # (raises a part's error)
            else:
                for k in rest:
                    read_part(k)
        finally:
            for fd in fds.values():
                os.close(fd)
        return out, out.size * isz

    def _read_row_ranges(
        self, rows: np.ndarray, cols: np.ndarray, out: np.ndarray
    ) -> tuple[np.ndarray, int]:
        """:meth:`read_scattered` on a remote raw store: ranged reads of the rows' bytes in
        each chunk (a row's values of one time block are contiguous; neighbouring rows are
        merged into one range when the gap is small), all requests in flight at once."""
        tc, isz = self.time_chunk, self.itemsize
        row_bytes = tc * isz
        le = self.np_dtype.newbyteorder("<") if isz > 1 and self.dtype != "bfloat16" else self.np_dtype
        row_list = [int(r) for r in rows.tolist()]
        by_chunk: dict[int, list[int]] = {}
        for k, r in enumerate(row_list):
            by_chunk.setdefault(r // self.chunk_rows, []).append(k)
        blocks = sorted({int(c) // tc for c in cols.tolist()})
        requests: list[tuple[str, int, int]] = []
        placed: list[tuple[int, int, list[int]]] = []  # (time block, first row, rows' ks)
        for i, ks in by_chunk.items():
            ks.sort(key=lambda k: row_list[k])
            runs: list[list[int]] = [[ks[0]]]
            for k in ks[1:]:
                gap = (row_list[k] - row_list[runs[-1][-1]] - 1) * row_bytes
                if gap <= _RANGE_MERGE_GAP:
                    runs[-1].append(k)
                else:
                    runs.append([k])
            for j in blocks:
                for run in runs:
                    lo = row_list[run[0]] - i * self.chunk_rows
                    hi = row_list[run[-1]] - i * self.chunk_rows + 1
                    requests.append((f"{TRAJECTORY}/c/{i}/{j}", lo * row_bytes, hi * row_bytes))
                    placed.append((j, row_list[run[0]], run))
        got = keys.get_ranges(_store_of(self.url), requests)
        nbytes = 0
        col_list = [int(c) for c in cols.tolist()]
        for (key, start, end), data, (j, first, run) in zip(requests, got, placed, strict=True):
            if data is None:
                raise StoreError(f"trajectory chunk {key} is missing (unfinished ingest?)")
            if len(data) != end - start:
                raise StoreError(f"trajectory chunk {key} is truncated")
            nbytes += len(data)
            values = np.frombuffer(data, dtype=le).reshape(-1, tc)
            qs = [q for q, c in enumerate(col_list) if c // tc == j]
            within = [col_list[q] % tc for q in qs]
            for k in run:
                out[k, qs] = values[row_list[k] - first, within]
        return out, nbytes

    def _zarr_bytes(self, r0: int, r1: int, cols: np.ndarray) -> int:
        n_row_chunks = (r1 - 1) // self.chunk_rows - r0 // self.chunk_rows + 1
        n_col_chunks = len({int(c) // self.time_chunk for c in cols})
        return n_row_chunks * n_col_chunks * self.chunk_rows * self.time_chunk * self.itemsize

    def write(self, r0: int, col0: int, block: np.ndarray) -> None:
        """Write ``block`` (rows, cols), which must be one whole chunk of the grid (its values
        must be exact in the stored dtype: ingest chose it so), beyond the committed columns
        as well."""
        if self.codec != "none":
            arr = open_array(self.url, writable=True, min_cols=col0 + block.shape[1])
            write_block(arr, r0, col0, narrow(block, self.dtype))
            return
        full = block
        if block.shape != (self.chunk_rows, self.time_chunk) or block.dtype != self.np_dtype:
            # the thread's reused buffer (a fresh chunk-sized array costs page faults each time)
            full = scratch("chunk-full", self.chunk_rows * self.time_chunk, self.np_dtype)
            full = full.reshape(self.chunk_rows, self.time_chunk)
            full[...] = np.nan
            narrow(block, self.dtype, full[: block.shape[0], : block.shape[1]])
        data = np.ascontiguousarray(full).reshape(-1).view(np.uint8)
        keys.put(_store_of(self.url), self.key(r0, col0), Buffer.from_array_like(data))

    def can_copy(self) -> bool:
        """Whether :meth:`copy_chunk` can write this store's chunks: a local, uncompressed
        store of one epoch per chunk (any stored dtype: float32, float16, bfloat16)."""
        return self.local_root is not None and self.time_chunk == 1

    def copy_chunk(self, r0: int, col0: int, pieces: Sequence[tuple[str, int, int]]) -> None:
        """Write the chunk of rows from ``r0`` at epoch ``col0`` as the bytes of ``pieces``
        (``(file, begin, end)``: little-endian values of the stored dtype, in row order),
        copied by the kernel (:func:`pipeline.store.keys.copy_file`), then the NaN fill of the
        rows past them (an edge chunk): the bytes :meth:`write` would write of the same
        values. Only where :meth:`can_copy`."""
        if not self.can_copy():
            raise StoreError("copy_chunk needs a local, uncompressed store, one epoch per chunk")
        isz = self.itemsize
        nbytes = sum(b - a for _p, a, b in pieces)
        full = self.chunk_rows * isz
        if nbytes % isz or nbytes > full or r0 % self.chunk_rows:
            raise StoreError(f"copy_chunk: {nbytes} bytes do not fill a chunk of {full} from row {r0}")
        tail = np.full((full - nbytes) // isz, np.nan, dtype=self.np_dtype).view(np.uint8)
        root = self.local_root
        assert root is not None
        keys.copy_file(Path(root, str(r0 // self.chunk_rows), str(col0)), pieces, tail)


def read_block(array: Any, r0: int, r1: int, t0: int, t1: int) -> np.ndarray:
    """Rows ``[r0, r1)`` and columns ``[t0, t1)`` of a zarr array, as float32 (16-bit
    trajectories upcast exactly)."""
    block = np.asarray(array[r0:r1, t0:t1])
    return block.astype(np.float32) if block.dtype.itemsize == 2 and block.dtype.kind in "fV" else block


#: mean seconds per scattered value read above which the values are not in the page cache
#: (a read from the page cache takes 1-2 us, one from a disk about 100 us)
_DISK_READ_S = 20e-6
#: threads reading scattered values that are not in the page cache, after asking for their
#: pages (:meth:`ChunkGrid.read_scattered`). 100,000 values on the local disk we measured on:
#: 8-11 s on one thread; 1.3-1.6 s with every page asked for first and one thread, 1.4-1.5 s
#: with that and 8-16 threads; but while the disk was slow to serve the readahead, 8.8 s with
#: the pages asked for and one thread against 1.6-2.1 s on 16-64 threads
_DISK_READERS = 8


def _pread_exact(path: str, dest: np.ndarray, offset: int) -> None:
    """Fill the contiguous array ``dest`` from ``path`` at byte ``offset``."""
    view = memoryview(dest.view(np.uint8).reshape(-1))  # type: ignore[arg-type]
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError as e:
        raise StoreError(f"trajectory chunk {path} is missing (unfinished ingest?)") from e
    try:
        done = 0
        while done < len(view):
            got = os.preadv(fd, [view[done:]], offset + done)
            if got <= 0:
                raise StoreError(f"trajectory chunk {path} is truncated")
            done += got
    finally:
        os.close(fd)


def trajectory_dask(store: TrajectoryStore) -> Any:
    """The committed trajectory as a lazy dask array (N, T) in the stored dtype (float32,
    float16, or ml_dtypes' bfloat16), one dask chunk per zarr chunk."""
    import dask.array as da

    meta = store.require_meta()
    arr = store.trajectory()
    return da.from_zarr(arr)[:, : meta.n_epochs]
