"""The study's figures as PNG bytes (matplotlib, Agg backend; nothing is shown on screen).

Each function takes small in-memory data (the K samples, the M references, per-layer counts,
the evaluation dict) and returns the encoded PNG; nothing here touches the store.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "StudyData",
    "accuracy_figure",
    "correlation_figure",
    "distance_figure",
    "eigenvalues_figure",
    "evaluation_figures",
    "layers_figure",
    "mode_bands_figure",
    "references_figure",
    "samples_figure",
    "study_figures",
    "sweep_figure",
]

#: at most this many modes get their own panel / colour; the rest are summed as "other"
MAX_MODES_SHOWN = 12


@dataclass
class StudyData:
    """What the study figures need, all small: K samples, M references."""

    name: str
    epochs: np.ndarray  # (Tw,)
    profiles: np.ndarray  # (K, Tw) float64, sampled weights over the window
    sample_mode: np.ndarray  # (K,) cluster label of each sample (the clustering's view)
    sample_fit_mode: np.ndarray  # (K,) the mode each sample was fitted to in the pass (a, b)
    sample_order: np.ndarray  # (K,) dendrogram leaf order
    sample_a: np.ndarray  # (K,) slope of each sample's fitted line a r + b (float64)
    sample_b: np.ndarray  # (K,) its intercept (from the stored level and anchor, float64)
    refs: np.ndarray  # (M, Tw)
    mode_counts: np.ndarray  # (M,) parameters per mode
    layer_names: list[str]
    layer_mode_counts: np.ndarray  # (L, M + 1): per layer, parameters per mode; last = constant/NaN


def _figure(**kw: Any) -> Any:
    """A figure that belongs to no pyplot backend: drawing here never changes the caller's
    backend (a notebook's inline plots keep working) and nothing is shown on screen."""
    from matplotlib.figure import Figure

    return Figure(**kw)


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _colour(m: int) -> Any:
    import matplotlib

    return matplotlib.colormaps["tab20" if m >= 10 else "tab10"](m % 20 if m >= 10 else m)


def _zscore(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    c = x - x.mean(axis=-1, keepdims=True)
    s = np.sqrt((c * c).mean(axis=-1, keepdims=True))
    return np.divide(c, s, out=np.zeros_like(c), where=s > 0)


def correlation_figure(d: StudyData) -> bytes:
    """The samples' Pearson correlation matrix in dendrogram order, modes outlined."""
    from matplotlib.patches import Rectangle

    z = _zscore(d.profiles)
    corr = (z @ z.T) / max(z.shape[1], 1)
    order = d.sample_order
    c = corr[np.ix_(order, order)]
    labels = d.sample_mode[order]
    fig = _figure(figsize=(6.4, 5.6))
    ax = fig.subplots()
    im = ax.imshow(c, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    fig.colorbar(im, ax=ax, shrink=0.8, label="Pearson correlation")
    # modes are contiguous runs in the dendrogram order (complete-linkage cut)
    starts: list[int] = [0, *(int(i) + 1 for i in np.flatnonzero(np.diff(labels)))]
    stops = [*starts[1:], len(labels)]
    for a, b in zip(starts, stops, strict=True):
        m = int(labels[a])
        rect = Rectangle(
            (a - 0.5, a - 0.5), b - a, b - a, fill=False, lw=1.4, ec="k" if m < MAX_MODES_SHOWN else "0.5"
        )
        ax.add_patch(rect)
        if b - a >= max(3, len(labels) // 40) and m < MAX_MODES_SHOWN:
            ax.text(b - 0.5, a - 0.5, f" {m}", va="bottom", ha="left", fontsize=8)
    ax.set_title(f"{d.name}: correlation of the {len(labels)} samples, {d.refs.shape[0]} modes")
    ax.set_xlabel("sample (dendrogram order)")
    ax.set_ylabel("sample (dendrogram order)")
    return _png(fig)


def _aligned(d: StudyData, m: int) -> np.ndarray:
    """Normalised profiles of mode ``m``'s samples, anti-correlated ones flipped."""
    z = _zscore(d.profiles[d.sample_mode == m])
    r = _zscore(d.refs[m])
    sign = np.where(z @ r >= 0, 1.0, -1.0)
    return z * sign[:, None]


def mode_bands_figure(d: StudyData) -> bytes:
    """Per mode: median and 95% band of its samples' normalised profiles, and the reference."""
    n = min(d.refs.shape[0], MAX_MODES_SHOWN)
    cols = min(n, 4)
    rows = -(-n // cols)
    fig = _figure(figsize=(3.2 * cols, 2.4 * rows))
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True)
    t = d.epochs
    for m in range(rows * cols):
        ax = axes[m // cols][m % cols]
        if m >= n:
            ax.axis("off")
            continue
        z = _aligned(d, m)
        if z.shape[0]:
            lo, med, hi = np.percentile(z, [2.5, 50, 97.5], axis=0)
            ax.fill_between(t, lo, hi, color=_colour(m), alpha=0.3, lw=0, label="95% band")
            ax.plot(t, med, color=_colour(m), lw=1.2, label="median")
        ax.plot(t, _zscore(d.refs[m]), color="k", lw=1, ls="--", label="reference")
        ax.set_title(f"mode {m}: {int(d.mode_counts[m]):,} params, {z.shape[0]} samples", fontsize=8)
        ax.tick_params(labelsize=7)
        if m == 0:
            ax.legend(fontsize=6, loc="best")
    fig.supxlabel("epoch", fontsize=9)
    fig.supylabel("normalised weight", fontsize=9)
    fig.tight_layout()
    return _png(fig)


def references_figure(d: StudyData) -> bytes:
    """The reference profiles r_m(t), raw and normalised."""
    fig = _figure(figsize=(10, 3.6))
    (a1, a2) = fig.subplots(1, 2)
    for m in range(d.refs.shape[0]):
        kw = {"color": _colour(m), "lw": 1.2}
        label = f"mode {m}" if m < MAX_MODES_SHOWN else None
        a1.plot(d.epochs, d.refs[m], label=label, **kw)
        a2.plot(d.epochs, _zscore(d.refs[m]), **kw)
    a1.set_title("reference profiles (raw weights)")
    a2.set_title("reference profiles (normalised)")
    for a in (a1, a2):
        a.set_xlabel("epoch")
    a1.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return _png(fig)


def samples_figure(d: StudyData, per_mode: int = 2, max_modes: int = 4) -> bytes:
    """Sampled weights (dots) and their CMD reconstructions a r_m(t) + b (lines), picked by
    cluster label, drawn with the mode of the fit."""
    picks: list[int] = []
    for m in range(min(d.refs.shape[0], max_modes)):
        members = np.flatnonzero(d.sample_mode == m)
        if members.size:
            sel = np.linspace(0, members.size - 1, min(per_mode, members.size)).round().astype(int)
            picks.extend(int(members[i]) for i in sel)
    cols = min(len(picks), 4) or 1
    rows = max(-(-len(picks) // cols), 1)
    fig = _figure(figsize=(3.2 * cols, 2.4 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for i in range(rows * cols):
        ax = axes[i // cols][i % cols]
        if i >= len(picks):
            ax.axis("off")
            continue
        j = picks[i]
        # a and b belong to the mode the pass fitted the parameter to (its best reference),
        # which for a sample can differ from its cluster label
        m = int(d.sample_fit_mode[j])
        rec = d.sample_a[j] * d.refs[m] + d.sample_b[j]
        ax.plot(d.epochs, d.profiles[j], "o", ms=2.5, color="0.3", label="recorded (GD)")
        ax.plot(d.epochs, rec, color=_colour(m), lw=1.4, label="CMD")
        ax.set_title(f"sample {j} (cluster {int(d.sample_mode[j])}, fitted to mode {m})", fontsize=8)
        ax.tick_params(labelsize=7)
        if i == 0:
            ax.legend(fontsize=6)
    fig.supxlabel("epoch", fontsize=9)
    fig.supylabel("weight", fontsize=9)
    fig.tight_layout()
    return _png(fig)


def _group_layers(names: list[str], counts: np.ndarray, limit: int = 40) -> tuple[list[str], np.ndarray]:
    """Merge tensors by module prefix until at most ``limit`` rows remain."""
    depth = max((n.count(".") for n in names), default=0)
    while len(names) > limit and depth > 0:
        keys = [".".join(n.split(".")[:depth]) for n in names]
        uniq = list(dict.fromkeys(keys))
        merged = np.zeros((len(uniq), counts.shape[1]), dtype=counts.dtype)
        for k, row in zip(keys, counts, strict=True):
            merged[uniq.index(k)] += row
        names, counts = uniq, merged
        depth -= 1
    return names, counts


def layers_figure(d: StudyData) -> bytes:
    """How each layer's parameters are spread over the modes (fractions, stacked)."""
    names, counts = _group_layers(list(d.layer_names), d.layer_mode_counts)
    n_modes = counts.shape[1] - 1
    shown = min(n_modes, MAX_MODES_SHOWN)
    other = counts[:, shown:n_modes].sum(axis=1)
    totals = np.maximum(counts.sum(axis=1), 1)
    fig = _figure(figsize=(8, 0.28 * len(names) + 1.4))
    ax = fig.subplots()
    left = np.zeros(len(names))
    y = np.arange(len(names))
    series = [(f"mode {m}", counts[:, m], _colour(m)) for m in range(shown)]
    if n_modes > shown:
        series.append((f"modes {shown}+", other, "0.6"))
    series.append(("constant / NaN", counts[:, -1], "0.85"))
    for label, vals, colour in series:
        frac = vals / totals
        ax.barh(y, frac, left=left, color=colour, label=label, height=0.8)
        left += frac
    ax.set_yticks(y, [f"{n} ({int(t):,})" for n, t in zip(names, totals, strict=True)], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("fraction of the layer's parameters")
    ax.set_title("modes over the layers")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    return _png(fig)


def accuracy_figure(evaluation: dict[str, Any]) -> bytes:
    """GD and CMD test accuracy (and loss) over the epochs."""
    rows = evaluation["epochs"]
    e = [r["epoch"] for r in rows]
    fig = _figure(figsize=(10, 3.6))
    (a1, a2) = fig.subplots(1, 2)
    m = evaluation["study"]["n_modes"]
    a1.plot(e, [r["gd_accuracy"] for r in rows], "-o", ms=2.5, label="GD")
    a1.plot(e, [r["cmd_accuracy"] for r in rows], "-s", ms=2.5, label=f"CMD (M={m})")
    a1.set_ylabel("test accuracy")
    a2.plot(e, [r["gd_loss"] for r in rows], "-o", ms=2.5, label="GD")
    a2.plot(e, [r["cmd_loss"] for r in rows], "-s", ms=2.5, label=f"CMD (M={m})")
    a2.set_ylabel("test loss")
    a2.set_yscale("log")
    for a in (a1, a2):
        a.set_xlabel("epoch")
        a.legend(fontsize=8)
        a.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def sweep_figure(evaluation: dict[str, Any]) -> bytes:
    """Test accuracy and weight MSE against the number of modes M (mean ± std over seeds, K)."""
    sw = evaluation["sweep"]
    by = sw["by_modes"]
    m = [r["n_modes_mean"] for r in by]
    fig = _figure(figsize=(10, 3.6))
    (a1, a2) = fig.subplots(1, 2)
    a1.errorbar(
        m,
        [r["accuracy_mean"] for r in by],
        yerr=[r["accuracy_std"] or 0.0 for r in by],
        fmt="-o",
        capsize=3,
        label="CMD",
    )
    gd = {r["epoch"]: r["gd_accuracy"] for r in evaluation["epochs"]}
    at = sw["epochs"][-1]
    if at in gd:
        a1.axhline(gd[at], color="k", ls="--", lw=1, label=f"GD (epoch {at})")
    a1.set_ylabel(f"test accuracy at epoch {at}")
    ok = [(x, r) for x, r in zip(m, by, strict=True) if r["mse_mean"] is not None]
    if ok:
        a2.errorbar(
            [x for x, _ in ok],
            [r["mse_mean"] for _, r in ok],
            yerr=[r["mse_std"] or 0.0 for _, r in ok],
            fmt="-o",
            capsize=3,
        )
        if all(r["mse_mean"] > 0 for _, r in ok):
            a2.set_yscale("log")
    a2.set_ylabel("weight MSE over the window")
    for a in (a1, a2):
        a.set_xscale("log")
        a.set_xlabel("number of modes M")
        a.grid(alpha=0.3, which="both")
    a1.legend(fontsize=8)
    fig.suptitle(f"over seeds {sw['seeds']} and K {sw['samples']}", fontsize=9)
    fig.tight_layout()
    return _png(fig)


def study_figures(d: StudyData) -> dict[str, bytes]:
    """The figures of the fit itself (no model needed)."""
    return {
        "correlation.png": correlation_figure(d),
        "mode_bands.png": mode_bands_figure(d),
        "references.png": references_figure(d),
        "samples.png": samples_figure(d),
        "layers.png": layers_figure(d),
    }


def evaluation_figures(evaluation: dict[str, Any]) -> dict[str, bytes]:
    """The figures of an evaluation: accuracy over epochs, and the sweep over M if any."""
    out = {"accuracy.png": accuracy_figure(evaluation)}
    sw = evaluation.get("sweep")
    if sw and sw.get("by_modes"):
        out["sweep.png"] = sweep_figure(evaluation)
    return out


def eigenvalues_figure(runs: list[dict[str, Any]], title: str = "Koopman eigenvalues") -> bytes:
    """Eigenvalues of each run in the complex plane, with the unit circle."""
    fig = _figure(figsize=(5.6, 5.2))
    ax = fig.subplots()
    th = np.linspace(0, 2 * np.pi, 400)
    ax.plot(np.cos(th), np.sin(th), color="0.7", lw=0.8)
    markers = "os^vD<>ph*"
    for i, r in enumerate(runs):
        ev = np.asarray(r["eigenvalues"], dtype=float).reshape(-1, 2)
        label = f"{i}: {r['name']}"
        ax.scatter(ev[:, 0], ev[:, 1], s=28, marker=markers[i % len(markers)], color=_colour(i),
                   label=label, alpha=0.8)
    ax.axhline(0, color="0.85", lw=0.6)
    ax.axvline(0, color="0.85", lw=0.6)
    ax.set_aspect("equal")
    ax.set_xlabel("Re λ")
    ax.set_ylabel("Im λ")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="best")
    return _png(fig)


def distance_figure(distances: list[list[float]], labels: list[str]) -> bytes:
    """The matrix of 1-Wasserstein distances between runs."""
    d = np.asarray(distances, dtype=float)
    fig = _figure(figsize=(1.2 + 0.55 * len(labels), 1.0 + 0.5 * len(labels)))
    ax = fig.subplots()
    im = ax.imshow(d, cmap="viridis")
    fig.colorbar(im, ax=ax, shrink=0.8, label="1-Wasserstein distance")
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    for i in range(d.shape[0]):
        for j in range(d.shape[1]):
            ax.text(j, i, f"{d[i, j]:.2g}", ha="center", va="center", fontsize=6,
                    color="w" if d[i, j] < d.max() / 2 else "k")
    ax.set_title("distances between runs", fontsize=10)
    fig.tight_layout()
    return _png(fig)
