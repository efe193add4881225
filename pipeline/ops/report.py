"""``report``: the study's figures (PNG) and a self-contained HTML page.

Everything is written under ``analyses/<name>/report/`` through the store (so it works on any
backend): ``figures/*.png`` and ``report.html``; with ``out``, the page is also copied there.
The page embeds its figures (base64), so it can be mailed or archived on its own.

The data behind the figures is small: the K samples are read again at the window's epochs
(K x Tw values), and the per-layer mode counts stream the ``mode`` and ``flags`` arrays (one
and a half bytes per parameter) a block at a time.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline._version import __version__
from pipeline.kernels.cmd import FLAG_CONSTANT, FLAG_NONFINITE
from pipeline.plan import RowLayout, blocks
from pipeline.report.figures import StudyData, evaluation_figures, study_figures
from pipeline.store.analysis import AnalysisGroup, StudyLayout, complete_study
from pipeline.store.remote import StorageOptions, with_storage_options
from pipeline.store.trajectory import TrajectoryStore

__all__ = ["ReportResult", "load_study_data", "report"]


@dataclass
class ReportResult:
    store: str
    name: str
    html: str  # location of report.html in the store
    copy: str | None  # the copy written to ``out``
    figures: dict[str, str] = field(default_factory=dict)

    def text(self) -> str:
        """The result in words (every result type has this method; ``summary()`` is the
        same text)."""
        return self.summary()

    def summary(self) -> str:
        where = self.copy or self.html
        return f"report of {self.name!r}: {where} ({len(self.figures)} figures)"


def _layer_mode_counts(ag: AnalysisGroup, layout: RowLayout, n_modes: int) -> np.ndarray:
    mode_arr, flag_arr = ag.array("mode"), ag.array("flags")
    n = int(mode_arr.shape[0])
    rows = int(mode_arr.chunks[0])
    counts = np.zeros((len(layout.names), n_modes + 1), dtype=np.int64)
    index = {nm: i for i, nm in enumerate(layout.names)}
    for r0, r1 in blocks(n, rows):
        mode = np.asarray(mode_arr[r0:r1]).astype(np.int64)
        skip = (np.asarray(flag_arr[r0:r1]) & (FLAG_CONSTANT | FLAG_NONFINITE)) != 0
        for s in layout.segments(r0, r1):
            sl = slice(s.out, s.out + s.stop - s.start)
            li = index[s.name]
            sk = skip[sl]
            counts[li, :n_modes] += np.bincount(mode[sl][~sk], minlength=n_modes)[:n_modes]
            counts[li, n_modes] += int(sk.sum())
    return counts


def _sample_lines(
    ag: AnalysisGroup, rows: np.ndarray, mode: np.ndarray, refs: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Slope and intercept (float64) of the fitted lines of ``rows``, whichever form the
    study stores them in (the anchored ``level + a (r - r(anchor))``, or ``a r + b``)."""
    a = np.asarray(ag.array("a").oindex[rows], dtype=np.float64)
    if not ag.layout().anchored:
        return a, np.asarray(ag.array("b").oindex[rows], dtype=np.float64)
    level = np.asarray(ag.array("level").oindex[rows], dtype=np.float64)
    anchor = np.asarray(ag.array("anchor").oindex[rows]).astype(np.int64)
    return a, level - a * refs[mode, anchor]


def load_study_data(store: str | os.PathLike[str], name: str) -> StudyData:
    """The small arrays the study figures need, read from the store."""
    st = TrajectoryStore.open(store)
    meta = st.require_meta()
    ag, attrs = complete_study(st, name)
    epochs = np.asarray(ag.array("epochs")[...]).astype(np.int64)
    cols = np.asarray([meta.column_of(int(e)) for e in epochs], dtype=np.int64)
    sample_index = np.asarray(ag.array("sample_index")[...]).astype(np.int64)
    if ag.has_array("sample_profiles"):  # kept by the fit: no read of the trajectory
        profiles = np.asarray(ag.array("sample_profiles")[...])
    else:  # a study of an earlier release
        profiles, _ = st.chunk_grid().read_scattered(sample_index, cols)
    refs = np.asarray(ag.array("refs")[...], dtype=np.float64)
    stored = meta.stored_tensors()
    layout = RowLayout.from_entries([(t.name, t.offset, t.size) for t in stored])
    fit_mode = np.asarray(ag.array("mode").oindex[sample_index]).astype(np.int64)
    sample_a, sample_b = _sample_lines(ag, sample_index, fit_mode, refs)
    return StudyData(
        name=name,
        epochs=epochs,
        profiles=np.asarray(profiles, dtype=np.float64),
        sample_mode=np.asarray(ag.array("sample_mode")[...]).astype(np.int64),
        sample_order=np.asarray(ag.array("sample_order")[...]).astype(np.int64),
        sample_fit_mode=fit_mode,
        sample_a=sample_a,
        sample_b=sample_b,
        refs=refs,
        mode_counts=np.asarray([m["count"] for m in attrs["summary"]["modes"]], dtype=np.int64),
        layer_names=list(layout.names),
        layer_mode_counts=_layer_mode_counts(ag, layout, refs.shape[0]),
    )


@with_storage_options("store")
def report(
    store: str | os.PathLike[str],
    name: str,
    *,
    out: str | os.PathLike[str] | None = None,
    storage_options: StorageOptions | None = None,
) -> ReportResult:
    """Write the study's figures and ``report.html`` (see the module docstring)."""
    st = TrajectoryStore.open(store, writable=True)
    data = load_study_data(st.url, name)
    ag = AnalysisGroup(st.url, name)
    attrs = ag.attrs()  # checked by load_study_data (complete_study)
    evaluation = attrs.get("evaluation")
    figs = study_figures(data)
    if evaluation:
        figs.update(evaluation_figures(evaluation))
    extra = _saved_analyses(ag)
    for f in ("koopman_eigenvalues.png", "distances.png", "stability.png"):
        png = ag.read_file(f"figures/{f}")
        if png is not None and f.split(".")[0] in extra["figures"]:
            figs[f] = png
    locations = {f: ag.write_file(f"figures/{f}", png) for f, png in figs.items()}
    page = render_html(st.url, name, attrs, figs, data, extra).encode()
    loc = ag.write_file("report.html", page)
    copy = None
    if out is not None:
        p = Path(out)
        if p.is_dir() or p.suffix.lower() not in (".html", ".htm"):
            p = p / f"{name}.html"
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".partial")
        tmp.write_bytes(page)
        os.replace(tmp, p)
        copy = str(p)
    return ReportResult(st.url, name, loc, copy, locations)


# ---------------------------------------------------------------------------- HTML
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;
color:#222;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:.2em;
margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0;font-size:.88em}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:right}
th{background:#f4f4f4}td.l,th.l{text-align:left}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.85em;color:#555}
.meta{color:#555;font-size:.9em}.good{color:#17672c}.bad{color:#a11}
"""


def _f(v: Any, fmt: str = ".4g") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return format(v, fmt)
    return html.escape(str(v))


def _table(head: list[str], rows: list[list[Any]], left: int = 1) -> str:
    th = "".join(f'<th class="{"l" if i < left else ""}">{html.escape(h)}</th>' for i, h in enumerate(head))
    body = []
    for r in rows:
        tds = "".join(
            f'<td class="{"l" if i < left else ""}">{c if isinstance(c, str) else _f(c)}</td>'
            for i, c in enumerate(r)
        )
        body.append(f"<tr>{tds}</tr>")
    return f"<table><thead><tr>{th}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _img(figs: dict[str, bytes], key: str, caption: str) -> str:
    if key not in figs:
        return ""
    b64 = base64.b64encode(figs[key]).decode()
    return (
        f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{b64}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _extra_sections(extra: dict[str, Any], figs: dict[str, bytes]) -> list[str]:
    parts: list[str] = []
    cmp_ = extra.get("compare")
    if cmp_:
        runs = cmp_["runs"]
        parts += [
            "<h2>Dynamical equivalence of runs (Koopman spectra)</h2>",
            f"<p>Coordinates: {html.escape(cmp_['source'])}, {cmp_['delays']} time delay(s); "
            "1-Wasserstein distances between the eigenvalue sets; control: shuffled time order"
            + (f"; permutation p (groups apart) = {cmp_['p_apart']:.4f}" if cmp_.get("p_apart") is not None else "")
            + ".</p>",
            _img(figs, "koopman_eigenvalues.png", "Koopman eigenvalues of every run in the complex plane"),
            _img(figs, "distances.png", "distance matrix between runs"),
            _table(
                ["pair", "distance", "control median", "normalised", "p_close"],
                [[f"{p['i']}: {html.escape(runs[p['i']]['name'])} vs {p['j']}: {html.escape(runs[p['j']]['name'])}",
                  p["distance"], p["control_median"], p["normalised"], p["p_close"]] for p in cmp_["pairs"]],
            ),
        ]
    stab = extra.get("stability")
    if stab:
        parts += [
            "<h2>When each layer's basis stops moving (SVD stability)</h2>",
            _img(figs, "stability.png", f"stability of Q = U V^T between consecutive epochs (threshold {stab['threshold']})"),
            _table(
                ["layer", "matrix", "method", "first above", "stays above"],
                [[html.escape(lay["name"]), "x".join(map(str, lay["matrix_shape"])), lay["method"],
                  str(lay.get("first_above")), str(lay.get("stays_above"))] for lay in stab["layers"]],
            ),
        ]
        mc = stab.get("mode_changes")
        if mc:
            wins = mc["windows"]
            parts += [
                "<h3>How often parameters change mode between sliding windows</h3>",
                _table(
                    ["layer", *[f"{wins[k]} → {wins[k + 1]}" for k in range(len(wins) - 1)]],
                    [[html.escape(lay), *[mc["changed"][k][i] for k in range(len(wins) - 1)]]
                     for i, lay in enumerate(mc["layers"])]
                    + [["(all)", *mc["overall"]]],
                ),
            ]
    return parts


def _saved_analyses(ag: AnalysisGroup) -> dict[str, Any]:
    """The comparison and basis-stability results kept with the study, if any."""
    out: dict[str, Any] = {"figures": set()}
    for key, fig in (("compare", ("koopman_eigenvalues", "distances")), ("stability", ("stability",))):
        raw = ag.read_file(f"{key}.json")
        if raw is not None:
            out[key] = json.loads(raw)
            out["figures"].update(fig)
    return out


def _stored_cell(attrs: dict[str, Any], n_window: int) -> str:
    """What the study stores per parameter, in bytes and arrays."""
    lay = StudyLayout.of(attrs)
    kinds = lay.per_row(int(attrs.get("n_modes") or 1), n_window)
    arrays = ", ".join(f"{k} {dt.name}" for k, dt in kinds.items())
    diag = "with" if lay.diagnostics else "without"
    return (
        f"{lay.bytes_per_row(int(attrs.get('n_modes') or 1), n_window)} B ({arrays}; "
        f"study version {lay.version}, {diag} per-row diagnostics)"
    )


def render_html(
    url: str,
    name: str,
    attrs: dict[str, Any],
    figs: dict[str, bytes],
    data: StudyData,
    extra: dict[str, Any] | None = None,
) -> str:
    """The self-contained report page."""

    def _frozen_cell(f: Any) -> str:
        if not isinstance(f, dict) or not f.get("known"):
            return "unknown (no tensor digests: ingested before store schema 2)"
        return (
            f"{len(f['tensors'])} tensors, {f['rows']:,} parameters ({f['share']:.1%}); "
            "fitted without reading their other epochs"
        )

    cfg = attrs.get("config", {})
    summ = attrs["summary"]
    ev = attrs.get("evaluation")
    n_params = int(sum(m["count"] for m in summ["modes"]))
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>CMD report: {html.escape(name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>CMD study <code>{html.escape(name)}</code></h1>",
        f"<p class='meta'>store <code>{html.escape(url)}</code> · cmd-pipeline {__version__} · "
        f"generated {_dt.datetime.now(_dt.UTC).isoformat(timespec='seconds')}</p>",
        "<h2>Summary</h2>",
        _table(
            ["quantity", "value"],
            [
                ["parameters (trajectory rows)", f"{n_params:,}"],
                ["epochs in the window", f"{len(data.epochs)} ({data.epochs[0]}..{data.epochs[-1]})"],
                ["modes M", str(attrs.get("n_modes"))],
                ["stored per parameter", _stored_cell(attrs, len(data.epochs))],
                ["requested", f"modes={cfg.get('modes')} threshold={cfg.get('threshold')}"],
                ["samples K (seed)", f"{attrs.get('n_samples')} ({cfg.get('seed')})"],
                ["error relative to the dynamics ‖W−Ŵ‖/‖W−mean_t W‖", _f(summ.get("dynamics_error"))],
                ["error relative to the weights ‖W−Ŵ‖/‖W‖", _f(summ.get("relative_error"))],
                ["weight MSE over the window", _f(summ.get("mse"))],
                ["constant parameters", f"{summ['flags']['constant']:,}"],
                ["frozen tensors (never change over the window)", _frozen_cell(attrs.get("frozen"))],
                ["parameters with NaN/Inf", f"{summ['flags']['nonfinite']:,}"],
            ],
        ),
        *(f"<p class='bad'>note: {html.escape(str(n))}</p>" for n in summ.get("notes", [])),
    ]
    if ev:
        f, b = ev["final"], ev["best"]
        d_acc = f["cmd_accuracy"] - f["gd_accuracy"]
        cls = "good" if d_acc >= 0 else "bad"
        parts += [
            "<h2>GD against CMD on the test set</h2>",
            f"<p>workflow <code>{html.escape(str(ev['workflow']))}</code>; final epoch "
            f"{f['epoch']}: GD accuracy {f['gd_accuracy']:.4f}, CMD accuracy {f['cmd_accuracy']:.4f} "
            f"(<span class='{cls}'>{d_acc:+.4f}</span>); best GD {b['gd_accuracy']:.4f} "
            f"(epoch {b['gd_epoch']}), best CMD {b['cmd_accuracy']:.4f} (epoch {b['cmd_epoch']}).</p>",
            _img(figs, "accuracy.png", "GD and CMD test accuracy and loss over the epochs"),
        ]
        sw = ev.get("sweep")
        if sw and sw.get("by_modes"):
            parts += [
                "<h3>Accuracy and weight MSE against the number of modes</h3>",
                _img(figs, "sweep.png", "mean ± std over sampling seeds and K"),
                _table(
                    ["M requested", "modes found", f"CMD accuracy at epoch {sw['epochs'][-1]}",
                     "± std", f"weight MSE at epoch {sw['epochs'][-1]}", "± std",
                     "weight MSE over the window", "± std", "runs"],
                    [
                        [
                            str(r["modes_requested"]),
                            r["n_modes_mean"],
                            r["accuracy_mean"],
                            r["accuracy_std"],
                            r.get("mse_epoch_mean"),
                            r.get("mse_epoch_std"),
                            r["mse_mean"],
                            r["mse_std"],
                            str(r["runs"]),
                        ]
                        for r in sw["by_modes"]
                    ],
                ),
                f"<p class='meta'>accuracy at epoch {sw['epochs'][-1]}; seeds {sw['seeds']}, "
                f"K {sw['samples']}</p>",
            ]
        parts += [
            "<h3>Per epoch</h3>",
            _table(
                ["epoch", "GD acc", "CMD acc", "GD loss", "CMD loss", "weight MSE at the epoch",
                 "error / dynamics", "error / ‖W‖"],
                [
                    [
                        str(r["epoch"]),
                        r["gd_accuracy"],
                        r["cmd_accuracy"],
                        r["gd_loss"],
                        r["cmd_loss"],
                        r["mse"],
                        r.get("dynamics_error"),
                        r["relative_error"],
                    ]
                    for r in ev["epochs"]
                ],
            ),
        ]
    parts += [
        "<h2>Modes</h2>",
        _img(figs, "correlation.png", "Pearson correlation of the sampled weights in dendrogram "
             "order; squares mark the modes"),
        _table(
            ["mode", "parameters", "mean |corr|", "error / dynamics", "error / ‖W‖", "reference row"],
            [
                [str(m["mode"]), f"{m['count']:,}", m["mean_abs_corr"], m.get("dynamics_error"),
                 m["relative_error"], str(m["reference"])]
                for m in summ["modes"]
            ],
        ),
        _img(figs, "mode_bands.png", "per mode: median and 95% band of the normalised sampled "
             "profiles (anti-correlated ones flipped), and the reference"),
        _img(figs, "references.png", "the reference profiles"),
        _img(figs, "samples.png", "sampled weights and their CMD reconstructions"),
        "<h2>Layers</h2>",
        _img(figs, "layers.png", "how each layer's parameters are spread over the modes"),
        _table(
            ["tensor", "parameters", "mean |corr|", "error / dynamics", "error / ‖W‖"],
            [[html.escape(r["name"]), f"{r['count']:,}", r["mean_abs_corr"], r.get("dynamics_error"),
              r["relative_error"]]
             for r in summ["layers"]],
        ),
        *_extra_sections(extra or {}, figs),
        "<h2>Configuration</h2>",
        f"<pre>{html.escape(json.dumps(cfg, indent=2))}</pre>",
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p)
