"""Native-dtype trajectories: bf16 and fp16 runs are stored at 2 bytes a value, exactly; the
fit gives bit-identical results to the same values stored as float32; export stays bit-exact;
xarray reads them."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from helpers import (
    SYNC,
    net_state_dicts,
    read_analysis,
    read_trajectory,
    save_checkpoint,
    stored_model,
)

import pipeline
from pipeline.errors import ConfigMismatchError


def _run(tmp_path: Path, dtype: str, n: int = 6, fmt: str = "safetensors") -> list[Path]:
    root = tmp_path / f"run_{dtype}_{fmt}"
    return [save_checkpoint(root, e, sd, fmt) for e, sd in enumerate(net_state_dicts(n, dtype))]


def _zarr_dtype(store: Path) -> str:
    return str(zarr.open_array(str(store), path="trajectory", mode="r").dtype)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16_bit_runs_are_stored_natively_and_exported_bit_exact(tmp_path: Path, dtype: str) -> None:
    paths = _run(tmp_path, dtype)
    native, wide = tmp_path / "native.zarr", tmp_path / "wide.zarr"
    pipeline.ingest(paths, native, runtime=SYNC)
    pipeline.ingest(paths, wide, store_dtype="float32", runtime=SYNC)
    assert pipeline.open_store(str(native)).meta.store_dtype == dtype
    assert _zarr_dtype(native) == dtype and _zarr_dtype(wide) == "float32"
    assert pipeline.info(native)["store_dtype"] == dtype
    # the same values, half the bytes
    np.testing.assert_array_equal(read_trajectory(native), read_trajectory(wide))
    chunks = lambda s: sum(  # noqa: E731
        p.stat().st_size for p in (s / "trajectory" / "c").rglob("*") if p.is_file()
    )
    assert chunks(native) * 2 == chunks(wide)
    sds = net_state_dicts(6, dtype)
    for e in (0, 5):
        out = tmp_path / f"e{e}.pt"
        pipeline.export(native, e, out, progress=False)
        got = torch.load(out)
        for k, v in sds[e].items():
            assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


def test_the_fit_on_a_bf16_store_equals_the_fit_on_its_float32_copy(tmp_path: Path) -> None:
    paths = _run(tmp_path, "bfloat16", n=8)
    native, wide = tmp_path / "native.zarr", tmp_path / "wide.zarr"
    pipeline.ingest(paths, native, runtime=SYNC, chunk_rows=32)
    pipeline.ingest(paths, wide, store_dtype="float32", runtime=SYNC, chunk_rows=32)
    for store in (native, wide):
        pipeline.fit(store, "s", modes=3, samples=40, seed=1, runtime=SYNC)
    a, b = read_analysis(native, "s"), read_analysis(wide, "s")
    for key in ("mode", "a", "level", "anchor", "flags", "refs", "sample_index"):
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_the_numpy_kernel_reads_a_bf16_store_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = _run(tmp_path, "bfloat16", n=8)
    store = tmp_path / "s.zarr"
    pipeline.ingest(paths, store, runtime=SYNC, codec="lz4", time_chunk=2)
    pipeline.fit(store, "fused", modes=2, samples=40, runtime=SYNC)
    monkeypatch.setenv("CMD_PIPELINE_FIT_KERNEL", "numpy")
    pipeline.fit(store, "numpy", modes=2, samples=40, runtime=SYNC)
    a, b = read_analysis(store, "fused"), read_analysis(store, "numpy")
    np.testing.assert_array_equal(a["mode"], b["mode"])
    # float32 a: equal, or a few float32 steps apart; the models (the kernels may anchor a row at
    # another epoch where two fitted values tie) to float32 rounding
    np.testing.assert_allclose(a["a"], b["a"], rtol=2.0**-21, atol=1e-12)
    np.testing.assert_allclose(stored_model(a), stored_model(b), rtol=2.0**-22, atol=1e-12)


def test_mixed_dtypes_are_stored_as_float32_and_lossy_choices_are_refused(tmp_path: Path) -> None:
    sds = net_state_dicts(3, "bfloat16")
    for sd in sds:
        sd["fc.weight"] = sd["fc.weight"].float()
    paths = [save_checkpoint(tmp_path / "mixed", e, sd, "pt") for e, sd in enumerate(sds)]
    store = tmp_path / "s.zarr"
    pipeline.ingest(paths, store, runtime=SYNC)
    assert _zarr_dtype(store) == "float32"
    with pytest.raises(ConfigMismatchError, match=r"cannot hold tensor '[^']+' \(float32\) exactly"):
        pipeline.ingest(
            _run(tmp_path, "float32", n=3), tmp_path / "x.zarr", store_dtype="float16", runtime=SYNC
        )
    assert not (tmp_path / "x.zarr" / "trajectory").exists()


def test_a_bf16_store_opens_in_xarray(tmp_path: Path) -> None:
    paths = _run(tmp_path, "bfloat16")
    store = tmp_path / "s.zarr"
    pipeline.ingest(paths, store, runtime=SYNC)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no consolidated-metadata or dtype warning
        ds = pipeline.open_dataset(store)
    assert ds["trajectory"].dtype.name == "bfloat16"
    np.testing.assert_array_equal(
        ds["trajectory"].values.astype(np.float32), read_trajectory(store)
    )


def test_cli_store_dtype_option(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from pipeline.cli import main

    paths = _run(tmp_path, "bfloat16", n=3)
    store = tmp_path / "s.zarr"
    r = CliRunner().invoke(
        main,
        ["ingest", *map(str, paths), "-s", str(store), "--store-dtype", "float32", "--sync", "--no-progress"],
    )
    assert r.exit_code == 0, r.output
    assert _zarr_dtype(store) == "float32"
    r = CliRunner().invoke(main, ["info", "-s", str(store)])
    assert "values float32" in r.stdout
