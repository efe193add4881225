"""The fit's plan: every decision made before a row is read, as frozen values.

- :class:`FitPlan`: the study's configuration (cut, K, seed, window), the window's columns and
  epochs, the rows per task and the trajectory's fingerprint. It round-trips through
  :meth:`FitPlan.to_dict` / :meth:`FitPlan.from_dict`; :meth:`FitPlan.config` is what the study
  stores and compares on a re-run.
- :class:`BlockPlan`: one task's rows, the layers they cross, the references and samples among
  them.
- :class:`StatsLayout`: where each sum sits in a row of the study's ``block_stats``.

:func:`plan_fit` makes a :class:`FitPlan` from the store's metadata and checks it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pipeline.config import FIT_BLOCK_BYTES, MIN_EPOCHS
from pipeline.errors import PipelineError
from pipeline.plan.layout import RowLayout, blocks, parse_window
from pipeline.store.schema import StoreMeta

__all__ = ["BlockPlan", "FitPlan", "StatsLayout", "fit_block_rows", "plan_fit"]


def fit_block_rows(chunk_rows: int, n_window: int, *, raw: bool, target_bytes: int) -> int:
    """Rows per fit task: a divisor of ``chunk_rows`` whose (rows x window) float32 block is
    at most ``target_bytes``, so tasks never straddle chunks and each byte is read once.

    Compressed stores are read whole chunk by whole chunk, so there a block is one chunk.

    >>> fit_block_rows(2**21, 50, raw=True, target_bytes=16 * 2**20)
    65536
    >>> fit_block_rows(1000, 10, raw=True, target_bytes=16 * 2**20)
    1000
    """
    if not raw:
        return chunk_rows
    limit = max(1, target_bytes // (4 * max(n_window, 1)))
    if chunk_rows <= limit:
        return chunk_rows
    best = 1
    d = 1
    while d * d <= chunk_rows:
        if chunk_rows % d == 0:
            for c in (d, chunk_rows // d):
                if c <= limit:
                    best = max(best, c)
        d += 1
    # a prime-ish chunk size would give tiny blocks: then take whole chunks
    return best if best * 64 >= limit else chunk_rows


@dataclass(frozen=True)
class StatsLayout:
    """Where each sum sits in a row of ``block_stats`` (layout version :data:`VERSION`).

    A row holds the ids of the layers (stored tensors) the block touches, ``-1`` past the
    last (empty tensors hold no rows, so a block's ids need not be consecutive); then
    :data:`PER` sums per mode and per layer; then the residual, energy and centred energy
    ("spread") per epoch of the window.
    """

    n_modes: int
    n_epochs: int
    max_layers: int

    #: count, valid, sum |corr|, residual, energy, NaN/Inf rows, spread
    PER = 7
    #: written into the study's attributes as ``stats_layout``; a study interrupted under
    #: another layout is refitted from the start instead of resumed
    VERSION = 2

    @property
    def width(self) -> int:
        return self.max_layers + self.PER * (self.n_modes + self.max_layers) + 3 * self.n_epochs

    @property
    def layer_ids(self) -> slice:
        return slice(0, self.max_layers)

    @property
    def modes(self) -> slice:
        s = self.max_layers
        return slice(s, s + self.PER * self.n_modes)

    @property
    def layers(self) -> slice:
        s = self.max_layers + self.PER * self.n_modes
        return slice(s, s + self.PER * self.max_layers)

    def _epoch_section(self, k: int) -> slice:
        s = self.max_layers + self.PER * (self.n_modes + self.max_layers) + k * self.n_epochs
        return slice(s, s + self.n_epochs)

    @property
    def residual_t(self) -> slice:
        return self._epoch_section(0)

    @property
    def energy_t(self) -> slice:
        return self._epoch_section(1)

    @property
    def spread_t(self) -> slice:
        return self._epoch_section(2)

    # ---- totals: the blocks' rows folded into one vector, per mode, per layer, per epoch

    def totals_width(self, n_layers: int) -> int:
        """Length of a totals vector over ``n_layers`` layers (:meth:`fold`)."""
        return self.PER * (self.n_modes + n_layers) + 3 * self.n_epochs

    def fold(self, rows: np.ndarray, n_layers: int) -> np.ndarray:
        """Blocks' rows (k, width), in block order, folded into one totals vector:
        ``PER`` sums per mode, then ``PER`` per layer (all ``n_layers``, by layer id), then
        the residual, energy and spread per epoch. Sums of totals are totals; a row of NaN
        (a block without statistics) makes the totals NaN."""
        rows = np.asarray(rows, dtype=np.float64).reshape(-1, self.width)
        per = self.PER
        out = np.zeros(self.totals_width(n_layers))
        out[: per * self.n_modes] = rows[:, self.modes].sum(axis=0)
        layers = out[per * self.n_modes : per * (self.n_modes + n_layers)].reshape(n_layers, per)
        for row in rows:
            ids = row[self.layer_ids]
            if np.isnan(ids).any():
                layers[...] = np.nan
                continue
            ids = ids[ids >= 0].astype(np.int64)
            layers[ids] += row[self.layers][: per * ids.size].reshape(ids.size, per)
        t = self.n_epochs
        e0 = per * (self.n_modes + n_layers)
        out[e0 : e0 + t] = rows[:, self.residual_t].sum(axis=0)
        out[e0 + t : e0 + 2 * t] = rows[:, self.energy_t].sum(axis=0)
        out[e0 + 2 * t :] = rows[:, self.spread_t].sum(axis=0)
        return out

    def unfold(
        self, totals: np.ndarray, n_layers: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """A totals vector as (per mode (M, PER), per layer (L, PER), residual_t, energy_t,
        spread_t)."""
        per, m, t = self.PER, self.n_modes, self.n_epochs
        e0 = per * (m + n_layers)
        return (
            totals[: per * m].reshape(m, per),
            totals[per * m : e0].reshape(n_layers, per),
            totals[e0 : e0 + t],
            totals[e0 + t : e0 + 2 * t],
            totals[e0 + 2 * t : e0 + 3 * t],
        )


@dataclass(frozen=True)
class BlockPlan:
    """One task's rows and what it must know about them."""

    index: int
    r0: int
    r1: int
    layers: tuple[tuple[int, int, int], ...]  # (layer id, first row, stop row), block-relative
    ref_pos: tuple[int, ...]  # block-relative rows that are references
    ref_ids: tuple[int, ...]
    sample_pos: tuple[int, ...]  # block-relative sampled rows
    chunk_rows: int | None = None  # the result arrays' chunk length (the last block may be shorter)
    frozen: bool = False  # every row belongs to a tensor that never changes over the window

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (:meth:`from_dict` gives the plan back).

        >>> b = BlockPlan(0, 0, 4, ((0, 0, 4),), (1,), (0,), (1, 3), 4)
        >>> BlockPlan.from_dict(json.loads(json.dumps(b.to_dict()))) == b
        True
        """
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BlockPlan:
        return cls(
            d["index"],
            d["r0"],
            d["r1"],
            tuple(tuple(x) for x in d["layers"]),
            tuple(d["ref_pos"]),
            tuple(d["ref_ids"]),
            tuple(d["sample_pos"]),
            d.get("chunk_rows"),
            bool(d.get("frozen", False)),
        )


@dataclass(frozen=True)
class FitPlan:
    """What a fit will do, decided before it reads a row (see :func:`plan_fit`).

    >>> p = FitPlan("s", 10, 2, None, 100, 0, ":", (0, 1, 2), (0, 1, 2), 10, "f00d")
    >>> FitPlan.from_dict(p.to_dict()) == p
    True
    >>> p.config()["epochs"]
    [0, 1, 2]
    """

    name: str
    n_rows: int
    modes: int | None
    threshold: float | None
    samples: int
    seed: int
    window: str  # the window as given (``":"``: every stored epoch)
    cols: tuple[int, ...]  # the trajectory's columns in the window
    epochs: tuple[int, ...]  # their epoch numbers
    block_rows: int  # rows per task
    fingerprint: str  # of the stored trajectory's settings, size and window's source files
    #: stored tensors (their index among the stored ones) whose values are the same at every
    #: epoch of the window, by their ingest digests (empty when digests are unknown)
    frozen: tuple[int, ...] = ()

    def config(self) -> dict[str, Any]:
        """The study's configuration as stored in its attributes (compared on a re-run)."""
        return {
            "modes": self.modes,
            "threshold": self.threshold,
            "samples": self.samples,
            "seed": self.seed,
            "window": self.window,
            "epochs": list(self.epochs),
            "block_rows": self.block_rows,
        }

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["cols"], d["epochs"] = list(self.cols), list(self.epochs)
        d["frozen"] = list(self.frozen)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FitPlan:
        return cls(
            **{
                **d,
                "cols": tuple(d["cols"]),
                "epochs": tuple(d["epochs"]),
                "frozen": tuple(d.get("frozen", ())),
            }
        )

    def block_plans(
        self, layout: RowLayout, ref_index: np.ndarray, sample_index: np.ndarray
    ) -> list[BlockPlan]:
        """One :class:`BlockPlan` per task, in row order."""
        names = {n: i for i, n in enumerate(layout.names)}
        frozen = set(self.frozen)
        plans = []
        for b, (r0, r1) in enumerate(blocks(self.n_rows, self.block_rows)):
            layers = tuple(
                (names[s.name], s.out, s.out + s.stop - s.start) for s in layout.segments(r0, r1)
            )
            in_ref = (ref_index >= r0) & (ref_index < r1)
            in_smp = (sample_index >= r0) & (sample_index < r1)
            plans.append(
                BlockPlan(
                    b,
                    r0,
                    r1,
                    layers,
                    tuple(int(i - r0) for i in ref_index[in_ref]),
                    tuple(int(m) for m in np.flatnonzero(in_ref)),
                    tuple(int(i - r0) for i in sample_index[in_smp]),
                    min(self.block_rows, self.n_rows),
                    bool(layers) and all(lid in frozen for lid, _lo, _hi in layers),
                )
            )
        return plans


def fingerprint(meta: StoreMeta, cols: Sequence[int]) -> str:
    """sha256 of what a study's results depend on in the trajectory: the content settings,
    the number of rows and the source files (by digest) of the window's epochs."""
    h = hashlib.sha256()
    h.update(json.dumps(meta.settings.content_fields(), sort_keys=True).encode())
    h.update(str(meta.n_rows).encode())
    for c in cols:
        e = meta.epochs[c]
        h.update(f"{e.epoch}:{','.join(f.sha256 for f in e.files)};".encode())
    return h.hexdigest()


def plan_fit(
    meta: StoreMeta,
    name: str,
    *,
    chunk_rows: int,
    raw: bool,
    modes: int | None,
    threshold: float | None,
    samples: int,
    seed: int,
    window: str | None,
    block_rows: int | None = None,
) -> FitPlan:
    """The fit's plan for a store (``chunk_rows``: its row chunk; ``raw``: uncompressed chunks
    that can be read in parts). Raises :class:`~pipeline.errors.PipelineError` on a window
    shorter than :data:`~pipeline.config.MIN_EPOCHS` or block rows that straddle chunks."""
    try:
        cols = parse_window(window, meta.epoch_numbers)
    except ValueError as e:
        raise PipelineError(str(e)) from None
    if len(cols) < MIN_EPOCHS:
        raise PipelineError(
            f"the window {window or ':'} holds {len(cols)} stored epoch(s); CMD needs at "
            f"least {MIN_EPOCHS} (over 2 epochs every varying profile correlates perfectly "
            "with every other)"
        )
    rows = block_rows or fit_block_rows(
        chunk_rows, len(cols), raw=raw, target_bytes=FIT_BLOCK_BYTES
    )
    if chunk_rows % rows and rows % chunk_rows:
        raise PipelineError(
            f"block rows {rows} must divide the chunk rows {chunk_rows} (or be a multiple)"
        )
    return FitPlan(
        name,
        meta.n_rows,
        modes,
        threshold,
        samples,
        seed,
        window or ":",
        tuple(cols),
        tuple(meta.epochs[c].epoch for c in cols),
        rows,
        fingerprint(meta, cols),
        frozen_tensors(meta, cols),
    )


def frozen_share(meta: StoreMeta, cols: Sequence[int]) -> dict[str, Any]:
    """How much of the trajectory never changes over the columns ``cols``, by the ingest
    digests: ``known`` (false when an epoch has none: ingested under schema 1), the frozen
    tensors' names, their rows and their share of all rows."""
    stored = meta.stored_tensors()
    idx = frozen_tensors(meta, cols)
    rows = sum(stored[i].size for i in idx)
    return {
        "known": all(meta.epochs[c].digests for c in cols),
        "tensors": [stored[i].name for i in idx],
        "of_tensors": len(stored),
        "rows": int(rows),
        "share": rows / meta.n_rows if meta.n_rows else 0.0,
    }


def frozen_tensors(meta: StoreMeta, cols: Sequence[int]) -> tuple[int, ...]:
    """The stored tensors (indices among the stored ones) whose digests are equal at every
    column of ``cols``: they never change over the window. Empty when a digest is unknown
    (epochs ingested under schema 1)."""
    from pipeline.kernels.digests import frozen

    n = len(meta.stored_tensors())
    mask = frozen([meta.epochs[c].digests for c in cols], n)
    return () if mask is None else tuple(int(i) for i in np.flatnonzero(mask))
