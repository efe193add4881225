"""A real recorded training run (the digits CNN with BatchNorm) through ingest, export and CMD."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import pipeline
from workflows.digits import TrainConfig, build_model, evaluate, load_digits_split, train_and_record

SYNC = pipeline.RuntimeOptions(mode="threads", progress=False)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TrainConfig, dict]:
    out = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(model="cnn", epochs=8, seed=3, batch_size=32, batchnorm=True, fmt="pt")
    return out, cfg, train_and_record(out, cfg)


def _accuracy(cfg: TrainConfig, state: dict) -> float:
    model = build_model(cfg)
    model.load_state_dict(state, strict=True)
    _, _, x, y = load_digits_split(cfg.seed)
    with torch.no_grad():
        return evaluate(model, x, y)[1]


def test_recorded_run_ingests_and_exports_exactly(recorded: tuple[Path, TrainConfig, dict], tmp_path: Path) -> None:
    run_dir, cfg, run = recorded
    store = tmp_path / "s.zarr"
    res = pipeline.ingest([run_dir], store, runtime=SYNC)
    model = build_model(cfg)
    n_float = sum(v.numel() for v in model.state_dict().values() if v.is_floating_point())
    assert res.n_rows == n_float and res.n_epochs == cfg.epochs + 1
    info = pipeline.info(store)
    int_buffers = [k for k, v in model.state_dict().items() if not v.is_floating_point()]
    assert len(int_buffers) == 1 and int_buffers[0].endswith("num_batches_tracked")
    assert info["buffers"] == 3  # running_mean, running_var (stored) and num_batches_tracked
    assert info["not_stored"] == int_buffers
    for rec in (run["epochs"][0], run["epochs"][-1]):
        out = pipeline.export(store, rec["epoch"], tmp_path / f"e{rec['epoch']}.safetensors")
        original = torch.load(run_dir / Path(rec["checkpoint"]).name, weights_only=True)
        exported = load_file(str(out))
        assert exported.keys() == original.keys()
        assert all(torch.equal(exported[k], original[k]) for k in original)
        assert _accuracy(cfg, exported) == rec["test_accuracy"]


def test_cmd_of_a_real_run_keeps_its_accuracy(recorded: tuple[Path, TrainConfig, dict], tmp_path: Path) -> None:
    """With many modes the CMD weights classify as well as the trained ones (within 3 points)."""
    run_dir, cfg, run = recorded
    store = tmp_path / "s.zarr"
    pipeline.ingest([run_dir], store, runtime=SYNC)
    fit = pipeline.fit(store, "m20", modes=20, samples=600, seed=0, runtime=SYNC)
    assert fit.n_modes >= 10 and fit.summary["relative_error"] < 0.2
    last = run["epochs"][-1]
    out = pipeline.export(store, last["epoch"], tmp_path / "cmd.pt", analysis="m20")
    acc = _accuracy(cfg, torch.load(out, weights_only=True))
    assert acc >= last["test_accuracy"] - 0.03, (acc, last["test_accuracy"])


def test_info_describes_each_study(recorded: tuple[Path, TrainConfig, dict], tmp_path: Path) -> None:
    run_dir, _cfg, _run = recorded
    store = tmp_path / "s.zarr"
    pipeline.ingest([run_dir], store, runtime=SYNC)
    fit = pipeline.fit(store, "w", modes=3, samples=200, epochs="2:9:2", runtime=SYNC)
    d = pipeline.info(store)
    assert d["analyses"] == ["w"]
    (brief,) = d["analysis_details"]
    assert brief["status"] == "complete" and brief["modes"] == fit.n_modes and brief["window"] == "2:9:2"
    assert brief["relative_error"] == pytest.approx(fit.summary["relative_error"])
    from pipeline.ops.info import format_info

    assert "w: complete" in format_info(d)


def test_the_stored_model_of_a_real_run_is_within_one_ulp(
    recorded: tuple[Path, TrainConfig, dict], tmp_path: Path
) -> None:
    """A real trajectory (SGD on the digits CNN: many weights cross zero): the study's float32
    model against the float64 least-squares fit written from ALGORITHM.md step 5 (correlation
    with each of the study's references, argmax, a and b), both rounded to float32. At most 1
    ulp at every value of every row whose fitted values keep their sign; where they cross
    zero at most 3, and few values beyond 1."""
    import numpy as np
    from helpers import read_analysis, stored_model, ulp_distance, window_of

    run_dir, _cfg, _run = recorded
    store = tmp_path / "s.zarr"
    pipeline.ingest([run_dir], store, runtime=SYNC)
    pipeline.fit(store, "m", modes=10, samples=300, runtime=SYNC)
    got = read_analysis(store, "m")
    w = window_of(store, "m").astype(np.float64)
    refs = got["refs"]
    wc = w - w.mean(axis=1, keepdims=True)
    rc = refs - refs.mean(axis=1, keepdims=True)
    ssw, ssr = (wc * wc).sum(axis=1), (rc * rc).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = (wc @ rc.T) / np.sqrt(np.outer(ssw, ssr))
    mode = np.argmax(np.abs(np.nan_to_num(corr)), axis=1)
    top = np.sort(np.abs(np.nan_to_num(corr)), axis=1)
    a = (wc * rc[mode]).sum(axis=1) / ssr[mode]
    b = w.mean(axis=1) - a * refs.mean(axis=1)[mode]
    a[ssw == 0], b[ssw == 0] = 0.0, w[ssw == 0, 0]
    fit64 = a[:, None] * refs[mode] + b[:, None]
    refs_rows = got["ref_index"]
    fit64[refs_rows] = refs[got["mode"][refs_rows].astype(np.int64)]
    # the same mode, except where a row's best two |corr| tie (to 1e-9): either may be taken
    ok = mode == got["mode"]
    assert np.all(ok | (top[:, -1] - top[:, -2] < 1e-9))
    crossing = (fit64.min(axis=1) < 0) & (fit64.max(axis=1) > 0)
    assert crossing[ok].mean() > 0.05  # a real run: plenty of weights cross zero
    far = ulp_distance(stored_model(got).astype(np.float32), fit64.astype(np.float32))[ok]
    assert far[~crossing[ok]].max() <= 1
    assert far[crossing[ok]].max() <= 3
    assert (far > 1).mean() < 1e-3, (far > 1).mean()
