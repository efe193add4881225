"""Runtime options that must do what they say, or refuse up front (no GPU needed).

- ``--gpu`` computes on the GPU only in ``fit`` and ``evaluate`` (the CMD fit kernel, through
  CuPy). The help says so, and the commands that compute on the CPU only refuse it with one
  line, before anything starts.
- ``--workers`` is honoured with ``--gpu`` (the first N GPUs) and with ``--threads`` (the pool
  size), and refused, with one line, where nothing it sizes exists (``--sync``, a scheduler).
"""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from helpers import SYNC

import pipeline
import pipeline.runtime
from pipeline.cli import main

GPU_COMMANDS = ("fit", "evaluate")
CPU_COMMANDS = ("ingest", "reconstruct", "compare", "stability", "bench")


def _cli(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_error_line(result: Result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in result.output
    return lines[0]


def _gpu_help(command: str) -> str:
    r = _cli(command, "--help")
    assert r.exit_code == 0, r.output
    text = " ".join(r.stdout.split())  # unwrap click's line breaks
    m = re.search(r" --gpu ([A-Z].*?) --[a-z]", text)  # the option's own help
    assert m is not None, text
    return m.group(1)


@pytest.mark.parametrize("command", GPU_COMMANDS)
def test_help_of_gpu_commands_says_what_runs_on_the_gpu(command: str) -> None:
    text = _gpu_help(command)
    assert "CMD fit kernel" in text and "CuPy" in text
    assert "one worker per GPU" in text and "--workers N" in text


@pytest.mark.parametrize("command", CPU_COMMANDS)
def test_help_of_cpu_commands_says_gpu_is_refused(command: str) -> None:
    text = _gpu_help(command)
    assert "Refused" in text and "only fit and evaluate compute on the GPU" in text


def test_main_help_names_the_gpu_commands() -> None:
    r = _cli("--help")
    assert r.exit_code == 0
    assert "Only fit and evaluate (its sweep's fits) compute on the GPU" in " ".join(
        r.stdout.split()
    )


@pytest.fixture
def nothing_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if any runtime is started (the refusals come first)."""

    def refuse(*a: Any, **k: Any) -> Any:
        raise AssertionError("a runtime was started")

    # the bench suite binds ``runner`` when it is imported: imported here first and patched
    # too, so that its first import never binds the refusal for the tests that follow
    import pipeline.bench.suite

    monkeypatch.setattr(pipeline.runtime, "runner", refuse)
    monkeypatch.setattr(pipeline.runtime, "_local_cluster", refuse)
    monkeypatch.setattr(pipeline.bench.suite, "runner", refuse)


def _cpu_command_args(command: str, tmp_path: Path, run_root: Path) -> list[str | Path]:
    store = tmp_path / "s.zarr"
    commands: dict[str, list[str | Path]] = {
        "ingest": ["ingest", run_root, "--store", store],
        "reconstruct": ["reconstruct", "--store", store, "--name", "n"],
        "compare": ["compare", "--store", store, "--name", "n", "--with", f"{store}:m"],
        "stability": ["stability", "--store", store],
        "bench": ["bench", "--out", tmp_path / "bench", "--quick"],
    }
    return commands[command]


@pytest.mark.parametrize("command", CPU_COMMANDS)
def test_gpu_on_a_cpu_command_is_refused_before_anything_starts(
    command: str, tmp_path: Path, run5, nothing_starts: None
) -> None:
    r = _cli(*_cpu_command_args(command, tmp_path, run5.root), "--gpu")
    assert r.exit_code == 2, r.output
    line = _one_error_line(r)
    assert f"{command} does not compute on the GPU" in line
    assert "only fit and evaluate do" in line and "run it without --gpu" in line
    assert not (tmp_path / "s.zarr").exists() and not (tmp_path / "bench").exists()
    assert "dask_cuda" not in sys.modules


def test_following_the_gpu_refusal_works(tmp_path: Path, run5) -> None:
    """The hint: the same command without --gpu."""
    args = _cpu_command_args("ingest", tmp_path, run5.root)
    assert _cli(*args, "--gpu", "--sync").exit_code == 2
    r = _cli(*args, "--sync", "--no-progress")
    assert r.exit_code == 0, r.output
    assert pipeline.info(str(tmp_path / "s.zarr"))["epochs"] == [0, 1, 2, 3, 4]


def _stand_in_cupy() -> types.ModuleType:
    mod = types.ModuleType("cupy")
    mod.ndarray = type("ndarray", (), {})  # type: ignore[attr-defined]  # for dask's dispatch
    return mod


def _fake_gpu_stack(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Stand-in ``cupy`` and ``dask_cuda`` modules; LocalCUDACluster records its arguments
    and stops there."""
    calls: list[dict[str, Any]] = []

    class Stop(Exception):
        pass

    class LocalCUDACluster:
        def __init__(self, **kwargs: Any) -> None:
            calls.append(kwargs)
            raise Stop("stand-in cluster")

    cuda = types.ModuleType("dask_cuda")
    cuda.LocalCUDACluster = LocalCUDACluster  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "dask_cuda", cuda)
    monkeypatch.setitem(sys.modules, "cupy", _stand_in_cupy())
    return calls


@pytest.mark.parametrize(("extra", "n_workers"), [((), None), (("--workers", "2"), 2)])
def test_workers_with_gpu_sizes_the_cuda_cluster(
    tmp_path: Path,
    run5,
    monkeypatch: pytest.MonkeyPatch,
    extra: tuple[str, ...],
    n_workers: int | None,
) -> None:
    store = tmp_path / "s.zarr"
    pipeline.ingest([str(run5.root)], str(store), runtime=SYNC)
    calls = _fake_gpu_stack(monkeypatch)
    r = _cli("fit", "-s", store, "-n", "g", "-m", "2", "-k", "50", "--gpu", "--no-progress", *extra)
    assert r.exit_code != 0 and "stand-in cluster" in r.output
    assert len(calls) == 1 and calls[0]["n_workers"] == n_workers


def test_too_many_gpu_workers_is_one_line(
    tmp_path: Path, run5, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = tmp_path / "s.zarr"
    pipeline.ingest([str(run5.root)], str(store), runtime=SYNC)

    class LocalCUDACluster:
        def __init__(self, **kwargs: Any) -> None:
            raise ValueError("Can not specify more processes than devices")

    cuda = types.ModuleType("dask_cuda")
    cuda.LocalCUDACluster = LocalCUDACluster  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "dask_cuda", cuda)
    monkeypatch.setitem(sys.modules, "cupy", _stand_in_cupy())
    r = _cli(
        "fit",
        "-s",
        store,
        "-n",
        "g",
        "-m",
        "2",
        "-k",
        "50",
        "--gpu",
        "--workers",
        "9",
        "--no-progress",
    )
    assert r.exit_code == 1
    line = _one_error_line(r)
    assert "9 worker(s) (one GPU each)" in line and "more processes than devices" in line


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--sync", "--workers", "2"), "--workers has no effect with --sync"),
        (
            ("--scheduler", "tcp://127.0.0.1:9", "--workers", "2"),
            "--workers has no effect with a scheduler",
        ),
        (("--sync", "--memory-limit", "1GB"), "--memory-limit has no effect with --sync"),
        (("--threads", "--memory-limit", "1GB"), "--memory-limit has no effect with --threads"),
    ],
)
def test_options_that_would_be_ignored_are_refused(
    tmp_path: Path, args: tuple[str, ...], message: str, nothing_starts: None
) -> None:
    r = _cli("fit", "-s", tmp_path / "s.zarr", "-n", "x", "-m", "2", *args)
    assert r.exit_code == 2, r.output
    assert message in _one_error_line(r)


def test_workers_with_threads_is_the_pool_size(monkeypatch: pytest.MonkeyPatch) -> None:
    import concurrent.futures

    import dask

    sizes: list[int] = []
    real = concurrent.futures.ThreadPoolExecutor

    class Pool(real):  # type: ignore[misc, valid-type]
        def __init__(self, n: int, *a: Any, **k: Any) -> None:
            sizes.append(n)
            super().__init__(n, *a, **k)

    monkeypatch.setattr(concurrent.futures, "ThreadPoolExecutor", Pool)
    with pipeline.runtime.runner(
        pipeline.RuntimeOptions(mode="threads", workers=3, progress=False)
    ) as rt:
        assert rt.compute([dask.delayed(int)("7")], "t") == [7]
    assert sizes == [3]
