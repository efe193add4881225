"""``benchmarks/bench_tensor_id.py`` end to end on a tiny model shape: the child writes the
tensor table, its rows are checked against the tensor offsets, and the times are printed."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_tensor_id.py"


def test_bench_tensor_id_runs_and_checks_the_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mod = load_script(SCRIPT)
    args = ["--d", "8", "--layers", "2", "--ffn", "24", "--vocab", "50", "--chunk-rows", "64"]
    assert mod.main([*args, "--repeat", "1", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    # 2 x (4 x 64 + 3 x 192 + 2 x 8) + 8 + 2 x 400 rows, 21 tensors
    assert "2,504 rows, 21 tensors, chunks of 64 rows" in out and "| this |" in out
    assert list(tmp_path.iterdir()) == []  # the child's store is removed
