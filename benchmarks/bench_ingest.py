"""Ingest benchmark: wall time, throughput and peak RSS against ``cp -r`` of the same files.

Generates a run of float32 safetensors checkpoints (a model-like state_dict of N parameters
per epoch) for each requested N, then, in the same run and from the same (warm) page cache:

1. ``cp -r`` of the checkpoint directory followed by ``sync``, timed;
2. ``cmd-pipeline ingest`` on the embedded LocalCluster (2 single-threaded worker processes on
   this machine), followed by ``sync``, timed;
3. the same ingest on a local thread pool (``--threads``), timed;

both ``--repeat`` times, interleaved, reporting medians (these machines are noisy).

Peak RSS is the largest summed resident memory of this process and all its children
(scheduler, workers), sampled every 20 ms. Usage::

    .venv/bin/python benchmarks/bench_ingest.py --sizes 1e7,4e7 --epochs 50 --workdir /tmp/bench
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
from _common import PeakRSS


def make_run(
    root: Path,
    n: int,
    epochs: int,
    seed: int = 0,
    dtype: str = "float32",
    layers: int = 8,
    fmt: str = "safetensors",
) -> int:
    """A model-like run: ``layers`` layers of (weight, bias) adding up to n parameters of
    ``dtype`` (float32; bfloat16 or float16: rounded from the float32 values, saved through
    torch), one safetensors file per epoch (``fmt="pt"``: one ``torch.save`` zip file)."""
    from safetensors.numpy import save_file

    if fmt == "pt":
        import torch

        tdt = getattr(torch, dtype)

        def save_file(tensors: dict, path: str) -> None:  # the PyTorch writer
            torch.save({k: torch.from_numpy(v).to(tdt) for k, v in tensors.items()}, path)

    elif dtype != "float32":
        import torch
        from safetensors.torch import save_file as save_torch

        tdt = {"bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]

        def save_file(tensors: dict, path: str) -> None:  # the 16-bit writer
            save_torch({k: torch.from_numpy(v).to(tdt) for k, v in tensors.items()}, path)

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    per = n // layers
    shapes = {}
    used = 0
    for i in range(layers):
        bias = 256
        w = (per if i < layers - 1 else n - used) - bias
        shapes[f"layers.{i}.weight"] = (w // 256, 256)
        shapes[f"layers.{i}.bias"] = (bias + w % 256,)
        used += w - w % 256 + bias + w % 256
    base = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    drift = {k: (0.01 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}
    total = 0
    for e in range(epochs):
        for k in base:
            base[k] += drift[k]
        p = root / f"epoch_{e:04d}.{'pt' if fmt == 'pt' else 'safetensors'}"
        save_file(base, str(p))
        total += p.stat().st_size
    return total


def warm(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                while f.read(64 << 20):
                    pass


def timed(fn: object) -> float:
    t = time.perf_counter()
    fn()  # type: ignore[operator]
    os.sync()
    return time.perf_counter() - t


def bench_size(n: int, epochs: int, work: Path, workers: int, repeat: int) -> dict[str, float]:
    import pipeline
    from pipeline.runtime import RuntimeOptions, runner

    ck = work / f"ckpt_n{n}"
    if not ck.exists():
        print(f"generating N={n:.3g} x T={epochs} ...", flush=True)
        make_run(ck, n, epochs)
    nbytes = sum(p.stat().st_size for p in ck.iterdir())
    copy = work / "copy"
    store = work / f"store_n{n}.zarr"
    t_cps, t_ingests, peaks, peaks_one, t_threads, peaks_threads = [], [], [], [], [], []
    t_start = 0.0
    for _ in range(repeat):  # interleaved, so both see the same machine state
        for p in (copy, store):
            shutil.rmtree(p, ignore_errors=True)
        os.sync()
        warm(ck)
        t_cps.append(timed(lambda: subprocess.run(["cp", "-r", str(ck), str(copy)], check=True)))
        shutil.rmtree(copy)
        os.sync()
        warm(ck)
        t0 = time.perf_counter()
        with PeakRSS() as rss, runner(RuntimeOptions(workers=workers, progress=False)) as run:
            t_start = time.perf_counter() - t0
            t_ingests.append(timed(lambda: pipeline.ingest([ck], store, run=run)))
        peaks.append(rss.peak)
        peaks_one.append(rss.peak_single)
        shutil.rmtree(store)
        os.sync()
        warm(ck)
        with PeakRSS() as rss_t, runner(RuntimeOptions(mode="threads", progress=False)) as run:
            t_threads.append(timed(lambda: pipeline.ingest([ck], store, run=run)))
        peaks_threads.append(rss_t.peak)
    t_cp, t_ingest = statistics.median(t_cps), statistics.median(t_ingests)
    info = pipeline.info(store)
    shutil.rmtree(store)
    return {
        "N": n,
        "T": epochs,
        "input_GB": nbytes / 1e9,
        "cp_s": t_cp,
        "ingest_s": t_ingest,
        "cluster_start_s": t_start,
        "ingest_GBps": nbytes / 1e9 / t_ingest,
        "cp_GBps": nbytes / 1e9 / t_cp,
        "ratio": t_ingest / t_cp,
        "threads_s": statistics.median(t_threads),
        "threads_ratio": statistics.median(t_threads) / t_cp,
        "threads_peak_rss_GB": max(peaks_threads) / 1e9,
        "threads_runs_s": t_threads,
        "cp_runs_s": t_cps,
        "ingest_runs_s": t_ingests,
        "peak_rss_GB": max(peaks) / 1e9,
        "peak_rss_one_process_GB": max(peaks_one) / 1e9,
        "chunk_MB": info["chunk_mb"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1e7,4e7", help="comma list of N (parameters per checkpoint)")
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3, help="interleaved cp/ingest repetitions (medians reported)")
    ap.add_argument("--workdir", default="bench-output/ingest-work")
    ap.add_argument("--out", default="bench-output/ingest.json")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    a = ap.parse_args(argv)
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for s in a.sizes.split(","):
            rows.append(bench_size(int(float(s)), a.epochs, work, a.workers, a.repeat))
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rows, indent=2))
    print(f"medians of {a.repeat} interleaved runs")
    print("| N | T | input GB | cp -r s | ingest s (LocalCluster) | GB/s | ingest / cp | peak RSS (all processes) | ingest s (--threads) | GB/s | threads / cp | peak RSS |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['N']:.3g} | {r['T']} | {r['input_GB']:.2f} | {r['cp_s']:.2f} | {r['ingest_s']:.2f} | "
            f"{r['ingest_GBps']:.2f} | {r['ratio']:.2f} | {r['peak_rss_GB']:.2f} GB | {r['threads_s']:.2f} | "
            f"{r['input_GB'] / r['threads_s']:.2f} | {r['threads_ratio']:.2f} | {r['threads_peak_rss_GB']:.2f} GB |"
        )
    print(f"(LocalCluster start-up, not included above: {rows[0]['cluster_start_s']:.1f} s; chunk {rows[0]['chunk_MB']:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
