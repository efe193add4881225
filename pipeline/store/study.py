"""A study's lifecycle in the store: whether ``fit`` creates it, resumes it, leaves it as it
is, or refuses (status, configuration, trajectory fingerprint, ``force``).

:func:`reconcile` is the one place that decides, from the study's attributes alone; the
caller (``ops.fit``) acts on the answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pipeline.errors import ConfigMismatchError, SchemaVersionError, StoreError
from pipeline.store.analysis import ANALYSIS_VERSION, AnalysisGroup

__all__ = ["Reconciled", "reconcile"]


@dataclass(frozen=True)
class Reconciled:
    """What to do with a study: ``create`` it (anything there before has been deleted),
    ``resume`` the interrupted one, or leave the ``complete`` one (``attrs``) unchanged."""

    action: Literal["create", "resume", "unchanged"]
    attrs: dict[str, Any] | None = None


def _brief(v: Any) -> str:
    """A configuration value for a message: epoch lists as ranges."""
    if isinstance(v, list) and len(v) > 4 and all(isinstance(e, int) for e in v):
        return f"[{v[0]}, {v[1]}, ..., {v[-1]}] ({len(v)} epochs)"
    return repr(v)


def _normalised(config: Any) -> dict[str, Any]:
    """A configuration as compared: one recorded before ``diagnostics`` existed (version-1
    studies, whose per-row diagnostics are part of their layout) reads as without them."""
    return {"diagnostics": False, **(config or {})}


def reconcile(
    ag: AnalysisGroup,
    config: dict[str, Any],
    fingerprint: str,
    *,
    force: bool,
    stats_layout: int,
) -> Reconciled:
    """Decide what ``fit`` does with the study ``ag`` for ``config`` on the trajectory whose
    fingerprint is ``fingerprint``.

    - nothing there, a group left ``creating`` by an interrupted fit, or (with ``force``) a
      study of another configuration or a group that is not ours: deleted, ``create``;
    - the same configuration and trajectory, complete: ``unchanged``;
    - the same, interrupted: ``resume`` (unless its block statistics have another layout
      than ``stats_layout``, or its arrays another version, from an older release: then
      deleted and ``create``); a complete study of an older version is read as it is;
    - otherwise :class:`ConfigMismatchError` naming what differs (or :class:`StoreError`
      for a group that is not a cmd-pipeline analysis).
    """
    name = ag.name
    if not ag.exists():
        return Reconciled("create")
    try:
        attrs = ag.attrs()
    except SchemaVersionError:
        raise
    except StoreError:
        # not ours (no analysis attribute): only force may replace it
        if not force:
            raise StoreError(
                f"analyses/{name} exists but is not a cmd-pipeline analysis; "
                "pass force=True to replace it"
            ) from None
        ag.delete()
        return Reconciled("create")
    if attrs.get("status") == "creating":
        # an earlier fit was interrupted while creating the group: nothing was computed
        ag.delete()
        return Reconciled("create")
    same = (
        _normalised(attrs.get("config")) == _normalised(config)
        and attrs.get("trajectory_fingerprint") == fingerprint
    )
    if same and attrs.get("status") == "complete":
        return Reconciled("unchanged", attrs)
    if (
        same
        and attrs.get("stats_layout") == stats_layout
        and attrs.get("version") == ANALYSIS_VERSION
    ):
        return Reconciled("resume", attrs)
    if same:
        # interrupted under an older release whose block statistics or arrays have another
        # layout: its finished blocks cannot be finished by this one; start it again
        ag.delete()
        return Reconciled("create")
    if not force:
        old = _normalised(attrs.get("config"))
        config = _normalised(config)
        # name what differs: the same arguments select other epochs after an append
        diff = {k: (old.get(k), v) for k, v in config.items() if old.get(k) != v}
        if diff:
            desc = "configuration (" + ", ".join(
                f"{k}: stored {_brief(a)}, requested {_brief(b)}" for k, (a, b) in diff.items()
            ) + ")"
        else:
            desc = "trajectory (re-ingested since)"
        raise ConfigMismatchError(
            f"analysis {name!r} exists with another {desc}; pass force=True to replace it"
        )
    ag.delete()
    return Reconciled("create")
