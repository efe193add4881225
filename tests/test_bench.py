"""`cmd-pipeline bench` as a smoke test at tiny sizes: every section runs and is reported.
No timing assertions (the real figures are in the README, with their command)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import main


@pytest.mark.slow
def test_bench_tiny(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    r = CliRunner().invoke(
        main,
        ["bench", "--out", str(out), "--quick", "--sizes", "20000,50000", "--epochs", "12",
         "--main-n", "60000", "--beyond-ram", "30000", "--threads", "--no-progress"],
    )
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert set(res) >= {"limits", "throughput", "growth", "beyond_ram", "baselines", "numerics"}
    assert set(res["throughput"]["ops"]) == {"ingest", "fit", "reconstruct"}
    for op in res["throughput"]["ops"].values():
        assert op["seconds"] > 0 and op["of_memcpy"] > 0 and op["peak_rss"] > 0
    g = res["growth"]
    assert [p["n"] for p in g["n"]] == [20000, 50000]
    assert all(isinstance(g[f"exponent_{k}"], float) for k in "ntm")
    for label in ("synthetic", "digits CNN"):
        methods = {p["method"] for p in res["baselines"][label]["points"]}
        assert methods == {"CMD", "POD", "DMD"}, label
        for p in res["baselines"][label]["points"]:
            assert p["stored_bytes"] > 0 and p["relative_error"] >= 0
    assert res["baselines"]["in_memory"]["out_of_memory_n_extrapolated"] > 0
    # the pipeline's kernel against a dense float64 refit on a subsample: rounding only
    nm = res["numerics"]
    assert nm["checked"] > 1000 and nm["a_max_rel"] < 1e-9 and nm["corr_max_abs"] < 1e-6
    md = (out / "results.md").read_text()
    for heading in ("Hardware limits", "Throughput", "Growth", "Beyond RAM", "Baselines", "Numerics"):
        assert heading in md
    for png in ("growth.png", "pareto.png"):
        assert (out / png).read_bytes().startswith(b"\x89PNG")
    assert not (out / "work").exists()  # the stores are removed
    assert "results" in r.output or "Throughput" in r.output
