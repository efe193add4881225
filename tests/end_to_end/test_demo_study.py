"""The main job and the study runner end to end, on small sizes (the real sizes are `make demo`
and ``python -m workflows.study workflows/configs/*.toml``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from workflows import demo, study


@pytest.mark.slow
def test_demo_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    rc = demo.main(
        ["--out", str(out), "--epochs", "6", "--samples", "200", "--modes", "3",
         "--sweep-modes", "1,3", "--sweep-seeds", "0", "--workers", "1"]
    )
    text = capsys.readouterr()
    assert rc == 0, text.out
    # the dashboard link of the embedded LocalCluster, on loopback only
    assert "dashboard: http://127.0.0.1:" in text.err
    assert "exported weights" in text.out and "-> OK" in text.out
    assert "GD acc   CMD acc" in text.out
    report = out / "report.html"
    assert f"report: {report}" in text.out
    page = report.read_text()
    assert page.count("data:image/png;base64,") == 7
    figures = out / "store.zarr" / "analyses" / "demo" / "report" / "figures"
    assert len(list(figures.glob("*.png"))) == 7
    ev = json.loads((out / "store.zarr" / "analyses" / "demo" / "report" / "evaluation.json").read_text())
    assert [r["epoch"] for r in ev["epochs"]] == list(range(7))
    assert [r["modes_requested"] for r in ev["sweep"]["by_modes"]] == [1, 3]


def test_study_over_seeds(tmp_path: Path) -> None:
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(
        'workflow = "digits"\nseeds = [0, 1]\n[train]\nmodel = "mlp"\nepochs = 4\nhidden = 16\n'
        "[fit]\nmodes = 2\nsamples = 100\n[evaluate]\nsweep_modes = [1, 2]\nsweep_seeds = [0]\n"
    )
    out = tmp_path / "out"
    rt = study.RuntimeOptions(mode="threads", progress=False)
    table, rows = study.run_study(cfg, out, runtime=rt)
    assert [r["seed"] for r in rows] == [0, 1]
    assert rows[0]["gd_final"] != rows[1]["gd_final"] or rows[0]["mse"] != rows[1]["mse"]
    assert "| GD |" in table and "| CMD |" in table and "| 2 |" in table
    assert (out / "table.md").read_text().strip() == table
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["rows"]) == 2
    mean, _std = summary["summary"]["gd_final"]
    assert mean == pytest.approx((rows[0]["gd_final"] + rows[1]["gd_final"]) / 2)
    # a second run reuses the recorded runs and the stores: same table
    mtime = (out / "seed0" / "run" / "epoch_0004.pt").stat().st_mtime_ns
    table2, _ = study.run_study(cfg, out, runtime=rt)
    assert table2 == table
    assert (out / "seed0" / "run" / "epoch_0004.pt").stat().st_mtime_ns == mtime
