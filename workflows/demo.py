"""The main job (``make demo``): a real training run, recorded, ingested on a LocalCluster.

1. trains the SimpleNet-like CNN on scikit-learn's digits (real 8x8 images) and records a
   checkpoint after every epoch;
2. ingests the run into a Zarr trajectory store on the embedded LocalCluster (dashboard link
   and progress printed);
3. prints what the store holds;
4. exports the last epoch back to a state_dict, loads it with ``strict=True`` into a fresh
   model and checks that its test accuracy equals the recorded one;
5. fits CMD (M modes, K samples) on the LocalCluster, reconstructs the trajectory, and
   compares the test accuracy of the GD weights with the CMD weights at a few epochs.

The full evaluation over M and seeds, figures and the HTML report are added with the
evaluation stage.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import pipeline
from pipeline.ops.info import format_info
from pipeline.runtime import runner


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo-output", help="output folder (recreated)")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--modes", type=int, default=5)
    ap.add_argument("--samples", type=int, default=1000)
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

    print(f"[1/5] training the digits CNN for {a.epochs} epochs (seed {a.seed}), one checkpoint per epoch")
    config = TrainConfig(model="cnn", epochs=a.epochs, seed=a.seed, fmt="pt", batch_size=32)
    run = train_and_record(run_dir, config)
    last = run["epochs"][-1]
    print(f"      {run['n_params']:,} parameters; final test accuracy {last['test_accuracy']:.4f}")

    print("[2/5] ingesting the run into the trajectory store on a LocalCluster")
    result = pipeline.ingest([run_dir], store, runtime=pipeline.RuntimeOptions(workers=a.workers))
    print("      " + result.summary())

    print("[3/5] the store")
    print("      " + format_info(pipeline.info(store)).replace("\n", "\n      "))

    print("[4/5] exporting the last epoch and loading it with strict=True")
    exported = pipeline.export(store, last["epoch"], out / f"epoch_{last['epoch']}.safetensors")
    model = build_model(config)
    model.load_state_dict(load_file(str(exported)), strict=True)
    _, _, x_test, y_test = load_digits_split(config.seed)
    with torch.no_grad():
        _, acc = evaluate(model, x_test, y_test)
    ok = acc == last["test_accuracy"]
    print(f"      exported weights: test accuracy {acc:.4f} (recorded {last['test_accuracy']:.4f}) -> {'OK' if ok else 'MISMATCH'}")
    print(f"[5/5] CMD: fit M={a.modes} modes from K={a.samples} samples, reconstruct, evaluate")
    with runner(pipeline.RuntimeOptions(workers=a.workers)) as rt:
        fitted = pipeline.fit(store, "demo", modes=a.modes, samples=a.samples, seed=a.seed, run=rt)
        print("      " + fitted.summary_text().replace("\n", "\n      "))
        print("      " + pipeline.reconstruct(store, "demo", run=rt).summary())
    print("      epoch   GD acc   CMD acc   GD loss   CMD loss")
    picks = run["epochs"][:: max(1, len(run["epochs"]) // 8)]
    if picks[-1]["epoch"] != last["epoch"]:
        picks.append(last)
    for rec in picks:
        e = rec["epoch"]
        path = pipeline.export(store, e, out / f"cmd_epoch_{e}.safetensors", analysis="demo")
        model.load_state_dict(load_file(str(path)), strict=True)
        with torch.no_grad():
            loss, acc = evaluate(model, x_test, y_test)
        print(f"      {e:>5}   {rec['test_accuracy']:.4f}   {acc:.4f}    {rec['test_loss']:.4f}    {loss:.4f}")
    print(f"done in {time.perf_counter() - t0:.1f} s; store at {store}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
