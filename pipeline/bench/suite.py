"""``cmd-pipeline bench``: throughput against the hardware, growth, beyond RAM, baselines.

Every figure is measured in the same run as the limit it is compared with (these machines are
noisy), and written to ``OUT/results.json`` (raw), ``OUT/results.md`` (tables) and
``OUT/*.png`` (plots):

1. **Hardware limits**: a memory copy (``np.copyto`` of 512 MiB) and a plain sequential read of
   the store's files (and of the checkpoint files for ingest), from the page cache.
2. **Throughput**: ingest, fit and reconstruct of one store, as fractions of those limits.
3. **Growth**: fit time against N, T and M, with power-law exponents.
4. **Beyond RAM** (``--beyond-ram N``; not in ``--quick``): ingest and fit a trajectory larger
   than memory; time, throughput, peak RSS of the whole process tree.
5. **Baselines** on the same trajectories (a synthetic planted-mode store and a real recorded
   digits CNN run, trained by the workflow :data:`REAL_WORKFLOW` found at run time through
   the entry points of :data:`pipeline.ops.evaluate.WORKFLOW_GROUP`): CMD with M = 1..50 against POD/truncated SVD and exact DMD at rank r,
   relative error against stored bytes (a Pareto chart), time and peak memory; and the
   research code's in-memory algorithm (time, peak RSS, and the N at which it would run out
   of memory, extrapolated from its measured bytes per parameter).
6. **Numerics at scale**: a, b and corr of a subsample of rows against a dense float64
   reference computed from the same references and modes.

Stored bytes: CMD keeps its anchored model as float32 (a and level) with a one-byte mode and
a one-byte anchor per parameter (10 B) plus the M reference profiles (M T float32), and its
error is measured with that float32 model (what those bytes hold); POD/DMD conventions are in
:mod:`pipeline.bench.baselines`.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import pipeline
from pipeline.bench.common import (
    PeakRSS,
    memcpy_bandwidth,
    power_law,
    raw_read_bandwidth,
    raw_write_bandwidth,
    synthetic_store,
)
from pipeline.config import BENCH_EPOCHS
from pipeline.errors import PipelineWarning
from pipeline.kernels.reconstruct import reconstruct_block
from pipeline.runtime import Runner, RuntimeOptions, runner
from pipeline.store.analysis import AnalysisGroup

__all__ = ["REAL_WORKFLOW", "BenchOptions", "run_bench"]

#: the workflow recording the real trajectory of the baselines (an installed workflow name or
#: ``module:function``); its module provides ``TrainConfig`` and ``train_and_record``
REAL_WORKFLOW = "digits"


@dataclass
class BenchOptions:
    """What ``cmd-pipeline bench`` runs (``quick`` picks small defaults)."""

    out: Path
    quick: bool = False
    sizes: list[int] | None = None  # N of the growth sweep
    epochs: int = BENCH_EPOCHS
    epoch_sweep: list[int] | None = None
    mode_sweep: list[int] | None = None
    main_n: int | None = None  # N of the throughput store and of the baselines
    beyond_ram: int | None = None  # N of the beyond-RAM run (T = epochs); None: skip
    real_epochs: int | None = None  # epochs of the recorded digits CNN run (baselines)
    ranks: list[int] = field(default_factory=lambda: [1, 2, 3, 5, 10, 20])
    cmd_modes: list[int] = field(default_factory=lambda: [1, 2, 5, 10, 20, 50])
    workdir: Path | None = None
    keep: bool = False
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    sections: tuple[str, ...] = ("throughput", "numerics", "growth", "beyond-ram", "baselines")

    def resolved(self) -> BenchOptions:
        q = self.quick
        return BenchOptions(
            out=self.out,
            quick=q,
            sizes=self.sizes or ([100_000, 300_000, 1_000_000, 3_000_000] if q else
                                 [100_000, 1_000_000, 10_000_000, 30_000_000, 100_000_000]),
            epochs=self.epochs,
            epoch_sweep=self.epoch_sweep or [10, 25, 50, 100],
            mode_sweep=self.mode_sweep or [1, 2, 5, 10, 20, 50],
            main_n=self.main_n or (2_000_000 if q else 10_000_000),
            beyond_ram=self.beyond_ram,
            real_epochs=self.real_epochs or (30 if q else 100),
            ranks=self.ranks,
            cmd_modes=self.cmd_modes,
            workdir=self.workdir or (self.out / "work"),
            keep=self.keep,
            runtime=self.runtime,
            sections=self.sections,
        )


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _checkpoints(root: Path, n: int, t: int, seed: int = 0) -> Path:
    """A run of safetensors checkpoints (planted modes, 8 tensors) for the ingest benchmark,
    written one epoch at a time (memory: one epoch)."""
    from safetensors.numpy import save_file

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    layers = 8
    sizes = [n // layers] * (layers - 1) + [n - (n // layers) * (layers - 1)]
    tt = np.linspace(0, 1, t)
    profiles = np.stack([np.exp(-3 * tt), np.sin(3 * tt), tt, np.tanh(4 * tt - 2)])
    mode = [rng.integers(4, size=s) for s in sizes]
    a = [rng.standard_normal(s).astype(np.float32) * np.float32(0.1) for s in sizes]
    b = [rng.standard_normal(s).astype(np.float32) * np.float32(0.1) for s in sizes]
    for e in range(t):
        sd = {
            f"layers.{i}.weight": a[i] * profiles[mode[i], e].astype(np.float32) + b[i]
            for i in range(layers)
        }
        save_file(sd, str(root / f"epoch_{e:04d}.safetensors"))
    return root


def _timed(fn: Any) -> tuple[Any, float, int]:
    with PeakRSS() as rss:
        t = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t
    return out, dt, rss.peak


def _fit(url: str, name: str, modes: int, rt: Runner, samples: int = 1000) -> Any:
    """Fit a study. Fewer modes than asked is an outcome the bench records (``n_modes`` and the
    summary's ``notes``), not a problem: the fit's warning saying so is not passed on; any
    other warning is."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PipelineWarning)
        res = pipeline.fit(url, name, modes=modes, samples=samples, seed=0, force=True, run=rt)
    notes = list(res.summary.get("notes", []))
    for w in caught:
        if not (issubclass(w.category, PipelineWarning) and any(n in str(w.message) for n in notes)):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return res


# ------------------------------------------------------------------------------ sections
def throughput(o: BenchOptions, rt: Runner, limits: dict[str, float]) -> dict[str, Any]:
    assert o.workdir is not None and o.main_n is not None
    n, t = o.main_n, o.epochs
    ck = _checkpoints(o.workdir / "ckpt", n, t)
    ck_bw, ck_bytes = raw_read_bandwidth(str(ck))
    store = str(o.workdir / "main.zarr")
    shutil.rmtree(store, ignore_errors=True)
    _, t_ingest, rss_ingest = _timed(lambda: pipeline.ingest([str(ck)], store, run=rt))
    st_bw, st_bytes = raw_read_bandwidth(os.path.join(store, "trajectory"))
    fit, t_fit, rss_fit = _timed(lambda: _fit(store, "m10", 10, rt))
    _, t_rec, rss_rec = _timed(lambda: pipeline.reconstruct(store, "m10", run=rt))
    nbytes = n * t * 4
    rows = {
        "ingest": {"seconds": t_ingest, "bytes": ck_bytes, "limit_read": ck_bw, "peak_rss": rss_ingest},
        "fit": {"seconds": t_fit, "bytes": nbytes, "limit_read": st_bw, "peak_rss": rss_fit},
        "reconstruct": {"seconds": t_rec, "bytes": nbytes, "limit_read": st_bw, "peak_rss": rss_rec},
    }
    # fresh-file writes: what ingest and reconstruct do (page allocation on first touch)
    limits["write"] = raw_write_bandwidth(str(o.workdir / "write-probe"), min(nbytes, 2 * 2**30))
    for r in rows.values():
        r["throughput"] = r["bytes"] / r["seconds"]
        r["of_read"] = r["throughput"] / r["limit_read"]
        r["of_write"] = r["throughput"] / limits["write"]
        r["of_memcpy"] = r["throughput"] / limits["memcpy"]
    shutil.rmtree(ck, ignore_errors=True)
    return {"n": n, "epochs": t, "store": store, "store_bytes": st_bytes, "ops": rows,
            "fit_relative_error": fit.summary["relative_error"]}


def growth(o: BenchOptions, rt: Runner) -> dict[str, Any]:
    assert o.workdir is not None and o.sizes and o.epoch_sweep and o.mode_sweep
    out: dict[str, Any] = {"n": [], "t": [], "m": []}
    for n in o.sizes:
        url = str(o.workdir / f"grow-n{n}.zarr")
        synthetic_store(url, n, o.epochs, 10)
        _, dt, rss = _timed(lambda url=url: _fit(url, "g", 10, rt))
        out["n"].append({"n": n, "epochs": o.epochs, "seconds": dt, "peak_rss": rss})
        _say(f"  growth N={n:,}: fit {dt:.2f} s")
        shutil.rmtree(url, ignore_errors=True)
    n_fix = min(1_000_000 if o.quick else 10_000_000, max(o.sizes))
    for t in o.epoch_sweep:
        url = str(o.workdir / f"grow-t{t}.zarr")
        synthetic_store(url, n_fix, t, 10)
        _, dt, rss = _timed(lambda url=url: _fit(url, "g", 10, rt))
        out["t"].append({"n": n_fix, "epochs": t, "seconds": dt, "peak_rss": rss})
        _say(f"  growth T={t}: fit {dt:.2f} s")
        if t != o.epochs:
            shutil.rmtree(url, ignore_errors=True)
    url = str(o.workdir / f"grow-t{o.epochs}.zarr")
    if not os.path.exists(url):
        synthetic_store(url, n_fix, o.epochs, 10)
    for m in o.mode_sweep:
        _, dt, rss = _timed(lambda m=m: _fit(url, f"m{m}", m, rt))
        out["m"].append({"n": n_fix, "epochs": o.epochs, "modes": m, "seconds": dt, "peak_rss": rss})
        _say(f"  growth M={m}: fit {dt:.2f} s")
    shutil.rmtree(url, ignore_errors=True)
    for key, x in (("n", "n"), ("t", "epochs"), ("m", "modes")):
        pts = out[key]
        k, c = power_law([p[x] for p in pts], [p["seconds"] for p in pts])
        out[f"exponent_{key}"] = k
        out[f"coefficient_{key}"] = c
    return out


def beyond_ram(o: BenchOptions, rt: Runner) -> dict[str, Any]:
    assert o.workdir is not None and o.beyond_ram
    n, t = o.beyond_ram, o.epochs
    ck = o.workdir / "big-ckpt"
    _say(f"  beyond RAM: writing {n * t * 4 / 1e9:.1f} GB of checkpoints")
    t0 = time.perf_counter()
    _checkpoints(ck, n, t)
    t_write = time.perf_counter() - t0
    store = str(o.workdir / "big.zarr")
    _, t_ingest, rss_ingest = _timed(lambda: pipeline.ingest([str(ck)], store, run=rt))
    shutil.rmtree(ck, ignore_errors=True)
    fit, t_fit, rss_fit = _timed(lambda: _fit(store, "m10", 10, rt))
    nbytes = n * t * 4
    shutil.rmtree(store, ignore_errors=True)
    import psutil

    return {
        "n": n, "epochs": t, "bytes": nbytes, "ram_bytes": psutil.virtual_memory().total,
        "write_checkpoints_seconds": t_write,
        "ingest": {"seconds": t_ingest, "throughput": nbytes / t_ingest, "peak_rss": rss_ingest},
        "fit": {"seconds": t_fit, "throughput": nbytes / t_fit, "peak_rss": rss_fit,
                "relative_error": fit.summary["relative_error"]},
    }


def _cmd_points(url: str, modes: list[int], rt: Runner, keep: bool = False) -> list[dict[str, Any]]:
    """CMD with M modes (study ``paretoM``, removed unless ``keep``): the fit's time and peak RSS,
    and its error at the stored bytes (the float32 model, 10 B per parameter;
    :func:`pipeline.bench.baselines.cmd_errors`)."""
    from pipeline.bench.baselines import cmd_errors

    pts = []
    for m in modes:
        res, dt, rss = _timed(lambda m=m: _fit(url, f"pareto{m}", m, rt))
        err = cmd_errors(url, f"pareto{m}", run=rt)
        pts.append({**err, "rank": m, "relative_error_fit": res.summary["relative_error"],
                    "notes": list(res.summary.get("notes", [])), "error_seconds": err["seconds"],
                    "seconds": dt, "peak_rss": rss})
        if not keep:
            AnalysisGroup(url, f"pareto{m}").delete()
    return pts


def _in_memory(url: str) -> dict[str, Any]:
    """The research code's algorithm in its own process (its peak RSS is its own)."""
    code = (
        "import json,sys; from pipeline.bench.common import in_memory_baseline; "
        f"print(json.dumps(in_memory_baseline({url!r}, 10, 1000, 0)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def baselines(o: BenchOptions, rt: Runner, main_store: str) -> dict[str, Any]:
    from pipeline.bench.baselines import dmd_errors, gram, pod_errors

    assert o.workdir is not None and o.real_epochs is not None
    # a real trajectory: the digits CNN, recorded
    from pipeline.ops.evaluate import workflow_module

    wf = workflow_module(REAL_WORKFLOW)
    run_dir = o.workdir / "digits-run"
    config = wf.TrainConfig(model="cnn", epochs=o.real_epochs, seed=0, batch_size=64)
    wf.train_and_record(run_dir, config, overwrite=True)
    real = str(o.workdir / "digits.zarr")
    shutil.rmtree(real, ignore_errors=True)
    pipeline.ingest([str(run_dir)], real, run=rt)
    out: dict[str, Any] = {}
    for label, url in (("synthetic", main_store), ("digits CNN", real)):
        meta = pipeline.open_store(url).require_meta()
        n, t = meta.n_rows, len(meta.epochs)
        pts = _cmd_points(url, [m for m in o.cmd_modes if m < n], rt, keep=o.keep)
        g, t_gram, rss_gram = _timed(lambda url=url: gram(url, run=rt))
        for p in pod_errors(g, [r for r in o.ranks if r <= t]):
            d = p if isinstance(p, dict) else p.__dict__
            pts.append({"method": "POD", **d, "seconds": t_gram, "peak_rss": rss_gram})
        dmd_ranks = [r for r in o.ranks if r < t]
        dmd, t_dmd, rss_dmd = _timed(lambda url=url, g=g, ranks=dmd_ranks: dmd_errors(url, g, ranks, run=rt))
        for p in dmd:
            d = p if isinstance(p, dict) else p.__dict__
            pts.append({"method": "DMD", **d, "seconds": t_gram + t_dmd, "peak_rss": max(rss_gram, rss_dmd)})
        out[label] = {"n": n, "epochs": t, "points": pts}
        _say(f"  baselines on {label}: {len(pts)} points")
    # the in-memory research algorithm, and where it runs out of memory
    import psutil

    meta = pipeline.open_store(main_store).require_meta()
    im = _in_memory(main_store)
    per_param = im["peak_rss_GB"] * 1e9 / meta.n_rows
    im["bytes_per_parameter"] = per_param
    im["out_of_memory_n_extrapolated"] = psutil.virtual_memory().total / per_param
    out["in_memory"] = im
    return out


def numerics(url: str, name: str, sample: int = 20_000, seed: int = 0) -> dict[str, Any]:
    """The stored model of ``sample`` random rows against a dense float64 refit with the
    study's references and modes (the pipeline's kernel and storage against plain numpy):
    ``a`` (float32 in a study: within 2^-22 relative), the intercept b, the model at every
    epoch of the window rounded to float32 (in float32 ulps: at most 1 where the fitted values
    keep their sign, at most 3 where they cross zero), and ``corr`` when the study stores it
    (``diagnostics``; else None)."""
    st = pipeline.open_store(url)
    meta = st.require_meta()
    ag = AnalysisGroup(st.url, name)
    layout = ag.layout()
    epochs = [int(e) for e in np.asarray(ag.array("epochs")[...])]
    cols = np.asarray([meta.column_of(e) for e in epochs], dtype=np.int64)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(meta.n_rows, size=min(sample, meta.n_rows), replace=False))
    x, _ = st.chunk_grid().read_scattered(rows, cols)
    x = x.astype(np.float64)
    refs = np.asarray(ag.array("refs")[...], dtype=np.float64)
    mode = np.asarray(ag.array("mode").oindex[rows]).astype(np.int64)
    flags = np.asarray(ag.array("flags").oindex[rows])
    ok = (flags & 7) == 0  # not constant, finite, not a reference
    xc = x - x.mean(axis=1, keepdims=True)
    rc = refs - refs.mean(axis=1, keepdims=True)
    cov = (xc * rc[mode]).sum(axis=1)
    q = (rc * rc).sum(axis=1)[mode]
    a = cov / q
    b = x.mean(axis=1) - a * refs.mean(axis=1)[mode]
    corr = cov / np.sqrt(q * (xc * xc).sum(axis=1))
    model = [np.asarray(ag.array(k).oindex[rows]) for k in layout.model]
    got_a = model[1].astype(np.float64)
    stored = reconstruct_block(model[0], model[1], model[2], refs, slice(None), *model[3:])
    got_b = stored[:, 0] - got_a * refs[mode, 0]  # the intercept, in float64
    dense = a[:, None] * refs[mode] + b[:, None]
    far = _ulps(stored.astype(np.float32), dense.astype(np.float32))[ok]
    scale_b = np.abs(x).max(axis=1)

    def rel(g: np.ndarray, w: np.ndarray, s: np.ndarray) -> float:
        return float(np.max(np.abs(g[ok] - w[ok]) / s[ok])) if ok.any() else 0.0

    corr_max = None
    if layout.diagnostics:
        got_c = np.asarray(ag.array("corr").oindex[rows], dtype=np.float64)
        corr_max = float(np.max(np.abs(got_c[ok] - corr[ok]))) if ok.any() else 0.0
    return {
        "rows": int(rows.size),
        "checked": int(ok.sum()),
        "a_max_rel": rel(got_a, a, np.abs(a) + 1e-300),
        "b_max_rel_to_weight_scale": rel(got_b, b, scale_b + 1e-300),
        "model_max_ulps": int(far.max()) if far.size else 0,
        "model_share_over_1_ulp": float((far > 1).mean()) if far.size else 0.0,
        "corr_max_abs": corr_max,
    }


def _ulps(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """How many float32 values apart ``x`` and ``y`` are (0: equal)."""
    ix = x.view(np.int32).astype(np.int64)
    iy = y.view(np.int32).astype(np.int64)
    ox = np.where(ix < 0, -(ix & 0x7FFFFFFF), ix)
    oy = np.where(iy < 0, -(iy & 0x7FFFFFFF), iy)
    return np.abs(ox - oy)


# ------------------------------------------------------------------------------ report
def _gbs(x: float) -> str:
    return f"{x / 1e9:.2f} GB/s"


def write_report(res: dict[str, Any], out: Path) -> None:
    lines = [f"# cmd-pipeline bench ({'quick' if res['options']['quick'] else 'full'})", "",
             f"{res['machine']}; cmd-pipeline {res['version']}; {res['date']}; runtime {res['runtime']}", "",
             "## Hardware limits (same run)", "",
             f"- memory copy: {_gbs(res['limits']['memcpy'])}"]
    tp = res.get("throughput")
    if tp:
        lines += [f"- sequential read of the store's files: {_gbs(tp['ops']['fit']['limit_read'])}; "
                  f"of the checkpoint files: {_gbs(tp['ops']['ingest']['limit_read'])}"]
        if "write" in res["limits"]:
            lines.append(f"- sequential write of fresh files (write + rename, 8 MiB each): {_gbs(res['limits']['write'])}")
        lines.append("")
        lines += [f"## Throughput (N = {tp['n']:,}, T = {tp['epochs']}, {tp['n'] * tp['epochs'] * 4 / 1e9:.1f} GB)", "",
              "| operation | time | throughput | / sequential read | / fresh-file write | / memory copy | peak RSS |",
              "|---|---|---|---|---|---|---|"]
        for k, r in tp["ops"].items():
            w = f"{r['of_write']:.2f}" if "of_write" in r else "-"
            lines.append(f"| {k} | {r['seconds']:.2f} s | {_gbs(r['throughput'])} | {r['of_read']:.2f} | {w} | "
                         f"{r['of_memcpy']:.3f} | {r['peak_rss'] / 1e9:.2f} GB |")
    g = res.get("growth")
    if g:
        lines += ["", "## Growth of the fit time", "",
              f"time ~ N^{g['exponent_n']:.2f} (T = {g['n'][0]['epochs']}); "
              f"~ T^{g['exponent_t']:.2f} (N = {g['t'][0]['n']:,}); ~ M^{g['exponent_m']:.2f} (N = {g['m'][0]['n']:,})", "",
              "| N | T | M | time | peak RSS |", "|---|---|---|---|---|"]
        for p in g["n"] + g["t"]:
            lines.append(f"| {p['n']:,} | {p['epochs']} | 10 | {p['seconds']:.2f} s | {p['peak_rss'] / 1e9:.2f} GB |")
        for p in g["m"]:
            lines.append(f"| {p['n']:,} | {p['epochs']} | {p['modes']} | {p['seconds']:.2f} s | {p['peak_rss'] / 1e9:.2f} GB |")
    if res.get("beyond_ram"):
        b = res["beyond_ram"]
        lines += ["", f"## Beyond RAM: N = {b['n']:,}, T = {b['epochs']} ({b['bytes'] / 1e9:.1f} GB; RAM {b['ram_bytes'] / 1e9:.1f} GB)", "",
                  "| operation | time | throughput | peak RSS |", "|---|---|---|---|",
                  f"| ingest | {b['ingest']['seconds']:.1f} s | {_gbs(b['ingest']['throughput'])} | {b['ingest']['peak_rss'] / 1e9:.2f} GB |",
                  f"| fit | {b['fit']['seconds']:.1f} s | {_gbs(b['fit']['throughput'])} | {b['fit']['peak_rss'] / 1e9:.2f} GB |"]
    bl = res.get("baselines")
    if bl:
        for label in ("synthetic", "digits CNN"):
            d = bl[label]
            lines += ["", f"## Baselines on the {label} trajectory (N = {d['n']:,}, T = {d['epochs']})", "",
                      "| method | M or r | relative error | stored MB | time | peak RSS |", "|---|---|---|---|---|---|"]
            for p in d["points"]:
                rank = p.get("rank", p.get("n_modes"))
                lines.append(f"| {p['method']} | {rank} | {p['relative_error']:.3g} | {p['stored_bytes'] / 1e6:.2f} | "
                             f"{p['seconds']:.2f} s | {p['peak_rss'] / 1e9:.2f} GB |")
        im = bl["in_memory"]
        lines += ["", f"In-memory research algorithm on the synthetic store: {im['seconds']:.2f} s, peak RSS "
                  f"{im['peak_rss_GB']:.2f} GB ({im['bytes_per_parameter']:.0f} B per parameter): it would run out of "
                  f"this machine's memory at about N = {im['out_of_memory_n_extrapolated']:.3g} (extrapolated)."]
    nm = res.get("numerics")
    if nm:
        lines += ["", f"## Numerics at scale ({nm['checked']:,} of {nm['rows']:,} sampled rows)", "",
                  f"- a: max relative difference {nm['a_max_rel']:.2e}",
                  f"- b: max difference relative to the weight's scale {nm['b_max_rel_to_weight_scale']:.2e}",
                  f"- the stored model against the float64 fit, both rounded to float32: at most "
                  f"{nm['model_max_ulps']} ulp(s) apart; {nm['model_share_over_1_ulp']:.2e} of the values more "
                  f"than 1 ulp",
                  "- corr: " + ("not stored (fit without diagnostics)" if nm["corr_max_abs"] is None
                                else f"max absolute difference {nm['corr_max_abs']:.2e}")]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def plots(res: dict[str, Any], out: Path) -> list[str]:
    from matplotlib.figure import Figure

    files: list[str] = []
    g = res.get("growth")
    if g:
        fig = Figure(figsize=(12, 3.6))
        axes = fig.subplots(1, 3)
        for ax, key, x, label in ((axes[0], "n", "n", "N parameters"), (axes[1], "t", "epochs", "T epochs"),
                                  (axes[2], "m", "modes", "M modes")):
            xs = [p[x] for p in g[key]]
            ys = [p["seconds"] for p in g[key]]
            ax.loglog(xs, ys, "o-", label=f"fit, exponent {g[f'exponent_{key}']:.2f}")
            ax.set_xlabel(label)
            ax.set_ylabel("seconds")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "growth.png", dpi=110)
        files.append("growth.png")
    bl = res.get("baselines")
    if bl:
        fig = Figure(figsize=(11, 4))
        axes = fig.subplots(1, 2)
        for ax, label in zip(axes, ("synthetic", "digits CNN"), strict=True):
            for method, marker in (("CMD", "o-"), ("POD", "s-"), ("DMD", "^-")):
                pts = [p for p in bl[label]["points"] if p["method"] == method]
                if pts:
                    ax.loglog([p["stored_bytes"] for p in pts], [max(p["relative_error"], 1e-12) for p in pts],
                              marker, label=method)
            ax.set_title(f"{label} (N={bl[label]['n']:,}, T={bl[label]['epochs']})")
            ax.set_xlabel("stored bytes")
            ax.set_ylabel("relative error ||W - Ŵ|| / ||W||")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "pareto.png", dpi=110)
        files.append("pareto.png")
    return files


def run_bench(options: BenchOptions) -> dict[str, Any]:
    """Run the suite; returns the results (also written to ``options.out``)."""
    import datetime as _dt

    from pipeline._version import __version__

    o = options.resolved()
    assert o.workdir is not None
    o.out.mkdir(parents=True, exist_ok=True)
    o.workdir.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {
        "version": __version__,
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "runtime": o.runtime.address or o.runtime.mode,
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in o.__dict__.items() if k != "runtime"},
    }
    try:
        with runner(o.runtime) as rt, rt.quiet():
            _say("hardware limits")
            res["limits"] = {"memcpy": memcpy_bandwidth()}
            main_store = None
            if "throughput" in o.sections or "numerics" in o.sections or "baselines" in o.sections:
                _say("throughput: ingest, fit, reconstruct")
                res["throughput"] = throughput(o, rt, res["limits"])
                main_store = res["throughput"]["store"]
            if "numerics" in o.sections and main_store:
                _say("numerics at scale")
                res["numerics"] = numerics(main_store, "m10")
            if "growth" in o.sections:
                _say("growth")
                res["growth"] = growth(o, rt)
            if o.beyond_ram and "beyond-ram" in o.sections:
                _say("beyond RAM")
                res["beyond_ram"] = beyond_ram(o, rt)
            if "baselines" in o.sections and main_store:
                _say("baselines")
                res["baselines"] = baselines(o, rt, main_store)
    finally:
        if not o.keep:
            shutil.rmtree(o.workdir, ignore_errors=True)
    (o.out / "results.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    res["plots"] = plots(res, o.out)
    write_report(res, o.out)
    return res
