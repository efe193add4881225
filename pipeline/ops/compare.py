"""``compare``: are two (or more) training runs dynamically equivalent? (seed 003)

Each run (a study in a store) is reduced to a few coordinates over its window:

- ``refs``: the study's M reference profiles (CMD's own data-driven reduction), or
- ``pcs``: the top-d principal time courses of the trajectory, from its T x T Gram matrix,
  computed by one Dask pass over row blocks (:mod:`pipeline.graph.baselines`; no N x T
  matrix is ever held).

The Koopman eigenvalues of each run are the exact-DMD eigenvalues of a time-delay (Hankel)
embedding of those coordinates (:mod:`pipeline.kernels.koopman`). Two runs are at the
1-Wasserstein distance between their eigenvalue sets (optimal matching).

**Control.** The time order is shuffled: for a pair (i, j), the control distances are those
between run i's eigenvalues and the eigenvalues of run j's coordinates with their epochs
permuted (``shuffles`` times, and symmetrically). ``p_close`` is the fraction of control
distances at or below the observed one: a small ``p_close`` means the two runs are closer
than any time-shuffled control, i.e. their dynamics match (conjugate runs give a distance near
0 and ``p_close`` = 0). ``normalised`` is the distance over the median control distance.
When runs carry group labels (e.g. several seeds of a narrow and of a wide network), a
permutation test over the labels gives ``p_apart``, the probability of a between-group mean
distance at least as large as observed if the labels were exchangeable.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pipeline.config import COMPARE_DELAYS, COMPARE_PERMUTATIONS, COMPARE_SHUFFLES, COMPARE_SOURCE
from pipeline.errors import PipelineError
from pipeline.graph.baselines import build_gram_tasks, combine_gram, gram_block_rows
from pipeline.kernels.koopman import koopman_eigenvalues, pc_coordinates, wasserstein
from pipeline.runtime import Runner, RuntimeOptions, using
from pipeline.store.analysis import AnalysisGroup, complete_study
from pipeline.store.remote import StorageOptions, with_storage_options
from pipeline.store.trajectory import TrajectoryStore

__all__ = ["CompareResult", "RunSpectrum", "compare", "run_coordinates"]

SOURCES = ("refs", "pcs")


@dataclass
class RunSpectrum:
    store: str
    name: str
    source: str
    epochs: list[int]
    coordinates: list[list[float]]  # (d, T)
    eigenvalues: list[tuple[float, float]]  # (real, imag)

    def ev(self) -> np.ndarray:
        return np.array([complex(r, i) for r, i in self.eigenvalues])


@dataclass
class CompareResult:
    runs: list[dict[str, Any]]
    source: str
    delays: int
    distances: list[list[float]]
    pairs: list[dict[str, Any]] = field(default_factory=list)
    groups: list[str] | None = None
    p_apart: float | None = None

    def text(self) -> str:
        """The result in words (every result type has this method; ``table()`` is the
        same text)."""
        return self.table()

    def table(self) -> str:
        names = [f"{r['name']}@{os.path.basename(r['store'].rstrip('/'))}" for r in self.runs]
        w = max(len(n) for n in names)
        lines = [f"Koopman spectra from {self.source}, {self.delays} delay(s); 1-Wasserstein distances:"]
        lines.append(" " * (w + 2) + "  ".join(f"{i:>8}" for i in range(len(names))))
        for i, n in enumerate(names):
            lines.append(f"{i}:{n:<{w}} " + "  ".join(f"{d:8.4f}" for d in self.distances[i]))
        lines.append("pairs: distance, median control distance, normalised, p_close (shuffled time order)")
        for p in self.pairs:
            lines.append(
                f"  {p['i']} vs {p['j']}: {p['distance']:.4g}  control {p['control_median']:.4g}  "
                f"normalised {p['normalised']:.3f}  p_close {p['p_close']:.3f}"
            )
        if self.p_apart is not None:
            lines.append(f"groups {self.groups}: permutation p_apart = {self.p_apart:.4f}")
        return "\n".join(lines)


def run_coordinates(
    store: str | os.PathLike[str],
    name: str,
    source: str = COMPARE_SOURCE,
    d: int | None = None,
    run: Runner | None = None,
    runtime: RuntimeOptions | None = None,
) -> tuple[np.ndarray, list[int]]:
    """The run's reduced coordinates (d, T) over the study's window, and the epochs."""
    if source not in SOURCES:
        raise PipelineError(f"source must be one of {SOURCES}, got {source!r}")
    st = TrajectoryStore.open(store)
    meta = st.require_meta()
    ag, _ = complete_study(st, name)
    epochs = [int(e) for e in np.asarray(ag.array("epochs")[...])]
    refs = np.asarray(ag.array("refs")[...], dtype=np.float64)
    if source == "refs":
        return refs, epochs
    cols = [meta.column_of(e) for e in epochs]
    grid = st.chunk_grid()
    rows = gram_block_rows(grid, len(cols), None)
    tasks, labels = build_gram_tasks(grid, meta.n_rows, rows, cols)
    with using(run, runtime) as r:
        parts = r.compute(tasks, "gram", labels)
    g, _n_bad, _nbytes = combine_gram(parts, len(cols))
    return pc_coordinates(g, d or refs.shape[0]), epochs


def _spectrum(y: np.ndarray, delays: int, rank: int | None) -> np.ndarray:
    return koopman_eigenvalues(y, delays=delays, rank=rank)


@with_storage_options("runs")
def compare(
    runs: Sequence[tuple[str | os.PathLike[str], str]],
    *,
    source: str = COMPARE_SOURCE,
    d: int | None = None,
    delays: int = COMPARE_DELAYS,
    rank: int | None = None,
    shuffles: int = COMPARE_SHUFFLES,
    seed: int = 0,
    groups: list[str] | None = None,
    permutations: int = COMPARE_PERMUTATIONS,
    storage_options: StorageOptions | None = None,
    runtime: RuntimeOptions | None = None,
    run: Runner | None = None,
) -> CompareResult:
    """Koopman spectra of every run, their distance matrix, the shuffle control per pair, and
    (with ``groups``) a permutation test between groups. See the module docstring."""
    if len(runs) < 2:
        raise PipelineError("compare needs at least two runs")
    if groups is not None and len(groups) != len(runs):
        raise PipelineError(f"{len(groups)} group label(s) for {len(runs)} runs")
    coords: list[np.ndarray] = []
    meta_runs = []
    with using(run, runtime, cpu_only="compare") as rt:
        for store, name in runs:
            y, epochs = run_coordinates(store, name, source, d, run=rt)
            coords.append(y)
            meta_runs.append({"store": str(store), "name": name, "epochs": epochs, "d": int(y.shape[0])})
    spectra = [_spectrum(y, delays, rank) for y in coords]
    for m, ev in zip(meta_runs, spectra, strict=True):
        m["eigenvalues"] = [(float(z.real), float(z.imag)) for z in ev]
    k = len(runs)
    dist = np.zeros((k, k))
    for i, j in itertools.combinations(range(k), 2):
        dist[i, j] = dist[j, i] = wasserstein(spectra[i], spectra[j])
    rng = np.random.default_rng(seed)
    pairs = []
    for i, j in itertools.combinations(range(k), 2):
        ctrl = []
        for _ in range(shuffles):
            for a, b in ((i, j), (j, i)):
                yb = coords[b][:, rng.permutation(coords[b].shape[1])]
                ctrl.append(wasserstein(spectra[a], _spectrum(yb, delays, rank)))
        c = np.asarray(ctrl)
        med = float(np.median(c))
        pairs.append({
            "i": i,
            "j": j,
            "distance": float(dist[i, j]),
            "control_median": med,
            "normalised": float(dist[i, j] / med) if med > 0 else float("inf"),
            "p_close": float(np.mean(c <= dist[i, j])),
        })
    p_apart = None
    if groups is not None and len(set(groups)) > 1:
        p_apart = _permutation_p(dist, groups, permutations, rng)
    return CompareResult(meta_runs, source, delays, dist.tolist(), pairs, groups, p_apart)


def save_with_study(result: CompareResult) -> dict[str, str]:
    """Write the comparison beside the first run's study (``report/compare.json`` and its
    figures), where ``cmd-pipeline report`` picks it up. Returns the file locations."""
    import json

    from pipeline.report.figures import distance_figure, eigenvalues_figure

    first = result.runs[0]
    ag = AnalysisGroup(TrajectoryStore.open(first["store"]).url, first["name"])
    labels = [f"{i}: {r['name']}@{os.path.basename(str(r['store']).rstrip('/'))}" for i, r in enumerate(result.runs)]
    files = {"compare.json": ag.write_file("compare.json", json.dumps(asdict(result), indent=1).encode())}
    files["koopman_eigenvalues.png"] = ag.write_file(
        "figures/koopman_eigenvalues.png",
        eigenvalues_figure(result.runs, f"Koopman eigenvalues ({result.source}, {result.delays} delays)"),
    )
    files["distances.png"] = ag.write_file("figures/distances.png", distance_figure(result.distances, labels))
    return files


def _between_mean(dist: np.ndarray, labels: np.ndarray) -> float:
    mask = labels[:, None] != labels[None, :]
    return float(dist[mask].mean())


def _permutation_p(dist: np.ndarray, groups: list[str], n: int, rng: np.random.Generator) -> float:
    labels = np.asarray(groups)
    observed = _between_mean(dist, labels) - float(dist[labels[:, None] == labels[None, :]].sum() / max(
        int((labels[:, None] == labels[None, :]).sum()) - len(labels), 1))
    hits = 0
    for _ in range(n):
        perm = rng.permutation(labels)
        same = perm[:, None] == perm[None, :]
        within = float(dist[same].sum() / max(int(same.sum()) - len(perm), 1))
        if _between_mean(dist, perm) - within >= observed - 1e-15:
            hits += 1
    return (hits + 1) / (n + 1)

