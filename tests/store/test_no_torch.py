"""torch is an optional extra: ``import pipeline``, and ingest, fit and export of safetensors
runs, work in a process where ``import torch`` fails; reading a PyTorch checkpoint there is
a one-line error naming the file and the extra to install. (A Distributed Checkpoint folder
is read without torch: its pickles are parsed, never loaded.)"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint
from safetensors.numpy import load_file, save_file

import pipeline

#: the child process: torch cannot be imported (as when it is not installed)
SCRIPT = """
import json, sys

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"No module named {name!r} (blocked by the test)")
        return None

sys.meta_path.insert(0, NoTorch())
root, pt, dcp = sys.argv[1], sys.argv[2], sys.argv[3]
import pipeline
from click.testing import CliRunner
from pipeline.cli import main

opts = pipeline.RuntimeOptions(mode="sync", progress=False)
out = {}
out["added"] = pipeline.ingest([f"{root}/run"], f"{root}/s.zarr", runtime=opts).added
fit = pipeline.fit(f"{root}/s.zarr", "m", modes=2, samples=8, runtime=opts)
out["modes"] = fit.n_modes
pipeline.export(f"{root}/s.zarr", 2, f"{root}/e2.safetensors")
try:
    pipeline.ingest([pt], f"{root}/t.zarr", epochs=[0], runtime=opts)
except pipeline.InputError as e:
    out["error"] = [str(e), e.path]
r = CliRunner().invoke(main, ["ingest", pt, "--store", f"{root}/u.zarr", "--epochs", "0", "--sync", "--no-progress"])
out["cli"] = [r.exit_code, r.stderr]
r = CliRunner().invoke(main, ["export", "--store", f"{root}/s.zarr", "--epoch", "2", "--out", f"{root}/e2.pt"])
out["export_pt"] = [r.exit_code, r.stderr]
out["dcp"] = pipeline.ingest([dcp], f"{root}/d.zarr", epochs=[5], runtime=opts).added
out["torch_loaded"] = any(m == "torch" or m.startswith("torch.") for m in sys.modules)
print(json.dumps(out))
"""


def test_safetensors_runs_need_no_torch(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    (tmp_path / "run").mkdir()
    w = rng.standard_normal((6, 5)).astype(np.float32)
    sds = []
    for e in range(4):
        w = w + 0.1 * rng.standard_normal(w.shape).astype(np.float32)
        sds.append({"w": w.copy(), "b": w[0].copy(), "steps": np.array(e, dtype=np.int64)})
        save_file(sds[-1], str(tmp_path / "run" / f"epoch_{e}.safetensors"))
    pt = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(3)}, pt)
    dcp = tmp_path / "dcp"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        torch.distributed.checkpoint.save({"w": torch.arange(6.0)}, checkpoint_id=dcp)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path), str(pt), str(dcp)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["added"] == [0, 1, 2, 3] and out["modes"] >= 1
    assert out["torch_loaded"] is False
    code, err = out["export_pt"]  # writing .pt needs torch: one line, nothing written
    assert code == 2 and "needs torch, which is not installed" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "e2.pt").exists()
    exported = load_file(str(tmp_path / "e2.safetensors"))
    assert sorted(exported) == ["b", "steps", "w"]
    assert all(np.array_equal(exported[k], sds[2][k]) for k in exported)
    message, path = out["error"]
    assert path == str(pt) and "pip install 'cmd-pipeline[torch]'" in message
    code, stderr = out["cli"]
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ")
    assert str(pt) in lines[0] and "cmd-pipeline[torch]" in lines[0]
    assert out["dcp"] == [5]
    got = np.asarray(pipeline.trajectory_dask(pipeline.open_store(str(tmp_path / "d.zarr"))))
    assert np.array_equal(got[:, 0], np.arange(6.0, dtype=np.float32))
