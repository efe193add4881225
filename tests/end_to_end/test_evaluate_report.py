"""``evaluate`` and ``report`` on a real recorded run and on planted data.

- a tiny real digits CNN run: the GD weights read back from the store score exactly what
  training recorded; with many modes the CMD weights score within a stated tolerance of GD;
  the sweep over M, seeds and K is recorded, and its studies are removed afterwards;
- planted modes: the weight MSE of the sweep does not increase with M;
- the figures are real PNGs, the HTML report embeds them, and the CLI prints the table.
"""

from __future__ import annotations

import itertools
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from helpers import (
    SYNC,
    THREADS,
    mode_profiles,
    planted_rows,
    rows_to_state_dicts,
    write_safetensors_run,
)

import pipeline
from pipeline.cli import main
from pipeline.errors import PipelineError, StoreError
from pipeline.ops.evaluate import (
    find_run_dir,
    known_workflows,
    resolve_workflow,
    sweep_name,
    workflow_module,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: CMD with many modes (M=200 of K=600 samples) against GD: final test accuracy within this
ACC_TOL_LARGE_M = 0.02


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, Any]]:
    from workflows.digits import TrainConfig, train_and_record

    root = tmp_path_factory.mktemp("digits")
    run_dir = root / "run"
    run = train_and_record(run_dir, TrainConfig(model="cnn", epochs=8, seed=1, batch_size=32))
    store = root / "store.zarr"
    pipeline.ingest([str(run_dir)], str(store), runtime=SYNC)
    return store, run_dir, run


def test_large_m_matches_gd_and_gd_matches_recording(digits_store) -> None:
    store, run_dir, run = digits_store
    pipeline.fit(str(store), "big", modes=200, samples=600, runtime=THREADS)
    ev = pipeline.evaluate(str(store), "big", sweep_modes=None, runtime=THREADS)
    e = ev.evaluation
    assert e["workflow"] == "digits" and e["run_dir"] == str(run_dir)
    assert [r["epoch"] for r in e["epochs"]] == [r["epoch"] for r in run["epochs"]]
    # the store keeps float32 weights bit for bit: GD scores exactly what training recorded
    for got, rec in zip(e["epochs"], run["epochs"], strict=True):
        assert got["gd_accuracy"] == rec["test_accuracy"]
        assert got["gd_loss"] == pytest.approx(rec["test_loss"], rel=1e-6)
    assert e["recorded_mismatch_epochs"] == []
    assert e["study"]["n_modes"] > 100
    final = e["final"]
    assert final["gd_accuracy"] > 0.9
    assert abs(final["cmd_accuracy"] - final["gd_accuracy"]) <= ACC_TOL_LARGE_M
    # and the weight error of that many modes is small
    assert e["relative_error"] < 0.1
    assert e["sweep"] is None


def test_sweep_records_m_seeds_k_and_cleans_up(digits_store) -> None:
    store, _run_dir, _run = digits_store
    pipeline.fit(str(store), "s5", modes=5, samples=300, seed=0, runtime=THREADS)
    before = pipeline.open_store(str(store)).analyses()
    ev = pipeline.evaluate(
        str(store),
        "s5",
        sweep_modes=[1, 5, 10],
        sweep_seeds=[0, 1],
        sweep_samples=[150, 300],
        runtime=THREADS,
    )
    sw = ev.evaluation["sweep"]
    assert sw["modes"] == [1, 5, 10] and sw["seeds"] == [0, 1] and sw["samples"] == [150, 300]
    assert len(sw["runs"]) == 12
    assert {(r["modes_requested"], r["samples"], r["seed"]) for r in sw["runs"]} == {
        (m, k, s) for m in (1, 5, 10) for k in (150, 300) for s in (0, 1)
    }
    by = {r["modes_requested"]: r for r in sw["by_modes"]}
    assert by[1]["n_modes_mean"] == 1.0 and by[1]["runs"] == 4
    for r in sw["runs"]:
        assert r["results"][0]["epoch"] == 8 and 0 <= r["results"][0]["cmd_accuracy"] <= 1
    # the study itself is the (5, 300, 0) fit of the sweep
    same = next(r for r in sw["runs"] if (r["modes_requested"], r["samples"], r["seed"]) == (5, 300, 0))
    assert same["results"][0]["cmd_accuracy"] == ev.evaluation["final"]["cmd_accuracy"]
    # more modes, less weight error (mean over the sweep's seeds and K)
    assert by[1]["mse_mean"] > by[5]["mse_mean"] > by[10]["mse_mean"]
    # the sweep's own studies are gone, the study and its siblings stay
    assert pipeline.open_store(str(store)).analyses() == before
    # results are stored with the study and as JSON beside it
    attrs = zarr.open_group(str(store), mode="r", use_consolidated=False)["analyses/s5"].attrs["cmd_pipeline_analysis"]
    assert attrs["evaluation"]["sweep"]["by_modes"] == sw["by_modes"]
    on_disk = json.loads(Path(ev.files["evaluation.json"]).read_text())
    assert on_disk["final"] == ev.evaluation["final"]
    for f in ("accuracy.png", "sweep.png"):
        assert Path(ev.files[f]).read_bytes().startswith(PNG_MAGIC)
    table = ev.table()
    assert "GD acc" in table and "CMD acc at epoch 8" in table and "MSE over the window" in table
    from pipeline.ops.info import format_info

    brief = next(a for a in pipeline.info(str(store))["analysis_details"] if a["name"] == "s5")
    assert brief["evaluated"]["cmd_accuracy"] == ev.evaluation["final"]["cmd_accuracy"]
    assert "s5: complete" in format_info(pipeline.info(str(store)))
    assert "evaluated (digits): epoch 8 GD" in format_info(pipeline.info(str(store)))


def test_keep_sweep_and_sweep_epochs(digits_store) -> None:
    store, _, _ = digits_store
    pipeline.fit(str(store), "k", modes=3, samples=200, seed=4, runtime=THREADS)
    ev = pipeline.evaluate(
        str(store), "k", sweep_modes=[2], sweep_seeds=[0], sweep_epochs="0,4,8", keep_sweep=True,
        runtime=THREADS,
    )
    assert [r["epoch"] for r in ev.evaluation["sweep"]["runs"][0]["results"]] == [0, 4, 8]
    kept = sweep_name("k", 2, 200, 0)
    assert kept in pipeline.open_store(str(store)).analyses()
    with pytest.raises(PipelineError, match="not in the study's window"):
        pipeline.evaluate(str(store), "k", sweep_modes=[2], sweep_seeds=[0], sweep_epochs="99")


def test_report_figures_and_html(digits_store, tmp_path: Path) -> None:
    store, _, _ = digits_store
    pipeline.fit(str(store), "rep", modes=4, samples=300, runtime=THREADS)
    ev = pipeline.evaluate(
        str(store), "rep", sweep_modes=[1, 4], sweep_seeds=[0, 1], runtime=THREADS, figures=False
    )
    figures = Path(store) / "analyses" / "rep" / "report" / "figures"
    assert set(ev.files) == {"evaluation.json"} and not list(figures.glob("*.png"))
    # the report draws the evaluation's figures from the study's evaluation all the same
    res = pipeline.report(str(store), "rep", out=tmp_path / "out")
    want = {
        "correlation.png",
        "mode_bands.png",
        "references.png",
        "samples.png",
        "layers.png",
        "accuracy.png",
        "sweep.png",
    }
    assert set(res.figures) == want
    for path in res.figures.values():
        data = Path(path).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
        w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        assert w > 300 and h > 200
    page = Path(res.html).read_text()
    assert Path(res.copy or "").read_text() == page
    assert Path(res.copy or "").name == "rep.html"
    assert page.count('src="data:image/png;base64,') == len(want)
    assert "GD against CMD" in page and "<table>" in page and "conv1.weight" in page
    # the report group keeps the study's listing clean (no unknown-object warnings)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = zarr.open_group(str(store), mode="r", use_consolidated=False)["analyses/rep"]
        assert {"mode", "a", "level", "anchor", "refs"} <= set(g.array_keys())
        assert "report" in set(g.group_keys())
    # deleting the study removes its report too
    from pipeline.store.analysis import AnalysisGroup

    AnalysisGroup(str(store), "rep").delete()
    assert not (Path(store) / "analyses" / "rep").exists()


def test_report_without_evaluation(digits_store) -> None:
    import matplotlib

    store, _, _ = digits_store
    pipeline.fit(str(store), "plain", modes=2, samples=100, runtime=THREADS)
    matplotlib.use("svg")  # a caller's backend (e.g. a notebook's inline one) is left alone
    res = pipeline.report(str(store), "plain")
    assert matplotlib.get_backend() == "svg"
    assert "accuracy.png" not in res.figures and "correlation.png" in res.figures
    assert res.copy is None and Path(res.html).stat().st_size > 10_000


def test_study_data_layer_counts(digits_store) -> None:
    store, _, _ = digits_store
    pipeline.fit(str(store), "lc", modes=3, samples=200, runtime=THREADS)
    d = pipeline.load_study_data(str(store), "lc")
    g = zarr.open_group(str(store), mode="r", use_consolidated=False)["analyses/lc"]
    mode, flags = np.asarray(g["mode"][...]), np.asarray(g["flags"][...])
    meta = pipeline.open_store(str(store)).meta
    assert meta is not None
    for i, t in enumerate(meta.stored_tensors()):
        m, f = mode[t.offset : t.offset + t.size], flags[t.offset : t.offset + t.size]
        skip = (f & 3) != 0
        want = [int(((m == k) & ~skip).sum()) for k in range(3)] + [int(skip.sum())]
        assert d.layer_mode_counts[i].tolist() == want
    assert d.profiles.shape == (200, 9) and d.refs.shape == (3, 9)
    sample_index = np.asarray(g["sample_index"][...])
    assert d.sample_fit_mode.tolist() == mode[sample_index].tolist()
    # a reference is its own reconstruction: a = 1, b = 0
    ref_rows = [int(np.flatnonzero(d.sample_mode == k)[0]) for k in range(3)]
    assert all(np.isfinite(d.sample_a[j]) for j in ref_rows)


def test_cli_evaluate_and_report(digits_store, tmp_path: Path) -> None:
    store, run_dir, _ = digits_store
    pipeline.fit(str(store), "cli", modes=3, samples=200, runtime=THREADS)
    r = CliRunner().invoke(
        main,
        ["evaluate", "-s", str(store), "-n", "cli", "--workflow", "digits", "--run", str(run_dir),
         "--sweep-modes", "1,3", "--sweep-seeds", "0", "--threads", "--no-progress"],
    )
    assert r.exit_code == 0, r.output
    assert "GD acc" in r.output and "evaluation.json" in r.output
    r = CliRunner().invoke(main, ["report", "-s", str(store), "-n", "cli", "-o", str(tmp_path / "r.html")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "r.html").stat().st_size > 10_000
    # clear errors for bad input
    r = CliRunner().invoke(main, ["evaluate", "-s", str(store), "-n", "nope", "--threads"])
    assert r.exit_code != 0 and "no analysis 'nope'" in r.output
    r = CliRunner().invoke(
        main, ["evaluate", "-s", str(store), "-n", "cli", "--workflow", "nosuch", "--sweep-modes", ""]
    )
    assert r.exit_code != 0 and "unknown workflow 'nosuch'" in r.output
    r = CliRunner().invoke(main, ["evaluate", "-s", str(store), "-n", "cli", "--sweep-modes", "a,b"])
    assert r.exit_code != 0 and "comma-separated integers" in r.output


def test_workflow_resolution(digits_store, tmp_path: Path) -> None:
    store, run_dir, _ = digits_store
    meta = pipeline.open_store(str(store)).meta
    assert meta is not None and find_run_dir(meta) == run_dir
    assert resolve_workflow("workflows.digits:evaluator") is resolve_workflow("digits")
    with pytest.raises(PipelineError, match="cannot import"):
        resolve_workflow("no_such_module_x:f")
    with pytest.raises(PipelineError, match="has no function"):
        resolve_workflow("workflows.digits:nope")
    pipeline.fit(str(store), "res", modes=2, samples=100, runtime=THREADS)
    with pytest.raises(PipelineError, match=r"holds no run\.json"):
        pipeline.evaluate(str(store), "res", run_dir=tmp_path, sweep_modes=None)
    (tmp_path / "run.json").write_text("{}")
    with pytest.raises(PipelineError, match="names no workflow"):
        pipeline.evaluate(str(store), "res", run_dir=tmp_path, sweep_modes=None)


def test_workflow_entry_points() -> None:
    """The built-in workflows are found by name through the entry points of the group
    ``cmd_pipeline.workflows``; an unknown name is a one-line error listing the known ones."""
    import workflows.digits
    import workflows.minilm

    known = known_workflows()
    assert known["digits"] == "workflows.digits:evaluator"
    assert known["minilm"] == "workflows.minilm:evaluator"
    assert resolve_workflow("digits") is workflows.digits.evaluator
    assert resolve_workflow("minilm") is workflows.minilm.evaluator
    assert workflow_module("digits") is workflows.digits
    with pytest.raises(PipelineError) as err:
        resolve_workflow("nosuch")
    msg = str(err.value)
    assert "\n" not in msg
    assert "unknown workflow 'nosuch'" in msg and ", ".join(sorted(known)) in msg
    with pytest.raises(PipelineError, match="unknown workflow 'nosuch'"):
        workflow_module("nosuch")


def test_evaluator_recorded_in_run_json(digits_store, tmp_path: Path) -> None:
    """run.json records the evaluator as module:function, and evaluate follows it; an older
    run.json with only the workflow's name is still evaluated through the entry point."""
    store, _run_dir, run = digits_store
    assert run["workflow"] == "digits" and run["evaluator"] == "workflows.digits:evaluator"
    pipeline.fit(str(store), "rec", modes=2, samples=100, runtime=THREADS)
    # the recorded evaluator wins over the name
    new = tmp_path / "new"
    new.mkdir()
    (new / "run.json").write_text(json.dumps({**run, "evaluator": "no_such_module_x:evaluator"}))
    with pytest.raises(PipelineError, match="cannot import no_such_module_x"):
        pipeline.evaluate(str(store), "rec", run_dir=new, sweep_modes=None)
    # an older run.json: the name only
    old = tmp_path / "old"
    old.mkdir()
    (old / "run.json").write_text(json.dumps({k: v for k, v in run.items() if k != "evaluator"}))
    ev = pipeline.evaluate(str(store), "rec", run_dir=old, sweep_modes=None, runtime=THREADS)
    assert ev.evaluation["workflow"] == "digits"
    for got, rec in zip(ev.evaluation["epochs"], run["epochs"], strict=True):
        assert got["gd_accuracy"] == rec["test_accuracy"]
    # run.json's evaluator must be a string
    (new / "run.json").write_text(json.dumps({**run, "evaluator": 3}))
    with pytest.raises(PipelineError, match="'evaluator' is a int, not a string"):
        pipeline.evaluate(str(store), "rec", run_dir=new, sweep_modes=None)


def test_incomplete_or_missing_study(tmp_path: Path, digits_store) -> None:
    store, _, _ = digits_store
    with pytest.raises(StoreError, match="no analysis"):
        pipeline.evaluate(str(store), "missing")
    with pytest.raises(StoreError, match="no analysis"):
        pipeline.report(str(store), "missing")


# ------------------------------------------------------------------------------ planted data
def test_planted_mse_does_not_increase_with_m(tmp_path: Path) -> None:
    """Four planted modes plus noise: the sweep's weight MSE falls as M grows and never
    rises; past the planted count it only splits noise."""
    t = 20
    rng = np.random.default_rng(3)
    p = planted_rows(3000, mode_profiles(t), rng, noise=3e-2)
    sds = rows_to_state_dicts({"w": ((3000,), torch.float32, p.noisy)})
    ck = write_safetensors_run(tmp_path / "ck", sds)[0].parent
    store = tmp_path / "p.zarr"
    pipeline.ingest([str(ck)], str(store), runtime=SYNC)
    pipeline.fit(str(store), "p", modes=4, samples=400, runtime=SYNC)
    clean = torch.from_numpy(p.clean.astype(np.float32))

    def score(sd: dict[str, torch.Tensor]) -> tuple[float, float]:
        # "loss": distance to the clean planted weights; "accuracy": share within 10% of |a|
        w = sd["w"]
        k = int(np.argmin([float((w - clean[:, j]).abs().sum()) for j in range(t)]))
        err = (w - clean[:, k]).abs().numpy()
        return float((err**2).mean()), float((err < 0.1 * np.abs(p.a)).mean())

    ev = pipeline.evaluate(
        str(store), "p", evaluator=score, sweep_modes=[1, 2, 3, 4, 6, 8], sweep_seeds=[0, 1, 2],
        runtime=SYNC,
    )
    by = ev.evaluation["sweep"]["by_modes"]
    mse = [r["mse_mean"] for r in by]
    assert all(b <= a for a, b in itertools.pairwise(mse)), mse
    assert mse[3] < 0.05 * mse[0]  # four planted modes explain the trajectories
    assert mse[3] < 2.0 * 3e-2**2  # ... down to the noise
    acc = [r["accuracy_mean"] for r in by]
    assert acc[3] > acc[0]


# ------------------------------------------------------------------------------ table labels
def _sweep_rows(table: str) -> tuple[list[str], dict[int, list[str]]]:
    """The sweep section of ``EvaluationResult.table()``: its header lines and, per M, the
    row's fields split on the column separator."""
    lines = table.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.strip().startswith("sweep"))
    header = lines[start : start + 2]
    rows = {}
    for ln in lines[start + 2 :]:
        cols = [c.strip() for c in ln.split(" | ")]
        rows[int(cols[0].split()[0])] = cols
    return header, rows


def test_sweep_table_mse_columns_hold_what_their_headings_say(tmp_path: Path, run5) -> None:
    """The issue: a column headed "at epoch(s) 40" held the MSE over the whole window. The
    table now shows both, each under its own heading, recomputed here from the kept studies."""
    from pipeline.store.analysis import AnalysisGroup

    store = tmp_path / "s.zarr"
    pipeline.ingest([str(run5.root)], str(store), runtime=SYNC)
    pipeline.fit(str(store), "t", modes=2, samples=60, runtime=SYNC)
    ev = pipeline.evaluate(
        str(store), "t", evaluator=lambda sd: (1.0, float(sd["fc.bias"][0] > 0)),
        sweep_modes=[1, 3], sweep_seeds=[0, 1], keep_sweep=True, runtime=SYNC,
    )
    header, rows = _sweep_rows(ev.table())
    assert "CMD accuracy and weight MSE at epoch 4" in header[0]
    assert "window MSE over epochs 0..4" in header[0]
    names = [c.strip() for c in header[1].split(" | ")]
    assert names[2:5] == ["CMD acc at epoch 4", "MSE at epoch 4", "MSE over the window"]
    by = {r["modes_requested"]: r for r in ev.evaluation["sweep"]["by_modes"]}
    for m in (1, 3):
        summaries = [
            AnalysisGroup(str(store), sweep_name("t", m, 60, s)).attrs()["summary"] for s in (0, 1)
        ]
        at_4 = [next(e["mse"] for e in su["epochs"] if e["epoch"] == 4) for su in summaries]
        window = [su["mse"] for su in summaries]
        assert by[m]["epoch"] == 4
        assert by[m]["mse_epoch_mean"] == pytest.approx(np.mean(at_4), rel=1e-12)
        assert by[m]["mse_mean"] == pytest.approx(np.mean(window), rel=1e-12)
        # the two differ here, so a column holding the other number fails
        assert abs(np.mean(at_4) - np.mean(window)) > 0.05 * np.mean(window)
        cols = rows[m]
        assert cols[3].split(" ± ")[0] == f"{np.mean(at_4):.3g}"
        assert cols[4].split(" ± ")[0] == f"{np.mean(window):.3g}"
        for run in (r for r in ev.evaluation["sweep"]["runs"] if r["modes_requested"] == m):
            assert run["results"][-1]["mse"] == pytest.approx(at_4[run["seed"]], rel=1e-12)
    # the per-epoch rows: the MSE at that epoch, and the window's MSE on its own line
    t = ev.table()
    assert f"window (epochs 0..4): weight MSE {ev.evaluation['mse']:.3g}" in t
    summ = AnalysisGroup(str(store), "t").attrs()["summary"]
    for r, e in zip(ev.evaluation["epochs"], summ["epochs"], strict=True):
        assert r["mse"] == e["mse"]


def test_study_table_mse_columns_hold_what_their_headings_say() -> None:
    """The study runner's Markdown table: accuracy and MSE at the sweep's epoch, and the MSE
    over the window, each under its own heading."""
    from workflows.study import format_table

    def row(seed: int, at: float, window: float) -> dict[str, Any]:
        sweep = [{"modes_requested": 2, "epoch": 40, "accuracy_mean": 0.9, "mse_epoch_mean": at,
                  "mse_mean": window}]
        return {"seed": seed, "n_params": 10, "epochs": 41, "samples": 100, "n_modes": 2,
                "gd_final": 0.9, "cmd_final": 0.9, "gd_best": 0.9, "cmd_best": 0.9,
                "mse": window, "relative_error": 0.1, "sweep": sweep}

    table = format_table("x", {"workflow": "digits"}, [row(0, 4.0e-6, 3.0e-5), row(1, 6.0e-6, 4.0e-5)])
    lines = table.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("| M |"))
    names = [c.strip() for c in lines[head].strip("|").split("|")]
    assert names == ["M", "CMD accuracy at epoch 40", "weight MSE at epoch 40", "weight MSE over the window"]
    cells = [c.strip() for c in lines[head + 2].strip("|").split("|")]
    assert cells[2].startswith("5e-06 ± ") and cells[3].startswith("3.5e-05 ± ")
