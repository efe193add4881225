"""Ingest reads each input byte once: wall time and bytes read against ``cp -r``.

Writes a run of float32 (or ``--dtype`` bfloat16/float16) safetensors checkpoints
(``--epochs`` x ``--n`` parameters: 40 x 5e7 float32 is 8 GB; ``--layers`` x (weight, bias);
``--format pt``: ``torch.save`` files), then, in the same run and from the same cache state (every input file read into the
page cache just before; outputs deleted and ``sync``-ed between runs):

0. before every run: the outputs deleted and written back, every input read (into the page
   cache), and ``--pretouch`` GB of memory touched and freed (see :func:`_fresh`);
1. ``cp -r`` of the checkpoint folder, followed by ``sync``;
2. ``pipeline.ingest`` on a LocalCluster (the default runtime: 2 single-threaded workers on
   this machine; started, and the package imported on its workers, before the clock starts)
   and on the synchronous runtime (``--sync``), each followed by ``sync``;
3. with ``--old PATH`` (a checkout of an earlier release, e.g. ``git worktree add /tmp/old
   HEAD``): the same two ingests by that code (``PYTHONPATH=PATH``), in the same run.

Each ingest runs in a fresh Python process that starts the runtime, then times the ingest and
samples ``/proc/<pid>/io`` of itself and its worker processes: ``rchar`` (bytes returned by
read system calls, page-cache hits included: the files are cached, so ``read_bytes`` says
nothing here) per input byte is the "reads per input byte" column. Both times are reported
with and without the final ``sync`` (the writeback of the output to disk).

Usage::

    .venv/bin/python benchmarks/bench_ingest_once.py --n 5e7 --epochs 40 \\
        --workdir /tmp/bench-once [--old /tmp/old] [--repeat 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from bench_ingest import make_run, warm

ROOT = Path(__file__).resolve().parent.parent

#: the child process: start the runtime, then time one ingest and count its reads
CHILD = r"""
import json, os, sys, threading, time
import psutil
import pipeline
from pipeline.runtime import RuntimeOptions, runner

ck, store, mode = sys.argv[1], sys.argv[2], sys.argv[3]

def tree():
    me = psutil.Process()
    return [me, *me.children(recursive=True)]

def io():
    out = {}
    for p in tree():
        try:
            c = p.io_counters()
        except psutil.Error:
            continue
        out[p.pid] = (c.read_chars, c.read_bytes)
    return out

opts = RuntimeOptions(mode=mode, progress=False) if mode == "sync" else RuntimeOptions(progress=False)
with runner(opts) as run:
    if getattr(run, "client", None) is not None:  # the workers import what the tasks need
        run.client.run(lambda: __import__("pipeline.ops.ingest"))
    before = io()
    last = dict(before)
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            last.update(io())
            time.sleep(0.05)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.perf_counter()
    res = pipeline.ingest([ck], store, run=run)
    t1 = time.perf_counter()
    os.sync()
    t2 = time.perf_counter()
    stop.set()
    t.join()
    last.update(io())
rchar = sum(v[0] - before.get(pid, (0, 0))[0] for pid, v in last.items())
rbytes = sum(v[1] - before.get(pid, (0, 0))[1] for pid, v in last.items())
print(json.dumps({"s": t1 - t0, "s_sync": t2 - t0, "rchar": rchar, "read_bytes": rbytes,
                  "pipeline": pipeline.__file__, "bytes_in": res.bytes_in}))
"""


def _ingest(ck: Path, store: Path, mode: str, pythonpath: str | None) -> dict[str, float]:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(ck), str(store), mode],
        check=True,
        capture_output=True,
        text=True,
        env=env,
        cwd=str(store.parent),
    )
    got: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return got


def _fresh(ck: Path, *outputs: Path, pretouch: float = 0.0) -> None:
    """The same cache state before every run: outputs gone and written back, inputs cached;
    then ``pretouch`` GB of memory allocated, touched and freed (on a VM that hands freed
    pages back to its host, the first writes into fresh page-cache pages run up to 10x
    slower: this makes the output's pages equally cheap for every run)."""
    for p in outputs:
        shutil.rmtree(p, ignore_errors=True)
    os.sync()
    if pretouch > 0:
        a = np.ones(int(pretouch * 2**30) // 8)
        del a
    warm(ck)  # last: what the pretouch evicted is read back


def _default_pretouch(nbytes: int) -> float:
    """The output's size plus 1 GB, within what memory holds beside the cached input."""
    avail = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    return max(0.0, min(nbytes + 2**30, avail - nbytes - 2 * 2**30) / 2**30)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=float, default=5e7, help="parameters per checkpoint")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="the checkpoints' dtype (16-bit runs make 16-bit stores)")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--layers", type=int, default=8,
                    help="(weight, bias) pairs per checkpoint: 2 x LAYERS tensors")
    ap.add_argument("--format", default="safetensors", choices=["safetensors", "pt"],
                    help="one safetensors or one torch.save file per epoch")
    ap.add_argument("--repeat", type=int, default=1, help="interleaved repetitions (medians reported)")
    ap.add_argument("--workdir", default="bench-output/ingest-once-work")
    ap.add_argument("--old", default=None, help="a checkout of the code to compare with (PYTHONPATH)")
    ap.add_argument("--out", default="bench-output/ingest-once.json")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    ap.add_argument(
        "--pretouch",
        type=float,
        default=None,
        help="GB of memory touched and freed before every run (default: the input size plus 1 GB)",
    )
    a = ap.parse_args(argv)
    work = Path(a.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    ck, copy, store = work / "ckpts", work / "copy", work / "store.zarr"
    variants = [("new", "cluster", None), ("new", "sync", None)]
    if a.old:
        variants += [("old", "cluster", str(Path(a.old).resolve())), ("old", "sync", str(Path(a.old).resolve()))]
    runs: dict[str, list[dict[str, float]]] = {"cp": []}
    try:
        print(f"generating {a.epochs} x {a.n:.3g} {a.dtype} parameters ({a.format}, "
              f"{2 * a.layers} tensors) ...", flush=True)
        nbytes = make_run(ck, int(a.n), a.epochs, dtype=a.dtype, layers=a.layers, fmt=a.format)
        pre = a.pretouch if a.pretouch is not None else _default_pretouch(nbytes)
        for _ in range(a.repeat):
            _fresh(ck, copy, store, pretouch=pre)
            t0 = time.perf_counter()
            subprocess.run(["cp", "-r", str(ck), str(copy)], check=True)
            t1 = time.perf_counter()
            os.sync()
            runs["cp"].append({"s": t1 - t0, "s_sync": time.perf_counter() - t0, "rchar": float(nbytes)})
            for code, mode, path in variants:
                _fresh(ck, copy, store, pretouch=pre)
                got = _ingest(ck, store, mode, path)
                runs.setdefault(f"{code} {mode}", []).append(got)
                print(f"{code} {mode}: {got}", flush=True)
        _fresh(ck, copy, store)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("s", "s_sync", "rchar")} for k, v in runs.items()}
    cp = med["cp"]
    rows = {
        k: {
            **v,
            "ratio": v["s"] / cp["s"],
            "ratio_sync": v["s_sync"] / cp["s_sync"],
            "reads_per_input_byte": v["rchar"] / nbytes,
        }
        for k, v in med.items()
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"input_bytes": nbytes, "medians": rows, "runs": runs}, indent=2))
    print(f"input: {a.epochs} x {a.n:.3g} {a.dtype} = {nbytes / 1e9:.2f} GB, in the page cache before every run; "
          f"{pre:.1f} GB touched and freed before every run; medians of {a.repeat}")
    print("| run | s | / cp -r | s with sync | / cp -r | bytes read (rchar) per input byte |")
    print("|---|---|---|---|---|---|")
    for k, r in rows.items():
        print(f"| {k} | {r['s']:.2f} | {r['ratio']:.2f} | {r['s_sync']:.2f} | {r['ratio_sync']:.2f} | "
              f"{r['reads_per_input_byte']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
