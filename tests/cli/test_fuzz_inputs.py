"""Malformed inputs end in one line (``error: ...``) and the documented exit code, never a
traceback: every command on a malformed ``run.json``, a malformed study configuration (TOML,
``python -m workflows.study``), and a store whose root or study attributes are malformed.

The exit codes (README): 2 bad input, 3 store problem. An exception that escaped the checks
would also be one line, but it says "unexpected" and exits 1: that fails here.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from helpers import SYNC, net_state_dicts, save_checkpoint

import pipeline
from pipeline.cli import main

Mutation = Callable[[Any], Any]


def net_evaluator(run_dir: Path) -> Callable[[dict[str, Any]], tuple[float, float]]:
    """A workflow for the test Net (``test_fuzz_inputs:net_evaluator``)."""
    return lambda sd: (1.0, float(sd["fc.bias"][0] > 0))


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of the test Net (5 epochs) with its run.json, and a store with study 't'."""
    root = tmp_path_factory.mktemp("fuzz")
    run = root / "run"
    for e, sd in enumerate(net_state_dicts(5)):
        save_checkpoint(run, e, sd, "pt")
    (run / "run.json").write_text(json.dumps({"workflow": "test_fuzz_inputs:net_evaluator"}))
    store = root / "store.zarr"
    pipeline.ingest([str(run)], str(store), runtime=SYNC)
    pipeline.fit(str(store), "t", modes=2, samples=60, runtime=SYNC)
    return root


def _copy(base: Path, tmp_path: Path) -> tuple[Path, Path]:
    shutil.copytree(base, tmp_path / "w")
    return tmp_path / "w" / "run", tmp_path / "w" / "store.zarr"


def _cli(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def _assert_one_line(r: Result, code: int, expect: str) -> None:
    assert "Traceback" not in r.output, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.output
    assert lines[0].startswith("error: ") and not lines[0].startswith("error: unexpected "), lines[
        0
    ]
    assert r.exit_code == code, r.output
    assert expect in lines[0], lines[0]


# --------------------------------------------------------------------------------- run.json
_DIGITS = {"model": "cnn"}
RUN_JSON = [
    # (id, run.json text or None for no file, --workflow, expected exit code, expected text)
    ("missing", None, "digits", 2, "holds no run.json"),
    ("empty", "", "digits", 2, "is not valid JSON"),
    ("not-json", "{not json", "digits", 2, "is not valid JSON"),
    ("not-utf8", b"\xff\xfe{", "digits", 2, "is not valid JSON"),
    ("array", "[1, 2]", "digits", 2, "is not a JSON object"),
    ("no-config", "{}", "digits", 2, "lacks 'config'"),
    ("config-str", '{"config": "cnn"}', "digits", 2, "'config' is a str, not an object"),
    (
        "config-unknown-key",
        '{"config": {"model": "cnn", "nosuch": 1}}',
        "digits",
        2,
        "cannot be set up from",
    ),
    (
        "config-wrong-type",
        '{"config": {"model": "cnn", "hidden": "wide"}}',
        "digits",
        2,
        "cannot be set up from",
    ),
    (
        "other-model",
        '{"config": {"model": "mlp"}}',
        "digits",
        2,
        "cannot score the GD weights of epoch 0",
    ),
    (
        "epochs-str",
        json.dumps({"config": _DIGITS, "epochs": "x"}),
        "digits",
        2,
        "'epochs' is a str, not a list",
    ),
    (
        "epoch-not-int",
        json.dumps({"config": _DIGITS, "epochs": [{"epoch": "a"}]}),
        "digits",
        2,
        "epochs[0].epoch is a str",
    ),
    (
        "accuracy-str",
        json.dumps({"config": _DIGITS, "epochs": [{"epoch": 0, "test_accuracy": "x"}]}),
        "digits",
        2,
        "epochs[0].test_accuracy is a str",
    ),
    ("workflow-int", '{"workflow": 7}', None, 2, "'workflow' is a int, not a string"),
    ("workflow-unknown", '{"workflow": "nosuch"}', None, 2, "unknown workflow 'nosuch'"),
    ("workflow-none", '{"config": {}}', None, 2, "names no workflow"),
    ("workflow-no-module", '{"workflow": "no_such_module_q:f"}', None, 2, "cannot import"),
]


@pytest.mark.parametrize(
    ("text", "workflow", "code", "expect"), [c[1:] for c in RUN_JSON], ids=[c[0] for c in RUN_JSON]
)
def test_evaluate_on_a_malformed_run_json(
    base: Path,
    tmp_path: Path,
    text: str | bytes | None,
    workflow: str | None,
    code: int,
    expect: str,
) -> None:
    run, store = _copy(base, tmp_path)
    target = run / "run.json"
    if text is None:
        target.unlink()
    elif isinstance(text, bytes):
        target.write_bytes(text)
    else:
        target.write_text(text)
    args: list[str | Path] = [
        "evaluate",
        "-s",
        store,
        "-n",
        "t",
        "--run",
        run,
        "--sweep-modes",
        "",
        "--sync",
        "--no-progress",
    ]
    r = _cli(*args, *(["--workflow", workflow] if workflow else []))
    _assert_one_line(r, code, expect)


def test_evaluate_on_a_good_run_json(base: Path, tmp_path: Path) -> None:
    """The baseline of the cases above: the same command works on a well-formed run.json."""
    run, store = _copy(base, tmp_path)
    r = _cli(
        "evaluate",
        "-s",
        store,
        "-n",
        "t",
        "--run",
        run,
        "--sweep-modes",
        "",
        "--sync",
        "--no-progress",
    )
    assert r.exit_code == 0, r.output


# ----------------------------------------------------------------- study configuration TOML
_GOOD_TOML = (
    'workflow = "digits"\nseeds = [0]\n[train]\nmodel = "mlp"\nepochs = 2\n[fit]\nmodes = 2\n'
)
TOML = [
    ("malformed", "workflow = \n", "is not valid TOML"),
    ("not-utf8", b"workflow = '\xff'\n", "is not valid TOML"),
    ("no-workflow", "seeds = [0]\n", "lacks 'workflow'"),
    ("workflow-int", "workflow = 5\n", "'workflow' is a int"),
    ("workflow-unknown", 'workflow = "nosuch"\n', "unknown workflow 'nosuch'"),
    ("seeds-str", 'workflow = "digits"\nseeds = "0"\n', "'seeds' must be a list of integers"),
    (
        "seeds-mixed",
        'workflow = "digits"\nseeds = [0, "a"]\n',
        "'seeds' must be a list of integers",
    ),
    ("name-int", 'workflow = "digits"\nname = 5\n', "'name' is a int"),
    ("train-not-table", 'workflow = "digits"\ntrain = 5\n', "[train] must be a table"),
    (
        "train-unknown",
        'workflow = "digits"\n[train]\nnosuch = 1\n',
        "[train] has no setting 'nosuch'",
    ),
    ("train-wrong-type", 'workflow = "digits"\n[train]\nepochs = "x"\n', "[train] epochs = 'x'"),
    (
        "train-bool-for-int",
        'workflow = "digits"\n[train]\nepochs = true\n',
        "[train] epochs = True",
    ),
    ("train-bad-choice", 'workflow = "digits"\n[train]\nmodel = "rnn"\n', "[train] model = 'rnn'"),
    ("train-seed", 'workflow = "digits"\n[train]\nseed = 3\n', "[train] seed is set per run"),
    ("fit-wrong-type", 'workflow = "digits"\n[fit]\nmodes = "ten"\n', "[fit] modes = 'ten'"),
    (
        "fit-both",
        'workflow = "digits"\n[fit]\nmodes = 2\nthreshold = 0.5\n',
        "[fit] needs exactly one of modes, threshold",
    ),
    (
        "fit-neither",
        'workflow = "digits"\n[fit]\nsamples = 100\n',
        "[fit] needs exactly one of modes, threshold",
    ),
    (
        "fit-unknown",
        'workflow = "digits"\n[fit]\nmodes = 2\nstore = "x"\n',
        "[fit] has no setting 'store'",
    ),
    (
        "evaluate-wrong-type",
        'workflow = "digits"\n[evaluate]\nsweep_modes = "1,2"\n',
        "[evaluate] sweep_modes = '1,2'",
    ),
    (
        "evaluate-unknown",
        'workflow = "digits"\n[evaluate]\nnosuch = 1\n',
        "[evaluate] has no setting 'nosuch'",
    ),
]


@pytest.mark.parametrize(("text", "expect"), [c[1:] for c in TOML], ids=[c[0] for c in TOML])
def test_study_on_a_malformed_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str | bytes, expect: str
) -> None:
    from workflows import study

    cfg = tmp_path / "c.toml"
    if isinstance(text, bytes):
        cfg.write_bytes(text)
    else:
        cfg.write_text(text)
    code = study.main([str(cfg), "--out", str(tmp_path / "out"), "--threads"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and expect in err[0], err
    assert not (tmp_path / "out").exists()  # refused before anything is trained


def test_study_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from workflows import study

    cfg = tmp_path / "c.toml"
    cfg.write_text(_GOOD_TOML)
    assert study.main([str(tmp_path / "missing.toml")]) == 2
    assert "cannot read" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse's own usage error
        study.main([str(cfg), "--seeds", "a,b"])
    assert e.value.code == 2 and "--seeds: comma-separated integers" in capsys.readouterr().err
    assert study.main([str(cfg), "--out", str(tmp_path / "none"), "--render"]) == 2
    assert "no summary.json" in capsys.readouterr().err


# ----------------------------------------------------------------------- store attributes
def _set(path: tuple[Any, ...], value: Any) -> Mutation:
    def mutate(d: Any) -> Any:
        node = d
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
        return d

    return mutate


def _del(path: tuple[Any, ...]) -> Mutation:
    def mutate(d: Any) -> Any:
        node = d
        for k in path[:-1]:
            node = node[k]
        del node[path[-1]]
        return d

    return mutate


ROOT = [
    ("version-garbage", _set(("version",), "garbage"), "schema version 'garbage'"),
    ("no-schema", _del(("schema",)), "not a cmd-pipeline store"),
    ("not-an-object", lambda d: [d], "is not an object"),
    ("no-settings", _del(("settings",)), "lacks 'settings'"),
    ("include-int", _set(("settings", "include"), [1]), "settings.include holds an item"),
    ("chunk-rows-str", _set(("settings", "chunk_rows"), "big"), "settings.chunk_rows has type str"),
    (
        "chunk-rows-bool",
        _set(("settings", "chunk_rows"), True),
        "settings.chunk_rows has type bool",
    ),
    ("codec-unknown", _set(("settings", "codec"), "zstd"), "codec must be one of"),
    ("n-epochs-str", _set(("n_epochs",), "x"), "invalid store metadata"),
    ("n-epochs-too-many", _set(("n_epochs",), 99), "hold fewer than 99 epochs"),
    ("store-dtype-unknown", _set(("store_dtype",), "int8"), "store_dtype 'int8'"),
    ("pending-str", _set(("pending",), "x"), "pending is neither null nor a list"),
]


def _edit_attrs(zarr_json: Path, key: str, mutate: Mutation) -> None:
    doc = json.loads(zarr_json.read_text())
    doc["attributes"][key] = mutate(copy.deepcopy(doc["attributes"][key]))
    zarr_json.write_text(json.dumps(doc))


def _store_commands(run: Path, store: Path, tmp_path: Path) -> dict[str, list[str | Path]]:
    return {
        "info": ["info", "-s", store],
        "info-json": ["info", "-s", store, "--json"],
        "export": [
            "export",
            "-s",
            store,
            "--epoch",
            "0",
            "-o",
            tmp_path / "e.safetensors",
            "--no-progress",
        ],
        "fit": ["fit", "-s", store, "-n", "new", "-m", "2", "--sync", "--no-progress"],
        "ingest": ["ingest", run, "-s", store, "--sync", "--no-progress"],
        "reconstruct": ["reconstruct", "-s", store, "-n", "t", "--sync", "--no-progress"],
        "stability": ["stability", "-s", store, "--sync", "--no-progress"],
    }


@pytest.mark.parametrize(("mutate", "expect"), [c[1:] for c in ROOT], ids=[c[0] for c in ROOT])
def test_commands_on_malformed_store_attributes(
    base: Path, tmp_path: Path, mutate: Mutation, expect: str
) -> None:
    run, store = _copy(base, tmp_path)
    _edit_attrs(store / "zarr.json", "cmd_pipeline", mutate)
    for name, args in _store_commands(run, store, tmp_path).items():
        r = _cli(*args)
        try:
            _assert_one_line(r, 3, expect)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None


def _array_set(path: str, index: Any, value: Any) -> Callable[[Path], None]:
    def mutate(store: Path) -> None:
        import zarr

        arr = zarr.open_array(str(store), path=path, mode="r+")
        if index is None:
            arr[:] = value(arr[:])
        else:
            arr[index] = value
    return mutate


def _array_del(path: str) -> Callable[[Path], None]:
    def mutate(store: Path) -> None:
        shutil.rmtree(store / path)
    return mutate


#: schema 2 keeps the tensor table and the epochs in arrays: each corrupted the same way
ARRAYS = [
    ("shape-str", _array_set("tensor_shape", 0, '["a"]'), "tensor entry.shape holds an item"),
    ("shape-not-json", _array_set("tensor_shape", 0, "[1,"), "invalid store metadata"),
    ("dtype-unknown", _array_set("tensor_dtype", 0, "float99"), "dtype 'float99' is not a known"),
    ("offset-wrong", _array_set("tensor_offset", 1, 7), "offset 7 != 54"),
    ("kind-unknown", _array_set("tensor_kind", 0, "weights"), "tensor kind 'weights'"),
    ("files-str", _array_set("meta/sources", 0, '"x"'), "epoch entry.files has type str"),
    ("files-not-json", _array_set("meta/sources", 0, "[{"), "invalid store metadata"),
    (
        "sha-int",
        _array_set("meta/sources", 0, '[{"path": "a", "size": 1, "sha256": 5}]'),
        "source file.sha256 has type int",
    ),
    ("epochs-unordered", _array_set("epoch", None, lambda a: a[::-1]), "not strictly increasing"),
    ("tensor-table-missing", _array_del("tensor_dtype"), "a metadata array is missing"),
    ("epoch-array-missing", _array_del("meta/nonfinite"), "a metadata array is missing"),
]


@pytest.mark.parametrize(("mutate", "expect"), [c[1:] for c in ARRAYS], ids=[c[0] for c in ARRAYS])
def test_commands_on_malformed_metadata_arrays(
    base: Path, tmp_path: Path, mutate: Callable[[Path], None], expect: str
) -> None:
    run, store = _copy(base, tmp_path)
    mutate(store)
    for name, args in _store_commands(run, store, tmp_path).items():
        r = _cli(*args)
        try:
            _assert_one_line(r, 3, expect)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None


STUDY = [
    ("version-garbage", _set(("version",), "garbage"), "schema version 'garbage'"),
    ("no-schema", _del(("schema",)), "is not a cmd-pipeline analysis"),
    ("not-an-object", lambda d: [d], "is not a cmd-pipeline analysis"),
    ("no-config", _del(("config",)), "attributes lacks 'config'"),
    ("config-str", _set(("config",), "x"), "attributes.config is a str"),
    ("samples-str", _set(("config", "samples"), "x"), "config.samples is a str"),
    ("window-int", _set(("config", "window"), 5), "config.window is a int"),
    (
        "modes-and-threshold",
        _set(("config", "threshold"), 0.5),
        "not exactly one of modes, threshold",
    ),
    ("n-modes-str", _set(("n_modes",), "x"), "n_modes is a str"),
    ("no-summary", _del(("summary",)), "attributes lacks 'summary'"),
    ("summary-epochs-str", _set(("summary", "epochs"), "x"), "summary.epochs is a str"),
    (
        "summary-epoch-mse-str",
        _set(("summary", "epochs", 0, "mse"), "x"),
        "summary.epochs[0].mse is a str",
    ),
    (
        "summary-mode-no-count",
        _del(("summary", "modes", 0, "count")),
        "summary.modes[0] lacks 'count'",
    ),
    ("summary-flags-list", _set(("summary", "flags"), []), "summary.flags is a list"),
    ("evaluation-str", _set(("evaluation",), "x"), "evaluation is not an object"),
]

def _study_commands(run: Path, store: Path) -> dict[str, list[str | Path]]:
    return {
        "evaluate": [
            "evaluate",
            "-s",
            store,
            "-n",
            "t",
            "--run",
            run,
            "--sweep-modes",
            "",
            "--sync",
            "--no-progress",
        ],
        "evaluate-sweep": [
            "evaluate",
            "-s",
            store,
            "-n",
            "t",
            "--run",
            run,
            "--sweep-modes",
            "2",
            "--sweep-seeds",
            "0",
            "--sweep-samples",
            "60",
            "--sync",
            "--no-progress",
        ],
        "stability": ["stability", "-s", store, "-n", "t", "--sync", "--no-progress"],
        "report": ["report", "-s", store, "-n", "t"],
        "info": ["info", "-s", store],
    }


@pytest.mark.parametrize(("mutate", "expect"), [c[1:] for c in STUDY], ids=[c[0] for c in STUDY])
@pytest.mark.parametrize("command", ["evaluate", "evaluate-sweep", "stability", "report", "info"])
def test_commands_on_malformed_study_attributes(
    base: Path, tmp_path: Path, mutate: Mutation, expect: str, command: str
) -> None:
    run, store = _copy(base, tmp_path)
    _edit_attrs(store / "analyses" / "t" / "zarr.json", "cmd_pipeline_analysis", mutate)
    r = _cli(*_study_commands(run, store)[command])
    if command == "info":
        # info still describes the store, and names the broken study and what is wrong
        assert "Traceback" not in r.output and r.exit_code == 0, r.output
        assert "t: unreadable" in r.output and expect in r.output
        return
    _assert_one_line(r, 3, expect)


@pytest.mark.parametrize("which", ["root", "study"])
def test_unreadable_zarr_json_is_one_line(base: Path, tmp_path: Path, which: str) -> None:
    """A zarr.json that is not JSON: one line, exit 3 (a store problem), no traceback; ``info``
    on a store whose study is unreadable still describes the store and names the study."""
    run, store = _copy(base, tmp_path)
    target = store / "zarr.json" if which == "root" else store / "analyses" / "t" / "zarr.json"
    target.write_text("{garbage")
    r = _cli("evaluate", "-s", store, "-n", "t", "--run", run, "--sweep-modes", "", "--sync")
    _assert_one_line(r, 3, "unreadable Zarr metadata")
    r = _cli("info", "-s", store)
    if which == "root":
        _assert_one_line(r, 3, "unreadable Zarr metadata")
    else:
        assert r.exit_code == 0 and "t: unreadable" in r.output, r.output
