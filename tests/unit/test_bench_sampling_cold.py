"""``benchmarks/bench_sampling_cold.py`` end to end on a tiny store: the child processes read
the sampled rows (checked against the whole trajectory read with numpy), and the table is
printed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from helpers import load_script, read_trajectory

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_sampling_cold.py"


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise")
def test_bench_sampling_cold_reads_the_sampled_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mod = load_script(SCRIPT)
    store, out = tmp_path / "s.zarr", tmp_path / "out.json"
    # two blocks of 131,072 rows: the --blocks child maps them; --fit fits the store
    args = ["--n", "262144", "--epochs", "3", "--samples", "20", "--repeat", "1", "--blocks", "2"]
    assert mod.main([*args, "--fit", "--store", str(store), "--keep", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "20 rows x 3 epochs = 60 values" in printed and "| this code |" in printed
    assert "MB read from the disk per block" in printed and "fit / read" in printed
    got = json.loads(out.read_text())["runs"]
    runs = got["this code"]
    assert len(got["read"]) == 1 and all(r["read"] > 0 for r in got["read"])
    assert all(r["block"] > 0 and r["block_read"] >= 0 and r["fit"] > 0 for r in runs)
    assert not (store / "analyses").exists() or not [  # every fit's study was deleted
        p for p in (store / "analyses").iterdir() if p.is_dir()
    ]
    w = read_trajectory(store).astype(np.float64)
    for r, run in enumerate(runs):  # round r draws its rows with seed 1000 + r
        rows = np.sort(np.random.default_rng(1000 + r).choice(w.shape[0], 20, replace=False))
        assert run["checksum"] == pytest.approx(float(np.nansum(w[rows])), rel=1e-12)
        assert run["cold"] > 0 and run["warm"] > 0
