"""The scale model of ``benchmarks/scale_model.py``: the formula on hand-computed cases, and
the command end to end with ``--quick``."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import load_script

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "scale_model.py"


def _module():
    return load_script(SCRIPT)


sm = _module()

# round numbers: 1 ns/byte read, 2 ns/value kernel (float32), 3 ns/value (bf16),
# 100 ns/row + 1 ms/task writes, 1 ms/task scheduler; fixed: 1 s + 1 us*K*T sampling,
# clustering 1e-6 K^2, 2 s creation; 0.1 ms per block to fold its statistics (in the tasks);
# the totals tree adds one scheduler task per 63 blocks (fan-in 64)
COSTS = {
    "c_read": 1e-9, "c_kernel": {"4": 2e-9, "2": 3e-9}, "c_write": 1e-7, "c_write0": 1e-3,
    "t_sched": 1e-3, "a_s": 1.0, "b_s": 1e-6, "c_c": 1e-6, "p": 2.0, "t_create": 2.0, "c_fin": 1e-4,
}


def _fixed(n_tasks: int, k: int = 1000, t: int = 100) -> float:
    return 1.0 + 1e-6 * k * t + 1e-6 * k**2 + 2.0


TASK = 9e-3 + 1e-4  # the per-task cost below plus folding the block's statistics
SCHED = 1 + 1 / 63  # scheduler tasks per block, the totals tree included


def test_compute_bound_by_hand():
    # N = 1e6 rows of 1e4 per task: 100 tasks; T = 100
    # t_task = 1e6 values * (4*1e-9 + 2e-9) + 1e4 * 1e-7 + 1e-3 + 1e-3 = 6e-3 + 1e-3 + 2e-3 = 9e-3
    # (+ 1e-4 folding the block's statistics)
    p = sm.predict(1e6, 100, 4, 1e12, COSTS, rows=10_000)
    assert p["n_tasks"] == 100
    assert p["t_task_s"] == pytest.approx(TASK)
    assert p["compute_s"] == pytest.approx(25 * TASK)  # ceil(100/4) rounds of tasks
    assert p["storage_s"] == pytest.approx(1e6 * 100 * 4 / 1e12)
    assert p["scheduler_s"] == pytest.approx(100 * SCHED * 1e-3)
    assert p["bound"] == "workers"
    assert p["wall_s"] == pytest.approx(_fixed(100) + 25 * TASK)


def test_bandwidth_bound_by_hand():
    # 4e8 bytes at 1e8 B/s = 4 s of storage against 25 rounds of 9 ms
    p = sm.predict(1e6, 100, 4, 1e8, COSTS, rows=10_000)
    assert p["bound"] == "storage"
    assert p["wall_s"] == pytest.approx(_fixed(100) + 4.0)
    # bf16 halves the bytes: 2 s, and the kernel's bf16 cost per value
    q = sm.predict(1e6, 100, 4, 1e8, COSTS, rows=10_000, bytes_per_value=2)
    assert q["storage_s"] == pytest.approx(2.0)
    assert q["t_task_s"] == pytest.approx(1e6 * (2e-9 + 3e-9) + 1e-3 + 2e-3 + 1e-4)


def test_scheduler_bound_and_task_rounding():
    # 101 tasks on 100 workers: 2 rounds; the scheduler (101 ms + the tree's tasks) limits
    p = sm.predict(1_010_000, 100, 100, 1e15, COSTS, rows=10_000)
    assert p["n_tasks"] == 101
    assert p["compute_s"] == pytest.approx(2 * TASK)
    assert p["bound"] == "scheduler"
    assert p["wall_s"] == pytest.approx(_fixed(101) + 101 * SCHED * 1e-3)
    q = sm.predict(1_000_001, 100, 100, 1e15, COSTS, rows=10_000)
    assert q["n_tasks"] == 101  # a partial last block is one more task


def test_efficiency_and_worker_hours():
    p = sm.predict(1e6, 100, 4, 1e12, COSTS, rows=10_000, efficiency=0.5)
    assert p["compute_s"] == pytest.approx(2 * 25 * TASK)
    for w in (1, 8, 512):
        q = sm.predict(7e9, 100, w, 1e10, COSTS, rows=32_768)
        assert q["worker_hours"] == pytest.approx(w * q["wall_s"] / 3600)


def test_gpu_uses_assumed_rates():
    # GPU: kernel 4 B/value at G, copy s B/value at H, the read stays
    p = sm.predict(1e6, 100, 4, 1e12, COSTS, rows=10_000, gpu=True, gpu_kernel_gbps=100, gpu_h2d_gbps=10)
    per_value = 4e-9 + 4 / 10e9 + 4 / 100e9
    assert p["t_task_s"] == pytest.approx(1e6 * per_value + 1e-3 + 2e-3 + 1e-4)
    assert p["gpu"] is True


@pytest.mark.slow
def test_quick_run(tmp_path):
    out = tmp_path / "scale.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--dir", str(tmp_path / "stores")],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    for key in ("costs", "validation", "predictions", "T", "assumptions", "command"):
        assert key in res
    c = res["costs"]
    for key in ("c_read", "c_write", "c_write0", "t_sched", "a_s", "b_s", "c_c", "p", "t_create", "c_fin",
                "eff", "B_local"):
        assert math.isfinite(c[key]) and c[key] >= 0, key
    assert c["c_kernel"]["4"] > 0 and c["c_kernel"]["2"] > 0
    assert len(res["validation"]) == 3
    for row in res["validation"]:
        assert math.isfinite(row["rel_error"]) and row["measured_s"] > 0 and row["predicted_s"] > 0
    # 2 sizes x 2 dtypes x (3 CPU + 2 GPU worker counts) x 3 bandwidths
    assert len(res["predictions"]) == 60
    for p in res["predictions"]:
        assert p["wall_s"] > 0 and p["worker_hours"] == pytest.approx(p["W"] * p["wall_s"] / 3600)
    assert not list((tmp_path / "stores").glob("*.zarr"))  # the stores are deleted
    assert "| N | tasks | measured | predicted | error |" in proc.stdout
