"""Bad checkpoints: a clear InputError naming the file, the epoch (and the key), a non-zero
exit from the CLI, and a store left exactly as it was (no trajectory at all when new)."""

from __future__ import annotations

import json
import os
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import (
    SYNC,
    THREADS,
    assert_no_trajectory,
    net_state_dicts,
    read_trajectory,
    save_checkpoint,
    snapshot,
    write_run,
)
from safetensors.numpy import save_file

import pipeline
from pipeline.cli import main

BAD_EPOCH = 3


class Pwned:
    """Unpickling this runs a shell command: a checkpoint holding it must be refused."""

    marker: Path

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"echo pwned > {self.marker}",))


@dataclass
class Case:
    """How to spoil epoch 3 of a run of Net checkpoints."""

    fmt: str
    spoil: Callable[[Path, dict[str, torch.Tensor], Path], Path]  # (root, sd, tmp) -> bad path
    message: str  # regex the message must match
    key: str | None = None
    settings: dict[str, Any] | None = None
    #: sharded checkpoints: the error names this file of the checkpoint directory
    shard: str | None = None
    #: the tensors differ from the others': appended alone, the file is compared with the
    #: store's index instead of the first checkpoint (another message, same fields)
    mismatch: bool = False


def _good(root: Path, sd: dict[str, torch.Tensor], fmt: str) -> Path:
    return save_checkpoint(root, BAD_EPOCH, sd, fmt)


def _truncate(fraction: float, fmt: str) -> Callable[..., Path]:
    def spoil(root: Path, sd: dict[str, torch.Tensor], tmp: Path) -> Path:
        p = _good(root, sd, fmt)
        data = p.read_bytes()
        p.write_bytes(data[: int(len(data) * fraction)])
        return p

    return spoil


def _empty(fmt: str) -> Callable[..., Path]:
    def spoil(root: Path, sd: dict[str, torch.Tensor], tmp: Path) -> Path:
        p = _good(root, sd, fmt)
        p.write_bytes(b"")
        return p

    return spoil


def _flip_pt_tensor_byte(root: Path, sd: dict[str, torch.Tensor], tmp: Path) -> Path:
    """Flip one byte inside the stored data of a tensor: only the zip CRC can tell."""
    p = _good(root, sd, "pt")
    with zipfile.ZipFile(p) as zf:
        info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
        assert info.compress_type == zipfile.ZIP_STORED
    raw = bytearray(p.read_bytes())
    name_len, extra_len = (
        int.from_bytes(raw[info.header_offset + 26 : info.header_offset + 28], "little"),
        int.from_bytes(raw[info.header_offset + 28 : info.header_offset + 30], "little"),
    )
    begin = info.header_offset + 30 + name_len + extra_len
    raw[begin + info.file_size // 2] ^= 0x01
    p.write_bytes(bytes(raw))
    # torch itself would load it, silently with a wrong value
    assert torch.load(p, weights_only=True).keys() == sd.keys()
    return p


def _flip_safetensors_header_byte(root: Path, sd: dict[str, torch.Tensor], tmp: Path) -> Path:
    p = _good(root, sd, "safetensors")
    raw = bytearray(p.read_bytes())
    assert raw[8:9] == b"{"
    raw[8] ^= 0xFF  # the header's opening brace
    p.write_bytes(bytes(raw))
    return p


def _bump_safetensors_shape(root: Path, sd: dict[str, torch.Tensor], tmp: Path) -> Path:
    """A flipped digit in the header: the shape no longer matches the data offsets."""
    p = _good(root, sd, "safetensors")
    raw = p.read_bytes()
    needle = b'"fc.weight":{"dtype":"F32","shape":[5,12]'
    assert needle in raw
    p.write_bytes(raw.replace(needle, needle.replace(b"[5,12]", b"[7,12]")))
    return p


def _malicious(root: Path, sd: dict[str, torch.Tensor], tmp: Path) -> Path:
    p = root / f"epoch_{BAD_EPOCH}.pt"
    torch.save({**sd, "bn.extra": Pwned(tmp / "PWNED")}, p)
    return p


def _edit(change: Callable[[dict[str, Any]], None], fmt: str = "pt") -> Callable[..., Path]:
    def spoil(root: Path, sd: dict[str, torch.Tensor], tmp: Path) -> Path:
        sd = dict(sd)
        change(sd)
        return _good(root, sd, fmt)

    return spoil


def _legacy_pt(root: Path, sd: dict[str, torch.Tensor], tmp: Path) -> Path:
    p = root / f"epoch_{BAD_EPOCH}.pt"
    torch.save(sd, p, _use_new_zipfile_serialization=False)
    return p


def _torch_object(make: Callable[[dict[str, torch.Tensor]], Any]) -> Callable[..., Path]:
    def spoil(root: Path, sd: dict[str, torch.Tensor], tmp: Path) -> Path:
        p = root / f"epoch_{BAD_EPOCH}.pt"
        torch.save(make(sd), p)
        return p

    return spoil


def _missing_shard(root: Path, sd: dict[str, torch.Tensor], tmp: Path) -> Path:
    d = _good(root, sd, "sharded")
    (d / "model-00002-of-00003.safetensors").unlink()
    return d


def _truncated_shard(root: Path, sd: dict[str, torch.Tensor], tmp: Path) -> Path:
    d = _good(root, sd, "sharded")
    shard = d / "model-00001-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-16])
    return d


def _index_lies(root: Path, sd: dict[str, torch.Tensor], tmp: Path) -> Path:
    """The index places conv.weight in the third shard; it is in the first."""
    d = _good(root, sd, "sharded")
    index_path = d / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    assert index["weight_map"]["conv.weight"] == "model-00001-of-00003.safetensors"
    index["weight_map"]["conv.weight"] = "model-00003-of-00003.safetensors"
    index_path.write_text(json.dumps(index))
    return d


def _nan(sd: dict[str, Any]) -> None:
    w = sd["fc.weight"].clone()
    w[2, 3] = float("nan")
    sd["fc.weight"] = w


CASES = {
    "truncated-pt": Case(
        "pt", _truncate(0.6, "pt"), "not a zip-format PyTorch checkpoint: truncated"
    ),
    "truncated-pth-tail": Case(
        "pth", _truncate(0.98, "pth"), "not a zip-format PyTorch checkpoint"
    ),
    "truncated-safetensors-data": Case(
        "safetensors",
        _truncate(0.9, "safetensors"),
        "do not fit the tensor or the file",
        key="fc.weight",  # the last tensor of the data, cut short
    ),
    "truncated-safetensors-header": Case(
        "safetensors", _truncate(0.05, "safetensors"), "corrupt or truncated safetensors header"
    ),
    "empty-pt": Case("pt", _empty("pt"), "empty file"),
    "empty-safetensors": Case("safetensors", _empty("safetensors"), "empty file"),
    "corrupt-pt-data": Case("pt", _flip_pt_tensor_byte, "fails its CRC check"),
    "corrupt-safetensors-header": Case(
        "safetensors", _flip_safetensors_header_byte, "corrupt safetensors header"
    ),
    "corrupt-safetensors-shape": Case(
        "safetensors", _bump_safetensors_shape, "do not fit", key="fc.weight"
    ),
    "malicious-pickle": Case("pt", _malicious, "refused to unpickle"),
    "missing-key": Case(
        "pt", _edit(lambda sd: sd.pop("fc.bias")), "key missing", key="fc.bias", mismatch=True
    ),
    "extra-key": Case(
        "safetensors",
        _edit(lambda sd: sd.update({"head.weight": torch.zeros(2)}), "safetensors"),
        "not present in the first checkpoint",
        key="head.weight",
        mismatch=True,
    ),
    "shape-change": Case(
        "pt",
        _edit(lambda sd: sd.update({"fc.weight": torch.zeros(6, 12)})),
        r"shape \(6, 12\) differs from \(5, 12\)",
        key="fc.weight",
        mismatch=True,
    ),
    "dtype-change": Case(
        "safetensors",
        _edit(lambda sd: sd.update({"conv.bias": sd["conv.bias"].half()}), "safetensors"),
        "dtype float16 differs from float32",
        key="conv.bias",
        mismatch=True,
    ),
    "int-dtype-change": Case(
        "pt",
        _edit(lambda sd: sd.update({"bn.num_batches_tracked": torch.tensor(3, dtype=torch.int32)})),
        "dtype int32 differs from int64",
        key="bn.num_batches_tracked",
        mismatch=True,
    ),
    "non-tensor-entry": Case(
        "pt",
        _edit(lambda sd: sd.update({"note": "hi"})),
        "non-tensor entry of type str",
        key="note",
    ),
    "nan-with-error-policy": Case(
        "pt",
        _edit(_nan),
        r"1 NaN/Inf value\(s\) \(policy nonfinite=error\)",
        key="fc.weight",
        settings={"nonfinite": "error"},
    ),
    "legacy-pt": Case("pt", _legacy_pt, "saved in the legacy format"),
    "not-a-state-dict": Case(
        "pt", _torch_object(lambda sd: list(sd.values())), "holds a list, not a state_dict"
    ),
    "empty-state-dict": Case("pt", _torch_object(lambda sd: {}), "the state_dict is empty"),
    "sharded-missing-shard": Case(
        "sharded", _missing_shard, "cannot read file: No such file", shard="model-00002-of-00003"
    ),
    "sharded-truncated-shard": Case(
        "sharded",
        _truncated_shard,
        "do not fit the tensor or the file",
        key="conv.weight",  # the last tensor of that shard
        shard="model-00001-of-00003",
    ),
    "sharded-index-lies": Case(
        "sharded",
        _index_lies,
        "the index places this tensor in model-00003-of-00003.safetensors, which lacks it",
        key="conv.weight",
        shard="model.safetensors.index.json",
    ),
}


def _setup(tmp_path: Path, case: Case) -> tuple[Path, Path]:
    """Good epochs 0-2 and the spoiled epoch 3, in one directory."""
    root = tmp_path / "ckpts"
    sds = net_state_dicts(BAD_EPOCH + 1)
    write_run(root, sds[:BAD_EPOCH], case.fmt)
    bad = case.spoil(root, dict(sds[BAD_EPOCH]), tmp_path)
    return root, bad


def _check_error(err: pipeline.InputError, case: Case, bad: Path) -> None:
    text = str(err)
    if case.shard is None:
        assert err.path == str(bad)
    else:  # one file of the checkpoint directory
        assert err.path is not None and Path(err.path).parent == bad
        assert Path(err.path).name.startswith(case.shard)
    assert str(bad) in text
    assert err.epoch == BAD_EPOCH and f"epoch {BAD_EPOCH}" in text
    assert err.key == case.key
    if case.key is not None:
        assert repr(case.key) in text
    assert text.count("\n") == 0
    assert re.search(case.message, text), text


@pytest.mark.parametrize("name", list(CASES))
def test_fresh_store_gets_no_trajectory(tmp_path: Path, name: str) -> None:
    case = CASES[name]
    root, bad = _setup(tmp_path, case)
    store = tmp_path / "s.zarr"
    with pytest.raises(pipeline.InputError) as err:
        pipeline.ingest([root], store, runtime=SYNC, **(case.settings or {}))
    _check_error(err.value, case, bad)
    assert_no_trajectory(store)
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("alone", [False, True], ids=["with-stored-epochs", "alone"])
@pytest.mark.parametrize("name", list(CASES))
def test_existing_store_is_unchanged(tmp_path: Path, name: str, alone: bool) -> None:
    """Appending the bad epoch (given with the stored ones, or alone) changes no byte."""
    case = CASES[name]
    root, bad = _setup(tmp_path, case)
    store = tmp_path / "s.zarr"
    good = sorted(p for p in root.iterdir() if p != bad)
    pipeline.ingest(good, store, runtime=SYNC, chunk_rows=8, **(case.settings or {}))
    before = snapshot(store)
    traj_before = read_trajectory(store)

    with pytest.raises(pipeline.InputError) as err:
        pipeline.ingest([bad] if alone else [root], store, runtime=SYNC)
    if alone and case.mismatch:  # compared with the store rather than the first checkpoint
        assert err.value.path == str(bad) and err.value.epoch == BAD_EPOCH
        assert err.value.key == case.key and "the store" in str(err.value)
    else:
        _check_error(err.value, case, bad)
    assert snapshot(store) == before
    assert np.array_equal(read_trajectory(store), traj_before)
    assert pipeline.info(store)["epochs"] == [0, 1, 2]
    assert not (tmp_path / "PWNED").exists()

    # the CLI: exit code 2, one line naming the file; still no change
    result = CliRunner().invoke(
        main, ["ingest", str(root), "--store", str(store), "--sync", "--no-progress"]
    )
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(bad) in lines[0]
    assert snapshot(store) == before
    assert not (tmp_path / "PWNED").exists()


def test_malicious_pickle_would_really_run(tmp_path: Path) -> None:
    """The fixture is real: an unsafe load of that file does run the command."""
    marker = tmp_path / "PWNED"
    p = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "x": Pwned(marker)}, p)
    with pytest.raises(pipeline.InputError, match="refused to unpickle"):
        pipeline.ingest([p], tmp_path / "s.zarr", epochs=[0], runtime=SYNC)
    assert not marker.exists()
    torch.load(p, weights_only=False)
    assert marker.read_text().strip() == "pwned"


def test_nan_rollback_is_not_raced_by_running_tasks(tmp_path: Path) -> None:
    """With a thread pool, chunk tasks still running when one fails must not write after
    the rollback: the store keeps exactly its bytes (and no chunk beyond its columns)."""
    n, chunk_rows = 3_000_010, 1_000_000  # three big row blocks and a 10-row one
    rng = np.random.default_rng(0)
    root = tmp_path / "ckpts"
    root.mkdir()
    for e in range(3):
        w = rng.standard_normal(n).astype(np.float32)
        if e == 2:
            w[-1] = np.inf  # in the small last block: it fails while big ones are running
        save_file({"w": w}, str(root / f"epoch_{e}.safetensors"))
    store = tmp_path / "s.zarr"
    pipeline.ingest(
        [root / "epoch_0.safetensors", root / "epoch_1.safetensors"],
        store,
        runtime=SYNC,
        chunk_rows=chunk_rows,
        nonfinite="error",
    )
    before = snapshot(store)
    for _ in range(3):
        with pytest.raises(pipeline.InputError, match="nonfinite=error") as err:
            pipeline.ingest([root], store, runtime=THREADS)
        assert err.value.epoch == 2 and err.value.key == "w"
        assert snapshot(store) == before
