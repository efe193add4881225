"""Checkpoints and stores on object storage: a real S3 API on loopback (moto's server) through
s3fs, with fake credentials given as storage options (nothing from the network, nothing from
the environment).

Ingest from S3 into a store on S3, fit and export give the same bytes as the same pipeline
on local paths: through the API, the CLI (``--storage-options``) and a LocalCluster of worker
processes (the options reach them). Sampling reads only the sampled rows, in tasks.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import SYNC, net_state_dicts, read_analysis, read_trajectory, write_run

import pipeline
from pipeline.cli import main
from pipeline.ops.compare import compare
from pipeline.store import remote

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

BUCKET = "cmd-pipeline-test"
N_EPOCHS = 5
#: what an analysis is compared by (the model, and every block's sums)
RESULTS = ("mode", "a", "level", "anchor", "flags", "block_stats", "sample_index", "refs")


@dataclass
class S3:
    options: dict[str, Any]
    fs: Any
    local: Path  # the same runs on local disk, and the local pipeline's outputs

    def url(self, key: str) -> str:
        return f"s3://{BUCKET}/{key}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3]:
    """A moto S3 server on a free loopback port, a bucket holding a safetensors run and a .pt
    run, and the local pipeline's store for each (ingested and fitted)."""
    import fsspec

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        options = {**_credentials(endpoint), "endpoint_url": endpoint}
        fs = fsspec.filesystem("s3", skip_instance_cache=True, **options)
        fs.mkdir(BUCKET, region_name="eu-west-1")
        local = tmp_path_factory.mktemp("s3")
        sds = net_state_dicts(N_EPOCHS, "float32", 0)
        for fmt in ("safetensors", "pt"):
            if fmt == "pt":  # nested under "model", one tensor with transposed strides
                sds = [{**sd, "fc.weight": sd["fc.weight"].t().contiguous().t()} for sd in sds]
            write_run(local / fmt, sds, fmt, wrapper="model" if fmt == "pt" else "plain")
            fs.put(f"{local / fmt}/", f"{BUCKET}/{fmt}/", recursive=True)
            store = local / f"{fmt}.zarr"
            pipeline.ingest([str(local / fmt)], str(store), runtime=SYNC)
            pipeline.fit(str(store), "m", modes=3, samples=40, runtime=SYNC)
        yield S3(options, fs, local)
    finally:
        _require_auth(endpoint, False)
        server.stop()


def _require_auth(endpoint: str, on: bool) -> None:
    """Make the server check every request's signature (moto accepts any by default)."""
    import urllib.request

    req = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth",
        data=b"0" if on else b"inf",
        method="POST",
        headers={"Content-Type": "text/plain"},
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200


def _credentials(endpoint: str) -> dict[str, str]:
    """A user allowed everything on S3, its access key, and signatures checked from now on."""
    import boto3

    iam = boto3.client(
        "iam",
        endpoint_url=endpoint,
        aws_access_key_id="bootstrap",
        aws_secret_access_key="bootstrap",
        region_name="us-east-1",
    )
    iam.create_user(UserName="pipeline")
    policy = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
    }
    iam.put_user_policy(UserName="pipeline", PolicyName="s3", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="pipeline")["AccessKey"]
    _require_auth(endpoint, True)
    return {"key": key["AccessKeyId"], "secret": key["SecretAccessKey"]}


def _s3_array(s3: S3, store: str, path: str) -> np.ndarray:
    import zarr

    with remote.storage_options(s3.options, [store]):
        return np.asarray(zarr.open_array(store, path=path, mode="r")[...])


def _assert_same_analysis(s3: S3, local: Path, store: str) -> None:
    want = read_analysis(local, "m")
    for k in RESULTS:
        got = _s3_array(s3, store, f"analyses/m/{k}")
        assert np.array_equal(got, np.asarray(want[k]), equal_nan=True), k


# --------------------------------------------------------------------------- the API
def test_ingest_fit_export_on_s3_match_local(
    s3: S3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = s3.url("api.zarr")
    res = pipeline.ingest([s3.url("safetensors/")], store, storage_options=s3.options, runtime=SYNC)
    assert (res.n_rows, res.n_epochs) == (134, N_EPOCHS)
    local = s3.local / "safetensors.zarr"
    assert np.array_equal(
        _s3_array(s3, store, "trajectory"), read_trajectory(local), equal_nan=True
    )
    # the sources are recorded by URL, with their size and sha256; no option is in the store
    meta = pipeline.open_store(store, storage_options=s3.options).require_meta()
    assert meta.epochs[0].files[0].path == s3.url("safetensors/epoch_0.safetensors")
    assert meta.epochs[0].files[0].mtime_ns > 0
    blob = b"".join(s3.fs.cat(p) for p in s3.fs.find(f"{BUCKET}/api.zarr"))
    assert s3.options["secret"].encode() not in blob and s3.options["key"].encode() not in blob
    # a re-run finds every file unchanged by size and mtime: none is hashed again
    import pipeline.graph.ingest as gingest

    def no_digest(path: str, epoch: int | None = None) -> Any:
        raise AssertionError(f"{path} hashed again")

    monkeypatch.setattr(gingest, "digest_file", no_digest)
    again = pipeline.ingest(
        [s3.url("safetensors")], store, storage_options=s3.options, runtime=SYNC
    )
    monkeypatch.undo()
    assert again.added == [] and again.already_present == list(range(N_EPOCHS))

    fit = pipeline.fit(store, "m", modes=3, samples=40, storage_options=s3.options, runtime=SYNC)
    assert fit.status == "fitted"
    _assert_same_analysis(s3, local, store)

    ours, theirs = tmp_path / "s3.safetensors", tmp_path / "local.safetensors"
    pipeline.export(store, 3, ours, analysis="m", storage_options=s3.options)
    pipeline.export(str(local), 3, theirs, analysis="m")
    assert ours.read_bytes() == theirs.read_bytes()
    sd = pipeline.state_dict(store, 2, storage_options=s3.options)
    assert set(sd) == set(pipeline.state_dict(str(local), 2))
    # the other operations take the options too: a report written into the store on S3, and
    # compare over (store, study) pairs on S3 and local
    rep = pipeline.report(store, "m", storage_options=s3.options)
    assert rep.html.startswith("s3://")
    cmp = compare(
        [(store, "m"), (str(local), "m")], storage_options=s3.options, runtime=SYNC
    )
    dist = np.asarray(cmp.distances)
    assert dist.shape == (2, 2) and dist[0, 1] == dist[1, 0] == 0  # the same study, twice
    assert remote.snapshot()[1] == {}  # nothing applied once the calls returned


# --------------------------------------------------------------------------- the CLI
def _cli(*args: str) -> Any:
    return CliRunner().invoke(main, list(args))


def test_cli_with_storage_options(s3: S3) -> None:
    """A .pt run (read without torch, range by range) through the CLI, options as JSON; the
    options are never echoed, not even in errors."""
    store = s3.url("cli.zarr")
    opts = json.dumps(s3.options)
    r = _cli(
        "ingest",
        s3.url("pt/"),
        "--store",
        store,
        "--storage-options",
        opts,
        "--sync",
        "--no-progress",
    )
    assert r.exit_code == 0, r.output
    assert "N=134 parameters x T=5 epochs" in r.output
    assert np.array_equal(
        _s3_array(s3, store, "trajectory"), read_trajectory(s3.local / "pt.zarr"), equal_nan=True
    )
    r = CliRunner(env={"CMD_PIPELINE_STORAGE_OPTIONS": opts}).invoke(
        main, ["info", "--store", store, "--json"]
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["n_epochs"] == N_EPOCHS

    def one_error(*args: str) -> str:
        res = _cli(*args)
        assert res.exit_code != 0
        lines = [line for line in res.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), res.output
        assert s3.options["secret"] not in res.output
        return lines[0]

    assert "not valid JSON" in one_error("info", "--store", store, "--storage-options", "{key:")
    assert "JSON object" in one_error("info", "--store", store, "--storage-options", "[1]")
    missing = one_error(
        "ingest", "s3://no-such-bucket-here/run/", "--store", store, "--storage-options", opts
    )
    assert "s3://no-such-bucket-here/run" in missing
    bad = json.dumps({**s3.options, "secret": "wrong-secret"})
    denied = one_error(
        "ingest", s3.url("pt/"), "--store", s3.url("x.zarr"), "--storage-options", bad, "--sync"
    )
    assert "access denied" in denied and "wrong-secret" not in denied
    assert "no cmd-pipeline store" in one_error(
        "info", "--store", s3.url("nothing.zarr"), "--storage-options", opts
    )
    assert "access denied" in one_error("info", "--store", store, "--storage-options", bad)
    assert "no such bucket" in one_error(
        "ingest",
        s3.url("pt/"),
        "--store",
        "s3://no-such-bucket-here/s.zarr",
        "--storage-options",
        opts,
        "--sync",
    )


# --------------------------------------------------------------------------- workers
def test_local_cluster_workers_get_the_options(s3: S3, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two worker processes open the checkpoints and the store by URL: the options reach
    them (a worker plugin). Sampling gathers its rows in tasks: the client reads no chunk of
    the trajectory."""
    from distributed import Client, LocalCluster
    from zarr.storage import FsspecStore

    client_chunks: list[str] = []
    real_get = FsspecStore.get

    async def get(self: Any, key: str, *args: Any, **kwargs: Any) -> Any:
        if key.startswith("trajectory/c/"):
            client_chunks.append(key)
        return await real_get(self, key, *args, **kwargs)

    store = s3.url("cluster.zarr")
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address="127.0.0.1:0") as cluster,
        Client(cluster) as client,
    ):
        opts = pipeline.RuntimeOptions(progress=False)
        res = pipeline.ingest(
            [s3.url("safetensors")], store, codec="lz4", storage_options=s3.options, runtime=opts
        )
        assert res.chunks_written == 5
        monkeypatch.setattr(FsspecStore, "get", get)
        pipeline.fit(store, "m", modes=3, samples=40, storage_options=s3.options, runtime=opts)
        monkeypatch.undo()
        # the options are taken off the workers when the calls return
        left = client.run(lambda: sorted(__import__("fsspec").config.conf.get("s3") or {}))
        assert list(left.values()) == [[], []], "storage options left on the workers"
    assert client_chunks == []
    local = s3.local / "safetensors.zarr"
    assert np.array_equal(
        _s3_array(s3, store, "trajectory"), read_trajectory(local), equal_nan=True
    )
    _assert_same_analysis(s3, local, store)


# --------------------------------------------------------------------------- sampling reads
def test_sampled_rows_are_read_by_ranges(s3: S3, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a raw remote store each sampled row's bytes are fetched by a ranged request: the
    bytes read are the rows', not their chunks'."""
    import pipeline.store.trajectory as traj

    store = s3.url("api.zarr") if s3.fs.exists(f"{BUCKET}/api.zarr") else None
    if store is None:
        store = s3.url("rows.zarr")
        pipeline.ingest([s3.url("safetensors")], store, storage_options=s3.options, runtime=SYNC)
    monkeypatch.setattr(traj, "_RANGE_MERGE_GAP", 0)
    rows = np.array([3, 40, 41, 120], dtype=np.int64)
    cols = np.array([0, 2, 4], dtype=np.int64)
    with remote.storage_options(s3.options, [store]):
        grid = pipeline.open_store(store).chunk_grid()
        got, nbytes = grid.read_scattered(rows, cols)
    assert grid.codec == "none"
    blocks = len({int(c) // grid.time_chunk for c in cols})
    # each row's bytes in each time block (rows 40 and 41 in one range), not whole chunks
    assert nbytes == rows.size * blocks * grid.time_chunk * 4
    assert nbytes < blocks * grid.chunk_rows * grid.time_chunk * 4
    want = read_trajectory(s3.local / "safetensors.zarr")[np.ix_(rows, cols)]
    assert np.array_equal(got, want)
