"""Exceptions and warnings raised by cmd-pipeline.

Every error a user can cause derives from :class:`PipelineError`; the CLI turns these into a
one-line message and a non-zero exit code. Errors about input files always name the file, and
where known the epoch and the tensor key.
"""

from __future__ import annotations

__all__ = [
    "ConfigMismatchError",
    "InputError",
    "PipelineError",
    "PipelineWarning",
    "SchemaVersionError",
    "StoreError",
    "TaskFailedError",
]


class PipelineError(Exception):
    """Base class of every error raised on purpose by cmd-pipeline."""

    exit_code = 1


class InputError(PipelineError):
    """A checkpoint (or another input) is unreadable, malformed, unsafe or inconsistent.

    Parameters
    ----------
    message
        What is wrong.
    path
        The offending file, if any.
    epoch
        The epoch the file was assigned to, if known.
    key
        The tensor key, if the problem concerns one tensor.
    """

    exit_code = 2

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        epoch: int | None = None,
        key: str | None = None,
    ) -> None:
        self.reason = message
        self.path = path
        self.epoch = epoch
        self.key = key
        super().__init__(self._render())

    def _render(self) -> str:
        where = []
        if self.path is not None:
            where.append(f"file {self.path}")
        if self.epoch is not None:
            where.append(f"epoch {self.epoch}")
        if self.key is not None:
            where.append(f"key {self.key!r}")
        return f"{', '.join(where)}: {self.reason}" if where else self.reason

    def __reduce__(self):  # keep the fields when the error crosses process boundaries
        return (
            _rebuild_input_error,
            (self.reason, self.path, self.epoch, self.key),
        )


def _rebuild_input_error(
    reason: str, path: str | None, epoch: int | None, key: str | None
) -> InputError:
    return InputError(reason, path=path, epoch=epoch, key=key)


class StoreError(PipelineError):
    """The store is missing, incomplete or in a state that forbids the operation."""

    exit_code = 3


class SchemaVersionError(StoreError):
    """The store was written with a schema version this package cannot read."""


class ConfigMismatchError(PipelineError):
    """A re-run uses other inputs or settings than the work already in the store.

    Pass ``force=True`` (``--force``) to replace the earlier work.
    """

    exit_code = 4


class TaskFailedError(PipelineError):
    """A task failed on the cluster (its worker died each time it was tried); the message
    names the task and its chunk."""


class PipelineWarning(UserWarning):
    """Warnings issued by cmd-pipeline (turned into errors in the test-suite)."""
