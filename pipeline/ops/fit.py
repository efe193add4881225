"""``fit``: post-hoc CMD on a stored trajectory (Algorithms 1 and 2 of the paper).

1. Sample K parameters (stratified by layer), reading only their rows at the window's epochs;
   parameters constant (or NaN/Inf) over the window are replaced by new draws.
2. Pearson correlation of the samples in float64, complete-linkage clustering on |corr|, a
   reference per mode.
3. One Dask pass over all N rows: mode, a, b, corr, residual and flags per parameter, and the
   error sums that give the summaries; written into ``analyses/<name>/`` as the anchored
   float32 model (``mode``, ``a``, ``level``, ``anchor``, ``flags``: 11 bytes per parameter),
   plus ``corr`` and ``residual`` with ``diagnostics``.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from pipeline._version import __version__
from pipeline.config import DEFAULT_SAMPLES, DRAW_ROUNDS
from pipeline.errors import (
    PipelineError,
    PipelineWarning,
    StoreError,
)
from pipeline.graph.fit import build_fit_tasks, build_scan_tasks, build_totals
from pipeline.graph.sampling import assemble_gathered, build_gather_tasks
from pipeline.kernels.cluster import check_cut, cluster_modes
from pipeline.kernels.cmd import References, pearson
from pipeline.kernels.sampling import Pool, RowMap, Sample, draw_samples
from pipeline.plan import BlockPlan, RowLayout, StatsLayout, plan_fit
from pipeline.plan.fit import frozen_share
from pipeline.runtime import Runner, RuntimeOptions, using
from pipeline.store.analysis import AnalysisGroup
from pipeline.store.remote import StorageOptions, with_storage_options
from pipeline.store.study import reconcile
from pipeline.store.trajectory import ChunkGrid, TrajectoryStore

__all__ = ["FitResult", "fit", "summarise"]


@dataclass
class FitResult:
    """What a fit did, and the study's summary."""

    store: str
    name: str
    n_modes: int
    n_samples: int
    epochs: list[int]
    summary: dict[str, Any]
    status: str  # "fitted", "resumed" or "unchanged"
    bytes_sampled: int = 0
    blocks_run: int = 0
    blocks_kept: int = 0
    seconds: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)

    def text(self) -> str:
        """The result in words (every result type has this method; ``summary_text()`` is the
        same text)."""
        return self.summary_text()

    def summary_text(self) -> str:
        s = self.summary
        head = (
            f"analysis {self.name!r} ({self.status}): {self.n_modes} mode(s) from {self.n_samples} samples, "
            f"window of {len(self.epochs)} epoch(s); error relative to the dynamics "
            f"{_fmt(s.get('dynamics_error'))} (‖W−Ŵ‖/‖W−mean_t W‖; relative to ‖W‖: "
            f"{_fmt(s['relative_error'])})"
        )
        if self.status != "unchanged":
            head += (
                f"; {self.blocks_run} block(s) run, {self.blocks_kept} kept; sampling read "
                f"{self.bytes_sampled / 1e6:.2f} MB; {self.seconds:.1f} s"
            )
        lines = [head]
        lines += [f"  note: {n}" for n in s.get("notes", [])]
        lines.append("  mode   count        mean|corr|  dyn.error  rel.error  reference")
        for m in s["modes"]:
            lines.append(
                f"  {m['mode']:>4}   {m['count']:>11,}  {_fmt(m['mean_abs_corr']):>9}  "
                f"{_fmt(m.get('dynamics_error')):>9}  {_fmt(m['relative_error']):>9}  "
                f"{m['reference']}"
            )
        f = s["flags"]
        lines.append(f"  constant parameters: {f['constant']:,}; with NaN/Inf: {f['nonfinite']:,}")
        return "\n".join(lines)


def _mode_notes(asked: int | None, got: int, n_samples: int) -> list[str]:
    """Why fewer modes came out than asked, in words (empty when as many as asked)."""
    if asked is None or got >= asked:
        return []
    if asked > n_samples:
        return [
            f"asked for {asked} modes but there are {n_samples} samples: at most {n_samples} "
            f"modes from {n_samples} samples ({got} came out)"
        ]
    return [
        f"asked for {asked} modes, {got} came out: no cut of the linkage tree gives between "
        f"{got + 1} and {asked} clusters (samples at equal distances merge together, e.g. "
        "exact multiples of one profile, |corr| = 1 to 12 decimals)"
    ]


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


def _ratio(num: float, den: float) -> float | None:
    return math.sqrt(num / den) if den > 0 else None


def _sample(
    grid: ChunkGrid,
    layout: RowLayout,
    cols: np.ndarray,
    k: int,
    seed: int,
    scan_plans: Callable[[], list[BlockPlan]],
    runner_of: Callable[[], Runner],
    frozen: Sequence[int] = (),
) -> Sample:
    """K usable samples (not constant, finite over the window): by rejection, and when that
    falls short, from one pass over the window that finds every varying row. Tensors in
    ``frozen`` (never changing over the window) are never drawn nor scanned."""
    skip = set(frozen)
    if skip:
        keep = [i not in skip for i in range(len(layout.sizes))]
        rmap: RowMap | None = RowMap(layout.offsets, layout.sizes, keep)
    else:
        rmap = None

    def scan() -> tuple[list[Pool], int]:
        plans = [p for p in scan_plans() if not p.frozen]  # only when the scan is needed
        tasks = build_scan_tasks(grid, plans, cols, k, seed)
        labels = [f"scan block {p.index}: rows {p.r0}-{p.r1}" for p in plans]
        found = runner_of().compute(tasks, "sampling: finding the varying parameters", labels)
        pools = [p for pools, _nb in found for p in pools if p.layer not in skip]
        if rmap is not None:  # into the sampling's index space
            pools = [replace(p, candidates=rmap.to_virtual(p.candidates)) for p in pools]
        return pools, sum(nb for _p, nb in found)

    def read(rows: np.ndarray) -> tuple[np.ndarray, int]:
        # in tasks, one per chunk-row block: no chunk is read on the client
        real = rows if rmap is None else rmap.to_real(rows)
        tasks, labels, where = build_gather_tasks(grid, real, cols)
        run = runner_of()
        with run.quiet():
            found = run.compute(tasks, "sampling: reading the sampled rows", labels)
        return assemble_gathered(found, where, len(real), len(cols))

    drawn = draw_samples(
        layout.offsets if rmap is None else rmap.offsets,
        layout.sizes if rmap is None else rmap.sizes,
        k,
        seed,
        read,
        rounds=DRAW_ROUNDS,
        scan=scan,
    )
    if rmap is None:
        return drawn
    return replace(drawn, index=rmap.to_real(drawn.index))


def _compile_kernel(dtype: str = "float32") -> None:
    """Compile the fused CPU kernel for the store's dtype here once (or load it from numba's
    disk cache), so that worker processes on this machine load it instead of each compiling
    it."""
    from pipeline.kernels import cmd_numba

    if cmd_numba.use_fused():
        cmd_numba.warm_up((dtype,))


def summarise(
    totals: np.ndarray,
    layout: StatsLayout,
    layer_names: list[str],
    epochs: list[int],
    ref_index: np.ndarray,
) -> dict[str, Any]:
    """Summaries per mode, per layer and per epoch from the blocks' error sums, folded into
    one totals vector (:meth:`StatsLayout.fold`).

    Two relative errors, both over the finite parameters: ``dynamics_error`` =
    ‖W − Ŵ‖ / ‖W − mean_t W‖ (against what moved: the headline; 1.0 is the constant model
    ``w_i(t) = mean w_i``) and ``relative_error`` = ‖W − Ŵ‖ / ‖W‖ (against the weights
    themselves, which their magnitude dominates).
    """
    n_modes = layout.n_modes
    per_mode, per_layer, res_t, en_t, sp_t = layout.unfold(totals, len(layer_names))

    def entry(v: np.ndarray) -> dict[str, Any]:
        return {
            "count": int(v[0]),
            "mean_abs_corr": float(v[2] / v[1]) if v[1] > 0 else None,
            "dynamics_error": _ratio(v[3], v[6]),
            "relative_error": _ratio(v[3], v[4]),
        }

    total = per_mode.sum(axis=0)
    finite_rows = float(total[0] - total[5])
    return {
        "dynamics_error": _ratio(total[3], total[6]),
        "relative_error": _ratio(total[3], total[4]),
        # mean squared weight error over the finite parameters and the window's epochs
        "mse": float(total[3] / (finite_rows * len(epochs))) if finite_rows > 0 else None,
        "modes": [
            {"mode": m, **entry(per_mode[m]), "reference": int(ref_index[m])}
            for m in range(n_modes)
        ],
        "layers": [{"name": n, **entry(per_layer[i])} for i, n in enumerate(layer_names)],
        "epochs": [
            {
                "epoch": e,
                "dynamics_error": _ratio(res_t[k], sp_t[k]),
                "relative_error": _ratio(res_t[k], en_t[k]),
                "mse": float(res_t[k] / finite_rows) if finite_rows > 0 else None,
            }
            for k, e in enumerate(epochs)
        ],
        "flags": {"constant": int(total[0] - total[1] - total[5]), "nonfinite": int(total[5])},
    }


@with_storage_options("store")
def fit(
    store: str | os.PathLike[str],
    name: str,
    *,
    modes: int | None = None,
    threshold: float | None = None,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    epochs: str | None = None,
    force: bool = False,
    block_rows: int | None = None,
    diagnostics: bool = False,
    storage_options: StorageOptions | None = None,
    runtime: RuntimeOptions | None = None,
    run: Runner | None = None,
) -> FitResult:
    """Fit CMD on the store's trajectory and write the study to ``analyses/<name>``.

    Parameters
    ----------
    store
        The trajectory store (path or fsspec URL).
    name
        The study's name; several studies live side by side in one store.
    modes, threshold
        Cut the dendrogram into at most ``modes`` clusters, or at in-cluster distance
        ``threshold`` (distance = 1 - |corr|). Exactly one must be given.
    samples
        K, the number of sampled parameters (paper: 1000; about 30 x M suffices).
    seed
        Seed of the sampling.
    epochs
        Window ``START:END[:STEP]`` over the stored epoch numbers (default: all).
    force
        Replace an existing study of that name with another configuration.
    block_rows
        Rows per task (a divisor of the store's chunk rows); default: 64 MiB blocks.
    diagnostics
        Also store each parameter's correlation with its reference (``corr``) and its
        residual (``residual``), float32: 8 more bytes per parameter. The summaries (mean
        |corr| and errors per mode, layer and epoch) are computed either way. Part of the
        study's configuration.
    storage_options
        fsspec options (credentials, ``endpoint_url``...) for a store on object storage
        (``s3://``, ``gs://``...); they reach the Dask workers too, never the store.

    Notes
    -----
    Re-running a finished study with the same configuration changes nothing; an interrupted
    one resumes, its finished blocks untouched.
    """
    try:
        check_cut(modes, threshold)
    except ValueError as e:
        raise PipelineError(str(e)) from None
    if samples < 2:
        raise PipelineError("samples must be at least 2")
    t0 = time.perf_counter()
    st = TrajectoryStore.open(store, writable=True)
    meta = st.require_meta()
    grid = st.chunk_grid()
    plan = plan_fit(
        meta,
        name,
        chunk_rows=grid.chunk_rows,
        raw=grid.local_root is not None,
        modes=modes,
        threshold=threshold,
        samples=samples,
        seed=seed,
        window=epochs,
        block_rows=block_rows,
    )
    config = {**plan.config(), "diagnostics": bool(diagnostics)}
    window_epochs = list(plan.epochs)
    ag = AnalysisGroup(st.url, name)
    layout = RowLayout.from_entries([(t.name, t.offset, t.size) for t in meta.stored_tensors()])
    cols = np.asarray(plan.cols, dtype=np.int64)
    state = reconcile(ag, config, plan.fingerprint, force=force, stats_layout=StatsLayout.VERSION)
    if state.action == "unchanged":
        assert state.attrs is not None
        return FitResult(
            st.url,
            name,
            int(state.attrs["n_modes"]),
            int(state.attrs["n_samples"]),
            window_epochs,
            state.attrs["summary"],
            "unchanged",
            config=config,
        )
    resume = state.action == "resume"
    nbytes = 0
    with contextlib.ExitStack() as stack:
        held: list[Runner] = []

        def runner_of() -> Runner:
            # the runtime starts on first use: a fit whose sampling needs no scan starts it
            # once, for the pass over all rows
            if not held:
                held.append(stack.enter_context(using(run, runtime)))
            return held[0]

        if resume:
            refs_raw = np.asarray(ag.array("refs")[...])
            ref_index = np.asarray(ag.array("ref_index")[...])
            sample_index = np.asarray(ag.array("sample_index")[...])
            n_modes = int(refs_raw.shape[0])
        else:
            none = np.empty(0, dtype=np.int64)
            drawn = _sample(
                grid,
                layout,
                cols,
                samples,
                seed,
                lambda: plan.block_plans(layout, none, none),
                runner_of,
                plan.frozen,
            )
            sample_index, profiles, nbytes = drawn.index, drawn.profiles, drawn.bytes_read
            notes = []
            if sample_index.size < samples:  # then the scan ran and counted them
                notes.append(
                    f"only {drawn.n_varying:,} parameters vary over the window (finite, not "
                    f"constant): {sample_index.size:,} sampled of the {samples:,} asked"
                )
            if sample_index.size < 2:
                raise PipelineError(
                    "fewer than 2 parameters vary over the window: nothing to decompose"
                )
            clustering = cluster_modes(pearson(profiles), modes=modes, threshold=threshold)
            refs_raw = profiles[clustering.references].astype(np.float64)
            ref_index = sample_index[clustering.references]
            n_modes = clustering.n_modes
            notes += _mode_notes(modes, n_modes, int(sample_index.size))
            for note in notes:
                warnings.warn(f"analysis {name!r}: {note}", PipelineWarning, stacklevel=2)
        plans = plan.block_plans(layout, ref_index, sample_index)
        stats_layout = StatsLayout(n_modes, len(plan.cols), max(len(p.layers) for p in plans))
        if not resume:
            ag.create(
                n_rows=meta.n_rows,
                n_modes=n_modes,
                block_rows=plan.block_rows,
                n_blocks=len(plans),
                stats_width=stats_layout.width,
                small={
                    "refs": refs_raw,
                    "ref_index": ref_index.astype(np.int64),
                    "sample_index": sample_index.astype(np.int64),
                    "sample_mode": clustering.labels.astype(np.int64),
                    "sample_order": clustering.order.astype(np.int64),
                    # the samples' values (the report plots them without reading the store)
                    "sample_profiles": np.asarray(profiles, dtype=np.float32),
                    "epochs": np.asarray(window_epochs, dtype=np.int64),
                },
                diagnostics=bool(diagnostics),
            )
            ag.set_attrs(
                consolidated=False,  # the study enters the consolidated metadata complete
                config=config,
                trajectory_fingerprint=plan.fingerprint,
                package_version=__version__,
                status="running",
                n_modes=n_modes,
                n_samples=int(sample_index.size),
                n_varying=drawn.n_varying,
                sampling_bytes_read=nbytes,
                float_buffers=meta.settings.float_buffers,
                stats_layout=StatsLayout.VERSION,
                notes=notes,
                frozen=frozen_share(meta, plan.cols),
            )
        if resume:
            ag.remove_partials()  # temporary files of writes that an interruption cut off
        done = ag.finished_blocks() if resume else set()
        todo = [p for p in plans if p.index not in done]
        refs = References.from_profiles(refs_raw)
        gpu = run.options.gpu if run is not None else bool(runtime and runtime.gpu)
        if not gpu and todo:
            _compile_kernel(grid.dtype)
        tasks = build_fit_tasks(
            grid, name, todo, cols, refs, stats_layout, gpu=gpu, diagnostics=bool(diagnostics)
        )
        labels = [f"analysis block {p.index}: rows {p.r0}-{p.r1}" for p in todo]
        # the blocks' sums are folded in a tree of tasks (blocks finished earlier read there
        # too): the client gathers one totals vector, never a row per block
        totals_d = build_totals(
            st.url, name, stats_layout, len(layout.names), len(plans),
            {p.index: t for p, t in zip(todo, tasks, strict=True)},
        )  # fmt: skip
        try:
            totals = runner_of().compute(tasks, f"fit {name}", labels, reduce=totals_d)
        finally:
            # a worker killed mid-write leaves a temporary file behind; the block ran again
            # elsewhere, or a re-run resumes it: the file is garbage either way
            ag.remove_partials()
    totals = np.asarray(totals, dtype=np.float64)
    if np.isnan(totals).any():
        raise StoreError(f"analysis {name!r}: some blocks have no statistics after the pass")
    summary = summarise(totals, stats_layout, list(layout.names), window_epochs, ref_index)
    summary["notes"] = list(ag.attrs().get("notes", []))
    ag.set_attrs(status="complete", summary=summary)
    return FitResult(
        st.url,
        name,
        n_modes,
        int(sample_index.size),
        window_epochs,
        summary,
        "resumed" if resume else "fitted",
        nbytes,
        len(todo),
        len(plans) - len(todo),
        time.perf_counter() - t0,
        config,
    )
