"""Writing chunk files: one ``write`` per chunk against writes in pieces, in the same run.

Every variant writes ``--gb`` GB as fresh files of ``--chunk-mb`` MB (as ingest writes the
trajectory's chunks), from one reused, touched buffer, into a folder emptied and ``sync``-ed
before each run; the variants run ``--repeat`` times, in a new random order each time (on a
VM the cost of fresh pages depends on what ran before), and the medians are reported,
with the kernel's own copy (``os.copy_file_range`` from a cached file of the same size) as the
baseline. :func:`pipeline.store.keys.write_file` writes in pieces of
:data:`pipeline.store.keys.WRITE_PIECE` bytes because of what this measures.

Usage::

    .venv/bin/python benchmarks/bench_write_pieces.py --gb 1 --chunk-mb 12 --repeat 2 \\
        --workdir /tmp/bench-pieces
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def _fresh(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    os.sync()
    time.sleep(2.0)


def _write_files(folder: Path, n_files: int, data: memoryview, piece: int) -> None:
    for k in range(n_files):
        fd = os.open(folder / str(k), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            done = 0
            while done < len(data):
                done += os.write(fd, data[done : done + piece])
        finally:
            os.close(fd)


def _copy_files(folder: Path, n_files: int, source: Path, size: int) -> None:
    src = os.open(source, os.O_RDONLY)
    try:
        for k in range(n_files):
            fd = os.open(folder / str(k), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                done = 0
                while done < size:
                    done += os.copy_file_range(src, fd, size - done, done, done)
            finally:
                os.close(fd)
    finally:
        os.close(src)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=1.0, help="GB written per run")
    ap.add_argument("--chunk-mb", type=float, default=12.0, help="MB per file (a trajectory chunk)")
    ap.add_argument("--pieces-kb", default="64,256,512,1024", help="piece sizes to compare (KiB)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--workdir", default="bench-output/write-pieces")
    a = ap.parse_args(argv)
    work = Path(a.workdir).resolve()
    out, source = work / "out", work / "source.bin"
    size = int(a.chunk_mb * 2**20)
    n_files = max(1, int(a.gb * 2**30) // size)
    buf = np.ones(size, dtype=np.uint8)  # touched once, reused by every write
    data = memoryview(buf)
    work.mkdir(parents=True, exist_ok=True)
    source.write_bytes(buf.tobytes())
    variants: dict[str, Callable[[], None]] = {
        "copy_file_range (kernel copy)": lambda: _copy_files(out, n_files, source, size),
        f"one write per {a.chunk_mb:g} MB file": lambda: _write_files(out, n_files, data, size),
    }
    for kb in (int(x) for x in a.pieces_kb.split(",")):
        variants[f"writes of {kb} KiB"] = lambda kb=kb: _write_files(out, n_files, data, kb << 10)
    times: dict[str, list[float]] = {k: [] for k in variants}
    try:
        rng = random.Random(0)
        for _ in range(a.repeat):
            order = list(variants.items())
            rng.shuffle(order)  # no variant always runs after the same one
            for name, fn in order:
                _fresh(out)
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    nbytes = n_files * size
    base = statistics.median(times["copy_file_range (kernel copy)"])
    print(f"{n_files} files of {size / 2**20:g} MB ({nbytes / 1e9:.2f} GB) per run; medians of {a.repeat}")
    print("| variant | s | GB/s | / copy_file_range |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        s = statistics.median(ts)
        print(f"| {name} | {s:.2f} | {nbytes / s / 1e9:.2f} | {s / base:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
