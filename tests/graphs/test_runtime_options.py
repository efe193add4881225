"""Runtime options: --performance-report, the scheduler from dask's config, TLS to a
scheduler through dask's Security, a clear error for an unreachable scheduler."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import dask
import pytest
from click.testing import CliRunner
from helpers import SYNC, read_analysis

import pipeline
from pipeline.cli import main
from pipeline.errors import PipelineError
from pipeline.runtime import RuntimeOptions, runner


def _store(tmp_path: Path, run5) -> Path:
    store = tmp_path / "s.zarr"
    pipeline.ingest([str(run5.root)], str(store), runtime=SYNC)
    return store


@pytest.mark.slow
def test_performance_report(tmp_path: Path, run5) -> None:
    store = _store(tmp_path, run5)
    out = tmp_path / "perf.html"
    r = CliRunner().invoke(
        main,
        ["fit", "-s", str(store), "-n", "p", "-m", "2", "-k", "50", "--workers", "1",
         "--no-progress", "--performance-report", str(out)],
    )
    assert r.exit_code == 0, r.output
    page = out.read_text()
    assert "Dask Performance Report" in page and "fit-p-0" in page
    # the threaded and synchronous schedulers have no performance report: refused up front
    r = CliRunner().invoke(
        main,
        ["fit", "-s", str(store), "-n", "q", "-m", "2", "-k", "50", "--threads",
         "--performance-report", str(out)],
    )
    assert r.exit_code != 0 and "needs the distributed scheduler" in r.output


def test_scheduler_from_dask_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CMD_PIPELINE_SCHEDULER", raising=False)
    assert RuntimeOptions().address is None
    with dask.config.set({"cmd-pipeline.scheduler": "tcp://10.1.2.3:8786"}):
        assert RuntimeOptions().address == "tcp://10.1.2.3:8786"
        monkeypatch.setenv("CMD_PIPELINE_SCHEDULER", "tcp://10.9.9.9:8786")
        assert RuntimeOptions().address == "tcp://10.9.9.9:8786"  # the environment wins
        assert RuntimeOptions(scheduler="tcp://h:1").address == "tcp://h:1"  # the option wins


def test_unreachable_scheduler_is_a_clear_error(tmp_path: Path, run5) -> None:
    store = _store(tmp_path, run5)
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        r = CliRunner().invoke(
            main, ["fit", "-s", str(store), "-n", "u", "-m", "2", "--scheduler", "tcp://127.0.0.1:9"]
        )
    assert r.exit_code != 0
    assert "cannot connect to the scheduler at tcp://127.0.0.1:9" in r.output


def _certs(d: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate")
    key, cert = d / "key.pem", d / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.mark.slow
def test_tls_scheduler(tmp_path: Path, run5) -> None:
    """A cluster that speaks only TLS: fit through it with the client's certificate."""
    from distributed import LocalCluster
    from distributed.security import Security

    cert, key = _certs(tmp_path)
    store = _store(tmp_path, run5)
    pipeline.fit(str(store), "plain", modes=2, samples=50, runtime=SYNC)
    sec = Security(
        tls_ca_file=str(cert),
        tls_scheduler_cert=str(cert),
        tls_scheduler_key=str(key),
        tls_worker_cert=str(cert),
        tls_worker_key=str(key),
        tls_client_cert=str(cert),
        tls_client_key=str(key),
        require_encryption=True,
    )
    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, protocol="tls://", host="127.0.0.1",
        security=sec, dashboard_address="127.0.0.1:0",
    ) as cluster:
        address = cluster.scheduler_address
        assert address.startswith("tls://127.0.0.1:")
        opts = RuntimeOptions(
            scheduler=address, tls_ca_file=str(cert), tls_cert=str(cert), tls_key=str(key), progress=False
        )
        pipeline.fit(str(store), "tls", modes=2, samples=50, runtime=opts)
        # without the client certificate the connection is refused, with a hint
        with (
            dask.config.set({"distributed.comm.timeouts.connect": "2s"}),
            pytest.raises(PipelineError, match=r"cannot connect.*tls_ca_file=PEM"),
            runner(RuntimeOptions(scheduler=address, progress=False)),
        ):
            pass
    a, b = read_analysis(store, "plain"), read_analysis(store, "tls")
    assert (a["a"] == b["a"]).all() and (a["mode"] == b["mode"]).all()


@pytest.mark.slow
def test_embedded_cluster_listens_on_loopback_only(capsys: pytest.CaptureFixture[str]) -> None:
    import psutil

    with runner(RuntimeOptions(workers=2)) as rt:
        info = rt.client.scheduler_info()
        addresses = [info["address"], *info["workers"]]
        assert all(a.startswith("tcp://127.0.0.1:") for a in addresses), addresses
        assert rt.dashboard_link.startswith("http://127.0.0.1:")
        pids = {psutil.Process().pid, *rt.client.run(lambda: __import__("os").getpid()).values()}
        for pid in pids:
            for c in psutil.Process(pid).net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    assert c.laddr.ip in ("127.0.0.1", "::1"), (pid, c.laddr)
    err = capsys.readouterr().err
    assert "LocalCluster with 2 worker(s); dashboard: http://127.0.0.1:" in err


# ------------------------------------------------------------------ the API in a plain script
_SCRIPT_BODY = """\
import pipeline

rt = pipeline.RuntimeOptions(workers=1)
result = pipeline.ingest([{run!r}], {store!r}, runtime=rt)
print("ingested", pipeline.info({store!r})["epochs"])
fit = pipeline.fit({store!r}, "m2", modes=2, samples=40, seed=0, runtime=rt)
print("fitted", fit.n_modes, "mode(s)")
"""


def _run_script(path: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    import sys

    try:
        return subprocess.run(
            [sys.executable, str(path)], cwd=cwd, capture_output=True, text=True, timeout=240
        )
    except subprocess.TimeoutExpired as e:  # the hang of the issue
        raise AssertionError(f"the script hung: {e.stderr!r}") from None


def test_api_in_an_unguarded_script_runs_on_threads_with_one_warning(tmp_path: Path, run5) -> None:
    """The README's Python API as a plain script, without ``if __name__ == "__main__":``.

    Worker processes of the embedded LocalCluster are spawned, and a spawned process imports
    the main script again, which would start the cluster again in every worker (the nanny's
    "bootstrapping phase" error, or a hang). The calls run on threads instead, and one line
    says why and what to change.
    """
    store = tmp_path / "api.zarr"
    script = tmp_path / "plain.py"
    script.write_text(_SCRIPT_BODY.format(run=str(run5.root), store=str(store)))
    proc = _run_script(script, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "ingested [0, 1, 2, 3, 4]" in proc.stdout and "fitted" in proc.stdout
    for bad in ("Traceback", "bootstrapping", "Nanny", "LocalCluster with"):
        assert bad not in proc.stderr, proc.stderr
    warned = [ln for ln in proc.stderr.splitlines() if "PipelineWarning" in ln]
    assert len(warned) == 1, proc.stderr  # once per process, not once per call
    assert "plain.py:4" in warned[0]  # the line that started the work
    assert 'if __name__ == "__main__":' in warned[0] and "threads" in warned[0]
    assert pipeline.info(str(store))["analyses"] == ["m2"]


def test_api_in_a_guarded_script_uses_worker_processes(tmp_path: Path, run5) -> None:
    """The same calls under the guard (inside a function called from it) start the
    LocalCluster as asked, with no warning."""
    store = tmp_path / "api.zarr"
    body = _SCRIPT_BODY.format(run=str(run5.root), store=str(store))
    lines = body.splitlines()
    script = tmp_path / "guarded.py"
    script.write_text(
        lines[0]
        + "\n\n\ndef main() -> None:\n"
        + "\n".join("    " + ln for ln in lines[1:] if ln)
        + '\n\n\nif __name__ == "__main__":\n    main()\n'
    )
    proc = _run_script(script, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "fitted" in proc.stdout
    assert "LocalCluster with 1 worker(s)" in proc.stderr
    assert "PipelineWarning" not in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("source", "line", "guarded"),
    [
        ("import pipeline\npipeline.fit('s', 'n')\n", 2, False),
        ("if __name__ == '__main__':\n    run()\n", 2, True),
        ("if '__main__' == __name__:\n    try:\n        run()\n    finally:\n        pass\n", 3, True),
        ("if __name__ != '__main__':\n    pass\nelse:\n    run()\n", 4, True),
        ("def main():\n    run()\n\nmain()\n", 4, False),
        ("if __name__ == '__main__':\n    pass\nrun()\n", 3, False),
    ],
)
def test_main_guard_detection(tmp_path: Path, source: str, line: int, guarded: bool) -> None:
    from pipeline.runtime import _under_main_guard

    path = tmp_path / "s.py"
    path.write_text(source)
    assert _under_main_guard(str(path), line) is guarded
