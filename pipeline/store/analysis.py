"""The results of one CMD study: ``analyses/<name>/`` beside the trajectory, and all their
Zarr I/O (creating the group and its arrays, reading and writing result rows and chunks,
listing written chunks, the report files).

Arrays of a version-2 study (N = trajectory rows, M = modes, Tw = epochs in the window,
K = samples)::

    mode         (N,)  smallest unsigned int holding M     chunks (block_rows,)
    a            (N,)  float32   the slope: w(t) ~ level + a (r_mode(t) - r_mode(anchor))
    level        (N,)  float32   the fitted value at the anchor epoch
    anchor       (N,)  smallest unsigned int holding Tw   the anchor's position in the window:
                                 where the fitted value is smallest in magnitude
    flags        (N,)  uint8     1 constant, 2 NaN/Inf, 4 reference, 8 sampled
    corr         (N,)  float32   Pearson correlation with the mode's reference  } only with
    residual     (N,)  float32   sum over the window of (w - a r - b)^2         } diagnostics
    refs         (M, Tw) float64 reference profiles
    ref_index    (M,)  int64     the references' rows
    sample_index (K,)  int64     the sampled rows; sample_mode (K,) int64 their modes
    sample_profiles (K, Tw) float32  the sampled rows' values over the window (what the
                                      report's figures plot; absent from earlier studies)
    epochs       (Tw,) int64     the window's epoch numbers
    block_stats  (n_blocks, F) float64   per-block error sums; a block's row is written last,
                                          so it marks the block finished (resume)
    reconstructed (N, Tw) float32  the model, written by ``reconstruct`` (optional; NaN where
                                    not yet written)

That is 11 bytes per parameter (12 when Tw > 256, one more when M > 256), 19 with the
diagnostics. The anchored form keeps the float32 model within one float32 ulp of the float64
fit wherever the fitted values keep their sign over the window
(:func:`pipeline.kernels.cmd.anchor_rows`), and within 3 where they cross zero, which the
choice of roundings (:func:`pipeline.kernels.cmd.stored_coefficients`) brings to 1 for all but
a few values in a million. A version-1 study (earlier releases) holds ``a``
and ``b`` as float64 (``w(t) ~ a r_mode(t) + b``) and always ``corr`` and ``residual``, and no
``level`` or ``anchor``; it is read as it is (:class:`StudyLayout`).

Every array is made by one helper (uncompressed, writing even all-fill chunks) and carries
``dimension_names`` (:func:`result_dims`): ``param`` (the trajectory's rows), ``window`` (the
window's epochs), ``mode_id``, ``sample``, ``block``, ``stat``.

Attributes: ``cmd_pipeline_analysis`` = schema/version, the configuration (with
``diagnostics``), the package version, the trajectory's fingerprint, the status (``creating``
while the group is being made, then ``running``, then ``complete``) and summaries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from pipeline.errors import SchemaVersionError, StoreError
from pipeline.store import keys
from pipeline.store.meta_arrays import consolidate, open_root
from pipeline.store.schema import check_study_attrs
from pipeline.store.trajectory import ANALYSES

__all__ = [
    "ANALYSIS_ATTR",
    "ANALYSIS_SCHEMA",
    "ANALYSIS_VERSION",
    "READ_VERSIONS",
    "AnalysisGroup",
    "StudyLayout",
    "complete_study",
    "mode_dtype",
    "open_result",
    "read_block_rows",
    "read_model_rows",
    "read_result",
    "read_result_rows",
    "result_dims",
    "write_result_chunk",
    "write_result_rows",
]

ANALYSIS_ATTR = "cmd_pipeline_analysis"
ANALYSIS_SCHEMA = "cmd-pipeline.analysis"
ANALYSIS_VERSION = 2
#: the study versions this release reads: 1 (float64 a and b, float32 corr and residual) and 2
READ_VERSIONS = (1, 2)
#: the study's figures, evaluation results and HTML report: ``analyses/<name>/report/``
REPORT = "report"

#: the dimension names of a study's arrays (xarray and other labelled readers); an array not
#: listed gets ``param`` first and ``dim_<k>`` after
RESULT_DIMS: dict[str, tuple[str, ...]] = {
    "mode": ("param",),
    "a": ("param",),
    "b": ("param",),
    "level": ("param",),
    "anchor": ("param",),
    "corr": ("param",),
    "residual": ("param",),
    "flags": ("param",),
    "reconstructed": ("param", "window"),
    "refs": ("mode_id", "window"),
    "ref_index": ("mode_id",),
    "sample_index": ("sample",),
    "sample_mode": ("sample",),
    "sample_order": ("sample",),
    "sample_profiles": ("sample", "window"),
    "epochs": ("window",),
    "block_stats": ("block", "stat"),
}


def result_dims(name: str, ndim: int) -> tuple[str, ...]:
    """The dimension names of the study array ``name`` with ``ndim`` dimensions.

    >>> result_dims("refs", 2), result_dims("something_new", 2)
    (('mode_id', 'window'), ('param', 'dim_1'))
    """
    dims = RESULT_DIMS.get(name, ())
    if len(dims) == ndim:
        return dims
    return ("param", *(f"dim_{k}" for k in range(1, ndim)))[:ndim]


def mode_dtype(n_modes: int) -> np.dtype[Any]:
    """The smallest unsigned integer dtype holding mode ids ``0 .. n_modes - 1``."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if n_modes - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.uint64)


@dataclass(frozen=True)
class StudyLayout:
    """Which per-row arrays a study holds and how its model reads, from its version and its
    configuration.

    >>> StudyLayout(2, diagnostics=False).per_row(n_modes=10, n_window=100)
    {'mode': dtype('uint8'), 'a': dtype('float32'), 'level': dtype('float32'), 'anchor': dtype('uint8'), 'flags': dtype('uint8')}
    >>> StudyLayout(2, diagnostics=False).bytes_per_row(10, 100), StudyLayout(1, True).bytes_per_row(10, 100)
    (11, 26)
    """

    version: int
    diagnostics: bool  # whether corr and residual are stored (always in version 1)

    @classmethod
    def of(cls, attrs: dict[str, Any]) -> StudyLayout:
        """The layout of a study with the analysis attributes ``attrs``."""
        version = int(attrs.get("version", ANALYSIS_VERSION))
        if version == 1:
            return cls(1, True)
        return cls(version, bool((attrs.get("config") or {}).get("diagnostics", False)))

    @property
    def anchored(self) -> bool:
        """The model is ``level + a (r(t) - r(anchor))`` (version 2), not ``a r(t) + b``."""
        return self.version >= 2

    @property
    def model(self) -> tuple[str, ...]:
        """The arrays the reconstruction reads, in the order of
        :func:`pipeline.kernels.reconstruct.reconstruct_block`'s ``mode, a, b[, anchor]``."""
        return ("mode", "a", "level", "anchor") if self.anchored else ("mode", "a", "b")

    def per_row(self, n_modes: int, n_window: int) -> dict[str, np.dtype[Any]]:
        """The per-row arrays and their dtypes (M = ``n_modes``, Tw = ``n_window``)."""
        if not self.anchored:
            out = {"mode": mode_dtype(n_modes), "a": np.dtype("float64"), "b": np.dtype("float64")}
        else:
            out = {
                "mode": mode_dtype(n_modes),
                "a": np.dtype("float32"),
                "level": np.dtype("float32"),
                "anchor": mode_dtype(n_window),
            }
        out["flags"] = np.dtype("uint8")
        if self.diagnostics:
            out["corr"] = np.dtype("float32")
            out["residual"] = np.dtype("float32")
        return out

    def bytes_per_row(self, n_modes: int, n_window: int) -> int:
        """Bytes per parameter of the per-row arrays."""
        return sum(dt.itemsize for dt in self.per_row(n_modes, n_window).values())


class AnalysisGroup:
    """Handle on ``analyses/<name>`` of a store (client side)."""

    def __init__(self, url: str, name: str) -> None:
        if not name or "/" in name or name.startswith("."):
            raise StoreError(f"invalid analysis name {name!r}")
        self.url = url
        self.name = name
        self.path = f"{ANALYSES}/{name}"

    # ------------------------------------------------------------------ state
    def _root(self) -> Any:
        return open_root(self.url, "r+")

    def exists(self) -> bool:
        root = self._root()
        try:
            return ANALYSES in root.group_keys() and self.name in root[ANALYSES].group_keys()
        except ValueError as e:  # a zarr.json that is not JSON (json.JSONDecodeError)
            raise StoreError(f"{self.path}: unreadable Zarr metadata ({e})") from e

    def group(self) -> Any:
        try:
            return self._root()[self.path]
        except KeyError as e:
            raise StoreError(f"no analysis {self.name!r} in {self.url}") from e
        except ValueError as e:  # a zarr.json that is not JSON (json.JSONDecodeError)
            raise StoreError(f"analysis {self.name!r}: unreadable Zarr metadata ({e})") from e

    def attrs(self) -> dict[str, Any]:
        raw = self.group().attrs.get(ANALYSIS_ATTR)
        if not isinstance(raw, dict) or raw.get("schema") != ANALYSIS_SCHEMA:
            raise StoreError(f"analyses/{self.name} is not a cmd-pipeline analysis")
        if raw.get("version") not in READ_VERSIONS:
            raise SchemaVersionError(
                f"analysis {self.name!r} has schema version {raw.get('version')!r}; this "
                f"cmd-pipeline reads versions {', '.join(map(str, READ_VERSIONS))}"
            )
        return raw

    def layout(self) -> StudyLayout:
        """Which per-row arrays this study holds (:class:`StudyLayout`)."""
        return StudyLayout.of(self.attrs())

    def set_attrs(self, *, consolidated: bool = True, **fields: Any) -> None:
        """Update the analysis attribute; a study keeps the version it was created with (an
        evaluation of a version-1 study does not relabel its arrays). ``consolidated=False``
        leaves the store's consolidated metadata as it is (a fit's intermediate states: the
        study appears there when it completes, a walk of every study's arrays saved)."""
        g = self.group()
        cur = dict(g.attrs.get(ANALYSIS_ATTR) or {})
        cur.update(fields, schema=ANALYSIS_SCHEMA)
        cur.setdefault("version", ANALYSIS_VERSION)
        g.attrs[ANALYSIS_ATTR] = cur
        if consolidated:
            consolidate(self.url)

    def delete(self) -> None:
        """Remove this analysis only (its siblings and the trajectory stay)."""
        if self.exists():
            root = self._root()
            keys.delete_dir(root.store, self.path)
            consolidate(self.url)

    # ------------------------------------------------------------------ creation
    def create(
        self,
        *,
        n_rows: int,
        n_modes: int,
        block_rows: int,
        n_blocks: int,
        stats_width: int,
        small: dict[str, np.ndarray],
        diagnostics: bool = False,
    ) -> None:
        """Create the group and its arrays (the current version's layout, per-row
        diagnostics with ``diagnostics``); write the small ones (client side)."""
        root = self._root()
        # marked ours from the start: a fit interrupted before it records its configuration
        # leaves status "creating", which the next fit replaces
        g = root.require_group(ANALYSES).create_group(
            self.name,
            attributes={
                ANALYSIS_ATTR: {
                    "schema": ANALYSIS_SCHEMA,
                    "version": ANALYSIS_VERSION,
                    "status": "creating",
                }
            },
        )
        chunk = (min(block_rows, max(n_rows, 1)),)
        # the window's length (the anchor's dtype): its epochs, else the references' width
        window = small.get("epochs", small.get("refs", np.zeros((0, 1))).T)
        n_window = int(np.asarray(window).shape[0])
        kinds = StudyLayout(ANALYSIS_VERSION, diagnostics).per_row(n_modes, n_window)
        specs: list[tuple[str, dict[str, Any], np.ndarray | None]] = [
            (name, {"shape": (n_rows,), "chunks": chunk, "dtype": dt, "fill_value": 0}, None)
            for name, dt in kinds.items()
        ]
        specs.append((
            "block_stats",
            {"shape": (n_blocks, stats_width), "chunks": (1, stats_width), "dtype": "float64",
             "fill_value": np.nan},
            None,
        ))  # fmt: skip
        for name, arr in small.items():
            kw = {"shape": arr.shape, "chunks": arr.shape or (1,), "dtype": arr.dtype, "fill_value": 0}
            specs.append((name, kw, arr))
        _create_result_arrays(g, specs)
        # consolidated when the fit completes (its last set_attrs)

    def require_array(
        self,
        name: str,
        *,
        shape: tuple[int, ...],
        chunks: tuple[int, ...],
        dtype: Any,
        fill_value: Any,
    ) -> Any:
        """The result array ``name`` of this study, created (uncompressed, writing even
        all-fill chunks, like every result array) when it is missing (client side)."""
        g = self.group()
        if name not in g.array_keys():
            _create_result_array(
                g, name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill_value
            )
            consolidate(self.url)
        return g[name]

    def _list(self, prefix: str) -> list[str]:
        """The store keys under ``prefix`` (a path below the store's root)."""
        return keys.list_prefix(self._root().store, prefix)

    def written_chunks(self, array: str) -> set[str]:
        """The chunk keys (``"i/j"``) of the result array ``array`` that exist in the store."""
        prefix = f"{self.path}/{array}/c/"
        return {k[len(prefix) :] for k in self._list(prefix)}

    def finished_blocks(self) -> set[int]:
        """Blocks whose ``block_stats`` row exists: all their results are written."""
        out = set()
        for k in self.written_chunks("block_stats"):
            parts = k.split("/")
            if len(parts) == 2 and parts[0].isdigit() and parts[1] == "0":
                out.add(int(parts[0]))
        return out

    def remove_partials(self) -> int:
        """Delete temporary files (``*.partial``) that a writer killed mid-write left behind.

        Zarr's local store writes a chunk to ``<key>.<uuid>.partial`` and renames it into
        place; a killed task leaves the temporary file, which no later run would overwrite.
        Call before resuming; returns how many were deleted.
        """
        return keys.remove_partials(self._root().store, f"{self.path}/")

    def array(self, name: str) -> Any:
        return self.group()[name]

    def has_array(self, name: str) -> bool:
        """Whether the study holds the array ``name`` (earlier studies lack newer ones)."""
        return name in set(self.group().array_keys())

    # ------------------------------------------------------------------ report files
    def write_file(self, relpath: str, data: bytes) -> str:
        """Write a file (figure, JSON, HTML) under ``analyses/<name>/report/``; returns its
        location (a local path for a local store, else a URL).

        The files go through the store itself, so they land beside the study on any backend.
        ``report/`` is made a Zarr group, so listing the study's members stays warning-free.
        """
        from zarr.core.buffer import default_buffer_prototype

        g = self.group()
        if REPORT not in g.group_keys():
            g.create_group(REPORT, attributes={ANALYSIS_ATTR + "_files": "report files"})
            consolidate(self.url)
        key = f"{self.path}/{REPORT}/{relpath}"
        buf = default_buffer_prototype().buffer.from_bytes(data)
        keys.put(self._root().store, key, buf)
        return self.location(relpath)

    def read_file(self, relpath: str) -> bytes | None:
        """A file written by :meth:`write_file`, or None."""
        key = f"{self.path}/{REPORT}/{relpath}"
        buf = keys.get(self._root().store, key)
        return None if buf is None else buf.to_bytes()

    def location(self, relpath: str) -> str:
        """Where :meth:`write_file` puts ``relpath``."""
        base = self.url.removeprefix("file://") if self.url.startswith("file://") else self.url
        return f"{base.rstrip('/')}/{self.path}/{REPORT}/{relpath}"


def complete_study(st: Any, name: str) -> tuple[AnalysisGroup, dict[str, Any]]:
    """The study ``name`` of the open store ``st`` and its attributes; a clear error when it is
    missing (naming the studies there) or not complete."""
    ag = AnalysisGroup(st.url, name)
    if not ag.exists():
        raise StoreError(
            f"no analysis {name!r} in {st.url} (analyses: {', '.join(st.analyses()) or 'none'})"
        )
    attrs = ag.attrs()
    if attrs.get("status") != "complete":
        raise StoreError(f"analysis {name!r} is not complete: re-run `cmd-pipeline fit` to finish it")
    return ag, check_study_attrs(attrs, name)


def write_result_chunk(
    url: str, name: str, array: str, chunk: tuple[int, ...], values: np.ndarray, chunk_shape: tuple[int, ...]
) -> None:
    """Write one whole chunk of an uncompressed result array straight to the store.

    The bytes are exactly what zarr's ``bytes`` codec writes (little-endian, C order, an edge
    chunk padded to the full chunk shape with the fill value 0), without zarr's per-call
    metadata reads: a fit task writes six arrays per block.
    """
    from zarr.core.buffer.cpu import Buffer

    from pipeline.store.trajectory import _store_of

    data = np.asarray(values)
    if data.shape != chunk_shape:
        full = np.zeros(chunk_shape, dtype=data.dtype)
        full[tuple(slice(0, n) for n in data.shape)] = data
        data = full
    raw = np.ascontiguousarray(data, dtype=data.dtype.newbyteorder("<")).reshape(-1).view(np.uint8)
    key = f"{ANALYSES}/{name}/{array}/c/" + "/".join(str(c) for c in chunk)
    keys.put(_store_of(url), key, Buffer.from_array_like(raw))


def read_block_rows(url: str, name: str, indices: Sequence[int], width: int) -> np.ndarray:
    """The ``block_stats`` rows of blocks ``indices`` (k, width) float64, read straight from
    their chunks (inside a task; one request per row, all in flight at once). A block whose
    row was never written gives a row of NaN, the array's fill value."""
    from pipeline.store.trajectory import _store_of

    out = np.full((len(indices), width), np.nan)
    if not len(indices):
        return out
    prefix = f"{ANALYSES}/{name}/block_stats/c/"
    parts = keys.get_ranges(_store_of(url), [(f"{prefix}{i}/0", 0, 8 * width) for i in indices])
    for k, raw in enumerate(parts):
        if raw is not None:
            out[k] = np.frombuffer(raw, dtype="<f8", count=width)
    return out


def _create_result_array(
    g: Any,
    name: str,
    *,
    shape: tuple[int, ...],
    chunks: tuple[int, ...],
    dtype: Any,
    fill_value: Any,
) -> Any:
    """One study array (see :func:`_result_settings`)."""
    return g.create_array(
        name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill_value,
        **_result_settings(name, len(shape)),
    )  # fmt: skip


def _result_settings(name: str, ndim: int) -> dict[str, Any]:
    """The one way a study's arrays are made: uncompressed (``compressors=None``: the bytes
    :func:`write_result_chunk` writes are the stored chunk), writing even chunks that hold
    only the fill value (a written chunk marks finished work on resume), with dimension
    names."""
    return {
        "compressors": None,
        "config": {"write_empty_chunks": True},
        "dimension_names": result_dims(name, ndim),
    }


def _create_result_arrays(
    g: Any, specs: Sequence[tuple[str, dict[str, Any], np.ndarray | None]]
) -> None:
    """Several result arrays of group ``g`` made as :func:`_create_result_array` makes one,
    ``(name, shape/chunks/dtype/fill_value, values or None)`` each, the values written: all in
    one round trip through zarr's event loop (a study's 10-20 arrays, one after the other,
    took 0.1 s)."""
    import asyncio

    from zarr.core.sync import sync

    async def make(name: str, kw: dict[str, Any], values: np.ndarray | None) -> None:
        arr = await g._async_group.create_array(
            name, **kw, **_result_settings(name, len(kw["shape"]))
        )
        if values is not None:
            await arr.setitem(Ellipsis, values)

    async def make_all() -> None:
        await asyncio.gather(*(make(*spec) for spec in specs))

    sync(make_all())


def open_result(url: str, name: str, array: str) -> Any:
    """Open one result array inside a task, writable, writing even all-fill chunks."""
    arr = zarr.open_array(url, path=f"{ANALYSES}/{name}/{array}", mode="r+")
    return arr.with_config({"write_empty_chunks": True})


def read_result(url: str, name: str, array: str) -> Any:
    """Open one result array read-only (its slices read from the store on demand)."""
    return zarr.open_array(url, path=f"{ANALYSES}/{name}/{array}", mode="r")


def read_result_rows(url: str, name: str, array: str, r0: int, r1: int) -> np.ndarray:
    """Rows ``r0:r1`` of one result array, as numpy (inside a task)."""
    return np.asarray(open_result(url, name, array)[r0:r1])


def read_model_rows(
    url: str, name: str, layout: StudyLayout, r0: int, r1: int
) -> tuple[np.ndarray, ...]:
    """Rows ``r0:r1`` of the arrays of the study's model (:attr:`StudyLayout.model`), as
    numpy, in the order :func:`pipeline.kernels.reconstruct.reconstruct_block` takes them."""
    return tuple(read_result_rows(url, name, k, r0, r1) for k in layout.model)


def write_result_rows(url: str, name: str, array: str, r0: int, values: np.ndarray) -> None:
    """Write ``values`` into rows ``r0 : r0 + len(values)`` of one result array (inside a
    task); a block of whole chunks is written chunk by chunk, without reading."""
    open_result(url, name, array)[r0 : r0 + len(values)] = values
