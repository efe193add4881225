"""``export``: one epoch of the store written back as a checkpoint (.safetensors or .pt).

Tensors keep their original names, shapes and dtypes, so the file loads into the model with
``load_state_dict(strict=True)``. Tensors that are not in the trajectory come from the epoch
metadata (small integer buffers) or from the original checkpoint files.

``.safetensors`` files are streamed: the store is read one chunk at a time and memory stays
bounded by the chunk size whatever the model's size. ``.pt`` files are built in memory (one
epoch's state_dict) because ``torch.save`` needs the whole dict.

Shaped like the user's own model instead (a Hugging Face folder, a Lightning ``.ckpt``): see
:mod:`pipeline.ops.export_like`, which writes through this module's :class:`SafetensorsFile`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.buffers import write_all
from pipeline.checkpoints.discover import spec_of_files
from pipeline.checkpoints.readers import (
    RAW_NUMPY,
    ST_TAGS,
    CheckpointSpec,
    digest_file,
    open_checkpoint,
)
from pipeline.errors import InputError, StoreError
from pipeline.plan import RowLayout, blocks
from pipeline.store.remote import StorageOptions, with_storage_options
from pipeline.store.schema import EpochEntry, StoreMeta, TensorEntry
from pipeline.store.trajectory import TrajectoryStore, read_block

__all__ = [
    "ST_METADATA",
    "ColumnSource",
    "SafetensorsFile",
    "export",
    "from_float32",
    "state_dict",
]

#: A source of one epoch's values: yields ``(row_start, float32 values)`` blocks in row order.
ColumnSource = Callable[[], Iterator[tuple[int, np.ndarray]]]


def from_float32(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values in the raw storage dtype of ``dtype`` (bf16: round to nearest even)."""
    if dtype == "float32":
        return values.astype("<f4", copy=False)
    if dtype == "bfloat16":
        bits = values.astype(np.float32, copy=False).view(np.uint32)
        rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(
            np.uint16
        )
        nan = np.isnan(values)
        if nan.any():
            # truncate NaNs; a payload that lives only in the low half would leave an Inf,
            # so only then set the quiet bit (a bf16 NaN, signalling or not, stays bit-exact)
            high = (bits[nan] >> 16).astype(np.uint16)
            rounded[nan] = np.where(high & np.uint16(0x7F), high, high | np.uint16(0x40))
        return rounded
    if dtype in ("float16", "float64"):
        return values.astype(RAW_NUMPY[dtype])
    raise TypeError(f"cannot write float values as {dtype}")


def _spec_of(entry: EpochEntry, strip_prefix: str | None = None) -> CheckpointSpec:
    paths = tuple(f.path for f in entry.files)
    for f in entry.files:
        # same size is not same contents (a re-run of training overwrites its checkpoints):
        # compare the digest recorded at ingest
        if (
            not os.path.exists(f.path)
            or os.path.getsize(f.path) != f.size
            or digest_file(f.path, entry.epoch, f.scheme or "content")[1] != f.sha256
        ):
            raise InputError(
                "the original checkpoint is missing or changed; it is needed for the tensors that "
                "are not stored in the trajectory",
                path=f.path,
                epoch=entry.epoch,
            )
    return spec_of_files(paths, entry.epoch, strip_prefix)  # the layout ingest found


class SideTensors:
    """Tensors of one epoch that are not in the trajectory."""

    def __init__(self, entry: EpochEntry, strip_prefix: str | None = None) -> None:
        self.entry = entry
        self.strip_prefix = strip_prefix  # the store's setting: its names are the stripped ones
        self.inline = {t.name: t for t in entry.inline}
        self._reader = None

    def raw(self, t: TensorEntry) -> np.ndarray:
        inl = self.inline.get(t.name)
        if inl is not None:
            return np.frombuffer(inl.to_bytes(), dtype=RAW_NUMPY[t.dtype]).reshape(t.shape)
        if self._reader is None:
            self._reader = open_checkpoint(_spec_of(self.entry, self.strip_prefix))  # type: ignore[assignment]
        return self._reader.read_raw(t.name)  # type: ignore[attr-defined]


def store_column(st: TrajectoryStore, col: int) -> ColumnSource:
    """Blocks of one column of the stored trajectory, one chunk at a time."""
    arr = st.trajectory()
    rows = int(arr.chunks[0])
    n = int(arr.shape[0])

    def gen() -> Iterator[tuple[int, np.ndarray]]:
        for r0, r1 in blocks(n, rows):
            yield r0, read_block(arr, r0, r1, col, col + 1)[:, 0]

    return gen


@with_storage_options("store")
def export(
    store: str | os.PathLike[str],
    epoch: int,
    out: str | os.PathLike[str],
    *,
    analysis: str | None = None,
    like: str | os.PathLike[str] | None = None,
    progress: bool = False,
    storage_options: StorageOptions | None = None,
) -> Path:
    """Write epoch ``epoch`` of the store as a checkpoint; the format follows ``out``'s suffix.

    Parameters
    ----------
    store
        The trajectory store.
    epoch
        An epoch number recorded in the store.
    out
        Output path ending in ``.safetensors``, ``.pt`` or ``.pth``; or ``.ckpt``, with
        ``like``: a copy of that Lightning checkpoint with its weights replaced (see
        :func:`pipeline.ops.export_like.export_ckpt`).
    analysis
        Name of a CMD analysis: export its reconstruction of the epoch instead of the
        recorded weights.
    like
        A Lightning checkpoint (``.ckpt``) whose layout a ``.ckpt`` output copies. For a
        Hugging Face model folder see :func:`pipeline.ops.export_like.export_hf`.
    progress
        Show a progress bar over the rows on stderr.
    storage_options
        fsspec options (credentials, ``endpoint_url``...) for a store on object storage
        (``s3://``, ``gs://``...); they reach the Dask workers too, never the store.
    """
    out = Path(out)
    if out.suffix.lower() == ".ckpt" or like is not None:
        if like is None:
            raise InputError(
                "a .ckpt output is a copy of a Lightning checkpoint with the weights replaced: "
                "give that checkpoint with like=CKPT",
                path=str(out),
            )
        if out.suffix.lower() != ".ckpt":
            raise InputError(
                "like=... shapes a .ckpt output (a Lightning checkpoint) or a Hugging Face "
                "folder (export_hf); a .safetensors/.pt/.pth output keeps the store's own names",
                path=str(out),
            )
        from pipeline.ops.export_like import export_ckpt

        return export_ckpt(store, epoch, out, like=like, analysis=analysis, progress=progress).path
    st = TrajectoryStore.open(store)
    meta, entry, source = epoch_source(st, epoch, analysis, progress=progress)
    return write_checkpoint(meta, entry, source, out)


def epoch_source(
    st: TrajectoryStore, epoch: int, analysis: str | None = None, *, progress: bool = False
) -> tuple[StoreMeta, EpochEntry, ColumnSource]:
    """The store's metadata, the epoch's entry and the column source of its weights: the
    recorded ones, or with ``analysis`` the study's reconstruction."""
    meta = st.require_meta()
    col = meta.column_of(epoch)
    source = _source(st, col, epoch, analysis)
    if progress:
        source = _with_progress(source, meta.n_rows, f"export epoch {epoch}")
    return meta, meta.epochs[col], source


def _with_progress(source: ColumnSource, n_rows: int, desc: str) -> ColumnSource:
    """The same blocks, with a progress bar over the rows on stderr."""

    def gen() -> Iterator[tuple[int, np.ndarray]]:
        import sys

        from tqdm.auto import tqdm

        with tqdm(total=n_rows, desc=desc, unit="param", unit_scale=True, file=sys.stderr) as bar:
            for r0, values in source():
                yield r0, values
                bar.update(len(values))

    return gen


def write_checkpoint(meta: StoreMeta, entry: EpochEntry, source: ColumnSource, out: Path) -> Path:
    """Write a state_dict file from a column source and the epoch's side tensors."""
    suffix = out.suffix.lower()
    if suffix not in (".safetensors", ".pt", ".pth"):
        raise InputError(
            f"unsupported output type {suffix or '(none)'}: use .safetensors, .pt or .pth (or "
            ".ckpt with like=CKPT)",
            path=str(out),
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    try:
        if suffix == ".safetensors":
            _write_safetensors(meta, entry, source, tmp)
        else:
            _write_torch(meta, entry, source, tmp)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def segments_by_block(
    meta: StoreMeta, source: ColumnSource
) -> Iterator[tuple[TensorEntry, int, np.ndarray]]:
    """``(tensor, element offset, float32 values)`` pieces in row order."""
    stored = meta.stored_tensors()
    layout = RowLayout.from_entries([(t.name, t.offset, t.size) for t in stored])
    by_name = {t.name: t for t in stored}
    for r0, values in source():
        for seg in layout.segments(r0, r0 + len(values)):
            yield by_name[seg.name], seg.start, values[seg.out : seg.out + seg.stop - seg.start]


def _write_safetensors(
    meta: StoreMeta, entry: EpochEntry, source: ColumnSource, path: Path
) -> None:
    side = SideTensors(entry, meta.settings.strip_prefix)
    tensors = [(t.name, t.dtype, t.shape) for t in meta.tensors]  # the original order
    with SafetensorsFile(path, tensors, metadata=ST_METADATA) as f:
        for t, start, vals in segments_by_block(meta, source):
            f.write(t.name, start, from_float32(vals, t.dtype))
        for t in meta.tensors:
            if not t.stored:
                f.write(t.name, 0, side.raw(t))


#: the ``__metadata__`` of written safetensors files (what ``transformers`` expects)
ST_METADATA = {"format": "pt"}


class SafetensorsFile:
    """A safetensors file written piece by piece: the header first, then any part of any
    tensor, in any order (memory: the piece being written).

    Header keys follow ``tensors``; the data is laid out largest item size first (stable), so
    every tensor starts at a multiple of its item size, as the ``safetensors`` library lays
    it out. :meth:`close` checks that every byte was written.

    >>> import tempfile, numpy as np
    >>> from safetensors.numpy import load_file
    >>> path = Path(tempfile.mkdtemp()) / "t.safetensors"
    >>> with SafetensorsFile(path, [("w", "float32", (2, 2)), ("n", "int64", ())]) as f:
    ...     f.write("w", 2, np.array([3.0, 4.0], np.float32))
    ...     f.write("n", 0, np.array(7))
    ...     f.write("w", 0, np.array([1.0, 2.0], np.float32))
    >>> got = load_file(str(path))
    >>> got["w"].tolist(), int(got["n"])
    ([[1.0, 2.0], [3.0, 4.0]], 7)
    """

    def __init__(
        self,
        path: Path,
        tensors: Sequence[tuple[str, str, tuple[int, ...]]],
        *,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.path = path
        self._dtypes: dict[str, np.dtype[Any]] = {}
        self._expected: dict[str, int] = {}
        for name, dtype, shape in tensors:
            if dtype not in ST_TAGS:
                raise StoreError(f"cannot write dtype {dtype} of {name!r} to safetensors")
            if name in self._dtypes or name == "__metadata__":
                raise StoreError(f"tensor name {name!r} twice in one safetensors file")
            self._dtypes[name] = RAW_NUMPY[dtype]
            self._expected[name] = int(np.prod(shape, dtype=np.int64)) * RAW_NUMPY[dtype].itemsize
        order = sorted(range(len(tensors)), key=lambda i: -self._dtypes[tensors[i][0]].itemsize)
        self._begin: dict[str, int] = {}
        offset = 0
        for i in order:
            name = tensors[i][0]
            self._begin[name] = offset
            offset += self._expected[name]
        self.data_bytes = offset
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = dict(metadata)
        for name, dtype, shape in tensors:
            b = self._begin[name]
            header[name] = {
                "dtype": ST_TAGS[dtype],
                "shape": list(shape),
                "data_offsets": [b, b + self._expected[name]],
            }
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._data_start = 8 + len(raw)
        self._written = dict.fromkeys(self._expected, 0)
        self._f = open(path, "wb")  # noqa: SIM115 - closed by close()
        self._f.write(len(raw).to_bytes(8, "little"))
        self._f.write(raw)

    def write(self, name: str, start: int, raw: np.ndarray) -> None:
        """Elements ``[start, start + raw.size)`` of the flattened tensor ``name``, given in
        (or cast to) its raw storage dtype (``RAW_NUMPY``)."""
        dt = self._dtypes[name]
        data = np.ascontiguousarray(raw).astype(dt, copy=False).reshape(-1)
        at = self._begin[name] + start * dt.itemsize
        if start < 0 or at - self._begin[name] + data.nbytes > self._expected[name]:
            raise StoreError(f"write past the end of tensor {name!r} in {self.path}")
        self._f.seek(self._data_start + at)
        write_all(self._f.write, data.view(np.uint8))  # in pieces: see pipeline.buffers
        self._written[name] += data.nbytes

    def close(self) -> None:
        """Close the file; raise :class:`StoreError` if a tensor was not fully written."""
        if self._f.closed:
            return
        self._f.close()
        short = [n for n, want in self._expected.items() if self._written[n] != want]
        if short:
            raise StoreError(f"{self.path}: the data of {short[:3]} was not written in full")

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self._f.close()


def _torch(what: str) -> Any:
    """torch, or a one-line :class:`InputError` saying ``what`` needs the ``torch`` extra."""
    try:
        import torch
    except ImportError:
        raise InputError(
            f"{what} needs torch, which is not installed: pip install 'cmd-pipeline[torch]' "
            "(or export to .safetensors)"
        ) from None
    return torch


def _write_torch(meta: StoreMeta, entry: EpochEntry, source: ColumnSource, path: Path) -> None:
    torch = _torch(f"writing {path.name}")
    torch.save(torch_state(meta, entry, source), path)


def torch_state(meta: StoreMeta, entry: EpochEntry, source: ColumnSource) -> dict[str, Any]:

    side = SideTensors(entry, meta.settings.strip_prefix)
    arrays = {t.name: np.empty(t.size, dtype=RAW_NUMPY[t.dtype]) for t in meta.stored_tensors()}
    for t, start, vals in segments_by_block(meta, source):
        arrays[t.name][start : start + len(vals)] = from_float32(vals, t.dtype)
    sd = {}
    for t in meta.tensors:
        raw = arrays[t.name] if t.stored else np.ascontiguousarray(side.raw(t))
        raw = raw.reshape(t.shape)
        sd[t.name] = _to_torch(raw, t.dtype)
    return sd


@with_storage_options("store")
def state_dict(
    store: str | os.PathLike[str] | TrajectoryStore,
    epoch: int,
    *,
    analysis: str | None = None,
    storage_options: StorageOptions | None = None,
) -> dict[str, Any]:
    """Epoch ``epoch`` of the store as an in-memory torch state_dict (one epoch, not the run;
    ``storage_options``: fsspec options for a store on object storage).

    Same tensors, names, shapes and dtypes as :func:`export` writes; with ``analysis``, the
    study's CMD reconstruction of that epoch. Ready for ``load_state_dict(strict=True)``.
    """
    st = store if isinstance(store, TrajectoryStore) else TrajectoryStore.open(store)
    meta = st.require_meta()
    col = meta.column_of(epoch)
    return torch_state(meta, meta.epochs[col], _source(st, col, epoch, analysis))


def _source(st: TrajectoryStore, col: int, epoch: int, analysis: str | None) -> ColumnSource:
    if analysis is None:
        return store_column(st, col)
    from pipeline.ops.reconstruct import analysis_column  # checks the study exists and is complete

    return analysis_column(st, analysis, epoch)


def _to_torch(raw: np.ndarray, dtype: str) -> object:
    _t = _torch("a torch state_dict")

    if dtype == "bfloat16":
        return _t.from_numpy(raw.view(np.int16).copy()).view(_t.bfloat16)
    if dtype in ("float8_e4m3fn", "float8_e5m2"):
        return _t.from_numpy(raw.copy()).view(getattr(_t, dtype))
    return _t.from_numpy(np.array(raw, copy=True))
