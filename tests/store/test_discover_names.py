"""Epoch numbers never contradict the checkpoints' names.

- The starting point (``init.pt``, ``initial``, ``start``, ``epoch_init``, ...) is epoch 0,
  before the numbered checkpoints; a numbered epoch 0 beside it is refused.
- ``final``/``last`` may be a copy of the last numbered checkpoint or the state after it: it
  is refused, and each way out the message offers works.
- ``--epochs`` assigns numbers in the order the inputs expand to; when the names order the
  files differently, it is refused with the order of the names and how to give it.

Every refusal's hint is followed here, and must give the right epochs.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from helpers import net_state_dicts, read_trajectory, save_checkpoint

import pipeline
from pipeline.checkpoints.discover import discover
from pipeline.cli import main


def _touch(root: Path, *names: str) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    for n in names:
        (root / n).write_bytes(b"")  # discovery only looks at names
    return [root / n for n in names]


def _numbered(n: int, start: int = 1) -> list[str]:
    return [f"epoch_{e:03d}.pt" for e in range(start, start + n)]


def _epochs_by_name(specs: list) -> dict[str, int]:
    return {Path(s.files[0]).name: s.epoch for s in specs}


def _hint_inputs(message: str, marker: str) -> list[str]:
    """The inputs the error suggests after ``marker``, as the shell passes them on (a quoted
    glob stays a glob, which cmd-pipeline expands in natural order)."""
    tail = re.split(r";| --| with | \(", message.split(marker, 1)[1])[0]
    return shlex.split(tail)


@pytest.mark.parametrize(
    "start",
    ["init.pt", "initial.pt", "start.pt", "epoch_init.pt", "init_weights.pt", "model_initial.pth"],
)
def test_the_starting_point_is_epoch_zero(tmp_path: Path, start: str) -> None:
    _touch(tmp_path, start, *_numbered(12))
    specs = discover([tmp_path])
    assert [s.epoch for s in specs] == list(range(13))
    assert Path(specs[0].files[0]).name == start
    assert _epochs_by_name(specs)["epoch_012.pt"] == 12


def test_starting_point_beside_a_numbered_zero_is_refused(tmp_path: Path) -> None:
    _touch(tmp_path, "init.pt", *_numbered(5, start=0))
    with pytest.raises(pipeline.InputError, match="both claim epoch 0") as err:
        discover([tmp_path])
    # the hint: leave one of them out, e.g. give the numbered files only
    kept = _hint_inputs(str(err.value), "give ")
    specs = discover(kept)
    assert _epochs_by_name(specs) == {f"epoch_{e:03d}.pt": e for e in range(5)}


def test_two_starting_points_are_refused(tmp_path: Path) -> None:
    _touch(tmp_path, "init.pt", "start.pt", *_numbered(3))
    with pytest.raises(pipeline.InputError, match=r"'init'.*'start'.*starting point"):
        discover([tmp_path])


@pytest.mark.parametrize("end", ["final.pt", "last.pt", "model_final.pt"])
def test_an_end_checkpoint_is_refused_and_both_hints_work(tmp_path: Path, end: str) -> None:
    _touch(tmp_path, "init.pt", end, *_numbered(10))
    with pytest.raises(pipeline.InputError) as err:
        discover([tmp_path])
    msg = str(err.value)
    assert f"'{Path(end).stem}' may be a copy of the last numbered checkpoint" in msg
    assert "epoch_010" in msg and "\n" not in msg
    # hint 1: leave it out
    specs = discover(_hint_inputs(msg, "leave it out: give "))
    assert _epochs_by_name(specs) == {
        "init.pt": 0,
        **{f"epoch_{e:03d}.pt": e for e in range(1, 11)},
    }
    # hint 2: every file in epoch order, with the epochs given
    inputs = _hint_inputs(msg, "in epoch order: give ")
    assert [Path(p).name for p in inputs] == ["init.pt", "epoch_*.pt", end]
    specs = discover(inputs, epochs=list(range(12)))
    assert _epochs_by_name(specs) == {
        "init.pt": 0,
        end: 11,
        **{f"epoch_{e:03d}.pt": e for e in range(1, 11)},
    }


def test_epochs_on_a_folder_with_init_is_refused_with_the_order_of_the_names(
    tmp_path: Path,
) -> None:
    """The issue: the folder expands in natural order (epoch_001 ... epoch_012, init), so
    ``--epochs 0:13`` would make init.pt epoch 12 and epoch_001.pt epoch 0."""
    _touch(tmp_path, "init.pt", *_numbered(12))
    with pytest.raises(pipeline.InputError) as err:
        discover([tmp_path], epochs=list(range(13)))
    msg = str(err.value)
    assert "init.pt would be epoch 12" in msg and "\n" not in msg
    assert "init.pt, epoch_001.pt, epoch_002.pt, ..., epoch_012.pt" in msg
    # way out 1: no epochs: the names give them
    assert "leave out `epochs` (the names give epochs 0-12)" in msg
    assert [s.epoch for s in discover([tmp_path])] == list(range(13))
    # way out 2: the files in that order, with the same epochs
    inputs = _hint_inputs(msg, "give the files in that order: ")
    specs = discover(inputs, epochs=list(range(13)))
    assert _epochs_by_name(specs) == {
        "init.pt": 0,
        **{f"epoch_{e:03d}.pt": e for e in range(1, 13)},
    }


def test_epochs_in_another_order_than_the_numbers_are_refused(tmp_path: Path) -> None:
    a, b, c = _touch(tmp_path, "epoch_1.pt", "epoch_2.pt", "epoch_3.pt")
    with pytest.raises(pipeline.InputError, match=r"epoch_3\.pt would be epoch 0") as err:
        discover([c, a, b], epochs=[0, 1, 2])
    specs = discover(
        _hint_inputs(str(err.value), "give the files in that order: "), epochs=[0, 1, 2]
    )
    assert _epochs_by_name(specs) == {"epoch_1.pt": 0, "epoch_2.pt": 1, "epoch_3.pt": 2}


def test_renumbering_in_the_same_order_is_allowed(tmp_path: Path) -> None:
    """--epochs may renumber (steps to epochs), as long as the order is the names' order."""
    (init,) = _touch(tmp_path / "first", "init.pt")
    _touch(tmp_path / "steps", "step_500.pt", "step_1000.pt", "step_1500.pt")
    specs = discover([init, tmp_path / "steps"], epochs=[0, 1, 2, 3])
    assert _epochs_by_name(specs) == {
        "init.pt": 0,
        "step_500.pt": 1,
        "step_1000.pt": 2,
        "step_1500.pt": 3,
    }
    # names without numbers carry no order: --epochs decides
    paths = _touch(tmp_path / "x", "b.pt", "a.pt")
    assert [s.epoch for s in discover(paths, epochs=[5, 3])] == [3, 5]


def _cli(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_ingest_of_a_run_with_init(tmp_path: Path) -> None:
    """End to end, on real checkpoints: the refusal is one line; the names order the run
    with init.pt as epoch 0; following the refusal's explicit order gives the same store."""
    sds = net_state_dicts(6)
    run = tmp_path / "run"
    for e, sd in enumerate(sds):
        p = save_checkpoint(run, e, sd, "pt")
        p.rename(run / ("init.pt" if e == 0 else f"epoch_{e:03d}.pt"))
    bad = _cli(
        "ingest", run, "--store", tmp_path / "a.zarr", "--sync", "--no-progress", "--epochs", "0:6"
    )
    assert bad.exit_code == 2, bad.output
    lines = bad.stderr.strip().splitlines()
    assert (
        len(lines) == 1
        and lines[0].startswith("error: ")
        and "init.pt would be epoch 5" in lines[0]
    )
    assert not (tmp_path / "a.zarr").exists()

    ok = _cli("ingest", run, "--store", tmp_path / "a.zarr", "--sync", "--no-progress")
    assert ok.exit_code == 0, ok.output
    inputs = _hint_inputs(lines[0], "give the files in that order: ")
    ok2 = _cli(
        "ingest",
        *inputs,
        "--store",
        tmp_path / "b.zarr",
        "--sync",
        "--no-progress",
        "--epochs",
        "0:6",
    )
    assert ok2.exit_code == 0, ok2.output
    want = net_state_dicts(6)[0]["fc.bias"].numpy()
    meta = pipeline.open_store(str(tmp_path / "a.zarr")).meta
    assert meta is not None
    off = next(t.offset for t in meta.tensors if t.name == "fc.bias")
    for store in ("a.zarr", "b.zarr"):
        assert pipeline.info(str(tmp_path / store))["epochs"] == [0, 1, 2, 3, 4, 5]
        assert (read_trajectory(tmp_path / store)[off : off + 5, 0] == want).all()  # init.pt


def test_an_end_checkpoint_listed_first_with_epochs_is_refused(tmp_path: Path) -> None:
    final, *numbered = _touch(tmp_path, "final.pt", *_numbered(3))
    with pytest.raises(
        pipeline.InputError, match=r"final\.pt would be epoch 0 but its name puts it after"
    ):
        discover([final, *numbered], epochs=[0, 1, 2, 3])
    # listed last, it is the epoch after the numbered ones, as the names say
    specs = discover([*numbered, final], epochs=[0, 1, 2, 3])
    assert _epochs_by_name(specs)["final.pt"] == 3
