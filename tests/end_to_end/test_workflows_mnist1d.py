"""Tests for the deterministic MNIST-1D training-run recorder in :mod:`workflows.mnist1d`.

Tiny runs (a few hundred generated sequences, a few epochs): the recording (one checkpoint
per epoch, ``run.json``), byte-identical reruns, the augmentation (training batches only),
the evaluator against the recorded metrics, every architecture learning, and a run through
``ingest``, ``fit`` and ``cmd-pipeline evaluate --workflow mnist1d``.
"""

# mnist1d draws from (and reseeds) the legacy global numpy RNG: these tests use it on purpose
# ruff: noqa: NPY002

from __future__ import annotations

import json
import random
import tomllib
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import SYNC, THREADS
from safetensors.torch import load_file

pytest.importorskip("mnist1d")

import pipeline
import workflows
from pipeline.cli import main as pipeline_main
from pipeline.ops.evaluate import known_workflows, resolve_workflow
from workflows.mnist1d import (
    MLP,
    SEQ_LEN,
    ConvNet1D,
    ResNet1D,
    TrainConfig,
    augment,
    build_model,
    evaluate,
    evaluator,
    generate_mnist1d,
    load_mnist1d_split,
    main,
    train_and_record,
)
from workflows.mnist1d import train as train_module

#: Tiny run: 200 train / 100 test sequences, 4 batches an epoch, 3 epochs.
TINY = TrainConfig(model="cnn", epochs=3, batch_size=50, n_train=200, n_test=100, seed=0)
RUN_KEYS = {
    "workflow",
    "evaluator",
    "config",
    "model_class",
    "n_params",
    "n_train",
    "n_test",
    "torch_version",
    "num_threads",
    "checkpoints",
    "epochs",
}
NAMES = [f"epoch_{e:04d}.pt" for e in range(4)]
#: the augmentation settings of TINY, as train_and_record passes them
AUG = {
    "max_shift": TINY.max_shift,
    "offset_std": TINY.offset_std,
    "slope_std": TINY.slope_std,
    "noise_std": TINY.noise_std,
}


def _checkpoint_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("epoch_*"))}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """:data:`TINY` recorded through the API and the CLI, with another seed, and augmented."""
    root = tmp_path_factory.mktemp("mnist1d")
    rng_before = torch.get_rng_state()
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    result = train_and_record(root / "a", TINY)
    unchanged = torch.equal(rng_before, torch.get_rng_state()) and (
        torch.are_deterministic_algorithms_enabled() == deterministic_before
    )
    argv = ["--out", str(root / "b"), "--model", "cnn", "--epochs", "3", "--batch-size", "50"]
    argv += ["--n-train", "200", "--n-test", "100", "--seed", "0"]
    assert main(argv) == 0
    train_and_record(root / "seed1", replace(TINY, seed=1))
    augmented = train_and_record(root / "aug", replace(TINY, augment=True))
    return {"root": root, "result": result, "augmented": augmented, "unchanged": unchanged}


def test_split_is_mnist1d_own_and_defaults_are_the_standard_data_set() -> None:
    from mnist1d.data import get_dataset_args, make_dataset

    # the defaults are mnist1d's: 5000 sequences of 40, the first 80% train, seed 42
    standard, defaults = get_dataset_args(), TrainConfig()
    assert standard.num_samples == defaults.n_train + defaults.n_test
    assert standard.train_split == defaults.n_train / standard.num_samples
    assert (standard.seed, standard.final_seq_length) == (defaults.data_seed, SEQ_LEN)
    # the split is make_dataset's own (here on 500 sequences), in float32
    X_tr, y_tr, X_te, y_te = load_mnist1d_split(400, 100, data_seed=42)
    assert X_tr.shape == (400, 1, SEQ_LEN) and X_te.shape == (100, 1, SEQ_LEN)
    assert X_tr.dtype == torch.float32 and y_tr.dtype == torch.int64
    assert torch.bincount(torch.cat([y_tr, y_te]), minlength=10).tolist() == [50] * 10
    args = get_dataset_args()
    args.num_samples = 500
    np_state, py_state = np.random.get_state(), random.getstate()
    reference = make_dataset(args)
    np.random.set_state(np_state)
    random.setstate(py_state)
    assert np.array_equal(X_tr[:, 0].numpy(), reference["x"].astype(np.float32))
    assert np.array_equal(X_te[:, 0].numpy(), reference["x_test"].astype(np.float32))
    assert np.array_equal(y_tr.numpy(), reference["y"])
    assert np.array_equal(y_te.numpy(), reference["y_test"])


def test_generation_is_cached_seeded_and_leaves_global_rngs_alone() -> None:
    np.random.seed(123)
    random.seed(123)
    np_before, py_before = np.random.get_state()[1].copy(), random.getstate()
    a = load_mnist1d_split(60, 40, data_seed=7)
    assert np.array_equal(np.random.get_state()[1], np_before) and random.getstate() == py_before
    hits = generate_mnist1d.cache_info().hits
    b = load_mnist1d_split(60, 40, data_seed=7)
    assert generate_mnist1d.cache_info().hits == hits + 1
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    b[0][0, 0, 0] = 99.0  # fresh copies: the cache is not written through
    assert not torch.equal(load_mnist1d_split(60, 40, data_seed=7)[0], b[0])
    assert not torch.equal(load_mnist1d_split(60, 40, data_seed=8)[0], a[0])
    x, _ = generate_mnist1d(100, 7)
    assert not x.flags.writeable
    with pytest.raises(ValueError):
        generate_mnist1d(105, 7)


def test_augment_shifts_like_mnist1d_translate() -> None:
    from mnist1d.transform import translate

    x = torch.randn(500, 1, SEQ_LEN, generator=torch.Generator().manual_seed(0))
    t = torch.arange(SEQ_LEN) - (SEQ_LEN - 1) / 2
    centred = x - x.mean(-1, keepdim=True)
    flat = centred - (centred * t).sum(-1, keepdim=True) / (t * t).sum() * t
    out = augment(
        x,
        torch.Generator().manual_seed(1),
        max_shift=10,
        offset_std=0.0,
        slope_std=0.0,
        noise_std=0.0,
    )
    # every sequence is its de-trended self, rolled by some k in 0..9; all k occur
    shifts = set()
    for i in range(x.shape[0]):
        ks = [k for k in range(10) if torch.allclose(out[i], torch.roll(flat[i], k, -1), atol=1e-5)]
        assert len(ks) == 1
        shifts.add(ks[0])
    assert shifts == set(range(10))
    # the roll is mnist1d's own translation: translate(x, m) rolls by np.random.choice(m)
    row = flat[0, 0].numpy().astype(np.float64)
    np.random.seed(5)
    k = int(np.random.choice(10))
    np.random.seed(5)
    assert np.array_equal(translate(row, 10), np.roll(row, k))


def test_augment_redraws_offsets_and_trends_and_is_seeded() -> None:
    x, _, _, _ = load_mnist1d_split(200, 100, data_seed=3)
    x = x.repeat(10, 1, 1)  # 2000 sequences: spreads within a few percent
    out = augment(
        x,
        torch.Generator().manual_seed(0),
        max_shift=10,
        offset_std=0.3,
        slope_std=0.04,
        noise_std=0.0,
    )
    assert out.shape == x.shape and out.dtype == x.dtype
    t = torch.arange(SEQ_LEN) - (SEQ_LEN - 1) / 2
    offsets = out.mean(-1).flatten()
    slopes = ((out - out.mean(-1, keepdim=True)) * t).sum(-1).flatten() / (t * t).sum()
    assert float(offsets.std()) == pytest.approx(0.3, rel=0.08)
    assert float(slopes.std()) == pytest.approx(0.04, rel=0.08)
    noisy = augment(
        x,
        torch.Generator().manual_seed(0),
        max_shift=10,
        offset_std=0.3,
        slope_std=0.04,
        noise_std=0.1,
    )
    assert float((noisy - out).std()) == pytest.approx(0.1, rel=0.05)
    again = augment(x, torch.Generator().manual_seed(0), **AUG)
    assert torch.equal(again, augment(x, torch.Generator().manual_seed(0), **AUG))
    assert not torch.equal(again, augment(x, torch.Generator().manual_seed(1), **AUG))


def test_models_and_config() -> None:
    sizes = {"cnn": 5_210, "resnet": 14_760, "mlp": 15_210}
    classes = {"cnn": ConvNet1D, "resnet": ResNet1D, "mlp": MLP}
    x = torch.zeros(3, 1, SEQ_LEN)
    for name, size in sizes.items():
        model = build_model(TrainConfig(model=name))  # type: ignore[arg-type]
        assert isinstance(model, classes[name])
        assert sum(p.numel() for p in model.parameters()) == size
        assert model(x).shape == (3, 10)
    assert build_model(TrainConfig(model="mlp", hidden=32)).fc1.weight.shape == (32, SEQ_LEN)
    assert build_model(TrainConfig(channels=8)).conv1.weight.shape == (8, 1, 5)
    for bad in (
        {"model": "gru"},
        {"optimizer": "lbfgs"},
        {"fmt": "npz"},
        {"n_train": 205},
        {"n_test": 0},
        {"max_shift": 0},
        {"max_shift": 41},
        {"noise_std": -1.0},
        {"lr": 0.0},
        {"momentum": 1.0},
        {"epochs": -1},
        {"data_seed": -1},
    ):
        with pytest.raises(ValueError):
            TrainConfig(**bad)  # type: ignore[arg-type]


def test_study_configurations() -> None:
    configs = sorted((Path(workflows.__file__).parent / "configs").glob("mnist1d_*.toml"))
    names = [p.stem for p in configs]
    assert names == ["mnist1d_cnn", "mnist1d_cnn_augment", "mnist1d_mlp", "mnist1d_resnet"]
    for path in configs:
        cfg = tomllib.loads(path.read_text(encoding="utf-8"))
        assert cfg["workflow"] == "mnist1d" and "seed" not in cfg["train"]
        config = TrainConfig(**cfg["train"])
        assert config.augment == path.stem.endswith("_augment")
        assert path.stem.removeprefix("mnist1d_").removesuffix("_augment") == config.model


def test_run_writes_checkpoints_and_run_json(runs: dict[str, Any]) -> None:
    result, run_dir = runs["result"], runs["root"] / "a"
    assert sorted(p.name for p in run_dir.glob("epoch_*")) == NAMES
    assert set(result) == RUN_KEYS
    assert json.loads((run_dir / "run.json").read_text()) == result
    assert result["workflow"] == "mnist1d" and result["evaluator"] == "workflows.mnist1d:evaluator"
    assert result["checkpoints"] == NAMES and result["config"] == asdict(TINY)
    assert (result["model_class"], result["n_params"]) == ("ConvNet1D", 5_210)
    assert (result["n_train"], result["n_test"]) == (200, 100)
    assert [r["epoch"] for r in result["epochs"]] == [0, 1, 2, 3]
    for rec in result["epochs"]:
        assert set(rec) == {"epoch", "checkpoint", "train_loss", "test_loss", "test_accuracy"}
    assert runs["unchanged"]  # the caller's torch RNG and determinism setting


def test_same_seed_is_byte_identical(runs: dict[str, Any]) -> None:
    root = runs["root"]
    a, b, c = (_checkpoint_bytes(root / d) for d in ("a", "b", "seed1"))
    assert list(a) == NAMES and a == b  # the API and the CLI
    assert (root / "a" / "run.json").read_text() == (root / "b" / "run.json").read_text()
    assert list(c) == NAMES and all(a[n] != c[n] for n in NAMES)


def test_augmentation_changes_training_batches_only(
    runs: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain, augmented = runs["result"], runs["augmented"]
    a, aug = _checkpoint_bytes(runs["root"] / "a"), _checkpoint_bytes(runs["root"] / "aug")
    # the same initial weights and test set; different training from the first batch on
    assert aug[NAMES[0]] == a[NAMES[0]] and augmented["epochs"][0] == plain["epochs"][0]
    assert all(aug[n] != a[n] for n in NAMES[1:])

    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def spy(x: torch.Tensor, generator: torch.Generator, **kw: Any) -> torch.Tensor:
        out = augment(x, generator, **kw)
        seen.append((x, out))
        return out

    monkeypatch.setattr(train_module, "augment", spy)
    config = replace(TINY, epochs=2, augment=True)
    train_and_record(tmp_path / "spy", config)
    X_tr, _, X_te, _ = load_mnist1d_split(TINY.n_train, TINY.n_test, TINY.data_seed)
    assert len(seen) == 2 * 4  # every training batch of every epoch
    train_rows = {tuple(r.tolist()) for r in X_tr[:, 0]}
    test_rows = {tuple(r.tolist()) for r in X_te[:, 0]}
    for x, out in seen:
        rows = {tuple(r.tolist()) for r in x[:, 0]}
        assert rows <= train_rows and not rows & test_rows
        assert not torch.isclose(out, x).all(dim=-1).any()  # every sequence changes
    # identical epochs draw afresh: the two epochs' batches differ
    assert not torch.equal(seen[0][1], seen[4][1])
    assert _checkpoint_bytes(tmp_path / "spy") == {n: aug[n] for n in NAMES[:3]}
    seen.clear()
    train_and_record(tmp_path / "off", replace(config, augment=False))
    assert seen == []


def test_evaluator_reproduces_recorded_metrics(runs: dict[str, Any]) -> None:
    for name, result in (("a", runs["result"]), ("aug", runs["augmented"])):
        run_dir = runs["root"] / name
        score = evaluator(run_dir)
        for rec in (result["epochs"][0], result["epochs"][-1]):
            loss, acc = score(torch.load(run_dir / rec["checkpoint"], weights_only=True))
            assert (loss, acc) == (rec["test_loss"], rec["test_accuracy"])
    with pytest.raises(RuntimeError):
        score({"fc.weight": torch.zeros(10, 125)})
    model = build_model(TINY)
    model.train()
    evaluate(model, *load_mnist1d_split(200, 100)[2:])
    assert model.training


@pytest.mark.parametrize("model", ["cnn", "resnet", "mlp"])
def test_every_architecture_learns(model: str, tmp_path: Path) -> None:
    config = replace(TINY, model=model, epochs=4, n_train=400, record_initial=True)  # type: ignore[arg-type]
    result = train_and_record(tmp_path, config)
    first, last = result["epochs"][0], result["epochs"][-1]
    assert last["train_loss"] < 0.8 * first["train_loss"]
    assert last["test_loss"] < first["test_loss"]
    assert last["test_accuracy"] > first["test_accuracy"] + 0.1


def test_sgd_safetensors_without_initial_and_no_mixing(tmp_path: Path) -> None:
    config = replace(
        TINY,
        model="mlp",
        optimizer="sgd",
        lr=0.05,
        fmt="safetensors",
        record_initial=False,
        epochs=2,
    )
    result = train_and_record(tmp_path, config)
    assert result["checkpoints"] == ["epoch_0001.safetensors", "epoch_0002.safetensors"]
    assert not list(tmp_path.glob("*.pt"))
    state = load_file(tmp_path / "epoch_0002.safetensors")
    assert evaluator(tmp_path)(state) == (
        result["epochs"][-1]["test_loss"],
        result["epochs"][-1]["test_accuracy"],
    )
    with pytest.raises(FileExistsError):
        train_and_record(tmp_path, config)
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "bad"), "--n-train", "205"])


def test_pipeline_ingests_and_evaluates_with_the_workflow(runs: dict[str, Any]) -> None:
    assert known_workflows()["mnist1d"] == "workflows.mnist1d:evaluator"
    assert resolve_workflow("mnist1d") is evaluator
    run_dir, result = runs["root"] / "a", runs["result"]
    store = runs["root"] / "store.zarr"
    res = pipeline.ingest([str(run_dir)], str(store), runtime=SYNC)
    assert res.n_rows == result["n_params"]
    pipeline.fit(str(store), "m", modes=2, samples=200, runtime=THREADS)
    r = CliRunner().invoke(
        pipeline_main,
        [
            "evaluate",
            "-s",
            str(store),
            "-n",
            "m",
            "--workflow",
            "mnist1d",
            "--run",
            str(run_dir),
            "--sweep-modes",
            "1",
            "--sweep-seeds",
            "0",
            "--threads",
            "--no-progress",
        ],
    )
    assert r.exit_code == 0, r.output
    path = next(line for line in r.output.splitlines() if line.startswith("results: "))
    evaluation = json.loads(Path(path.removeprefix("results: ")).read_text())
    assert evaluation["workflow"] == "mnist1d"
    # the weights read back from the store score exactly what training recorded
    for got, rec in zip(evaluation["epochs"], result["epochs"], strict=True):
        assert got["epoch"] == rec["epoch"]
        assert got["gd_accuracy"] == rec["test_accuracy"]
        assert got["gd_loss"] == pytest.approx(rec["test_loss"], rel=1e-6)
