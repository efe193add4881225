"""How a reproduction is shown: one Markdown report, one JSON file, the papers' figures.

Owns :func:`markdown` (the table of claims with their numbers and verdicts, the rule, then
each claim's tests with per-seed values), :func:`results_json` and :func:`figures` (one PNG per
paper figure that the measurements match; matplotlib is imported only here, without pyplot).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from workflows.reproduce.claims import ClaimResult, ClaimTest
from workflows.reproduce.settings import Settings
from workflows.reproduce.stats import CONFIDENCE, MARGIN, NOT_RUN, RULE

__all__ = ["figures", "markdown", "results_json"]


def _f(v: float | None, fmt: str = "+.4f") -> str:
    return "–" if v is None or not math.isfinite(v) else f"{v:{fmt}}"


def _interval(t: ClaimTest) -> str:
    s = t.summary
    return f"{_f(s.mean)} [{_f(s.lo)}, {_f(s.hi)}]"


def _threshold(t: ClaimTest) -> str:
    return f"±{-t.threshold:g}" if t.band else f"{t.threshold:+g}"


def _cell(text: str) -> str:
    """Text for a Markdown table cell (a literal ``|`` would end the cell)."""
    return text.replace("|", "\\|")


def _p(v: float | None) -> str:
    return "–" if v is None else f"{v:.3g}"


def markdown(
    claims: Sequence[ClaimResult],
    settings: Settings,
    *,
    command: str,
    seconds: float | None,
    figure_files: dict[int, list[str]],
) -> str:
    """The whole report as Markdown."""
    s = settings
    lines = [
        "# The CMD papers' claims, tested on MNIST-1D",
        "",
        f"Command: `{command}`"
        + (
            ""
            if seconds is None
            else f" ({seconds / 60:.1f} min for this invocation; parts found in OUT/cache "
            "are reused and take no time)."
        ),
        "",
        f"{len(s.seeds)} training seeds {list(s.seeds)}; {len(s.sampling_seeds)} sampling "
        f"seeds {list(s.sampling_seeds)} for claims 1-5; {s.epochs} epochs of {s.optimizer} "
        f"(lr {s.lr}) on {s.n_train}/{s.n_test} MNIST-1D sequences; CMD with M = {s.modes}, "
        f"K = {s.samples}. Each test's value is per training seed; the table gives its mean "
        f"and {CONFIDENCE:.0%} t-interval over the seeds, against its threshold θ "
        f"(MARGIN = {MARGIN}).",
        "",
        "| # | claim (paper) | tests: mean [95% interval] vs θ → verdict | verdict |",
        "|---|---|---|---|",
    ]
    for c in claims:
        if c.verdict == NOT_RUN:
            cell = f"not run: {c.reason}"
        else:
            cell = "<br>".join(
                f"{_cell(t.label)}: {_interval(t)} vs {_threshold(t)} → {t.verdict}"
                for t in c.tests
                if not t.supplementary
            )
        lines.append(
            f"| {c.id} | {_cell(c.title)} ({c.source}) | {_cell(cell) if c.reason else cell} "
            f"| **{c.verdict}** |"
        )
    lines += ["", "## The rule", "", RULE, ""]
    for c in claims:
        lines += [f"## Claim {c.id}: {c.title}", "", f"*{c.source}.* {c.measured}.", ""]
        if c.verdict == NOT_RUN:
            lines += [f"**Not run**: {c.reason}.", ""]
            continue
        lines += [
            "| test | arms (mean over seeds) | d: mean [95% interval] | θ | t-test p | "
            "Wilcoxon p | verdict |",
            "|---|---|---|---|---|---|---|",
        ]
        for t in c.tests:
            arms = ", ".join(f"{k} {np.mean(v):.4f}" for k, v in t.arms.items())
            label = _cell(t.label) + (" *(supplementary)*" if t.supplementary else "")
            lines.append(
                f"| {label} | {arms} | {_interval(t)} | {_threshold(t)} | {_p(t.summary.t_p)} "
                f"| {_p(t.summary.wilcoxon_p)} | {t.verdict} |"
            )
        lines += ["", "Per-seed values d_s (seeds " + ", ".join(map(str, c.seeds)) + "):", ""]
        for t in c.tests:
            lines.append(f"- {t.label}: " + ", ".join(f"{v:+.4f}" for v in t.values))
        if c.numbers:
            lines += [
                "",
                "Other numbers: "
                + "; ".join(f"{k} = {_num(v)}" for k, v in c.numbers.items())
                + ".",
            ]
        lines += ["", f"**Verdict: {c.verdict}.**", ""]
        for f in figure_files.get(c.id, []):
            lines += [f"![claim {c.id}](figures/{f})", ""]
    return "\n".join(lines) + "\n"


def _num(v: Any) -> str:
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_num(x)}" for k, x in v.items()) + "}"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def results_json(
    claims: Sequence[ClaimResult],
    settings: Settings,
    *,
    command: str,
    seconds: float | None,
    timings: dict[str, float],
) -> dict[str, Any]:
    """Everything the report shows, as one JSON-ready object."""
    return {
        "command": command,
        "settings": settings.to_dict(),
        "margin": MARGIN,
        "confidence": CONFIDENCE,
        "rule": RULE,
        "seconds": seconds,
        "timings": timings,
        "claims": [c.to_dict() for c in claims],
    }


# --------------------------------------------------------------------------- figures
def _mean_curve(curves: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a = np.asarray(curves, dtype=np.float64)
    return a.mean(axis=0), a.min(axis=0), a.max(axis=0)


def _fig_accuracy(m: dict[str, Any], s: Settings, ax: Any) -> None:
    bases = [m["posthoc"]["cnn"]["base"][str(q)] for q in s.seeds]
    e = bases[0]["epochs"]
    for key, name, colour in (("gd", "GD", "tab:blue"), ("cmd", "CMD", "tab:orange")):
        mean, lo, hi = _mean_curve([b[key] for b in bases])
        ax.plot(e, mean, color=colour, label=f"{name} (mean over seeds)")
        ax.fill_between(e, lo, hi, color=colour, alpha=0.2)
    ax.set(xlabel="epoch", ylabel="test accuracy", title="GD vs CMD (002 figs 5a, 7)")
    ax.legend(loc="lower right")


def _fig_modes(m: dict[str, Any], s: Settings, ax: Any) -> None:
    ms = list(s.sweep_modes)
    acc = np.array(
        [
            [
                np.mean(
                    [
                        m["posthoc"]["cnn"]["modes"][str(q)]["by_modes"][str(mm)][str(k)]
                        for k in s.sampling_seeds
                    ]
                )
                for mm in ms
            ]
            for q in s.seeds
        ]
    )
    gd = np.mean([m["posthoc"]["cnn"]["base"][str(q)]["gd"][-1] for q in s.seeds])
    ax.errorbar(
        ms,
        acc.mean(axis=0),
        yerr=acc.std(axis=0, ddof=1),
        marker="o",
        capsize=3,
        label="CMD (mean ± sd over seeds)",
    )
    ax.axhline(gd, color="grey", ls="--", label="GD")
    ax.set_xscale("log")
    ax.set(
        xlabel="number of modes M",
        ylabel="test accuracy, last epoch",
        title="accuracy vs M (002 fig 6a)",
    )
    ax.legend(loc="lower right")


def _fig_subsets(m: dict[str, Any], s: Settings, ax: Any) -> None:
    b = m["posthoc"]["cnn"]["base"][str(s.seeds[0])]
    mean, lo, hi = _mean_curve([b["cmd_by_seed"][str(k)] for k in s.sampling_seeds])
    ax.plot(b["epochs"], b["gd"], color="tab:blue", label="GD")
    ax.plot(b["epochs"], mean, color="tab:orange", label="CMD, mean over sampled subsets")
    ax.fill_between(b["epochs"], lo, hi, color="tab:orange", alpha=0.3, label="min..max")
    ax.set(
        xlabel="epoch",
        ylabel="test accuracy",
        title=f"{len(s.sampling_seeds)} sampled subsets, seed {s.seeds[0]} (002 fig 10)",
    )
    ax.legend(loc="lower right")


def _fig_samples(m: dict[str, Any], s: Settings, ax: Any) -> None:
    ks = list(s.sweep_samples)
    per = np.array(
        [
            [
                [
                    m["posthoc"]["cnn"]["samples"][str(q)]["by_samples"][str(k)][str(x)]
                    for x in s.sampling_seeds
                ]
                for k in ks
            ]
            for q in s.seeds
        ]
    )
    mean = per.mean(axis=(0, 2))
    ax.errorbar(
        ks,
        mean,
        yerr=[mean - per.min(axis=(0, 2)), per.max(axis=(0, 2)) - mean],
        marker="o",
        capsize=3,
        label="CMD: mean, min..max over all runs",
    )
    ax.set_xscale("log")
    ax.set(
        xlabel="K (sampled parameters)",
        ylabel="test accuracy, last epoch",
        title="accuracy vs K (002 fig 11)",
    )
    ax.legend(loc="lower right")


def _fig_history(m: dict[str, Any], s: Settings, ax: Any) -> None:
    rows = []
    for q in s.seeds:
        b = m["posthoc"]["cnn"]["base"][str(q)]
        row = [np.mean([b["cmd_by_seed"][str(k)][-1] for k in s.sampling_seeds])]
        h = m["posthoc"]["cnn"]["history"][str(q)]["by_history"]
        row += [
            np.mean([h[str(f)]["acc"][str(k)] for k in s.sampling_seeds]) for f in s.history[1:]
        ]
        rows.append(row)
    a = np.asarray(rows)
    x = [100 * f for f in s.history]
    ax.errorbar(
        x,
        a.mean(axis=0),
        yerr=a.std(axis=0, ddof=1),
        marker="o",
        capsize=3,
        label="CMD (mean ± sd over seeds)",
    )
    ax.invert_xaxis()
    ax.set(
        xlabel="% of the epochs kept (the last ones)",
        ylabel="test accuracy, last epoch",
        title="shorter history (002 fig 13)",
    )
    ax.legend(loc="lower left")


def _fig_dmd(m: dict[str, Any], s: Settings, axes: Any) -> None:
    for ax, setting, title in zip(
        axes,
        ("cnn_augment", "resnet", "cnn"),
        (
            "CNN + augmentation (002 fig 5b)",
            "ResNet (002 figs 5c, 22)",
            "CNN, no augmentation (control)",
        ),
        strict=True,
    ):
        bases = [m["posthoc"][setting]["base"][str(q)] for q in s.seeds]
        e = bases[0]["epochs"]
        ax.plot(e, _mean_curve([b["gd"] for b in bases])[0], color="black", label="GD")
        ax.plot(e, _mean_curve([b["cmd"] for b in bases])[0], color="tab:orange", label="CMD")
        for r, colour in zip(s.dmd_ranks, ("tab:red", "tab:green", "tab:purple"), strict=False):
            d = [m["posthoc"][setting]["dmd"][str(q)]["full"][str(r)]["acc"] for q in s.seeds]
            ax.plot(e, _mean_curve(d)[0], color=colour, label=f"DMD r={r}")
            n = [m["posthoc"][setting]["dmd"][str(q)]["node"][str(r)]["acc"] for q in s.seeds]
            ax.plot(e, _mean_curve(n)[0], color=colour, ls=":", label=f"node DMD r={r}")
        ax.set(xlabel="epoch", ylabel="test accuracy (mean over seeds)", title=title, ylim=(0, 1))
    axes[0].legend(loc="lower right", fontsize="small")


def _fig_layers(m: dict[str, Any], s: Settings, ax: Any) -> None:
    b = m["posthoc"]["cnn"]["base"][str(s.seeds[0])]
    c = np.asarray(b["layer_mode_counts"], dtype=np.float64)[:, :-1]
    frac = c / np.maximum(c.sum(axis=1, keepdims=True), 1)
    bottom = np.zeros(len(b["layers"]))
    for mode in range(c.shape[1]):
        ax.bar(range(len(b["layers"])), frac[:, mode], bottom=bottom, label=f"mode {mode}")
        bottom += frac[:, mode]
    ax.set_xticks(range(len(b["layers"])), b["layers"], rotation=45, ha="right")
    ax.set(
        ylabel="share of the tensor's parameters",
        title=f"modes through the network, seed {s.seeds[0]} (002 fig 4b)",
    )
    ax.legend(loc="upper right", fontsize="x-small", ncols=2)


def _fig_online(m: dict[str, Any], s: Settings, axes: Any) -> None:
    from workflows.reproduce.online import METHODS

    names = {
        "baseline": f"{s.optimizer} (baseline)",
        "online_cmd": "Online CMD",
        "ema": "EMA",
        "swa": "SWA",
        "embedded_cmd": "Embedded CMD",
    }
    runs = [m["online"][str(q)] for q in s.seeds]
    epochs = np.arange(1, s.epochs + 1)
    for method in METHODS:
        axes[0].plot(
            epochs, _mean_curve([r["curves"][method] for r in runs])[0], label=names[method]
        )
    axes[0].set(
        xlabel="epoch",
        ylabel="test accuracy (mean over seeds)",
        title="Online / Embedded CMD vs EMA, SWA (001)",
    )
    axes[0].legend(loc="lower right", fontsize="small")
    axes[1].plot(epochs, _mean_curve([r["embedded"] for r in runs])[0], marker=".")
    axes[1].set(
        xlabel="epoch",
        ylabel="share of parameters embedded",
        title="Embedded CMD (001)",
        ylim=(0, 1),
    )


def figures(m: dict[str, Any], s: Settings, out: Path) -> dict[int, list[str]]:
    """Write every figure the measurements allow into ``out``; claim id -> file names."""
    from matplotlib.figure import Figure

    out.mkdir(parents=True, exist_ok=True)
    made: dict[int, list[str]] = {}

    def one(
        claim: int,
        name: str,
        draw: Callable[[Any], None],
        shape: tuple[int, int] = (1, 1),
        size: tuple[float, float] = (6.5, 4.5),
    ) -> None:
        fig = Figure(figsize=size, layout="constrained")
        axes = fig.subplots(*shape)
        try:
            draw(axes)
        except (KeyError, IndexError, ValueError):  # a part that was not run
            return
        fig.savefig(out / name, dpi=110)
        made.setdefault(claim, []).append(name)

    one(1, "claim1_accuracy.png", lambda ax: _fig_accuracy(m, s, ax))
    one(2, "claim2_modes.png", lambda ax: _fig_modes(m, s, ax))
    one(3, "claim3_subsets.png", lambda ax: _fig_subsets(m, s, ax))
    one(3, "claim3_samples.png", lambda ax: _fig_samples(m, s, ax))
    one(4, "claim4_history.png", lambda ax: _fig_history(m, s, ax))
    one(5, "claim5_dmd.png", lambda axes: _fig_dmd(m, s, axes), (1, 3), (17, 4.5))
    one(6, "claim6_layers.png", lambda ax: _fig_layers(m, s, ax))
    one(7, "claim7_8_online.png", lambda axes: _fig_online(m, s, axes), (1, 2), (12, 4.5))
    if "claim7_8_online.png" in made.get(7, []):
        made[8] = ["claim7_8_online.png"]
    if m.get("federated"):
        from workflows.federated import plot
        from workflows.reproduce.federated import fed_config

        runs = [m["federated"][str(q)] for q in s.seeds if str(q) in m["federated"]]
        if len(runs) == len(s.seeds):
            plot(
                {"runs": runs, "config": {"warmup": fed_config(s.fed).warmup}},
                out / "claim9_federated.png",
            )
            made[9] = ["claim9_federated.png"]
    return made
