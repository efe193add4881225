"""How often do a layer's parameters change mode between successive windows of training?

The trajectory is fitted over sliding windows (``fit --epochs START:END`` for each window, as
studies ``<name>~w<k>``). Mode ids of two independent fits are arbitrary labels, so
consecutive windows are aligned first: the M x M' contingency table of (mode in window k, mode
in window k+1) over all parameters is accumulated block by block, and an optimal one-to-one
matching of the labels (``linear_sum_assignment``, maximising agreement) is found. A parameter
has *changed mode* when its label in window k+1 is not the match of its label in window k.
Per layer and per window transition, the fraction of changed parameters is reported; this is
what the basis-stability epoch (:mod:`pipeline.ops.stability`) is related to.

One pass over the ``mode`` arrays per transition (one byte per parameter), block by block.

Owns the window fits, the label matching and the per-layer change fractions
(:class:`ModeChanges`); the ``stability --mode-windows`` command reaches it through
:func:`pipeline.ops.stability.stability_study`.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pipeline.config import DEFAULT_SAMPLES, STABILITY_MODES
from pipeline.errors import PipelineError
from pipeline.ops.fit import fit
from pipeline.plan import RowLayout, blocks
from pipeline.runtime import Runner, RuntimeOptions, using
from pipeline.store.analysis import AnalysisGroup
from pipeline.store.remote import StorageOptions, with_storage_options
from pipeline.store.trajectory import TrajectoryStore

__all__ = ["ModeChanges", "mode_changes", "sliding_windows"]


@dataclass
class ModeChanges:
    windows: list[str]
    layers: list[str]
    changed: list[list[float]]  # [transition][layer]: fraction of the layer's parameters
    overall: list[float]  # [transition]
    studies: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sliding_windows(epochs: list[int], width: int, step: int) -> list[str]:
    """``START:END`` windows of ``width`` stored epochs, every ``step`` epochs."""
    if width < 2 or step < 1:
        raise PipelineError("windows need a width of at least 2 epochs and a step of at least 1")
    out = []
    for i in range(0, len(epochs) - width + 1, step):
        out.append(f"{epochs[i]}:{epochs[i + width - 1] + 1}")
    if len(out) < 2:
        raise PipelineError(f"{len(epochs)} epochs give fewer than 2 windows of width {width}")
    return out


def _contingency(url: str, a: str, b: str, ma: int, mb: int, layout: RowLayout) -> tuple[np.ndarray, np.ndarray]:
    """(layers, ma, mb) counts and the overall (ma, mb) counts of label pairs."""
    ga, gb = AnalysisGroup(url, a).array("mode"), AnalysisGroup(url, b).array("mode")
    n = int(ga.shape[0])
    rows = int(ga.chunks[0])
    per_layer = np.zeros((len(layout.names), ma, mb), dtype=np.int64)
    index = {nm: i for i, nm in enumerate(layout.names)}
    for r0, r1 in blocks(n, rows):
        la = np.asarray(ga[r0:r1]).astype(np.int64)
        lb = np.asarray(gb[r0:r1]).astype(np.int64)
        for s in layout.segments(r0, r1):
            sl = slice(s.out, s.out + s.stop - s.start)
            codes = la[sl] * mb + lb[sl]
            per_layer[index[s.name]] += np.bincount(codes, minlength=ma * mb).reshape(ma, mb)
    return per_layer, per_layer.sum(axis=0)


@with_storage_options("store")
def mode_changes(
    store: str | os.PathLike[str],
    name: str,
    windows: list[str],
    *,
    modes: int = STABILITY_MODES,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    keep: bool = True,
    storage_options: StorageOptions | None = None,
    runtime: RuntimeOptions | None = None,
    run: Runner | None = None,
) -> ModeChanges:
    """Fit every window (studies ``<name>~w<k>``) and measure the mode changes between
    consecutive windows, per layer (see the module docstring)."""
    from scipy.optimize import linear_sum_assignment

    if len(windows) < 2:
        raise PipelineError("give at least two windows")
    st = TrajectoryStore.open(store, writable=True)
    meta = st.require_meta()
    layout = RowLayout.from_entries([(t.name, t.offset, t.size) for t in meta.stored_tensors()])
    studies = [f"{name}~w{k}" for k in range(len(windows))]
    with using(run, runtime, cpu_only="mode changes") as rt:
        n_modes = [
            fit(st.url, s, modes=modes, samples=samples, seed=seed, epochs=w, force=True, run=rt).n_modes
            for s, w in zip(studies, windows, strict=True)
        ]
    changed, overall = [], []
    for k in range(len(windows) - 1):
        per_layer, total = _contingency(st.url, studies[k], studies[k + 1], n_modes[k], n_modes[k + 1], layout)
        r, c = linear_sum_assignment(-total)
        match = np.zeros_like(total, dtype=bool)
        match[r, c] = True
        kept = per_layer[:, match].sum(axis=1)
        sizes = per_layer.sum(axis=(1, 2))
        changed.append([float(1 - kp / sz) if sz else 0.0 for kp, sz in zip(kept, sizes, strict=True)])
        overall.append(float(1 - total[match].sum() / total.sum()))
    if not keep:
        for s in studies:
            AnalysisGroup(st.url, s).delete()
    return ModeChanges(list(windows), list(layout.names), changed, overall, studies)

