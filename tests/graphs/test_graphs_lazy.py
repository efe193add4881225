"""Building a graph neither computes nor reads data: a guard over every graph builder.

Every public ``build_*`` function of the modules of :mod:`pipeline.graph` must have a case in
:data:`BUILDERS` (a new builder without one fails :func:`test_every_builder_has_a_case`). The
builders' real arguments are recorded while the operations that use them run on a small real
store (ingest, fit, reconstruct, the baselines' Gram and error passes, basis stability, the
store-backed Online CMD); each builder is then called again with those arguments while

* dask's scheduler is a function that raises (and a dask callback counts any local compute),
* the read paths are counted: the trajectory's ``ChunkGrid.read_rows``/``read_scattered``,
  ``read_block`` and the raw ``preadv`` helper, any zarr chunk fetched from a local store,
  zarr array selections, the study and Online CMD readers, and the checkpoint readers,

and must do nothing of either. Computing the graph it returned (synchronous scheduler) must
then read, so the counters do see the tasks' reads.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import pkgutil
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import numpy as np
import pytest
import torch
from dask.callbacks import Callback
from dask.delayed import Delayed
from helpers import SYNC, mode_profiles, planted_rows, rows_to_state_dicts, write_safetensors_run

import pipeline
import pipeline.graph

T = 8
SHAPES = {"w1": (12, 10), "b1": (30,), "w2": (5, 6)}  # 120 + 30 + 30 = 180 rows

#: every graph builder -> the operation whose run records its arguments ("derived": built
#: from another builder's recorded arguments)
BUILDERS = {
    "pipeline.graph.ingest.build_inspect_tasks": "pipeline.ingest",
    "pipeline.graph.ingest.build_chunk_tasks": "pipeline.ingest",
    "pipeline.graph.fit.build_fit_tasks": "pipeline.fit",
    "pipeline.graph.fit.build_scan_tasks": "derived from build_fit_tasks",
    "pipeline.graph.fit.build_totals": "pipeline.fit",
    "pipeline.graph.reconstruct.build_reconstruct_tasks": "pipeline.reconstruct",
    "pipeline.graph.sampling.build_gather_tasks": "pipeline.fit",
    "pipeline.graph.baselines.build_gram_tasks": "pipeline.bench.baselines.gram",
    "pipeline.graph.baselines.build_cmd_error_tasks": "pipeline.bench.baselines.cmd_errors",
    "pipeline.graph.baselines.build_dmd_error_tasks": "pipeline.bench.baselines.dmd_errors",
    "pipeline.graph.stability.build_stability_tasks": "pipeline.ops.stability.basis_stability",
    "pipeline.graph.online.build_init_tasks": "StoreRunningFit.finish_warmup",
    "pipeline.graph.online.build_update_tasks": "StoreRunningFit.update",
}
#: the cases: one per builder, plus the ingest's re-count of existing chunks
CASES = [*BUILDERS, "pipeline.graph.ingest.build_chunk_tasks[existing]"]


def graph_builders() -> dict[str, Callable[..., Any]]:
    """Every public function named ``build_*`` defined in a module of ``pipeline.graph``."""
    out: dict[str, Callable[..., Any]] = {}
    for info in pkgutil.iter_modules(pipeline.graph.__path__, "pipeline.graph."):
        mod = importlib.import_module(info.name)
        for name, fn in inspect.getmembers(mod, inspect.isfunction):
            if name.startswith("build_") and fn.__module__ == mod.__name__:
                out[f"{mod.__name__}.{name}"] = fn
    return out


def test_every_builder_has_a_case() -> None:
    found = graph_builders()
    assert len(found) >= 11
    assert sorted(found) == sorted(BUILDERS), (
        f"builders without a case: {sorted(set(found) - set(BUILDERS))}; "
        f"cases without a builder: {sorted(set(BUILDERS) - set(found))}"
    )


# --------------------------------------------------------------------------- recording
@dataclass
class Call:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    result: Any = None

    def bound(self) -> inspect.BoundArguments:
        b = inspect.signature(self.fn).bind(*self.args, **self.kwargs)
        b.apply_defaults()
        return b


@dataclass
class Recorded:
    store: Path
    online: Path
    calls: dict[str, list[Call]] = field(default_factory=dict)


def _import_users() -> None:
    """The modules that call the builders (their ``from ... import build_*`` names are patched)."""
    for name in (
        "pipeline.ops.ingest",
        "pipeline.ops.fit",
        "pipeline.ops.reconstruct",
        "pipeline.ops.compare",
        "pipeline.ops.stability",
        "pipeline.bench.baselines",
        "pipeline.online.store_backed",
    ):
        importlib.import_module(name)


@contextlib.contextmanager
def recording(calls: dict[str, list[Call]]) -> Iterator[None]:
    """Wrap every builder, wherever a ``pipeline`` module holds it, to record its calls."""
    _import_users()
    with pytest.MonkeyPatch.context() as mp:
        for qual, fn in graph_builders().items():

            def wrapper(*args: Any, _fn: Any = fn, _q: str = qual, **kwargs: Any) -> Any:
                call = Call(_fn, args, kwargs)
                call.result = _fn(*args, **kwargs)
                calls.setdefault(_q, []).append(call)
                return call.result

            for mod in [m for k, m in list(sys.modules.items()) if k.startswith("pipeline")]:
                for attr, value in list(vars(mod).items()):
                    if value is fn:
                        mp.setattr(mod, attr, wrapper)
        yield


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Recorded:
    """A small planted run (3 tensors, 180 rows, 8 epochs) ingested in chunks of 50 rows x 3
    epochs (lz4) and put through every operation that builds a graph, builders recorded."""
    from pipeline.bench.baselines import cmd_errors, dmd_errors, gram
    from pipeline.online.store_backed import StoreRunningFit
    from pipeline.ops.stability import basis_stability

    root = tmp_path_factory.mktemp("lazy")
    rng = np.random.default_rng(3)
    p = mode_profiles(T, ("exp", "sigmoid", "sin"))
    spec = {
        k: (shape, torch.float32, planted_rows(int(np.prod(shape)), p, rng, noise=1e-3).noisy)
        for k, shape in SHAPES.items()
    }
    write_safetensors_run(root / "ckpts", rows_to_state_dicts(spec))
    store = root / "s.zarr"
    rec = Recorded(store, root / "online.zarr")
    with recording(rec.calls):
        pipeline.ingest(
            [str(root / "ckpts")],
            str(store),
            chunk_rows=50,
            time_chunk=3,
            codec="lz4",
            runtime=SYNC,
        )
        pipeline.fit(str(store), "m", modes=3, samples=60, runtime=SYNC)
        pipeline.reconstruct(str(store), "m", runtime=SYNC)
        g = gram(str(store), runtime=SYNC)
        cmd_errors(str(store), "m", runtime=SYNC)
        dmd_errors(str(store), g, [2], runtime=SYNC)
        basis_stability(str(store), runtime=SYNC)
        # store-backed Online CMD on a new store: 4 warm-up epochs, then one update
        w = np.concatenate([spec[k][2] for k in SHAPES]).astype(np.float32)
        sizes = [int(np.prod(s)) for s in SHAPES.values()]
        offsets = [int(x) for x in np.cumsum([0, *sizes[:-1]])]
        fit = StoreRunningFit(
            str(rec.online), list(SHAPES), list(SHAPES.values()), offsets, sizes, 4, SYNC
        )
        try:
            for e in range(4):
                fit.record(np.ascontiguousarray(w[:, e]), e)
            ref_index, _r, _bad, _last = fit.finish_warmup(3, None, 60, 0)
            fit.update(np.ascontiguousarray(w[:, 4]), w[ref_index, 4].astype(np.float64))
        finally:
            fit.close()
    return rec


def _case_call(rec: Recorded, case: str) -> Call:
    """The builder call of ``case``, with real arguments."""
    if case == "pipeline.graph.fit.build_scan_tasks":
        fit = rec.calls["pipeline.graph.fit.build_fit_tasks"][0].bound().arguments
        fn = graph_builders()[case]
        return Call(fn, (fit["grid"], fit["plans"], fit["cols"], 5, 0), {})
    if case.endswith("[existing]"):
        first = rec.calls[case.removesuffix("[existing]")][0]
        b = first.bound()
        _tasks, where = first.result
        # a resumed ingest: every chunk is there, so every task re-counts (reads) its chunks
        b.arguments["existing"] = {(i, j) for group in where for i, j, _written in group}
        return Call(first.fn, b.args, b.kwargs)
    assert case in rec.calls, f"{case} was never called by {BUILDERS[case]}"
    return rec.calls[case][0]


# --------------------------------------------------------------------------- the guard
class Counters:
    """Reads and computes seen while installed."""

    def __init__(self) -> None:
        self.reads: list[str] = []
        self.computes: list[str] = []
        self._lock = threading.Lock()

    def read(self, what: str) -> None:
        with self._lock:
            self.reads.append(what)


def _install(mp: pytest.MonkeyPatch, c: Counters, roots: list[Path]) -> None:
    """Count calls of every read path a graph's tasks use."""
    import zarr.core.array as zarray
    import zarr.storage._local as zlocal

    import pipeline.checkpoints.readers as readers
    import pipeline.graph.baselines as gbase
    import pipeline.graph.ingest as gingest
    import pipeline.graph.reconstruct as grec
    import pipeline.store.analysis as analysis
    import pipeline.store.online as sonline
    import pipeline.store.trajectory as traj

    def counted(owner: Any, name: str, what: str) -> None:
        real = getattr(owner, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            c.read(what)
            return real(*args, **kwargs)

        mp.setattr(owner, name, wrapper)

    for name in ("read_rows", "read_scattered"):
        counted(traj.ChunkGrid, name, f"ChunkGrid.{name}")
    counted(traj, "read_block", "read_block")
    counted(gingest, "read_block", "read_block")
    counted(traj, "_pread_exact", "preadv")
    for name in (
        "__getitem__",
        "get_basic_selection",
        "get_orthogonal_selection",
        "get_coordinate_selection",
        "get_mask_selection",
        "get_block_selection",
    ):
        if hasattr(zarray.Array, name):
            counted(zarray.Array, name, f"zarr.Array.{name}")
    for owner in (analysis, gbase, grec):
        for name in ("read_result", "read_result_rows"):
            if hasattr(owner, name):
                counted(owner, name, name)
    for name in dir(sonline.OnlineGroup):
        if name.startswith(("read_", "take_")):
            counted(sonline.OnlineGroup, name, f"OnlineGroup.{name}")
    for owner in (readers, gingest):
        for name in ("digest_file", "cached_reader"):
            if hasattr(owner, name):
                counted(owner, name, name)
    for _n, cls in inspect.getmembers(readers, inspect.isclass):
        for name in ("read_into", "read_raw"):
            if cls.__module__ == readers.__name__ and name in vars(cls):
                counted(cls, name, f"{cls.__name__}.{name}")

    # any chunk fetched from a local zarr store, any chunk file opened for preadv
    real_get, real_partial = zlocal.LocalStore.get, zlocal.LocalStore.get_partial_values

    async def get(self: Any, key: str, *args: Any, **kwargs: Any) -> Any:
        if "/c/" in f"/{key}":
            c.read(f"zarr chunk {key}")
        return await real_get(self, key, *args, **kwargs)

    async def get_partial_values(self: Any, prototype: Any, key_ranges: Any) -> Any:
        key_ranges = list(key_ranges)
        for key, _range in key_ranges:
            if "/c/" in f"/{key}":
                c.read(f"zarr chunk {key}")
        return await real_partial(self, prototype, key_ranges)

    mp.setattr(zlocal.LocalStore, "get", get)
    mp.setattr(zlocal.LocalStore, "get_partial_values", get_partial_values)
    real_open = os.open
    prefixes = tuple(str(r) for r in roots)

    def os_open(path: Any, *args: Any, **kwargs: Any) -> int:
        p = os.fspath(path) if not isinstance(path, int) else ""
        if isinstance(p, str) and p.startswith(prefixes) and f"{os.sep}c{os.sep}" in p:
            c.read(f"os.open {p}")
        return real_open(path, *args, **kwargs)

    mp.setattr(os, "open", os_open)


class _CountComputes(Callback):
    def __init__(self, c: Counters) -> None:
        super().__init__()
        self.c = c

    def _start(self, dsk: Any) -> None:
        self.c.computes.append(f"local compute of {len(dsk)} task(s)")


def _no_scheduler(c: Counters) -> Callable[..., Any]:
    def get(dsk: Any, keys: Any, **kwargs: Any) -> Any:
        c.computes.append(f"scheduler called for {keys!r:.200}")
        raise AssertionError("a graph builder computed something")

    return get


def _tasks_of(result: Any) -> list[Any]:
    """The delayed tasks a builder returned: a list, ``(tasks, labels/where)``, or one
    delayed value (a reduction such as the fit's totals)."""
    if isinstance(result, Delayed):
        return [result]
    tasks = result[0] if isinstance(result, tuple) else result
    assert isinstance(tasks, list) and tasks, result
    assert all(isinstance(t, Delayed) for t in tasks), tasks[:3]
    return tasks


@pytest.mark.parametrize("case", CASES)
def test_builder_neither_computes_nor_reads(
    recorded: Recorded, case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    call = _case_call(recorded, case)
    c = Counters()
    _install(monkeypatch, c, [recorded.store.parent])
    with dask.config.set(scheduler=_no_scheduler(c)), _CountComputes(c):
        result = call.fn(*call.args, **call.kwargs)
    assert c.computes == [], c.computes
    assert c.reads == [], c.reads[:10]
    tasks = _tasks_of(result)
    # the same counters see the tasks' reads when the graph is computed
    with _CountComputes(c):
        dask.compute(*tasks, scheduler="sync")
    assert c.computes, "the compute was not seen"
    assert len(c.reads) > 0, f"{case}: computing its graph read nothing the counters see"
