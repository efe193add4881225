"""``cmd-pipeline bench --scale N``: a synthetic language model of N parameters through every
step on this machine, with wall time, bytes, throughput and peak RSS per step.

The run is shaped like a decoder-only LM (LLaMA naming: embeddings, attention and MLP blocks,
RMS norms, an untied ``lm_head``), stored in bf16 as sharded safetensors with their index
(``checkpoint-<e>/``, as the Hugging Face Trainer writes them). Every value follows a planted
mode, ``w_i(t) = a_i r_{m_i}(t) + b_i`` rounded to bf16, where ``m_i``, ``a_i`` and ``b_i`` are
hashes of the row index ``i``: the answer is known for any row without storing it, so the fit's
modes are checked against the planted ones on sampled row ranges (purity).

Steps: write the checkpoints, ingest (the checkpoints are deleted after it when ``--keep`` is
not given: a 1e9 run is 2 GB a epoch), fit (M = 10), export one epoch as stored (GD weights),
export one epoch as the study reconstructs it (CMD weights), info, report. Each step's peak
RSS is sampled over the whole process tree (client and workers): the largest single process
and the sum.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import pipeline
from pipeline.bench.common import PeakRSS
from pipeline.ops.export import from_float32

__all__ = ["LMShape", "lm_shape", "planted", "run_scale", "write_lm_run"]

MODES = 10
#: elements generated at a time (bounded memory whatever the tensor's size)
BLOCK = 1 << 23
SHARD_BYTES = 1 << 30


@dataclass(frozen=True)
class LMShape:
    """A decoder-only LM's tensors: ``(name, shape)`` in state_dict order."""

    d_model: int
    n_layers: int
    ffn: int
    vocab: int

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        d, f = self.d_model, self.ffn
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, d))]
        for i in range(self.n_layers):
            p = f"model.layers.{i}"
            out += [
                (f"{p}.self_attn.q_proj.weight", (d, d)),
                (f"{p}.self_attn.k_proj.weight", (d, d)),
                (f"{p}.self_attn.v_proj.weight", (d, d)),
                (f"{p}.self_attn.o_proj.weight", (d, d)),
                (f"{p}.mlp.gate_proj.weight", (f, d)),
                (f"{p}.mlp.up_proj.weight", (f, d)),
                (f"{p}.mlp.down_proj.weight", (d, f)),
                (f"{p}.input_layernorm.weight", (d,)),
                (f"{p}.post_attention_layernorm.weight", (d,)),
            ]
        out += [("model.norm.weight", (d,)), ("lm_head.weight", (self.vocab, d))]
        return out

    @property
    def n_params(self) -> int:
        return sum(math.prod(s) for _n, s in self.tensors())


def lm_shape(n: float) -> LMShape:
    """An LM of about ``n`` parameters: ``ffn = 2.75 d``, ``vocab = 16 d``, 16 layers from 1e8
    (1e9: d = 2112, 1.02e9 parameters in 147 tensors).

    >>> s = lm_shape(1e9); (s.d_model, s.n_layers, round(s.n_params / 1e9, 2))
    (2112, 16, 1.02)
    """
    layers = 16 if n >= 1e8 else 4 if n >= 1e6 else 2
    width = math.sqrt(n / (12.25 * layers + 32))
    d = max(64, round(width / 64) * 64)
    return LMShape(d, layers, round(2.75 * d / 64) * 64 or 64, 16 * d)


def _profiles(t: int) -> np.ndarray:
    """``MODES`` profiles far apart in correlation: cos(pi k t), k = 1..MODES (the DCT's
    basis: nearly orthogonal once T > MODES)."""
    tt = np.linspace(0.0, 1.0, t)
    return np.stack([np.cos(np.pi * k * tt) for k in range(1, MODES + 1)])


def planted(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The planted mode, amplitude and offset of global rows ``rows`` (hashes of the index)."""
    i = rows.astype(np.uint64)
    h1 = (i * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(33)
    h2 = (i * np.uint64(0xC2B2AE3D27D4EB4F) + np.uint64(0x165667B19E3779F9)) >> np.uint64(40)
    m = (h1 % np.uint64(MODES)).astype(np.int64)
    u = (h2 & np.uint64(0xFFFFFF)).astype(np.float64) / float(1 << 24)
    a = (0.02 + 0.04 * u) * np.where(h1 & np.uint64(1 << 20), 1.0, -1.0)
    b = 0.2 * ((h2 >> np.uint64(4)) % np.uint64(1000)).astype(np.float64) / 1000 - 0.1
    return m, a, b


def _values(offset: int, size: int, e: int, prof: np.ndarray, norm: bool) -> Iterator[bytes]:
    for s in range(0, size, BLOCK):
        rows = np.arange(offset + s, offset + min(size, s + BLOCK), dtype=np.int64)
        m, a, b = planted(rows)
        if norm:  # RMS norm weights sit near 1
            b = b + 1.0
        yield from_float32((a * prof[m, e] + b).astype(np.float32), "bfloat16").tobytes()


def write_lm_run(root: Path, shape: LMShape, t: int) -> int:
    """Write ``t`` epochs as ``root/checkpoint-<e>/`` (bf16 sharded safetensors + index);
    returns the bytes written."""
    prof = _profiles(t)
    tensors = shape.tensors()
    shards: list[list[tuple[str, tuple[int, ...], int]]] = [[]]
    size = 0
    offset = 0
    for name, shp in tensors:
        n = math.prod(shp)
        if size and size + 2 * n > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shp, offset))
        size += 2 * n
        offset += n
    total = 0
    for e in range(t):
        d = root / f"checkpoint-{e}"
        d.mkdir(parents=True, exist_ok=True)
        weight_map = {}
        for k, shard in enumerate(shards):
            fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
            pos = 0
            for name, shp, _off in shard:
                n = 2 * math.prod(shp)
                header[name] = {"dtype": "BF16", "shape": list(shp), "data_offsets": [pos, pos + n]}
                pos += n
                weight_map[name] = fname
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            with open(d / fname, "wb") as f:
                f.write(struct.pack("<Q", len(raw)) + raw)
                for name, shp, off in shard:
                    norm = name.endswith("norm.weight")
                    for chunk in _values(off, math.prod(shp), e, prof, norm):
                        f.write(chunk)
            total += 8 + len(raw) + pos
        index = {"metadata": {"total_size": 2 * shape.n_params}, "weight_map": weight_map}
        (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


def _dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def _purity(store: Path, name: str, n: int, seed: int = 0, windows: int = 64, width: int = 4096) -> float:
    """Share of sampled rows whose fitted mode maps (by majority) to their planted mode."""
    from pipeline.store.analysis import read_result

    rng = np.random.default_rng(seed)
    mode_arr = read_result(str(store), name, "mode")
    fitted, truth = [], []
    for r0 in rng.integers(0, max(1, n - width), size=windows):
        r1 = min(n, int(r0) + width)
        fitted.append(np.asarray(mode_arr[int(r0) : r1]).astype(np.int64))
        truth.append(planted(np.arange(int(r0), r1))[0])
    f, tr = np.concatenate(fitted), np.concatenate(truth)
    agree = 0
    for m in np.unique(f):
        agree += int(np.bincount(tr[f == m], minlength=MODES).max())
    return agree / f.size


def run_scale(
    n: float, out: Path, *, epochs: int = 12, workdir: Path | None = None, keep: bool = False,
    runtime: pipeline.RuntimeOptions | None = None,
) -> dict[str, Any]:
    """Run every step at ``n`` parameters; writes ``out/scale.json`` and ``out/scale.md``."""
    out.mkdir(parents=True, exist_ok=True)
    work = workdir or out / "work"
    work.mkdir(parents=True, exist_ok=True)
    shape = lm_shape(n)
    n_params = shape.n_params
    free = shutil.disk_usage(work).free
    # bf16 checkpoints and trajectory side by side during ingest; then the trajectory, the
    # study (26 B a parameter) and the two exports (the checkpoints are deleted unless kept)
    ckpt_bytes = 2 * n_params * epochs
    need = max(2 * ckpt_bytes, (2 if keep else 1) * ckpt_bytes + 26 * n_params + 4 * n_params)
    if free < need:
        raise pipeline.PipelineError(
            f"--scale {n:g}: about {need / 1e9:.0f} GB of disk needed in {work}, "
            f"{free / 1e9:.0f} GB free"
        )
    ckpt, store = work / "lm-run", work / "lm.zarr"
    for p in (ckpt, store):
        if p.exists():
            shutil.rmtree(p)
    steps: list[dict[str, Any]] = []

    def step(label: str, fn: Any, nbytes: Any = None) -> Any:
        print(f"[scale] {label} ...", file=sys.stderr, flush=True)
        with PeakRSS(interval=0.2) as rss:
            t0 = time.perf_counter()
            res = fn()
            dt = time.perf_counter() - t0
        b = nbytes() if callable(nbytes) else nbytes
        row = {
            "step": label,
            "seconds": dt,
            "bytes": b,
            "gb_per_s": (b / dt / 1e9) if b and dt > 0 else None,
            "peak_rss_process_gb": rss.peak_single / 1e9,
            "peak_rss_tree_gb": rss.peak / 1e9,
        }
        steps.append(row)
        print(f"[scale] {label}: {dt:.1f} s, peak RSS {rss.peak_single / 1e9:.2f} GB "
              f"(tree {rss.peak / 1e9:.2f} GB)", file=sys.stderr, flush=True)
        return res

    written = step("write checkpoints", lambda: write_lm_run(ckpt, shape, epochs))
    steps[-1]["bytes"] = written
    steps[-1]["gb_per_s"] = written / steps[-1]["seconds"] / 1e9
    e_last = epochs - 1
    with pipeline.runner(runtime or pipeline.RuntimeOptions()) as run:
        step("ingest", lambda: pipeline.ingest([ckpt], store, run=run), written)
        if not keep:
            shutil.rmtree(ckpt)
        traj = _dir_bytes(store / "trajectory")
        fit = step(
            "fit (M=10, K=1000)",
            lambda: pipeline.fit(store, "lm", modes=MODES, samples=1000, seed=0, run=run),
            traj,
        )
    gd = out / f"gd_epoch{e_last}.safetensors"
    cmd = out / f"cmd_epoch{e_last}.safetensors"
    step("export one epoch (GD)", lambda: pipeline.export(store, e_last, gd), lambda: gd.stat().st_size)
    step(
        "export one epoch (CMD reconstruction)",
        lambda: pipeline.export(store, e_last, cmd, analysis="lm"),
        lambda: cmd.stat().st_size,
    )
    info = step("info", lambda: pipeline.info(store))
    step("report", lambda: pipeline.report(store, "lm", out=out / "report.html"))
    purity = _purity(store, "lm", n_params)
    result = {
        "command": f"cmd-pipeline bench --scale {n:g} --epochs {epochs}",
        "n_params": n_params,
        "shape": {"d_model": shape.d_model, "n_layers": shape.n_layers, "ffn": shape.ffn,
                  "vocab": shape.vocab, "tensors": len(shape.tensors())},
        "epochs": epochs,
        "store_dtype": info["store_dtype"],
        "store_bytes": info["bytes_on_disk"],
        "dynamics_error": fit.summary.get("dynamics_error"),
        "n_modes": fit.n_modes,
        "mode_purity": purity,
        "steps": steps,
    }
    (out / "scale.json").write_text(json.dumps(result, indent=2))
    (out / "scale.md").write_text(_markdown(result))
    for p in (gd, cmd):
        p.unlink(missing_ok=True)
    if not keep:
        shutil.rmtree(store, ignore_errors=True)
    return result


def _markdown(r: dict[str, Any]) -> str:
    lines = [
        f"# Scale run: {r['n_params']:,} parameters x {r['epochs']} epochs ({r['store_dtype']})",
        "",
        f"`{r['command']}`; store {r['store_bytes'] / 1e9:.1f} GB; {r['n_modes']} modes, "
        f"error relative to the dynamics {r['dynamics_error']:.4f}, planted-mode purity "
        f"{r['mode_purity']:.4f} (sampled rows).",
        "",
        "| step | wall (s) | bytes (GB) | GB/s | peak RSS, largest process (GB) | peak RSS, all processes (GB) |",
        "|---|---|---|---|---|---|",
    ]
    for s in r["steps"]:
        b = f"{s['bytes'] / 1e9:.2f}" if s["bytes"] else "-"
        g = f"{s['gb_per_s']:.2f}" if s["gb_per_s"] else "-"
        lines.append(
            f"| {s['step']} | {s['seconds']:.1f} | {b} | {g} | {s['peak_rss_process_gb']:.2f} | "
            f"{s['peak_rss_tree_gb']:.2f} |"
        )
    return "\n".join(lines) + "\n"
