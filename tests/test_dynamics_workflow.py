"""The run-comparison workflow on tiny runs (the real table is in the README)."""

from __future__ import annotations

from pathlib import Path

from pipeline.runtime import RuntimeOptions, runner
from workflows.dynamics import EXPERIMENTS, run_experiment


def test_widths_experiment_tiny(tmp_path: Path) -> None:
    with runner(RuntimeOptions(mode="threads", progress=False)) as rt:
        res = run_experiment(tmp_path, EXPERIMENTS["widths"], [0, 1], epochs=12, modes=3, delays=2,
                             shuffles=5, rt=rt)
    assert res["groups"] == ["w8", "w256"] and len(res["runs"]) == 4
    for source in ("refs", "pcs"):
        r = res[source]
        assert len(r["distances"]) == 4 and r["p_apart"] is not None and 0 < r["p_apart"] <= 1
        assert set(r["within"]) == {"w8", "w256"} and r["between_mean"] > 0
