"""How a federated experiment's results are shown: Markdown tables and one figure.

Owns :func:`format_table` and :func:`plot` (matplotlib is imported only when plotting).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from workflows.federated.config import METHODS

__all__ = ["format_table", "plot"]


def _pm(d: dict[str, float], scale: float = 1.0, fmt: str = ".4f") -> str:
    return f"{d['mean'] * scale:{fmt}} ± {d['std'] * scale:{fmt}}"


def format_table(result: dict[str, Any]) -> str:
    """The Markdown summary table and a per-round table (means over seeds)."""
    s = result["summary"]
    cfg = result["config"]
    split = "IID" if cfg["alpha"] is None else f"non-IID Dirichlet(alpha={cfg['alpha']})"
    seeds = result["seeds"]
    lines = [
        f"# Federated digits: FedAvg vs FedAvg + Embedded CMD ({cfg['model']}, "
        f"{result['n_params']} parameters)",
        "",
        f"{cfg['clients']} clients, {split}, {cfg['rounds']} rounds x {cfg['local_epochs']} local "
        f"epoch(s); CMD warm-up {cfg['warmup']} rounds, embed every {cfg['embed_every']} rounds, "
        f"{cfg['embed_fraction']:.0%} per check, {cfg['modes']} modes; a, b sent as "
        f"{cfg['ab_dtype']}; seeds {seeds} (mean ± std, ddof=1).",
        "",
        "| method | final acc | best acc | final loss | total MB | bytes vs FedAvg | embedded at end |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, name in (("fedavg", "FedAvg"), ("cmd", "FedAvg + Embedded CMD")):
        ratio = "1" if m == "fedavg" else _pm(s["bytes_ratio_cmd_over_fedavg"])
        lines.append(
            f"| {name} | {_pm(s[m]['final_acc'])} | {_pm(s[m]['best_acc'])} | "
            f"{_pm(s[m]['final_loss'])} | {_pm(s[m]['total_bytes'], 1e-6, '.3f')} | {ratio} | "
            f"{_pm(s[m]['final_embedded_fraction'], 1.0, '.3f')} |"
        )
    lines += [
        "",
        "Per round (means over seeds; MB = 1e6 bytes, both directions, all clients):",
        "",
        "| round | FedAvg acc | CMD acc | FedAvg MB | CMD MB | FedAvg cum MB | CMD cum MB | embedded |",
        "|---|---|---|---|---|---|---|---|",
    ]
    runs = result["runs"]
    for i in range(cfg["rounds"]):

        def mean(m: str, key: str, i: int = i) -> float:
            return float(np.mean([r[m]["rounds"][i][key] for r in runs]))

        lines.append(
            f"| {i + 1} | {mean('fedavg', 'test_acc'):.4f} | {mean('cmd', 'test_acc'):.4f} | "
            f"{mean('fedavg', 'bytes') * 1e-6:.4f} | {mean('cmd', 'bytes') * 1e-6:.4f} | "
            f"{mean('fedavg', 'cum_bytes') * 1e-6:.3f} | {mean('cmd', 'cum_bytes') * 1e-6:.3f} | "
            f"{mean('cmd', 'embedded_fraction'):.3f} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """Accuracy against cumulative bytes, bytes per round, embedded fraction per round."""
    from matplotlib.figure import Figure

    runs = result["runs"]
    fig = Figure(figsize=(15, 4.5), layout="constrained")
    ax_acc, ax_bytes, ax_emb = fig.subplots(1, 3)
    colours = {"fedavg": "tab:blue", "cmd": "tab:orange"}
    labels = {"fedavg": "FedAvg", "cmd": "FedAvg + Embedded CMD"}
    for m in METHODS:
        for r in runs:
            x = [0.0] + [rec["cum_bytes"] * 1e-6 for rec in r[m]["rounds"]]
            y = [r[m]["initial"]["test_acc"]] + [rec["test_acc"] for rec in r[m]["rounds"]]
            ax_acc.plot(x, y, color=colours[m], alpha=0.25, lw=0.8)
        x = np.mean(
            [[0.0] + [rec["cum_bytes"] * 1e-6 for rec in r[m]["rounds"]] for r in runs], axis=0
        )
        y = np.mean(
            [
                [r[m]["initial"]["test_acc"]] + [rec["test_acc"] for rec in r[m]["rounds"]]
                for r in runs
            ],
            axis=0,
        )
        ax_acc.plot(x, y, color=colours[m], lw=2, label=labels[m])
        rounds = np.arange(1, len(runs[0][m]["rounds"]) + 1)
        per = np.mean([[rec["bytes"] * 1e-6 for rec in r[m]["rounds"]] for r in runs], axis=0)
        ax_bytes.plot(rounds, per, color=colours[m], lw=2, label=labels[m])
    rounds = np.arange(1, len(runs[0]["cmd"]["rounds"]) + 1)
    emb = np.array([[rec["embedded_fraction"] for rec in r["cmd"]["rounds"]] for r in runs])
    ax_emb.plot(rounds, emb.mean(axis=0), color=colours["cmd"], lw=2, marker=".")
    ax_acc.set(
        xlabel="cumulative communication (MB)",
        ylabel="test accuracy (global model)",
        title="accuracy vs bytes (thin: seeds)",
    )
    lo = min(min(rec["test_acc"] for rec in r[m]["rounds"]) for r in runs for m in METHODS)
    ax_acc.set_ylim(max(0.0, lo - 0.02), 1.0)
    ax_acc.legend(loc="lower right")
    ax_bytes.set(
        xlabel="round", ylabel="MB per round (all clients)", title="communication per round"
    )
    ax_bytes.set_ylim(bottom=0)
    ax_bytes.legend(loc="lower left")
    ax_emb.set(
        xlabel="round",
        ylabel="fraction of parameters embedded",
        title="embedded fraction",
        ylim=(0, 1),
    )
    ax_emb.axvline(result["config"]["warmup"], color="grey", ls=":", lw=1)
    fig.savefig(path, dpi=120)
