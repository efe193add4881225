"""``stability``: when does a layer's orthogonal basis stop moving? (OIALR, arXiv:2401.08505)

For every stored weight matrix (2-D tensors as they are, conv kernels ``(out, in, k, k)`` as
``(out, in*k*k)``; 1-D tensors and scalars are skipped) and every epoch ``t`` of the window:

* ``W_t = U_t diag(s_t) V_t^T`` (float64; ``numpy.linalg.svd(full_matrices=False)``, or a
  seeded randomised SVD of rank ``r`` (Halko, Martinsson & Tropp 2011, range finder with
  power iterations) when the layer has more than ``max_exact`` elements);
* ``Q_t = U_t V_t^T`` (the orthogonal polar factor; truncated: ``U_r V_r^T``). ``Q_t`` does not
  depend on the singular values, nor on the sign/rotation ambiguity of the singular vectors
  (for distinct singular values / a gap at ``r``), so a layer whose singular values only scale
  has ``Q_t == Q_{t-1}``;
* ``stability(t)`` = mean over the columns ``j`` of ``cos(Q_{t-1}[:, j], Q_t[:, j])``, with
  ``t-1`` the previous epoch of the window (columns with a zero norm at either epoch are left
  out of the mean); ``sv_drift(t) = ||s_t - s_{t-1}|| / ||s_{t-1}||``.

``stability`` is indexed by the later epoch of each pair (the window's first epoch has none).
Two detected epochs are reported per layer:

* ``first_above``: the first epoch ``t`` with ``stability(t) > threshold`` (OIALR's rule: the
  layer is switched to low rank at the first such check);
* ``stays_above`` (= ``stable_epoch``): the first epoch ``t`` with ``stability(t') > threshold``
  for every ``t' >= t`` of the window. A basis that last moves between epochs ``e-1`` and ``e``
  is thus reported at ``e + 1``: the first pair that shows no motion is ``(e, e+1)``.

Graph (:mod:`pipeline.graph.stability`): one task per (layer, epoch) reads that layer at
that one epoch and returns its factors ``(U_r, s, V_r^T)``; one task per (layer, pair) compares
two such factor sets; each epoch's SVD is computed once. The math is :mod:`pipeline.kernels.svd`.
Memory for a layer of ``m x n`` elements (``k = min(m, n)``, ``r`` = rank used):

* SVD task: ``4 m n`` (the float32 read) + ``8 m n`` (float64 copy) + LAPACK's gesdd work
  arrays (about ``8 (m k + k n + 4 k^2 + 3 max(m, n))``; exact) or ``8 (m + n)(r + p) + 8 m n``
  (randomised, ``p`` = oversampling, ``m n`` for one product) + the returned factors
  ``8 (m r + r n + r)``: roughly ``30-40 m n`` bytes at most for the exact SVD;
* pair task: the two factor sets plus ``Q_{t-1}`` and ``Q_t`` (``16 m n``).

Dask keeps an epoch's factors until both pairs that use them have run.

This module owns the operation: the window, each layer's method and rank, running the graph,
the results (:class:`StabilityResult`) and their figure; and the ``stability`` command's whole
orchestration (:func:`stability_study`: the study's window, the optional mode changes of
:mod:`pipeline.ops.mode_changes`, keeping the result with the study).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pipeline.config import (
    STABILITY_MAX_EXACT,
    STABILITY_MODES,
    STABILITY_RANK,
    STABILITY_THRESHOLD,
)
from pipeline.errors import PipelineError, StoreError
from pipeline.graph.stability import LayerSVD, build_stability_tasks
from pipeline.kernels.svd import Method
from pipeline.ops.mode_changes import ModeChanges, mode_changes, sliding_windows
from pipeline.plan import parse_window
from pipeline.runtime import Runner, RuntimeOptions, using
from pipeline.store.analysis import AnalysisGroup
from pipeline.store.remote import StorageOptions, with_storage_options
from pipeline.store.schema import check_study_attrs
from pipeline.store.trajectory import TrajectoryStore

__all__ = [
    "DEFAULT_MAX_EXACT",
    "DEFAULT_RANK",
    "DEFAULT_THRESHOLD",
    "LayerStability",
    "StabilityResult",
    "StabilityStudy",
    "basis_stability",
    "stability_figure",
    "stability_study",
    "summarise_layer",
]

DEFAULT_THRESHOLD = STABILITY_THRESHOLD
DEFAULT_MAX_EXACT = STABILITY_MAX_EXACT
DEFAULT_RANK = STABILITY_RANK


# ---------------------------------------------------------------------------- results
@dataclass
class LayerStability:
    """One layer's basis stability over the window (lists indexed like ``epochs``)."""

    name: str
    tensor_shape: list[int]
    matrix_shape: list[int]  # (out, in') the SVD was taken of
    method: str  # "exact" | "randomized"
    rank: int
    epochs: list[int]
    stability: list[float | None]  # None at the window's first epoch (and non-finite epochs)
    sv_drift: list[float | None]
    top_singular_values: list[list[float] | None]  # first N_TOP (pipeline.graph.stability) per epoch
    first_above: int | None = None
    stays_above: int | None = None

    @property
    def stable_epoch(self) -> int | None:
        """The detected epoch: :attr:`stays_above`."""
        return self.stays_above


@dataclass
class StabilityResult:
    store: str
    epochs: list[int]
    threshold: float
    max_exact: int
    seed: int
    layers: list[LayerStability] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # stored tensors that are not matrices

    def layer(self, name: str) -> LayerStability:
        for lay in self.layers:
            if lay.name == name:
                return lay
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable (no NaN: missing values are None)."""
        return asdict(self)

    def text(self) -> str:
        """The result in words (every result type has this method; ``summary()`` is the
        same text)."""
        return self.summary()

    def summary(self) -> str:
        lines = [
            f"basis stability over epochs {self.epochs[0]}..{self.epochs[-1]} "
            f"({len(self.epochs)} epochs), threshold {self.threshold}:"
        ]
        for lay in self.layers:
            last = next((s for s in reversed(lay.stability) if s is not None), None)
            lines.append(
                f"  {lay.name} {tuple(lay.matrix_shape)} {lay.method} r={lay.rank}: "
                f"first above {lay.first_above}, stays above {lay.stays_above}"
                + ("" if last is None else f", last stability {last:.4f}")
            )
        if self.skipped:
            lines.append(f"  skipped (not matrices): {', '.join(self.skipped)}")
        return "\n".join(lines)


def summarise_layer(
    epochs: list[int], stability: list[float | None], threshold: float
) -> tuple[int | None, int | None]:
    """``(first_above, stays_above)`` of a stability series (None entries count as below)."""
    above = [s is not None and s > threshold for s in stability]
    first = next((e for e, a in zip(epochs, above, strict=True) if a), None)
    stays: int | None = None
    for e, a in zip(reversed(epochs), reversed(above), strict=True):
        if not a:
            break
        stays = e
    return first, stays


# ---------------------------------------------------------------------------- the op
def _window(numbers: Sequence[int], epochs: str | None, stride: int) -> tuple[list[int], list[int]]:
    """The window's trajectory columns and epoch numbers; an error when it is too short for
    ``stride``."""
    cols = parse_window(epochs, list(numbers))
    if len(cols) < stride + 1:
        raise PipelineError(
            f"basis stability with stride {stride} needs at least {stride + 1} epochs in the "
            f"window, got {len(cols)}"
        )
    return cols, [numbers[c] for c in cols]


def basis_stability(
    store: str | os.PathLike[str],
    *,
    epochs: str | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    max_exact: int = DEFAULT_MAX_EXACT,
    rank: int | None = None,
    seed: int = 0,
    stride: int = 1,
    runtime: RuntimeOptions | None = None,
    run: Runner | None = None,
) -> StabilityResult:
    """Per weight matrix, the stability of its orthogonal basis ``U V^T`` between epochs
    ``stride`` apart in the window ``epochs`` (``START:END[:STEP]`` over stored epoch numbers;
    stride 1: consecutive epochs). stability at window position j compares positions
    ``j - stride`` and ``j``; the first ``stride`` positions have none. See the module's
    docstring for the definitions, the graph and the memory per task."""
    if rank is not None and rank < 1:
        raise ValueError("rank must be >= 1")
    if stride < 1:
        raise ValueError("stride must be >= 1")
    st = TrajectoryStore.open(store)
    meta = st.require_meta()
    cols, window = _window(meta.epoch_numbers, epochs, stride)
    result = StabilityResult(st.url, window, float(threshold), int(max_exact), int(seed))

    specs: list[LayerSVD] = []
    for i, t in enumerate(meta.stored_tensors()):
        if len(t.shape) < 2 or t.size == 0:
            result.skipped.append(t.name)
            continue
        m = int(t.shape[0])
        n = t.size // m
        k = min(m, n)
        method: Method
        if t.size > max_exact:
            method, r = "randomized", min(k, DEFAULT_RANK if rank is None else rank)
        else:
            method, r = "exact", k
        specs.append(LayerSVD(i, t.name, t.offset, (m, n), method, r))
        result.layers.append(
            LayerStability(t.name, list(t.shape), [m, n], method, r, window, [None], [None], [None])
        )
    tasks, labels = build_stability_tasks(
        st.chunk_grid(), specs, cols, window, stride=stride, seed=seed
    )

    with using(run, runtime, cpu_only="stability") as r_:
        out = r_.compute(tasks, "basis stability", labels)

    per_layer = len(window) - stride  # pair tasks per layer, layer after layer
    for li, lay in enumerate(result.layers):
        pairs = out[li * per_layer : (li + 1) * per_layer]
        tops: list[Any] = [None] * len(window)
        for j, p in enumerate(pairs, start=stride):
            tops[j] = p["top"]
            tops[j - stride] = p["top_prev"]
        lay.top_singular_values = tops
        lay.stability = [None] * stride + [p["stability"] for p in pairs]
        lay.sv_drift = [None] * stride + [p["sv_drift"] for p in pairs]
        lay.first_above, lay.stays_above = summarise_layer(window, lay.stability, threshold)
    return result


# ---------------------------------------------------------------------------- the command
@dataclass
class StabilityStudy:
    """What the ``stability`` command computed, and where it was kept."""

    result: StabilityResult
    windows: list[str] | None = None  # the sliding windows of the mode changes
    mode_changes: ModeChanges | None = None
    name: str | None = None  # the study the result is kept with
    saved_to: str | None = None  # location of its report/stability.json

    def to_dict(self) -> dict[str, Any]:
        """The content of ``report/stability.json``."""
        saved = self.result.to_dict()
        if self.mode_changes is not None:
            saved["mode_changes"] = self.mode_changes.to_dict()
        return saved

    def text(self) -> str:
        """The result in words (every result type has this method; ``summary()`` is the
        same text)."""
        return self.summary()

    def summary(self) -> str:
        lines = [self.result.summary()]
        if self.mode_changes is not None and self.windows is not None:
            mc, wins = self.mode_changes, self.windows
            lines.append(
                "fraction of each layer's parameters that change mode between consecutive windows:"
            )
            for k in range(len(wins) - 1):
                per = ", ".join(
                    f"{lay} {c:.3f}" for lay, c in zip(mc.layers, mc.changed[k], strict=True)
                )
                lines.append(f"  {wins[k]} -> {wins[k + 1]}: overall {mc.overall[k]:.3f}; {per}")
        if self.saved_to is not None:
            lines.append(f"saved with study {self.name!r}: {self.saved_to}")
        return "\n".join(lines)


@with_storage_options("store")
def stability_study(
    store: str | os.PathLike[str],
    *,
    name: str | None = None,
    epochs: str | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    max_exact: int = DEFAULT_MAX_EXACT,
    rank: int | None = None,
    stride: int = 1,
    mode_windows: tuple[int, int] | None = None,
    modes: int = STABILITY_MODES,
    storage_options: StorageOptions | None = None,
    runtime: RuntimeOptions | None = None,
    run: Runner | None = None,
) -> StabilityStudy:
    """:func:`basis_stability` over the window ``epochs`` (default: the study ``name``'s
    window, else all epochs); with ``mode_windows = (width, step)`` (needs ``name``) also the
    :func:`~pipeline.ops.mode_changes.mode_changes` between sliding windows of the stability
    window (studies ``<name>~w<k>``, ``modes`` modes each). With ``name``, the result is kept
    with the study (``report/stability.json`` and ``report/figures/stability.png``) for
    ``report``. Inputs are checked before anything is computed."""
    if mode_windows is not None and name is None:
        raise PipelineError("mode_windows needs a study name")
    ag = None
    wins = None
    if name is not None:
        st = TrajectoryStore.open(store)
        ag = AnalysisGroup(st.url, name)
        if not ag.exists():
            raise StoreError(f"no analysis {name!r} in {st.url}")
        attrs = check_study_attrs(ag.attrs(), name)
        if epochs is None:
            w = attrs["config"].get("window")
            epochs = None if w in (None, ":") else w
        if mode_windows is not None:  # the windows of the stability window, checked now
            numbers = st.require_meta().epoch_numbers
            wins = sliding_windows(_window(numbers, epochs, stride)[1], *mode_windows)
    out = StabilityStudy(
        basis_stability(
            store,
            epochs=epochs,
            threshold=threshold,
            max_exact=max_exact,
            rank=rank,
            stride=stride,
            runtime=runtime,
            run=run,
        ),
        windows=wins,
        name=name,
    )
    if wins is not None and name is not None:
        out.mode_changes = mode_changes(store, name, wins, modes=modes, runtime=runtime, run=run)
    if ag is not None:
        out.saved_to = ag.write_file("stability.json", json.dumps(out.to_dict(), indent=1).encode())
        ag.write_file("figures/stability.png", stability_figure(out.result))
    return out


# ---------------------------------------------------------------------------- figure
def stability_figure(result: StabilityResult) -> bytes:
    """PNG: stability per layer over the epochs (threshold dashed, ``stays_above`` marked by a
    dot, ``first_above`` by a cross) and the singular values' drift (log scale) below."""
    import matplotlib
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 6.5))
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    cmap = matplotlib.colormaps["tab10" if len(result.layers) <= 10 else "tab20"]
    for i, lay in enumerate(result.layers):
        colour = cmap(i % cmap.N)
        x = np.array(lay.epochs, dtype=np.float64)
        y = np.array([np.nan if v is None else v for v in lay.stability], dtype=np.float64)
        d = np.array([np.nan if v is None else v for v in lay.sv_drift], dtype=np.float64)
        ax1.plot(x, y, "-", color=colour, lw=1.4, label=f"{lay.name} ({lay.method})")
        for e, marker in ((lay.stays_above, "o"), (lay.first_above, "x")):
            if e is not None:
                k = lay.epochs.index(e)
                ax1.plot([e], [y[k]], marker, color=colour, ms=7, mew=2)
        pos = d > 0
        if pos.any():
            ax2.plot(x[pos], d[pos], "-", color=colour, lw=1.2)
    ax1.axhline(result.threshold, color="0.3", ls="--", lw=1, label=f"threshold {result.threshold}")
    ax1.set_ylabel("mean column cos(Q$_{t-1}$, Q$_t$)")
    ax1.set_title("basis stability (o: stays above, x: first above)")
    ax1.legend(fontsize=7, loc="lower right")
    ax2.set_yscale("log")
    ax2.set_ylabel("||s$_t$ - s$_{t-1}$|| / ||s$_{t-1}$||")
    ax2.set_xlabel("epoch")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()
