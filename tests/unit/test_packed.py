"""Task arguments dask does not walk (:mod:`pipeline.graph.packed`), and the fit's graph
builders using them: a block plan never reaches dask's traversal of task arguments."""

from __future__ import annotations

import importlib
import pickle
from typing import Any

import numpy as np
import pytest
from dask import delayed
from dask.delayed import Delayed

from pipeline.bench.common import synthetic_store
from pipeline.graph.fit import build_fit_tasks, build_scan_tasks
from pipeline.graph.packed import Packed, call_packed
from pipeline.kernels.cmd import References
from pipeline.plan.fit import BlockPlan, StatsLayout, plan_fit
from pipeline.plan.layout import RowLayout
from pipeline.store.trajectory import TrajectoryStore


def _join(*parts: object) -> tuple[object, ...]:
    return parts


def test_call_packed_passes_the_packed_arguments_then_the_rest_in_order() -> None:
    packed = Packed(("a", 2, [3]))
    assert call_packed(_join, packed, "x", 5) == ("a", 2, [3], "x", 5)
    back = pickle.loads(pickle.dumps(packed))
    assert isinstance(back, Packed) and back.args == ("a", 2, [3])


def test_dask_hands_a_packed_argument_over_as_it_is() -> None:
    """What Packed is for: dask does not look inside it (so nothing in it may be a dask
    collection: a delayed value inside stays a Delayed), while the other arguments are
    resolved."""
    inner = delayed(lambda: 41)()
    outer = delayed(lambda: 1)()
    got = delayed(call_packed)(_join, Packed((inner,)), outer).compute(scheduler="sync")
    assert isinstance(got[0], Delayed)
    assert got[1] == 1


@pytest.fixture
def small_fit(tmp_path: Any) -> tuple[Any, list[BlockPlan], np.ndarray, References]:
    url = str(tmp_path / "store")
    synthetic_store(url, 6000, 6, 2, layers=4)
    st = TrajectoryStore.open(url, writable=True)
    meta = st.require_meta()
    grid = st.chunk_grid()
    plan = plan_fit(
        meta, "s", chunk_rows=grid.chunk_rows, raw=True, modes=2, threshold=None, samples=20,
        seed=0, window=None, block_rows=1000,
    )  # fmt: skip
    layout = RowLayout.from_entries([(t.name, t.offset, t.size) for t in meta.stored_tensors()])
    rows = np.array([0, 3000], dtype=np.int64)
    plans = plan.block_plans(layout, rows, rows)
    cols = np.asarray(plan.cols, dtype=np.int64)
    refs = References.from_profiles(np.stack([np.linspace(0, 1, 6), np.linspace(1, 0, 6) ** 2]))
    return grid, plans, cols, refs


def test_fit_and_scan_tasks_keep_block_plans_out_of_dasks_walk(
    small_fit: tuple[Any, list[BlockPlan], np.ndarray, References], monkeypatch: Any
) -> None:
    grid, plans, cols, refs = small_fit
    assert len(plans) > 1 and all(len(p.layers) for p in plans)
    seen: list[type] = []
    module = importlib.import_module("dask.delayed")  # (dask.delayed is also a function)
    original = module.unpack_collections

    def recording(expr: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(type(expr))
        return original(expr, *args, **kwargs)

    monkeypatch.setattr(module, "unpack_collections", recording)
    layout = StatsLayout(2, len(cols), max(len(p.layers) for p in plans))
    fit_tasks = build_fit_tasks(grid, "s", plans, cols, refs, layout)
    scan_tasks = build_scan_tasks(grid, plans, cols, 5, 0)
    assert seen  # the recorder is the function dask calls
    assert BlockPlan not in seen
    monkeypatch.undo()
    assert [str(t.key) for t in fit_tasks] == [f"fit-s-{p.index}" for p in plans]
    assert [str(t.key) for t in scan_tasks] == [f"scan-{p.index}" for p in plans]
    pools, nbytes = scan_tasks[0].compute(scheduler="sync")
    assert nbytes > 0 and sum(p.count for p in pools) > 0
