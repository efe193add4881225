"""The distributed runtime on a real cluster: a ``dask scheduler`` and two ``dask worker``
processes (each a nanny and a worker process) on loopback, driven through the CLI with
``--scheduler``.

- results are byte for byte those of ``--sync``;
- a worker SIGKILLed in the middle of a chunk write (ingest) or a block write (fit) is
  restarted by its nanny, the job completes, equal to a clean run, with no ``*.partial`` left;
- a task that kills its worker every time fails the command with a one-line error naming the
  task and its rows; everything else stays, and the re-run completes the store;
- a client interrupted with SIGINT exits with 130; the re-run completes the store.

Faults are injected with worker plugins (``dask_cluster_helpers.py``) registered from this process.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from dask_cluster_helpers import (
    LOOPBACK,
    Cluster,
    CrashOnTask,
    HoldWrites,
    RecordTasks,
    cli,
    cli_background,
    dask_cli,
    process_gone,
    recorded_tasks,
    start_cluster,
    wait_for,
)
from test_cmd_resume import N_A, N_B, T
from test_cmd_resume import _write_run as write_planted_run
from test_kill_resume import _snapshot as sha256_snapshot

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(dask_cli() is None, reason="the dask CLI (distributed) is not installed"),
]

N = N_A + N_B  # 200,000 rows: 150,000 float32 + 50,000 float16, T = 8 epochs, 4 planted modes
CHUNK_ROWS = 10_000  # 20 row blocks x 8 epochs = 160 write tasks
BLOCK_ROWS = 5_000  # 40 fit tasks
N_CHUNKS = (N // CHUNK_ROWS) * T
N_BLOCKS = N // BLOCK_ROWS
NAME = "r"
ALLOWED_FAILURES = 1  # of the cluster in test_task_that_kills_its_worker_...


@dataclass(frozen=True)
class Data:
    root: Path
    ckpts: Path
    ingested: Path  # clean --sync ingest
    fitted: Path  # the same, then a clean --sync fit


def ingest_args(ckpts: Path, store: Path, runtime: list[str]) -> list[str]:
    # one task per chunk: the fault injection below targets one chunk's task by its key
    return [
        "ingest", str(ckpts), "--store", str(store), "--chunk-rows", str(CHUNK_ROWS),
        "--chunks-per-task", "1", "--no-progress", *runtime,
    ]  # fmt: skip


def fit_args(store: Path, runtime: list[str]) -> list[str]:
    return [
        "fit", "--store", str(store), "--name", NAME, "--modes", "4", "--block-rows",
        str(BLOCK_ROWS), "--no-progress", *runtime,
    ]  # fmt: skip


def on(cluster: Cluster) -> list[str]:
    return ["--scheduler", cluster.address]


def check(r: subprocess.CompletedProcess[str], what: str) -> None:
    assert r.returncode == 0, (
        f"{what} exited with {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Data:
    root = tmp_path_factory.mktemp("cluster-data")
    ckpts = write_planted_run(root)
    ingested, fitted = root / "ingested.zarr", root / "fitted.zarr"
    check(cli(ingest_args(ckpts, ingested, ["--sync"]), root), "sync ingest")
    shutil.copytree(ingested, fitted)
    check(cli(fit_args(fitted, ["--sync"]), root), "sync fit")
    assert count_chunks(ingested) == N_CHUNKS
    return Data(root, ckpts, ingested, fitted)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One cluster for the tests that kill nothing."""
    with start_cluster(tmp_path_factory.mktemp("cluster")) as c:
        yield c


@pytest.fixture
def fresh_cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A cluster of this test's own (the test kills or crashes workers)."""
    with start_cluster(tmp_path / "cluster") as c:
        assert_loopback_only(c)
        yield c


@pytest.fixture
def control(tmp_path: Path) -> Path:
    d = tmp_path / "control"
    d.mkdir()
    return d


# --------------------------------------------------------------------------- store checks
def count_chunks(store: Path) -> int:
    c = store / "trajectory" / "c"
    if not c.exists():
        return 0
    return sum(1 for p in c.rglob("*") if p.is_file() and not p.name.endswith(".partial"))


def finished_blocks(store: Path) -> int:
    c = store / "analyses" / NAME / "block_stats" / "c"
    return sum(1 for _ in c.glob("*/0")) if c.exists() else 0


def partials(store: Path) -> list[str]:
    return sorted(str(p.relative_to(store)) for p in store.rglob("*.partial"))


def assert_same_store(got: Path, want: Path) -> None:
    """Every file of ``got`` has the sha256 of the same file of ``want``, and no file is
    missing or extra; the message lists the differences (and the JSON values that differ)."""
    a, b = sha256_snapshot(got), sha256_snapshot(want)
    missing = sorted(set(b) - set(a))
    extra = sorted(set(a) - set(b))
    differ = sorted(k for k in set(a) & set(b) if a[k] != b[k])
    if not (missing or extra or differ):
        return
    lines = [f"{got} differs from {want}:"]
    lines += [f"  missing: {k}" for k in missing[:20]]
    lines += [f"  extra:   {k}" for k in extra[:20]]
    for k in differ[:20]:
        lines.append(f"  differs: {k}")
        if k.endswith(".json"):
            lines += [f"      {d}" for d in _json_diff(got / k, want / k)[:10]]
    raise AssertionError("\n".join(lines))


def _json_diff(p: Path, q: Path) -> list[str]:
    import json

    out: list[str] = []

    def walk(x: object, y: object, where: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                walk(x.get(k, "<absent>"), y.get(k, "<absent>"), f"{where}.{k}")
        elif isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
            for i, (u, v) in enumerate(zip(x, y, strict=True)):
                walk(u, v, f"{where}[{i}]")
        elif x != y:
            out.append(f"{where}: got {str(x)[:120]}, want {str(y)[:120]}")

    walk(json.loads(p.read_text()), json.loads(q.read_text()), "")
    return out


def assert_loopback_only(c: Cluster) -> None:
    info = c.client.scheduler_info(n_workers=-1)
    addrs = [info["address"], *info["workers"], *(w["nanny"] for w in info["workers"].values())]
    assert all(a.startswith("tcp://127.0.0.1:") for a in addrs), addrs
    sockets = c.listening()
    assert sockets, "found no listening socket of the cluster's processes"
    outside = [s for s in sockets if s[1] not in LOOPBACK]
    assert not outside, f"listening beyond loopback (pid, ip, port): {outside}"


def kill_worker_mid_write(
    c: Cluster, control: Path, alive: Callable[[], str | None]
) -> tuple[int, str]:
    """Wait until a worker is frozen half-way through a write (see HoldWrites), SIGKILL its
    worker process (not the nanny) and return its pid and the temporary file it left."""
    marker = wait_for(
        lambda: next(iter(control.glob("midwrite-*")), None), 90, "a worker to freeze mid-write",
        alive=alive,
    )  # fmt: skip
    pid = int(marker.name.split("-")[1])
    partial = marker.read_text()
    pids = c.worker_pids()
    assert pid in pids.values(), f"pid {pid} is not a worker process of {pids}"
    assert pid not in c.nanny_pids
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: process_gone(pid), 10, f"worker process {pid} to die")
    return pid, partial


# --------------------------------------------------------------------------- the tests
def test_cluster_listens_on_loopback_only(cluster: Cluster) -> None:
    assert_loopback_only(cluster)


def test_cluster_results_are_byte_identical_to_sync(
    data: Data, cluster: Cluster, tmp_path: Path, control: Path
) -> None:
    store = tmp_path / "cluster.zarr"
    cluster.register(RecordTasks(str(control)))
    try:
        check(cli(ingest_args(data.ckpts, store, on(cluster)), tmp_path), "cluster ingest")
        assert_same_store(store, data.ingested)
        check(cli(fit_args(store, on(cluster)), tmp_path), "cluster fit")
    finally:
        cluster.unregister(RecordTasks(str(control)))
    assert_same_store(store, data.fitted)
    assert not partials(store)
    # the work really ran on the cluster's workers, one task per chunk and per block, under
    # the keys that the fault-injection tests below rely on
    done = recorded_tasks(control).get("memory", set())
    writes = {k for k in done if k.startswith("write-")}
    fits = {k for k in done if k.startswith("fit-")}
    want_writes = {f"write-{j}-{i}" for i in range(N // CHUNK_ROWS) for j in range(T)}
    assert writes == want_writes, sorted(writes ^ want_writes)[:10]
    assert fits == {f"fit-{NAME}-{b}" for b in range(N_BLOCKS)}, sorted(fits)[:10]
    # and the blocks' statistics were folded there too (40 blocks: one leaf of the tree)
    assert {k for k in done if k.startswith("totals-")} == {f"totals-{NAME}-0-0"}
    assert_loopback_only(cluster)


def test_worker_killed_mid_ingest(
    data: Data, fresh_cluster: Cluster, tmp_path: Path, control: Path
) -> None:
    c = fresh_cluster
    hold = control / "hold"
    hold.touch()
    c.register(HoldWrites(str(control), "/trajectory/c/", after=10))
    store = tmp_path / "s.zarr"
    with cli_background(ingest_args(data.ckpts, store, on(c)), tmp_path, "ingest") as run:
        pid, partial = kill_worker_mid_write(c, control, run.exited)
        done = count_chunks(store)
        assert 0 < done < N_CHUNKS, done
        assert Path(partial).exists(), "the killed write left no temporary file: the kill missed"
        hold.unlink()
        rc = run.wait(120)
        assert rc == 0, f"exit code {rc}; stderr:\n{run.stderr}"
    restarted = c.wait_workers(2, exclude=[pid])
    assert len(restarted) == 2  # the nanny restarted the killed worker
    assert partials(store) == [], (
        f"temporary files left behind (the kill was mid-write of {partial})"
    )
    assert_same_store(store, data.ingested)


def test_worker_killed_mid_fit(
    data: Data, fresh_cluster: Cluster, tmp_path: Path, control: Path
) -> None:
    c = fresh_cluster
    store = tmp_path / "s.zarr"
    shutil.copytree(data.ingested, store)
    hold = control / "hold"
    hold.touch()
    # the second of the six result arrays a block writes: its first array is already in place
    c.register(HoldWrites(str(control), f"/analyses/{NAME}/a/c/", after=3))
    with cli_background(fit_args(store, on(c)), tmp_path, "fit") as run:
        pid, partial = kill_worker_mid_write(c, control, run.exited)
        done = finished_blocks(store)
        assert 0 < done < N_BLOCKS, done
        assert Path(partial).exists(), "the killed write left no temporary file: the kill missed"
        hold.unlink()
        rc = run.wait(120)
        assert rc == 0, f"exit code {rc}; stderr:\n{run.stderr}"
    c.wait_workers(2, exclude=[pid])
    assert partials(store) == [], (
        f"temporary files left behind (the kill was mid-write of {partial})"
    )
    assert_same_store(store, data.fitted)


@pytest.fixture
def failing_cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A cluster that gives up on a task after it killed 2 workers (allowed-failures = 1), and
    that holds one task per single-threaded worker (worker-saturation = 1.0), so that only
    the crashing task is on a worker when it dies and no other task collects failures."""
    env = {
        "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": str(ALLOWED_FAILURES),
        "DASK_DISTRIBUTED__SCHEDULER__WORKER_SATURATION": "1.0",
    }
    with start_cluster(tmp_path / "cluster", scheduler_env=env) as c:
        assert_loopback_only(c)
        yield c


@pytest.mark.parametrize("stage", ["ingest", "fit"])
def test_task_that_kills_its_worker_fails_cleanly_and_resumes(
    data: Data, failing_cluster: Cluster, tmp_path: Path, control: Path, stage: str
) -> None:
    c = failing_cluster
    store = tmp_path / "s.zarr"
    if stage == "ingest":
        i, j = 7, 5
        key, r0, r1 = f"write-{j}-{i}", i * CHUNK_ROWS, (i + 1) * CHUNK_ROWS
        args, want = ingest_args(data.ckpts, store, on(c)), data.ingested
        lost = {f"trajectory/c/{i}/{j}"}
    else:
        shutil.copytree(data.ingested, store)
        b = 13
        key, r0, r1 = f"fit-{NAME}-{b}", b * BLOCK_ROWS, (b + 1) * BLOCK_ROWS
        args, want = fit_args(store, on(c)), data.fitted
        lost = {f"analyses/{NAME}/block_stats/c/{b}/0"}
    crash = CrashOnTask(key, str(control))
    c.register(RecordTasks(str(control)))
    c.register(crash)
    try:
        t0 = time.monotonic()
        r = cli(args, tmp_path, timeout=180)
        took = time.monotonic() - t0
    finally:
        c.unregister(crash)
    crashes = sorted(p.name for p in control.glob("crash-*"))
    assert len(crashes) == ALLOWED_FAILURES + 1, (
        f"{key} should have killed {ALLOWED_FAILURES + 1} workers: {crashes}"
    )
    report = (
        f"exit code {r.returncode} after {took:.1f} s\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    )
    assert r.returncode not in (0, 130), report
    assert "Traceback" not in r.stderr, report
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], (
        f"expected one final 'error: ...' line\n{report}"
    )
    msg = errors[0]
    assert key in msg, f"the message does not name the task {key!r}: {msg}"
    nums = {n.replace(",", "").replace("_", "") for n in re.findall(r"\d[\d,_]*", msg)}
    assert re.search(r"\brows?\b", msg) and str(r0) in nums and ({str(r1), str(r1 - 1)} & nums), (
        f"the message does not give the rows {r0}-{r1} of {key}: {msg}"
    )
    assert re.search(r"killed|allowed.failures|died", msg, re.IGNORECASE), (
        f"the message does not say that the task killed its workers: {msg}"
    )

    # everything that finished is there, byte for byte; nothing half-written
    assert partials(store) == [], f"temporary files left behind: {partials(store)}"
    got, ref = sha256_snapshot(store), sha256_snapshot(want)
    prefix = "trajectory/c/" if stage == "ingest" else f"analyses/{NAME}/"
    results = {k for k in got if k.startswith(prefix) and not k.endswith(".json")}
    assert not (lost & set(got)), f"the failed task's result exists: {sorted(lost & set(got))}"
    assert [k for k in results if got[k] != ref.get(k)] == [], (
        "finished results differ from a clean run"
    )
    done = recorded_tasks(control).get("memory", set()) - {key}
    expect: set[str] = set()
    for k in done:
        if stage == "ingest" and k.startswith("write-"):
            _, cj, ci = k.split("-")  # write-{time block}-{row block}
            expect.add(f"trajectory/c/{ci}/{cj}")
        elif stage == "fit" and k.startswith(f"fit-{NAME}-"):
            expect.add(f"analyses/{NAME}/block_stats/c/{k.rsplit('-', 1)[1]}/0")
    assert expect, "no task finished before the failure"
    assert sorted(expect - set(got)) == [], "results of finished tasks are missing"

    # without the fault the same command resumes and completes the store
    c.unregister(RecordTasks(str(control)))
    c.wait_workers(2)
    again = cli(args, tmp_path)
    check(again, "the re-run")
    assert "(resumed)" in again.stdout, again.stdout
    assert partials(store) == []
    assert_same_store(store, want)
    # checked last, so that a wrong number does not hide the checks above: the number the
    # message states is the scheduler's (the client's own dask config may say otherwise)
    stated = re.search(r"allowed.failures\D{0,5}(\d+)", msg)
    assert stated is None or int(stated.group(1)) == ALLOWED_FAILURES, (
        f"the message states allowed-failures = {stated and stated.group(1)}, but the "
        f"scheduler runs with {ALLOWED_FAILURES}: {msg}"
    )


def test_interrupted_client_resumes(
    data: Data, cluster: Cluster, tmp_path: Path, control: Path
) -> None:
    hold = control / "hold"
    hold.touch()
    plugin = HoldWrites(str(control), "/trajectory/c/", after=10)
    cluster.register(plugin)
    store = tmp_path / "s.zarr"
    try:
        with cli_background(ingest_args(data.ckpts, store, on(cluster)), tmp_path, "ingest") as run:
            wait_for(
                lambda: any(control.glob("midwrite-*")), 90, "a worker to freeze mid-write",
                alive=run.exited,
            )  # fmt: skip
            assert 0 < count_chunks(store) < N_CHUNKS
            run.proc.send_signal(signal.SIGINT)
            # the tasks still running on the cluster finish their writes only now
            time.sleep(0.5)
            hold.unlink()
            rc = run.wait(120)
            err = run.stderr
        assert rc == 130, f"exit code {rc}; stderr:\n{err}"
        assert "interrupted" in err, err
        assert "Traceback" not in err, err
        assert partials(store) == [], f"temporary files left behind: {partials(store)}"
    finally:
        hold.unlink(missing_ok=True)
        cluster.unregister(plugin)
    kept = count_chunks(store)
    assert 0 < kept < N_CHUNKS, kept
    # re-run at once, while the cancelled client's tasks may still be finishing
    again = cli(ingest_args(data.ckpts, store, on(cluster)), tmp_path)
    check(again, "the re-run")
    assert "(resumed)" in again.stdout, again.stdout
    assert partials(store) == []
    assert_same_store(store, data.ingested)
