"""``benchmarks/bench_fit_breakdown.py`` end to end on a tiny store: every step of the fit
task is timed on both runtimes, the steps add up to the task, and the wrapped functions are
put back afterwards."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import load_script

pytest.importorskip("numba")

from pipeline.graph import fit as fit_graph
from pipeline.kernels import cmd_numba

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_fit_breakdown.py"


def test_breakdown_times_every_step_and_restores(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mod = load_script(SCRIPT)
    before = (fit_graph.fit_task, cmd_numba.fit_block_fused, fit_graph.write_result_chunk)
    store = tmp_path / "s.zarr"
    args = ["--n", "3e5", "--epochs", "6", "--modes", "3", "--repeat", "1", "--store", str(store)]
    assert mod.main(args) == 0
    assert (fit_graph.fit_task, cmd_numba.fit_block_fused, fit_graph.write_result_chunk) == before
    assert not store.exists()  # the synthetic store is removed unless --keep
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(("| threads", "| sync"))]
    assert len(rows) == 2
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        task, block, kernel, stored, sums, writes, other = (float(c) for c in cells[1:8])
        assert int(cells[8]) >= 1  # tasks
        assert min(task, block, kernel, stored, sums, writes) > 0
        # seven cells printed to 0.1 ms: each off by up to 0.05 from the value summed
        assert block + kernel + stored + sums + writes + other == pytest.approx(task, abs=0.36)
