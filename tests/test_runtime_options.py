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
        ["fit", "-s", str(store), "-n", "p", "-m", "2", "--workers", "1", "--no-progress",
         "--performance-report", str(out)],
    )
    assert r.exit_code == 0, r.output
    page = out.read_text()
    assert "Dask Performance Report" in page and "fit-p-0" in page
    # the threaded and synchronous schedulers have no performance report: refused up front
    r = CliRunner().invoke(
        main, ["fit", "-s", str(store), "-n", "q", "-m", "2", "--threads", "--performance-report", str(out)]
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
            pytest.raises(PipelineError, match=r"cannot connect.*--tls-ca-file"),
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
