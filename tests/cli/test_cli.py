"""The ``cmd-pipeline`` command line: help, ingest/info/export round trip, one-line errors and
exit codes; and the cost of ``import pipeline``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click
import pytest
import torch
import zarr
from click.testing import CliRunner, Result
from helpers import (
    NET_KEYS,
    NET_ROWS,
    Run,
    assert_same_bits,
    assert_state_dict_equal,
    expected_trajectory,
    load_export,
    read_trajectory,
)

import pipeline
from pipeline.cli import main

CLI_BIN = Path(sys.executable).parent / "cmd-pipeline"


def _cli(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def _ingest(inputs: list[Path], store: Path, *extra: str) -> Result:
    return _cli("ingest", *inputs, "--store", store, "--sync", "--no-progress", *extra)


def _one_error_line(result: Result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in result.output
    return lines[0]


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ((), ["ingest", "info", "export"]),
        (
            ("ingest",),
            [
                "--store",
                "--epochs",
                "--include",
                "--exclude",
                "--float-buffers",
                "--nonfinite",
                "--chunk-rows",
                "--time-chunk",
                "--codec",
                "--force",
                "--sync",
                "--threads",
                "--scheduler",
                "--workers",
            ],
        ),
        (("info",), ["--store", "--json"]),
        (("export",), ["--store", "--epoch", "--out", "--analysis"]),
    ],
)
def test_help(command: tuple[str, ...], expected: list[str]) -> None:
    for flag in ("--help", "-h"):
        result = _cli(*command, flag)
        assert result.exit_code == 0, result.output
        assert result.stdout.startswith("Usage: ")
        for word in expected:
            assert word in result.stdout, word


def test_version() -> None:
    result = _cli("--version")
    assert result.exit_code == 0 and pipeline.__version__ in result.stdout


def test_installed_entry_point() -> None:
    assert CLI_BIN.exists(), "the package's console script is installed into the venv"
    proc = subprocess.run(
        [CLI_BIN, "export", "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and "--epoch" in proc.stdout


def test_ingest_info_export_round_trip(run5: Run, tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    result = _ingest([run5.root], store, "--chunk-rows", "20", "--exclude", "fc.bias")
    assert result.exit_code == 0, result.output
    assert f"N={NET_ROWS - 5:,} parameters x T=5 epochs" in result.stdout
    assert "added 5 epoch(s)" in result.stdout and "0 NaN/Inf" in result.stdout
    stored = [k for k in NET_KEYS if k != "fc.bias"]
    assert_same_bits(read_trajectory(store), expected_trajectory(run5.sds, stored))

    add = zarr.open_group(str(store), mode="a", use_consolidated=False).require_group("analyses").require_group("s1")
    add.attrs["x"] = 1
    text = _cli("info", "--store", store)
    assert text.exit_code == 0, text.output
    out = text.stdout
    for line in (
        f"N parameters: {NET_ROWS - 5:,}",
        "T epochs:     5  [0-4]",
        "tensors:      9 (6 parameters, 3 buffers), 7 stored in the trajectory",
        "not stored:   bn.num_batches_tracked, fc.bias",
        "chunking:     20 rows x 1 epoch(s)",
        "codec none",
        "analyses:     s1",
        "size on disk: ",
        "exclude=['fc.bias']",
    ):
        assert line in out, line

    js = _cli("info", "--store", store, "--json")
    assert js.exit_code == 0
    d = json.loads(js.stdout)
    assert d["n_rows"] == NET_ROWS - 5 and d["n_epochs"] == 5 and d["epochs"] == [0, 1, 2, 3, 4]
    assert d["chunk_shape"] == [20, 1] and d["analyses"] == ["s1"] and d["bytes_on_disk"] > 0
    assert d["schema_version"] == 2 and d["not_stored"] == ["bn.num_batches_tracked", "fc.bias"]

    for suffix in (".safetensors", ".pt"):
        out_path = tmp_path / "exported" / f"e3{suffix}"
        res = _cli("export", "--store", store, "--epoch", "3", "--out", out_path)
        assert res.exit_code == 0, res.output
        assert res.stdout.strip() == f"wrote {out_path}"
        assert "export epoch 3" in res.stderr  # the progress bar, on stderr
        got = load_export(out_path)
        assert_state_dict_equal(got, run5.sds[3], ordered=suffix == ".pt")

    # re-running is a no-op, and says so
    again = _ingest([run5.root], store)
    assert again.exit_code == 0 and "added 0 epoch(s)" in again.stdout
    assert "5 epoch(s) already stored" in again.stdout


def test_ingest_threads_and_epochs_option(run5: Run, tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    result = _cli(
        "ingest",
        run5.paths[4],
        run5.paths[0],
        "--store",
        store,
        "--threads",
        "--no-progress",
        "--epochs",
        "10,0",
        "--time-chunk",
        "2",
        "--codec",
        "lz4",
    )
    assert result.exit_code == 0, result.output
    d = pipeline.info(store)
    assert d["epochs"] == [0, 10] and d["codec"] == "lz4" and d["chunk_shape"][1] == 2
    assert_same_bits(read_trajectory(store), expected_trajectory([run5.sds[0], run5.sds[4]]))


def test_missing_store(tmp_path: Path) -> None:
    for args in (
        ("info", "--store", tmp_path / "nope.zarr"),
        ("info", "--store", tmp_path / "nope.zarr", "--json"),
        ("export", "--store", tmp_path / "nope.zarr", "--epoch", "0", "--out", tmp_path / "e.pt"),
    ):
        result = _cli(*args)
        assert result.exit_code == 3
        line = _one_error_line(result)
        assert "no cmd-pipeline store at" in line and str(tmp_path / "nope.zarr") in line
    assert not (tmp_path / "nope.zarr").exists()


def test_export_errors(run5: Run, tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    assert _ingest(run5.paths[:2], store).exit_code == 0
    bad = _cli("export", "--store", store, "--epoch", "1", "--out", tmp_path / "x.txt")
    assert bad.exit_code == 2
    assert "unsupported output type .txt" in _one_error_line(bad)
    assert not (tmp_path / "x.txt").exists()
    missing = _cli("export", "--store", store, "--epoch", "7", "--out", tmp_path / "e.pt")
    assert missing.exit_code == 3
    assert "epoch 7 is not in the store (stored epochs: 0-1)" in _one_error_line(missing)
    usage = _cli("export", "--store", store, "--out", tmp_path / "e.pt")
    assert usage.exit_code == 2 and "Missing option '--epoch'" in usage.output


def test_ingest_errors(run5: Run, tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    bad_spec = _ingest([run5.root], store, "--epochs", "0:5:0")
    assert bad_spec.exit_code == 2 and "cannot parse epochs" in bad_spec.output
    missing = _ingest([tmp_path / "nothing"], store)
    assert missing.exit_code == 2 and "no such file or directory" in _one_error_line(missing)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a store")
    in_the_way = _ingest([run5.root], a_file)
    assert in_the_way.exit_code == 3
    assert "cannot open or create a store at" in _one_error_line(in_the_way)
    assert a_file.read_text() == "not a store"
    assert _ingest([run5.root], store).exit_code == 0
    mismatch = _ingest([run5.root], store, "--codec", "lz4")
    assert mismatch.exit_code == 4
    line = _one_error_line(mismatch)
    assert "codec: stored 'none', requested 'lz4'" in line and "pass --force to" in line
    assert "force=True" not in line  # the library's wording, mapped to the flag
    forced = _ingest([run5.root], store, "--codec", "lz4", "--force")
    assert forced.exit_code == 0 and pipeline.info(store)["codec"] == "lz4"
    assert _ingest([run5.root], store, "--codec", "zstd").exit_code == 2  # not a choice


def test_schema_version_999(run5: Run, tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    assert _ingest(run5.paths[:2], store).exit_code == 0
    root = zarr.open_group(str(store), mode="r+", use_consolidated=False)
    attrs = dict(root.attrs["cmd_pipeline"])
    attrs["version"] = 999
    root.attrs["cmd_pipeline"] = attrs
    for args in (("info", "--store", store), ("info", "--json", "--store", store)):
        result = _cli(*args)
        assert result.exit_code == 3
        line = _one_error_line(result)
        assert "store schema version 999 is not supported" in line
    result = _ingest([run5.root], store)
    assert result.exit_code == 3 and "999" in _one_error_line(result)


def test_subprocess_round_trip(run5: Run, tmp_path: Path) -> None:
    """The installed command, in its own process: ingest, then export loads strictly."""
    store = tmp_path / "s.zarr"
    proc = subprocess.run(
        [CLI_BIN, "ingest", run5.root, "--store", store, "--sync", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run(
        [CLI_BIN, "export", "--store", store, "--epoch", "2", "--out", tmp_path / "e.pt"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    from helpers import Net

    net = Net()
    net.load_state_dict(torch.load(tmp_path / "e.pt", weights_only=True), strict=True)
    assert torch.equal(net.fc.weight.detach(), run5.sds[2]["fc.weight"])
    proc = subprocess.run(
        [CLI_BIN, "info", "--store", tmp_path / "missing.zarr"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 3 and proc.stdout == ""
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: ")


def test_import_pipeline_imports_neither_torch_nor_cupy() -> None:
    code = (
        "import sys, json, pipeline, pipeline.cli\n"
        "heavy = ('torch', 'cupy', 'safetensors', 'distributed')\n"
        "print(json.dumps({m: m in sys.modules for m in heavy}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    loaded = json.loads(proc.stdout)
    assert loaded["torch"] is False and loaded["cupy"] is False
    assert loaded["safetensors"] is False


def test_an_unexpected_exception_is_one_line_and_vv_shows_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last line of defence: an exception that escaped the checks is still one line,
    exit code 1, with a pointer to -vv, which shows the traceback."""
    import pipeline.ops.info

    def boom(store: str) -> None:
        raise RuntimeError("first line\n  second line")

    monkeypatch.setattr(pipeline.ops.info, "info", boom)
    r = _cli("info", "--store", tmp_path / "s.zarr")
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit)
    line = r.stderr.strip()
    assert "\n" not in line and "Traceback" not in r.output
    assert line == (
        "error: unexpected RuntimeError: first line second line (a bug, or input that escaped "
        "the checks; -vv shows the traceback)"
    )
    r = _cli("-vv", "info", "--store", tmp_path / "s.zarr")
    assert isinstance(r.exception, RuntimeError) and r.exit_code == 1


def test_multi_line_error_messages_become_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.ops.info

    def fail(store: str) -> None:
        raise pipeline.StoreError("the store\n\tis odd")

    monkeypatch.setattr(pipeline.ops.info, "info", fail)
    r = _cli("info", "--store", tmp_path / "s.zarr")
    assert r.exit_code == 3 and r.stderr == "error: the store is odd\n"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--mode-windows", "4:2"], "--mode-windows needs --name"),
        (["--name", "s", "--mode-windows", "4"], "WIDTH:STEP, e.g. 20:10"),
    ],
)
def test_stability_mode_windows_usage_is_checked_before_anything_runs(
    tmp_path: Path, extra: list[str], message: str
) -> None:
    """The CLI checks --mode-windows itself (exit 2), before the store is even opened."""
    store = tmp_path / "nope.zarr"
    result = _cli("stability", "--store", store, "--sync", "--no-progress", *extra)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert result.stdout == "" and not store.exists()


def test_stability_help_shows_the_defaults() -> None:
    result = _cli("stability", "--help")
    assert result.exit_code == 0
    text = " ".join(result.output.split())  # help lines wrap anywhere
    for want in ("--threshold", "default: 0.9;", "default: 4000000;", "--mode-windows", "--stride"):
        assert want in text, want
    assert "default: 1000;" in " ".join(_cli("fit", "--help").output.split())


def test_errors_name_the_commands_flags_where_the_api_names_parameters(tmp_path: Path) -> None:
    """The library's messages speak of parameters (``epochs``, ``time_chunk=1``); the CLI
    prints the running command's flags instead (``--epochs``, ``--time-chunk 1``)."""
    from pipeline.cli import as_flags, flag_names
    from pipeline.cli import ingest as ingest_command

    for name in ("final.pt", "best.pt"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(pipeline.InputError) as err:
        pipeline.ingest([tmp_path / "final.pt", tmp_path / "best.pt"], tmp_path / "s.zarr")
    assert "`epochs`" in str(err.value) and "--epochs" not in str(err.value)
    line = _one_error_line(
        _ingest([tmp_path / "final.pt", tmp_path / "best.pt"], tmp_path / "s.zarr")
    )
    assert "--epochs" in line and "`epochs`" not in line
    flags = flag_names(ingest_command)
    assert flags["time_chunk"] == "--time-chunk" and flags["epochs"] == "--epochs"
    text = "stores made with time_chunk=1, or a new one; seed=3 is not an ingest option"
    assert (
        as_flags(text, flags)
        == "stores made with --time-chunk 1, or a new one; seed=3 is not an ingest option"
    )


def test_cli_defaults_are_the_apis() -> None:
    """Defaults live once (pipeline/config.py): every option the CLI shares with its API
    function by name has the same default."""
    import inspect

    from pipeline.ops.compare import compare
    from pipeline.ops.evaluate import evaluate
    from pipeline.ops.fit import fit
    from pipeline.ops.ingest import ingest
    from pipeline.ops.stability import stability_study

    def norm(v: object) -> object:
        return ",".join(map(str, v)) if isinstance(v, tuple | list) else v

    checked = 0
    for command, function in [
        ("ingest", ingest),
        ("fit", fit),
        ("evaluate", evaluate),
        ("compare", compare),
        ("stability", stability_study),
    ]:
        api = inspect.signature(function).parameters
        for p in main.commands[command].params:
            if not isinstance(p, click.Option) or p.name not in api or p.is_flag:
                continue
            default = api[p.name].default
            given = isinstance(p.default, str | int | float | tuple | list)  # not None or unset
            if not given or default is inspect.Parameter.empty:
                continue
            assert norm(p.default) == norm(default), (command, p.name, p.default, default)
            checked += 1
    assert checked >= 8, checked
