"""The store's schema: frozen, validated values that round-trip through ``to_dict``/``from_dict``.

The schema is written into the root group's attributes under :data:`ATTR_KEY`. Its layout is
part of the public interface (see docs/store-layout.md); any change to it bumps
:data:`SCHEMA_VERSION`. Version 1 stores (root attributes holding every epoch and tensor)
are still read (:data:`READ_VERSIONS`) and are migrated by ``cmd-pipeline upgrade``; a store of
any other version fails to open with :class:`~pipeline.errors.SchemaVersionError`.

Version 2 keeps the root attributes small (:meth:`StoreMeta.root_attrs`): the tensor table and
the per-epoch entries live in arrays (see :mod:`pipeline.store.trajectory`).
"""

from __future__ import annotations

import base64
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from pipeline.config import (
    CODECS,
    DEFAULT_CODEC,
    DEFAULT_FLOAT_BUFFERS,
    DEFAULT_NONFINITE,
    DEFAULT_STORE_DTYPE,
    DEFAULT_TIME_CHUNK,
    NONFINITE_POLICIES,
    STORE_DTYPE_CHOICES,
)
from pipeline.errors import SchemaVersionError, StoreError

__all__ = [
    "ATTR_KEY",
    "READ_VERSIONS",
    "SCHEMA_NAME",
    "SCHEMA_VERSION",
    "EpochEntry",
    "IngestSettings",
    "InlineTensor",
    "SourceFile",
    "StoreMeta",
    "TensorEntry",
    "check_study_attrs",
]

ATTR_KEY = "cmd_pipeline"
SCHEMA_NAME = "cmd-pipeline.store"
SCHEMA_VERSION = 2
#: schema versions this release opens (1: read in place, migrated by ``cmd-pipeline upgrade``)
READ_VERSIONS = (1, 2)

#: dtypes a trajectory row can come from. The trajectory is stored as the smallest of
#: float32/float16/bfloat16 holding every stored tensor exactly (``store_dtype``); float64 is
#: rounded to nearest float32 (recorded, and restored on export as float64).
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
KINDS = ("parameter", "buffer")


def _require(cond: bool, what: str) -> None:
    if not cond:
        raise StoreError(f"invalid store metadata: {what}")


def _get(d: Mapping[str, Any], key: str, typ: type | tuple[type, ...], where: str) -> Any:
    _require(isinstance(d, Mapping), f"{where} is not an object")
    _require(key in d, f"{where} lacks {key!r}")
    val = d[key]
    types = typ if isinstance(typ, tuple) else (typ,)
    ok = isinstance(val, typ) and not (isinstance(val, bool) and bool not in types)
    _require(ok, f"{where}.{key} has type {type(val).__name__}")
    return val


def _get_list(d: Mapping[str, Any], key: str, item: type, where: str) -> list[Any]:
    """A list whose items all have type ``item`` (bools are not ints here)."""
    val = _get(d, key, list, where)
    _require(
        all(isinstance(v, item) and not (isinstance(v, bool) and item is not bool) for v in val),
        f"{where}.{key} holds an item that is not {item.__name__}",
    )
    return val


def _get_shape(d: Mapping[str, Any], where: str) -> tuple[int, ...]:
    shape = _get_list(d, "shape", int, where)
    _require(all(s >= 0 for s in shape), f"{where}.shape {shape} has a negative size")
    return tuple(shape)


def _get_dtype(d: Mapping[str, Any], where: str) -> str:
    from pipeline.checkpoints.readers import RAW_NUMPY

    dtype = _get(d, "dtype", str, where)
    _require(dtype in RAW_NUMPY, f"{where}.dtype {dtype!r} is not a known dtype")
    return dtype


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the checkpoints' state_dict.

    ``offset`` is the first row of the tensor in the trajectory (rows follow the flattened,
    C-ordered tensor); it is ``-1`` for tensors that are not stored in the trajectory
    (integer buffers, excluded names, float buffers when they are switched off).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    kind: str
    offset: int

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def stored(self) -> bool:
        return self.offset >= 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "kind": self.kind,
            "offset": self.offset,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TensorEntry:
        w = "tensor entry"
        shape = _get_shape(d, w)
        kind = _get(d, "kind", str, w)
        _require(kind in KINDS, f"tensor kind {kind!r}")
        offset = _get(d, "offset", int, w)
        _require(offset >= -1, f"{w}.offset {offset} is below -1")
        return cls(
            name=_get(d, "name", str, w),
            shape=shape,
            dtype=_get_dtype(d, w),
            kind=kind,
            offset=offset,
        )


@dataclass(frozen=True)
class SourceFile:
    """A checkpoint file an epoch was read from: its path, size, digest and modification time
    (nanoseconds; -1 when unknown: schema 1, or a filesystem that does not say).

    ``sha256`` (the store's name for it since schema 1) holds the file's digest, in one of
    two schemes told apart by their form:

    - ``xxh3-128-b64k:<32 hex digits>``: the content digest of files ingested since ingest
      reads each input byte once (:data:`pipeline.kernels.digests.CONTENT_PREFIX`: XXH3-128
      over the size and the 64 KiB blocks' digests, put together from the copy tasks' reads);
    - 64 hex digits: a sha256 of the whole file (stores written before).

    It is ``""`` in the pending entries of an ingest that has not committed (the digest is
    known once every byte is read); such a file is recognised by path, size and modification
    time alone (see :meth:`same_file`). A later ingest that finds the same path with the same size and modification
    time trusts the recorded digest instead of reading the file; two digests of different
    schemes are never equal (a file compared with an older store's record is hashed with
    sha256, see :attr:`scheme`)."""

    path: str
    size: int
    sha256: str
    mtime_ns: int = -1

    @property
    def scheme(self) -> str:
        """``"content"``, ``"sha256"`` (older stores) or ``""`` (not digested yet)."""
        if not self.sha256:
            return ""
        return "sha256" if ":" not in self.sha256 else "content"

    def same_file(self, other: SourceFile) -> bool:
        """Whether both records name byte-identical files: equal digests; or, when one of
        them is not digested yet, the same path, size and known modification time (what a
        re-run trusts for a file the store records)."""
        if self.sha256 and other.sha256:
            return self.sha256 == other.sha256 and self.size == other.size
        same = (self.path, self.size, self.mtime_ns) == (other.path, other.size, other.mtime_ns)
        return self.mtime_ns >= 0 and same

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"path": self.path, "size": self.size, "sha256": self.sha256}
        if self.mtime_ns >= 0:
            d["mtime_ns"] = self.mtime_ns
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SourceFile:
        w = "source file"
        size = _get(d, "size", int, w)
        _require(size >= 0, f"{w}.size {size} is negative")
        mtime = _get(d, "mtime_ns", int, w) if "mtime_ns" in d else -1
        return cls(
            path=_get(d, "path", str, w),
            size=size,
            sha256=_get(d, "sha256", str, w),
            mtime_ns=mtime,
        )


@dataclass(frozen=True)
class InlineTensor:
    """A small tensor kept out of the trajectory (an integer buffer), stored verbatim."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    data: str  # base64 of the little-endian bytes

    @classmethod
    def from_array(cls, name: str, dtype: str, array: np.ndarray) -> InlineTensor:
        raw = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False)
        return cls(
            name,
            dtype,
            tuple(int(s) for s in array.shape),
            base64.b64encode(raw.tobytes()).decode(),
        )

    def to_bytes(self) -> bytes:
        return base64.b64decode(self.data)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "data": self.data,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> InlineTensor:
        from pipeline.checkpoints.readers import RAW_NUMPY

        w = "inline tensor"
        name = _get(d, "name", str, w)
        dtype = _get_dtype(d, w)
        shape = _get_shape(d, w)
        data = _get(d, "data", str, w)
        try:
            raw = base64.b64decode(data, validate=True)
        except ValueError:
            raw = None
        _require(raw is not None, f"inline tensor {name!r}: its data is not base64")
        want = int(np.prod(shape, dtype=np.int64)) * RAW_NUMPY[dtype].itemsize
        _require(
            raw is not None and len(raw) == want,
            f"inline tensor {name!r}: {0 if raw is None else len(raw)} bytes of data for "
            f"shape {list(shape)} of {dtype} ({want} bytes)",
        )
        return cls(name=name, dtype=dtype, shape=shape, data=data)


@dataclass(frozen=True)
class EpochEntry:
    """One recorded epoch: the column ``index`` of the trajectory."""

    epoch: int
    files: tuple[SourceFile, ...]
    nonfinite: int = 0
    nonfinite_by_tensor: tuple[tuple[str, int], ...] = ()
    inline: tuple[InlineTensor, ...] = ()
    #: per stored tensor (in index order), a digest of its stored values at this epoch; empty
    #: when unknown (epochs ingested by schema 1)
    digests: tuple[str, ...] = ()

    def same_source(self, other: EpochEntry) -> bool:
        """True when both entries name the same epoch read from byte-identical files (see
        :meth:`SourceFile.same_file`)."""
        return (
            self.epoch == other.epoch
            and len(self.files) == len(other.files)
            and all(a.same_file(b) for a, b in zip(self.files, other.files, strict=True))
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "files": [f.to_dict() for f in self.files],
            "nonfinite": self.nonfinite,
            "nonfinite_by_tensor": {k: v for k, v in self.nonfinite_by_tensor},
            "inline": [t.to_dict() for t in self.inline],
            "digests": list(self.digests),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EpochEntry:
        w = "epoch entry"
        nbt = _get(d, "nonfinite_by_tensor", dict, w)
        _require(
            all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in nbt.values()),
            f"{w}.nonfinite_by_tensor holds a count that is not a non-negative integer",
        )
        nonfinite = _get(d, "nonfinite", int, w)
        _require(nonfinite >= 0, f"{w}.nonfinite {nonfinite} is negative")
        return cls(
            epoch=_get(d, "epoch", int, w),
            files=tuple(SourceFile.from_dict(f) for f in _get(d, "files", list, w)),
            nonfinite=nonfinite,
            nonfinite_by_tensor=tuple((str(k), int(v)) for k, v in nbt.items()),
            inline=tuple(InlineTensor.from_dict(t) for t in _get(d, "inline", list, w)),
            digests=tuple(_get_list(d, "digests", str, w)) if "digests" in d else (),
        )


@dataclass(frozen=True)
class IngestSettings:
    """Settings that decide the trajectory's content and layout.

    A re-run or an append must use the same settings (or ``force=True``). The defaults are
    those of :mod:`pipeline.config`.
    """

    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    buffer_patterns: tuple[str, ...] = ()
    float_buffers: bool = DEFAULT_FLOAT_BUFFERS
    nonfinite: str = DEFAULT_NONFINITE
    chunk_rows: int = 1
    time_chunk: int = DEFAULT_TIME_CHUNK
    codec: str = DEFAULT_CODEC
    store_dtype: str = DEFAULT_STORE_DTYPE
    #: removed from the start of tensor names (``model.``, ``module.``); None: names as saved
    strip_prefix: str | None = None

    def __post_init__(self) -> None:
        if self.strip_prefix == "":
            object.__setattr__(self, "strip_prefix", None)  # "": no prefix, as None
        if self.store_dtype not in STORE_DTYPE_CHOICES:
            raise ValueError(
                f"store_dtype must be one of {STORE_DTYPE_CHOICES}, got {self.store_dtype!r}"
            )
        if self.nonfinite not in NONFINITE_POLICIES:
            raise ValueError(
                f"nonfinite must be one of {NONFINITE_POLICIES}, got {self.nonfinite!r}"
            )
        if self.codec not in CODECS:
            raise ValueError(f"codec must be one of {CODECS}, got {self.codec!r}")
        if self.chunk_rows < 1 or self.time_chunk < 1:
            raise ValueError("chunk_rows and time_chunk must be positive")

    def content_fields(self) -> dict[str, Any]:
        """The settings that change what is stored (not how it is chunked or encoded)."""
        d = self.to_dict()
        for k in ("chunk_rows", "time_chunk", "codec", "store_dtype"):
            d.pop(k)
        return d

    def to_dict(self) -> dict[str, Any]:
        return {
            "include": list(self.include),
            "exclude": list(self.exclude),
            "buffer_patterns": list(self.buffer_patterns),
            "float_buffers": self.float_buffers,
            "nonfinite": self.nonfinite,
            "chunk_rows": self.chunk_rows,
            "time_chunk": self.time_chunk,
            "codec": self.codec,
            "store_dtype": self.store_dtype,
            # written only when set: stores without a prefix keep the metadata they had
            **({"strip_prefix": self.strip_prefix} if self.strip_prefix is not None else {}),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> IngestSettings:
        w = "settings"
        try:
            return cls(
                include=tuple(_get_list(d, "include", str, w)),
                exclude=tuple(_get_list(d, "exclude", str, w)),
                buffer_patterns=tuple(_get_list(d, "buffer_patterns", str, w)),
                float_buffers=_get(d, "float_buffers", bool, w),
                nonfinite=_get(d, "nonfinite", str, w),
                chunk_rows=_get(d, "chunk_rows", int, w),
                time_chunk=_get(d, "time_chunk", int, w),
                codec=_get(d, "codec", str, w),
                # schema 1 stores had no such setting: they hold float32
                store_dtype=_get(d, "store_dtype", str, w) if "store_dtype" in d else "float32",
                # stores written before the setting existed: names as saved
                strip_prefix=(
                    _get(d, "strip_prefix", str, w) if d.get("strip_prefix") is not None else None
                ),
            )
        except ValueError as e:
            raise StoreError(f"invalid store metadata: {e}") from e


@dataclass(frozen=True)
class StoreMeta:
    """Everything the store records about its trajectory.

    ``epochs`` are the committed columns, in order. ``pending`` holds the columns of an ingest
    that has started but not finished; they sit after the committed ones in the array.
    """

    settings: IngestSettings
    tensors: tuple[TensorEntry, ...]
    n_rows: int
    epochs: tuple[EpochEntry, ...] = ()
    pending: tuple[EpochEntry, ...] | None = None
    package_version: str = ""
    #: the trajectory's dtype (float32, float16 or bfloat16; schema 1 stores are float32)
    store_dtype: str = "float32"
    #: the schema version the store was read from (written stores are always the current one)
    version: int = SCHEMA_VERSION

    @property
    def n_epochs(self) -> int:
        return len(self.epochs)

    @property
    def epoch_numbers(self) -> list[int]:
        return [e.epoch for e in self.epochs]

    def column_of(self, epoch: int) -> int:
        """Column index of a committed epoch number."""
        for i, e in enumerate(self.epochs):
            if e.epoch == epoch:
                return i
        raise StoreError(
            f"epoch {epoch} is not in the store (stored epochs: {_ranges(self.epoch_numbers)})"
        )

    def stored_tensors(self) -> list[TensorEntry]:
        return [t for t in self.tensors if t.stored]

    def with_(self, **changes: Any) -> StoreMeta:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Everything, as one JSON object (plans and tests; the store splits it, see
        :meth:`root_attrs`)."""
        return {
            **self.root_attrs(),
            "tensors": [t.to_dict() for t in self.tensors],
            "epochs": [e.to_dict() for e in self.epochs],
        }

    def root_attrs(self) -> dict[str, Any]:
        """What schema 2 keeps in the root group's attributes: small at any number of epochs
        and tensors (the pending entries of a running ingest are few and short-lived)."""
        return {
            "schema": SCHEMA_NAME,
            "version": SCHEMA_VERSION,
            "package_version": self.package_version,
            "settings": self.settings.to_dict(),
            "store_dtype": self.store_dtype,
            "n_rows": self.n_rows,
            "n_tensors": len(self.tensors),
            "n_epochs": len(self.epochs),
            "pending": None if self.pending is None else [e.to_dict() for e in self.pending],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StoreMeta:
        _require(isinstance(d, Mapping), "root attributes are not an object")
        if d.get("schema") != SCHEMA_NAME:
            raise SchemaVersionError(
                f"not a cmd-pipeline store (schema {d.get('schema')!r}, expected {SCHEMA_NAME!r})"
            )
        version = d.get("version")
        if version not in READ_VERSIONS or isinstance(version, bool):
            raise SchemaVersionError(
                f"store schema version {version!r} is not supported by this cmd-pipeline "
                f"(it reads versions {', '.join(map(str, READ_VERSIONS))}); use the "
                "cmd-pipeline release that wrote it"
            )
        w = "store"
        pending = d.get("pending")
        _require(pending is None or isinstance(pending, list), "pending is neither null nor a list")
        n_rows = _get(d, "n_rows", int, w)
        _require(n_rows >= 0, f"n_rows {n_rows} is negative")
        meta = cls(
            settings=IngestSettings.from_dict(_get(d, "settings", dict, w)),
            tensors=tuple(TensorEntry.from_dict(t) for t in _get(d, "tensors", list, w)),
            n_rows=n_rows,
            epochs=tuple(EpochEntry.from_dict(e) for e in _get(d, "epochs", list, w)),
            pending=None if pending is None else tuple(EpochEntry.from_dict(e) for e in pending),
            package_version=str(d.get("package_version", "")),
            store_dtype=_get(d, "store_dtype", str, w) if version >= 2 else "float32",
            version=int(version),
        )
        meta.validate()
        return meta

    def validate(self) -> None:
        """Check the invariants between fields; raise :class:`StoreError` if one fails."""
        offset = 0
        names = set()
        for t in self.tensors:
            _require(t.name not in names, f"duplicate tensor {t.name!r}")
            names.add(t.name)
            if t.stored:
                _require(t.offset == offset, f"tensor {t.name!r} offset {t.offset} != {offset}")
                offset += t.size
        _require(
            offset == self.n_rows, f"tensor sizes add up to {offset}, not n_rows={self.n_rows}"
        )
        from pipeline.store.dtypes import STORE_DTYPES

        _require(self.store_dtype in STORE_DTYPES, f"store_dtype {self.store_dtype!r}")
        n_stored = len(self.stored_tensors())
        for e in (*self.epochs, *(self.pending or ())):
            _require(
                len(e.digests) in (0, n_stored),
                f"epoch {e.epoch} has {len(e.digests)} tensor digests for {n_stored} tensors",
            )
        numbers = self.epoch_numbers + [e.epoch for e in self.pending or ()]
        _require(
            all(a < b for a, b in itertools.pairwise(numbers)),
            "epochs are not strictly increasing",
        )


def check_study_attrs(attrs: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The attributes of study ``name`` (``analyses/<name>``), checked where the operations
    read them: the configuration, the mode count and, once complete, the summary.

    Raises :class:`StoreError` naming the first malformed field; returns ``attrs`` as a dict.
    Fields not listed here (added by later versions of ``fit``) are left alone.
    """

    def need(cond: bool, what: str) -> None:
        if not cond:
            raise StoreError(f"analysis {name!r} has malformed attributes: {what}")

    def typed(d: Any, key: str, types: tuple[type, ...], where: str, optional: bool = False) -> Any:
        need(isinstance(d, Mapping), f"{where} is not an object")
        if key not in d or d[key] is None:
            need(optional, f"{where} lacks {key!r}")
            return None
        v = d[key]
        ok = isinstance(v, types) and not (isinstance(v, bool) and bool not in types)
        need(ok, f"{where}.{key} is a {type(v).__name__}")
        return v

    num = (int, float)
    typed(attrs, "status", (str,), "attributes")
    config = typed(attrs, "config", (dict,), "attributes")
    samples = typed(config, "samples", (int,), "config")
    need(samples >= 2, f"config.samples is {samples}")
    typed(config, "seed", (int,), "config")
    modes = typed(config, "modes", (int,), "config", optional=True)
    threshold = typed(config, "threshold", num, "config", optional=True)
    need((modes is None) != (threshold is None), "config has not exactly one of modes, threshold")
    typed(config, "window", (str,), "config", optional=True)
    if attrs.get("status") != "complete":
        return dict(attrs)
    n_modes = typed(attrs, "n_modes", (int,), "attributes")
    need(n_modes >= 1, f"n_modes is {n_modes}")
    typed(attrs, "n_samples", (int,), "attributes")
    summary = typed(attrs, "summary", (dict,), "attributes")
    typed(summary, "relative_error", num, "summary", optional=True)
    typed(summary, "mse", num, "summary", optional=True)
    for key, fields in (
        ("epochs", (("epoch", (int,), False), ("relative_error", num, True), ("mse", num, True))),
        ("modes", (("count", (int,), False), ("reference", (int,), False))),
        ("layers", (("name", (str,), False), ("count", (int,), False))),
    ):
        rows = typed(summary, key, (list,), "summary")
        for i, row in enumerate(rows):
            for field_name, types, optional in fields:
                typed(row, field_name, types, f"summary.{key}[{i}]", optional)
    flags = typed(summary, "flags", (dict,), "summary")
    typed(flags, "constant", (int,), "summary.flags")
    typed(flags, "nonfinite", (int,), "summary.flags")
    evaluation = attrs.get("evaluation")
    need(evaluation is None or isinstance(evaluation, dict), "evaluation is not an object")
    return dict(attrs)


def _ranges(values: Sequence[int]) -> str:
    """Compact text for a sorted list of ints: ``0-9, 12, 15-20``."""
    if not values:
        return "none"
    out: list[str] = []
    start = prev = values[0]
    nxt: list[int | None] = [*values[1:], None]
    for v in nxt:
        if v is not None and v == prev + 1:
            prev = v
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return ", ".join(out)
