"""The fit on a store where most parameters are frozen, against the same store fully trainable.

Two runs of the same shapes are written as safetensors checkpoints and ingested (so the
per-tensor digests come from ingest, as for a real run): in one, every tensor moves along
planted modes; in the other, the same tensors except a ``--trainable`` share of the rows
never change (a frozen backbone). Both are fitted with the same settings, interleaved,
``--repeat`` times; the medians and their ratio are printed and written as JSON.

    .venv/bin/python benchmarks/bench_frozen.py --n 1e7 --epochs 20 --modes 10

Run it alone (2 vCPUs: anything else running in parallel skews the ratio).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_run(root: Path, n: int, t: int, tensors: int, frozen_share: float, seed: int) -> None:
    """``tensors`` tensors of about n/tensors rows; the first ``frozen_share`` of the rows (whole
    tensors) keep their epoch-0 values."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    sizes = [n // tensors] * tensors
    sizes[-1] += n - sum(sizes)
    frozen_rows = round(frozen_share * n)
    tt = np.linspace(0, 1, t)
    profiles = np.stack([np.exp(-3 * tt), np.sin(3 * tt), tt**2, np.tanh(4 * tt - 2)])
    base = [rng.standard_normal(s).astype(np.float32) * 0.1 for s in sizes]
    amp = [rng.standard_normal(s).astype(np.float32) * 0.05 for s in sizes]
    mode = [rng.integers(len(profiles), size=s) for s in sizes]
    root.mkdir(parents=True, exist_ok=True)
    for e in range(t):
        sd, start = {}, 0
        for k, s in enumerate(sizes):
            if start + s <= frozen_rows:
                sd[f"layers.{k}.weight"] = base[k]
            else:
                sd[f"layers.{k}.weight"] = base[k] + amp[k] * profiles[mode[k], e].astype(np.float32)
            start += s
        save_file(sd, str(root / f"epoch_{e}.safetensors"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=float, default=1e7)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--modes", type=int, default=10)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--tensors", type=int, default=20)
    ap.add_argument("--frozen", type=float, default=0.9, help="share of rows frozen")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None, help="scratch directory (default: a temporary one)")
    ap.add_argument("--out", default="bench-frozen.json")
    args = ap.parse_args(argv)

    import pipeline

    n = int(args.n)
    tmp = Path(args.dir or tempfile.mkdtemp(prefix="bench-frozen-"))
    runtime = pipeline.RuntimeOptions(progress=False)
    stores = {}
    with pipeline.runner(runtime) as run:
        for label, share in (("trainable", 0.0), ("frozen", args.frozen)):
            ckpt = tmp / f"run-{label}"
            write_run(ckpt, n, args.epochs, args.tensors, share, seed=0)
            store = tmp / f"{label}.zarr"
            t0 = time.perf_counter()
            pipeline.ingest([ckpt], store, run=run)
            print(f"{label}: ingest {time.perf_counter() - t0:.1f} s", file=sys.stderr)
            shutil.rmtree(ckpt)
            stores[label] = store
            info = pipeline.info(store)
            print(f"{label}: frozen {info['frozen']['share']:.1%}", file=sys.stderr)
        times: dict[str, list[float]] = {k: [] for k in stores}
        for r in range(args.repeat):
            for label, store in stores.items():
                t0 = time.perf_counter()
                pipeline.fit(
                    store, f"b{r}", modes=args.modes, samples=args.samples, seed=r, run=run
                )
                times[label].append(time.perf_counter() - t0)
                print(f"{label} fit {r}: {times[label][-1]:.2f} s", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {
        "command": "benchmarks/bench_frozen.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "n": n,
        "epochs": args.epochs,
        "modes": args.modes,
        "samples": args.samples,
        "frozen_share": args.frozen,
        "fit_seconds": times,
        "median_seconds": med,
        "frozen_over_trainable": med["frozen"] / med["trainable"],
    }
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps({k: out[k] for k in ("median_seconds", "frozen_over_trainable")}, indent=2))
    if args.dir is None:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
