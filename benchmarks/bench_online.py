"""Online CMD benchmark: the per-epoch cost of ``OnlineCMD.update`` against a real training
epoch, and its memory against keeping every epoch's checkpoint.

In one run:

1. a real epoch: one epoch of the MiniLM fine-tuning workflow (22.6M parameters, 1,280
   docstrings), timed (``--train-limit`` caps the texts for a quicker run);
2. the same MiniLM model under ``OnlineCMD`` (in memory): ``--warmup`` recorded epochs and then
   ``--epochs`` updates, each timed. The weights are moved between updates by a small random
   step (the update's cost does not depend on how the weights moved);
3. the same with the running sums in a Zarr store (``store=``), on the threaded scheduler.

Memory: the in-process state after the warm-up (two float64 sums and a mode id per parameter)
and the warm-up history (F float32 per parameter, freed after the warm-up) against T float32
checkpoints per parameter. Usage::

    .venv/bin/python benchmarks/bench_online.py --warmup 5 --epochs 5
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

import torch

import pipeline
from pipeline.online import OnlineCMD


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=5, help="updates after the warm-up")
    ap.add_argument("--modes", type=int, default=10)
    ap.add_argument("--train-limit", type=int, default=None, help="cap the texts of the real epoch")
    ap.add_argument("--out", default="bench-output/online.json")
    a = ap.parse_args(argv)

    from workflows.minilm import TrainConfig, build_model, train_and_record

    tmp = Path(tempfile.mkdtemp(prefix="bench-online-"))
    try:
        cfg = TrainConfig(epochs=1, limit=a.train_limit, record_initial=False)
        t0 = time.perf_counter()
        run = train_and_record(tmp / "run", cfg)
        epoch_s = time.perf_counter() - t0
        print(f"real MiniLM epoch ({run['n_train']} texts): {epoch_s:.1f} s", flush=True)

        torch.manual_seed(0)
        model = build_model(TrainConfig())
        params = [p for p in model.parameters() if p.dtype.is_floating_point]
        n = sum(p.numel() for p in params)

        def nudge() -> None:
            with torch.no_grad():
                for p in params:
                    p.add_(torch.randn_like(p), alpha=1e-3)

        results: dict[str, object] = {"n_params": n, "real_epoch_seconds": epoch_s, "n_train": run["n_train"]}
        for label, kw in (
            ("in-memory", {}),
            ("zarr store (threads)", {"store": str(tmp / "online.zarr"),
                                      "runtime": pipeline.RuntimeOptions(mode="threads", progress=False)}),
        ):
            with OnlineCMD(model, warmup=a.warmup, modes=a.modes, samples=1000, seed=0, **kw) as cmd:  # type: ignore[arg-type]
                warm, upd = [], []
                peak_history = 0
                for e in range(a.warmup + a.epochs):
                    nudge()
                    t = time.perf_counter()
                    cmd.update(model)
                    dt = time.perf_counter() - t
                    (warm if e < a.warmup else upd).append(dt)
                    if not cmd.ready:
                        peak_history = max(peak_history, cmd.memory_bytes())
                state = cmd.memory_bytes()
            med = statistics.median(upd)
            results[label] = {
                "warmup_update_seconds": warm,
                "update_seconds": upd,
                "update_median_seconds": med,
                "overhead_fraction": med / epoch_s,
                "state_bytes_in_process": state,
                "warmup_history_bytes": peak_history,
            }
            print(f"{label}: update {med * 1e3:.0f} ms (median of {len(upd)}) = "
                  f"{med / epoch_s:.2%} of the real epoch; warm-up epoch incl. the post-hoc fit: "
                  f"{warm[-1]:.1f} s; state in process {state / 1e6:.1f} MB", flush=True)
        t_ckpt = 4 * n
        print()
        print(f"Online CMD on MiniLM ({n:,} parameters); real epoch {epoch_s:.1f} s")
        print("| backend | update per epoch | / epoch time | in-process state after warm-up |")
        print("|---|---|---|---|")
        for label in ("in-memory", "zarr store (threads)"):
            r = results[label]
            assert isinstance(r, dict)
            print(f"| {label} | {r['update_median_seconds'] * 1e3:.0f} ms | {r['overhead_fraction']:.2%} | "
                  f"{r['state_bytes_in_process'] / 1e6:.1f} MB |")
        print()
        print(f"memory: running sums {17 * n / 1e6:.0f} MB (17 B per parameter, in the store with store=); "
              f"checkpoints of every epoch {t_ckpt / 1e6:.0f} MB per epoch; "
              f"the sums cost as much as {17 / 4:.2f} epochs of checkpoints, whatever the number of epochs. "
              f"Warm-up history: {results['in-memory']['warmup_history_bytes'] / 1e6:.0f} MB (F={a.warmup}), freed after it.")  # type: ignore[index]
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(results, indent=2) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
