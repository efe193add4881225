"""Study size and precision: the bytes per parameter of a study against its trajectory, and its
stored float32 model against the float64 fit.

For one store (a synthetic planted-mode trajectory written through the store API, default
N = 2e6, T = 6, or ``--store S`` for an existing one), it fits a default study and one with
``diagnostics=True`` and reports:

1. **bytes per parameter**, from the files on disk: the per-row arrays (``mode``, ``a``,
   ``level``, ``anchor``, ``flags``; with diagnostics ``corr`` and ``residual``), the whole
   study directory (the references, indices, block statistics and metadata too), and the
   trajectory's chunks over the study's window;
2. **precision**: for every row of the store (or ``--rows`` of them, drawn with a seed), the
   stored model ``level + a (r(t) - r(anchor))`` rounded to float32 against the float64
   least-squares fit (ALGORITHM.md step 5, written here in numpy from the study's
   references and modes) rounded to float32, in float32 ulps: the share of values more than 1
   ulp apart and the largest distance, for rows whose fitted values keep their sign and for
   rows that cross zero; and the same for the intercept form ``a r + b`` with a and b rounded
   to float32 (what a naive float32 study would store).

Usage::

    .venv/bin/python benchmarks/bench_study_size.py --n 2e6 --epochs 6 --modes 10
    .venv/bin/python benchmarks/bench_study_size.py --store runs/digits.zarr --rows 0
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

import pipeline
from pipeline.bench.common import synthetic_store
from pipeline.kernels.reconstruct import reconstruct_block
from pipeline.plan import blocks
from pipeline.runtime import RuntimeOptions
from pipeline.store.analysis import AnalysisGroup


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _ulps(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """How many float32 values apart ``x`` and ``y`` (float32) are."""
    ix, iy = (v.view(np.int32).astype(np.int64) for v in (x, y))
    ox = np.where(ix < 0, -(ix & 0x7FFFFFFF), ix)
    oy = np.where(iy < 0, -(iy & 0x7FFFFFFF), iy)
    return np.abs(ox - oy)


def sizes(store: Path, name: str) -> dict[str, Any]:
    """Bytes per parameter of the study ``name`` and of the trajectory, from the files."""
    st = pipeline.open_store(str(store))
    meta = st.require_meta()
    ag = AnalysisGroup(st.url, name)
    n = meta.n_rows
    study = store / "analyses" / name
    per_row = {}
    for k in ag.layout().per_row(int(ag.attrs()["n_modes"]), int(ag.array("epochs").shape[0])):
        per_row[k] = _dir_bytes(study / k)
    n_window = int(ag.array("epochs").shape[0])
    traj = _dir_bytes(store / "trajectory") * n_window / meta.n_epochs
    return {
        "n": n,
        "window": n_window,
        "per_row_arrays": {k: v / n for k, v in per_row.items()},
        "per_row_bytes_per_parameter": sum(per_row.values()) / n,
        "study_bytes_per_parameter": _dir_bytes(study) / n,
        "trajectory_bytes_per_parameter": traj / n,
    }


def precision(store: Path, name: str, rows: int, seed: int = 0) -> dict[str, Any]:
    """The stored model against the float64 fit, both rounded to float32 (see the docstring)."""
    st = pipeline.open_store(str(store))
    meta = st.require_meta()
    ag = AnalysisGroup(st.url, name)
    layout = ag.layout()
    refs = np.asarray(ag.array("refs")[...], dtype=np.float64)
    epochs = [int(e) for e in np.asarray(ag.array("epochs")[...])]
    cols = np.asarray([meta.column_of(e) for e in epochs], dtype=np.int64)
    rc = refs - refs.mean(axis=1, keepdims=True)
    ssr = (rc * rc).sum(axis=1)
    if rows and rows < meta.n_rows:
        pick = np.sort(np.random.default_rng(seed).choice(meta.n_rows, rows, replace=False))
        chunks = [pick[k : k + 65536] for k in range(0, pick.size, 65536)]
    else:
        chunks = [np.arange(r0, r1) for r0, r1 in blocks(meta.n_rows, 1 << 18)]
    grid = st.chunk_grid()
    out = {"anchored": {"keep": [], "cross": []}, "intercept_float32": {"keep": [], "cross": []}}
    counted = 0
    for idx in chunks:
        w, _ = grid.read_scattered(idx, cols)
        w = w.astype(np.float64)
        flags = np.asarray(ag.array("flags").oindex[idx])
        model = [np.asarray(ag.array(k).oindex[idx]) for k in layout.model]
        mode = model[0].astype(np.int64)
        ok = (flags & 2) == 0  # finite rows (constant and reference rows included)
        wc = w - w.mean(axis=1, keepdims=True)
        a = np.where((flags & 1) != 0, 0.0, (wc * rc[mode]).sum(axis=1) / ssr[mode])
        b = w.mean(axis=1) - a * refs.mean(axis=1)[mode]
        ref = (flags & 4) != 0
        a[ref], b[ref] = 1.0, 0.0
        fit64 = a[:, None] * refs[mode] + b[:, None]
        want = fit64.astype(np.float32)
        stored = reconstruct_block(model[0], model[1], model[2], refs, slice(None), *model[3:])
        naive = a.astype(np.float32).astype(np.float64)[:, None] * refs[mode] + b.astype(
            np.float32
        ).astype(np.float64)[:, None]
        cross = (fit64.min(axis=1) < 0) & (fit64.max(axis=1) > 0)
        for key, got in (("anchored", stored), ("intercept_float32", naive)):
            far = _ulps(got.astype(np.float32), want)
            out[key]["keep"].append(far[ok & ~cross])
            out[key]["cross"].append(far[ok & cross])
        counted += int(ok.sum())
    res: dict[str, Any] = {"rows": counted}
    for key, parts in out.items():
        entry = {}
        for side, arrs in parts.items():
            far = np.concatenate(arrs) if arrs else np.zeros((0, len(cols)), dtype=np.int64)
            entry[side] = {
                "rows": int(far.shape[0]),
                "values": int(far.size),
                "share_over_1_ulp": float((far > 1).mean()) if far.size else 0.0,
                "max_ulps": int(far.max()) if far.size else 0,
            }
        allv = np.concatenate([np.ravel(a) for a in parts["keep"] + parts["cross"]])
        entry["all"] = {
            "values": int(allv.size),
            "share_over_1_ulp": float((allv > 1).mean()) if allv.size else 0.0,
            "max_ulps": int(allv.max()) if allv.size else 0,
        }
        res[key] = entry
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=float, default=2e6, help="rows of the synthetic store")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--modes", type=int, default=10)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--store", help="an existing store (default: write a synthetic one)")
    ap.add_argument("--dir", default="bench-output/study-size", help="where the synthetic store goes")
    ap.add_argument("--rows", type=int, default=200_000, help="rows checked for precision (0: all)")
    ap.add_argument("--out", default="bench-output/study_size.json")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic store and the studies")
    a = ap.parse_args(argv)
    rt = RuntimeOptions(mode="threads", progress=False)
    if a.store:
        store = Path(a.store)
    else:
        store = Path(os.path.abspath(a.dir)) / "store.zarr"
        shutil.rmtree(store, ignore_errors=True)
        synthetic_store(str(store), int(a.n), a.epochs, a.modes)
    result: dict[str, Any] = {"store": str(store)}
    for name, diag in (("size-default", False), ("size-diagnostics", True)):
        t0 = time.perf_counter()
        pipeline.fit(str(store), name, modes=a.modes, samples=a.samples, diagnostics=diag,
                     force=True, runtime=rt)
        result[name] = {"fit_seconds": time.perf_counter() - t0, **sizes(store, name)}
    result["precision"] = precision(store, "size-default", a.rows)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    d, g = result["size-default"], result["size-diagnostics"]
    print(f"N = {d['n']:,}, window of {d['window']} epochs; bytes per parameter:")
    print(f"  trajectory (window)          {d['trajectory_bytes_per_parameter']:.2f}")
    print(f"  default study, per-row arrays {d['per_row_bytes_per_parameter']:.2f} "
          f"({', '.join(f'{k} {v:.0f}' for k, v in d['per_row_arrays'].items())}); "
          f"whole study {d['study_bytes_per_parameter']:.2f}")
    print(f"  with diagnostics, per-row     {g['per_row_bytes_per_parameter']:.2f}; "
          f"whole study {g['study_bytes_per_parameter']:.2f}")
    p = result["precision"]
    print(f"precision over {p['rows']:,} rows (float32 ulps from the float64 fit):")
    for key in ("anchored", "intercept_float32"):
        e = p[key]
        print(f"  {key:18s} keep sign: {e['keep']['rows']:,} rows, {e['keep']['share_over_1_ulp']:.2e} "
              f"> 1 ulp, max {e['keep']['max_ulps']}; cross zero: {e['cross']['rows']:,} rows, "
              f"{e['cross']['share_over_1_ulp']:.2e} > 1 ulp, max {e['cross']['max_ulps']}; "
              f"all values: {e['all']['share_over_1_ulp']:.2e} > 1 ulp")
    if not a.keep:
        for name in ("size-default", "size-diagnostics"):
            AnalysisGroup(pipeline.open_store(str(store)).url, name).delete()
        if not a.store:
            shutil.rmtree(store, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
