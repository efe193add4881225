"""Online mirror descent and online gradient descent: a known conjugate pair (seed 003's check).

Problem: non-negative least squares, ``f(x) = 1/2 ||A x - y||^2`` over ``x >= 0``, seen one row
of A at a time (online). Two optimisers:

- **OGD on a reparametrisation**: ``x = u * u`` and plain gradient steps on ``u``:
  ``u <- u - eta * 2 u * grad_x f(u * u)``;
- **OMD (exponentiated gradient)** on ``x`` with the potential ``psi(x) = 1/4 sum x log x - x``:
  ``x <- x * exp(-4 eta * grad_x f(x))``.

In continuous time both give ``dx/dt = -4 x * grad f(x)`` (Gunasekar et al. 2021, "mirrorless
mirror descent"). So OGD's parameters ``u`` and OMD's parameters ``x`` are related by the
diffeomorphism ``x = u^2`` of the positive orthant: the two runs are topologically conjugate,
and their Koopman spectra should match (Redman et al. 2024 use exactly this check). A third
run, OGD on ``x`` itself (no reparametrisation, projected to ``x >= 0``), follows other dynamics.

Each run is recorded as safetensors checkpoints (one per epoch = one pass over the rows), so
the whole pipeline (ingest, fit, compare) runs on it.

What it shows here (``tests/unit/test_omd_ogd.py``): OMD's x stays within 3e-4 of OGD's u^2, and
the Koopman spectra from the top principal components put the conjugate pair at about a sixth
of the distance of either to projected OGD on x. That distance is small, but not zero: DMD on a
few linear observables approximates the Koopman spectrum differently for ``u`` and ``u^2``.
From the CMD references (single parameters), the conjugate pair is not clearly closer.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

__all__ = ["problem", "record_runs"]


def problem(n: int = 64, m: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A, y and the starting point (positive) of a non-negative least-squares problem."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((m, n)) / np.sqrt(n)
    x_true = np.abs(rng.standard_normal(n)) * (rng.random(n) < 0.5)
    y = a @ x_true + 0.01 * rng.standard_normal(m)
    x0 = np.full(n, 0.5)
    return a, y, x0


def _grad(a_row: np.ndarray, y_i: float, x: np.ndarray) -> np.ndarray:
    return a_row * (a_row @ x - y_i)


def trajectories(epochs: int = 120, eta: float = 0.003, seed: int = 0, n: int = 64, m: int = 256) -> dict[str, np.ndarray]:
    """Parameters after every epoch: (epochs + 1, n) for "ogd_u", "omd_x" and "ogd_x"."""
    a, y, x0 = problem(n, m, seed)
    rng = np.random.default_rng(seed + 1)
    order = [rng.permutation(m) for _ in range(epochs)]  # the same sample order for all runs
    u = np.sqrt(x0)
    x_md = x0.copy()
    x_gd = x0.copy()
    out = {"ogd_u": [u.copy()], "omd_x": [x_md.copy()], "ogd_x": [x_gd.copy()]}
    for e in range(epochs):
        for i in order[e]:
            u = u - eta * 2 * u * _grad(a[i], y[i], u * u)
            x_md = x_md * np.exp(-4 * eta * _grad(a[i], y[i], x_md))
            x_gd = np.maximum(x_gd - eta * _grad(a[i], y[i], x_gd), 0.0)
        out["ogd_u"].append(u.copy())
        out["omd_x"].append(x_md.copy())
        out["ogd_x"].append(x_gd.copy())
    return {k: np.stack(v) for k, v in out.items()}


def record_runs(root: Path, **kw: object) -> dict[str, Path]:
    """Write each run as one safetensors checkpoint per epoch; returns the run folders."""
    from safetensors.numpy import save_file

    dirs = {}
    for name, traj in trajectories(**kw).items():  # type: ignore[arg-type]
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for e, w in enumerate(traj):
            save_file({"params": w.astype(np.float32)}, str(d / f"epoch_{e:04d}.safetensors"))
        dirs[name] = d
    return dirs


def main(argv: list[str] | None = None) -> int:
    import pipeline
    from pipeline.ops.compare import compare

    ap = argparse.ArgumentParser(prog="python -m workflows.omd_ogd", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/omd_ogd"))
    ap.add_argument("--epochs", type=int, default=120)
    ap.add_argument("--eta", type=float, default=0.003)
    ap.add_argument("--modes", type=int, default=4)
    ap.add_argument("--delays", type=int, default=2)
    a = ap.parse_args(argv)
    dirs = record_runs(a.out, epochs=a.epochs, eta=a.eta)
    sync = pipeline.RuntimeOptions(mode="sync", progress=False)
    stores = []
    for name, d in dirs.items():
        store = str(a.out / f"{name}.zarr")
        pipeline.ingest([str(d)], store, runtime=sync)
        pipeline.fit(store, "m", modes=a.modes, samples=64, runtime=sync)
        stores.append((store, "m"))
    for source in ("refs", "pcs"):
        print(compare(stores, source=source, d=a.modes, delays=a.delays, shuffles=50, runtime=sync).table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
