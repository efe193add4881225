"""``info``: what a store holds."""

from __future__ import annotations

import os
from typing import Any

from pipeline.store.remote import StorageOptions, with_storage_options
from pipeline.store.schema import SCHEMA_VERSION, _ranges, check_study_attrs
from pipeline.store.trajectory import TrajectoryStore

__all__ = ["format_info", "info"]


@with_storage_options("store")
def info(
    store: str | os.PathLike[str], *, storage_options: StorageOptions | None = None
) -> dict[str, Any]:
    """Describe a store: N, T, epochs, tensors, chunking, analyses and size on disk
    (``storage_options``: fsspec options for a store on object storage)."""
    st = TrajectoryStore.open(store)
    meta = st.require_meta()
    arr = st.trajectory()
    stored = meta.stored_tensors()
    params = [t for t in meta.tensors if t.kind == "parameter"]
    chunks = tuple(int(c) for c in arr.chunks)
    return {
        "store": st.url,
        "schema_version": meta.version,
        "current_schema_version": SCHEMA_VERSION,
        "store_dtype": meta.store_dtype,
        "package_version": meta.package_version,
        "n_rows": meta.n_rows,
        "n_epochs": meta.n_epochs,
        "epochs": meta.epoch_numbers,
        "pending_epochs": [e.epoch for e in meta.pending] if meta.pending else [],
        "tensors": len(meta.tensors),
        "tensors_stored": len(stored),
        "parameters": len(params),
        "buffers": len(meta.tensors) - len(params),
        "not_stored": [t.name for t in meta.tensors if not t.stored],
        "chunk_shape": chunks,
        "chunk_mb": chunks[0] * chunks[1] * st.chunk_grid().itemsize / 1e6,
        "n_chunks": int(arr.nchunks),
        "codec": meta.settings.codec,
        "settings": meta.settings.to_dict(),
        "nonfinite": sum(e.nonfinite for e in meta.epochs),
        "frozen": _frozen(meta),
        "analyses": st.analyses(),
        "analysis_details": [_analysis_brief(st.url, n) for n in st.analyses()],
        "bytes_on_disk": st.size_on_disk(),
    }


def _frozen(meta: Any) -> dict[str, Any] | None:
    """The stored tensors whose values never change over the committed epochs (by their
    ingest digests); None when the digests are unknown (ingested under schema 1)."""
    from pipeline.plan.fit import frozen_share

    if not meta.epochs:
        return None
    f = frozen_share(meta, range(meta.n_epochs))
    if not f["known"]:
        return None
    return {**f, "tensors": len(f["tensors"]), "names": f["tensors"]}


def _analysis_brief(url: str, name: str) -> dict[str, Any]:
    from pipeline.errors import PipelineError
    from pipeline.store.analysis import AnalysisGroup, StudyLayout

    try:
        attrs = check_study_attrs(AnalysisGroup(url, name).attrs(), name)
    except PipelineError as e:
        return {"name": name, "status": f"unreadable ({e})"}
    cfg = attrs.get("config") or {}
    summary = attrs.get("summary") or {}
    layout = StudyLayout.of(attrs)
    n_window = len(cfg.get("epochs") or ())
    per_row = None
    if attrs.get("n_modes") and n_window:
        per_row = layout.bytes_per_row(int(attrs["n_modes"]), n_window)
    return {
        "name": name,
        "status": attrs.get("status"),
        "version": layout.version,
        "diagnostics": layout.diagnostics,
        "bytes_per_parameter": per_row,
        "modes": attrs.get("n_modes"),
        "samples": attrs.get("n_samples"),
        "window": cfg.get("window"),
        "dynamics_error": summary.get("dynamics_error"),
        "relative_error": summary.get("relative_error"),
        "evaluated": _evaluated(attrs.get("evaluation")),
    }


def _evaluated(ev: Any) -> dict[str, Any] | None:
    if not isinstance(ev, dict) or "final" not in ev:
        return None
    f = ev["final"]
    return {
        "workflow": ev.get("workflow"),
        "epoch": f.get("epoch"),
        "gd_accuracy": f.get("gd_accuracy"),
        "cmd_accuracy": f.get("cmd_accuracy"),
    }


def format_info(d: dict[str, Any]) -> str:
    """Human-readable text of :func:`info`'s dictionary."""
    s = d["settings"]
    lines = [
        f"store:        {d['store']}  (schema v{d['schema_version']}, written by cmd-pipeline {d['package_version']})",
        f"N parameters: {d['n_rows']:,}",
        f"T epochs:     {d['n_epochs']}  [{_ranges(d['epochs'])}]",
    ]
    if d["pending_epochs"]:
        lines.append(
            f"PENDING:      interrupted ingest of epochs [{_ranges(d['pending_epochs'])}]: re-run it to resume"
        )
    lines += [
        f"tensors:      {d['tensors']} ({d['parameters']} parameters, {d['buffers']} buffers), "
        f"{d['tensors_stored']} stored in the trajectory",
        f"not stored:   {', '.join(d['not_stored'][:8]) or '-'}"
        + (" ..." if len(d["not_stored"]) > 8 else ""),
        f"chunking:     {d['chunk_shape'][0]:,} rows x {d['chunk_shape'][1]} epoch(s) "
        f"= {d['chunk_mb']:.2f} MB per chunk, {d['n_chunks']} chunks, codec {d['codec']}, "
        f"values {d['store_dtype']}",
        f"settings:     include={s['include']} exclude={s['exclude']} float_buffers={s['float_buffers']} "
        f"nonfinite={s['nonfinite']}"
        + (f" strip_prefix={s['strip_prefix']!r}" if s.get("strip_prefix") else ""),
        f"NaN/Inf:      {d['nonfinite']} value(s)",
        f"frozen:       {_frozen_text(d.get('frozen'))}",
        f"analyses:     {', '.join(d['analyses']) or '-'}",
        *(
            f"  {a['name']}: {a['status']}, {a.get('modes')} mode(s) from {a.get('samples')} samples, "
            f"window {a.get('window')}, error relative to the dynamics "
            + ("-" if a.get("dynamics_error") is None else f"{a['dynamics_error']:.4g}")
            + " (to ‖W‖: "
            + ("-" if a.get("relative_error") is None else f"{a['relative_error']:.4g}")
            + ")"
            + (
                f"; {a['bytes_per_parameter']} B per parameter (study v{a['version']}"
                + (", with per-row diagnostics)" if a.get("diagnostics") else ")")
                if a.get("bytes_per_parameter")
                else ""
            )
            + (
                f"; evaluated ({a['evaluated']['workflow']}): epoch {a['evaluated']['epoch']} "
                f"GD {a['evaluated']['gd_accuracy']:.4f}, CMD {a['evaluated']['cmd_accuracy']:.4f}"
                if a.get("evaluated")
                else ""
            )
            for a in d.get("analysis_details", [])
        ),
        f"size on disk: {d['bytes_on_disk'] / 1e6:,.1f} MB",
    ]
    return "\n".join(lines)


def _frozen_text(f: dict[str, Any] | None) -> str:
    if f is None:
        return "unknown (epochs ingested before store schema 2 carry no tensor digests)"
    names = ", ".join(f["names"][:4]) + (" ..." if len(f["names"]) > 4 else "")
    return (
        f"{f['share']:.1%} of the parameters never change ({f['tensors']} of "
        f"{f['of_tensors']} stored tensors{': ' + names if names else ''})"
    )
