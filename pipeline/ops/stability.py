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

Graph: one task per (layer, epoch) reads that layer at that one epoch (``ChunkGrid.read_rows``
of the layer's row range and one column) and returns its factors ``(U_r, s, V_r^T)``; one task
per (layer, consecutive pair) compares two such factor sets. No task reads more than one
layer at one epoch, and each epoch's SVD is computed once. Memory for a layer of
``m x n`` elements (``k = min(m, n)``, ``r`` = rank used):

* SVD task: ``4 m n`` (the float32 read) + ``8 m n`` (float64 copy) + LAPACK's gesdd work
  arrays (about ``8 (m k + k n + 4 k^2 + 3 max(m, n))``; exact) or ``8 (m + n)(r + p) + 8 m n``
  (randomised, ``p`` = oversampling, ``m n`` for one product) + the returned factors
  ``8 (m r + r n + r)``: roughly ``30-40 m n`` bytes at most for the exact SVD;
* pair task: the two factor sets plus ``Q_{t-1}`` and ``Q_t`` (``16 m n``).

Dask keeps an epoch's factors until both pairs that use them have run.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from dask import delayed

from pipeline.errors import PipelineError
from pipeline.plan import parse_window
from pipeline.runtime import Runner, RuntimeOptions, using
from pipeline.store.trajectory import ChunkGrid, TrajectoryStore

__all__ = [
    "LayerStability",
    "StabilityResult",
    "basis_stability",
    "column_cosine",
    "polar_factor",
    "randomized_svd",
    "stability_figure",
    "summarise_layer",
]

#: top singular values reported per epoch
N_TOP = 8
#: randomised SVD: extra columns of the sketch and power iterations
OVERSAMPLE = 10
POWER_ITERATIONS = 4

Factors = tuple[np.ndarray, np.ndarray, np.ndarray]  # U (m, r), s (r,), Vt (r, n)


# ---------------------------------------------------------------------------- numerics
def randomized_svd(a: np.ndarray, rank: int, *, seed: int = 0) -> Factors:
    """Rank-``rank`` SVD of ``a`` (m, n) by a seeded Gaussian range finder with
    :data:`POWER_ITERATIONS` power iterations (QR re-orthonormalised each half step) and
    :data:`OVERSAMPLE` extra columns (Halko et al. 2011, algorithms 4.4 and 5.1)."""
    m, n = a.shape
    k = min(rank + OVERSAMPLE, m, n)
    rng = np.random.default_rng(seed)
    omega = rng.standard_normal((n, k))
    q, _ = np.linalg.qr(a @ omega)
    for _ in range(POWER_ITERATIONS):
        z, _ = np.linalg.qr(a.T @ q)
        q, _ = np.linalg.qr(a @ z)
    b = q.T @ a  # (k, n)
    ub, s, vt = np.linalg.svd(b, full_matrices=False)
    u = q @ ub
    return u[:, :rank], s[:rank], vt[:rank]


def polar_factor(u: np.ndarray, vt: np.ndarray) -> np.ndarray:
    """``Q = U V^T`` (m, n)."""
    return u @ vt


def column_cosine(q0: np.ndarray, q1: np.ndarray) -> float:
    """Mean over columns ``j`` of ``cos(q0[:, j], q1[:, j])``; columns whose norm is zero at
    either side are left out (NaN when none is left)."""
    dot = np.einsum("ij,ij->j", q0, q1)
    n0 = np.sqrt(np.einsum("ij,ij->j", q0, q0))
    n1 = np.sqrt(np.einsum("ij,ij->j", q1, q1))
    ok = (n0 > 0) & (n1 > 0)
    if not ok.any():
        return math.nan
    return float(np.mean(dot[ok] / (n0[ok] * n1[ok])))


def _svd_task(
    grid: ChunkGrid,
    r0: int,
    r1: int,
    col: int,
    shape: tuple[int, int],
    method: str,
    rank: int,
    seed: int,
) -> Factors | None:
    """Read one layer at one epoch and return its (truncated) SVD factors, or None when the
    layer holds NaN/Inf at that epoch."""
    buf = np.empty((1, r1 - r0), dtype=np.float32)
    grid.read_rows(r0, r1, np.array([col], dtype=np.int64), buf)
    a = buf[0].astype(np.float64).reshape(shape)
    del buf
    if not np.isfinite(a).all():
        return None
    if method == "exact":
        u, s, vt = np.linalg.svd(a, full_matrices=False)
        return u[:, :rank], s[:rank], vt[:rank]
    return randomized_svd(a, rank, seed=seed)


def _pair_task(prev: Factors | None, cur: Factors | None) -> dict[str, Any]:
    """Stability and singular-value drift between two epochs' factors."""
    out: dict[str, Any] = {
        "stability": None,
        "sv_drift": None,
        "top_prev": None if prev is None else prev[1][:N_TOP].tolist(),
        "top": None if cur is None else cur[1][:N_TOP].tolist(),
    }
    if prev is None or cur is None:
        return out
    c = column_cosine(polar_factor(prev[0], prev[2]), polar_factor(cur[0], cur[2]))
    out["stability"] = None if math.isnan(c) else c
    n0 = float(np.linalg.norm(prev[1]))
    if n0 > 0:
        out["sv_drift"] = float(np.linalg.norm(cur[1] - prev[1]) / n0)
    return out


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
    top_singular_values: list[list[float] | None]  # first N_TOP per epoch
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
def basis_stability(
    store: str | os.PathLike[str],
    *,
    epochs: str | None = None,
    threshold: float = 0.9,
    max_exact: int = 4_000_000,
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
    numbers = meta.epoch_numbers
    cols = parse_window(epochs, numbers)
    if len(cols) < stride + 1:
        raise PipelineError(
            f"basis stability with stride {stride} needs at least {stride + 1} epochs in the "
            f"window, got {len(cols)}"
        )
    window = [numbers[c] for c in cols]
    grid = st.chunk_grid()
    result = StabilityResult(st.url, window, float(threshold), int(max_exact), int(seed))

    tasks: list[Any] = []
    labels: list[str] = []
    plan: list[tuple[LayerStability, int]] = []  # layer, index of its first pair task
    for i, t in enumerate(meta.stored_tensors()):
        if len(t.shape) < 2 or t.size == 0:
            result.skipped.append(t.name)
            continue
        m = int(t.shape[0])
        n = t.size // m
        k = min(m, n)
        if t.size > max_exact:
            method, r = "randomized", min(k, 64 if rank is None else rank)
        else:
            method, r = "exact", k
        r0, r1 = t.offset, t.offset + t.size
        svds = [
            delayed(_svd_task, pure=True)(
                grid, r0, r1, c, (m, n), method, r, seed, dask_key_name=f"stability-svd-{i}-{c}"
            )
            for c in cols
        ]
        lay = LayerStability(
            t.name, list(t.shape), [m, n], method, r, window, [None], [None], [None]
        )
        plan.append((lay, len(tasks)))
        for j in range(stride, len(cols)):
            tasks.append(
                delayed(_pair_task, pure=True)(
                    svds[j - stride], svds[j], dask_key_name=f"stability-pair-{i}-{cols[j]}"
                )
            )
            labels.append(f"{t.name} epochs {window[j - stride]}-{window[j]}")
        result.layers.append(lay)

    with using(run, runtime, cpu_only="stability") as r_:
        out = r_.compute(tasks, "basis stability", labels)

    for lay, first in plan:
        pairs = out[first : first + len(window) - stride]
        tops: list[Any] = [None] * len(window)
        for j, p in enumerate(pairs, start=stride):
            tops[j] = p["top"]
            tops[j - stride] = p["top_prev"]
        lay.top_singular_values = tops
        lay.stability = [None] * stride + [p["stability"] for p in pairs]
        lay.sv_drift = [None] * stride + [p["sv_drift"] for p in pairs]
        lay.first_above, lay.stays_above = summarise_layer(window, lay.stability, threshold)
    return result


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
