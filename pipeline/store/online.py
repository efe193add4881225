"""The running sums of store-backed Online CMD: ``online/`` beside the trajectory (all its Zarr I/O).

Arrays (N = trajectory rows), chunks ``(block_rows,)``, uncompressed::

    current            (N,)  float32   the parameters of the epoch being added
    mode               (N,)  uint8...  each parameter's mode (fixed by the warm-up)
    flags              (N,)  uint8     the warm-up fit's flags, plus FLAG_NONFINITE when a
                                       parameter turns NaN/Inf after the warm-up
    mean_w_0, mean_w_1 (N,)  float64   running mean, double-buffered by the epoch count's parity
    c_rw_0,   c_rw_1   (N,)  float64   co-moment with the mode's reference, double-buffered

The sums over a window of ``n`` epochs live in slot ``n % 2`` (:meth:`OnlineGroup.read_sums`,
:meth:`OnlineGroup.write_sums`). The group's attribute :data:`ONLINE_ATTR` holds an
:class:`OnlineMeta`: the schema name and version, the epoch count ``n`` and the per-mode
reference statistics ``mean_r``, ``m2_r``; it is committed only after every block of an update
succeeded, so it always describes complete sums.

Versions: 2 (this release) writes ``schema`` and ``version``. Version 1, the previous release,
wrote only ``{"n", "mean_r", "m2_r"}`` and possibly no ``flags`` array; such a group is still
read (as version 1, with all flags 0). Any other version fails with
:class:`~pipeline.errors.SchemaVersionError`.

This module only stores and loads; the math is :mod:`pipeline.kernels.online`, the Dask tasks
:mod:`pipeline.graph.online`, the client :mod:`pipeline.online.store_backed`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from pipeline.errors import SchemaVersionError, StoreError
from pipeline.plan import blocks
from pipeline.store.analysis import mode_dtype
from pipeline.store.meta_arrays import consolidate, open_root
from pipeline.store.trajectory import ANALYSES

__all__ = [
    "ONLINE_ATTR",
    "ONLINE_GROUP",
    "ONLINE_READABLE",
    "ONLINE_SCHEMA",
    "ONLINE_VERSION",
    "OnlineGroup",
    "OnlineMeta",
]

ONLINE_GROUP = "online"
ONLINE_ATTR = "cmd_pipeline_online"
ONLINE_SCHEMA = "cmd-pipeline.online"
ONLINE_VERSION = 2
#: the versions this release reads (1: the previous release, without schema/version fields)
ONLINE_READABLE = (1, 2)


def _bad(what: str) -> StoreError:
    return StoreError(f"invalid {ONLINE_GROUP}/ metadata: {what}")


def _floats(d: Mapping[str, Any], key: str) -> tuple[float, ...]:
    val = d.get(key)
    if not isinstance(val, list) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in val
    ):
        raise _bad(f"{key} is not a list of numbers")
    return tuple(float(v) for v in val)


@dataclass(frozen=True)
class OnlineMeta:
    """The committed state of the running sums (the ``online/`` group's attribute).

    Parameters
    ----------
    n
        Epochs in the window the sums cover (their slot is ``n % 2``).
    mean_r, m2_r
        Per mode: the reference's running mean and second central moment over the window.
    version
        The schema version the values were read from (:data:`ONLINE_VERSION` when written).
    """

    n: int
    mean_r: tuple[float, ...]
    m2_r: tuple[float, ...]
    version: int = ONLINE_VERSION

    def __post_init__(self) -> None:
        if self.n < 0:
            raise _bad(f"n {self.n} is negative")
        if len(self.mean_r) != len(self.m2_r):
            raise _bad(f"mean_r has {len(self.mean_r)} modes, m2_r {len(self.m2_r)}")

    @classmethod
    def from_arrays(cls, n: int, mean_r: np.ndarray, m2_r: np.ndarray) -> OnlineMeta:
        """The metadata of sums over ``n`` epochs with reference statistics ``mean_r``, ``m2_r``."""
        return cls(
            int(n),
            tuple(np.asarray(mean_r, dtype=np.float64).tolist()),
            tuple(np.asarray(m2_r, dtype=np.float64).tolist()),
        )

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """``(mean_r, m2_r)`` as float64 arrays (exact: JSON keeps every float64)."""
        return np.asarray(self.mean_r, dtype=np.float64), np.asarray(self.m2_r, dtype=np.float64)

    def to_dict(self) -> dict[str, Any]:
        """The attribute written (always the current schema version)."""
        return {
            "schema": ONLINE_SCHEMA,
            "version": ONLINE_VERSION,
            "n": self.n,
            "mean_r": list(self.mean_r),
            "m2_r": list(self.m2_r),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OnlineMeta:
        """Validate and read the attribute; one without ``schema`` and ``version`` is version 1.

        Raises
        ------
        SchemaVersionError
            Another schema, or a version this release cannot read.
        StoreError
            A missing or malformed field.
        """
        if not isinstance(d, Mapping):
            raise _bad("the attribute is not an object")
        if "schema" not in d and "version" not in d:
            version = 1  # the previous release wrote neither
        else:
            if d.get("schema") != ONLINE_SCHEMA:
                raise SchemaVersionError(
                    f"{ONLINE_GROUP}/ has schema {d.get('schema')!r}, expected {ONLINE_SCHEMA!r}"
                )
            raw = d.get("version")
            if not isinstance(raw, int) or isinstance(raw, bool) or raw not in ONLINE_READABLE:
                raise SchemaVersionError(
                    f"{ONLINE_GROUP}/ (Online CMD running sums) has schema version {raw!r}; "
                    f"this cmd-pipeline reads versions {', '.join(map(str, ONLINE_READABLE))}: use "
                    "the cmd-pipeline release that wrote it"
                )
            version = raw
        n = d.get("n")
        if not isinstance(n, int) or isinstance(n, bool):
            raise _bad("n is not an integer")
        return cls(n, _floats(d, "mean_r"), _floats(d, "m2_r"), version)


class OnlineGroup:
    """Handle on ``online/`` of a store (only the URL is kept: it pickles into tasks).

    Parameters
    ----------
    url
        The store.
    """

    def __init__(self, url: str) -> None:
        self.url = url

    def _array(self, name: str, mode: str = "r") -> Any:
        return zarr.open_array(self.url, path=f"{ONLINE_GROUP}/{name}", mode=mode)

    def _group(self) -> Any:
        root = open_root(self.url, "r+")
        try:
            return root[ONLINE_GROUP]
        except KeyError as e:
            raise StoreError(f"no Online CMD running sums ({ONLINE_GROUP}/) in {self.url}") from e

    # ------------------------------------------------------------------ group
    def exists(self) -> bool:
        """Whether the store has an ``online/`` group."""
        return ONLINE_GROUP in open_root(self.url, "r").group_keys()

    def create(self, n_rows: int, block_rows: int, n_modes: int) -> None:
        """Create the arrays (zero-filled; every chunk written, even an empty one)."""
        g = open_root(self.url, "r+").require_group(ONLINE_GROUP)
        chunks = (block_rows,)
        for name, dt in (
            ("current", "float32"),
            ("mode", mode_dtype(n_modes)),
            ("flags", "uint8"),
            ("mean_w_0", "float64"),
            ("mean_w_1", "float64"),
            ("c_rw_0", "float64"),
            ("c_rw_1", "float64"),
        ):
            g.create_array(
                name,
                shape=(n_rows,),
                chunks=chunks,
                dtype=dt,
                fill_value=0,
                compressors=None,
                config={"write_empty_chunks": True},
                dimension_names=("param",),
            )
        consolidate(self.url)

    def commit(self, meta: OnlineMeta) -> None:
        """Write ``meta`` as the group's attribute (the sums it describes are complete)."""
        self._group().attrs[ONLINE_ATTR] = meta.to_dict()
        consolidate(self.url)

    def meta(self) -> OnlineMeta:
        """The committed state, of any readable version (:meth:`OnlineMeta.from_dict`)."""
        raw = self._group().attrs.get(ONLINE_ATTR)
        if raw is None:
            raise StoreError(f"{ONLINE_GROUP}/ in {self.url} has no {ONLINE_ATTR!r} attribute")
        return OnlineMeta.from_dict(raw)

    # ------------------------------------------------------------------ per-row arrays
    def write_current(self, w: np.ndarray, block_rows: int) -> None:
        """Write the epoch being added into ``current``, block by block."""
        cur = self._array("current", "r+")
        for r0, r1 in blocks(int(w.shape[0]), block_rows):
            cur[r0:r1] = w[r0:r1]

    def read_current(self, r0: int, r1: int) -> np.ndarray:
        """Rows ``[r0, r1)`` of ``current`` (float32)."""
        return np.asarray(self._array("current")[r0:r1])

    def read_mode(self, r0: int, r1: int) -> np.ndarray:
        """Rows ``[r0, r1)`` of ``mode``, as int64."""
        return np.asarray(self._array("mode")[r0:r1]).astype(np.int64)

    def take_mode(self, rows: np.ndarray) -> np.ndarray:
        """``mode`` of the given rows, as int64."""
        return np.asarray(self._array("mode").oindex[rows]).astype(np.int64)

    def read_flags(self, r0: int, r1: int) -> np.ndarray:
        """Rows ``[r0, r1)`` of ``flags`` (uint8; zeros for a version-1 group without it)."""
        try:
            arr = self._array("flags")
        except zarr.errors.ArrayNotFoundError:  # version 1 may lack it
            return np.zeros(max(r1 - r0, 0), dtype=np.uint8)
        return np.asarray(arr[r0:r1])

    def write_rows(
        self, r0: int, r1: int, *, mode: np.ndarray | None = None, flags: np.ndarray | None = None
    ) -> None:
        """Write rows ``[r0, r1)`` of ``mode`` and/or ``flags``."""
        if mode is not None:
            self._array("mode", "r+")[r0:r1] = mode
        if flags is not None:
            self._array("flags", "r+")[r0:r1] = flags

    def read_sums(self, n: int, r0: int, r1: int) -> tuple[np.ndarray, np.ndarray]:
        """``(mean_w, c_rw)`` of rows ``[r0, r1)`` over a window of ``n`` epochs (float64)."""
        p = n % 2
        mean_w = np.asarray(self._array(f"mean_w_{p}")[r0:r1], dtype=np.float64)
        c_rw = np.asarray(self._array(f"c_rw_{p}")[r0:r1], dtype=np.float64)
        return mean_w, c_rw

    def take_sums(self, n: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(mean_w, c_rw)`` of the given rows over a window of ``n`` epochs."""
        p = n % 2
        mean_w = np.asarray(self._array(f"mean_w_{p}").oindex[rows])
        c_rw = np.asarray(self._array(f"c_rw_{p}").oindex[rows])
        return mean_w, c_rw

    def write_sums(self, n: int, r0: int, r1: int, mean_w: np.ndarray, c_rw: np.ndarray) -> None:
        """Write the sums of rows ``[r0, r1)`` over a window of ``n`` epochs (slot ``n % 2``)."""
        p = n % 2
        self._array(f"mean_w_{p}", "r+")[r0:r1] = mean_w
        self._array(f"c_rw_{p}", "r+")[r0:r1] = c_rw

    # ------------------------------------------------------------------ the warm-up study
    def read_study_rows(self, study: str, r0: int, r1: int) -> tuple[np.ndarray, np.ndarray]:
        """``(mode, flags)`` of rows ``[r0, r1)`` in the post-hoc study ``analyses/<study>``."""
        path = f"{ANALYSES}/{study}"
        mode = np.asarray(zarr.open_array(self.url, path=f"{path}/mode", mode="r")[r0:r1])
        flags = np.asarray(zarr.open_array(self.url, path=f"{path}/flags", mode="r")[r0:r1])
        return mode, flags
