"""The main job (``make demo``): a real training run, recorded, decomposed, evaluated, reported.

1. trains the SimpleNet-like CNN on scikit-learn's digits (real 8x8 images) with SGD and
   records a checkpoint after every epoch;
2. ingests the run into a Zarr trajectory store on the embedded LocalCluster (the dashboard
   link and progress bars are printed);
3. exports the last epoch back to a state_dict, loads it with ``strict=True`` and checks that
   its test accuracy equals the recorded one;
4. fits CMD (M modes from K samples) on the LocalCluster;
5. evaluates GD against CMD at every epoch, and sweeps M = 1, 2, 5, 10, 20 over three
   sampling seeds;
6. writes the figures and the self-contained HTML report;

and ends with the report's path and the GD vs CMD table. About 2-3 minutes on 2 cores.
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


def _step(i: int, n: int, msg: str) -> None:
    print(f"[{i}/{n}] {msg}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m workflows.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--out", default="demo-output", help="output folder (recreated)")
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=None, help="LocalCluster workers [one per core]")
    ap.add_argument("--modes", type=int, default=10)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--sweep-modes", default="1,2,5,10,20")
    ap.add_argument("--sweep-seeds", default="0,1,2")
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
    n = 6

    config = TrainConfig(model="cnn", epochs=a.epochs, seed=a.seed, fmt="pt", batch_size=64)
    _step(1, n, f"training the digits CNN for {a.epochs} epochs (SGD, seed {a.seed}), one checkpoint per epoch")
    t = time.perf_counter()

    def tick(rec: dict[str, object]) -> None:
        e = int(rec["epoch"])  # type: ignore[call-overload]
        if e % 10 == 0 or e == a.epochs:
            print(f"      epoch {e:>4}  test accuracy {rec['test_accuracy']:.4f}", flush=True)

    run = train_and_record(run_dir, config, on_epoch=tick)
    last = run["epochs"][-1]
    print(f"      {run['n_params']:,} parameters, {len(run['checkpoints'])} checkpoints in {time.perf_counter() - t:.1f} s")

    opts = pipeline.RuntimeOptions(workers=a.workers)
    with runner(opts) as rt:
        _step(2, n, "ingesting the run into the trajectory store")
        result = pipeline.ingest([run_dir], store, run=rt)
        print("      " + result.summary())
        print("      " + format_info(pipeline.info(store)).replace("\n", "\n      "))

        _step(3, n, "exporting the last epoch and loading it with strict=True")
        exported = pipeline.export(store, last["epoch"], out / f"epoch_{last['epoch']}.safetensors")
        model = build_model(config)
        model.load_state_dict(load_file(str(exported)), strict=True)
        _, _, x_test, y_test = load_digits_split(config.seed)
        with torch.no_grad():
            _, acc = evaluate(model, x_test, y_test)
        ok = acc == last["test_accuracy"]
        print(
            f"      exported weights: test accuracy {acc:.4f} (recorded {last['test_accuracy']:.4f}) "
            f"-> {'OK' if ok else 'MISMATCH'}"
        )

        _step(4, n, f"CMD: M={a.modes} modes from K={a.samples} samples, one pass over all parameters")
        fitted = pipeline.fit(store, "demo", modes=a.modes, samples=a.samples, seed=a.seed, run=rt)
        print("      " + fitted.summary_text().replace("\n", "\n      "))

        _step(5, n, f"evaluating GD and CMD at every epoch; sweep M={a.sweep_modes} over seeds {a.sweep_seeds}")
        ev = pipeline.evaluate(
            store,
            "demo",
            sweep_modes=[int(m) for m in a.sweep_modes.split(",") if m],
            sweep_seeds=[int(s) for s in a.sweep_seeds.split(",") if s],
            run=rt,
            figures=False,  # step 6's report draws them
        )

    _step(6, n, "writing the figures and the HTML report")
    rep = pipeline.report(store, "demo", out=out / "report.html")
    print(f"      figures in {Path(next(iter(rep.figures.values()))).parent}")

    e = ev.evaluation
    rows = e["epochs"]
    picks = rows[:: max(1, len(rows) // 10)]
    if picks[-1] is not rows[-1]:
        picks.append(rows[-1])
    print()
    print(f"GD vs CMD (M={e['study']['n_modes']}, K={e['study']['samples']}) on the digits test set:")
    print("  epoch   GD acc   CMD acc   GD loss   CMD loss")
    for r in picks:
        print(
            f"  {r['epoch']:>5}   {r['gd_accuracy']:.4f}   {r['cmd_accuracy']:.4f}    "
            f"{r['gd_loss']:.4f}    {r['cmd_loss']:.4f}"
        )
    f, b = e["final"], e["best"]
    print(
        f"  final: GD {f['gd_accuracy']:.4f}, CMD {f['cmd_accuracy']:.4f}; "
        f"best: GD {b['gd_accuracy']:.4f} (epoch {b['gd_epoch']}), CMD {b['cmd_accuracy']:.4f} (epoch {b['cmd_epoch']}); "
        f"weight MSE over the window {e['mse']:.3g}; error relative to the dynamics "
        f"{e['dynamics_error']:.3g} (to ‖W‖: {e['relative_error']:.3g})"
    )
    sw = e.get("sweep")
    if sw:
        print(f"  accuracy at epoch {sw['epochs'][-1]} against M (mean ± std over seeds {sw['seeds']}):")
        for r in sw["by_modes"]:
            print(
                f"    M={r['modes_requested']:<3} CMD {r['accuracy_mean']:.4f} ± {r['accuracy_std']:.4f}   "
                f"weight MSE at epoch {sw['epochs'][-1]} {r['mse_epoch_mean']:.3g}, "
                f"over the window {r['mse_mean']:.3g}"
            )
    print()
    print(f"report: {rep.copy}")
    print(f"done in {time.perf_counter() - t0:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
