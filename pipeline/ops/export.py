"""``export``: one epoch of the store written back as a checkpoint (.safetensors or .pt).

Tensors keep their original names, shapes and dtypes, so the file loads into the model with
``load_state_dict(strict=True)``. Tensors that are not in the trajectory come from the epoch
metadata (small integer buffers) or from the original checkpoint files.

``.safetensors`` files are streamed: the store is read one chunk at a time and memory stays
bounded by the chunk size whatever the model's size. ``.pt`` files are built in memory (one
epoch's state_dict) because ``torch.save`` needs the whole dict.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.checkpoints.readers import (
    RAW_NUMPY,
    ST_TAGS,
    CheckpointSpec,
    digest_file,
    open_checkpoint,
)
from pipeline.errors import InputError, StoreError
from pipeline.plan import RowLayout, blocks
from pipeline.store.schema import EpochEntry, StoreMeta, TensorEntry
from pipeline.store.trajectory import TrajectoryStore, read_block

__all__ = ["ColumnSource", "export", "from_float32", "state_dict"]

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


def _spec_of(entry: EpochEntry) -> CheckpointSpec:
    paths = tuple(f.path for f in entry.files)
    for f in entry.files:
        # same size is not same contents (a re-run of training overwrites its checkpoints):
        # compare the digest recorded at ingest
        if (
            not os.path.exists(f.path)
            or os.path.getsize(f.path) != f.size
            or digest_file(f.path, entry.epoch)[1] != f.sha256
        ):
            raise InputError(
                "the original checkpoint is missing or changed; it is needed for the tensors that "
                "are not stored in the trajectory",
                path=f.path,
                epoch=entry.epoch,
            )
    if paths[0].endswith(".index.json"):
        return CheckpointSpec("hf-sharded", paths, entry.epoch)
    if paths[0].endswith(".safetensors"):
        return CheckpointSpec("safetensors", paths, entry.epoch)
    return CheckpointSpec("torch", paths, entry.epoch)


class _Side:
    """Tensors of one epoch that are not in the trajectory."""

    def __init__(self, entry: EpochEntry) -> None:
        self.entry = entry
        self.inline = {t.name: t for t in entry.inline}
        self._reader = None

    def raw(self, t: TensorEntry) -> np.ndarray:
        inl = self.inline.get(t.name)
        if inl is not None:
            return np.frombuffer(inl.to_bytes(), dtype=RAW_NUMPY[t.dtype]).reshape(t.shape)
        if self._reader is None:
            self._reader = open_checkpoint(_spec_of(self.entry))  # type: ignore[assignment]
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


def export(
    store: str | os.PathLike[str],
    epoch: int,
    out: str | os.PathLike[str],
    *,
    analysis: str | None = None,
    progress: bool = False,
) -> Path:
    """Write epoch ``epoch`` of the store as a checkpoint; the format follows ``out``'s suffix.

    Parameters
    ----------
    store
        The trajectory store.
    epoch
        An epoch number recorded in the store.
    out
        Output path ending in ``.safetensors``, ``.pt`` or ``.pth``.
    analysis
        Name of a CMD analysis: export its reconstruction of the epoch instead of the
        recorded weights.
    progress
        Show a progress bar over the rows on stderr.
    """
    st = TrajectoryStore.open(store)
    meta = st.require_meta()
    col = meta.column_of(epoch)
    source = _source(st, col, epoch, analysis)
    if progress:
        source = _with_progress(source, meta.n_rows, f"export epoch {epoch}")
    return write_checkpoint(meta, meta.epochs[col], source, Path(out))


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
            f"unsupported output type {suffix or '(none)'}: use .safetensors, .pt or .pth",
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


def _segments_by_block(
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
    side = _Side(entry)
    stored = meta.stored_tensors()
    others = [t for t in meta.tensors if not t.stored]
    header: dict[str, object] = {}
    offset = 0
    spans: dict[str, tuple[int, int]] = {}
    for t in stored + others:  # data: stored tensors in row order, then the rest
        nbytes = t.size * RAW_NUMPY[t.dtype].itemsize
        spans[t.name] = (offset, offset + nbytes)
        offset += nbytes
    for t in meta.tensors:  # header keys in the original state_dict order
        if t.dtype not in ST_TAGS:
            raise StoreError(f"cannot write dtype {t.dtype} of {t.name!r} to safetensors")
        header[t.name] = {
            "dtype": ST_TAGS[t.dtype],
            "shape": list(t.shape),
            "data_offsets": list(spans[t.name]),
        }
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for t, _start, vals in _segments_by_block(meta, source):
            f.write(from_float32(vals, t.dtype).tobytes())
        for t in others:
            f.write(
                np.ascontiguousarray(side.raw(t)).astype(RAW_NUMPY[t.dtype], copy=False).tobytes()
            )


def _write_torch(meta: StoreMeta, entry: EpochEntry, source: ColumnSource, path: Path) -> None:
    import torch

    torch.save(_torch_state(meta, entry, source), path)


def _torch_state(meta: StoreMeta, entry: EpochEntry, source: ColumnSource) -> dict[str, Any]:

    side = _Side(entry)
    arrays = {t.name: np.empty(t.size, dtype=RAW_NUMPY[t.dtype]) for t in meta.stored_tensors()}
    for t, start, vals in _segments_by_block(meta, source):
        arrays[t.name][start : start + len(vals)] = from_float32(vals, t.dtype)
    sd = {}
    for t in meta.tensors:
        raw = arrays[t.name] if t.stored else np.ascontiguousarray(side.raw(t))
        raw = raw.reshape(t.shape)
        sd[t.name] = _to_torch(raw, t.dtype)
    return sd


def state_dict(
    store: str | os.PathLike[str] | TrajectoryStore, epoch: int, *, analysis: str | None = None
) -> dict[str, Any]:
    """Epoch ``epoch`` of the store as an in-memory torch state_dict (one epoch, not the run).

    Same tensors, names, shapes and dtypes as :func:`export` writes; with ``analysis``, the
    study's CMD reconstruction of that epoch. Ready for ``load_state_dict(strict=True)``.
    """
    st = store if isinstance(store, TrajectoryStore) else TrajectoryStore.open(store)
    meta = st.require_meta()
    col = meta.column_of(epoch)
    return _torch_state(meta, meta.epochs[col], _source(st, col, epoch, analysis))


def _source(st: TrajectoryStore, col: int, epoch: int, analysis: str | None) -> ColumnSource:
    if analysis is None:
        return store_column(st, col)
    from pipeline.ops.reconstruct import analysis_column  # checks the study exists and is complete

    return analysis_column(st, analysis, epoch)


def _to_torch(raw: np.ndarray, dtype: str) -> object:
    import torch as _t

    if dtype == "bfloat16":
        return _t.from_numpy(raw.view(np.int16).copy()).view(_t.bfloat16)
    if dtype in ("float8_e4m3fn", "float8_e5m2"):
        return _t.from_numpy(raw.copy()).view(getattr(_t, dtype))
    return _t.from_numpy(np.array(raw, copy=True))
