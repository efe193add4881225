"""The ingest's plan: what the inputs hold against what the store holds, decided before a chunk
is written.

:func:`plan_ingest` takes the store's metadata (or ``None`` for a new store), the inspected
checkpoints and the requested settings, and returns an :class:`IngestPlan`: the settings to
use, the row index, the stored epochs kept, the new epochs, and whether the ingest appends,
resumes an interrupted one or rebuilds the trajectory. It raises
:class:`~pipeline.errors.ConfigMismatchError` (changed inputs or settings without ``force``)
and :class:`~pipeline.errors.InputError` (bad inputs) before anything is written.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from pipeline.checkpoints.content import FileLayout
from pipeline.checkpoints.readers import EXACT_RAW, RAW_NUMPY, CheckpointSpec, TensorInfo
from pipeline.checkpoints.select import build_index, check_same_tensors
from pipeline.errors import ConfigMismatchError, InputError
from pipeline.kernels.digests import BlockRanges, covered_blocks, n_blocks
from pipeline.plan.layout import Segment, default_chunk_rows
from pipeline.store.schema import (
    EpochEntry,
    IngestSettings,
    InlineTensor,
    SourceFile,
    StoreMeta,
    TensorEntry,
)

__all__ = [
    "DigestPlan",
    "EpochInspection",
    "FileBlocks",
    "IngestPlan",
    "effective_strip_prefix",
    "plan_digests",
    "plan_ingest",
    "resolve_settings",
]

#: ``(file index, begin, end)``: a byte range of one of a checkpoint's files
Span = tuple[int, int, int]


@dataclass(frozen=True)
class EpochInspection:
    """What one epoch's checkpoint holds: its tensors, file records and inline tensors; for an
    epoch to be written, also its files' layouts (size, zip members) and where each floating
    tensor's bytes lie (``spans``: name -> byte ranges of its elements in order; a tensor
    missing from it is a view the readers cannot map)."""

    spec: CheckpointSpec
    tensors: tuple[TensorInfo, ...]
    files: tuple[SourceFile, ...]
    inline: tuple[InlineTensor, ...]
    layouts: tuple[FileLayout, ...] | None = None
    spans: Mapping[str, tuple[Span, ...]] = field(default_factory=dict)

    @property
    def epoch(self) -> int:
        assert self.spec.epoch is not None, "discover() assigns every epoch"
        return self.spec.epoch

    def entry(self) -> EpochEntry:
        """The epoch's entry in the store's metadata, before its chunks are counted."""
        return EpochEntry(self.epoch, self.files, inline=self.inline)


@dataclass(frozen=True)
class IngestPlan:
    """What an ingest will do (see :func:`plan_ingest`)."""

    settings: IngestSettings
    index: tuple[TensorEntry, ...]
    n_rows: int
    committed: tuple[EpochEntry, ...]  # stored epochs that stay
    new: tuple[EpochEntry, ...]  # epochs to write, in order
    already: tuple[int, ...]  # epochs of the inputs already stored from the same files
    rebuild: bool  # the trajectory is rebuilt from the inputs alone
    resume: bool  # an interrupted ingest of exactly these epochs is finished
    discard_pending: bool  # an interrupted ingest of other epochs is dropped (force)

    def base_meta(self, version: str) -> StoreMeta:
        """The store's metadata with the new epochs pending."""
        return StoreMeta(
            self.settings,
            self.index,
            self.n_rows,
            self.committed,
            self.new,
            version,
            store_dtype=resolve_store_dtype(self.settings.store_dtype, self.index),
        )

    def time_blocks(self) -> list[tuple[int, int]]:
        """``(a, b)``: the new epochs ``new[a:b]`` that fill one time chunk column each.

        >>> from pipeline.store.schema import IngestSettings
        >>> s = IngestSettings(chunk_rows=4, time_chunk=4)
        >>> new = tuple(EpochEntry(e, ()) for e in range(6))
        >>> IngestPlan(s, (), 0, new[:2], new[2:], (), False, False, False).time_blocks()
        [(0, 2), (2, 4)]
        """
        c0, n_new, tc = len(self.committed), len(self.new), self.settings.time_chunk
        out = []
        a = 0
        while a < n_new:
            b = min(n_new, ((c0 + a) // tc + 1) * tc - c0)
            out.append((a, b))
            a = b
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings.to_dict(),
            "index": [t.to_dict() for t in self.index],
            "n_rows": self.n_rows,
            "committed": [e.to_dict() for e in self.committed],
            "new": [e.to_dict() for e in self.new],
            "already": list(self.already),
            "rebuild": self.rebuild,
            "resume": self.resume,
            "discard_pending": self.discard_pending,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> IngestPlan:
        return cls(
            IngestSettings.from_dict(d["settings"]),
            tuple(TensorEntry.from_dict(t) for t in d["index"]),
            int(d["n_rows"]),
            tuple(EpochEntry.from_dict(e) for e in d["committed"]),
            tuple(EpochEntry.from_dict(e) for e in d["new"]),
            tuple(d["already"]),
            bool(d["rebuild"]),
            bool(d["resume"]),
            bool(d["discard_pending"]),
        )


def resolve_settings(
    requested: Mapping[str, object], stored: IngestSettings | None, force: bool
) -> tuple[IngestSettings, bool]:
    """Merge requested settings (``None``: not given) with the store's; return
    ``(settings, must_rebuild)``. A new store takes the defaults of :mod:`pipeline.config`."""
    given = {k: v for k, v in requested.items() if v is not None}
    if stored is None:
        return IngestSettings(**given), False  # type: ignore[arg-type]
    current = {"strip_prefix": None, **stored.to_dict()}
    diffs = {k: (current[k], v) for k, v in given.items() if k != "chunk_rows" or v != current[k]}
    diffs = {k: ov for k, ov in diffs.items() if _norm(ov[0]) != _norm(ov[1])}
    if diffs and not force:
        desc = ", ".join(f"{k}: stored {a!r}, requested {b!r}" for k, (a, b) in diffs.items())
        raise ConfigMismatchError(
            f"the store was ingested with other settings ({desc}); pass force=True to rebuild "
            "the trajectory"
        )
    merged = {**current, **given}
    kw = {f.name: merged[f.name] for f in fields(IngestSettings)}
    for k in ("include", "exclude", "buffer_patterns"):
        kw[k] = tuple(kw[k])
    return IngestSettings(**kw), bool(diffs)


def _norm(v: object) -> object:
    if v == "":
        return None  # strip_prefix="": no prefix
    return tuple(v) if isinstance(v, list | tuple) else v


def effective_strip_prefix(
    requested: Mapping[str, object], stored: IngestSettings | None, force: bool
) -> str | None:
    """The prefix the readers strip, needed before the checkpoints are inspected: the
    settings' as :func:`resolve_settings` merges them (so a changed setting is refused before
    a file is read).

    >>> effective_strip_prefix({"strip_prefix": None}, IngestSettings(strip_prefix="model."), False)
    'model.'
    >>> effective_strip_prefix({"strip_prefix": "module."}, None, False)
    'module.'
    """
    return resolve_settings(requested, stored, force)[0].strip_prefix


def resolve_store_dtype(requested: str, index: Sequence[TensorEntry]) -> str:
    """The trajectory's dtype for the setting ``requested`` ("auto" or a dtype); an explicit
    dtype that cannot hold a stored tensor exactly is refused (nothing is rounded silently).

    >>> t = TensorEntry("w", (2,), "bfloat16", "parameter", 0)
    >>> resolve_store_dtype("auto", [t]), resolve_store_dtype("float32", [t])
    ('bfloat16', 'float32')
    """
    from pipeline.store.dtypes import smallest_exact_dtype

    dtypes = [t.dtype for t in index if t.stored]
    if requested == "auto":
        return smallest_exact_dtype(dtypes)
    if requested == "float32":
        return requested
    for t in index:
        if t.stored and t.dtype != requested:
            raise ConfigMismatchError(
                f"store_dtype={requested!r} cannot hold tensor {t.name!r} ({t.dtype}) exactly; "
                "use store_dtype='auto' or 'float32'"
            )
    return requested


def plan_ingest(
    meta: StoreMeta | None,
    inspections: Sequence[EpochInspection],
    requested: Mapping[str, object],
    force: bool,
) -> IngestPlan:
    """Reconcile the inspected inputs with the store (``meta``; ``None`` for a new store)."""
    settings, rebuild = resolve_settings(requested, meta.settings if meta else None, force)
    first = inspections[0]
    index, n_rows = build_index(first.tensors, settings)
    same_index = meta is None or [t.to_dict() for t in index] == [t.to_dict() for t in meta.tensors]
    if meta is not None and not rebuild and not same_index:
        if not force:
            _explain_index_change(meta.tensors, first)
            raise ConfigMismatchError(
                "the checkpoints' tensors differ from the store's; pass force=True to rebuild"
            )
        rebuild = True
    for ins in inspections:
        check_same_tensors(index, ins.spec, ins.tensors)
    store_dtype = resolve_store_dtype(settings.store_dtype, index)  # refuses before any write
    if (meta is None or rebuild) and requested.get("chunk_rows") is None:
        itemsize = 2 if store_dtype in ("float16", "bfloat16") else 4
        settings = replace(
            settings,
            chunk_rows=default_chunk_rows(n_rows, settings.time_chunk, itemsize=itemsize),
        )
    entries = [i.entry() for i in inspections]

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
            rebuild, committed = True, ()
            new, already = list(entries), []
            break
        else:
            raise ConfigMismatchError(
                f"epoch {e.epoch} is already stored from other files "
                f"({_describe_change(old, e)}); pass force=True to rebuild"
            )
    if committed and new and new[0].epoch < committed[-1].epoch:
        raise InputError(
            f"epoch {new[0].epoch} comes before the last stored epoch {committed[-1].epoch}: "
            "epochs can only be appended"
        )
    pending = None if (meta is None or rebuild) else meta.pending
    resume = False
    if pending is not None:
        if len(pending) == len(new) and all(
            p.same_source(n) for p, n in zip(pending, new, strict=False)
        ):
            resume = True
        elif not force:
            raise ConfigMismatchError(
                f"an interrupted ingest of epochs {[p.epoch for p in pending]} is pending in "
                "this store; re-run it with the same inputs to resume, or pass force=True to "
                "discard it"
            )
    if settings.time_chunk > 1 and committed and new and len(committed) % settings.time_chunk:
        raise ConfigMismatchError(
            f"the store holds {len(committed)} epochs in time chunks of {settings.time_chunk}: "
            "appending would rewrite its last chunk column. Append only to stores made with "
            "time_chunk=1, or re-ingest everything into a new store"
        )
    return IngestPlan(
        settings,
        tuple(index),
        n_rows,
        committed,
        tuple(new),
        tuple(already),
        rebuild,
        resume,
        pending is not None and not resume,
    )


def _describe_change(old: EpochEntry, new: EpochEntry) -> str:
    """Which file of an epoch differs from the stored one, in words."""
    if len(old.files) != len(new.files):
        return f"{len(old.files)} file(s) stored, {len(new.files)} given"
    for a, b in zip(old.files, new.files, strict=True):
        if not a.same_file(b):
            return f"{b.path}: {_short(b.sha256)}, stored {a.path}: {_short(a.sha256)}"
    return "?"


def _short(digest: str) -> str:
    """A digest for a message: its scheme and the first 12 hex digits."""
    scheme, _, hexa = digest.rpartition(":")
    return f"{scheme or 'sha256'} {hexa[:12]}..." if hexa else "not digested"


def _explain_index_change(stored: Sequence[TensorEntry], first: EpochInspection) -> None:
    got = {t.name: t for t in first.tensors}
    label, epoch = first.spec.label, first.spec.epoch
    for t in stored:
        g = got.get(t.name)
        if g is None:
            raise InputError(
                "key missing (present in the store)", path=label, epoch=epoch, key=t.name
            )
        if g.shape != t.shape or g.dtype != t.dtype:
            raise InputError(
                f"shape/dtype {g.shape}/{g.dtype} differ from the store's {t.shape}/{t.dtype}",
                path=label,
                epoch=epoch,
                key=t.name,
            )
    extra = [n for n in got if n not in {t.name for t in stored}]
    if extra:
        raise InputError("key not present in the store", path=label, epoch=epoch, key=extra[0])


# --------------------------------------------------------------------------- block digests
@dataclass(frozen=True)
class FileBlocks:
    """The blocks of one file of a checkpoint a task digests (see
    :mod:`pipeline.kernels.digests`)."""

    file: int  # index into the checkpoint's files
    layout: FileLayout
    ranges: BlockRanges


@dataclass(frozen=True)
class DigestPlan:
    """Who digests which block of the new epochs' files.

    ``tasks``: one entry per chunk task (time blocks outer, row blocks inner, as
    :func:`~pipeline.graph.ingest.build_chunk_tasks` orders them), holding for each epoch of
    its time block the blocks it digests from the tensor bytes it copies. ``rest``:
    ``(position in the new epochs, blocks)`` that no task reads whole (headers, pickles,
    tensors left out, blocks at the edges of the tasks' ranges), read apart.
    """

    tasks: tuple[tuple[tuple[FileBlocks, ...], ...], ...]
    rest: tuple[tuple[int, FileBlocks], ...]


def piece_spans(spans: Sequence[Span], lo: int, hi: int) -> Iterator[Span]:
    """The parts of ``spans`` (a tensor's bytes, in element order) holding its bytes
    ``[lo, hi)``.

    >>> list(piece_spans([(0, 100, 140), (1, 0, 40)], 30, 50))
    [(0, 130, 140), (1, 0, 10)]
    """
    off = 0
    for f, a, b in spans:
        n = b - a
        x, y = max(lo, off), min(hi, off + n)
        if x < y:
            yield f, a + x - off, a + y - off
        off += n
        if off >= hi:
            return


def plan_digests(
    inspections: Sequence[EpochInspection],
    index: Sequence[TensorEntry],
    row_blocks: Sequence[tuple[int, int, Sequence[Segment]]],
    time_blocks: Sequence[tuple[int, int]],
) -> DigestPlan:
    """Assign every block of the new epochs' files (``inspections``, in the order of the
    plan's new epochs; ``time_blocks``: their ``(a, b)`` positions per chunk column) to the
    chunk task that reads it whole, or to the pass over the rest.

    A task reads a block whole when the pieces it copies cover it: tensors of a dtype whose
    raw bytes the stored float32 values give back exactly (:data:`EXACT_RAW`: the same rule
    lets a resumed ingest digest a finished chunk from the store, without the input), whose
    byte ranges the reader knows.
    """
    dtypes = {t.name: t.dtype for t in index if t.stored}
    done: list[list[bytearray]] = []
    for ins in inspections:
        if ins.layouts is None:
            raise ValueError(f"epoch {ins.epoch}: the files' layouts were not taken")
        done.append([bytearray(n_blocks(lay.size)) for lay in ins.layouts])
    tasks = []
    for a, b in time_blocks:
        for _r0, _r1, segs in row_blocks:
            per_epoch = []
            for p in range(a, b):
                ins = inspections[p]
                layouts = ins.layouts
                assert layouts is not None
                by_file: dict[int, list[tuple[int, int]]] = {}
                for seg in segs:
                    dtype = dtypes[seg.name]
                    spans = ins.spans.get(seg.name)
                    if spans is None or dtype not in EXACT_RAW:
                        continue
                    isz = RAW_NUMPY[dtype].itemsize
                    for f, x, y in piece_spans(spans, seg.start * isz, seg.stop * isz):
                        by_file.setdefault(f, []).append((x, y))
                files = []
                for f, spans_f in sorted(by_file.items()):
                    mine = _take(done[p][f], covered_blocks(spans_f, layouts[f].size))
                    if mine:
                        files.append(FileBlocks(f, layouts[f], mine))
                per_epoch.append(tuple(files))
            tasks.append(tuple(per_epoch))
    rest = []
    for p, ins in enumerate(inspections):
        assert ins.layouts is not None
        for f, lay in enumerate(ins.layouts):
            left = _take(done[p][f], ((0, n_blocks(lay.size)),))
            if left:
                rest.append((p, FileBlocks(f, lay, left)))
    return DigestPlan(tuple(tasks), tuple(rest))


def _take(done: bytearray, ranges: BlockRanges) -> BlockRanges:
    """The blocks of ``ranges`` not taken yet, now marked taken."""
    out: list[tuple[int, int]] = []
    for a, b in ranges:
        for k in range(a, b):
            if done[k]:
                continue
            done[k] = 1
            if out and out[-1][1] == k:
                out[-1] = (out[-1][0], k + 1)
            else:
                out.append((k, k + 1))
    return tuple(out)
