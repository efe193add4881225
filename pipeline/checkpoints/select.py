"""Which state_dict entries go into the trajectory, and the parameter index built from them."""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase

from pipeline.checkpoints.readers import CheckpointSpec, TensorInfo
from pipeline.config import KNOWN_BUFFER_SUFFIXES
from pipeline.errors import InputError
from pipeline.store.schema import IngestSettings, TensorEntry

__all__ = ["build_index", "check_same_tensors", "is_buffer"]


def is_buffer(info: TensorInfo, patterns: Sequence[str] = ()) -> bool:
    """Whether an entry is a buffer rather than a trainable parameter.

    A state_dict does not say; cmd-pipeline calls an entry a buffer when it is not floating
    point, when its name ends with a known buffer name (``running_mean``, ``running_var``,
    ``num_batches_tracked``, ``position_ids``, ...), or when it matches a user pattern.
    """
    if not info.floating:
        return True
    last = info.name
    if any(last == s or last.endswith("." + s) for s in KNOWN_BUFFER_SUFFIXES):
        return True
    return any(fnmatchcase(info.name, p) for p in patterns)


def _selected(info: TensorInfo, kind: str, settings: IngestSettings) -> bool:
    if not info.floating:
        return False  # integer and bool buffers are never weights
    if kind == "buffer" and not settings.float_buffers:
        return False
    if not any(fnmatchcase(info.name, p) for p in settings.include):
        return False
    return not any(fnmatchcase(info.name, p) for p in settings.exclude)


def build_index(
    tensors: Sequence[TensorInfo], settings: IngestSettings
) -> tuple[tuple[TensorEntry, ...], int]:
    """Parameter index in state_dict order and the number of trajectory rows N."""
    out: list[TensorEntry] = []
    offset = 0
    for info in tensors:
        kind = "buffer" if is_buffer(info, settings.buffer_patterns) else "parameter"
        if _selected(info, kind, settings):
            out.append(TensorEntry(info.name, info.shape, info.dtype, kind, offset))
            offset += info.size
        else:
            out.append(TensorEntry(info.name, info.shape, info.dtype, kind, -1))
    if offset == 0:
        raise InputError("no floating-point tensor is selected: check `include` and `exclude`")
    return tuple(out), offset


def check_same_tensors(
    expected: Sequence[TensorEntry], spec: CheckpointSpec, tensors: Sequence[TensorInfo]
) -> None:
    """Fail, naming file, epoch and key, if a checkpoint's keys, shapes or dtypes differ."""
    got = {t.name: t for t in tensors}
    want = {t.name for t in expected}
    for e in expected:
        t = got.get(e.name)
        if t is None:
            raise InputError(
                "key missing (present in the first checkpoint)",
                path=spec.label,
                epoch=spec.epoch,
                key=e.name,
            )
        if t.shape != e.shape:
            raise InputError(
                f"shape {t.shape} differs from {e.shape} of the first checkpoint",
                path=spec.label,
                epoch=spec.epoch,
                key=e.name,
            )
        if t.dtype != e.dtype:
            raise InputError(
                f"dtype {t.dtype} differs from {e.dtype} of the first checkpoint",
                path=spec.label,
                epoch=spec.epoch,
                key=e.name,
            )
    extra = [n for n in got if n not in want]
    if extra:
        raise InputError(
            "key not present in the first checkpoint",
            path=spec.label,
            epoch=spec.epoch,
            key=extra[0],
        )
