"""Finding checkpoints and their epochs: numeric order, HF directories, globs, explicit
epochs, and ambiguity that asks for --epochs instead of guessing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import SYNC, net_state_dicts, read_trajectory, save_checkpoint

import pipeline
from pipeline.checkpoints.discover import discover, parse_epochs_from_names
from pipeline.plan import parse_epoch_spec


def _touch(root: Path, *names: str) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for n in names:
        p = root / n
        p.write_bytes(b"")  # discovery only looks at names
        out.append(p)
    return out


def _hf_dir(root: Path, name: str, sharded: bool = True) -> Path:
    d = root / name
    d.mkdir(parents=True)
    if sharded:
        (d / "model-00001-of-00002.safetensors").write_bytes(b"")
        (d / "model-00002-of-00002.safetensors").write_bytes(b"")
        index = {
            "metadata": {},
            "weight_map": {
                "a.weight": "model-00001-of-00002.safetensors",
                "b.weight": "model-00002-of-00002.safetensors",
                "a.bias": "model-00001-of-00002.safetensors",
            },
        }
        (d / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        (d / "model.safetensors").write_bytes(b"")
    return d


def test_epochs_sort_numerically(tmp_path: Path) -> None:
    names = [f"epoch_{e}.pt" for e in (10, 2, 1, 9, 3)]
    _touch(tmp_path, *names, "notes.txt", "run.json")
    specs = discover([tmp_path])
    assert [s.epoch for s in specs] == [1, 2, 3, 9, 10]
    assert [Path(s.files[0]).name for s in specs] == [
        "epoch_1.pt",
        "epoch_2.pt",
        "epoch_3.pt",
        "epoch_9.pt",
        "epoch_10.pt",
    ]
    assert all(s.format == "torch" and Path(s.files[0]).is_absolute() for s in specs)


def test_one_path_is_one_input(tmp_path: Path) -> None:
    """A folder given as a str or a Path (not in a list) is one input, not its characters."""
    _touch(tmp_path, "epoch_2.pt", "epoch_1.pt")
    want = discover([tmp_path])
    assert [s.epoch for s in want] == [1, 2]
    assert discover(str(tmp_path)) == want
    assert discover(tmp_path) == want


def test_ingest_accepts_one_folder_as_a_string(tmp_path: Path) -> None:
    for e, sd in enumerate(net_state_dicts(2)):
        save_checkpoint(tmp_path / "ck", e, sd, "safetensors")
    result = pipeline.ingest(str(tmp_path / "ck"), tmp_path / "s.zarr", runtime=SYNC)
    assert result.added == [0, 1]


def test_zero_padded_and_mixed_suffixes(tmp_path: Path) -> None:
    _touch(tmp_path, "run3_ep0010.safetensors", "run3_ep0002.pth", "run3_ep0001.pt")
    specs = discover([tmp_path])
    assert [(s.epoch, s.format) for s in specs] == [(1, "torch"), (2, "torch"), (10, "safetensors")]


def test_hf_checkpoint_directories(tmp_path: Path) -> None:
    for step in (1000, 100, 500):
        _hf_dir(tmp_path / "out", f"checkpoint-{step}")
    _hf_dir(tmp_path / "out", "checkpoint-50", sharded=False)
    specs = discover([tmp_path / "out"])
    assert [s.epoch for s in specs] == [50, 100, 500, 1000]
    assert [s.format for s in specs] == ["safetensors", "hf-sharded", "hf-sharded", "hf-sharded"]
    sharded = specs[1]
    assert [Path(f).name for f in sharded.files] == [
        "model.safetensors.index.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    # one checkpoint directory, or its index file, given directly
    assert [s.epoch for s in discover([tmp_path / "out" / "checkpoint-500"])] == [500]
    index = tmp_path / "out" / "checkpoint-100" / "model.safetensors.index.json"
    assert [(s.epoch, s.format) for s in discover([index])] == [(100, "hf-sharded")]


def test_glob_input(tmp_path: Path) -> None:
    _touch(tmp_path, *(f"epoch_{e}.pt" for e in range(12)), "epoch_99.pt.bak")
    specs = discover([str(tmp_path / "epoch_1*.pt")])
    assert [s.epoch for s in specs] == [1, 10, 11]
    with pytest.raises(pipeline.InputError, match="matches nothing"):
        discover([str(tmp_path / "step_*.pt")])


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["run1_epoch_1.pt", "run2_epoch_2.pt"], "2 numeric fields vary"),
        (["epoch_1.pt", "ckpt_2.pt"], "different patterns"),
        (["epoch_1.pt", "epoch_01.pt"], "two checkpoints parse to epoch 1"),
        (["final.pt"], "cannot parse an epoch number"),
        (["best.pt", "last.pt"], "different patterns"),
        (["model_v2_3.pt"], "ambiguous epoch number"),
    ],
)
def test_ambiguous_names_ask_for_epochs(tmp_path: Path, names: list[str], message: str) -> None:
    _touch(tmp_path, *names)
    with pytest.raises(pipeline.InputError, match=message) as err:
        discover([tmp_path])
    assert "`epochs`" in str(err.value)
    # explicit epochs resolve it, in the order the inputs expand to
    epochs = list(range(100, 100 + len(names)))
    specs = discover([tmp_path], epochs=epochs)
    assert [s.epoch for s in specs] == epochs


def test_keyword_picks_the_epoch_field(tmp_path: Path) -> None:
    assert parse_epochs_from_names(["run7_epoch_3"]) == [3]
    assert parse_epochs_from_names(["run7_step_120_seed3", "run7_step_130_seed3"]) == [120, 130]
    assert parse_epochs_from_names(["checkpoint-500"]) == [500]
    assert parse_epochs_from_names([]) == []


def test_explicit_epochs(tmp_path: Path) -> None:
    paths = _touch(tmp_path, "a.pt", "b.pt", "c.pt")
    specs = discover(paths, epochs=[5, 0, 7])
    assert [(s.epoch, Path(s.files[0]).name) for s in specs] == [
        (0, "b.pt"),
        (5, "a.pt"),
        (7, "c.pt"),
    ]
    with pytest.raises(pipeline.InputError, match="names 2 epochs but 3 checkpoints were found"):
        discover(paths, epochs=[0, 1])
    with pytest.raises(pipeline.InputError, match="names 4 epochs but 3"):
        discover(paths, epochs=[0, 1, 2, 3])
    with pytest.raises(pipeline.InputError, match="repeats an epoch"):
        discover(paths, epochs=[0, 1, 1])


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(pipeline.InputError, match="no such file or directory") as err:
        discover([tmp_path / "missing.pt"])
    assert err.value.path == str(tmp_path / "missing.pt")
    _touch(tmp_path / "empty_dir", "readme.md")
    with pytest.raises(pipeline.InputError, match="holds no checkpoints"):
        discover([tmp_path / "empty_dir"])
    (p,) = _touch(tmp_path, "epoch_1.h5")
    with pytest.raises(pipeline.InputError, match=r"unsupported checkpoint type \.h5"):
        discover([p])
    (q,) = _touch(tmp_path / "d", "epoch_1.pt")
    with pytest.raises(pipeline.InputError, match="checkpoint given twice"):
        discover([q, tmp_path / "d"])


def test_parse_epoch_spec() -> None:
    assert parse_epoch_spec("0:5") == [0, 1, 2, 3, 4]
    assert parse_epoch_spec("10:40:10") == [10, 20, 30]
    assert parse_epoch_spec(" 3, 1,2 ") == [3, 1, 2]
    for bad in ("1:2:3:4", "a:b", "0:5:0", "1;2"):
        with pytest.raises(ValueError, match="cannot parse epochs"):
            parse_epoch_spec(bad)


def test_ingest_uses_explicit_epochs(tmp_path: Path) -> None:
    """Unparseable names ingest fine with epochs=[...], and the store records them."""
    sds = net_state_dicts(3)
    paths = []
    for name, sd in zip(("final", "best", "first"), sds, strict=True):
        p = save_checkpoint(tmp_path / "tmp", 0, sd, "safetensors")
        paths.append(p.rename(tmp_path / f"{name}.safetensors"))
    store = tmp_path / "s.zarr"
    with pytest.raises(pipeline.InputError, match="`epochs`"):
        pipeline.ingest(paths, store, runtime=SYNC)
    result = pipeline.ingest(paths, store, epochs=[20, 10, 0], runtime=SYNC)
    assert result.added == [0, 10, 20]
    assert pipeline.info(store)["epochs"] == [0, 10, 20]
    traj = read_trajectory(store)
    # column order follows the epochs: "first" (0), "best" (10), "final" (20)
    w = {k: v for k, v in sds[2].items() if k == "fc.bias"}["fc.bias"].numpy()
    meta = pipeline.open_store(str(store)).meta
    assert meta is not None
    off = next(t.offset for t in meta.tensors if t.name == "fc.bias")
    assert (traj[off : off + 5, 0] == w).all()
    assert [e.files[0].path for e in meta.epochs] == [str(paths[2]), str(paths[1]), str(paths[0])]
