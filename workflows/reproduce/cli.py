"""``python -m workflows.reproduce``: run the claims, write the report.

Owns the command line, the order of the run (measure, judge, write) and the files written to
``OUT``: ``report.md`` (the table of claims and everything behind it), ``results.json`` (the
same as data), ``measurements.json`` (the raw measurements: ``--render`` rebuilds the report
from it), ``figures/*.png``, and the recorded runs, stores and cache under ``runs/`` and
``cache/`` (reused by a later run with the same settings).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from workflows.reproduce.claims import CLAIMS, ClaimResult, evaluate_claims
from workflows.reproduce.settings import FULL, QUICK, Settings

__all__ = ["main", "reproduce"]


def _claims_arg(text: str) -> set[int]:
    try:
        ids = {int(x) for x in text.split(",") if x.strip()}
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated claim numbers, got {text!r}") from None
    known = {c.id for c in CLAIMS}
    if not ids or not ids <= known:
        raise argparse.ArgumentTypeError(f"claims must be among {sorted(known)}, got {text!r}")
    return ids


def reproduce(
    settings: Settings,
    out: Path,
    *,
    claims: set[int] | None = None,
    runtime: Any = None,
    command: str = "python -m workflows.reproduce",
    log: Any = print,
) -> tuple[list[ClaimResult], dict[str, Any]]:
    """Measure, judge and write the report; returns the claims and ``results.json``'s content."""
    from pipeline.runtime import RuntimeOptions
    from workflows.reproduce.runner import measure

    selected = claims or {c.id for c in CLAIMS}
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    m = measure(settings, out, selected, runtime or RuntimeOptions(progress=False), log)
    seconds = time.perf_counter() - t0
    (out / "measurements.json").write_text(
        json.dumps(
            {
                "settings": settings.to_dict(),
                "claims": sorted(selected),
                "command": command,
                "seconds": seconds,
                "measurements": m,
            }
        )
        + "\n",
        encoding="utf-8",
    )
    return _write(m, settings, out, selected, command, seconds)


def _write(
    m: dict[str, Any],
    settings: Settings,
    out: Path,
    selected: set[int],
    command: str,
    seconds: float | None,
) -> tuple[list[ClaimResult], dict[str, Any]]:
    from workflows.reproduce.report import figures, markdown, results_json

    results = evaluate_claims(m, settings, selected)
    made = figures(m, settings, out / "figures")
    text = markdown(results, settings, command=command, seconds=seconds, figure_files=made)
    (out / "report.md").write_text(text, encoding="utf-8")
    data = results_json(
        results, settings, command=command, seconds=seconds, timings=m.get("timings", {})
    )
    data["figures"] = {str(k): v for k, v in made.items()}
    (out / "results.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return results, data


def render(out: Path) -> tuple[list[ClaimResult], dict[str, Any]]:
    """Rebuild the report from ``OUT/measurements.json`` (nothing is computed)."""
    saved = json.loads((out / "measurements.json").read_text(encoding="utf-8"))
    s = saved["settings"]
    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in s.items()}
    settings = Settings(**fields)
    return _write(
        saved["measurements"],
        settings,
        out,
        set(saved["claims"]),
        saved["command"],
        saved.get("seconds"),
    )


def _summary_table(results: list[ClaimResult]) -> str:
    lines = ["| # | claim | verdict |", "|---|---|---|"]
    for c in results:
        extra = f" ({c.reason})" if c.reason else ""
        lines.append(f"| {c.id} | {c.title} | {c.verdict}{extra} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; see ``python -m workflows.reproduce --help``."""
    ap = argparse.ArgumentParser(
        prog="python -m workflows.reproduce",
        description="Test the CMD papers' claims on MNIST-1D over training seeds; write "
        "OUT/report.md, OUT/results.json and OUT/figures/.",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="tiny settings (seconds; the numbers mean nothing): the test suite's run",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder [runs/reproduce, or runs/reproduce_quick with --quick]",
    )
    ap.add_argument(
        "--claims",
        type=_claims_arg,
        default=None,
        help="comma-separated claims to run [all]; the others are reported 'not run'",
    )
    ap.add_argument("--seeds", default=None, help="comma-separated training seeds [5 seeds]")
    ap.add_argument("--workers", type=int, default=None, help="LocalCluster workers [one per core]")
    ap.add_argument(
        "--threads",
        action="store_true",
        help="run the pipeline on local threads instead of a LocalCluster",
    )
    ap.add_argument(
        "--render", action="store_true", help="only rebuild the report from OUT/measurements.json"
    )
    a = ap.parse_args(argv)
    out = a.out or Path("runs") / ("reproduce_quick" if a.quick else "reproduce")
    if a.render:
        results, _ = render(out)
        print(_summary_table(results))
        return 0
    settings = QUICK if a.quick else FULL
    if a.seeds:
        try:
            settings = settings.with_(seeds=tuple(int(x) for x in a.seeds.split(",")))
        except ValueError as e:
            ap.error(f"--seeds: {e}")
    from pipeline.runtime import RuntimeOptions

    rt = RuntimeOptions(mode="threads" if a.threads else "local", workers=a.workers, progress=False)
    command = "python -m workflows.reproduce " + shlex.join(
        list(argv) if argv is not None else sys.argv[1:]
    )
    results, data = reproduce(settings, out, claims=a.claims, runtime=rt, command=command.strip())
    print()
    print(_summary_table(results))
    print(f"\n({data['seconds']:.0f} s; report in {out / 'report.md'})")
    return 0
