"""``ingest``: checkpoints in, trajectory store out (the Python counterpart of the CLI command)."""

from __future__ import annotations

import logging
import os
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace

from pipeline._version import __version__
from pipeline.checkpoints.discover import discover
from pipeline.checkpoints.readers import CheckpointSpec
from pipeline.checkpoints.select import build_index, check_same_tensors
from pipeline.config import (
    DEFAULT_CODEC,
    DEFAULT_FLOAT_BUFFERS,
    DEFAULT_NONFINITE,
    DEFAULT_TIME_CHUNK,
)
from pipeline.errors import ConfigMismatchError, InputError
from pipeline.graph.ingest import EpochInspection, build_chunk_tasks, build_inspect_tasks
from pipeline.plan import RowLayout, blocks, default_chunk_rows
from pipeline.runtime import Runner, RuntimeOptions, refuse_gpu, using
from pipeline.store.schema import EpochEntry, IngestSettings, StoreMeta, TensorEntry
from pipeline.store.trajectory import TrajectoryStore

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


def _resolve_settings(
    requested: Mapping[str, object], stored: IngestSettings | None, force: bool
) -> tuple[IngestSettings, bool]:
    """Merge requested settings with the store's; return (settings, must_rebuild)."""
    given = {k: v for k, v in requested.items() if v is not None}
    if stored is None:
        base = {
            "float_buffers": DEFAULT_FLOAT_BUFFERS,
            "nonfinite": DEFAULT_NONFINITE,
            "time_chunk": DEFAULT_TIME_CHUNK,
            "codec": DEFAULT_CODEC,
        }
        base.update(given)
        return IngestSettings(**base), False  # type: ignore[arg-type]
    current = stored.to_dict()
    diffs = {k: (current[k], v) for k, v in given.items() if k != "chunk_rows" or v != current[k]}
    diffs = {k: ov for k, ov in diffs.items() if _norm(ov[0]) != _norm(ov[1])}
    if diffs and not force:
        desc = ", ".join(f"{k}: stored {a!r}, requested {b!r}" for k, (a, b) in diffs.items())
        raise ConfigMismatchError(
            f"the store was ingested with other settings ({desc}); pass --force to rebuild the trajectory"
        )
    merged = {**current, **given}
    kw = {f.name: merged[f.name] for f in fields(IngestSettings)}
    for k in ("include", "exclude", "buffer_patterns"):
        kw[k] = tuple(kw[k])
    return IngestSettings(**kw), bool(diffs)


def _norm(v: object) -> object:
    return tuple(v) if isinstance(v, list | tuple) else v


def ingest(
    inputs: Sequence[str | os.PathLike[str]],
    store: str | os.PathLike[str],
    *,
    epochs: Sequence[int] | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    buffer_patterns: Sequence[str] | None = None,
    float_buffers: bool | None = None,
    nonfinite: str | None = None,
    chunk_rows: int | None = None,
    time_chunk: int | None = None,
    codec: str | None = None,
    force: bool = False,
    runtime: RuntimeOptions | None = None,
    run: Runner | None = None,
) -> IngestResult:
    """Ingest per-epoch checkpoints into the trajectory store at ``store``.

    Creates the store, appends new epochs to it, or resumes an interrupted ingest. Settings
    left as ``None`` take the store's values (or the defaults of :mod:`pipeline.config` for a
    new store). Re-running with other files (by sha256) or other settings raises
    :class:`~pipeline.errors.ConfigMismatchError` unless ``force`` is set, in which case the
    trajectory is rebuilt from ``inputs`` alone.

    Parameters
    ----------
    inputs
        Checkpoint files, directories of checkpoints, sharded checkpoint directories, globs.
    store
        Local path or fsspec URL of the Zarr store.
    epochs
        Epoch numbers of the inputs in order (default: parsed from the file names).
    runtime, run
        Where to compute: options for a new runtime, or an open :class:`~pipeline.runtime.Runner`.

    Returns
    -------
    IngestResult
    """
    t_start = time.perf_counter()
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
    }
    with using(run, runtime) as r:
        return _ingest(specs, st, requested, force, r, t_start)


def _ingest(
    specs: list[CheckpointSpec],
    st: TrajectoryStore,
    requested: Mapping[str, object],
    force: bool,
    run: Runner,
    t_start: float,
) -> IngestResult:
    meta = st.meta
    settings, rebuild = _resolve_settings(requested, meta.settings if meta else None, force)

    # 1. Inspect every checkpoint: hash (one sequential read, CRC-checked for zips) + header.
    inspections: list[EpochInspection] = run.compute(build_inspect_tasks(specs), "inspect")
    first = inspections[0]
    index, n_rows = build_index(first.tensors, settings)
    same_index = meta is None or [t.to_dict() for t in index] == [t.to_dict() for t in meta.tensors]
    if meta is not None and not rebuild and not same_index:
        if not force:
            _explain_index_change(meta.tensors, first)
            raise ConfigMismatchError(
                "the checkpoints' tensors differ from the store's; pass --force to rebuild"
            )
        rebuild = True
    for ins in inspections:
        check_same_tensors(index, ins.spec, ins.tensors)
    if (meta is None or rebuild) and requested["chunk_rows"] is None:
        settings = replace(settings, chunk_rows=default_chunk_rows(n_rows, settings.time_chunk))
    entries = [EpochEntry(_epoch_of(i.spec), i.files, inline=i.inline) for i in inspections]

    # 2. Reconcile with what the store already holds.
    committed: tuple[EpochEntry, ...] = () if (meta is None or rebuild) else meta.epochs
    by_epoch = {e.epoch: e for e in committed}
    new: list[EpochEntry] = []
    already: list[int] = []
    for e in entries:
        old = by_epoch.get(e.epoch)
        if old is None:
            new.append(e)
        elif old.same_source(e):
            already.append(e.epoch)
        elif force:
            rebuild, committed, by_epoch = True, (), {}
            new, already = list(entries), []
            break
        else:
            raise ConfigMismatchError(
                f"epoch {e.epoch} is already stored from other files "
                f"({old.files[0].path}, sha256 {old.files[0].sha256[:12]}...); pass --force to rebuild"
            )
    if committed and new and new[0].epoch < committed[-1].epoch:
        raise InputError(
            f"epoch {new[0].epoch} comes before the last stored epoch {committed[-1].epoch}: "
            "epochs can only be appended"
        )
    pending = None if (meta is None or rebuild) else meta.pending
    resumed = False
    if pending is not None:
        same = len(pending) == len(new) and all(
            p.same_source(n) for p, n in zip(pending, new, strict=False)
        )
        if same:
            resumed = True
        elif not force:
            raise ConfigMismatchError(
                f"an interrupted ingest of epochs {[p.epoch for p in pending]} is pending in this store; "
                "re-run it with the same inputs to resume, or pass --force to discard it"
            )
    if settings.time_chunk > 1 and committed and new and len(committed) % settings.time_chunk:
        raise ConfigMismatchError(
            f"the store holds {len(committed)} epochs in time chunks of {settings.time_chunk}: appending "
            "would rewrite its last chunk column. Append only to stores made with --time-chunk 1, or "
            "re-ingest everything into a new store"
        )

    result = IngestResult(
        st.url, n_rows, len(committed) + len(new), [e.epoch for e in new], already, resumed
    )
    if not new:
        result.n_epochs = len(committed)
        log.info("nothing to ingest: all %d epoch(s) already stored", len(already))
        return result

    # 3. Declare the pending columns (client side), then write every chunk (workers).
    base = StoreMeta(settings, index, n_rows, committed, tuple(new), __version__)
    # --force discards an interrupted ingest it does not resume
    st.begin_append(base, rebuild=rebuild, discard_pending=pending is not None and not resumed)
    existing = st.existing_chunks() if resumed else set()

    layout = RowLayout.from_entries([(t.name, t.offset, t.size) for t in index if t.stored])
    grid = st.chunk_grid()
    row_blocks = [(r0, r1, layout.segments(r0, r1)) for r0, r1 in blocks(n_rows, grid.chunk_rows)]
    c0 = len(committed)
    specs_new = [next(i.spec for i in inspections if i.spec.epoch == e.epoch) for e in new]
    col_blocks = [
        (c0 + a, specs_new[a:b]) for a, b in _time_blocks(c0, len(new), settings.time_chunk)
    ]
    tasks, where = build_chunk_tasks(
        grid,
        row_blocks,
        col_blocks,
        existing,
        grid.chunk_rows,
        grid.time_chunk,
        settings.nonfinite,
    )
    # the same order as the tasks: epochs outer, rows inner
    labels = [
        f"trajectory chunk ({r0 // grid.chunk_rows}, {col0 // grid.time_chunk}): rows {r0}-{r1}, "
        + (
            f"epoch {specs[0].epoch}"
            if len(specs) == 1
            else f"epochs {specs[0].epoch}-{specs[-1].epoch}"
        )
        for col0, specs in col_blocks
        for r0, r1, _segs in row_blocks
    ]
    try:
        counts = run.compute(tasks, "write chunks", labels)
    except InputError:
        st.rollback(meta, base)
        raise
    finally:
        # a worker killed mid-write leaves its temporary file; its task ran again elsewhere
        # (or the job failed and a re-run resumes): either way the file is garbage now
        st.remove_partials()
    # 4. Commit.
    per_epoch: dict[int, dict[str, int]] = defaultdict(dict)
    for (_i, j, _w), block_counts in zip(where, counts, strict=True):
        for k, found in enumerate(block_counts):
            col = j * settings.time_chunk + k
            ep = new[col - c0].epoch
            for name, n in found:
                per_epoch[ep][name] = per_epoch[ep].get(name, 0) + n
    done = tuple(
        EpochEntry(
            e.epoch,
            e.files,
            sum(per_epoch[e.epoch].values()),
            tuple(sorted(per_epoch[e.epoch].items())),
            e.inline,
        )
        for e in new
    )
    st.commit(base, done)
    result.chunks_written = sum(1 for w in where if w[2])
    result.chunks_kept = len(where) - result.chunks_written
    result.nonfinite = {e.epoch: e.nonfinite for e in done if e.nonfinite}
    result.bytes_in = sum(f.size for e in new for f in e.files)
    result.seconds = time.perf_counter() - t_start
    return result


def _epoch_of(spec: CheckpointSpec) -> int:
    assert spec.epoch is not None, "discover() assigns every epoch"
    return spec.epoch


def _time_blocks(c0: int, n_new: int, tc: int) -> list[tuple[int, int]]:
    """Offsets (relative to the first new column) of the time blocks the new columns fill."""
    out = []
    a = 0
    while a < n_new:
        end_col = ((c0 + a) // tc + 1) * tc
        b = min(n_new, end_col - c0)
        out.append((a, b))
        a = b
    return out


def _explain_index_change(stored: Sequence[TensorEntry], first: EpochInspection) -> None:
    got = {t.name: t for t in first.tensors}
    for t in stored:
        g = got.get(t.name)
        if g is None:
            raise InputError(
                "key missing (present in the store)",
                path=first.spec.label,
                epoch=first.spec.epoch,
                key=t.name,
            )
        if g.shape != t.shape or g.dtype != t.dtype:
            raise InputError(
                f"shape/dtype {g.shape}/{g.dtype} differ from the store's {t.shape}/{t.dtype}",
                path=first.spec.label,
                epoch=first.spec.epoch,
                key=t.name,
            )
    extra = [n for n in got if n not in {t.name for t in stored}]
    if extra:
        raise InputError(
            "key not present in the store",
            path=first.spec.label,
            epoch=first.spec.epoch,
            key=extra[0],
        )
