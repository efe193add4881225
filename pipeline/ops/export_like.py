"""Export one epoch in the user's own model format, shaped like a model they give (``like``).

- :func:`export_hf`: a Hugging Face model folder that ``AutoModel.from_pretrained`` loads:
  the ``like`` folder's ``config.json``, tokenizer and other files that are not weights, and
  the epoch's weights as ``model.safetensors`` (or ``model-0000k-of-0000n.safetensors`` shards
  with ``model.safetensors.index.json`` when they exceed ``max_shard_size``), safetensors
  ``__metadata__`` ``{"format": "pt"}``. The shards are streamed: the store is read one chunk
  at a time and each tensor is written where it belongs, so memory stays bounded by a chunk
  (or by the largest tensor that is not in the trajectory). The folder is built beside the
  output (``OUT.tmp-*``) and renamed into place when complete.
- :func:`export_ckpt`: a Lightning ``.ckpt``: a copy of the ``like`` checkpoint whose
  ``state_dict`` values are the epoch's weights (names and prefix kept); everything else
  (hyper-parameters, optimizer and loop states, epoch counters) is the ``like`` checkpoint's.

Names (:func:`match_names`): the store's tensors are matched with the ``like`` model's by one
prefix rule found from the names themselves: the same names, the store's names without a
prefix (a wrapper's ``encoder.``), or with one (Lightning's ``model.``). Every matched pair
must have the same shape. Tensors of the ``like`` model that the store does not record at all
(an unused pooler, a position-id buffer) are copied from ``like``; tensors of the store that
the ``like`` model lacks (a classifier head around the encoder) are left out. Both are listed
in the result; ``strict=True`` refuses either instead. The store's dtypes are written. Tensors
the store records but keeps out of the trajectory (integer buffers, excluded names) come, as
with :func:`pipeline.ops.export.export`, from the epoch's metadata or its original checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
import zipfile
from collections import Counter, OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.checkpoints.readers import (
    RAW_NUMPY,
    CheckpointReader,
    CheckpointSpec,
    open_checkpoint,
)
from pipeline.errors import InputError, StoreError
from pipeline.ops.export import (
    ST_METADATA,
    ColumnSource,
    SafetensorsFile,
    SideTensors,
    epoch_source,
    from_float32,
    segments_by_block,
    torch_state,
)
from pipeline.store.remote import StorageOptions, with_storage_options
from pipeline.store.schema import StoreMeta, TensorEntry
from pipeline.store.trajectory import TrajectoryStore

__all__ = [
    "DEFAULT_MAX_SHARD_SIZE",
    "LikeExportResult",
    "NameMatch",
    "export_ckpt",
    "export_hf",
    "match_names",
    "parse_size",
    "plan_shards",
]

#: Largest safetensors shard of :func:`export_hf` (``huggingface_hub``'s default; transformers
#: 5's ``save_pretrained`` uses "50GB").
DEFAULT_MAX_SHARD_SIZE = "5GB"
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
#: files of a model folder that hold weights (or training state): never copied from ``like``
_WEIGHT_SUFFIXES = (
    ".safetensors",
    ".safetensors.index.json",
    ".bin",
    ".bin.index.json",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".h5.index.json",
    ".msgpack",
    ".msgpack.index.json",
    ".onnx",
    ".onnx_data",
    ".gguf",
    ".ot",
    ".tflite",
)
#: folders of a model folder that are not part of the model
_SKIP_DIRS = frozenset({".git", ".cache", "__pycache__"})
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*")


def parse_size(size: int | str) -> int:
    """A size in bytes: an integer, or a number with a unit (``KB``/``MB``/``GB``/``TB`` are
    powers of 1000, ``KiB``/``MiB``/``GiB``/``TiB`` of 1024; any case).

    >>> parse_size("5GB"), parse_size("500MB"), parse_size("1.5kib"), parse_size(4096)
    (5000000000, 500000000, 1536, 4096)
    """
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = _SIZE.fullmatch(str(size))
        unit = m.group(2).upper() if m else ""
        if m is None or unit not in _UNITS:
            raise InputError(
                f"max_shard_size={size!r} is not a size: use bytes or a number with a unit "
                "(500MB, 5GB, 2GiB)"
            )
        value = int(float(m.group(1)) * _UNITS[unit])
    if value < 1:
        raise InputError(f"max_shard_size={size!r} must be at least one byte")
    return value


# --------------------------------------------------------------------------- names
@dataclass(frozen=True)
class NameMatch:
    """How the store's tensors map onto the ``like`` model's.

    A store name ``s`` that starts with ``strip`` becomes ``add + s[len(strip):]``.
    """

    strip: str
    add: str
    #: ``(store name, like name)`` in the store's order
    pairs: tuple[tuple[str, str], ...]
    #: names of the ``like`` model that the store does not record (copied from ``like``)
    from_like: tuple[str, ...]
    #: names of the store that the ``like`` model lacks (not written)
    left_out: tuple[str, ...]

    @property
    def rule(self) -> str:
        """The rule in words."""
        if self.strip:
            return f"the store's names without the prefix {self.strip!r}"
        if self.add:
            return f"the store's names with the prefix {self.add!r}"
        return "the store's names"


def match_names(
    store: Sequence[tuple[str, tuple[int, ...]]],
    like: Sequence[tuple[str, tuple[int, ...]]],
    *,
    strict: bool = False,
    like_label: str = "the like model",
) -> NameMatch:
    """Match ``(name, shape)`` lists: the prefix rule that pairs the most names, then checks.

    Candidates are the same names, the store's names without a dotted prefix, and the
    store's names with a dotted prefix of the ``like`` model's; ties go to the same names,
    then to the shortest prefix. Raises :class:`InputError` when no name matches, when a
    matched pair differs in shape, or (``strict``) when either side has names the other lacks.

    >>> store = [("encoder.emb.weight", (4, 2)), ("encoder.fc.bias", (2,)), ("head.weight", (3, 2))]
    >>> like = [("emb.weight", (4, 2)), ("fc.bias", (2,)), ("pooler.weight", (2, 2))]
    >>> m = match_names(store, like)
    >>> m.rule, m.pairs[0], m.from_like, m.left_out
    ("the store's names without the prefix 'encoder.'", ('encoder.emb.weight', 'emb.weight'), ('pooler.weight',), ('head.weight',))
    >>> match_names([("fc.bias", (2,))], [("model.fc.bias", (2,))]).rule
    "the store's names with the prefix 'model.'"
    """
    like_shapes = dict(like)
    store_shapes = dict(store)
    votes: Counter[tuple[str, str]] = Counter()
    for s in store_shapes:
        if s in like_shapes:
            votes["", ""] += 1
        for i, ch in enumerate(s):
            if ch == "." and s[i + 1 :] in like_shapes:
                votes[s[: i + 1], ""] += 1
    for name in like_shapes:
        for i, ch in enumerate(name):
            if ch == "." and name[i + 1 :] in store_shapes:
                votes["", name[: i + 1]] += 1
    if not votes:
        raise InputError(
            f"no tensor name of the store matches one of {like_label} (store: "
            f"{_some(list(store_shapes))}; {like_label}: {_some(list(like_shapes))}): is it "
            "the model that was trained?"
        )
    strip, add = max(votes, key=lambda k: (votes[k], k == ("", ""), -len(k[0]) - len(k[1]), k))
    pairs: list[tuple[str, str]] = []
    left_out: list[str] = []
    for s, shape in store:
        target = add + s[len(strip) :] if s.startswith(strip) else None
        if target is None or target not in like_shapes:
            left_out.append(s)
            continue
        if tuple(like_shapes[target]) != tuple(shape):
            raise InputError(
                f"tensor {s!r} has shape {list(shape)} in the store but {target!r} has "
                f"{list(like_shapes[target])} in {like_label}: is it the model that was trained?"
            )
        pairs.append((s, target))
    matched = {t for _, t in pairs}
    from_like = tuple(n for n, _ in like if n not in matched)
    result = NameMatch(strip, add, tuple(pairs), from_like, tuple(left_out))
    if strict and (from_like or left_out):
        parts = []
        if from_like:
            parts.append(
                f"{like_label} has {len(from_like)} tensor(s) the store does not record "
                f"({_some(from_like)})"
            )
        if left_out:
            parts.append(
                f"the store has {len(left_out)} tensor(s) {like_label} lacks ({_some(left_out)})"
            )
        raise InputError(
            f"strict=True and the tensors differ ({result.rule} matched {len(pairs)}): "
            + "; ".join(parts)
        )
    return result


def _some(names: Sequence[str], n: int = 3) -> str:
    shown = ", ".join(repr(x) for x in names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "") if names else "none"


# --------------------------------------------------------------------------- result
@dataclass
class LikeExportResult:
    """What :func:`export_hf` or :func:`export_ckpt` wrote."""

    path: Path
    epoch: int
    analysis: str | None
    like: Path
    match: NameMatch
    #: files written, relative to ``path`` (a folder) or ``path``'s name (a file)
    files: list[str] = field(default_factory=list)
    #: files of ``like`` that hold weights or training state, not copied (folders only)
    skipped: list[str] = field(default_factory=list)
    #: bytes of tensor data written
    nbytes: int = 0

    def text(self) -> str:
        """The result in words."""
        what = f"epoch {self.epoch}" + (
            f" as analysis {self.analysis!r} reconstructs it" if self.analysis else ""
        )
        m = self.match
        lines = [
            f"wrote {self.path} ({what}; {len(self.files)} file(s), "
            f"{self.nbytes / 1e6:,.1f} MB of tensors)",
            f"  {len(m.pairs)} tensor(s) from the store, named as {m.rule}",
        ]
        if m.from_like:
            lines.append(
                f"  {len(m.from_like)} tensor(s) the store does not record, kept from "
                f"{self.like}: {_some(m.from_like, 5)}"
            )
        if m.left_out:
            lines.append(
                f"  {len(m.left_out)} tensor(s) of the store left out ({self.like} has no "
                f"such tensor): {_some(m.left_out, 5)}"
            )
        if self.skipped:
            lines.append(f"  not copied (weights or training state): {_some(self.skipped, 5)}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- HF folders
def plan_shards(sizes: Sequence[int], limit: int) -> list[list[int]]:
    """Group tensors (by index, in order) into shards of at most ``limit`` bytes.

    The rule of ``huggingface_hub``'s ``split_state_dict_into_shards``: a shard is closed when
    the next tensor would take it past the limit, and a tensor larger than the limit gets a
    shard of its own (here in place, so that the shards stay in the tensors' order).

    >>> plan_shards([6, 6, 2, 6, 2, 2], 10)
    [[0], [1, 2], [3, 4, 5]]
    >>> plan_shards([3, 12, 3], 10)
    [[0], [1], [2]]
    """
    shards: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, size in enumerate(sizes):
        if current and used + size > limit:
            shards.append(current)
            current, used = [], 0
        current.append(i)
        used += size
        if size > limit:
            shards.append(current)
            current, used = [], 0
    if current or not shards:
        shards.append(current)
    return shards


def shard_names(n: int) -> list[str]:
    """File names of ``n`` shards, as ``transformers`` names them.

    >>> shard_names(1), shard_names(2)
    (['model.safetensors'], ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors'])
    """
    if n == 1:
        return [SAFE_WEIGHTS]
    return [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]


@dataclass(frozen=True)
class _Out:
    """One tensor of the output: from the store (``entry``) or from ``like``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    entry: TensorEntry | None

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * RAW_NUMPY[self.dtype].itemsize


@with_storage_options("store")
def export_hf(
    store: str | os.PathLike[str],
    epoch: int,
    folder: str | os.PathLike[str],
    *,
    like: str | os.PathLike[str] | None = None,
    analysis: str | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    force: bool = False,
    strict: bool = False,
    storage_options: StorageOptions | None = None,
    progress: bool = False,
) -> LikeExportResult:
    """Write epoch ``epoch`` as a Hugging Face model folder shaped like ``like``.

    Parameters
    ----------
    store
        The trajectory store.
    epoch
        An epoch number recorded in the store.
    folder
        The output folder; it must not exist or be empty, unless ``force``.
    like
        A Hugging Face model folder (``config.json`` and ``model.safetensors``, its sharded
        index, or ``pytorch_model.bin``): the model that was trained, before or after. Default:
        the epoch's own checkpoint folder, if it holds a ``config.json``.
    analysis
        Name of a CMD analysis: export its reconstruction of the epoch instead of the
        recorded weights.
    max_shard_size
        Largest shard, in bytes or as ``"500MB"``, ``"5GB"``, ``"2GiB"``; one shard is
        written as ``model.safetensors`` without an index.
    force
        Replace an existing, non-empty ``folder``.
    strict
        Refuse, instead of copying or leaving out, tensors that only one side has.
    progress
        Show a progress bar over the rows on stderr.
    storage_options
        fsspec options (credentials, ``endpoint_url``...) for a store on object storage;
        see :func:`pipeline.fit`.
    """
    limit = parse_size(max_shard_size)
    out = Path(folder)
    st = TrajectoryStore.open(store)
    meta, entry, source = epoch_source(st, epoch, analysis, progress=progress)
    first = entry.files[0].path if entry.files else None
    like_dir = _like_folder(Path(like) if like is not None else None, first)
    _check_out(out, like_dir, force)
    reader = open_checkpoint(_like_weights(like_dir))
    try:
        like_tensors = {t.name: t for t in reader.tensors()}
        match = match_names(
            [(t.name, t.shape) for t in meta.tensors],
            [(t.name, t.shape) for t in like_tensors.values()],
            strict=strict,
            like_label=f"the model in {like_dir}",
        )
        mapped = dict(match.pairs)
        outs = [_Out(mapped[t.name], t.dtype, t.shape, t) for t in meta.tensors if t.name in mapped]
        outs += [
            _Out(n, like_tensors[n].dtype, like_tensors[n].shape, None) for n in match.from_like
        ]
        shards = [[outs[i] for i in idx] for idx in plan_shards([o.nbytes for o in outs], limit)]
        to_copy, skipped = _non_weight_files(like_dir, exclude=out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f"{out.name}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.mkdir()  # not mkdtemp: the folder gets the usual permissions
        try:
            _copy_files(like_dir, to_copy, tmp)
            written = _write_shards(
                tmp, shards, reader, SideTensors(entry, meta.settings.strip_prefix), meta, source
            )
            _publish(tmp, out, force)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        close = getattr(reader, "close", None)
        if close is not None:
            close()
    return LikeExportResult(
        out,
        epoch,
        analysis,
        like_dir,
        match,
        sorted([*to_copy, *written]),
        skipped,
        sum(o.nbytes for o in outs),
    )


def _write_shards(
    folder: Path,
    shards: Sequence[Sequence[_Out]],
    like: CheckpointReader,
    side: SideTensors,
    meta: StoreMeta,
    source: ColumnSource,
) -> list[str]:
    """Write the shards (and their index when there are several) in one pass over the rows:
    the shards follow the store's tensor order, which is the rows' order."""
    names = shard_names(len(shards))
    mapped = {o.entry.name: o.name for shard in shards for o in shard if o.entry is not None}
    pieces = _stored_pieces(meta, source, mapped)
    pending = next(pieces, None)
    for fname, shard in zip(names, shards, strict=True):
        stored_here = {o.entry.name for o in shard if o.entry is not None and o.entry.stored}
        spec = [(o.name, o.dtype, o.shape) for o in shard]
        with SafetensorsFile(folder / fname, spec, metadata=ST_METADATA) as f:
            for o in shard:
                if o.entry is None:
                    f.write(o.name, 0, like.read_raw(o.name))
                elif not o.entry.stored:
                    f.write(o.name, 0, side.raw(o.entry))
            while pending is not None and pending[0].name in stored_here:
                t, start, values = pending
                f.write(mapped[t.name], start, from_float32(values, t.dtype))
                pending = next(pieces, None)
    if pending is not None:
        raise StoreError(f"export: the rows of {pending[0].name!r} came after their shard")
    if len(names) == 1:
        return names
    index = {
        "metadata": {"total_size": sum(o.nbytes for shard in shards for o in shard)},
        "weight_map": {
            o.name: fname for fname, shard in zip(names, shards, strict=True) for o in shard
        },
    }
    (folder / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return [*names, SAFE_INDEX]


def _stored_pieces(
    meta: StoreMeta, source: ColumnSource, mapped: Mapping[str, str]
) -> Iterator[tuple[TensorEntry, int, np.ndarray]]:
    """The trajectory's pieces of the tensors that are written, in row order."""
    for t, start, values in segments_by_block(meta, source):
        if t.name in mapped:
            yield t, start, values


def _like_folder(like: Path | None, first_file: str | None) -> Path:
    """The ``like`` folder, checked; default: the epoch's checkpoint folder."""
    if like is None:
        src = Path(first_file).parent if first_file else None
        if src is None or not (src / "config.json").is_file():
            raise InputError(
                f"the epoch's checkpoint folder {src} has no config.json: give like=DIR, the "
                "Hugging Face model folder (config.json, tokenizer) of the model that was trained"
            )
        return src
    if not like.is_dir():
        raise InputError(
            "is not a folder: like=DIR must be a Hugging Face model folder (config.json and "
            "model.safetensors)",
            path=str(like),
        )
    if not (like / "config.json").is_file():
        raise InputError(
            "has no config.json: like=DIR must be a Hugging Face model folder (config.json and "
            "model.safetensors)",
            path=str(like),
        )
    return like


def _like_weights(like: Path) -> CheckpointSpec:
    """The weights of a model folder (their names and shapes are matched)."""
    if (like / SAFE_INDEX).is_file():
        return CheckpointSpec("hf-sharded", (str(like / SAFE_INDEX),))
    if (like / SAFE_WEIGHTS).is_file():
        return CheckpointSpec("safetensors", (str(like / SAFE_WEIGHTS),))
    if (like / "pytorch_model.bin").is_file():
        return CheckpointSpec("torch", (str(like / "pytorch_model.bin"),))
    raise InputError(
        f"holds no {SAFE_WEIGHTS}, {SAFE_INDEX} or pytorch_model.bin to take the tensor names "
        "and shapes from",
        path=str(like),
    )


def _check_out(out: Path, like: Path, force: bool) -> None:
    if out.resolve() == like.resolve():
        raise InputError("is the like folder itself: write the export elsewhere", path=str(out))
    if out.is_dir() and not out.is_symlink():
        if any(out.iterdir()) and not force:
            raise InputError(
                "exists and is not empty: pass force=True to replace it", path=str(out)
            )
    elif (out.exists() or out.is_symlink()) and not force:
        raise InputError("exists and is not a folder: pass force=True to replace it", path=str(out))


def _non_weight_files(like: Path, exclude: Path) -> tuple[list[str], list[str]]:
    """Files of ``like`` to copy, and those not copied (weights, training state); relative."""
    copy: list[str] = []
    skipped: list[str] = []
    skip_root = exclude.resolve()
    for root, dirs, names in os.walk(like):
        here = Path(root)
        dirs[:] = sorted(
            d
            for d in dirs
            if d not in _SKIP_DIRS
            and (here / d).resolve() != skip_root
            and not d.startswith(f"{exclude.name}.tmp-")
        )
        for name in sorted(names):
            rel = (here / name).relative_to(like).as_posix()
            (skipped if name.lower().endswith(_WEIGHT_SUFFIXES) else copy).append(rel)
    return copy, skipped


def _copy_files(like: Path, files: Sequence[str], dest: Path) -> None:
    for rel in files:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(like / rel, target)  # follows links (a hub cache's snapshot folders)


def _publish(tmp: Path, out: Path, force: bool) -> None:
    """Rename the finished folder into place (replacing ``out`` only with ``force``)."""
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        out.rmdir()
    elif out.exists() or out.is_symlink():
        if not force:  # it appeared while the export ran
            raise InputError(
                "exists and is not empty: pass force=True to replace it", path=str(out)
            )
        old = out.with_name(f"{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(out, old)
        os.rename(tmp, out)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()
        return
    os.rename(tmp, out)


# --------------------------------------------------------------------------- Lightning
@with_storage_options("store")
def export_ckpt(
    store: str | os.PathLike[str],
    epoch: int,
    out: str | os.PathLike[str],
    *,
    like: str | os.PathLike[str],
    analysis: str | None = None,
    strict: bool = False,
    storage_options: StorageOptions | None = None,
    progress: bool = False,
) -> LikeExportResult:
    """Write epoch ``epoch`` as a Lightning checkpoint: a copy of ``like`` (a ``.ckpt``) whose
    ``state_dict`` holds the epoch's weights.

    The ``state_dict`` keeps ``like``'s names (with their prefix, e.g. ``model.``) and order;
    the store's tensors are matched by :func:`match_names`. Everything else in the file
    (hyper-parameters, optimizer and loop states, epoch counters) is ``like``'s, so the file
    loads with ``LightningModule.load_from_checkpoint``; resuming training from it would
    pair the new weights with ``like``'s optimizer state. ``like`` is read with
    ``torch.load(weights_only=True)``: a checkpoint holding other objects is refused. The
    whole state_dict is built in memory (``torch.save`` needs it); ``out`` is written
    beside itself and renamed into place.
    """
    import torch

    out_path = Path(out)
    like_path = Path(like)
    ckpt, sd = _load_lightning(like_path)
    st = TrajectoryStore.open(store)
    meta, entry, source = epoch_source(st, epoch, analysis, progress=progress)
    match = match_names(
        [(t.name, t.shape) for t in meta.tensors],
        [(k, tuple(int(s) for s in v.shape)) for k, v in sd.items()],
        strict=strict,
        like_label=f"the state_dict of {like_path}",
    )
    state = torch_state(meta, entry, source)
    by_like = {target: s for s, target in match.pairs}
    new_sd: dict[str, Any] = OrderedDict() if isinstance(sd, OrderedDict) else {}
    for k, v in sd.items():
        new_sd[k] = state[by_like[k]] if k in by_like else v
    new = {**ckpt, "state_dict": new_sd}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".partial")
    try:
        torch.save(new, tmp)
        os.replace(tmp, out_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    nbytes = sum(state[s].numel() * state[s].element_size() for s, _ in match.pairs)
    return LikeExportResult(
        out_path, epoch, analysis, like_path, match, [out_path.name], [], nbytes
    )


def _load_lightning(path: Path) -> tuple[dict[str, Any], Mapping[str, Any]]:
    """A Lightning checkpoint (the whole dict) and its ``state_dict``, read safely."""
    import pickle

    import torch

    if not path.is_file():
        raise InputError("no such file: like=CKPT must be a Lightning checkpoint", path=str(path))
    if not zipfile.is_zipfile(path):
        raise InputError(
            "not a zip-format PyTorch checkpoint (truncated, or saved in the legacy format)",
            path=str(path),
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise InputError(
            "refused to unpickle: the checkpoint holds objects other than tensors and plain "
            f"containers (it could execute code); torch said: {str(e).splitlines()[0]}",
            path=str(path),
        ) from e
    except Exception as e:
        raise InputError(
            f"corrupt PyTorch checkpoint: {str(e).splitlines()[0]}", path=str(path)
        ) from e
    sd = obj.get("state_dict") if isinstance(obj, Mapping) else None
    if not isinstance(sd, Mapping) or not sd:
        raise InputError(
            "holds no 'state_dict' (a Lightning checkpoint has one): like=CKPT must be a "
            "checkpoint written by a Lightning Trainer",
            path=str(path),
        )
    for k, v in sd.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise InputError(
                f"its state_dict holds a {type(v).__name__} under {k!r}, not a tensor",
                path=str(path),
            )
    return dict(obj), sd
