"""Where computations run: an embedded LocalCluster, an existing scheduler, threads or sync.

Library functions build graphs; the functions here run them, with a progress bar on the
client. Nothing listens beyond loopback unless the user asks for it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from pipeline.errors import PipelineError, PipelineWarning, TaskFailedError

__all__ = ["Runner", "RuntimeOptions", "TaskFailedError", "runner", "using"]

_MODES = ("local", "threads", "sync")


@dataclass(frozen=True)
class RuntimeOptions:
    """How to run a graph.

    Parameters
    ----------
    mode
        ``"local"`` (embedded LocalCluster with worker processes, the default), ``"threads"``
        or ``"sync"`` (debugging). Ignored when a scheduler address is given.
    scheduler
        Address of an existing Dask scheduler (``tcp://host:8786``, ``tls://...``). Default:
        the ``CMD_PIPELINE_SCHEDULER`` environment variable, then the dask config key
        ``cmd-pipeline.scheduler`` (YAML in ``~/.config/dask/``, or env
        ``DASK_CMD_PIPELINE__SCHEDULER``).
    workers, threads_per_worker, memory_limit
        Size of the embedded LocalCluster (default: one single-threaded worker per core).
        With ``gpu``, ``workers`` is the number of GPUs to use (the first ones visible);
        with ``threads``, the size of the thread pool.
    progress
        Show a progress bar on stderr.
    gpu
        Run the CMD fit kernel (:func:`pipeline.fit`, and the fits of ``evaluate``'s sweep) on
        CuPy arrays: start a dask-cuda ``LocalCUDACluster`` (one worker per GPU), or use the
        (GPU) workers of ``scheduler``; with ``threads``/``sync``, in-process. Nothing else
        computes on the GPU.
    performance_report
        Save Dask's HTML performance report of the whole command to this file.
    tls_ca_file, tls_cert, tls_key
        Client TLS files for a ``tls://`` scheduler (dask's ``Security``); default: dask's
        config ``distributed.comm.tls.*``.
    """

    mode: str = "local"
    scheduler: str | None = None
    workers: int | None = None
    threads_per_worker: int = 1
    memory_limit: str | None = "auto"
    progress: bool = True
    gpu: bool = False
    performance_report: str | None = None
    tls_ca_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {self.mode!r}")

    @property
    def address(self) -> str | None:
        if self.scheduler:
            return self.scheduler
        env = os.environ.get("CMD_PIPELINE_SCHEDULER")
        if env:
            return env
        import dask

        value = dask.config.get("cmd-pipeline.scheduler", None)
        return str(value) if value else None

    def security(self) -> Any:
        """dask ``Security`` from the TLS options, or None (dask's config applies)."""
        if not (self.tls_ca_file or self.tls_cert or self.tls_key):
            return None
        from distributed.security import Security

        return Security(
            tls_ca_file=self.tls_ca_file,
            tls_client_cert=self.tls_cert,
            tls_client_key=self.tls_key,
            require_encryption=True,
        )


class Runner:
    """Runs lists of delayed tasks with progress; holds the client, if any."""

    def __init__(self, options: RuntimeOptions, client: Any = None) -> None:
        self.options = options
        self.client = client
        self._quiet = 0
        self._storage_generation = 0  # the storage options last installed on the workers

    @contextlib.contextmanager
    def quiet(self) -> Iterator[None]:
        """No per-compute progress bars inside (a caller shows its own, overall bar)."""
        self._quiet += 1
        try:
            yield
        finally:
            self._quiet -= 1

    @property
    def dashboard_link(self) -> str | None:
        return None if self.client is None else self.client.dashboard_link

    def compute(
        self,
        tasks: Sequence[Any],
        desc: str,
        labels: Sequence[str] | None = None,
        *,
        reduce: Any = None,
    ) -> Any:
        """Compute delayed ``tasks``; results in the same order. The first error is raised.

        When a task fails, the error is raised only once no other task of ``tasks`` is still
        running, so a caller that rolls back (deletes what the tasks wrote) is not raced by a
        task that writes after the rollback. ``labels`` (one per task, e.g. "rows 0-2097152,
        epoch 3") name the failing task's chunk in the error.

        ``reduce``: a delayed value that depends on ``tasks`` (e.g. a tree of sums of their
        results). It is computed with them and only its value is returned: the tasks' own
        results never travel to the client, which therefore holds nothing per task (a fit of
        millions of blocks gathers one array, not millions).
        """
        if not tasks and reduce is None:
            return []
        from tqdm.auto import tqdm

        bar = tqdm(
            total=len(tasks),
            desc=desc,
            unit="task",
            disable=not self.options.progress or self._quiet > 0,
            file=sys.stderr,
            leave=True,
        )
        try:
            check_interrupted()
            if self.client is not None:
                self._sync_storage_options()
                out = self._compute_distributed(tasks, bar, desc, labels, reduce)
            else:
                out = self._compute_local(tasks, bar, reduce)
            check_interrupted()  # a Ctrl-C during the last task: the caller commits nothing
            return out
        finally:
            bar.close()

    def _sync_storage_options(self) -> None:
        """Install this process's storage options (:mod:`pipeline.store.remote`) on the
        workers when they changed since the last compute: tasks open stores and checkpoints
        by URL there. A worker plugin, so workers that join later get them too."""
        from pipeline.store import remote

        generation, options = remote.snapshot()
        if generation == self._storage_generation:
            return
        try:
            self.client.register_plugin(storage_options_plugin(options), name=STORAGE_PLUGIN)
        except Exception as e:  # e.g. a cluster that refuses plugins: say why, never the options
            raise PipelineError(
                "cannot install the storage options on the Dask workers "
                f"({type(e).__name__}); set them in the workers' environment instead (fsspec's "
                "FSSPEC_<PROTOCOL> variables)"
            ) from None
        self._storage_generation = generation

    def remove_storage_options(self) -> None:
        """Take the storage options this runner installed off the workers (on leaving a
        runtime that outlives the command: the user's client, or a scheduler's workers)."""
        if self.client is None or self._storage_generation == 0:
            return
        with contextlib.suppress(Exception):  # a closed or gone cluster holds nothing
            self.client.unregister_worker_plugin(STORAGE_PLUGIN)
        self._storage_generation = 0

    def _compute_distributed(
        self,
        tasks: Sequence[Any],
        bar: Any,
        desc: str,
        labels: Sequence[str] | None,
        reduce: Any = None,
    ) -> Any:
        from distributed import as_completed

        futures = self.client.compute(list(tasks) + ([] if reduce is None else [reduce]))
        last = futures.pop() if reduce is not None else None
        index = {f.key: i for i, f in enumerate(futures)}
        # with ``reduce``, a finished task's future is dropped at once: its result stays on the
        # workers only until the reduction has read it
        live = {f.key: f for f in futures}
        results: list[Any] = []
        try:
            for fut in as_completed(futures):
                if fut.status == "error":
                    i = index[fut.key]
                    exc = fut.exception()
                    label = labels[i] if labels is not None else None
                    raise task_error(exc, desc, fut.key, label) from exc
                if last is not None:
                    live.pop(fut.key, None)
                bar.update(1)
                del fut
            if last is None:
                # all results in one batched transfer (a result() per future is one round
                # trip each, one after the other: 2-3 ms per task on a 2-core machine)
                results = list(self.client.gather(futures))
            del futures
            if last is not None:
                if last.status == "error" or not last.done():
                    from distributed import wait

                    wait([last])
                if last.status == "error":
                    exc = last.exception()
                    raise task_error(exc, desc, last.key, "the reduction of the results") from exc
                return last.result()
        except BaseException:
            pending = list(live.values()) + ([last] if last is not None else [])
            self.client.cancel(pending)
            _wait_not_executing(
                self.client, set(index) | ({last.key} if last is not None else set())
            )
            raise
        return results

    def _compute_local(self, tasks: Sequence[Any], bar: Any, reduce: Any = None) -> Any:
        import dask
        from dask.callbacks import Callback

        class _Bar(Callback):
            def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, id: Any) -> None:
                check_interrupted()  # (in the scheduler's thread: stops the computation)
                if key in keys:
                    bar.update(1)

        keys = {t.key for t in tasks}
        # with ``reduce`` only it is asked for: the tasks run as its dependencies and each
        # result is released once the reduction has used it
        wanted = list(tasks) if reduce is None else [reduce]
        if self.options.mode == "sync":
            with _Bar():
                out = dask.compute(*wanted, scheduler="sync")
            return list(out) if reduce is None else out[0]
        from concurrent.futures import ThreadPoolExecutor

        from dask.system import CPU_COUNT  # what dask's own pool uses (cgroup-aware)

        # our own pool: dask raises a task's error while other tasks still run in its pool;
        # shutting ours down waits for them and drops the ones not started yet
        size = self.options.workers or dask.config.get("num_workers", None) or CPU_COUNT
        pool = ThreadPoolExecutor(size)
        try:
            # one BLAS thread per task thread: the pool already uses every core, and nested
            # BLAS threads oversubscribe them (as dask's worker processes avoid by default)
            with _Bar(), _single_threaded_blas():
                out = dask.compute(*wanted, scheduler="threads", pool=pool)
            return list(out) if reduce is None else out[0]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


#: set by :func:`interruptible`'s SIGINT handler. Python ignores an exception raised inside
#: a ``__del__`` (a reader closing its file, say), so a Ctrl-C that lands there would be lost
#: and the work would run on and commit; the flag stops it at the next task's end instead.
_INTERRUPTED = threading.Event()


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Inside, SIGINT raises KeyboardInterrupt as usual and is also remembered, so that
    :func:`check_interrupted` (called by :meth:`Runner.compute` before and after a computation
    and after every local task) raises it again if it was swallowed. A no-op outside the main
    thread (signals are delivered there only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        _INTERRUPTED.set()
        raise KeyboardInterrupt

    _INTERRUPTED.clear()
    old = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        _INTERRUPTED.clear()


def check_interrupted() -> None:
    """Raise KeyboardInterrupt if a SIGINT arrived inside :func:`interruptible`."""
    if _INTERRUPTED.is_set():
        raise KeyboardInterrupt


STORAGE_PLUGIN = "cmd-pipeline-storage-options"


def storage_options_plugin(options: dict[str, dict[str, Any]]) -> Any:
    """A worker plugin that sets fsspec's per-protocol defaults on each worker (the storage
    options of the client's current operation, :mod:`pipeline.store.remote`); replacing or
    removing it puts the worker's earlier defaults back. Its repr names the protocols only."""
    from distributed.diagnostics.plugin import WorkerPlugin

    class StorageOptions(WorkerPlugin):
        name = STORAGE_PLUGIN

        def __init__(self) -> None:
            self._options = options
            self._token: dict[str, Any] | None = None

        def __repr__(self) -> str:
            return f"StorageOptions(protocols={sorted(self._options)})"

        def setup(self, worker: Any) -> None:
            from pipeline.store import remote

            self._token = remote.install(self._options)

        def teardown(self, worker: Any) -> None:
            from pipeline.store import remote

            if self._token is not None:
                remote.uninstall(self._token)
                self._token = None

    return StorageOptions()


@contextlib.contextmanager
def _single_threaded_blas() -> Iterator[None]:
    """Limit BLAS/OpenMP pools to one thread inside (a no-op without threadpoolctl)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1):
        yield


def task_error(exc: BaseException, desc: str, key: Any, label: str | None) -> BaseException:
    """The error to raise for a failed task: our own errors as they are; a task that killed
    its workers too often (``KilledWorker``) as a :class:`TaskFailedError` naming the task and
    its chunk; anything else with a note naming them."""
    from distributed.scheduler import KilledWorker

    where = f"task {key}" + (f" ({label})" if label else "")
    if isinstance(exc, PipelineError):
        return exc
    if isinstance(exc, KilledWorker):
        allowed = getattr(exc, "allowed_failures", None)
        last = getattr(getattr(exc, "last_worker", None), "address", None)
        return TaskFailedError(
            f"{desc}: {where} failed: the worker running it died each time it was tried "
            f"({'' if allowed is None else f'{allowed + 1} tries; '}the scheduler's "
            "distributed.scheduler.allowed-failures"
            f"{'' if allowed is None else f' = {allowed}'}"
            f"{'' if last is None else f'; last on {last}'}). The worker logs say why (often "
            "memory). Finished chunks are kept; fix the cause and re-run the same command to "
            "resume."
        )
    exc.add_note(f"in {desc}: {where}")
    return exc


def _executing_keys(keys: set[Any], dask_worker: Any = None) -> list[Any]:
    """(Runs on a worker.) Which of ``keys`` it is still executing, cancelled ones included."""
    return [ts.key for ts in dask_worker.state.executing if ts.key in keys]


def _wait_not_executing(client: Any, keys: set[Any], timeout: float = 300.0) -> None:
    """Wait until no worker executes any of ``keys`` (cancelling does not stop a running task)."""
    import time

    deadline = time.monotonic() + timeout
    with contextlib.suppress(Exception):  # best effort: never hide the task's own error
        while time.monotonic() < deadline:
            running = client.run(_executing_keys, keys)
            if not any(running.values()):
                return
            time.sleep(0.05)


def tune_malloc() -> bool:
    """Let glibc reuse freed memory for large temporaries (Linux/glibc only; else a no-op).

    Dask's nanny sets ``MALLOC_TRIM_THRESHOLD_``; setting any glibc malloc tunable switches off
    glibc's dynamic mmap threshold, so every temporary above 128 KiB becomes a fresh ``mmap``
    whose pages fault in on first touch (about 0.6 GB/s on these machines). Measured on the fit
    kernel: 29.5 ms per 13 MB block with the nanny's setting, 12.3 ms after this call. Freed
    memory up to 64 MiB stays with the process.
    """
    import ctypes
    import sys as _sys

    if not _sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = libc.mallopt(m_mmap_threshold, 32 * 2**20) == 1
    return bool(ok and libc.mallopt(m_trim_threshold, 64 * 2**20) == 1)


def _register_malloc_tuning(client: Any) -> None:
    """Run :func:`tune_malloc` on every current and future worker of ``client``."""
    from distributed.diagnostics.plugin import WorkerPlugin

    class MallocTuning(WorkerPlugin):
        name = "cmd-pipeline-malloc-tuning"

        def setup(self, worker: Any) -> None:
            tune_malloc()

    with contextlib.suppress(Exception):  # an old or locked-down cluster: run untuned
        client.register_plugin(MallocTuning())


@contextlib.contextmanager
def runner(options: RuntimeOptions | None = None) -> Iterator[Runner]:
    """Start (or connect to) the runtime described by ``options``; close what it started."""
    opts = options or RuntimeOptions()
    address = opts.address
    active = _active_client() if not address and opts.mode == "local" else None
    if active is not None:
        if opts.workers is not None or opts.memory_limit not in (None, "auto"):
            raise PipelineError(
                f"a Dask client is already active in this process (scheduler "
                f"{active.scheduler.address}); workers= and memory_limit= size the embedded "
                "cluster, which is not started: leave them out, or close that client"
            )
        _announce(
            f"using the Dask client active in this process (scheduler {active.scheduler.address}); "
            f"dashboard: {active.dashboard_link}"
        )
        r = Runner(opts, active)  # the user's client: used, never closed
        try:
            with _report(opts):
                yield r
        finally:
            r.remove_storage_options()
        return
    if not address and opts.mode == "local":
        opts = _outside_script_import(opts)
    if opts.performance_report and not address and opts.mode != "local":
        raise PipelineError(
            "performance_report=FILE needs the distributed scheduler (the default LocalCluster "
            "or scheduler=ADDRESS), not the threaded or synchronous one"
        )
    if address:
        from distributed import Client

        security = opts.security()
        kw = {} if security is None else {"security": security}
        try:
            client = Client(address, **kw)
        except (OSError, TypeError, ValueError) as e:
            hint = ""
            if address.startswith("tls://"):
                hint = (
                    " (a tls:// scheduler needs tls_ca_file=PEM, tls_cert=PEM and tls_key=PEM, or "
                    "dask's distributed.comm.tls.* config)"
                )
            raise PipelineError(f"cannot connect to the scheduler at {address}: {e}{hint}") from e
        with client:
            _register_malloc_tuning(client)
            _announce(f"connected to scheduler {address}; dashboard: {client.dashboard_link}")
            r = Runner(opts, client)
            try:
                with _report(opts):
                    yield r
            finally:
                r.remove_storage_options()
        return
    if opts.mode != "local":
        tune_malloc()
        if opts.gpu:
            _require_cupy()
        yield Runner(opts)
        return
    from distributed import Client

    with _local_cluster(opts) as cluster, Client(cluster) as client:
        _register_malloc_tuning(client)
        kind = "LocalCUDACluster" if opts.gpu else "LocalCluster"
        n = len(cluster.workers)
        _announce(f"{kind} with {n} worker(s); dashboard: {client.dashboard_link}")
        with _report(opts):
            yield Runner(opts, client)


def refuse_gpu(op: str, run: Runner | None, runtime: RuntimeOptions | None) -> None:
    """Refuse ``gpu=True`` for ``op``, an operation that computes on the CPU only."""
    if run is None and runtime is not None and runtime.gpu:
        raise PipelineError(
            f"{op} computes on the CPU only; gpu=True would start a GPU cluster and run it "
            "there on fewer workers (only fit and evaluate compute on the GPU): leave gpu off"
        )


@contextlib.contextmanager
def using(
    run: Runner | None, runtime: RuntimeOptions | None = None, *, cpu_only: str | None = None
) -> Iterator[Runner]:
    """The runner ``run`` if given (left open), else one started for ``runtime`` and closed on
    exit: the one way every operation takes its runtime.

    ``cpu_only`` names an operation that computes on the CPU only: ``gpu=True`` in
    ``runtime`` is refused for it (it would start a GPU cluster, one worker per GPU, and run
    CPU work on it) before anything starts. A runner the caller passed is used as it is.
    """
    if cpu_only:
        refuse_gpu(cpu_only, run, runtime)
    if run is not None:
        yield run
        return
    with runner(runtime) as r:
        yield r


def _require_cupy() -> None:
    try:
        import cupy  # noqa: F401
    except ImportError as e:
        raise PipelineError(
            f"gpu=True needs CuPy (pip install 'cmd-pipeline[gpu]'): {e}"
        ) from None


@contextlib.contextmanager
def _local_cluster(opts: RuntimeOptions) -> Iterator[Any]:
    """The embedded cluster: loopback only, dashboard on a free loopback port."""
    if opts.gpu:
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError as e:
            raise PipelineError(
                f"gpu=True needs dask-cuda and CuPy (pip install 'cmd-pipeline[gpu]'): {e}"
            ) from None
        _require_cupy()
        try:
            cluster = LocalCUDACluster(
                ip="127.0.0.1",
                dashboard_address="127.0.0.1:0",
                n_workers=opts.workers,  # None: one per visible GPU; N: the first N of them
                threads_per_worker=opts.threads_per_worker,
                memory_limit=opts.memory_limit,
            )
        except ValueError as e:  # e.g. more workers than visible GPUs
            raise PipelineError(
                f"cannot start a LocalCUDACluster with "
                f"{'one worker per GPU' if opts.workers is None else f'{opts.workers} worker(s)'}"
                f" (one GPU each): {e}"
            ) from None
        with cluster:
            yield cluster
        return
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=opts.workers or max(1, os.cpu_count() or 1),
        threads_per_worker=opts.threads_per_worker,
        processes=True,
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
        memory_limit=opts.memory_limit,
    ) as cluster:
        yield cluster


_SCRIPT_WARNED = False


def _outside_script_import(opts: RuntimeOptions) -> RuntimeOptions:
    """``opts``, or a threaded variant when worker processes would re-run the caller.

    The embedded cluster spawns its worker processes, and a spawned process first imports the
    main script again (as ``__mp_main__``). When the work was started by top-level code of that
    script, not under ``if __name__ == "__main__":``, every worker would start it again:
    multiprocessing refuses that (the nanny's "bootstrapping phase" error), and the parent can
    hang waiting for its workers. Such calls run on threads instead, with one warning per
    process. Inside a spawned process that is importing the main script, nothing is started.
    """
    global _SCRIPT_WARNED
    import multiprocessing

    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise PipelineError(
            "a worker process is importing the main script, which starts cmd-pipeline work at "
            'import: put that code under if __name__ == "__main__":'
        )
    import dask

    if dask.config.get("distributed.worker.multiprocessing-method", "spawn") == "fork":
        return opts  # forked workers do not import the main script
    where = _unguarded_main_call()
    if where is None:
        return opts
    why = (
        "this call runs at the top level of the main script, which every worker process of "
        "the embedded cluster would import and run again"
    )
    fix = 'put the script\'s code under if __name__ == "__main__": to use worker processes'
    if opts.performance_report:
        raise PipelineError(
            f"{where[0]}:{where[1]}: {why}; {fix} (a performance report needs them)"
        )
    if not _SCRIPT_WARNED:
        _SCRIPT_WARNED = True
        warnings.warn_explicit(
            f"{why}: running on threads instead ({fix})", PipelineWarning, where[0], where[1]
        )
    return replace(opts, mode="threads")


def _unguarded_main_call() -> tuple[str, int] | None:
    """(file, line) of the main script's top-level statement that led here, when a spawned
    worker process would run it again on import; else None.

    A spawned process imports the main module by its file (``python script.py``) or by its
    name (``python -m module``), except a package's ``__main__`` and interactive sessions.
    """
    import threading

    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or not isinstance(path, str):
        return None
    spec_name = getattr(getattr(main, "__spec__", None), "name", None)
    if spec_name is not None and (spec_name == "__main__" or spec_name.endswith(".__main__")):
        return None
    if os.path.splitext(os.path.basename(path))[0] == "ipython":
        return None
    top = [sys._getframe()]
    if threading.current_thread() is not threading.main_thread():
        current = sys._current_frames().get(threading.main_thread().ident or -1)
        if current is not None:
            top.append(current)
    for frame in top:
        f: Any = frame
        while f is not None:
            if f.f_code.co_name == "<module>" and f.f_globals is vars(main):
                line = f.f_lineno
                return None if _under_main_guard(path, line) else (path, line)
            f = f.f_back
    return None


def _under_main_guard(path: str, line: int) -> bool:
    """Is ``line`` of the script ``path`` inside ``if __name__ == "__main__":`` (or the
    ``else`` of ``if __name__ != "__main__":``)? Unreadable source counts as guarded."""
    import ast

    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
    except (OSError, SyntaxError, ValueError):
        return True

    def is_main_test(test: ast.expr) -> str | None:
        if not (isinstance(test, ast.Compare) and len(test.ops) == 1):
            return None
        sides = {ast.dump(test.left), ast.dump(test.comparators[0])}
        want = {ast.dump(ast.Name("__name__", ast.Load())), ast.dump(ast.Constant("__main__"))}
        if sides != want:
            return None
        return {ast.Eq: "body", ast.NotEq: "orelse"}.get(type(test.ops[0]))

    def spans(stmts: list[ast.stmt]) -> bool:
        return any(s.lineno <= line <= (s.end_lineno or s.lineno) for s in stmts)

    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            branch = is_main_test(node.test)
            if branch is not None and spans(getattr(node, branch)):
                return True
    return False


@contextlib.contextmanager
def _report(opts: RuntimeOptions) -> Iterator[None]:
    if not opts.performance_report:
        yield
        return
    from distributed import performance_report

    path = os.path.abspath(opts.performance_report)
    with performance_report(filename=path):
        yield
    _say(f"performance report: {path}", opts)


def _active_client() -> Any:
    """The ``distributed.Client`` the user has open in this process (their LocalCluster,
    SLURMCluster, Coiled or gateway client), or None. Cheap when distributed was never imported."""
    if "distributed" not in sys.modules:
        return None
    from distributed import default_client

    try:
        client = default_client()
    except ValueError:  # no client
        return None
    return client if client.status == "running" else None


def _announce(msg: str) -> None:
    """Where the work runs, and its dashboard: printed whenever a cluster is used, with or
    without progress bars."""
    print(msg, file=sys.stderr, flush=True)


def _say(msg: str, opts: RuntimeOptions) -> None:
    if opts.progress:
        print(msg, file=sys.stderr, flush=True)
