"""Turning the user's inputs (directories, globs, files) into one checkpoint per epoch."""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Sequence
from pathlib import Path

from pipeline.checkpoints.readers import CheckpointSpec
from pipeline.errors import InputError

__all__ = ["discover", "parse_epochs_from_names"]

_SUFFIXES = {".pt": "torch", ".pth": "torch", ".safetensors": "safetensors"}
INDEX_NAME = "model.safetensors.index.json"
_KEYWORDS = ("epoch", "ep", "step", "iter", "checkpoint", "ckpt")


def _natural_key(s: str) -> list[object]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _checkpoint_of_dir(d: Path) -> CheckpointSpec | None:
    """A directory that is itself one checkpoint (sharded, or a lone model.safetensors)."""
    idx = d / INDEX_NAME
    if idx.is_file():
        import json

        try:
            wmap = json.loads(idx.read_text()).get("weight_map", {})
            shards = sorted(dict.fromkeys(str(v) for v in wmap.values()))
        except (OSError, ValueError, AttributeError) as e:
            raise InputError(f"unreadable shard index: {e}", path=str(idx)) from e
        return CheckpointSpec("hf-sharded", (str(idx), *[str(d / s) for s in shards]))
    single = d / "model.safetensors"
    if single.is_file():
        return CheckpointSpec("safetensors", (str(single),))
    return None


def _spec_of_file(p: Path) -> CheckpointSpec:
    if p.name == INDEX_NAME:
        spec = _checkpoint_of_dir(p.parent)
        assert spec is not None
        return spec
    fmt = _SUFFIXES.get(p.suffix.lower())
    if fmt is None:
        raise InputError(
            f"unsupported checkpoint type {p.suffix or '(no suffix)'}: expected .pt, .pth, "
            f".safetensors or a directory with {INDEX_NAME}",
            path=str(p),
        )
    return CheckpointSpec(fmt, (str(p),))


def _expand_one(item: str) -> list[tuple[str, CheckpointSpec]]:
    """(name used for the epoch, spec) for one command-line input."""
    p = Path(item)
    if p.is_dir():
        own = _checkpoint_of_dir(p)
        if own is not None:
            return [(p.name, own)]
        found: list[tuple[str, CheckpointSpec]] = []
        for child in sorted(p.iterdir(), key=lambda c: _natural_key(c.name)):
            if child.is_dir():
                spec = _checkpoint_of_dir(child)
                if spec is not None:
                    found.append((child.name, spec))
            elif child.suffix.lower() in _SUFFIXES:
                found.append((child.stem, _spec_of_file(child)))
        if not found:
            raise InputError(
                "directory holds no checkpoints (.pt, .pth, .safetensors, sharded)", path=item
            )
        return found
    if p.is_file():
        spec = _spec_of_file(p)
        name = (
            p.parent.name
            if spec.format == "hf-sharded" or p.name == "model.safetensors"
            else p.stem
        )
        return [(name, spec)]
    if any(c in item for c in "*?["):
        matches = sorted(glob.glob(item), key=_natural_key)
        if not matches:
            raise InputError(f"glob {item!r} matches nothing")
        out = []
        for m in matches:
            out.extend(_expand_one(m))
        return out
    raise InputError("no such file or directory", path=item)


def parse_epochs_from_names(names: Sequence[str]) -> list[int]:
    """Epoch numbers parsed from checkpoint names; ambiguity is an error.

    All names must share one pattern of non-digit text. The epoch is the one integer field
    that varies between names; with a single name (or none varying) the integer after a
    keyword such as ``epoch``/``step``/``checkpoint`` is used, or the only integer.

    >>> parse_epochs_from_names(["run1_epoch_002", "run1_epoch_010", "run1_epoch_001"])
    [2, 10, 1]
    >>> parse_epochs_from_names(["checkpoint-500"])
    [500]
    """
    if not names:
        return []
    tokens = [re.split(r"(\d+)", n) for n in names]
    patterns = {tuple(t[0::2]) for t in tokens}
    if len(patterns) != 1:
        raise InputError(
            "cannot order the checkpoints: their names follow different patterns "
            f"(e.g. {names[0]!r} and {next(n for n, t in zip(names, tokens, strict=True) if tuple(t[0::2]) != tuple(tokens[0][0::2]))!r}); "
            "pass --epochs"
        )
    texts = tokens[0][0::2]
    ints = [[int(x) for x in t[1::2]] for t in tokens]
    nfields = len(ints[0])
    if nfields == 0:
        raise InputError(f"cannot parse an epoch number from {names[0]!r}: pass --epochs")
    varying = [i for i in range(nfields) if len({v[i] for v in ints}) > 1]
    if len(varying) == 1:
        field = varying[0]
    elif len(varying) > 1:
        raise InputError(
            f"ambiguous epoch numbers: {len(varying)} numeric fields vary between names "
            f"(e.g. {names[0]!r}, {names[1]!r}); pass --epochs"
        )
    else:
        keyed = [i for i in range(nfields) if texts[i].lower().rstrip("_-. ").endswith(_KEYWORDS)]
        if len(keyed) == 1:
            field = keyed[0]
        elif nfields == 1:
            field = 0
        else:
            raise InputError(f"ambiguous epoch number in {names[0]!r}: pass --epochs")
    epochs = [v[field] for v in ints]
    if len(set(epochs)) != len(epochs):
        dup = next(e for e in epochs if epochs.count(e) > 1)
        raise InputError(f"two checkpoints parse to epoch {dup}: pass --epochs")
    return epochs


def discover(
    inputs: Sequence[str | os.PathLike[str]], epochs: Sequence[int] | None = None
) -> list[CheckpointSpec]:
    """Resolve inputs to checkpoints, each with its epoch, sorted by epoch.

    Parameters
    ----------
    inputs
        Files, directories (of checkpoints, or one sharded checkpoint) and globs.
    epochs
        Epoch numbers in the order of the expanded inputs; parsed from names when omitted.
    """
    found: list[tuple[str, CheckpointSpec]] = []
    for item in inputs:
        found.extend(_expand_one(os.fspath(item)))
    seen: set[tuple[str, ...]] = set()
    for _, spec in found:
        if spec.files in seen:
            raise InputError("checkpoint given twice", path=spec.label)
        seen.add(spec.files)
    if epochs is None:
        numbers = parse_epochs_from_names([n for n, _ in found])
    else:
        numbers = list(epochs)
        if len(numbers) != len(found):
            raise InputError(
                f"--epochs names {len(numbers)} epochs but {len(found)} checkpoints were found"
            )
        if len(set(numbers)) != len(numbers):
            raise InputError("--epochs repeats an epoch number")
    specs = [
        CheckpointSpec(s.format, tuple(os.path.abspath(f) for f in s.files), e)
        for (_, s), e in zip(found, numbers, strict=True)
    ]
    return sorted(specs, key=lambda s: s.epoch if s.epoch is not None else -1)
