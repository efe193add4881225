"""A real Dask cluster (a scheduler and worker processes started with the ``dask`` CLI) and
fault-injection worker plugins, for ``tests/slow/test_dask_cluster.py``.

Workers import this module to unpickle the plugins (``PYTHONPATH`` holds ``tests/``), so it
imports nothing heavy at module level: no torch, no ``helpers``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from distributed.diagnostics.plugin import WorkerPlugin

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent
CLI = [sys.executable, "-m", "pipeline.cli"]
LOOPBACK = ("127.0.0.1", "::1")

T = TypeVar("T")


def dask_cli() -> str | None:
    """The ``dask`` console script of this interpreter's environment (else one on PATH)."""
    import shutil

    return shutil.which("dask", path=str(Path(sys.executable).parent)) or shutil.which("dask")


def wait_for(
    predicate: Callable[[], T],
    timeout: float,
    what: str,
    *,
    interval: float = 0.02,
    alive: Callable[[], str | None] | None = None,
) -> T:
    """Poll ``predicate`` until it returns something truthy; return that.

    ``alive`` is called on every round; a string it returns (e.g. "the ingest exited with 0")
    aborts the wait with that explanation.
    """
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if got:
            return got
        if alive is not None:
            why = alive()
            if why:
                raise AssertionError(f"gave up waiting for {what}: {why}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def subprocess_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment of every subprocess: ``tests/`` and the repository importable, no
    ``CMD_PIPELINE_SCHEDULER`` inherited (it would silently turn ``--sync`` runs into
    cluster runs)."""
    env = dict(os.environ)
    env.pop("CMD_PIPELINE_SCHEDULER", None)
    paths = [str(TESTS_DIR), str(REPO)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def tail(path: Path, n: int = 40) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"({path} unreadable)"
    return "\n".join(lines[-n:])


# --------------------------------------------------------------------------- processes
def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


def group_members(pgids: Sequence[int]) -> list[int]:
    """Live (not zombie) processes in any of the process groups ``pgids``."""
    import psutil

    out = []
    wanted = set(pgids)
    for p in psutil.process_iter(["pid", "status"]):
        if p.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if _pgid(p.info["pid"]) in wanted:
            out.append(p.info["pid"])
    return out


def process_gone(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def kill_groups(procs: Sequence[subprocess.Popen[Any]], grace: float = 5.0) -> list[int]:
    """Stop the process groups led by ``procs`` (started with ``start_new_session=True``):
    SIGTERM, then SIGKILL after ``grace`` seconds; reap the leaders. Returns the pids of
    processes of those groups still alive afterwards (leaks; they are SIGKILLed too)."""
    pgids = [p.pid for p in procs]
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        for g in pgids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(g, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            for p in procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=0)
            if all(p.returncode is not None for p in procs) and not group_members(pgids):
                return []
            time.sleep(0.05)
    leaked = group_members(pgids)
    for pid in leaked:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return leaked


@dataclass
class CliRun:
    """A ``cmd-pipeline`` process started in the background (stdout and stderr in files)."""

    proc: subprocess.Popen[Any]
    out: Path
    err: Path

    @property
    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def exited(self) -> str | None:
        """For :func:`wait_for`: why waiting makes no sense any more."""
        rc = self.proc.poll()
        if rc is None:
            return None
        return f"the command exited early with {rc}; stderr:\n{self.stderr[-3000:]}"

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_groups([self.proc], grace=1.0)
            raise AssertionError(
                f"the command did not finish in {timeout:.0f} s; stderr:\n{self.stderr[-3000:]}"
            ) from None


@contextlib.contextmanager
def cli_background(args: Sequence[str], workdir: Path, tag: str) -> Iterator[CliRun]:
    out, err = workdir / f"{tag}.stdout", workdir / f"{tag}.stderr"
    with open(out, "wb") as fo, open(err, "wb") as fe:
        proc = subprocess.Popen(
            [*CLI, *args], stdout=fo, stderr=fe, cwd=workdir, env=subprocess_env(),
            start_new_session=True,
        )  # fmt: skip
    run = CliRun(proc, out, err)
    try:
        yield run
    finally:
        if proc.poll() is None:
            kill_groups([proc], grace=1.0)


def cli(
    args: Sequence[str], workdir: Path, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd-pipeline ARGS`` to completion (captured, never raising on failure)."""
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, cwd=workdir, env=subprocess_env(),
        timeout=timeout,
    )  # fmt: skip


# --------------------------------------------------------------------------- the cluster
@dataclass
class Cluster:
    """A scheduler and worker processes (one nanny + one worker process each) on loopback."""

    workdir: Path
    address: str
    client: Any
    procs: list[subprocess.Popen[Any]]
    logs: list[Path]
    nanny_pids: list[int] = field(default_factory=list)

    def worker_pids(self) -> dict[str, int]:
        """Worker address -> pid of the worker process (not its nanny), asked of each worker
        (``scheduler_info()`` carries no pid); a worker that is just dying is left out."""
        pids = self.client.run(os.getpid, on_error="ignore")
        return {addr: int(pid) for addr, pid in pids.items()}

    def wait_workers(
        self, n: int, timeout: float = 60, exclude: Sequence[int] = ()
    ) -> dict[str, int]:
        """Wait until ``n`` workers are registered, none of them with a pid in ``exclude``."""

        def ready() -> dict[str, int] | None:
            pids = self.worker_pids()
            ok = len(pids) == n and not set(pids.values()) & set(exclude)
            return pids if ok else None

        return wait_for(
            ready, timeout, f"{n} worker(s) on {self.address}\n{self.log_tails()}", interval=0.1
        )

    def listening(self) -> list[tuple[int, str, int]]:
        """(pid, ip, port) of every listening TCP socket of the cluster's processes."""
        import psutil

        out = []
        for pid in group_members([p.pid for p in self.procs]):
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                for c in psutil.Process(pid).net_connections(kind="inet"):
                    if c.status == psutil.CONN_LISTEN:
                        out.append((pid, c.laddr.ip, c.laddr.port))
        return out

    def log_tails(self, n: int = 15) -> str:
        return "\n".join(f"--- {p.name}\n{tail(p, n)}" for p in self.logs)

    def register(self, plugin: WorkerPlugin) -> None:
        """Register a worker plugin: on every worker now, and on workers that (re)start later."""
        self.client.register_plugin(plugin, name=plugin.name)

    def unregister(self, plugin: WorkerPlugin) -> None:
        self.client.unregister_worker_plugin(plugin.name)


@contextlib.contextmanager
def start_cluster(
    workdir: Path,
    n_workers: int = 2,
    *,
    scheduler_env: Mapping[str, str] | None = None,
    memory_limit: str = "2GB",
    timeout: float = 90,
) -> Iterator[Cluster]:
    """Start ``dask scheduler`` and ``n_workers`` ``dask worker`` processes, each in its own
    session, with ``workdir`` as working directory; yield a :class:`Cluster` with a connected
    client; on exit kill every process group and fail if a process outlived that."""
    from distributed import Client

    dask = dask_cli()
    assert dask is not None, "the dask CLI is missing"
    workdir.mkdir(parents=True, exist_ok=True)
    sched_file = workdir / "scheduler.json"
    sched_file.unlink(missing_ok=True)
    procs: list[subprocess.Popen[Any]] = []
    logs: list[Path] = []
    client = None
    cluster: Cluster | None = None

    def spawn(cmd: list[str], log: Path, env: Mapping[str, str]) -> subprocess.Popen[Any]:
        with open(log, "wb") as out:
            p = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, cwd=workdir, env=dict(env),
                start_new_session=True,
            )  # fmt: skip
        procs.append(p)
        logs.append(log)
        return p

    def describe() -> str:
        return "\n".join(f"--- {p.name}\n{tail(p)}" for p in logs)

    try:
        sched = spawn(
            [
                dask, "scheduler", "--host", "127.0.0.1", "--port", "0",
                "--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(sched_file),
                # a safety net should this test process be killed without its teardown
                "--idle-timeout", "900s",
            ],
            workdir / "scheduler.log",
            subprocess_env(scheduler_env),
        )  # fmt: skip

        def scheduler_file_ready() -> bool:
            if sched.poll() is not None:
                raise AssertionError(f"the scheduler exited with {sched.returncode}:\n{describe()}")
            return sched_file.exists() and sched_file.stat().st_size > 0

        wait_for(scheduler_file_ready, timeout, "the scheduler file", interval=0.05)
        for k in range(n_workers):
            spawn(
                [
                    dask, "worker", "--scheduler-file", str(sched_file), "--host", "127.0.0.1",
                    "--nworkers", "1", "--nthreads", "1", "--dashboard-address", "127.0.0.1:0",
                    "--memory-limit", memory_limit, "--local-directory", str(workdir),
                    "--name", f"w{k}", "--death-timeout", "60",
                ],
                workdir / f"worker{k}.log",
                subprocess_env(),
            )  # fmt: skip
        client = Client(scheduler_file=str(sched_file), timeout=timeout)
        cluster = Cluster(workdir, client.scheduler.address, client, procs, logs)
        cluster.nanny_pids = [p.pid for p in procs[1:]]

        def workers_up() -> bool:
            for p in procs:
                if p.poll() is not None:
                    raise AssertionError(f"{p.args[:2]} exited with {p.returncode}:\n{describe()}")
            return len(client.scheduler_info(n_workers=-1)["workers"]) == n_workers

        wait_for(workers_up, timeout, f"{n_workers} workers", interval=0.1)
        yield cluster
    finally:
        if client is not None:
            with contextlib.suppress(Exception):
                client.close(timeout=5)
        leaked = kill_groups(procs)
        assert not leaked, f"processes outlived the cluster's teardown (killed now): {leaked}"


# --------------------------------------------------------------------------- plugins
class HoldWrites(WorkerPlugin):
    """Freeze chunk writes half-way, to kill a worker in the middle of one.

    Patches the local-store writers (the project's, :func:`pipeline.store.keys._atomic`, and
    zarr's own) so that a write whose path contains ``match`` pauses after the
    temporary ``*.partial`` file is written and before it is renamed into place, as long as
    the file ``<control>/hold`` exists and this worker process has already finished ``after``
    such writes. While paused, ``<control>/midwrite-<pid>`` holds the temporary file's path.
    """

    name = "test-hold-writes"

    def __init__(self, control: str, match: str, after: int, max_hold: float = 120.0) -> None:
        self.control = control
        self.match = match
        self.after = after
        self.max_hold = max_hold

    def setup(self, worker: Any) -> None:
        import zarr.storage._local as local

        plugin = self
        self._local = local
        self._orig = orig = local._atomic_write
        self._seen = 0

        @contextlib.contextmanager
        def atomic_write(path: Path, mode: Any, exclusive: bool = False) -> Iterator[Any]:
            with orig(path, mode, exclusive=exclusive) as f:
                yield f
                if plugin.match in Path(path).as_posix():
                    f.flush()
                    plugin._maybe_hold(f.name)

        local._atomic_write = atomic_write

        from pipeline.store import keys

        self._keys = keys
        self._orig_atomic = orig_atomic = keys._atomic

        def atomic(path: Path, fill: Callable[[int], object]) -> None:
            def fill_then_hold(fd: int) -> None:
                fill(fd)
                if plugin.match in Path(path).as_posix():
                    plugin._maybe_hold(os.readlink(f"/proc/self/fd/{fd}"))

            orig_atomic(path, fill_then_hold)

        keys._atomic = atomic

    def _maybe_hold(self, tmp_name: str) -> None:
        self._seen += 1
        hold = Path(self.control, "hold")
        if self._seen <= self.after or not hold.exists():
            return
        marker = Path(self.control, f"midwrite-{os.getpid()}")
        # staged under a name that the tests' "midwrite-*" glob cannot match, then renamed
        staged = Path(self.control, f".staging-midwrite-{os.getpid()}")
        staged.write_text(tmp_name)
        staged.replace(marker)
        deadline = time.monotonic() + self.max_hold
        try:
            while hold.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            marker.unlink(missing_ok=True)

    def teardown(self, worker: Any) -> None:
        if getattr(self, "_local", None) is not None:
            self._local._atomic_write = self._orig
        if getattr(self, "_keys", None) is not None:
            self._keys._atomic = self._orig_atomic


class RecordTasks(WorkerPlugin):
    """Append ``<state> <key>`` to ``<control>/tasks-<pid>`` whenever a task starts executing
    (``executing``) or finishes (``memory``, ``error``)."""

    name = "test-record-tasks"

    def __init__(self, control: str) -> None:
        self.control = control

    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        if finish in ("executing", "memory", "error"):
            with open(Path(self.control, f"tasks-{os.getpid()}"), "a") as f:
                f.write(f"{finish} {key}\n")


def recorded_tasks(control: Path) -> dict[str, set[str]]:
    """State -> keys, as recorded by :class:`RecordTasks` (all workers together)."""
    out: dict[str, set[str]] = {}
    for p in control.glob("tasks-*"):
        for line in p.read_text().splitlines():
            state, _, key = line.partition(" ")
            out.setdefault(state, set()).add(key)
    return out


class CrashOnTask(WorkerPlugin):
    """Kill the worker process (``os._exit(1)``) whenever the task ``key`` starts executing;
    each crash leaves a file ``<control>/crash-<pid>``."""

    name = "test-crash-on-task"

    def __init__(self, key: str, control: str) -> None:
        self.key = key
        self.control = control

    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        if finish == "executing" and str(key) == self.key:
            Path(self.control, f"crash-{os.getpid()}").write_text(str(key))
            os._exit(1)
