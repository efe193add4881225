"""Task functions and graph builders of ingestion.

One task writes one whole output chunk (rows ``[r0, r1)`` x the epochs of one time block),
reading from each of those epochs' checkpoints only the byte ranges of those rows. Tasks are
idempotent: a task that runs twice (a worker died after it finished) writes the same bytes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np
from dask import delayed

from pipeline.buffers import scratch
from pipeline.checkpoints.files import identity
from pipeline.checkpoints.readers import CheckpointSpec, cached_reader, digest_file, prefetch
from pipeline.config import INLINE_TENSOR_MAX_ELEMENTS
from pipeline.errors import InputError
from pipeline.kernels.digests import piece_digest
from pipeline.plan import EpochInspection, Segment
from pipeline.store.schema import InlineTensor, SourceFile
from pipeline.store.trajectory import ChunkGrid, open_array, read_block

__all__ = ["count_chunk", "inspect_epoch", "write_chunk"]

Counts = tuple[tuple[tuple[str, int], ...], ...]  # per epoch of the block: ((tensor, n), ...)
#: per epoch of the block: ((tensor, first element, stop element, 16-byte digest), ...)
Digests = tuple[tuple[tuple[str, int, int, bytes], ...], ...]


def inspect_epoch(
    spec: CheckpointSpec, known: Mapping[str, SourceFile] | None = None
) -> EpochInspection:
    """Identify every file of the checkpoint and parse its header.

    A file the store already records (``known``: same path, size and modification time) keeps
    its recorded sha256 and is not read; any other is hashed (one sequential read, zip CRCs
    checked on the way).
    """
    files = []
    for path in spec.files:
        size, mtime_ns = identity(path, spec.epoch)
        old = (known or {}).get(path)
        if old is not None and old.mtime_ns >= 0 and (old.size, old.mtime_ns) == (size, mtime_ns):
            files.append(old)
            continue
        size, sha = digest_file(path, spec.epoch)
        files.append(SourceFile(path, size, sha, mtime_ns))
    # the digests key the reader cache: a file changed since an earlier ingest in this
    # process (a --force rebuild after editing a checkpoint) is opened afresh
    spec = replace(spec, sha256=tuple(f.sha256 for f in files))
    reader = cached_reader(spec)
    tensors = tuple(reader.tensors())
    inline = tuple(
        InlineTensor.from_array(t.name, t.dtype, reader.read_raw(t.name))
        for t in tensors
        if not t.floating and t.size <= INLINE_TENSOR_MAX_ELEMENTS
    )
    return EpochInspection(spec, tensors, tuple(files), inline)


def _block_buffer(rows: int, cols: int) -> np.ndarray:
    """The task's reused (rows, cols) float32 chunk buffer."""
    return scratch("ingest-block", rows * cols).reshape(rows, cols)


def _column_buffer(rows: int) -> np.ndarray:
    return scratch("ingest-column", rows)


def _count_nonfinite(col: np.ndarray, segments: Sequence[Segment]) -> tuple[tuple[str, int], ...]:
    # float64 accumulation cannot overflow on float32 inputs, so a finite sum means no NaN/Inf
    # (Inf + -Inf is NaN: expected here, not worth numpy's "invalid value" warning).
    with np.errstate(invalid="ignore"):
        if np.isfinite(np.add.reduce(col, dtype=np.float64)):
            return ()
    out = []
    for seg in segments:
        n = int(np.count_nonzero(~np.isfinite(col[seg.out : seg.out + seg.stop - seg.start])))
        if n:
            out.append((seg.name, n))
    return tuple(out)


def _digest_pieces(
    col: np.ndarray, segments: Sequence[Segment]
) -> tuple[tuple[str, int, int, bytes], ...]:
    """The digest of each tensor piece of one epoch's column (the stored values, float32)."""
    return tuple(
        (seg.name, seg.start, seg.stop, piece_digest(col[seg.out : seg.out + seg.stop - seg.start]))
        for seg in segments
    )


def write_chunk(
    grid: ChunkGrid,
    segments: Sequence[Segment],
    specs: Sequence[CheckpointSpec],
    r0: int,
    r1: int,
    col0: int,
    nonfinite: str,
) -> tuple[Counts, Digests]:
    """Assemble and write the chunk of rows ``[r0, r1)`` x columns ``[col0, col0+len(specs))``;
    returns each epoch's NaN/Inf counts and the digests of its tensor pieces."""
    rows, cols = r1 - r0, len(specs)
    block = _block_buffer(rows, cols)
    counts = []
    digests = []
    for j, spec in enumerate(specs):
        col = block[:, 0] if cols == 1 else _column_buffer(rows)
        reader = cached_reader(spec)
        # a remote checkpoint: every piece's bytes in flight at once, not one round trip each
        prefetch(reader, [(seg.name, seg.start, seg.stop) for seg in segments])
        try:
            for seg in segments:
                piece = col[seg.out : seg.out + seg.stop - seg.start]
                try:
                    reader.read_into(seg.name, seg.start, seg.stop, piece)
                except InputError:
                    raise
                except (OSError, ValueError, RuntimeError) as e:
                    raise InputError(
                        f"cannot read tensor data: {e}",
                        path=spec.label,
                        epoch=spec.epoch,
                        key=seg.name,
                    ) from e
        finally:
            prefetch(reader, [])  # the fetched bytes are not kept
        found = _count_nonfinite(col, segments)
        if found and nonfinite == "error":
            name, n = found[0]
            raise InputError(
                f"{n} NaN/Inf value(s) (policy nonfinite=error)",
                path=spec.label,
                epoch=spec.epoch,
                key=name,
            )
        counts.append(found)
        digests.append(_digest_pieces(col, segments))
        if cols > 1:
            block[:, j] = col
    grid.write(r0, col0, block)
    return tuple(counts), tuple(digests)


def count_chunk(
    url: str, segments: Sequence[Segment], r0: int, r1: int, col0: int, cols: int
) -> tuple[Counts, Digests]:
    """NaN/Inf counts and piece digests of a chunk written by an earlier (interrupted) run."""
    block = read_block(open_array(url, min_cols=col0 + cols), r0, r1, col0, col0 + cols)
    columns = [np.ascontiguousarray(block[:, j], dtype=np.float32) for j in range(cols)]
    return (
        tuple(_count_nonfinite(c, segments) for c in columns),
        tuple(_digest_pieces(c, segments) for c in columns),
    )


def build_inspect_tasks(
    specs: Sequence[CheckpointSpec], known: Mapping[str, SourceFile] | None = None
) -> list[object]:
    """One :func:`inspect_epoch` task per checkpoint (``known``: the files the store records,
    by path; each task gets only its own files' records)."""
    tasks = []
    for i, s in enumerate(specs):
        mine = {p: known[p] for p in s.files if known and p in known}
        tasks.append(delayed(inspect_epoch, pure=False)(s, mine, dask_key_name=f"inspect-{i}"))
    return tasks


def build_chunk_tasks(
    grid: ChunkGrid,
    row_blocks: Sequence[tuple[int, int, Sequence[Segment]]],
    col_blocks: Sequence[tuple[int, Sequence[CheckpointSpec]]],
    existing: set[tuple[int, int]],
    chunk_rows: int,
    time_chunk: int,
    nonfinite: str,
) -> tuple[list[object], list[tuple[int, int, bool]]]:
    """One task per chunk; chunks that already exist are only re-counted, never rewritten.

    Returns the tasks and, for each, ``(row block, time block, was_written)``.
    """
    tasks: list[object] = []
    where: list[tuple[int, int, bool]] = []
    # epochs in the outer loop: a worker keeps one checkpoint open across consecutive tasks
    for col0, specs in col_blocks:
        j = col0 // time_chunk
        for r0, r1, segs in row_blocks:
            i = r0 // chunk_rows
            if (i, j) in existing:
                t = delayed(count_chunk, pure=False)(
                    grid.url, segs, r0, r1, col0, len(specs), dask_key_name=f"count-{i}-{j}"
                )
                where.append((i, j, False))
            else:
                t = delayed(write_chunk, pure=False)(
                    grid, segs, specs, r0, r1, col0, nonfinite, dask_key_name=f"write-{i}-{j}"
                )
                where.append((i, j, True))
            tasks.append(t)
    return tasks, where
