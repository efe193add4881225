"""Appending one epoch by re-running ingest over the whole run folder, against ingesting the new
checkpoint alone (the floor), in one run.

    .venv/bin/python benchmarks/bench_append.py --n 2.5e7 --epochs 20

A run of ``--epochs`` safetensors checkpoints (float32, ``--n`` parameters each) is written;
all but the last are ingested; then, interleaved ``--repeat`` times on copies of that store,
``ingest(folder)`` (every file given, one new) and ``ingest([last file])``. Prints the medians
and their ratio; the page cache is warm for both (the checkpoints were just written).
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=float, default=2.5e7)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default="bench-append.json")
    args = ap.parse_args(argv)

    from safetensors.numpy import save_file

    import pipeline

    n = int(args.n)
    tmp = Path(tempfile.mkdtemp(prefix="bench-append-"))
    run_dir = tmp / "run"
    run_dir.mkdir()
    rng = np.random.default_rng(0)
    base = rng.standard_normal(n).astype(np.float32)
    for e in range(args.epochs):
        save_file({"w": base + np.float32(0.01 * e)}, str(run_dir / f"epoch_{e}.safetensors"))
    files = sorted(run_dir.glob("*.safetensors"), key=lambda p: int(p.stem.split("_")[1]))
    rt = pipeline.RuntimeOptions(progress=False)
    times: dict[str, list[float]] = {"folder": [], "new file only": []}
    with pipeline.runner(rt) as run:
        seed = tmp / "seed.zarr"
        pipeline.ingest(files[:-1], seed, run=run)
        for _ in range(args.repeat):
            for label, inputs in (("folder", [run_dir]), ("new file only", [files[-1]])):
                store = tmp / "s.zarr"
                shutil.rmtree(store, ignore_errors=True)
                shutil.copytree(seed, store)
                t0 = time.perf_counter()
                res = pipeline.ingest(inputs, store, run=run)
                times[label].append(time.perf_counter() - t0)
                assert res.added == [args.epochs - 1], res.added
                print(f"{label}: {times[label][-1]:.2f} s", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {
        "command": "benchmarks/bench_append.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "n": n,
        "epochs": args.epochs,
        "checkpoint_bytes": files[0].stat().st_size,
        "seconds": times,
        "median_seconds": med,
        "folder_over_new_only": med["folder"] / med["new file only"],
    }
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps({k: out[k] for k in ("median_seconds", "folder_over_new_only")}, indent=2))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
