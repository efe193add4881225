"""The store's ``tensor_id`` array (each trajectory row's tensor) written for a model's shape.

Ingest writes ``tensor_id`` (int32, one value per parameter, compressed) on the client when a
store is created; for a 7B model that is 27 GB of values before compression. This times
``pipeline.store.meta_arrays._write_tensor_table`` for a decoder-only language model of the
given shape (LLaMA naming: embeddings, ``--layers`` blocks of four ``d x d`` attention
projections, three ``d x ffn`` MLP projections and two norms, a final norm and the head),
with the trajectory chunks a bf16 store gets (``--chunk-rows``, default 4,194,304 = 8 MiB of
bf16), into a fresh local directory, and checks 2,000 random rows against the tensor
offsets. With ``--old CHECKOUT`` (a ``git worktree`` of an earlier commit) the same runs for
that code too, in a child process with ``PYTHONPATH=CHECKOUT``, alternating. Usage::

    .venv/bin/python benchmarks/bench_tensor_id.py --d 2112 --layers 16 --ffn 5632   # ~1e9
    .venv/bin/python benchmarks/bench_tensor_id.py --d 4096 --layers 32 --ffn 11008 --old /tmp/old
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, shutil, sys, tempfile, time, types
import numpy as np, zarr
from pipeline.store import meta_arrays
from pipeline.store.schema import TensorEntry

d, layers, ffn, vocab, chunk_rows = (int(v) for v in sys.argv[1:6])
workdir = sys.argv[6]
sizes = [vocab * d]
for _ in range(layers):
    sizes += [d * d] * 4 + [d * ffn] * 3 + [d] * 2
sizes += [d, vocab * d]
tensors, off = [], 0
for i, s in enumerate(sizes):
    tensors.append(TensorEntry(f"t{i}", (s,), "bfloat16", "parameter", off))
    off += s
meta = types.SimpleNamespace(tensors=tuple(tensors), n_rows=off)
where = tempfile.mkdtemp(dir=workdir)
try:
    root = zarr.open_group(where, mode="w")
    t = time.perf_counter()
    meta_arrays._write_tensor_table(root, meta, chunk_rows)
    seconds = time.perf_counter() - t
    rows = np.random.default_rng(0).integers(0, off, 2000)
    got = root["tensor_id"].get_coordinate_selection(rows)
    starts = np.array([x.offset for x in tensors])
    ok = bool(np.array_equal(got, np.searchsorted(starts, rows, side="right") - 1))
finally:
    shutil.rmtree(where)
print(json.dumps({"s": seconds, "rows": off, "tensors": len(tensors), "ok": ok}))
"""


def _one(code: Path, args: argparse.Namespace) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(code)}
    argv = [str(v) for v in (args.d, args.layers, args.ffn, args.vocab, args.chunk_rows)]
    out = subprocess.run(
        [sys.executable, "-c", CHILD, *argv, args.workdir],
        check=True, capture_output=True, text=True, env=env, cwd=str(code),
    )  # fmt: skip
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if not res["ok"]:
        raise SystemExit(f"{code}: tensor_id does not match the tensor offsets")
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--d", type=int, default=2112, help="model width")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--ffn", type=int, default=5632, help="MLP width")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--chunk-rows", type=int, default=1 << 22)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--old", help="a checkout of an earlier commit, timed alternately")
    ap.add_argument("--workdir", default=tempfile.gettempdir())
    a = ap.parse_args(argv)
    codes = {"this": ROOT} | ({"old": Path(a.old).resolve()} if a.old else {})
    times: dict[str, list[float]] = {k: [] for k in codes}
    info: dict[str, float] = {}
    for _ in range(a.repeat):
        for name, code in codes.items():
            res = _one(code, a)
            times[name].append(res["s"])
            info = res
            print(f"  {name}: {res['s']:.2f} s", flush=True)
    print(
        f"{info['rows']:,} rows, {info['tensors']} tensors, chunks of {a.chunk_rows:,} rows; medians of {a.repeat}:"
    )
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"| {k} | {v:.2f} s |")
    if "old" in med:
        print(f"old / this: {med['old'] / med['this']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
