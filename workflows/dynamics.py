"""Are the training dynamics of narrow and wide networks (or of two optimisers) equivalent?

Records digits MLPs of two widths (and, as a second experiment, trained with and without
momentum) over several seeds, ingests each run into its own store,
fits CMD, and runs ``compare`` on all of them: the Koopman spectra from the CMD references and
from the trajectory's principal components, the distance matrix, the time-shuffle control
per pair, and the permutation test between the two widths. Writes ``OUT/results.json`` and
``OUT/table.md``::

    python -m workflows.dynamics --out runs/dynamics --seeds 0,1,2,3
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


def record(out: Path, label: str, seed: int, epochs: int, **train: Any) -> str:
    from workflows.digits import TrainConfig, train_and_record

    run_dir = out / f"{label}-s{seed}" / "run"
    if not (run_dir / "run.json").exists():
        train_and_record(run_dir, TrainConfig(model="mlp", epochs=epochs, seed=seed, **train), overwrite=True)
    return str(run_dir)


#: experiment -> {group label: TrainConfig fields}
EXPERIMENTS: dict[str, dict[str, dict[str, Any]]] = {
    "widths": {"w8": {"hidden": 8}, "w256": {"hidden": 256}},
    "optimisers": {"sgd-momentum": {"hidden": 64, "momentum": 0.9, "lr": 0.05},
                   "sgd-plain": {"hidden": 64, "momentum": 0.0, "lr": 0.2}},
}


def run_experiment(out: Path, groups: dict[str, dict[str, Any]], seeds: list[int], epochs: int, modes: int,
                   delays: int, shuffles: int, rt: Any) -> dict[str, Any]:
    stores, labels = [], []
    for label, train in groups.items():
        for s in seeds:
            run_dir = record(out, label, s, epochs, **train)
            store = str(out / f"{label}-s{s}" / "store.zarr")
            pipeline.ingest([run_dir], store, run=rt)
            pipeline.fit(store, "m", modes=modes, samples=1000, run=rt)
            stores.append((store, "m"))
            labels.append(label)
    results: dict[str, Any] = {"groups": list(groups), "runs": [f"{lab}-s{s}" for lab in groups for s in seeds]}
    for source in ("refs", "pcs"):
        res = compare(stores, source=source, d=modes, delays=delays, shuffles=shuffles, groups=labels, run=rt)
        d = np.asarray(res.distances)
        grp = np.asarray(labels)
        off = ~np.eye(len(grp), dtype=bool)
        results[source] = {
            "distances": res.distances,
            "pairs": res.pairs,
            "p_apart": res.p_apart,
            "within": {g: float(d[(grp[:, None] == g) & (grp[None, :] == g) & off].mean()) for g in groups},
            "between_mean": float(d[grp[:, None] != grp[None, :]].mean()),
        }
        print(res.table(), flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m workflows.dynamics", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/dynamics"))
    ap.add_argument("--experiments", default="widths,optimisers")
    ap.add_argument("--seeds", default="0,1,2,3")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--modes", type=int, default=5)
    ap.add_argument("--delays", type=int, default=2)
    ap.add_argument("--shuffles", type=int, default=50)
    a = ap.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",")]
    t0 = time.perf_counter()
    a.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"seeds": seeds, "epochs": a.epochs, "modes": a.modes, "delays": a.delays}
    with runner(RuntimeOptions(progress=False)) as rt:
        for exp in a.experiments.split(","):
            results[exp] = run_experiment(a.out, EXPERIMENTS[exp], seeds, a.epochs, a.modes, a.delays,
                                          a.shuffles, rt)
    lines = [f"digits MLPs, seeds {seeds}, {a.epochs} epochs, M = {a.modes}, {a.delays} delays; "
             "1-Wasserstein distances between Koopman spectra (mean over pairs)", "",
             "| experiment | coordinates | within group A | within group B | between groups | permutation p (apart) |",
             "|---|---|---|---|---|---|"]
    for exp in a.experiments.split(","):
        g = list(EXPERIMENTS[exp])
        for source in ("refs", "pcs"):
            r = results[exp][source]
            lines.append(f"| {g[0]} vs {g[1]} | {source} | {r['within'][g[0]]:.4f} | {r['within'][g[1]]:.4f} | "
                         f"{r['between_mean']:.4f} | {r['p_apart']:.4f} |")
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
