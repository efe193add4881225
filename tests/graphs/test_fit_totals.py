"""The end of the fit: the blocks' statistics folded in a tree of tasks, one vector gathered.

- :meth:`StatsLayout.fold` against sums written out by hand from the row layout;
- :meth:`Runner.compute` with ``reduce``: the reduction's value comes back, the tasks'
  results do not (nothing of theirs is left on the cluster), errors name the failing task;
- a fit resumed with half its blocks finished earlier (their rows read by the tree's leaves)
  gives the same summary, bit for bit, as the fit done in one go; a block without statistics
  is an error, not a summary.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from dask import delayed
from distributed import Client, LocalCluster
from helpers import SYNC, THREADS, modal_state_dicts, write_safetensors_run

import pipeline
from pipeline.errors import StoreError
from pipeline.plan.fit import StatsLayout
from pipeline.runtime import Runner, RuntimeOptions


def _rows(layout: StatsLayout, n_layers: int, n_blocks: int, seed: int = 0) -> np.ndarray:
    """Block rows with integer-valued sums (exact in any order) and 1-2 layers per block."""
    rng = np.random.default_rng(seed)
    rows = np.zeros((n_blocks, layout.width))
    for b in range(n_blocks):
        row = rows[b]
        k = 1 + b % 2
        ids = np.full(layout.max_layers, -1.0)
        ids[:k] = sorted(rng.choice(n_layers, size=k, replace=False))
        row[layout.layer_ids] = ids
        row[layout.modes] = rng.integers(0, 100, layout.PER * layout.n_modes)
        row[layout.layers] = rng.integers(0, 100, layout.PER * layout.max_layers)
        row[layout.residual_t] = rng.integers(0, 100, layout.n_epochs)
        row[layout.energy_t] = rng.integers(0, 100, layout.n_epochs)
        row[layout.spread_t] = rng.integers(0, 100, layout.n_epochs)
    return rows


def test_fold_sums_modes_layers_and_epochs_as_the_layout_says() -> None:
    layout = StatsLayout(n_modes=3, n_epochs=5, max_layers=2)
    n_layers, per = 4, StatsLayout.PER
    rows = _rows(layout, n_layers, 9)
    # by hand, from the documented row layout: ids | PER per mode | PER per layer | 3 x T
    m, lmax, t = 3, 2, 5
    want_mode = np.zeros((m, per))
    want_layer = np.zeros((n_layers, per))
    want_t = np.zeros((3, t))
    for row in rows:
        ids = [int(v) for v in row[:lmax] if v >= 0]
        want_mode += row[lmax : lmax + per * m].reshape(m, per)
        block = row[lmax + per * m : lmax + per * (m + lmax)].reshape(lmax, per)
        for k, lid in enumerate(ids):
            want_layer[lid] += block[k]
        want_t += row[lmax + per * (m + lmax) :].reshape(3, t)
    totals = layout.fold(rows, n_layers)
    assert totals.shape == (layout.totals_width(n_layers),)
    got_mode, got_layer, res_t, en_t, sp_t = layout.unfold(totals, n_layers)
    np.testing.assert_array_equal(got_mode, want_mode)
    np.testing.assert_array_equal(got_layer, want_layer)
    np.testing.assert_array_equal(np.stack([res_t, en_t, sp_t]), want_t)
    # folds of parts add up to the fold of the whole (integer values: exactly)
    parts = layout.fold(rows[:4], n_layers) + layout.fold(rows[4:], n_layers)
    np.testing.assert_array_equal(parts, totals)
    # a block without statistics (its row still the fill value NaN) poisons the totals
    rows[3] = np.nan
    assert np.isnan(layout.unfold(layout.fold(rows, n_layers), n_layers)[1]).all()


def _square(i: int) -> int:
    return i * i


def _sum(*xs: int) -> int:
    return sum(xs)


def _fail_on(i: int, bad: int) -> int:
    if i == bad:
        raise ValueError(f"task {i} is broken")
    return i


@pytest.fixture(scope="module")
def cluster_runner():
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0")
        as cluster,
        Client(cluster) as client,
    ):  # fmt: skip
        yield Runner(RuntimeOptions(progress=False), client)


@pytest.mark.parametrize("where", ["sync", "threads", "cluster"])
def test_compute_with_reduce_returns_only_the_reduction(where: str, cluster_runner) -> None:
    r = {"sync": Runner(SYNC), "threads": Runner(THREADS), "cluster": cluster_runner}[where]
    tasks = [delayed(_square, pure=False)(i, dask_key_name=f"sq-{where}-{i}") for i in range(40)]
    total = delayed(_sum)(*tasks, dask_key_name=f"sum-{where}")
    if where == "cluster":
        # the client fetches the reduction's value only, never a task's result
        import distributed

        fetched: list[str] = []
        real = distributed.Future.result

        def result(self, *a, **k):
            fetched.append(str(self.key))
            return real(self, *a, **k)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(distributed.Future, "result", result)
            assert r.compute(tasks, "squares", reduce=total) == sum(i * i for i in range(40))
        assert fetched == [f"sum-{where}"]
    else:
        assert r.compute(tasks, "squares", reduce=total) == sum(i * i for i in range(40))
    if where == "cluster":
        # nothing of the tasks (or of the reduction) is held on the cluster afterwards (the
        # client's releases reach the scheduler asynchronously: a moment to settle)
        import time

        def held() -> list[str]:
            return r.client.run_on_scheduler(
                lambda dask_scheduler: sorted(
                    str(k) for k in dask_scheduler.tasks if str(k).startswith(("sq-", "sum-"))
                )
            )

        deadline = time.monotonic() + 10
        while held() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert held() == []
    # without reduce: every result, in order (as before)
    assert r.compute(tasks[:3], "squares") == [0, 1, 4]


@pytest.mark.parametrize("where", ["sync", "cluster"])
def test_compute_with_reduce_raises_the_failing_tasks_error(where: str, cluster_runner) -> None:
    r = {"sync": Runner(SYNC), "cluster": cluster_runner}[where]
    tasks = [delayed(_fail_on, pure=False)(i, 3, dask_key_name=f"f-{where}-{i}") for i in range(6)]
    total = delayed(_sum)(*tasks, dask_key_name=f"fsum-{where}")
    labels = [f"block {i}" for i in range(6)]
    with pytest.raises(ValueError, match="task 3 is broken") as info:
        r.compute(tasks, "failing", labels, reduce=total)
    if where == "cluster":
        assert any("block 3" in n for n in getattr(info.value, "__notes__", []))


@pytest.fixture(scope="module")
def small_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("totals")
    ck = write_safetensors_run(tmp / "ck", modal_state_dicts(10, seed=5))[0].parent
    store = tmp / "s.zarr"
    pipeline.ingest([str(ck)], str(store), runtime=SYNC, chunk_rows=400)
    return store


def _status_running(store: Path, name: str) -> None:
    """Mark a complete study as interrupted (what a killed fit leaves)."""
    from pipeline.store.analysis import AnalysisGroup

    AnalysisGroup(str(store), name).set_attrs(status="running")


def test_resumed_fit_reads_finished_rows_in_tasks_and_sums_to_the_same_bits(
    small_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    import pipeline.graph.fit as gfit

    monkeypatch.setattr(gfit, "TOTALS_FAN_IN", 4)  # 17 blocks: 5 leaves, 2 levels above

    one = pipeline.fit(str(small_store), "one", modes=3, block_rows=200, runtime=SYNC)
    n_blocks = one.blocks_run
    assert n_blocks >= 8
    store = tmp_path / "copy.zarr"
    shutil.copytree(small_store, store)
    _status_running(store, "one")
    # half the blocks "not finished": their statistics rows (the finish marks) removed
    stats = store / "analyses" / "one" / "block_stats" / "c"
    gone = list(range(0, n_blocks, 2))
    for i in gone:
        (stats / str(i) / "0").unlink()
    again = pipeline.fit(str(store), "one", modes=3, block_rows=200, runtime=THREADS)
    assert again.status == "resumed"
    assert (again.blocks_run, again.blocks_kept) == (len(gone), n_blocks - len(gone))
    assert again.summary == one.summary
    assert json.dumps(again.summary) == json.dumps(one.summary)


def test_a_block_without_statistics_is_an_error(
    small_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.graph.fit as gfit

    real = gfit.read_block_rows

    def lose_one(url, name, indices, width):  # a row that a store lost
        out = real(url, name, indices, width)
        out[:1] = np.nan
        return out

    pipeline.fit(str(small_store), "lost", modes=3, block_rows=200, runtime=SYNC)
    store = Path(small_store)
    _status_running(store, "lost")
    (store / "analyses" / "lost" / "block_stats" / "c" / "1" / "0").unlink()
    monkeypatch.setattr(gfit, "read_block_rows", lose_one)
    with pytest.raises(StoreError, match="some blocks have no statistics"):
        pipeline.fit(str(small_store), "lost", modes=3, block_rows=200, runtime=SYNC)
