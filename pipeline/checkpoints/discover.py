"""Turning the user's inputs (directories, globs, files) into one checkpoint per epoch."""

from __future__ import annotations

import glob
import itertools
import logging
import os
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.checkpoints.distcp import METADATA_NAME
from pipeline.checkpoints.distcp import SUFFIX as DCP_SUFFIX
from pipeline.checkpoints.files import CkptPath, RemotePath, canonical_url, is_url, path_of
from pipeline.checkpoints.readers import CheckpointSpec
from pipeline.errors import InputError
from pipeline.store.schema import _ranges

__all__ = ["checkpoint_of_folder", "discover", "parse_epochs_from_names", "spec_of_files"]

log = logging.getLogger("pipeline.checkpoints")

#: checkpoint files by suffix (a .bin or .ckpt is a zip-format torch.save: Hugging Face's
#: pytorch_model.bin, Lightning's epoch=3-step=120.ckpt)
_SUFFIXES = {
    ".pt": "torch",
    ".pth": "torch",
    ".bin": "torch",
    ".ckpt": "torch",
    ".safetensors": "safetensors",
}
INDEX_NAME = "model.safetensors.index.json"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"
#: the single-file models of a Hugging Face folder, in order of preference
_HF_MODELS = (("model.safetensors", "safetensors"), ("pytorch_model.bin", "torch"))
#: DeepSpeed's model states without ZeRO-3 (ZeRO-3 writes zero_pp_rank_* files instead)
_DS_MODEL = re.compile(r"mp_rank_(\d+)_model_states\.pt$")
_DS_ZERO3 = re.compile(r"(bf16_)?zero_pp_rank_\d+_mp_rank_\d+_model_states\.pt$")
_DS_LAYER = re.compile(r"layer_\d+-model_\d+-model_states\.pt$")
#: the checkpoint folders of a Hugging Face Trainer (or Accelerate) output folder
_TRAINER_CHECKPOINT = re.compile(r"checkpoint[-_]\d+")
#: training state a training stack saves beside its checkpoints: never a model
_NOT_MODELS = re.compile(
    r"(training_args\.bin|(optimizer|scheduler|scaler)(_\d+)?\.(pt|bin|pth)|rng_state(_\d+)?\.pth"
    r"|.*_optim_states\.pt)$"
)
#: what a folder may hold, for the message when it holds none of it
ACCEPTED = (
    "accepted are .pt, .pth, .bin, .ckpt (zip-format torch.save, e.g. Lightning) and "
    ".safetensors files; folders holding model.safetensors or pytorch_model.bin, or their "
    f"shards with {INDEX_NAME} or {BIN_INDEX_NAME} (Hugging Face checkpoint-N/); DeepSpeed "
    "global_stepN/ folders with mp_rank_00_model_states.pt; PyTorch Distributed Checkpoint "
    "folders (.metadata and *.distcp)"
)
_KEYWORDS = ("epoch", "ep", "step", "iter", "checkpoint", "ckpt")
_EPOCH_WORDS = ("epoch", "ep")
#: words that name the starting point of a run (epoch 0, before the numbered checkpoints)
START_WORDS = frozenset(
    {"init", "initial", "initialization", "initialisation", "initialized", "initialised",
     "start", "begin", "untrained"}
)
#: words that name its end (ambiguous: a copy of the last numbered checkpoint, or the state
#: after it)
END_WORDS = frozenset({"final", "last", "end"})
#: words that may accompany those (besides the words of the numbered names): model_init.pt
_GENERIC_WORDS = frozenset(
    {"epoch", "ep", "step", "iter", "checkpoint", "ckpt", "model", "weights", "weight", "state",
     "dict", "params", "net", "network"}
)
_IN_ORDER = "list the files in epoch order and give their epochs (`epochs`)"


def _natural_key(s: str) -> list[object]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _sharded_spec(d: CkptPath, index_name: str, fmt: str) -> CheckpointSpec:
    import json

    idx = d / index_name
    try:
        wmap = json.loads(idx.read_text()).get("weight_map", {})
        shards = sorted(dict.fromkeys(str(v) for v in wmap.values()))
    except (OSError, ValueError, AttributeError) as e:
        raise InputError(f"unreadable shard index: {e}", path=str(idx)) from e
    return CheckpointSpec(fmt, (str(idx), *[str(d / s) for s in shards]))


def _zero3_error(d: CkptPath) -> InputError:
    return InputError(
        "a DeepSpeed ZeRO-3 checkpoint: its weights are partitioned across the "
        "zero_pp_rank_* files. Consolidate them first with DeepSpeed's zero_to_fp32 (the "
        "zero_to_fp32.py script DeepSpeed saves beside the checkpoints, or "
        "deepspeed.utils.zero_to_fp32.convert_zero_checkpoint_to_fp32_state_dict) and ingest "
        "its output",
        path=str(d),
    )


def _deepspeed_spec(d: CkptPath, names: set[str]) -> CheckpointSpec | None:
    """DeepSpeed's ``mp_rank_00_model_states.pt`` in ``d``; ZeRO-3, model- and
    pipeline-parallel checkpoints are refused."""
    ranks = sorted(n for n in names if _DS_MODEL.fullmatch(n) and not n.startswith("zero_"))
    if not ranks:
        if any(_DS_ZERO3.fullmatch(n) for n in names):
            raise _zero3_error(d)
        return None
    if ranks != ["mp_rank_00_model_states.pt"]:
        raise InputError(
            f"a model-parallel DeepSpeed checkpoint ({', '.join(ranks[:3])}): each file holds "
            "a slice of the weights; merge them into one state_dict first",
            path=str(d),
        )
    if any(_DS_LAYER.fullmatch(n) for n in names):
        raise InputError(
            "a pipeline-parallel DeepSpeed checkpoint (layer_*-model_states.pt): merge its "
            "layers into one state_dict first",
            path=str(d),
        )
    return CheckpointSpec("deepspeed", (str(d / ranks[0]),))


def _checkpoint_of_dir(d: CkptPath) -> CheckpointSpec | None:
    """A directory that is itself one checkpoint: a Hugging Face model folder (sharded, or
    one model file), a DeepSpeed tag folder or a Distributed Checkpoint; None otherwise."""
    try:
        names = {c.name for c in d.iterdir()}
    except OSError:
        return None
    if INDEX_NAME in names:
        return _sharded_spec(d, INDEX_NAME, "hf-sharded")
    for name, fmt in _HF_MODELS:
        if name in names and (d / name).is_file():
            return CheckpointSpec(fmt, (str(d / name),))
    if BIN_INDEX_NAME in names:
        return _sharded_spec(d, BIN_INDEX_NAME, "hf-sharded-bin")
    if METADATA_NAME in names and any(n.endswith(DCP_SUFFIX) for n in names):
        parts = sorted((n for n in names if n.endswith(DCP_SUFFIX)), key=_natural_key)
        return CheckpointSpec("dcp", (str(d / METADATA_NAME), *[str(d / n) for n in parts]))
    return _deepspeed_spec(d, names)


def checkpoint_of_folder(path: str | os.PathLike[str]) -> CheckpointSpec | None:
    """The checkpoint a folder is (a Hugging Face model folder, single or sharded
    safetensors or ``.bin``; a DeepSpeed tag folder; a Distributed Checkpoint), or None."""
    return _checkpoint_of_dir(path_of(os.fspath(path)))


def _tagged_dir(d: CkptPath) -> tuple[str, CheckpointSpec] | None:
    """A DeepSpeed save folder whose ``latest`` names its only checkpoint (as Lightning's
    DeepSpeed strategy writes ``epoch=3-step=120.ckpt/checkpoint/``): (name, spec). The name
    is the tag's when it holds a number, else the folder's."""
    latest = d / "latest"
    if not latest.is_file():
        return None
    try:
        tag = latest.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    sub = d / tag
    if not tag or "/" in tag or not sub.is_dir():
        return None
    others = [c for c in d.iterdir() if c.is_dir() and c.name != tag]
    if any(_checkpoint_of_dir(c) is not None for c in others):
        return None  # a folder of several checkpoints: each is found on its own
    spec = _checkpoint_of_dir(sub)
    if spec is None:
        return None
    return (tag if re.search(r"\d", tag) else d.name), spec


def _spec_of_file(p: CkptPath) -> CheckpointSpec:
    if p.name in (INDEX_NAME, BIN_INDEX_NAME, METADATA_NAME) or p.suffix == DCP_SUFFIX or (
        _DS_MODEL.fullmatch(p.name) or _DS_ZERO3.fullmatch(p.name)
    ):
        spec = _checkpoint_of_dir(p.parent)
        if spec is None or (
            p.name not in (INDEX_NAME, BIN_INDEX_NAME) and str(p) not in spec.files
        ):
            raise InputError(f"not part of a checkpoint folder ({ACCEPTED})", path=str(p))
        return spec
    fmt = _SUFFIXES.get(p.suffix.lower())
    if fmt is None:
        raise InputError(
            f"unsupported checkpoint type {p.suffix or '(no suffix)'}: {ACCEPTED}", path=str(p)
        )
    return CheckpointSpec(fmt, (str(p),))


def spec_of_files(
    files: Sequence[str], epoch: int | None = None, strip_prefix: str | None = None
) -> CheckpointSpec:
    """The spec of a checkpoint from its files as :func:`discover` lists them (the paths a
    store records for an epoch).

    >>> spec_of_files(["/r/checkpoint-5/pytorch_model.bin.index.json", "/r/a.bin"]).format
    'hf-sharded-bin'
    >>> spec_of_files(["/r/step-5/.metadata", "/r/step-5/__0_0.distcp"]).format
    'dcp'
    """
    first = os.path.basename(files[0])
    if first.endswith(".safetensors.index.json"):
        fmt = "hf-sharded"
    elif first.endswith(".bin.index.json"):
        fmt = "hf-sharded-bin"
    elif first == METADATA_NAME:
        fmt = "dcp"
    elif _DS_MODEL.fullmatch(first):
        fmt = "deepspeed"
    elif first.endswith(".safetensors"):
        fmt = "safetensors"
    else:
        fmt = "torch"
    return CheckpointSpec(fmt, tuple(files), epoch, strip_prefix=strip_prefix)


@dataclass(frozen=True)
class _Found:
    """One checkpoint found in the inputs: the name its epoch is read from (a file's stem or
    a checkpoint directory's name), its path as the inputs spell it (for messages), its spec."""

    name: str
    path: str
    spec: CheckpointSpec


def _folder_checkpoint(d: CkptPath) -> _Found | None:
    spec = _checkpoint_of_dir(d)
    if spec is not None:
        return _Found(d.name, str(d), spec)
    tagged = _tagged_dir(d)
    if tagged is not None:
        return _Found(tagged[0], str(d), tagged[1])
    return None


def _expand_dir(p: CkptPath, item: str) -> list[_Found]:
    children: list[CkptPath] = sorted(p.iterdir(), key=lambda c: _natural_key(c.name))
    own = _folder_checkpoint(p)
    if own is not None:
        # a training run's output folder: its final model saved beside its checkpoint-N/
        # folders (folders of other kinds inside a checkpoint, like the global_stepN/ of
        # DeepSpeed beside a Hugging Face model, are not epochs)
        found = [
            f
            for c in children
            if c.is_dir() and _TRAINER_CHECKPOINT.fullmatch(c.name)
            if (f := _folder_checkpoint(c)) is not None
        ]
        if not found:
            return [own]
        log.info(
            "%s: ingesting its checkpoint folders, not the final model saved beside them (%s); "
            "give that by path with --epochs to ingest it too",
            item,
            ", ".join(Path(f).name for f in own.spec.files),
        )
        return found
    found = []
    for child in children:
        if child.is_dir():
            sub = _folder_checkpoint(child)
            if sub is not None:
                found.append(sub)
        elif child.suffix.lower() in _SUFFIXES and not _NOT_MODELS.fullmatch(child.name):
            found.append(_Found(child.stem, str(child), _spec_of_file(child)))
    if not found:
        raise InputError(f"directory holds no checkpoints: {ACCEPTED}", path=item)
    return found


def _expand_one(item: str) -> list[_Found]:
    """The checkpoints of one command-line input, in the order it expands to."""
    p = path_of(item)
    if p.is_dir():
        return _expand_dir(p, item)
    if p.is_file():
        spec = _spec_of_file(p)
        in_folder = len(spec.files) > 1 or spec.format == "deepspeed" or (
            p.name in {n for n, _f in _HF_MODELS}
        )
        return [_Found(p.parent.name if in_folder else p.stem, str(p), spec)]
    if any(c in item for c in "*?["):
        found = p.glob(item) if isinstance(p, RemotePath) else glob.glob(item)
        matches = sorted(found, key=_natural_key)
        if not matches:
            raise InputError(f"glob {item!r} matches nothing")
        out: list[_Found] = []
        for m in matches:
            out.extend(_expand_one(m))
        return out
    raise InputError("no such file or directory", path=item)


def _keyword(text: str) -> str | None:
    """The keyword (``epoch``, ``step``...) a name's text before a number ends with."""
    tail = text.lower().rstrip("_-.= ")
    return next((k for k in sorted(_KEYWORDS, key=len, reverse=True) if tail.endswith(k)), None)


def _keyed_field(
    varying: list[int], keywords: list[str | None], ints: list[list[int]]
) -> int | None:
    """Among several varying numbers, each after a keyword and all in the same order (as
    Lightning's ``epoch=3-step=120``): the epoch when its values are distinct (one checkpoint
    per epoch), else the first other one whose values are."""
    if any(keywords[i] is None for i in varying):
        return None
    for i, j in itertools.combinations(varying, 2):
        pairs = sorted({(v[i], v[j]) for v in ints})
        if any(b[1] < a[1] for a, b in itertools.pairwise(pairs)):
            return None  # the fields order the names differently
    distinct = [i for i in varying if len({v[i] for v in ints}) == len(ints)]
    ranked = sorted(distinct, key=lambda i: (keywords[i] not in _EPOCH_WORDS, i))
    return ranked[0] if ranked else None


def parse_epochs_from_names(names: Sequence[str]) -> list[int]:
    """Epoch numbers parsed from checkpoint names; ambiguity is an error.

    All names must share one pattern of non-digit text. The epoch is the one integer field
    that varies between names; with a single name (or none varying) the integer after a
    keyword such as ``epoch``/``step``/``checkpoint`` is used, or the only integer. When
    several fields vary, each after a keyword and in the same order (Lightning's
    ``epoch=3-step=120``), the epoch is used, or the step when epochs repeat.

    >>> parse_epochs_from_names(["run1_epoch_002", "run1_epoch_010", "run1_epoch_001"])
    [2, 10, 1]
    >>> parse_epochs_from_names(["checkpoint-500"])
    [500]
    >>> parse_epochs_from_names(["epoch=0-step=40", "epoch=1-step=80"])
    [0, 1]
    >>> parse_epochs_from_names(["epoch=0-step=40", "epoch=0-step=80", "epoch=1-step=120"])
    [40, 80, 120]
    """
    if not names:
        return []
    tokens = [re.split(r"(\d+)", n) for n in names]
    patterns = {tuple(t[0::2]) for t in tokens}
    if len(patterns) != 1:
        raise InputError(
            "cannot order the checkpoints: their names follow different patterns "
            f"(e.g. {names[0]!r} and {next(n for n, t in zip(names, tokens, strict=True) if tuple(t[0::2]) != tuple(tokens[0][0::2]))!r}); "
            f"{_IN_ORDER}, or leave out the files that are not per-epoch checkpoints"
        )
    texts = tokens[0][0::2]
    ints = [[int(x) for x in t[1::2]] for t in tokens]
    nfields = len(ints[0])
    if nfields == 0:
        raise InputError(f"cannot parse an epoch number from {names[0]!r}: give the epochs (`epochs`)")
    varying = [i for i in range(nfields) if len({v[i] for v in ints}) > 1]
    keywords = [_keyword(t) for t in texts[:nfields]]
    if len(varying) == 1:
        field = varying[0]
    elif len(varying) > 1:
        picked = _keyed_field(varying, keywords, ints)
        if picked is None:
            raise InputError(
                f"ambiguous epoch numbers: {len(varying)} numeric fields vary between names "
                f"(e.g. {names[0]!r}, {names[1]!r}); {_IN_ORDER}"
            )
        field = picked
    else:
        keyed = [i for i in range(nfields) if keywords[i] is not None]
        epoch_keyed = [i for i in keyed if keywords[i] in _EPOCH_WORDS]
        if len(keyed) == 1:
            field = keyed[0]
        elif len(epoch_keyed) == 1:  # Lightning's epoch=3-step=120: the epoch
            field = epoch_keyed[0]
        elif nfields == 1:
            field = 0
        else:
            raise InputError(f"ambiguous epoch number in {names[0]!r}: {_IN_ORDER}")
    epochs = [v[field] for v in ints]
    if len(set(epochs)) != len(epochs):
        dup = next(e for e in epochs if epochs.count(e) > 1)
        raise InputError(f"two checkpoints parse to epoch {dup}: {_IN_ORDER}")
    return epochs


def discover(
    inputs: Sequence[str | os.PathLike[str]], epochs: Sequence[int] | None = None
) -> list[CheckpointSpec]:
    """Resolve inputs to checkpoints, each with its epoch, sorted by epoch.

    Parameters
    ----------
    inputs
        Files, directories (of checkpoints, or one sharded checkpoint) and globs; a single
        path or URL (a ``str`` or path object) is one input.
    epochs
        Epoch numbers in the order of the expanded inputs; parsed from names when omitted.

    Names decide the epochs, or at least their order: a starting point (``init.pt``,
    ``initial``, ``start``, ...) is epoch 0, before the numbered checkpoints; an end
    (``final``, ``last``) is refused, since it may repeat the last numbered checkpoint.
    Explicit ``epochs`` may renumber the checkpoints but not reorder them: when the names
    order the files otherwise, the error gives their order and how to pass it.
    """
    if isinstance(inputs, (str, bytes, os.PathLike)):  # one input, not its characters
        inputs = [os.fsdecode(inputs)]
    found: list[_Found] = []
    for item in inputs:
        text = os.fspath(item)
        if is_url(text):  # listings cached by an earlier call may be stale
            RemotePath(text).invalidate()
        found.extend(_expand_one(text))
    seen: set[tuple[str, ...]] = set()
    for f in found:
        if f.spec.files in seen:
            raise InputError("checkpoint given twice", path=f.spec.label)
        seen.add(f.spec.files)
    if epochs is None:
        numbers = _epochs_from_names(found)
    else:
        numbers = list(epochs)
        if len(numbers) != len(found):
            raise InputError(
                f"`epochs` names {len(numbers)} epochs but {len(found)} checkpoints were found"
            )
        if len(set(numbers)) != len(numbers):
            raise InputError("`epochs` repeats an epoch number")
        _check_order(found, numbers)
    specs = [
        CheckpointSpec(f.spec.format, tuple(_absolute(x) for x in f.spec.files), e)
        for f, e in zip(found, numbers, strict=True)
    ]
    return sorted(specs, key=lambda s: s.epoch if s.epoch is not None else -1)


def _absolute(path: str) -> str:
    """An absolute local path (what a store records), or the URL as it is."""
    return canonical_url(path) if is_url(path) else os.path.abspath(path)


# ---------------------------------------------------------------- starting point, end, order
def _words(name: str) -> list[str]:
    return re.findall(r"[a-z]+", name.lower())


def _role(name: str, numbered_words: set[str]) -> str | None:
    """``"start"`` or ``"end"`` for a name without digits that names the run's starting point
    or end (``init``, ``model_final``), else None."""
    if re.search(r"\d", name):
        return None
    words = _words(name)
    roles = {"start" for w in words if w in START_WORDS} | {"end" for w in words if w in END_WORDS}
    rest = [w for w in words if w not in START_WORDS | END_WORDS]
    if len(roles) != 1 or not all(w in _GENERIC_WORDS or w in numbered_words for w in rest):
        return None
    return roles.pop()


def _epochs_from_names(found: list[_Found]) -> list[int]:
    """Epochs parsed from the names, with a starting point as epoch 0 (see :func:`discover`)."""
    names = [f.name for f in found]
    try:
        return parse_epochs_from_names(names)
    except InputError as original:
        numbered = [f for f in found if re.search(r"\d", f.name)]
        words = {w for f in numbered for w in _words(f.name)}
        others = [f for f in found if f not in numbered]
        roles = [_role(f.name, words) for f in others]
        if not others or None in roles or not numbered:
            if len(others) == 1 and roles == ["start"] and not numbered:
                return [0]
            raise original from None
        nums = parse_epochs_from_names([f.name for f in numbered])
    starts = [f for f, r in zip(others, roles, strict=True) if r == "start"]
    ends = [f for f, r in zip(others, roles, strict=True) if r == "end"]
    by_number = [f for _, f in sorted(zip(nums, numbered, strict=True), key=lambda p: p[0])]
    if len(starts) > 1:
        raise InputError(
            f"{' and '.join(repr(f.name) for f in starts)} all name the starting point: give "
            f"one of them, e.g. {_inputs_text([starts[0], *by_number])}"
        )
    if starts and min(nums) == 0:
        zero = by_number[0]
        raise InputError(
            f"{Path(starts[0].path).name} and {Path(zero.path).name} both claim epoch 0 (the "
            f"starting point): leave one of them out, e.g. give {_inputs_text(by_number)}"
        )
    if ends:
        last = by_number[-1]
        keep = [*starts, *by_number]
        every = [*keep, *ends]
        assigned = [0] * len(starts) + sorted(nums) + [max(nums) + 1 + i for i in range(len(ends))]
        raise InputError(
            f"{' and '.join(repr(f.name) for f in ends)} may be a copy of the last numbered "
            f"checkpoint ({last.name!r}) or the state after it, so its epoch is unclear; "
            f"either leave it out: give {_inputs_text(keep)}; or list every file in epoch "
            f"order: give {_inputs_text(every)} with epochs='{_spec_text(assigned)}'"
        )
    out = []
    it = iter(nums)
    for f in found:
        out.append(0 if f in starts else next(it))
    return out


def _name_keys(found: list[_Found]) -> list[tuple[int, int, int] | None]:
    """The order the names give: ``(0, 0, 0)`` for a starting point, ``(1, group, number)``
    for a numbered name (numbers compare only within a group of one pattern), ``(2, 0, 0)``
    for an end; None for a name that says nothing about its place."""
    numbered = [i for i, f in enumerate(found) if re.search(r"\d", f.name)]
    words = {w for i in numbered for w in _words(found[i].name)}
    keys: list[tuple[int, int, int] | None] = [None] * len(found)
    for i, f in enumerate(found):
        role = None if i in numbered else _role(f.name, words)
        if role is not None:
            keys[i] = (0, 0, 0) if role == "start" else (2, 0, 0)
    groups: dict[tuple[str, ...], list[int]] = {}
    for i in numbered:
        groups.setdefault(tuple(re.split(r"(\d+)", found[i].name)[0::2]), []).append(i)
    for g, members in enumerate(groups.values()):
        try:
            nums = parse_epochs_from_names([found[i].name for i in members])
        except InputError:
            continue  # e.g. two numbers vary: this group says nothing about order
        for i, n in zip(members, nums, strict=True):
            keys[i] = (1, g, n)
    return keys


def _check_order(found: list[_Found], epochs: list[int]) -> None:
    """Refuse explicit epochs that order the files otherwise than their names do."""
    keys = _name_keys(found)
    known = {i: k for i, k in enumerate(keys) if k is not None}
    starts = [i for i, k in known.items() if k[0] == 0]
    ends = [i for i, k in known.items() if k[0] == 2]
    clash: tuple[int, int] | None = None  # (i, j): their names order i and j the other way
    if starts and len(known) > len(starts):
        i = max(starts, key=lambda k: epochs[k])
        j = min((k for k in known if k not in starts), key=lambda k: epochs[k])
        clash = (i, j) if epochs[i] > epochs[j] else None
    if clash is None and ends and len(known) > len(ends):
        j = min(ends, key=lambda k: epochs[k])
        i = max((k for k in known if k not in ends), key=lambda k: epochs[k])
        clash = (j, i) if epochs[i] > epochs[j] else None
    groups: dict[int, list[int]] = {}
    for i, k in known.items():
        if k[0] == 1:
            groups.setdefault(k[1], []).append(i)
    for members in groups.values():
        if clash is not None:
            break
        members.sort(key=lambda m: (known[m][2], epochs[m]))
        best: int | None = None  # the latest epoch among the smaller numbers
        level: list[int] = []  # the members of the current number
        for m in members:
            if level and known[level[0]][2] != known[m][2]:
                top = max(level, key=lambda x: epochs[x])
                best = top if best is None or epochs[top] > epochs[best] else best
                level = []
            if best is not None and epochs[m] < epochs[best]:
                clash = (m, best)
                break
            level.append(m)
    if clash is None:
        return
    i, j = clash
    relation = "before" if known[i] < known[j] else "after"
    text = (
        "`epochs` assigns epochs in the order the inputs expand to (a folder: natural sort "
        f"order), which here is not the order of their names: {Path(found[i].path).name} would "
        f"be epoch {epochs[i]} but its name puts it {relation} {Path(found[j].path).name} "
        f"(epoch {epochs[j]})"
    )
    if len(known) == len(found) and len(groups) <= 1:
        order = [found[i] for i in sorted(known, key=lambda i: known[i])]
        shown = [Path(f.path).name for f in order]
        if len(shown) > 5:
            shown = [*shown[:3], "...", shown[-1]]
        text += f". By their names the order is {', '.join(shown)}: "
        try:
            named = sorted(_epochs_from_names(found))
            text += f"leave out `epochs` (the names give epochs {_ranges(named)}), or "
        except InputError:
            pass
        text += f"give the files in that order: {_inputs_text(order)} (with the same `epochs`)"
    else:
        text += f"; {_IN_ORDER}"
    raise InputError(text)


def _spec_text(epochs: list[int]) -> str:
    """``START:END[:STEP]`` for an arithmetic run of epochs, else a comma list."""
    steps = {b - a for a, b in itertools.pairwise(epochs)}
    if len(epochs) > 2 and len(steps) == 1 and (step := steps.pop()) > 0:
        end = epochs[-1] + 1
        return f"{epochs[0]}:{end}" if step == 1 else f"{epochs[0]}:{end}:{step}"
    return ",".join(map(str, epochs))


def _inputs_text(items: list[_Found]) -> str:
    """Shell words giving ``items`` in this order: a run of numbered files of one folder and
    one pattern becomes a quoted glob when it matches exactly them (globs expand in natural
    order, which must be their order here)."""

    def kind(f: _Found) -> tuple[str, tuple[str, ...]] | None:
        tokens = re.split(r"(\d+)", os.path.basename(f.path))
        return (os.path.dirname(f.path), tuple(tokens[0::2])) if len(tokens) > 1 else None

    words: list[str] = []
    i = 0
    while i < len(items):
        j = i + 1
        k = kind(items[i])
        while k is not None and j < len(items) and kind(items[j]) == k:
            j += 1
        pattern = _glob_of(items[i:j]) if j - i > 1 else None
        if pattern is not None:
            words.append(shlex.quote(pattern))
        else:
            words.extend(shlex.quote(f.path) for f in items[i:j])
        i = j
    return " ".join(words)


def _glob_of(items: list[_Found]) -> str | None:
    """A glob that matches exactly the paths of ``items`` (numbered names of one folder and one
    pattern, the numbers replaced by ``*``), or None."""
    paths = [f.path for f in items]
    parent = {os.path.dirname(p) for p in paths}
    if len(parent) != 1:
        return None
    tokens = [re.split(r"(\d+)", os.path.basename(p)) for p in paths]
    if len({tuple(t[0::2]) for t in tokens}) != 1 or len(tokens[0]) < 2:
        return None
    parts = list(tokens[0])
    for k in range(1, len(parts), 2):
        if len({t[k] for t in tokens}) > 1:
            parts[k] = "*"
    pattern = os.path.join(parent.pop(), "".join(parts))
    if glob.escape(pattern.replace("*", "")) != pattern.replace("*", ""):
        return None  # other glob characters in the path: list the files instead
    # as discover() expands it: natural order, which must be the order of ``items``
    matches = sorted(glob.glob(pattern), key=_natural_key)
    if [os.path.normpath(m) for m in matches] != [os.path.normpath(p) for p in paths]:
        return None
    return pattern
