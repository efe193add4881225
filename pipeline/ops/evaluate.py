"""``evaluate``: test loss and accuracy of the GD weights and of their CMD reconstruction.

For every epoch of a study's window, the recorded (GD) weights and the CMD weights
``a * r_mode(t) + b`` are loaded into the real model of the training workflow and evaluated
on its test set. A sweep then fits the same window again for several numbers of modes M,
sampling seeds and sample counts K, and records the weight MSE and the test accuracy of
each (the paper's Figures 5-7). Results go into the study's attributes (``evaluation``) and
into ``analyses/<name>/report/evaluation.json``, with the evaluation figures.

A *workflow* turns a training run's folder (holding ``run.json``) into a function mapping a
state_dict to ``(test loss, test accuracy)``. Which one is found (see :func:`resolve_workflow`)
from, in order: the ``--workflow`` given, the ``evaluator`` (``module:function``) that
``run.json`` records, or its ``workflow`` name (older runs record only the name). A name is
looked up in the installed entry points of the group ``cmd_pipeline.workflows`` (``digits``
and ``minilm`` are declared by this package's pyproject.toml); any ``module:function`` with
that signature works as well. The library itself never imports the examples (``workflows``).
"""

from __future__ import annotations

import datetime as _dt
import importlib
import importlib.metadata
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from pipeline.config import SWEEP_EPOCHS, SWEEP_MODES, SWEEP_SEEDS
from pipeline.errors import InputError, PipelineError, PipelineWarning, StoreError
from pipeline.ops.export import state_dict
from pipeline.ops.fit import fit
from pipeline.runtime import Runner, RuntimeOptions, using
from pipeline.store.analysis import AnalysisGroup, complete_study
from pipeline.store.remote import StorageOptions, with_storage_options
from pipeline.store.schema import StoreMeta, check_study_attrs
from pipeline.store.trajectory import TrajectoryStore

__all__ = [
    "WORKFLOW_GROUP",
    "EvaluationResult",
    "evaluate",
    "find_run_dir",
    "known_workflows",
    "resolve_workflow",
    "sweep_name",
    "workflow_module",
]

#: state_dict -> (mean test loss, test accuracy)
EvalFn = Callable[[dict[str, Any]], tuple[float, float]]

#: The entry-point group of the installed workflows: name -> ``module:function`` taking the run
#: folder, returning an EvalFn (the function's module also defines ``TrainConfig`` and
#: ``train_and_record``).
WORKFLOW_GROUP = "cmd_pipeline.workflows"
#: The numbers of modes of the paper's accuracy-against-M figures.
SWEEP_SEP = "~"


def sweep_name(name: str, modes: int, samples: int, seed: int) -> str:
    """The name of a sweep study (deleted after the evaluation unless kept)."""
    return f"{name}{SWEEP_SEP}m{modes}-k{samples}-s{seed}"


def known_workflows() -> dict[str, str]:
    """The installed workflows: name -> ``module:function``, from the entry points of the group
    :data:`WORKFLOW_GROUP`."""
    eps = importlib.metadata.entry_points(group=WORKFLOW_GROUP)
    return {ep.name: ep.value for ep in sorted(eps, key=lambda ep: ep.name)}


def _known_list() -> str:
    return ", ".join(known_workflows()) or "none installed"


def _target(spec: str) -> str:
    """``module:function`` of a workflow name or ``module:function``."""
    if ":" in spec:
        return spec
    known = known_workflows()
    if spec not in known:
        raise InputError(f"unknown workflow {spec!r}: use one of {_known_list()} or module:function")
    return known[spec]


def resolve_workflow(spec: str) -> Callable[[Path], EvalFn]:
    """The evaluator factory of a workflow: an installed name (entry point group
    :data:`WORKFLOW_GROUP`) or ``module:function``, imported now."""
    mod_name, attr = _target(spec).split(":", 1)
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise InputError(f"workflow {spec!r}: cannot import {mod_name}: {e}") from e
    fn = getattr(mod, attr, None)
    if not callable(fn):
        raise InputError(f"workflow {spec!r}: {mod_name} has no function {attr!r}")
    return fn


def workflow_module(spec: str) -> ModuleType:
    """The module of a workflow (an installed name or ``module:function``), imported: where
    its ``TrainConfig`` and ``train_and_record`` are."""
    mod_name = _target(spec).split(":", 1)[0]
    try:
        return importlib.import_module(mod_name)
    except ImportError as e:
        raise InputError(f"workflow {spec!r}: cannot import {mod_name}: {e}") from e


def find_run_dir(meta: StoreMeta) -> Path | None:
    """The training run's folder: the first checkpoint folder (or its parent) with run.json."""
    seen: set[Path] = set()
    for entry in meta.epochs:
        for f in entry.files:
            for d in (Path(f.path).parent, Path(f.path).parent.parent):
                if d in seen:
                    continue
                seen.add(d)
                if (d / "run.json").is_file():
                    return d
    return None


@dataclass
class EvaluationResult:
    """What :func:`evaluate` measured (``evaluation`` is also stored with the study)."""

    store: str
    name: str
    evaluation: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)

    def text(self) -> str:
        """The result in words (every result type has this method; ``table()`` is the
        same text)."""
        return self.table()

    def table(self) -> str:
        """The GD vs CMD table: per epoch, then the sweep over M.

        Each MSE says where it is taken: the per-epoch rows hold the weight MSE at that
        epoch; the sweep shows the MSE at the epoch its accuracy is taken at (the last of
        the sweep's epochs) and the MSE over the whole window, side by side.
        """
        ev = self.evaluation
        window = [r["epoch"] for r in ev["epochs"]]
        span = f"{window[0]}..{window[-1]}"
        lines = [
            f"study {self.name!r}: {ev['study']['n_modes']} mode(s), K={ev['study']['samples']}, "
            f"workflow {ev['workflow']}",
            "  epoch   GD acc   CMD acc   GD loss   CMD loss   weight MSE at the epoch",
        ]
        for r in ev["epochs"]:
            lines.append(
                f"  {r['epoch']:>5}   {r['gd_accuracy']:.4f}   {r['cmd_accuracy']:.4f}    "
                f"{r['gd_loss']:.4f}    {r['cmd_loss']:.4f}    {_g(r['mse'])}"
            )
        lines.append(
            f"  window (epochs {span}): weight MSE {_g(ev.get('mse'))}, error relative to "
            f"the dynamics {_g(ev.get('dynamics_error'))} (to ‖W‖: {_g(ev.get('relative_error'))})"
        )
        f, b = ev["final"], ev["best"]
        lines.append(
            f"  final (epoch {f['epoch']}): GD {f['gd_accuracy']:.4f}, CMD {f['cmd_accuracy']:.4f}; "
            f"best: GD {b['gd_accuracy']:.4f} (epoch {b['gd_epoch']}), "
            f"CMD {b['cmd_accuracy']:.4f} (epoch {b['cmd_epoch']})"
        )
        sw = ev.get("sweep")
        if sw and sw["by_modes"]:
            at = sw["epochs"][-1]
            which = (
                "" if len(sw["epochs"]) == 1
                else f" (the last of the sweep's epochs {_epochs_brief(sw['epochs'])})"
            )
            lines.append(
                f"  sweep over seeds {sw['seeds']} and K {sw['samples']}, mean ± std; CMD "
                f"accuracy and weight MSE at epoch {at}{which}; window MSE over epochs {span}:"
            )
            heads = ["    M", "modes", f"CMD acc at epoch {at}", f"MSE at epoch {at}",
                     "MSE over the window", "runs"]
            cells = [
                [
                    f"{r['modes_requested']:>5}",
                    f"{r['n_modes_mean']:.1f}",
                    _pm(r["accuracy_mean"], r["accuracy_std"], ".4f"),
                    _pm(r.get("mse_epoch_mean"), r.get("mse_epoch_std"), ".3g"),
                    _pm(r["mse_mean"], r["mse_std"], ".3g"),
                    str(r["runs"]),
                ]
                for r in sw["by_modes"]
            ]
            widths = [max(len(x) for x in col) for col in zip(heads, *cells, strict=True)]
            for row in (heads, *cells):
                cols = (x.rjust(w) for x, w in zip(row, widths, strict=True))
                lines.append("  " + " | ".join(cols))
        return "\n".join(lines)


def _pm(mean: float | None, std: float | None, fmt: str) -> str:
    if mean is None:
        return "-"
    return f"{mean:{fmt}} ± {0.0 if std is None else std:{'.2g' if fmt == '.3g' else fmt}}"


def _g(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}"


def _epochs_brief(e: list[int]) -> str:
    return ", ".join(map(str, e)) if len(e) <= 4 else f"{e[0]}..{e[-1]} ({len(e)})"


def _mean_std(v: Sequence[float | None]) -> tuple[float | None, float | None]:
    x = [float(a) for a in v if a is not None and math.isfinite(a)]
    if not x:
        return None, None
    return float(np.mean(x)), float(np.std(x, ddof=1)) if len(x) > 1 else 0.0


def read_run_json(run_dir: Path) -> dict[str, Any]:
    """The training run's ``run.json``, checked where :func:`evaluate` reads it.

    ``workflow`` and ``evaluator`` (strings), ``config`` (an object) and ``epochs`` (a list of objects with an
    integer ``epoch`` and numeric ``test_accuracy``/``test_loss``) are optional, but when
    present they must have these types. Raises :class:`InputError` naming the file.
    """
    path = run_dir / "run.json"
    if not path.is_file():
        raise InputError(
            f"{run_dir} holds no run.json: is it a training run's folder? (give the run's folder)"
        )
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"is not valid JSON: {e}", path=str(path)) from None

    def bad(what: str) -> InputError:
        return InputError(what, path=str(path))

    if not isinstance(run, dict):
        raise bad(f"is not a JSON object (a {type(run).__name__})")
    for key, typ, name in (
        ("workflow", str, "a string"),
        ("evaluator", str, "a string"),
        ("config", dict, "an object"),
    ):
        if key in run and not isinstance(run[key], typ):
            raise bad(f"{key!r} is a {type(run[key]).__name__}, not {name}")
    epochs = run.get("epochs", [])
    if not isinstance(epochs, list):
        raise bad(f"'epochs' is a {type(epochs).__name__}, not a list")
    for i, rec in enumerate(epochs):
        if not isinstance(rec, dict):
            raise bad(f"epochs[{i}] is a {type(rec).__name__}, not an object")
        number = rec.get("epoch")
        if not isinstance(number, int) or isinstance(number, bool):
            raise bad(f"epochs[{i}].epoch is a {type(number).__name__}, not an integer")
        for key in ("test_accuracy", "test_loss"):
            v = rec.get(key)
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool)):
                raise bad(f"epochs[{i}].{key} is a {type(v).__name__}, not a number")
    return run


def _recorded(run: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {int(r["epoch"]): r for r in run.get("epochs", [])}


def _brief_error(e: BaseException, limit: int = 400) -> str:
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Progress:
    def __init__(self, total: int, show: bool) -> None:
        self.bar = None
        if show and total > 0:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="evaluate", unit="model", leave=False, file=sys.stderr)

    def describe(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description_str(text)

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@with_storage_options("store")
def evaluate(
    store: str | os.PathLike[str],
    name: str,
    *,
    workflow: str | None = None,
    run_dir: str | os.PathLike[str] | None = None,
    sweep_modes: Iterable[int] | None = SWEEP_MODES,
    sweep_seeds: Iterable[int] = SWEEP_SEEDS,
    sweep_samples: Iterable[int] | None = None,
    sweep_epochs: str = SWEEP_EPOCHS,
    keep_sweep: bool = False,
    storage_options: StorageOptions | None = None,
    runtime: RuntimeOptions | None = None,
    run: Runner | None = None,
    evaluator: EvalFn | None = None,
    figures: bool = True,
) -> EvaluationResult:
    """Evaluate the GD and CMD weights of study ``name`` on the workflow's test set.

    Parameters
    ----------
    store, name
        The store and a complete study (``cmd-pipeline fit``).
    workflow
        An installed workflow's name (``digits``, ``minilm``: entry point group
        ``cmd_pipeline.workflows``) or ``module:function`` (a function of the run folder
        returning ``state_dict -> (loss, accuracy)``); default: the ``evaluator`` recorded in
        run.json, or its ``workflow`` name.
    run_dir
        The training run's folder (with run.json); default: found beside the ingested
        checkpoints.
    sweep_modes
        The numbers of modes M of the sweep (None or empty: no sweep).
    sweep_seeds, sweep_samples
        Sampling seeds and sample counts K of the sweep (K default: the study's K); every
        (M, K, seed) is fitted on the study's window.
    sweep_epochs
        ``last`` (the window's last epoch), ``all``, or comma-separated epoch numbers at
        which each sweep fit is evaluated.
    keep_sweep
        Keep the sweep studies (``<name>~m<M>-k<K>-s<seed>``) instead of deleting them.
    evaluator
        Use this function instead of resolving a workflow (API only).
    figures
        Also draw the evaluation figures into ``report/figures/`` (about 0.5 s per figure;
        ``report`` draws them anew from the evaluation either way). False: only
        ``evaluation.json`` and the study's attributes (API only).
    storage_options
        fsspec options (credentials, ``endpoint_url``...) for a store on object storage;
        see :func:`pipeline.fit`.
    """
    t0 = time.perf_counter()
    st = TrajectoryStore.open(store, writable=True)
    meta = st.require_meta()
    ag, attrs = complete_study(st, name)
    attrs = check_study_attrs(attrs, name)
    config = attrs["config"]
    summary = attrs["summary"]
    window = [int(e) for e in np.asarray(ag.array("epochs")[...])]

    if len(summary["epochs"]) != len(window):
        raise StoreError(
            f"analysis {name!r}: its summary has {len(summary['epochs'])} epoch(s), its window "
            f"{len(window)}"
        )

    rdir: Path | None = Path(run_dir) if run_dir is not None else find_run_dir(meta)
    run_info: dict[str, Any] = {}
    if evaluator is None:
        if rdir is None:
            raise InputError(
                "no run.json beside the ingested checkpoints: give the training run's folder "
                "with run_dir=DIR"
            )
        run_info = read_run_json(rdir)
        wf = workflow or run_info.get("workflow") or run_info.get("evaluator")
        if wf is None:
            raise InputError(
                f"{rdir / 'run.json'} names no workflow: pass workflow=NAME "
                f"({_known_list()} or module:function)"
            )
        # the evaluator recorded by the run, unless another workflow is asked for
        spec = run_info.get("evaluator", wf) if workflow is None else wf
        factory = resolve_workflow(spec)
        if ":" not in wf and "config" not in run_info:
            raise InputError(
                f"lacks 'config', the training configuration the {wf} workflow rebuilds its "
                f"model and test set from: record the run with python -m {factory.__module__}, or "
                "add the configuration it was trained with",
                path=str(rdir / "run.json"),
            )
        try:
            evaluator = factory(rdir)
        except PipelineError:
            raise
        except Exception as err:  # the workflow's own code: its error, with what it read
            raise InputError(
                f"workflow {wf!r} cannot be set up from {rdir / 'run.json'}: {_brief_error(err)}"
            ) from err
    else:
        wf = workflow or "custom"
        if rdir is not None and (rdir / "run.json").is_file():
            run_info = read_run_json(rdir)
    recorded = _recorded(run_info)

    modes_list = sorted({int(m) for m in (sweep_modes or ())})
    if any(m < 1 for m in modes_list):
        raise InputError("sweep modes must be at least 1")
    seeds = sorted({int(s) for s in sweep_seeds})
    samples = sorted({int(k) for k in (sweep_samples or [config["samples"]])})
    if modes_list and (not seeds or not samples or min(samples) < 2):
        raise InputError("the sweep needs at least one seed and sample counts of at least 2")
    sweep_at = _sweep_epochs(sweep_epochs, window)
    combos = [(m, k, s) for m in modes_list for k in samples for s in seeds]
    opts = runtime or RuntimeOptions()
    progress = _Progress(2 * len(window) + len(combos) * len(sweep_at), opts.progress)

    def score(epoch: int, analysis: str | None) -> tuple[float, float]:
        sd = state_dict(st, epoch, analysis=analysis)
        try:
            loss, acc = evaluator(sd)
            out = float(loss), float(acc)
        except PipelineError:
            raise
        except Exception as err:  # the workflow's model does not take these weights, ...
            which = "GD" if analysis is None else f"CMD ({analysis})"
            hint = "" if rdir is None else f"; is {rdir} the run that was ingested?"
            raise InputError(
                f"workflow {wf!r} cannot score the {which} weights of epoch {epoch}: "
                f"{_brief_error(err)}{hint}"
            ) from err
        progress.step()
        return out

    try:
        rows = []
        for k, e in enumerate(window):
            gd_loss, gd_acc = score(e, None)
            cmd_loss, cmd_acc = score(e, name)
            rec = recorded.get(e, {})
            rows.append(
                {
                    "epoch": e,
                    "gd_loss": gd_loss,
                    "gd_accuracy": gd_acc,
                    "cmd_loss": cmd_loss,
                    "cmd_accuracy": cmd_acc,
                    "recorded_accuracy": rec.get("test_accuracy"),
                    "mse": summary["epochs"][k].get("mse"),
                    "dynamics_error": summary["epochs"][k].get("dynamics_error"),
                    "relative_error": summary["epochs"][k]["relative_error"],
                }
            )
        sweep = None
        if combos:
            with using(run, opts) as r, r.quiet():
                runs = _sweep(st, name, config, combos, sweep_at, score, keep_sweep, r, progress)
            sweep = {
                "epochs": sweep_at,
                "modes": modes_list,
                "seeds": seeds,
                "samples": samples,
                "runs": runs,
                "by_modes": _by_modes(runs, modes_list),
            }
    finally:
        progress.close()

    last = rows[-1]
    gd_best = max(rows, key=lambda r: (r["gd_accuracy"], -r["epoch"]))
    cmd_best = max(rows, key=lambda r: (r["cmd_accuracy"], -r["epoch"]))
    mismatch = [
        r["epoch"]
        for r in rows
        if r["recorded_accuracy"] is not None and r["recorded_accuracy"] != r["gd_accuracy"]
    ]
    evaluation: dict[str, Any] = {
        "workflow": wf,
        "run_dir": None if rdir is None else str(rdir),
        "evaluated_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - t0, 3),
        "study": {
            "n_modes": int(attrs["n_modes"]),
            "samples": int(config["samples"]),
            "seed": int(config["seed"]),
            "modes_requested": config.get("modes"),
            "threshold": config.get("threshold"),
        },
        "mse": summary.get("mse"),
        "dynamics_error": summary.get("dynamics_error"),
        "relative_error": summary["relative_error"],
        "epochs": rows,
        "final": {
            "epoch": last["epoch"],
            "gd_accuracy": last["gd_accuracy"],
            "cmd_accuracy": last["cmd_accuracy"],
            "gd_loss": last["gd_loss"],
            "cmd_loss": last["cmd_loss"],
        },
        "best": {
            "gd_accuracy": gd_best["gd_accuracy"],
            "gd_epoch": gd_best["epoch"],
            "cmd_accuracy": cmd_best["cmd_accuracy"],
            "cmd_epoch": cmd_best["epoch"],
        },
        "recorded_mismatch_epochs": mismatch,
        "sweep": sweep,
    }
    ag.set_attrs(evaluation=evaluation)
    files = {"evaluation.json": ag.write_file("evaluation.json", _json_bytes(evaluation))}
    if figures:
        from pipeline.report.figures import evaluation_figures

        for fname, png in evaluation_figures(evaluation).items():
            files[fname] = ag.write_file(f"figures/{fname}", png)
    return EvaluationResult(st.url, name, evaluation, files)


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode()


def _sweep_epochs(spec: str, window: list[int]) -> list[int]:
    if spec == "last":
        return [window[-1]]
    if spec == "all":
        return list(window)
    try:
        want = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"sweep_epochs={spec!r}: expected 'last', 'all' or epoch numbers") from None
    bad = [e for e in want if e not in window]
    if bad or not want:
        raise InputError(
            f"sweep_epochs={spec!r}: epoch(s) {bad} are not in the study's window "
            f"({window[0]}..{window[-1]})"
        )
    return want


def _sweep(
    st: TrajectoryStore,
    name: str,
    config: dict[str, Any],
    combos: list[tuple[int, int, int]],
    at: list[int],
    score: Callable[[int, str | None], tuple[float, float]],
    keep: bool,
    run: Runner,
    progress: _Progress,
) -> list[dict[str, Any]]:
    existing = set(st.analyses())
    window = None if config.get("window") in (None, ":") else config["window"]
    runs = []
    for m, k, s in combos:
        if config.get("modes") == m and config["samples"] == k and config["seed"] == s:
            sub = name  # the study itself is one of the sweep's fits
            attrs = check_study_attrs(AnalysisGroup(st.url, name).attrs(), name)
            summ, n_modes = attrs["summary"], int(attrs["n_modes"])
        else:
            sub = sweep_name(name, m, k, s)
        created = sub != name and sub not in existing
        try:
            progress.describe(f"sweep {sub}")
            if sub != name:
                # a sweep point that gives fewer modes than asked is recorded (modes found,
                # its notes), not warned about once per point
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", PipelineWarning)
                    res = fit(
                        st.url, sub, modes=m, samples=k, seed=s, epochs=window, force=True, run=run
                    )
                summ, n_modes = res.summary, res.n_modes
            mse_at = {int(x["epoch"]): x.get("mse") for x in summ["epochs"]}
            results = []
            for e in at:
                loss, acc = score(e, sub)
                results.append(
                    {"epoch": e, "cmd_loss": loss, "cmd_accuracy": acc, "mse": mse_at.get(e)}
                )
        finally:
            if created and not keep:
                AnalysisGroup(st.url, sub).delete()
        runs.append(
            {
                "modes_requested": m,
                "n_modes": n_modes,
                "samples": k,
                "seed": s,
                "mse": summ.get("mse"),
                "dynamics_error": summ.get("dynamics_error"),
                "relative_error": summ["relative_error"],
                "notes": list(summ.get("notes", [])),
                "results": results,
            }
        )
    return runs


def _by_modes(runs: list[dict[str, Any]], modes: list[int]) -> list[dict[str, Any]]:
    out = []
    for m in modes:
        rs = [r for r in runs if r["modes_requested"] == m]
        # the accuracy and the weight MSE at the last sweep epoch of each run; ``mse_*``: the
        # weight MSE over the whole window
        acc_mean, acc_std = _mean_std([r["results"][-1]["cmd_accuracy"] for r in rs])
        at_mean, at_std = _mean_std([r["results"][-1].get("mse") for r in rs])
        mse_mean, mse_std = _mean_std([r["mse"] for r in rs])
        out.append(
            {
                "modes_requested": m,
                "n_modes_mean": float(np.mean([r["n_modes"] for r in rs])),
                "epoch": rs[0]["results"][-1]["epoch"],
                "accuracy_mean": acc_mean,
                "accuracy_std": acc_std,
                "mse_epoch_mean": at_mean,
                "mse_epoch_std": at_std,
                "mse_mean": mse_mean,
                "mse_std": mse_std,
                "dynamics_error_mean": _mean_std([r.get("dynamics_error") for r in rs])[0],
                "relative_error_mean": _mean_std([r["relative_error"] for r in rs])[0],
                "runs": len(rs),
            }
        )
    return out
