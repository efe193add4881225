"""The main job (``make demo``): a real training run, recorded, ingested on a LocalCluster.

1. trains the SimpleNet-like CNN on scikit-learn's digits (real 8x8 images) and records a
   checkpoint after every epoch;
2. ingests the run into a Zarr trajectory store on the embedded LocalCluster (dashboard link
   and progress printed);
3. prints what the store holds;
4. exports the last epoch back to a state_dict, loads it with ``strict=True`` into a fresh
   model and checks that its test accuracy equals the recorded one.

The CMD fit, evaluation and report are added to this job as the engine lands.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import pipeline
from pipeline.ops.info import format_info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo-output", help="output folder (recreated)")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args(argv)

    import torch
    from safetensors.torch import load_file

    from workflows.digits import (
        TrainConfig,
        build_model,
        evaluate,
        load_digits_split,
        train_and_record,
    )

    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    run_dir, store = out / "run", out / "store.zarr"
    t0 = time.perf_counter()

    print(f"[1/4] training the digits CNN for {a.epochs} epochs (seed {a.seed}), one checkpoint per epoch")
    config = TrainConfig(model="cnn", epochs=a.epochs, seed=a.seed, fmt="pt", batch_size=32)
    run = train_and_record(run_dir, config)
    last = run["epochs"][-1]
    print(f"      {run['n_params']:,} parameters; final test accuracy {last['test_accuracy']:.4f}")

    print("[2/4] ingesting the run into the trajectory store on a LocalCluster")
    result = pipeline.ingest([run_dir], store, runtime=pipeline.RuntimeOptions(workers=a.workers))
    print("      " + result.summary())

    print("[3/4] the store")
    print("      " + format_info(pipeline.info(store)).replace("\n", "\n      "))

    print("[4/4] exporting the last epoch and loading it with strict=True")
    exported = pipeline.export(store, last["epoch"], out / f"epoch_{last['epoch']}.safetensors")
    model = build_model(config)
    model.load_state_dict(load_file(str(exported)), strict=True)
    _, _, x_test, y_test = load_digits_split(config.seed)
    with torch.no_grad():
        _, acc = evaluate(model, x_test, y_test)
    ok = acc == last["test_accuracy"]
    print(f"      exported weights: test accuracy {acc:.4f} (recorded {last['test_accuracy']:.4f}) -> {'OK' if ok else 'MISMATCH'}")
    print(f"done in {time.perf_counter() - t0:.1f} s; store at {store}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
