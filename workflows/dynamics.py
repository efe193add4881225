"""Are the training dynamics of narrow and wide networks equivalent? (seed 003's check)

Records digits MLPs of two widths over several seeds, ingests each run into its own store,
fits CMD, and runs ``compare`` on all of them: the Koopman spectra from the CMD references and
from the trajectory's principal components, the distance matrix, the time-shuffle control
per pair, and the permutation test between the two widths. Writes ``OUT/results.json`` and
``OUT/table.md``::

    python -m workflows.dynamics --out runs/dynamics --widths 8,256 --seeds 0,1,2,3
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import pipeline
from pipeline.ops.compare import compare
from pipeline.runtime import RuntimeOptions, runner


def record(out: Path, width: int, seed: int, epochs: int, modes: int) -> str:
    from workflows.digits import TrainConfig, train_and_record

    run_dir = out / f"w{width}-s{seed}" / "run"
    if not (run_dir / "run.json").exists():
        train_and_record(run_dir, TrainConfig(model="mlp", hidden=width, epochs=epochs, seed=seed), overwrite=True)
    return str(run_dir)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m workflows.dynamics", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/dynamics"))
    ap.add_argument("--widths", default="8,256")
    ap.add_argument("--seeds", default="0,1,2,3")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--modes", type=int, default=5)
    ap.add_argument("--delays", type=int, default=2)
    ap.add_argument("--shuffles", type=int, default=50)
    a = ap.parse_args(argv)
    widths = [int(w) for w in a.widths.split(",")]
    seeds = [int(s) for s in a.seeds.split(",")]
    t0 = time.perf_counter()
    a.out.mkdir(parents=True, exist_ok=True)
    runs_dirs = {(w, s): record(a.out, w, s, a.epochs, a.modes) for w in widths for s in seeds}
    stores = []
    labels = []
    with runner(RuntimeOptions(progress=False)) as rt:
        for (w, s), run_dir in runs_dirs.items():
            store = str(a.out / f"w{w}-s{s}" / "store.zarr")
            pipeline.ingest([run_dir], store, run=rt)
            pipeline.fit(store, "m", modes=a.modes, samples=1000, run=rt)
            stores.append((store, "m"))
            labels.append(f"w{w}")
        results: dict[str, Any] = {"widths": widths, "seeds": seeds, "epochs": a.epochs, "modes": a.modes,
                                   "delays": a.delays, "runs": [f"w{w}-s{s}" for w, s in runs_dirs]}
        for source in ("refs", "pcs"):
            res = compare(stores, source=source, d=a.modes, delays=a.delays, shuffles=a.shuffles,
                          groups=labels, run=rt)
            d = np.asarray(res.distances)
            grp = np.asarray(labels)
            same = (grp[:, None] == grp[None, :]) & ~np.eye(len(grp), dtype=bool)
            results[source] = {
                "distances": res.distances,
                "pairs": res.pairs,
                "p_apart": res.p_apart,
                "within_mean": float(d[same].mean()),
                "between_mean": float(d[grp[:, None] != grp[None, :]].mean()),
                "within_by_group": {g: float(d[(grp[:, None] == g) & (grp[None, :] == g) & ~np.eye(len(grp), dtype=bool)].mean()) for g in sorted(set(labels))},
            }
            print(res.table(), flush=True)
    lines = [f"digits MLPs, widths {widths}, seeds {seeds}, {a.epochs} epochs, M = {a.modes}, "
             f"{a.delays} delays; 1-Wasserstein distances between Koopman spectra", "",
             "| coordinates | mean distance within a width | " + " | ".join(f"within w{w}" for w in widths)
             + " | mean distance between widths | permutation p (apart) |",
             "|---|---|" + "---|" * len(widths) + "---|---|"]
    for source in ("refs", "pcs"):
        r = results[source]
        lines.append(f"| {source} | {r['within_mean']:.4f} | " + " | ".join(f"{r['within_by_group'][f'w{w}']:.4f}" for w in widths)
                     + f" | {r['between_mean']:.4f} | {r['p_apart']:.4f} |")
    table = "\n".join(lines)
    (a.out / "table.md").write_text(table + "\n")
    results["seconds"] = time.perf_counter() - t0
    (a.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print()
    print(table)
    print(f"\n({results['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
