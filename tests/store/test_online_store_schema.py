"""The versioned schema of ``online/`` (the store-backed running sums).

This release writes ``schema``/``version`` (2); a group of the previous release (version 1: the
attribute ``{"n", "mean_r", "m2_r"}`` only, and possibly no ``flags`` array) is still read; an
unknown version fails with :class:`~pipeline.errors.SchemaVersionError`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from torch import nn

import pipeline
from pipeline.errors import SchemaVersionError, StoreError
from pipeline.kernels.online import coefficients_rows
from pipeline.online import OnlineCMD
from pipeline.store.online import (
    ONLINE_ATTR,
    ONLINE_GROUP,
    ONLINE_SCHEMA,
    ONLINE_VERSION,
    OnlineGroup,
    OnlineMeta,
)


def _run(url: str, epochs: int = 7, warmup: int = 4) -> OnlineCMD:
    """A store-backed run on a tiny model with three affine modes (no NaN/Inf)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    n = sum(p.numel() for p in model.parameters())
    rng = np.random.default_rng(1)
    t = np.arange(epochs, dtype=np.float64)
    prof = np.stack([np.sqrt(t + 1), np.sin(0.7 * t) + 0.1 * t, np.exp(-0.3 * t)])
    mode, a, b = rng.integers(0, 3, n), rng.normal(size=n), rng.normal(size=n)
    traj = (a[None] * prof[mode].T + b[None] + 0.05 * rng.normal(size=(epochs, n))).astype(
        np.float32
    )
    sync = pipeline.RuntimeOptions(mode="sync", progress=False)
    cmd = OnlineCMD(model, warmup=warmup, modes=3, samples=40, seed=0, store=url, runtime=sync)
    assert cmd.store is not None
    cmd.store.block_rows = 16  # several blocks
    for w in traj:
        with torch.no_grad():
            off = 0
            for p in model.parameters():
                p.copy_(torch.from_numpy(w[off : off + p.numel()]).reshape(p.shape))
                off += p.numel()
        cmd.update(model)
    cmd.close()
    return cmd


def _coefficients(group: OnlineGroup, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """``(a, b)`` of every row from what the store holds (its committed metadata and sums)."""
    meta = group.meta()
    mean_r, m2_r = meta.arrays()
    mean_w, c_rw = group.read_sums(meta.n, 0, n_rows)
    return coefficients_rows(mean_w, c_rw, group.read_mode(0, n_rows), mean_r, m2_r)


def test_written_group_is_versioned(tmp_path) -> None:
    url = str(tmp_path / "online.zarr")
    cmd = _run(url)
    raw = zarr.open_group(url, mode="r", use_consolidated=False)[ONLINE_GROUP].attrs[ONLINE_ATTR]
    assert raw["schema"] == ONLINE_SCHEMA and raw["version"] == ONLINE_VERSION == 2
    meta = OnlineGroup(url).meta()
    assert meta.version == ONLINE_VERSION and meta.n == cmd.epoch == 7
    assert cmd.store is not None and cmd.store.mean_r is not None and cmd.store.m2_r is not None
    mean_r, m2_r = meta.arrays()
    assert np.array_equal(mean_r, cmd.store.mean_r) and np.array_equal(m2_r, cmd.store.m2_r)
    assert OnlineMeta.from_dict(meta.to_dict()) == meta
    # the store alone gives the client's fit (references aside: they are their own fit)
    a, b = _coefficients(OnlineGroup(url), cmd.n_params)
    a0, b0 = cmd.coefficients()
    rows = np.setdiff1d(np.arange(cmd.n_params), cmd.ref_index)
    np.testing.assert_array_equal(a[rows], a0[rows])
    np.testing.assert_array_equal(b[rows], b0[rows])


@pytest.mark.parametrize("drop_flags", [False, True])
def test_previous_release_group_is_read_as_version_1(tmp_path, drop_flags: bool) -> None:
    """A group as the previous release wrote it: no schema/version, maybe no ``flags``."""
    url = str(tmp_path / "online.zarr")
    cmd = _run(url)
    group = OnlineGroup(url)
    a_new, b_new = _coefficients(group, cmd.n_params)
    flags_new = group.read_flags(0, cmd.n_params)
    g = zarr.open_group(url, mode="r+", use_consolidated=False)[ONLINE_GROUP]
    assert cmd.store is not None and cmd.store.mean_r is not None and cmd.store.m2_r is not None
    g.attrs[ONLINE_ATTR] = {
        "n": cmd.store.count,
        "mean_r": cmd.store.mean_r.tolist(),
        "m2_r": cmd.store.m2_r.tolist(),
    }
    if drop_flags:
        del g["flags"]
        assert "flags" not in g.array_keys()
    meta = group.meta()
    assert meta.version == 1
    assert meta.n == 7 and len(meta.mean_r) == len(meta.m2_r) == cmd.n_modes
    a, b = _coefficients(group, cmd.n_params)
    np.testing.assert_array_equal(a, a_new)
    np.testing.assert_array_equal(b, b_new)
    flags = group.read_flags(3, 20)
    assert flags.dtype == np.uint8 and flags.shape == (17,)
    if drop_flags:
        assert not flags.any()
    else:
        assert np.array_equal(flags, flags_new[3:20])
    # a commit rewrites the attribute in the current version
    group.commit(meta)
    assert group.meta().version == ONLINE_VERSION


def test_unknown_version_or_schema_fails_clearly(tmp_path) -> None:
    url = str(tmp_path / "online.zarr")
    _run(url)
    group = OnlineGroup(url)
    good = group.meta().to_dict()
    g = zarr.open_group(url, mode="r+", use_consolidated=False)[ONLINE_GROUP]
    g.attrs[ONLINE_ATTR] = {**good, "version": 3}
    with pytest.raises(
        SchemaVersionError, match=r"schema version 3; this cmd-pipeline reads versions 1, 2"
    ):
        group.meta()
    g.attrs[ONLINE_ATTR] = {**good, "schema": "someone-else"}
    with pytest.raises(SchemaVersionError, match=r"expected 'cmd-pipeline\.online'"):
        group.meta()


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ({"n": 1.5, "mean_r": [0.0], "m2_r": [1.0]}, "n is not an integer"),
        ({"n": 2, "mean_r": [0.0, 1.0], "m2_r": [1.0]}, "mean_r has 2 modes, m2_r 1"),
        ({"n": 2, "mean_r": ["x"], "m2_r": [1.0]}, "mean_r is not a list of numbers"),
        ({"n": -1, "mean_r": [], "m2_r": []}, "n -1 is negative"),
        ([1, 2], "not an object"),
    ],
)
def test_malformed_metadata_is_a_store_error(raw: object, match: str) -> None:
    with pytest.raises(StoreError, match=match):
        OnlineMeta.from_dict(raw)  # type: ignore[arg-type]


def test_missing_group_or_attribute(tmp_path) -> None:
    url = str(tmp_path / "plain.zarr")
    root = zarr.open_group(url, mode="w", use_consolidated=False)
    group = OnlineGroup(url)
    assert not group.exists()
    with pytest.raises(StoreError, match="no Online CMD running sums"):
        group.meta()
    root.require_group(ONLINE_GROUP)
    assert group.exists()
    with pytest.raises(StoreError, match="has no 'cmd_pipeline_online' attribute"):
        group.meta()
