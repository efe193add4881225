"""A workflow over several seeds: train and record, ingest, fit, evaluate, report; one table.

For every seed, the workflow's training run is recorded (one checkpoint per epoch), ingested
into its own store, fitted with CMD, evaluated (GD against CMD at every epoch, and the sweep
over M), and reported. The table over seeds (mean ± std) is printed as Markdown and written
to ``OUT/table.md``, with everything behind it in ``OUT/summary.json``.

Configurations are TOML files in ``workflows/configs/``::

    workflow = "digits"            # a module workflows.<name> with TrainConfig, train_and_record
    seeds = [0, 1, 2]
    [train]                        # fields of that module's TrainConfig (seed is set per run)
    model = "cnn"
    epochs = 100
    [fit]                          # arguments of pipeline.fit
    modes = 10
    samples = 1000
    [evaluate]                     # arguments of pipeline.evaluate
    sweep_modes = [1, 2, 5, 10, 20]
    sweep_seeds = [0, 1, 2]

Example::

    python -m workflows.study workflows/configs/digits_cnn.toml --out runs/digits_cnn

Runs already recorded in OUT are reused (the training is deterministic), so an interrupted
study resumes where it stopped.
"""

from __future__ import annotations

import argparse
import collections.abc
import importlib
import json
import statistics
import sys
import time
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

import pipeline
from pipeline.errors import InputError, PipelineError
from pipeline.ops.evaluate import known_workflows, workflow_module
from pipeline.runtime import RuntimeOptions, runner

__all__ = ["format_table", "main", "run_study", "summarise_seeds"]


#: the settings a study may give ``pipeline.fit`` and ``pipeline.evaluate`` (store, name,
#: runtime and workflow are the study's own)
FIT_SETTINGS: dict[str, Any] = {
    "modes": int, "threshold": float, "samples": int, "seed": int, "epochs": str, "block_rows": int,
}
EVALUATE_SETTINGS: dict[str, Any] = {
    "sweep_modes": list[int],
    "sweep_seeds": list[int],
    "sweep_samples": list[int],
    "sweep_epochs": str,
    "keep_sweep": bool,
}
_TOP_LEVEL = ("workflow", "seeds", "name", "train", "fit", "evaluate")


def _accepts(hint: Any, value: Any) -> bool:
    """Does ``value`` (from TOML) have the type ``hint`` (a dataclass field's annotation)?"""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(a, value) for a in args)
    if origin is typing.Literal:
        return any(type(value) is type(a) and value == a for a in args)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple, collections.abc.Sequence, collections.abc.Iterable):
        return isinstance(value, list) and (not args or all(_accepts(args[0], v) for v in value))
    return True  # a type TOML cannot spell: left to the workflow


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args if a is not type(None))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, tuple, collections.abc.Sequence, collections.abc.Iterable):
        return f"a list of {_describe(args[0])}" if args else "a list"
    return getattr(hint, "__name__", str(hint))


def _check_table(
    cfg: dict[str, Any], section: str, allowed: dict[str, Any], path: Path
) -> dict[str, Any]:
    table = cfg.get(section, {})
    if not isinstance(table, dict):
        raise InputError(f"[{section}] must be a table, got {table!r}", path=str(path))
    for key, value in table.items():
        if key not in allowed:
            raise InputError(
                f"[{section}] has no setting {key!r} (settings: {', '.join(sorted(allowed))})",
                path=str(path),
            )
        if not _accepts(allowed[key], value):
            raise InputError(
                f"[{section}] {key} = {value!r}: expected {_describe(allowed[key])}",
                path=str(path),
            )
    return table


def _load_config(path: Path) -> dict[str, Any]:
    """Read and check a study configuration; every mistake is an :class:`InputError` naming
    the file, raised before anything is trained."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise InputError(
            f"cannot read the configuration: {e.strerror or e}", path=str(path)
        ) from None
    try:
        cfg = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise InputError(f"is not valid TOML: {e}", path=str(path)) from None
    if unknown := sorted(set(cfg) - set(_TOP_LEVEL)):
        raise InputError(
            f"unknown key(s) {unknown} (keys: {', '.join(_TOP_LEVEL)})", path=str(path)
        )
    if "workflow" not in cfg:
        raise InputError("lacks 'workflow'", path=str(path))
    for key, typ in (("workflow", str), ("name", str)):
        if key in cfg and not isinstance(cfg[key], typ):
            raise InputError(
                f"{key!r} is a {type(cfg[key]).__name__}, not a string", path=str(path)
            )
    mod = _workflow_module(cfg["workflow"], path)
    cfg.setdefault("seeds", [0, 1, 2])
    if not _accepts(list[int], cfg["seeds"]) or not cfg["seeds"]:
        raise InputError(
            f"'seeds' must be a list of integers, got {cfg['seeds']!r}", path=str(path)
        )
    fields = typing.get_type_hints(mod.TrainConfig)
    train = _check_table(cfg, "train", fields, path)
    if "seed" in train:
        raise InputError("[train] seed is set per run: list the seeds in 'seeds'", path=str(path))
    fit = _check_table(cfg, "fit", FIT_SETTINGS, path) if "fit" in cfg else {"modes": 10}
    if ("modes" in fit) == ("threshold" in fit):
        raise InputError("[fit] needs exactly one of modes, threshold", path=str(path))
    evaluate = _check_table(cfg, "evaluate", EVALUATE_SETTINGS, path)
    cfg.update(train=train, fit=fit, evaluate=evaluate)
    cfg.setdefault("name", path.stem)
    return cfg


def _workflow_module(name: str, path: Path) -> Any:
    """The module of the installed workflow ``name`` (entry point group
    ``cmd_pipeline.workflows``), which must define ``TrainConfig`` and ``train_and_record``."""
    known = known_workflows()
    if name not in known:
        raise InputError(
            f"unknown workflow {name!r} (workflows: {', '.join(known)})", path=str(path)
        )
    mod = workflow_module(name)
    if not (hasattr(mod, "TrainConfig") and callable(getattr(mod, "train_and_record", None))):
        raise InputError(
            f"workflow {name!r} ({mod.__name__}) defines no TrainConfig and train_and_record",
            path=str(path),
        )
    return mod


def _recorded(run_dir: Path, want: dict[str, Any]) -> dict[str, Any] | None:
    """The run already in ``run_dir`` if it was made with this configuration."""
    try:
        run = json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        return None
    return run if run.get("config") == want else None


def record_seed(cfg: dict[str, Any], seed: int, out: Path) -> tuple[Path, dict[str, Any], float]:
    """Train and record one seed's run (or reuse the one already in OUT)."""
    from dataclasses import asdict

    mod = importlib.import_module(f"workflows.{cfg['workflow']}")
    config = mod.TrainConfig(**{**cfg["train"], "seed": seed})
    run_dir = out / f"seed{seed}" / "run"
    t0 = time.perf_counter()
    run = _recorded(run_dir, asdict(config))
    if run is None:
        print(f"  seed {seed}: training {cfg['workflow']} ({config})", flush=True)
        run = mod.train_and_record(run_dir, config, overwrite=True)
    return run_dir, run, time.perf_counter() - t0


def run_seed(
    cfg: dict[str, Any], seed: int, out: Path, rt: Any, recorded: tuple[Path, dict[str, Any], float]
) -> dict[str, Any]:
    """One seed's recorded run: ingest, fit, evaluate, report. Returns its row."""
    run_dir, run, t_train = recorded
    store = out / f"seed{seed}" / "store.zarr"
    t0 = time.perf_counter()
    pipeline.ingest([run_dir], store, run=rt)
    fit_args = dict(cfg["fit"])
    fit_args.setdefault("seed", 0)
    fitted = pipeline.fit(store, "study", force=True, run=rt, **fit_args)
    ev_args = {"figures": False, **cfg["evaluate"]}  # the report below draws them
    ev = pipeline.evaluate(store, "study", workflow=cfg["workflow"], run=rt, **ev_args).evaluation
    rep = pipeline.report(store, "study")
    return {
        "seed": seed,
        "n_params": run["n_params"],
        "epochs": len(run["epochs"]),
        "n_modes": fitted.n_modes,
        "samples": fitted.n_samples,
        "gd_final": ev["final"]["gd_accuracy"],
        "cmd_final": ev["final"]["cmd_accuracy"],
        "gd_best": ev["best"]["gd_accuracy"],
        "cmd_best": ev["best"]["cmd_accuracy"],
        "gd_final_loss": ev["final"]["gd_loss"],
        "cmd_final_loss": ev["final"]["cmd_loss"],
        "mse": ev["mse"],
        "dynamics_error": ev.get("dynamics_error"),
        "relative_error": ev["relative_error"],
        "sweep": (ev.get("sweep") or {}).get("by_modes"),
        "report": rep.html,
        "seconds_train": round(t_train, 1),
        "seconds_pipeline": round(time.perf_counter() - t0, 1),
    }


def _ms(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise_seeds(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and standard deviation over seeds of each figure of the table."""
    keys = ("gd_final", "cmd_final", "gd_best", "cmd_best", "mse", "relative_error", "n_modes")
    out: dict[str, Any] = {k: _ms([float(r[k]) for r in rows]) for k in keys}
    # summaries written before the error relative to the dynamics existed lack it
    dyn = [r.get("dynamics_error") for r in rows]
    out["dynamics_error"] = None if None in dyn else _ms([float(v) for v in dyn])
    sweeps = [r["sweep"] for r in rows if r.get("sweep")]
    if sweeps:
        per_m: dict[int, list[dict[str, Any]]] = {}
        for sw in sweeps:
            for s in sw:
                per_m.setdefault(int(s["modes_requested"]), []).append(s)
        out["sweep"] = {
            m: {
                # at the last sweep epoch of each evaluation (its "epoch")
                "epoch": ss[0].get("epoch"),
                "accuracy": _ms([float(s["accuracy_mean"]) for s in ss]),
                "mse_epoch": (
                    _ms([float(s["mse_epoch_mean"]) for s in ss])
                    if all(s.get("mse_epoch_mean") is not None for s in ss)
                    else None
                ),
                # over the whole window
                "mse": _ms([float(s["mse_mean"]) for s in ss]),
            }
            for m, ss in sorted(per_m.items())
        }
    return out


def format_table(name: str, cfg: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The Markdown table of one workflow (mean ± std over seeds)."""
    s = summarise_seeds(rows)

    def pm(k: str, fmt: str = ".4f") -> str:
        m, d = s[k]
        return f"{m:{fmt}} ± {d:{fmt}}"

    lines = [
        f"**{name}** ({cfg['workflow']}, {rows[0]['n_params']:,} parameters, "
        f"{rows[0]['epochs']} recorded epochs, seeds {[r['seed'] for r in rows]}, "
        f"K = {rows[0]['samples']})",
        "",
        "Mean ± std over the training seeds; weight MSE over all parameters and the epochs of "
        "the study's window (all recorded epochs unless [fit] epochs is set).",
        "",
        "| | final test accuracy | best test accuracy | weight MSE | ‖W−Ŵ‖/‖W−mean_t W‖ "
        "| ‖W−Ŵ‖/‖W‖ | modes |",
        "|---|---|---|---|---|---|---|",
        f"| GD | {pm('gd_final')} | {pm('gd_best')} | 0 | 0 | 0 | - |",
        f"| CMD | {pm('cmd_final')} | {pm('cmd_best')} | {pm('mse', '.3g')} | "
        f"{'-' if s['dynamics_error'] is None else pm('dynamics_error', '.3g')} | "
        f"{pm('relative_error', '.3g')} | {s['n_modes'][0]:.1f} |",
    ]
    if "sweep" in s:
        ev = cfg.get("evaluate", {})
        k_list = ev.get("sweep_samples") or [rows[0]["samples"]]
        first = next(iter(s["sweep"].values()))
        at = "the last sweep epoch" if first.get("epoch") is None else f"epoch {first['epoch']}"
        lines += [
            "",
            f"Sweep over M: per training seed, the mean over sampling seeds "
            f"{ev.get('sweep_seeds', [0, 1, 2])} and K {k_list}; then mean ± std over the "
            "training seeds.",
            "",
            f"| M | CMD accuracy at {at} | weight MSE at {at} | weight MSE over the window |",
            "|---|---|---|---|",
        ]
        for m, v in s["sweep"].items():
            a, ad = v["accuracy"]
            e, ed = v["mse"]
            at_mse = "-" if v.get("mse_epoch") is None else (
                f"{v['mse_epoch'][0]:.3g} ± {v['mse_epoch'][1]:.2g}"
            )
            lines.append(f"| {m} | {a:.4f} ± {ad:.4f} | {at_mse} | {e:.3g} ± {ed:.2g} |")
    return "\n".join(lines)


def run_study(
    config_path: Path, out: Path, *, seeds: list[int] | None = None, runtime: RuntimeOptions | None = None
) -> tuple[str, list[dict[str, Any]]]:
    """Run every seed of a configuration; returns the Markdown table and the rows."""
    cfg = _load_config(config_path)
    seeds = seeds if seeds is not None else [int(s) for s in cfg["seeds"]]
    out.mkdir(parents=True, exist_ok=True)
    # train first, on every core: a LocalCluster started before torch is imported leaves
    # OMP_NUM_THREADS=1 behind (and another thread count gives other, equally valid, weights)
    recorded = {seed: record_seed(cfg, seed, out) for seed in seeds}
    rows = []
    with runner(runtime or RuntimeOptions()) as rt:
        for seed in seeds:
            row = run_seed(cfg, seed, out, rt, recorded[seed])
            print(
                f"  seed {seed}: GD {row['gd_final']:.4f}  CMD {row['cmd_final']:.4f}  "
                f"(M={row['n_modes']}, MSE {row['mse']:.3g}; training {row['seconds_train']:.0f} s, "
                f"pipeline {row['seconds_pipeline']:.0f} s)",
                flush=True,
            )
            rows.append(row)
    table = format_table(cfg["name"], cfg, rows)
    (out / "table.md").write_text(table + "\n")
    (out / "summary.json").write_text(
        json.dumps({"config": cfg, "rows": rows, "summary": summarise_seeds(rows)}, indent=2, default=str)
        + "\n"
    )
    return table, rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m workflows.study",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("config", type=Path, help="a TOML configuration (workflows/configs/*.toml)")
    ap.add_argument("--out", type=Path, default=None, help="output folder [runs/<config name>]")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds [from the config]")
    ap.add_argument("--workers", type=int, default=None, help="LocalCluster workers [one per core]")
    ap.add_argument("--threads", action="store_true", help="run on local threads, no LocalCluster")
    ap.add_argument(
        "--render", action="store_true", help="only print the table again from OUT/summary.json"
    )
    a = ap.parse_args(argv)
    out = a.out or Path("runs") / a.config.stem
    try:
        seeds = [int(x) for x in a.seeds.split(",")] if a.seeds else None
    except ValueError:
        ap.error(f"--seeds: comma-separated integers, got {a.seeds!r}")
    try:
        if a.render:
            saved = _read_summary(out)
            table = format_table(saved["config"]["name"], saved["config"], saved["rows"])
            (out / "table.md").write_text(table + "\n")
            print(table)
            return 0
        rt = RuntimeOptions(mode="threads" if a.threads else "local", workers=a.workers)
        t0 = time.perf_counter()
        table, _ = run_study(a.config, out, seeds=seeds, runtime=rt)
    except PipelineError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return e.exit_code
    print()
    print(table)
    print(f"\n({time.perf_counter() - t0:.0f} s; table in {out / 'table.md'})")
    return 0


def _read_summary(out: Path) -> dict[str, Any]:
    path = out / "summary.json"
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"no summary.json in {out}: run the study first") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"cannot read it: {e}", path=str(path)) from None
    ok = (
        isinstance(saved, dict)
        and isinstance(saved.get("config"), dict)
        and isinstance(saved["config"].get("name"), str)
        and isinstance(saved.get("rows"), list)
        and bool(saved["rows"])
    )
    if not ok:
        raise InputError("is not a study summary (config, rows)", path=str(path))
    return saved


if __name__ == "__main__":
    sys.exit(main())
