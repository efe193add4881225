"""The user's own Dask client: with a ``distributed.Client`` active in the process (their
LocalCluster, SLURMCluster, Coiled or gateway client), the API and the CLI run on it and never
start a second cluster; the dashboard link is printed whenever a cluster is used."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from distributed import Client, LocalCluster
from helpers import SYNC, Run

import pipeline
import pipeline.runtime as runtime
from pipeline.cli import main


@pytest.fixture
def store(run5: Run, tmp_path: Path) -> str:
    url = str(tmp_path / "s.zarr")
    pipeline.ingest([run5.root], url, runtime=SYNC)
    return url


@pytest.fixture
def user_client():
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=2, processes=False, dashboard_address="127.0.0.1:0"
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


def _no_embedded_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_a, **_k):
        raise AssertionError("a second, embedded cluster was started beside the user's client")

    monkeypatch.setattr(runtime, "_local_cluster", refuse)


def test_api_runs_on_the_users_client(
    store: str,
    user_client: Client,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _no_embedded_cluster(monkeypatch)
    res = pipeline.fit(store, "s", modes=2, samples=50)  # the default runtime: no options given
    assert res.status == "fitted"
    err = capsys.readouterr().err
    assert "using the Dask client active in this process" in err
    assert user_client.dashboard_link in err
    # the client is the user's: still open and usable afterwards
    assert user_client.status == "running" and user_client.submit(sum, [1, 2]).result() == 3
    info = user_client.scheduler_info()
    assert len(info["workers"]) == 1


def test_cli_runs_on_the_users_client(
    store: str, user_client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_embedded_cluster(monkeypatch)
    r = CliRunner().invoke(
        main, ["fit", "-s", store, "-n", "c", "-m", "2", "--samples", "50", "--no-progress"]
    )
    assert r.exit_code == 0, r.output
    assert "using the Dask client active in this process" in r.output
    assert user_client.dashboard_link in r.output


def test_sizing_options_with_a_users_client_are_refused(store: str, user_client: Client) -> None:
    with pytest.raises(pipeline.PipelineError, match="already active in this process"):
        pipeline.fit(store, "w", modes=2, samples=50, runtime=pipeline.RuntimeOptions(workers=2))
    # explicit threads or sync still run in-process, beside the user's client
    assert pipeline.fit(store, "t", modes=2, samples=50, runtime=SYNC).status == "fitted"


def test_dashboard_link_printed_without_progress(store: str) -> None:
    r = CliRunner().invoke(
        main,
        [
            "fit",
            "-s",
            store,
            "-n",
            "d",
            "-m",
            "2",
            "--samples",
            "50",
            "--workers",
            "1",
            "--no-progress",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "LocalCluster with 1 worker(s); dashboard: http://127.0.0.1:" in r.output
