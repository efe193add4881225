"""The fit's two CPU kernels end to end on an existing store, on the synchronous scheduler and
on the LocalCluster (2 worker processes), alternating, each fit a new study. Usage::

    .venv/bin/python benchmarks/bench_kernels_fit.py STORE

(for example a store kept by ``bench_fit.py --keep``). Prints one line per fit.
"""

import os
import sys
import time

import pipeline
from pipeline.config import FIT_KERNEL_ENV
from pipeline.kernels import cmd_numba
from pipeline.runtime import RuntimeOptions, runner

cmd_numba.warm_up(("float32",))
url = sys.argv[1]
for mode in ("sync", "local"):
    with runner(RuntimeOptions(mode=mode, progress=False, workers=2)) as r:
        if r.client is not None:
            r.client.run(cmd_numba.warm_up, ("float32",))
        for i in range(2):
            for k in ("numba", "numpy"):
                os.environ[FIT_KERNEL_ENV] = k
                if r.client is not None:
                    r.client.run(os.environ.__setitem__, FIT_KERNEL_ENV, k)
                t = time.perf_counter()
                pipeline.fit(url, f"k-{mode}-{k}-{i}-{time.time()}", modes=10, samples=1000, run=r)
                print(mode, k, i, round(time.perf_counter() - t, 2), "s", flush=True)
