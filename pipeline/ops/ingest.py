"""``ingest``: checkpoints in, trajectory store out (the Python counterpart of the CLI command)."""

from __future__ import annotations

import logging
import os
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from pipeline._version import __version__
from pipeline.checkpoints.content import check_members
from pipeline.checkpoints.discover import discover
from pipeline.checkpoints.files import identity
from pipeline.checkpoints.readers import CheckpointSpec
from pipeline.config import INGEST_TASK_BYTES
from pipeline.errors import InputError
from pipeline.graph.ingest import build_chunk_tasks, build_inspect_tasks
from pipeline.kernels.digests import PREFIX_STORED, BlockRun, FileDigest, combine, scheme
from pipeline.plan import EpochInspection, RowLayout, blocks, parse_epoch_spec, plan_ingest
from pipeline.plan.ingest import DigestPlan, effective_strip_prefix, plan_digests
from pipeline.runtime import Runner, RuntimeOptions, refuse_gpu, using
from pipeline.store.remote import StorageOptions, with_storage_options
from pipeline.store.schema import EpochEntry, SourceFile
from pipeline.store.trajectory import ChunkGrid, TrajectoryStore

__all__ = ["IngestResult", "ingest"]

log = logging.getLogger("pipeline.ingest")


@dataclass
class IngestResult:
    """What an ingest did."""

    store: str
    n_rows: int
    n_epochs: int
    added: list[int] = field(default_factory=list)
    already_present: list[int] = field(default_factory=list)
    resumed: bool = False
    chunks_written: int = 0
    chunks_kept: int = 0
    bytes_in: int = 0
    nonfinite: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0

    def text(self) -> str:
        """The result in words (every result type has this method; ``summary()`` is the
        same text)."""
        return self.summary()

    def summary(self) -> str:
        nan = sum(self.nonfinite.values())
        parts = [
            f"store {self.store}: N={self.n_rows:,} parameters x T={self.n_epochs} epochs",
            f"added {len(self.added)} epoch(s)" + (" (resumed)" if self.resumed else ""),
            f"{self.chunks_written} chunk(s) written, {self.chunks_kept} kept from an earlier run",
        ]
        if self.already_present:
            parts.append(f"{len(self.already_present)} epoch(s) already stored")
        parts.append(f"{nan} NaN/Inf value(s)")
        if self.seconds:
            parts.append(f"{self.bytes_in / 1e9:.2f} GB read in {self.seconds:.1f} s")
        return "; ".join(parts)


@with_storage_options("inputs", "store")
def ingest(
    inputs: Sequence[str | os.PathLike[str]],
    store: str | os.PathLike[str],
    *,
    epochs: Sequence[int] | str | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    buffer_patterns: Sequence[str] | None = None,
    float_buffers: bool | None = None,
    nonfinite: str | None = None,
    chunk_rows: int | None = None,
    time_chunk: int | None = None,
    codec: str | None = None,
    store_dtype: str | None = None,
    strip_prefix: str | None = None,
    force: bool = False,
    chunks_per_task: int | None = None,
    storage_options: StorageOptions | None = None,
    runtime: RuntimeOptions | None = None,
    run: Runner | None = None,
) -> IngestResult:
    """Ingest per-epoch checkpoints into the trajectory store at ``store``.

    Creates the store, appends new epochs to it, or resumes an interrupted ingest. Settings
    left as ``None`` take the store's values (or the defaults of :mod:`pipeline.config` for a
    new store). Re-running with other files (by content digest) or other settings raises
    :class:`~pipeline.errors.ConfigMismatchError` unless ``force`` is set, in which case the
    trajectory is rebuilt from ``inputs`` alone.

    Each byte of a new checkpoint is read once: the tasks that copy the tensors digest what
    they read (and check zip CRCs), and the bytes they do not copy are read apart; a bad file
    found then rolls the store back as any other bad input does.

    Parameters
    ----------
    inputs
        Checkpoint files, directories of checkpoints, sharded checkpoint directories, globs:
        local paths or fsspec URLs (``s3://bucket/run/``, ``gs://...``), read by ranges.
    store
        Local path or fsspec URL of the Zarr store.
    epochs
        Epoch numbers of the inputs in order, or their spec (``"0:50"``, ``"0,5,10"``);
        default: parsed from the file names.
    store_dtype
        ``"auto"`` (default: the smallest of float32, float16, bfloat16 holding every stored
        tensor exactly), or one of those three.
    strip_prefix
        Remove this prefix from the tensor names that start with it (``"model."`` of a
        Lightning module, ``"module."`` of DDP); ``""``: none. Recorded in the store.
    chunks_per_task
        Trajectory chunks one task writes (consecutive row blocks of one epoch); default: as
        many as make :data:`~pipeline.config.INGEST_TASK_BYTES` (4 chunks of 8 MiB). Not a
        setting of the store: any value gives the same store.
    storage_options
        fsspec options (credentials, ``endpoint_url``, ``client_kwargs``...) for the remote
        URLs among ``inputs`` and ``store``; they reach the Dask workers too, and are never
        written to the store.
    runtime, run
        Where to compute: options for a new runtime, or an open :class:`~pipeline.runtime.Runner`.

    Returns
    -------
    IngestResult
    """
    t_start = time.perf_counter()
    if isinstance(epochs, str):
        try:
            epochs = parse_epoch_spec(epochs)
        except ValueError as e:
            raise InputError(str(e)) from None
    if chunks_per_task is not None and chunks_per_task < 1:
        raise InputError(f"chunks_per_task must be at least 1, got {chunks_per_task}")
    specs = discover(inputs, epochs)
    refuse_gpu("ingest", run, runtime)  # before the store is created
    st = TrajectoryStore.open_or_create(store)
    requested: dict[str, object] = {
        "include": tuple(include) if include else None,
        "exclude": tuple(exclude) if exclude is not None and len(exclude) else None,
        "buffer_patterns": tuple(buffer_patterns) if buffer_patterns else None,
        "float_buffers": float_buffers,
        "nonfinite": nonfinite,
        "chunk_rows": chunk_rows,
        "time_chunk": time_chunk,
        "codec": codec,
        "store_dtype": store_dtype,
        "strip_prefix": strip_prefix,
    }
    with using(run, runtime) as r:
        return _ingest(specs, st, requested, force, r, t_start, chunks_per_task)


def _ingest(
    specs: list[CheckpointSpec],
    st: TrajectoryStore,
    requested: Mapping[str, object],
    force: bool,
    run: Runner,
    t_start: float,
    chunks_per_task: int | None = None,
) -> IngestResult:
    # 1. Inspect every checkpoint: headers, and what identifies its files. Files the store
    #    records with the same size and mtime are not read; other files of stored epochs are
    #    digested now (they are compared before anything is written); new epochs' files are
    #    digested by the copy tasks below, which read each of their bytes once.
    meta = st.meta
    prefix = effective_strip_prefix(requested, meta.settings if meta else None, force)
    specs = [replace(s, strip_prefix=prefix) for s in specs]  # the names the store keeps
    known = (
        {f.path: f for e in (*meta.epochs, *(meta.pending or ())) for f in e.files} if meta else {}
    )
    stored = {e.epoch: e for e in meta.epochs} if meta else {}
    inspections: list[EpochInspection] = run.compute(
        build_inspect_tasks(specs, known, stored), "inspect"
    )
    # 2. Plan: reconcile the inputs with what the store holds (raises before any write).
    plan = plan_ingest(meta, inspections, requested, force)
    result = IngestResult(
        st.url,
        plan.n_rows,
        len(plan.committed) + len(plan.new),
        [e.epoch for e in plan.new],
        list(plan.already),
        plan.resume,
    )
    if not plan.new:
        log.info("nothing to ingest: all %d epoch(s) already stored", len(plan.already))
        return result
    new = _with_layouts(run, inspections, plan.new)

    # 3. Declare the pending columns (client side), then write every chunk (workers).
    base = plan.base_meta(__version__)
    st.begin_append(base, rebuild=plan.rebuild, discard_pending=plan.discard_pending)
    existing = st.existing_chunks() if plan.resume else set()
    layout = RowLayout.from_entries([(t.name, t.offset, t.size) for t in plan.index if t.stored])
    grid = st.chunk_grid()
    row_blocks = [
        (r0, r1, layout.segments(r0, r1)) for r0, r1 in blocks(plan.n_rows, grid.chunk_rows)
    ]
    c0 = len(plan.committed)
    specs_new = [i.spec for i in new]
    time_blocks = plan.time_blocks()
    col_blocks = [(c0 + a, specs_new[a:b]) for a, b in time_blocks]
    digests = plan_digests(new, plan.index, row_blocks, time_blocks)
    # what the tensor pieces' digests digest: the stored bytes, or float32 values where the
    # store's epochs were digested so (16-bit stores written before); see digests.scheme
    digest_prefix = scheme(grid.dtype, [e.digests for e in plan.committed])
    tasks, where = build_chunk_tasks(
        grid,
        row_blocks,
        col_blocks,
        existing,
        grid.chunk_rows,
        grid.time_chunk,
        plan.settings.nonfinite,
        digests,
        specs_new,
        stored=digest_prefix == PREFIX_STORED,
        inspections=new,
        chunks_per_task=_chunks_per_task(chunks_per_task, grid),
    )
    # the same order as the tasks: epochs outer, rows inner; then the files' other blocks
    specs_of = {col0 // grid.time_chunk: specs for col0, specs in col_blocks}
    labels = [_chunks_label(group, grid, specs_of[group[0][1]]) for group in where] + [
        f"digest of {fb.layout.path}, epoch {specs_new[p].epoch}" for p, fb in digests.rest
    ]
    try:
        got = run.compute(tasks, "write chunks", labels)
        # one result per chunk (each chunk task returns its chunks' results), then the rest
        results = [r for res in got[: len(where)] for r in res] + list(got[len(where) :])
        where_chunks = [w for group in where for w in group]
        files = _verified_files(new, where_chunks, results, digests, c0, grid.time_chunk)
    except InputError:
        st.rollback(meta, base)
        raise
    finally:
        # a worker killed mid-write leaves its temporary file; its task ran again elsewhere
        # (or the job failed and a re-run resumes): either way the file is garbage now
        st.remove_partials()
    # 4. Commit.
    per_epoch: dict[int, dict[str, int]] = defaultdict(dict)
    pieces: dict[int, dict[str, list[tuple[int, int, bytes]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for (_i, j, _w), (block_counts, block_digests, _blocks) in zip(
        where_chunks, results[: len(where_chunks)], strict=True
    ):
        for k, (found, digests_k) in enumerate(zip(block_counts, block_digests, strict=True)):
            ep = plan.new[j * plan.settings.time_chunk + k - c0].epoch
            for name, n in found:
                per_epoch[ep][name] = per_epoch[ep].get(name, 0) + n
            for name, start, stop, d in digests_k:
                pieces[ep][name].append((start, stop, d))
    stored_names = [t.name for t in plan.index if t.stored]
    done = tuple(
        EpochEntry(
            e.epoch,
            files[p],
            sum(per_epoch[e.epoch].values()),
            tuple(sorted(per_epoch[e.epoch].items())),
            e.inline,
            tuple(combine(pieces[e.epoch][name], digest_prefix) for name in stored_names),
        )
        for p, e in enumerate(plan.new)
    )
    st.commit(base, done)
    result.chunks_written = sum(1 for w in where_chunks if w[2])
    result.chunks_kept = len(where_chunks) - result.chunks_written
    result.nonfinite = {e.epoch: e.nonfinite for e in done if e.nonfinite}
    result.bytes_in = sum(f.size for e in plan.new for f in e.files)
    result.seconds = time.perf_counter() - t_start
    return result


def _with_layouts(
    run: Runner, inspections: Sequence[EpochInspection], new: Sequence[EpochEntry]
) -> list[EpochInspection]:
    """The inspections of the new epochs, in order, with their files' layouts (an epoch the
    store held from the same files has none: it is written again only by a rebuild)."""
    by_epoch = {i.epoch: i for i in inspections}
    out = [by_epoch[e.epoch] for e in new]
    lacking = [i for i in out if i.layouts is None]
    if lacking:
        known = {f.path: f for i in lacking for f in i.files}
        again = run.compute(
            build_inspect_tasks([i.spec for i in lacking], known, layouts=True), "inspect"
        )
        redone = {i.epoch: i for i in again}
        out = [redone.get(i.epoch, i) for i in out]
    return out


def _chunks_per_task(asked: int | None, grid: ChunkGrid) -> int:
    """Chunks per ingest task: ``asked``, else as many as make :data:`INGEST_TASK_BYTES`."""
    if asked is not None:
        return asked
    chunk = grid.chunk_rows * grid.time_chunk * grid.itemsize
    return max(1, INGEST_TASK_BYTES // max(1, chunk))


def _chunks_label(
    group: Sequence[tuple[int, int, bool]], grid: ChunkGrid, specs: Sequence[CheckpointSpec]
) -> str:
    """What a chunk task writes, for its error messages: its chunks, rows and epochs
    (``specs``: its time block's checkpoints)."""
    (i0, j, _w), (i1, _j, _w1) = group[0], group[-1]
    r0 = i0 * grid.chunk_rows
    r1 = min((i1 + 1) * grid.chunk_rows, grid.n_rows)
    when = (
        f"epoch {specs[0].epoch}" if len(specs) == 1 else f"epochs {specs[0].epoch}-{specs[-1].epoch}"
    )
    chunks = f"chunk ({i0}, {j})" if i1 == i0 else f"chunks ({i0}..{i1}, {j})"
    return f"trajectory {chunks}: rows {r0}-{r1}, {when}"


def _verified_files(
    new: Sequence[EpochInspection],
    where: Sequence[tuple[int, int, bool]],
    results: Sequence[object],
    digests: DigestPlan,
    c0: int,
    time_chunk: int,
) -> list[tuple[SourceFile, ...]]:
    """The new epochs' file records with their content digests, put together from the
    tasks' block digests; raises :class:`InputError` naming the file when a zip member
    fails its CRC check or a file changed while it was read."""
    acc = [[FileDigest(lay.size, lay.ranges) for lay in (i.layouts or ())] for i in new]

    def add(p: int, f: int, runs: Sequence[BlockRun]) -> None:
        try:
            for r in runs:
                acc[p][f].add(r)
        except ValueError as e:
            ins = new[p]
            raise InputError(
                f"changed while it was ingested: {e}", path=ins.spec.files[f], epoch=ins.epoch
            ) from None

    for (_i, j, _w), res in zip(where, results[: len(where)], strict=True):
        for k, per_file in enumerate(res[2]):  # type: ignore[index]
            for f, runs in per_file:
                add(j * time_chunk + k - c0, f, runs)
    for (p, _fb), (f, runs) in zip(digests.rest, results[len(where) :], strict=True):  # type: ignore[misc]
        add(p, f, runs)
    out = []
    for ins, fds in zip(new, acc, strict=True):
        assert ins.layouts is not None
        files = []
        for f, (rec, lay, fd) in enumerate(zip(ins.files, ins.layouts, fds, strict=True)):
            check_members(lay, fd.member_crcs(), ins.epoch)
            digest = fd.digest()
            if rec.scheme == "content" and rec.sha256 != digest:
                raise InputError(
                    "changed while it was ingested (its digest differs from the one taken "
                    "when it was inspected)",
                    path=rec.path,
                    epoch=ins.epoch,
                )
            if identity(rec.path, ins.epoch) != (rec.size, rec.mtime_ns):
                raise InputError(
                    "changed while it was ingested (its size or modification time differs)",
                    path=ins.spec.files[f],
                    epoch=ins.epoch,
                )
            files.append(SourceFile(rec.path, rec.size, digest, rec.mtime_ns))
        out.append(tuple(files))
    return out
