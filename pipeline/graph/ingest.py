"""Task functions and graph builders of ingestion.

One task writes one whole output chunk (rows ``[r0, r1)`` x the epochs of one time block),
reading from each of those epochs' checkpoints only the byte ranges of those rows, and digests
the 64 KiB blocks of the checkpoint files those ranges cover (with the CRC-32 of the zip
members' parts in them); :func:`digest_rest` tasks read the blocks no chunk task reads whole.
The client puts each file's digest together and checks its CRCs (:mod:`pipeline.ops.ingest`).
Tasks are idempotent: a task that runs twice (a worker died after it finished) writes the same
bytes and returns the same digests.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
from dask import delayed

from pipeline.buffers import scratch
from pipeline.checkpoints.content import SHA256, digest_blocks, file_layout
from pipeline.checkpoints.files import identity
from pipeline.checkpoints.readers import (
    EXACT_RAW,
    RAW_NUMPY,
    CheckpointReader,
    CheckpointSpec,
    TensorInfo,
    cached_reader,
    digest_file,
    prefetch,
    raw_of,
    spans_of,
)
from pipeline.config import INLINE_TENSOR_MAX_ELEMENTS
from pipeline.errors import InputError
from pipeline.graph.packed import Packed
from pipeline.kernels.digests import BlockHasher, BlockRun, piece_digest
from pipeline.plan import EpochInspection, Segment
from pipeline.plan.ingest import DigestPlan, FileBlocks, piece_spans
from pipeline.store.dtypes import narrow
from pipeline.store.schema import EpochEntry, InlineTensor, SourceFile
from pipeline.store.trajectory import ChunkGrid, open_array, read_block

__all__ = ["count_chunk", "digest_rest", "inspect_epoch", "write_chunk"]

Counts = tuple[tuple[tuple[str, int], ...], ...]  # per epoch of the block: ((tensor, n), ...)
#: per epoch of the block: ((tensor, first element, stop element, 16-byte digest), ...)
Digests = tuple[tuple[tuple[str, int, int, bytes], ...], ...]
#: per epoch of the block: ((file index, block runs), ...): the file blocks it digested
Blocks = tuple[tuple[tuple[int, tuple[BlockRun, ...]], ...], ...]


def inspect_epoch(
    spec: CheckpointSpec,
    known: Mapping[str, SourceFile] | None = None,
    stored: EpochEntry | None = None,
    layouts: bool = True,
) -> EpochInspection:
    """Identify every file of the checkpoint and parse its header.

    A file the store already records (``known``: same path, size and modification time) keeps
    its record and is not read. Any other file is not read either, unless it must be compared
    with a stored epoch's file now (``stored``: the committed entry of this epoch) or the
    filesystem gives no modification time: then it is digested (one sequential read, zip CRCs
    checked on the way; with sha256 when the stored record is an older store's). The digest
    of a new epoch's file is put together from the copy tasks' reads instead.

    ``layouts``: also take the files' layouts (sizes, zip members) and where each floating
    tensor's bytes lie, for the tasks that digest the file while copying it (not needed for
    an epoch already stored from the same files).
    """
    files = []
    for i, path in enumerate(spec.files):
        size, mtime_ns = identity(path, spec.epoch)
        old = (known or {}).get(path)
        if old is not None and old.mtime_ns >= 0 and (old.size, old.mtime_ns) == (size, mtime_ns):
            files.append(old)
            continue
        if stored is not None or mtime_ns < 0:
            legacy = stored is not None and i < len(stored.files)
            if legacy and stored is not None and stored.files[i].scheme == SHA256:
                size, digest = digest_file(path, spec.epoch, SHA256)
            else:
                size, digest = digest_file(path, spec.epoch)
            files.append(SourceFile(path, size, digest, mtime_ns))
        else:
            files.append(SourceFile(path, size, "", mtime_ns))
    # what identifies the files keys the reader cache: a file changed since an earlier
    # ingest in this process (a --force rebuild after editing a checkpoint) is opened afresh
    spec = replace(spec, sha256=tuple(f"{f.size}:{f.mtime_ns}:{f.sha256}" for f in files))
    reader = cached_reader(spec)
    tensors = tuple(reader.tensors())
    inline = tuple(
        InlineTensor.from_array(t.name, t.dtype, reader.read_raw(t.name))
        for t in tensors
        if not t.floating and t.size <= INLINE_TENSOR_MAX_ELEMENTS
    )
    if not layouts:
        return EpochInspection(spec, tensors, tuple(files), inline)
    where = {p: i for i, p in enumerate(spec.files)}
    spans = {}
    for t in tensors:
        if t.dtype not in EXACT_RAW:
            continue
        got = spans_of(reader, t.name)
        if got is not None and all(p in where for p, _a, _b in got):
            spans[t.name] = tuple((where[p], a, b) for p, a, b in got)
    lays = tuple(file_layout(p, spec.epoch) for p in spec.files)
    for lay, f in zip(lays, files, strict=True):
        if lay.size != f.size:
            raise InputError(
                f"changed while it was inspected ({f.size} bytes, now {lay.size})",
                path=f.path,
                epoch=spec.epoch,
            )
    return EpochInspection(spec, tensors, tuple(files), inline, lays, spans)


def _block_buffer(rows: int, cols: int) -> np.ndarray:
    """The task's reused (rows, cols) float32 chunk buffer."""
    return scratch("ingest-block", rows * cols).reshape(rows, cols)


def _column_buffer(rows: int) -> np.ndarray:
    return scratch("ingest-column", rows)


def _count_nonfinite(col: np.ndarray, segments: Sequence[Segment]) -> tuple[tuple[str, int], ...]:
    # a NaN or Inf makes the sum NaN or Inf, so a finite sum means none (twice as fast as a
    # float64 sum; a float32 sum that overflows only sends the column to the exact count below;
    # Inf + -Inf is NaN: expected here, not worth numpy's "invalid value" warning)
    with np.errstate(invalid="ignore", over="ignore"):
        if np.isfinite(np.add.reduce(col)):
            return ()
    return _count_nonfinite_parts([(seg.name, _values(col, seg)) for seg in segments])


def _count_nonfinite_parts(parts: Sequence[tuple[str, np.ndarray]]) -> tuple[tuple[str, int], ...]:
    """``(tensor, NaN/Inf count)`` of each part ``(tensor, values)`` that has any, in order."""
    out = []
    with np.errstate(invalid="ignore", over="ignore"):
        for name, values in parts:
            if np.isfinite(np.add.reduce(values)):
                continue
            n = int(np.count_nonzero(~np.isfinite(values)))
            if n:
                out.append((name, n))
    return tuple(out)


#: per 16-bit dtype, the exponent bits: a value is NaN/Inf iff ``bits & 0x7FFF >= mask``
_NONFINITE16 = {"bfloat16": 0x7F80, "float16": 0x7C00}


def _count_nonfinite16(
    parts: Sequence[tuple[str, np.ndarray]], dtype: str
) -> tuple[tuple[str, int], ...]:
    """:func:`_count_nonfinite_parts` of ``(tensor, bytes)`` parts of little-endian bfloat16
    or float16 values, from their bits (no upcast)."""
    mask = _NONFINITE16[dtype]
    out = []
    for name, raw in parts:
        bits = raw.view("<u2")
        # two plain reductions, nothing written: a positive NaN/Inf is an int16 >= mask, a
        # negative one a uint16 >= 0x8000 | mask (every other value is below both)
        if not bits.size or (
            int(bits.view("<i2").max()) < mask and int(bits.max()) < (0x8000 | mask)
        ):
            continue
        mag = np.bitwise_and(bits, 0x7FFF, out=scratch("ingest-bits", bits.size, np.uint16))
        out.append((name, int(np.count_nonzero(mag >= mask))))
    return tuple(out)


def _apply_policy(
    found: tuple[tuple[str, int], ...], nonfinite: str, spec: CheckpointSpec
) -> tuple[tuple[str, int], ...]:
    """``found`` (the NaN/Inf counts of one epoch's column), or the policy's refusal."""
    if found and nonfinite == "error":
        name, n = found[0]
        raise InputError(
            f"{n} NaN/Inf value(s) (policy nonfinite=error)",
            path=spec.label,
            epoch=spec.epoch,
            key=name,
        )
    return found


def _values(col: np.ndarray, seg: Segment) -> np.ndarray:
    """The values of the piece ``seg`` in the column ``col``."""
    return col[seg.out : seg.out + seg.stop - seg.start]


def _digest_pieces(
    values_of: Callable[[Segment], np.ndarray], segments: Sequence[Segment]
) -> tuple[tuple[str, int, int, bytes], ...]:
    """The digest of each tensor piece of one epoch's column (the stored values, float32;
    ``values_of(seg)``: the piece's values)."""
    return tuple((seg.name, seg.start, seg.stop, piece_digest(values_of(seg))) for seg in segments)


def _file_blocks(
    reader: CheckpointReader | KnownLayout,
    spec: CheckpointSpec,
    segments: Sequence[Segment],
    values_of: Callable[[Segment], np.ndarray],
    files: Sequence[FileBlocks],
    raw_bytes: Callable[[Segment], np.ndarray] | None = None,
) -> tuple[tuple[int, tuple[BlockRun, ...]], ...]:
    """Digest the blocks ``files`` of the checkpoint's files from the raw bytes of the tensor
    pieces (``values_of(seg)``: their float32 values, which give the raw bytes back exactly,
    see :func:`~pipeline.plan.ingest.plan_digests`; or ``raw_bytes(seg)``, the file's bytes
    themselves, where the caller has them)."""
    if not files:
        return ()
    hashers = {fb.file: BlockHasher(fb.layout.size, fb.layout.ranges, fb.ranges) for fb in files}
    where = {p: i for i, p in enumerate(spec.files)}
    dtypes = {t.name: t.dtype for t in reader.tensors()}
    for seg in segments:
        dtype = dtypes[seg.name]
        spans = spans_of(reader, seg.name)
        if spans is None or dtype not in EXACT_RAW:
            continue
        raw = raw_of(values_of(seg), dtype) if raw_bytes is None else raw_bytes(seg)
        assert raw is not None
        data = memoryview(np.ascontiguousarray(raw).view(np.uint8))  # type: ignore[arg-type]
        isz = RAW_NUMPY[dtype].itemsize
        lo, hi = seg.start * isz, seg.stop * isz
        off = 0
        for f, a, b in piece_spans([(where.get(p, -1), a, b) for p, a, b in spans], lo, hi):
            if f in hashers:
                hashers[f].feed(a, data[off : off + b - a])
            off += b - a
    out = []
    for f, h in hashers.items():
        try:
            out.append((f, h.result()))
        except ValueError as e:
            raise InputError(
                f"cannot digest the file: {e} (changed while it was ingested?)",
                path=spec.files[f],
                epoch=spec.epoch,
            ) from None
    return tuple(out)


def write_chunk(
    grid: ChunkGrid,
    segments: Sequence[Segment],
    specs: Sequence[CheckpointSpec],
    r0: int,
    r1: int,
    col0: int,
    nonfinite: str,
    blocks: Sequence[Sequence[FileBlocks]] = (),
    stored: bool = False,
    known: Sequence[KnownLayout] = (),
) -> tuple[Counts, Digests, Blocks]:
    """Assemble and write the chunk of rows ``[r0, r1)`` x columns ``[col0, col0+len(specs))``;
    returns each epoch's NaN/Inf counts, the digests of its tensor pieces (of their stored
    16-bit bytes with ``stored``, else of their float32 values; see
    :func:`pipeline.kernels.digests.scheme`) and those of the file blocks ``blocks`` (per
    epoch) that its reads cover. ``known`` (per epoch, optional): where the pieces' bytes lie,
    from the inspection, so that a chunk copied from the files opens no reader."""
    rows, cols = r1 - r0, len(specs)
    block = _block_buffer(rows, cols)
    counts = []
    digests = []
    file_blocks = []
    for j, spec in enumerate(specs):
        # where the pieces lie: from the inspection when given, else from the opened reader
        layout = known[j] if known else cached_reader(spec)
        pieces = _copyable(grid, layout, segments, rows) if cols == 1 else None
        if pieces is not None:
            return _copy_column(
                grid,
                spec,
                layout,
                segments,
                pieces,
                r0,
                col0,
                nonfinite,
                blocks[0] if blocks else (),
                stored,
            )
        reader = cached_reader(spec)
        col = block[:, 0] if cols == 1 else _column_buffer(rows)
        # a remote checkpoint: every piece's bytes in flight at once, not one round trip each
        prefetch(reader, [(seg.name, seg.start, seg.stop) for seg in segments])
        try:
            for seg in segments:
                piece = col[seg.out : seg.out + seg.stop - seg.start]
                try:
                    reader.read_into(seg.name, seg.start, seg.stop, piece)
                except InputError as e:
                    if e.epoch is not None:
                        raise
                    raise InputError(
                        e.reason,
                        path=e.path or spec.label,
                        epoch=spec.epoch,
                        key=e.key or seg.name,
                    ) from None
                except (OSError, ValueError, RuntimeError) as e:
                    raise InputError(
                        f"cannot read tensor data: {e}",
                        path=spec.label,
                        epoch=spec.epoch,
                        key=seg.name,
                    ) from e
        finally:
            prefetch(reader, [])  # the fetched bytes are not kept
        found = _apply_policy(_count_nonfinite(col, segments), nonfinite, spec)
        counts.append(found)

        def values_of(seg: Segment, col: np.ndarray = col) -> np.ndarray:
            return _values(col, seg)

        digests.append(
            _digest_pieces(
                (lambda seg: narrow(values_of(seg), grid.dtype)) if stored else values_of,
                segments,
            )
        )
        file_blocks.append(
            _file_blocks(reader, spec, segments, values_of, blocks[j] if blocks else ())
        )
        if cols > 1:
            block[:, j] = col
    grid.write(r0, col0, block)
    return tuple(counts), tuple(digests), tuple(file_blocks)


def _copyable(
    grid: ChunkGrid,
    reader: CheckpointReader | KnownLayout,
    segments: Sequence[Segment],
    rows: int,
) -> list[tuple[str, int, int]] | None:
    """The ``(file, begin, end)`` byte ranges of local files whose bytes, in order, are the
    column of ``rows`` rows that ``segments`` make, when the chunk can be copied from them as
    they are (:meth:`ChunkGrid.can_copy`; tensors of the stored dtype whose bytes the reader
    locates, one range per piece); None otherwise (the column is then read and written)."""
    if not grid.can_copy():
        return None
    dtypes = {t.name: t.dtype for t in reader.tensors()}
    isz = grid.itemsize
    out: list[tuple[str, int, int]] = []
    pos = 0
    for seg in segments:
        if seg.out != pos or dtypes.get(seg.name) != grid.dtype:
            return None
        spans = spans_of(reader, seg.name)
        if spans is None:
            return None
        parts = list(
            piece_spans(
                [(k, a, b) for k, (_p, a, b) in enumerate(spans)], seg.start * isz, seg.stop * isz
            )
        )
        if len(parts) != 1:
            return None
        k, a, b = parts[0]
        path = spans[k][0]
        if "://" in path or not os.path.isfile(path):
            return None
        out.append((path, a, b))
        pos += seg.stop - seg.start
    return out if pos == rows else None


def _copy_column(
    grid: ChunkGrid,
    spec: CheckpointSpec,
    reader: CheckpointReader | KnownLayout,
    segments: Sequence[Segment],
    pieces: Sequence[tuple[str, int, int]],
    r0: int,
    col0: int,
    nonfinite: str,
    files: Sequence[FileBlocks],
    stored: bool = False,
) -> tuple[Counts, Digests, Blocks]:
    """:func:`write_chunk` of one epoch whose column is ``pieces`` of its files: the values are
    checked and digested in place (the files mapped into memory, not copied) and the chunk is
    copied from the files by the kernel (:meth:`ChunkGrid.copy_chunk`). Each byte passes once
    through this process's memory instead of three times (read, check and digest, write).
    16-bit values are checked from their bits and, with ``stored``, digested as they lie;
    without, upcast to float32 first (the digests of 16-bit stores written before)."""
    with contextlib.ExitStack() as stack:
        mapped: dict[str, tuple[np.ndarray, tuple[int, int]]] = {}
        ends: dict[str, int] = {}
        for path, _a, b in pieces:
            ends[path] = max(b, ends.get(path, 0))
        for path, b in ends.items():
            fd = os.open(path, os.O_RDONLY)
            stack.callback(os.close, fd)
            st = os.fstat(fd)
            if st.st_size < b:
                raise InputError(
                    f"truncated: {st.st_size} bytes, tensor data up to byte {b}",
                    path=path,
                    epoch=spec.epoch,
                )
            m = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            stack.callback(_close_map, m)
            mapped[path] = (np.frombuffer(m, dtype=np.uint8), (st.st_size, st.st_mtime_ns))
        raws = {
            (seg.name, seg.start): mapped[p][0][a:b]
            for seg, (p, a, b) in zip(segments, pieces, strict=True)
        }
        if grid.dtype == "float32":  # the values where they lie
            views = {k: raw.view("<f4") for k, raw in raws.items()}
        elif stored:  # 16-bit, checked from the bits, digested as stored: no upcast
            views = raws
        else:  # 16-bit, digested as float32 values (exact), as the store's older epochs
            col = _column_buffer(sum(seg.stop - seg.start for seg in segments))
            views = {}
            for seg in segments:
                views[seg.name, seg.start] = v = _values(col, seg)
                _upcast16(raws[seg.name, seg.start], grid.dtype, v)

        def values_of(seg: Segment) -> np.ndarray:
            return views[seg.name, seg.start]

        def raw_bytes(seg: Segment) -> np.ndarray:
            return raws[seg.name, seg.start]

        parts = [(seg.name, values_of(seg)) for seg in segments]
        if stored and grid.dtype != "float32":
            counted = _count_nonfinite16(parts, grid.dtype)
        else:
            counted = _count_nonfinite_parts(parts)
        found = _apply_policy(counted, nonfinite, spec)
        digests = _digest_pieces(values_of, segments)
        file_blocks = _file_blocks(reader, spec, segments, values_of, files, raw_bytes)
        grid.copy_chunk(r0, col0, pieces)
        for path, (_arr, ident) in mapped.items():  # what was digested is what was copied
            st = os.stat(path)
            if (st.st_size, st.st_mtime_ns) != ident:
                raise InputError(
                    "changed while it was ingested (size or modification time)",
                    path=path,
                    epoch=spec.epoch,
                )
        views.clear()
        raws.clear()
        mapped.clear()
    return (found,), (digests,), (file_blocks,)


def _upcast16(raw: np.ndarray, dtype: str, out: np.ndarray) -> None:
    """The little-endian float16 or bfloat16 values of the bytes ``raw`` into float32 ``out``
    (exact: every 16-bit float is a float32)."""
    bits = raw.view("<u2")
    if dtype == "bfloat16":  # a bfloat16 is the top half of the float32 of the same value
        np.left_shift(bits, 16, out=out.view(np.uint32), dtype=np.uint32)
    else:
        out[...] = bits.view("<f2")


def _close_map(m: mmap.mmap) -> None:
    """Close a mapping unless an array still views it (then it closes when that one goes)."""
    with contextlib.suppress(BufferError):
        m.close()


def count_chunk(
    url: str,
    segments: Sequence[Segment],
    r0: int,
    r1: int,
    col0: int,
    cols: int,
    specs: Sequence[CheckpointSpec] = (),
    blocks: Sequence[Sequence[FileBlocks]] = (),
    stored: bool = False,
    known: Sequence[KnownLayout] = (),
) -> tuple[Counts, Digests, Blocks]:
    """NaN/Inf counts and piece digests of a chunk written by an earlier (interrupted) run,
    and the digests of the file blocks ``blocks`` its pieces cover: the stored values give
    the input's bytes back exactly, so the input is not read again (only its header). The
    pieces are digested as :func:`write_chunk` digests them (``stored``: their stored bytes)."""
    native = np.asarray(open_array(url, min_cols=col0 + cols)[r0:r1, col0 : col0 + cols])
    block = read_block(native, 0, r1 - r0, 0, cols)  # float32 (16-bit values upcast, exact)
    columns = [np.ascontiguousarray(block[:, j], dtype=np.float32) for j in range(cols)]
    getters = [lambda seg, c=c: _values(c, seg) for c in columns]
    as_stored = getters
    if stored and native.dtype.itemsize == 2:
        natives = [np.ascontiguousarray(native[:, j]) for j in range(cols)]
        as_stored = [lambda seg, c=c: _values(c, seg) for c in natives]
    return (
        tuple(_count_nonfinite(c, segments) for c in columns),
        tuple(_digest_pieces(g, segments) for g in as_stored),
        tuple(
            _file_blocks(
                known[j] if known else cached_reader(spec),
                spec,
                segments,
                g,
                blocks[j] if blocks else (),
            )
            for j, (spec, g) in enumerate(zip(specs, getters, strict=False))
        ),
    )


def digest_rest(fb: FileBlocks, epoch: int | None) -> tuple[int, tuple[BlockRun, ...]]:
    """Read and digest the blocks of a file no chunk task reads whole."""
    return fb.file, digest_blocks(fb.layout, fb.ranges, epoch)


def build_inspect_tasks(
    specs: Sequence[CheckpointSpec],
    known: Mapping[str, SourceFile] | None = None,
    stored: Mapping[int, EpochEntry] | None = None,
    layouts: bool | None = None,
) -> list[object]:
    """One :func:`inspect_epoch` task per checkpoint (``known``: the files the store records,
    by path; each task gets only its own files' records; ``stored``: the store's committed
    epochs by number, which an input of the same epoch is compared with).

    ``layouts``: take the files' layouts for every checkpoint (True), for none (False), or
    (None) for those not stored from the same files already (judged by path, size and
    modification time, without a read).
    """
    tasks = []
    for i, s in enumerate(specs):
        mine = {p: known[p] for p in s.files if known and p in known}
        old = (stored or {}).get(s.epoch) if s.epoch is not None else None
        want = layouts
        if want is None:
            want = old is None or not _all_known(s, mine, old)
        tasks.append(
            delayed(inspect_epoch, pure=False)(s, mine, old, want, dask_key_name=f"inspect-{i}")
        )
    return tasks


def _all_known(spec: CheckpointSpec, known: Mapping[str, SourceFile], old: EpochEntry) -> bool:
    """Whether every file of ``spec`` is recorded by the stored epoch ``old`` (by path; the
    size and modification time are compared by the inspection)."""
    recorded = {f.path for f in old.files}
    return len(spec.files) == len(old.files) and all(
        p in known and p in recorded for p in spec.files
    )


class KnownLayout:
    """What a chunk task needs of one epoch's checkpoint to copy its pieces: its tensors'
    dtypes and the byte ranges of their elements, as the epoch's inspection found them (a
    reader-like ``tensors()`` and ``spans()``, for the task's tensors only). With it a task
    that copies opens nothing but the files it copies: no header parsed again, no
    ``torch.load`` (30-60 ms for a file of 300 tensors); a task that reads the values still
    opens the checkpoint."""

    def __init__(
        self,
        spec: CheckpointSpec,
        tensors: Sequence[TensorInfo],
        spans: Mapping[str, tuple[tuple[str, int, int], ...]],
    ) -> None:
        self.spec = spec
        self._tensors = list(tensors)
        self._spans = dict(spans)

    @classmethod
    def of(cls, inspection: EpochInspection, segments: Sequence[Segment]) -> KnownLayout:
        """The layout of the tensors of ``segments`` in the inspected epoch."""
        names = {seg.name for seg in segments}
        files = inspection.spec.files
        spans = inspection.spans
        return cls(
            inspection.spec,
            [t for t in inspection.tensors if t.name in names],
            {n: tuple((files[f], a, b) for f, a, b in spans[n]) for n in names if n in spans},
        )

    def tensors(self) -> list[TensorInfo]:
        return list(self._tensors)

    def spans(self, name: str) -> tuple[tuple[str, int, int], ...] | None:
        return self._spans.get(name)


def run_chunks(calls: Packed) -> tuple[Any, ...]:
    """(Task) the chunk jobs ``calls.args``, ``((function, arguments), ...)``, one after
    another (:func:`write_chunk`, :func:`count_chunk`): their results, in order."""
    return tuple(fn(*args) for fn, args in calls.args)


def chunk_groups(n: int, most: int) -> list[tuple[int, int]]:
    """``[0, n)`` cut into as few runs of consecutive indices as hold at most ``most`` each,
    of sizes that differ by one at most.

    >>> chunk_groups(10, 4), chunk_groups(3, 8), chunk_groups(4, 1)
    ([(0, 3), (3, 6), (6, 10)], [(0, 3)], [(0, 1), (1, 2), (2, 3), (3, 4)])
    """
    if n <= 0:
        return []
    k = -(-n // max(1, most))
    return [(g * n // k, (g + 1) * n // k) for g in range(k)]


def build_chunk_tasks(
    grid: ChunkGrid,
    row_blocks: Sequence[tuple[int, int, Sequence[Segment]]],
    col_blocks: Sequence[tuple[int, Sequence[CheckpointSpec]]],
    existing: set[tuple[int, int]],
    chunk_rows: int,
    time_chunk: int,
    nonfinite: str,
    digests: DigestPlan | None = None,
    epochs: Sequence[CheckpointSpec] = (),
    stored: bool = False,
    inspections: Sequence[EpochInspection] = (),
    chunks_per_task: int = 1,
) -> tuple[list[object], list[list[tuple[int, int, bool]]]]:
    """Tasks that write the chunks, ``chunks_per_task`` consecutive row blocks of one time
    block each (:func:`chunk_groups`: as few tasks as that allows, of even sizes); chunks
    that already exist are only re-counted, never rewritten. Each task (:func:`run_chunks`)
    returns its chunks' results in order. Fewer, larger tasks spread the scheduler's cost per
    task over more bytes; one chunk per task gives each chunk its own task.

    A task's key names its time block first (``write-{j}-{i}`` for the chunk at row block
    ``i`` and time block ``j``, ``write-{j}-{i}-{last i}`` for several; ``count-...`` when
    every chunk of the task exists): dask orders tasks that depend on nothing by their keys,
    so one epoch's tasks then run one after another, each file is read in turn, and a task
    that must read values (not copy them) finds its checkpoint still open in its process
    (the reader cache holds a few); keys that began with the row block made such tasks
    reopen their checkpoint (parse the header again; two requests for a remote file) once a
    run had more epochs than the cache holds.
    With ``digests`` (see :func:`~pipeline.plan.ingest.plan_digests`; ``epochs``: the new
    epochs' specs in order), each chunk job also digests the file blocks its pieces cover,
    and one :func:`digest_rest` task per file reads the blocks no chunk job reads whole;
    those follow the chunk tasks. ``stored``: the tensor pieces are digested as stored
    (16-bit bytes; see :func:`pipeline.kernels.digests.scheme`). ``inspections``: the new
    epochs' inspections (with their layouts), which give each job the :class:`KnownLayout`
    of its pieces.

    Returns the tasks and, for each chunk task, its chunks' ``(row block, time block,
    was_written)`` in order.
    """
    tasks: list[object] = []
    where: list[list[tuple[int, int, bool]]] = []
    n = 0
    inspected = {i.spec: i for i in inspections if i.layouts is not None}
    # epochs in the outer loop (and first in the keys, which set dask's order): a worker
    # keeps one checkpoint open across consecutive tasks
    for col0, specs in col_blocks:
        j = col0 // time_chunk
        jobs: list[tuple[Any, tuple[Any, ...]]] = []
        chunks: list[tuple[int, int, bool]] = []
        for r0, r1, segs in row_blocks:
            i = r0 // chunk_rows
            mine = digests.tasks[n] if digests is not None else ()
            n += 1
            known = (
                tuple(KnownLayout.of(inspected[spec], segs) for spec in specs)
                if all(spec in inspected for spec in specs)
                else ()
            )
            if (i, j) in existing:
                args: tuple[Any, ...] = (
                    grid.url, segs, r0, r1, col0, len(specs), specs, mine, stored, known,
                )  # fmt: skip
                jobs.append((count_chunk, args))
                chunks.append((i, j, False))
            else:
                args = (grid, segs, specs, r0, r1, col0, nonfinite, mine, stored, known)
                jobs.append((write_chunk, args))
                chunks.append((i, j, True))
        for a, b in chunk_groups(len(jobs), chunks_per_task):
            mine_chunks = chunks[a:b]
            kind = "write" if any(w for _i, _j, w in mine_chunks) else "count"
            rows = f"{mine_chunks[0][0]}" + (f"-{mine_chunks[-1][0]}" if b - a > 1 else "")
            tasks.append(
                delayed(run_chunks, pure=False)(
                    Packed(tuple(jobs[a:b])), dask_key_name=f"{kind}-{j}-{rows}"
                )
            )
            where.append(mine_chunks)
    for p, fb in digests.rest if digests is not None else ():
        tasks.append(
            delayed(digest_rest, pure=False)(
                fb, epochs[p].epoch, dask_key_name=f"digest-{p}-{fb.file}"
            )
        )
    return tasks, where
