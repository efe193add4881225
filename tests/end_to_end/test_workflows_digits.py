"""Tests for the deterministic digits training-run recorder in :mod:`workflows.digits`."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from workflows.digits import (
    MLP,
    SimpleCNN,
    TrainConfig,
    build_model,
    evaluate,
    load_digits_split,
    main,
    random_shift,
    train_and_record,
)


def _checkpoint_bytes(directory: Path, suffix: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob(f"epoch_*{suffix}"))}


def test_load_digits_split_shapes_and_stratification() -> None:
    X_tr, y_tr, X_te, y_te = load_digits_split(seed=0)
    assert X_tr.shape == (1347, 1, 8, 8) and X_te.shape == (450, 1, 8, 8)
    assert X_tr.dtype == torch.float32 and y_tr.dtype == torch.int64
    assert float(X_tr.min()) >= 0.0 and float(X_tr.max()) == 1.0
    assert set(y_te.tolist()) == set(range(10))
    # Stratified: every class holds roughly a quarter of its samples in the test set.
    counts = torch.bincount(y_te, minlength=10)
    assert int(counts.min()) >= 40 and int(counts.max()) <= 50
    again = load_digits_split(seed=0)
    assert all(torch.equal(a, b) for a, b in zip((X_tr, y_tr, X_te, y_te), again, strict=True))
    assert not torch.equal(y_te, load_digits_split(seed=1)[3])


def test_random_shift_is_zero_padded_and_seeded() -> None:
    x = torch.ones(32, 1, 8, 8)
    out = random_shift(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    # Each image loses at most one row and one column of ones (no wrap-around).
    per_image = out.sum(dim=(1, 2, 3))
    assert bool(((per_image == 64) | (per_image == 56) | (per_image == 49)).all())
    again = random_shift(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_model_sizes() -> None:
    assert 5_000 < sum(p.numel() for p in SimpleCNN().parameters()) < 30_000
    assert 5_000 < sum(p.numel() for p in MLP().parameters()) < 30_000
    assert isinstance(build_model(TrainConfig(model="mlp", hidden=32)), MLP)
    with pytest.raises(ValueError):
        TrainConfig(model="mlp", batchnorm=True)
    with pytest.raises(ValueError):
        TrainConfig(fmt="npz")  # type: ignore[arg-type]


def test_cnn_three_epochs_learns(tmp_path: Path) -> None:
    config = TrainConfig(model="cnn", epochs=3, batch_size=32, seed=0)
    result = train_and_record(tmp_path, config)

    names = [f"epoch_{e:04d}.pt" for e in range(4)]
    assert sorted(p.name for p in tmp_path.glob("epoch_*")) == names
    assert result["checkpoints"] == names
    assert [r["epoch"] for r in result["epochs"]] == [0, 1, 2, 3]
    assert json.loads((tmp_path / "run.json").read_text()) == result
    assert result["config"]["model"] == "cnn"

    initial, final = result["epochs"][0], result["epochs"][-1]
    assert initial["test_accuracy"] < 0.3
    assert final["test_accuracy"] > 0.5
    assert final["test_loss"] < initial["test_loss"]

    # The final .pt checkpoint reproduces the recorded test metrics.
    model = build_model(config)
    model.load_state_dict(torch.load(tmp_path / names[-1], weights_only=True), strict=True)
    _, _, X_te, y_te = load_digits_split(config.seed)
    loss, acc = evaluate(model, X_te, y_te)
    assert acc == pytest.approx(final["test_accuracy"])
    assert loss == pytest.approx(final["test_loss"])


def test_byte_identical_checkpoints(tmp_path: Path) -> None:
    config = TrainConfig(model="cnn", epochs=2, seed=3, augment=True, batchnorm=True)
    rng_before = torch.get_rng_state()
    deterministic_before = torch.are_deterministic_algorithms_enabled()

    train_and_record(tmp_path / "a", config)
    train_and_record(tmp_path / "b", config)
    train_and_record(tmp_path / "c", replace(config, seed=4))

    a = _checkpoint_bytes(tmp_path / "a", ".pt")
    b = _checkpoint_bytes(tmp_path / "b", ".pt")
    c = _checkpoint_bytes(tmp_path / "c", ".pt")
    assert list(a) == ["epoch_0000.pt", "epoch_0001.pt", "epoch_0002.pt"]
    assert a == b
    assert list(c) == list(a)
    assert all(a[name] != c[name] for name in a)
    assert (tmp_path / "a" / "run.json").read_text() == (tmp_path / "b" / "run.json").read_text()

    # The caller's global RNG and determinism setting are left untouched.
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert torch.are_deterministic_algorithms_enabled() == deterministic_before


def test_safetensors_round_trip(tmp_path: Path) -> None:
    config = TrainConfig(model="cnn", epochs=2, batchnorm=True, fmt="safetensors", seed=1)
    result = train_and_record(tmp_path, config)
    files = sorted(tmp_path.glob("epoch_*.safetensors"))
    assert [p.name for p in files] == result["checkpoints"]
    assert len(files) == 3
    assert not list(tmp_path.glob("*.pt"))

    _, _, X_te, y_te = load_digits_split(config.seed)
    for path, record in zip(files, result["epochs"], strict=True):
        state = load_file(path)
        assert "bn1.running_mean" in state
        model = build_model(config)
        model.load_state_dict(state, strict=True)
        assert evaluate(model, X_te, y_te)[1] == pytest.approx(record["test_accuracy"])

    # Same seed twice gives byte-identical safetensors files too.
    train_and_record(tmp_path / "again", config)
    assert _checkpoint_bytes(tmp_path, ".safetensors") == _checkpoint_bytes(
        tmp_path / "again", ".safetensors"
    )


def test_mlp_run_without_initial(tmp_path: Path) -> None:
    config = TrainConfig(model="mlp", epochs=3, hidden=32, record_initial=False)
    result = train_and_record(tmp_path, config)
    assert result["checkpoints"] == ["epoch_0001.pt", "epoch_0002.pt", "epoch_0003.pt"]
    assert result["model_class"] == "MLP"
    assert result["epochs"][-1]["test_accuracy"] > 0.5
    state = torch.load(tmp_path / "epoch_0003.pt", weights_only=True)
    assert state["fc1.weight"].shape == (32, 64)


def test_refuses_to_mix_runs(tmp_path: Path) -> None:
    config = TrainConfig(model="mlp", epochs=1)
    train_and_record(tmp_path, config)
    with pytest.raises(FileExistsError):
        train_and_record(tmp_path, config)
    result = train_and_record(
        tmp_path, TrainConfig(model="mlp", epochs=1, fmt="safetensors"), overwrite=True
    )
    assert sorted(p.name for p in tmp_path.glob("epoch_*")) == result["checkpoints"]


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["--out", str(out), "--model", "mlp", "--epochs", "2", "--seed", "5"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4  # epochs 0, 1, 2 and the summary
    assert lines[0].startswith("epoch    0") and lines[-1].startswith("done: MLP")
    assert json.loads((out / "run.json").read_text())["config"]["seed"] == 5
