"""Factories shared by the tests: tiny training runs written as checkpoints in every format,
reference trajectories computed independently of the pipeline, and store snapshots.

Everything is generated at test time under ``tmp_path``; nothing is committed.
"""

from __future__ import annotations

import importlib.util
import json
import types
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

import pipeline

SYNC = pipeline.RuntimeOptions(mode="sync", progress=False)
THREADS = pipeline.RuntimeOptions(mode="threads", progress=False)

#: checkpoint layouts a run can be written in
FORMATS = ("pt", "pth", "safetensors", "sharded")
DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
#: state_dict order of :class:`Net`
NET_KEYS = (
    "conv.weight",
    "conv.bias",
    "bn.weight",
    "bn.bias",
    "bn.running_mean",
    "bn.running_var",
    "bn.num_batches_tracked",
    "fc.weight",
    "fc.bias",
)
NET_PARAMETERS = ("conv.weight", "conv.bias", "bn.weight", "bn.bias", "fc.weight", "fc.bias")
NET_SHAPES = {
    "conv.weight": (3, 2, 3, 3),
    "conv.bias": (3,),
    "bn.weight": (3,),
    "bn.bias": (3,),
    "bn.running_mean": (3,),
    "bn.running_var": (3,),
    "bn.num_batches_tracked": (),
    "fc.weight": (5, 12),
    "fc.bias": (5,),
}
#: rows of the trajectory of a Net with every floating tensor stored
NET_ROWS = 54 + 3 + 3 + 3 + 3 + 3 + 60 + 5


class Net(nn.Module):
    """Conv + BatchNorm + Linear: parameters, float buffers and the int64 num_batches_tracked."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(self.conv(x)).flatten(1))


def net_state_dicts(
    n_epochs: int, dtype: str = "float32", seed: int = 0
) -> list[OrderedDict[str, torch.Tensor]]:
    """State dicts of a Net "trained" for ``n_epochs`` epochs (deterministic perturbations).

    Floating tensors (parameters and BatchNorm statistics) are cast to ``dtype``;
    ``bn.num_batches_tracked`` stays int64 and grows every epoch.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = Net().to(DTYPES[dtype])
    out = []
    with torch.no_grad():
        for _ in range(n_epochs):
            for t in net.state_dict().values():
                if t.is_floating_point():
                    step = torch.randn(t.shape, generator=gen, dtype=torch.float64)
                    t.add_((0.1 * step).to(t.dtype))
                else:
                    t.add_(17)
            out.append(OrderedDict((k, v.clone()) for k, v in net.state_dict().items()))
    return out


def save_checkpoint(
    root: Path, epoch: int, sd: Mapping[str, Any], fmt: str, *, wrapper: str = "plain"
) -> Path:
    """Write one epoch's checkpoint under ``root`` and return the path to give ``ingest``.

    ``fmt``: ``pt``/``pth`` (torch zip, optionally wrapped: ``wrapper`` is ``plain``,
    ``state_dict`` for ``{"state_dict": sd}`` or ``model`` for ``{"model": sd, "epoch": e}``),
    ``safetensors`` (one file) or ``sharded`` (a ``checkpoint-<epoch>/`` directory holding
    ``model.safetensors.index.json`` and up to three shards, built by hand).
    """
    root.mkdir(parents=True, exist_ok=True)
    if fmt in ("pt", "pth"):
        path = root / f"epoch_{epoch}.{fmt}"
        obj: Any = dict(sd)
        if wrapper == "state_dict":
            obj = {"state_dict": dict(sd)}
        elif wrapper == "model":
            obj = {"model": dict(sd), "epoch": epoch}
        else:
            assert wrapper == "plain", wrapper
        torch.save(obj, path)
        return path
    assert wrapper == "plain", "wrappers only exist for .pt files"
    tensors = {k: v.contiguous() for k, v in sd.items()}
    if fmt == "safetensors":
        path = root / f"epoch_{epoch}.safetensors"
        save_file(tensors, str(path))
        return path
    assert fmt == "sharded", fmt
    d = root / f"checkpoint-{epoch}"
    d.mkdir()
    names = list(tensors)
    n_shards = min(3, len(names))
    groups = [names[i::n_shards] for i in range(n_shards)]
    weight_map: dict[str, str] = {}
    for i, group in enumerate(groups):
        shard = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file({k: tensors[k] for k in group}, str(d / shard), metadata={"format": "pt"})
        for k in group:
            weight_map[k] = shard
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {
        "metadata": {"total_size": total},
        "weight_map": {k: weight_map[k] for k in names},  # the state_dict order
    }
    (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return d


def write_run(
    root: Path,
    sds: Sequence[Mapping[str, Any]],
    fmt: str = "pt",
    *,
    first_epoch: int = 0,
    wrapper: str = "plain",
) -> list[Path]:
    """Write ``sds`` as epochs ``first_epoch, first_epoch+1, ...``; return their paths."""
    return [
        save_checkpoint(root, first_epoch + i, sd, fmt, wrapper=wrapper) for i, sd in enumerate(sds)
    ]


@dataclass
class Run:
    """A run of checkpoints on disk: its directory, its state dicts and their paths."""

    root: Path
    sds: list[OrderedDict[str, torch.Tensor]]
    paths: list[Path]


# --------------------------------------------------------------------------- references
def raw_bits(t: torch.Tensor) -> np.ndarray:
    """The tensor's bytes, flattened in C order (for bit-for-bit comparisons, NaN included)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().copy()


def as_float32(t: torch.Tensor) -> np.ndarray:
    """What the trajectory must hold for a tensor: flattened (C order) float32.

    Computed without the pipeline's readers: bf16 is upcast by shifting its bits left by 16,
    fp16 by numpy's exact conversion, float64 is rounded to the nearest float32.
    """
    flat = t.detach().contiguous().reshape(-1)
    if t.dtype == torch.bfloat16:
        bits = flat.view(torch.int16).numpy().view(np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32)
    if t.dtype == torch.float64:
        with np.errstate(over="ignore"):
            return flat.numpy().astype(np.float32)
    return flat.numpy().astype(np.float32)


def checkpoint_order(path: Path, sd: Mapping[str, Any]) -> list[str]:
    """The order in which a checkpoint file lists its tensors: the dict's order for .pt,
    the JSON header's order for .safetensors (the library writes them by alignment, then
    name), the index's ``weight_map`` order for a sharded directory."""
    if path.is_dir():
        index = json.loads((path / "model.safetensors.index.json").read_text())
        return list(index["weight_map"])
    if path.suffix == ".safetensors":
        return safetensors_keys(path)
    return list(sd)


def expected_trajectory(
    sds: Sequence[Mapping[str, torch.Tensor]],
    stored: Sequence[str] | None = None,
    order: Sequence[str] | None = None,
) -> np.ndarray:
    """(N, T) float32, one column per state dict: the ``stored`` tensors (default: every
    floating one) in ``order`` (default: the first state dict's order)."""
    names = [
        k
        for k in (order if order is not None else list(sds[0]))
        if sds[0][k].is_floating_point() and (stored is None or k in stored)
    ]
    cols = [np.concatenate([as_float32(sd[k]) for k in names]) for sd in sds]
    return np.stack(cols, axis=1)


def read_trajectory(store: Path | str) -> np.ndarray:
    """The committed trajectory of a store, read through the public API, as float32 (16-bit
    stores upcast exactly)."""
    arr = np.asarray(pipeline.trajectory_dask(pipeline.open_store(str(store))).compute())
    return arr if arr.dtype == np.float32 else arr.astype(np.float32)


def assert_same_bits(got: np.ndarray, want: np.ndarray) -> None:
    """float32 arrays equal bit for bit (NaN payloads, -0.0 and all)."""
    assert got.shape == want.shape, (got.shape, want.shape)
    assert got.dtype == np.float32 and want.dtype == np.float32
    g, w = got.view(np.uint32), want.view(np.uint32)
    if not np.array_equal(g, w):
        bad = np.argwhere(g != w)
        i = tuple(bad[0])
        raise AssertionError(
            f"{len(bad)} value(s) differ; first at {i}: got {g[i]:#010x}, want {w[i]:#010x}"
        )


def assert_state_dict_equal(
    got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor], *, ordered: bool = True
) -> None:
    """Same keys (in the same order unless ``ordered`` is false), dtypes, shapes and bytes.

    (``safetensors.torch.load_file`` returns keys sorted: check its order with
    :func:`safetensors_keys`.)
    """
    assert (list(got) if ordered else sorted(got)) == (list(want) if ordered else sorted(want))
    for k, w in want.items():
        g = got[k]
        assert g.dtype == w.dtype, (k, g.dtype, w.dtype)
        assert tuple(g.shape) == tuple(w.shape), (k, g.shape, w.shape)
        assert np.array_equal(raw_bits(g), raw_bits(w)), k
        if not (w.is_floating_point() and torch.isnan(w).any()):
            assert torch.equal(g, w), k


def safetensors_keys(path: Path) -> list[str]:
    """Tensor names in the order of a safetensors file's JSON header."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return [k for k in header if k != "__metadata__"]


def load_export(path: Path) -> dict[str, torch.Tensor]:
    """An exported checkpoint as a dict, keys in the file's order (either format)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        return {k: tensors[k] for k in safetensors_keys(path)}
    return torch.load(path, weights_only=True)


# --------------------------------------------------------------------------- stores
def snapshot(store: Path) -> dict[str, bytes]:
    """Every file under ``store``: relative path -> bytes."""
    return {
        str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()
    }


def snapshot_mtimes(store: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``store``: relative path -> (bytes, mtime in ns)."""
    return {
        str(p.relative_to(store)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(store.rglob("*"))
        if p.is_file()
    }


def assert_no_trajectory(store: Path) -> None:
    """A store that an ingest gave up on: no trajectory array and no committed metadata."""
    assert not (store / "trajectory").exists()
    try:
        pipeline.open_store(str(store))
    except pipeline.StoreError:
        pass
    else:
        raise AssertionError(f"{store} still opens as a trajectory store")


def add_study(store: Path, name: str = "study1") -> np.ndarray:
    """Create ``analyses/<name>`` with one array, with zarr directly (as a later stage would)."""
    import zarr

    root = zarr.open_group(str(store), mode="a", use_consolidated=False)
    group = root.require_group("analyses").require_group(name)
    data = np.arange(12, dtype=np.float64).reshape(3, 4)
    arr = group.create_array("modes", shape=data.shape, dtype=data.dtype, chunks=(2, 2))
    arr[:] = data
    group.attrs["note"] = "written by a test"
    return data


def study_files(store: Path) -> dict[str, bytes]:
    return {k: v for k, v in snapshot(store).items() if k.startswith("analyses")}


# --------------------------------------------------------------------------- CMD: a dense reference
#: result flags (the documented bits of analyses/NAME/flags)
F_CONSTANT, F_NONFINITE, F_REFERENCE, F_SAMPLED = 1, 2, 4, 8
#: the per-row result arrays of an analysis (version 2, the default: no diagnostics)
PER_ROW_ARRAYS = ("mode", "a", "level", "anchor", "flags")
#: ... with ``diagnostics=True``
DIAGNOSTIC_ARRAYS = ("corr", "residual")
#: the per-row result arrays of a version-1 study (float64 a and b)
PER_ROW_ARRAYS_V1 = ("mode", "a", "b", "corr", "residual", "flags")


def stored_model(got: Mapping[str, Any]) -> np.ndarray:
    """The (N, Tw) float64 model of a study read by :func:`read_analysis`, from its stored
    arrays by the documented formulas (README, *A study*): ``level + a (r(t) - r(anchor))``
    (version 2), or ``a r(t) + b`` (version 1)."""
    r = np.asarray(got["refs"], dtype=np.float64)[got["mode"].astype(np.int64)]
    a = got["a"].astype(np.float64)[:, None]
    if "level" not in got:
        return a * r + got["b"].astype(np.float64)[:, None]
    at = got["anchor"].astype(np.int64)
    r0 = r[np.arange(r.shape[0]), at][:, None]
    return got["level"].astype(np.float64)[:, None] + a * (r - r0)


def intercept(got: Mapping[str, Any]) -> np.ndarray:
    """The intercept b of ``a r + b`` of every row of a study (float64; the stored ``b`` of a
    version-1 study, else ``level - a r(anchor)``)."""
    if "level" not in got:
        return np.asarray(got["b"], dtype=np.float64)
    r = np.asarray(got["refs"], dtype=np.float64)[got["mode"].astype(np.int64)]
    r0 = r[np.arange(r.shape[0]), got["anchor"].astype(np.int64)]
    return got["level"].astype(np.float64) - got["a"].astype(np.float64) * r0


def ulp_distance(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """How many float32 values apart ``x`` and ``y`` (float32 arrays) are: 0 when equal, 1 for
    neighbours (across zero too: -0 and +0 are one value); NaN against NaN counts 0."""
    def ordered(v: np.ndarray) -> np.ndarray:
        i = np.ascontiguousarray(v, dtype=np.float32).view(np.int32).astype(np.int64)
        return np.where(i < 0, -(i & 0x7FFFFFFF), i)

    both_nan = np.isnan(x) & np.isnan(y)
    return np.where(both_nan, 0, np.abs(ordered(x) - ordered(y)))


@dataclass
class DenseCMD:
    """The paper's algorithm computed densely in float64 from the whole window ``W`` (N, Tw)."""

    sample_index: np.ndarray  # (K,) rows sampled (given, not drawn)
    sample_corr: np.ndarray  # (K, K) Pearson correlation of the samples
    labels: np.ndarray  # (K,) mode of each sample, 0 = largest
    ref_index: np.ndarray  # (M,) rows of the references
    refs: np.ndarray  # (M, Tw) float64 reference profiles
    corr_all: np.ndarray  # (N, M) correlation of every row with every reference
    mode: np.ndarray
    a: np.ndarray
    b: np.ndarray
    corr: np.ndarray
    residual: np.ndarray
    flags: np.ndarray
    recon: np.ndarray  # (N, Tw) float64: a * r_mode + b

    @property
    def n_modes(self) -> int:
        return int(self.ref_index.size)


def _pearson_dense(x: np.ndarray) -> np.ndarray:
    """Pearson correlation of every pair of rows, straight from the definition (float64)."""
    k = x.shape[0]
    c = np.empty((k, k))
    xc = [row - row.mean() for row in x]
    norm = [np.sqrt(np.dot(v, v)) for v in xc]
    for i in range(k):
        for j in range(i, k):
            c[i, j] = c[j, i] = np.dot(xc[i], xc[j]) / (norm[i] * norm[j])
    return c


def _complete_linkage(d: np.ndarray) -> list[tuple[float, list[list[int]]]]:
    """Agglomerative clustering by complete linkage, by brute force from its definition.

    Starting from singletons, repeatedly merge the two clusters whose *largest* pairwise
    distance is smallest. Returns, after every merge, ``(merge height, partition)``; partitions
    list clusters as sorted sample positions. The distance between two clusters is kept as
    the maximum over their members' pairs (max of maxes when clusters merge, which is the
    same number as the maximum over all pairs of the union).
    """
    clusters: list[list[int]] = [[i] for i in range(d.shape[0])]
    between = d.astype(np.float64).copy()
    np.fill_diagonal(between, np.inf)
    states: list[tuple[float, list[list[int]]]] = []
    while len(clusters) > 1:
        flat = int(np.argmin(between))
        i, j = divmod(flat, between.shape[0])
        i, j = min(i, j), max(i, j)
        height = float(between[i, j])
        merged = np.maximum(between[i], between[j])
        between[i, :] = merged
        between[:, i] = merged
        between[i, i] = np.inf
        between = np.delete(np.delete(between, j, axis=0), j, axis=1)
        clusters[i] = sorted(clusters[i] + clusters[j])
        del clusters[j]
        states.append((height, [list(c) for c in clusters]))
    return states


def _flat_clusters(
    k: int, d: np.ndarray, modes: int | None, threshold: float | None
) -> list[list[int]]:
    """The paper's cut of the complete-linkage tree: clusters whose in-cluster (cophenetic)
    distance is at most a threshold, either given, or the smallest one that leaves at most
    ``modes`` clusters."""
    states = [(0.0, [[i] for i in range(k)]), *_complete_linkage(d)]

    def at(r: float) -> list[list[int]]:
        part = states[0][1]
        for height, p in states[1:]:
            if height <= r:
                part = p
        return part

    if threshold is not None:
        return at(threshold)
    assert modes is not None
    for r in sorted({h for h, _p in states}):
        part = at(r)
        if len(part) <= modes:
            return part
    raise AssertionError("unreachable: one cluster at the root")


def dense_cmd(
    w: np.ndarray,
    sample_index: np.ndarray,
    *,
    modes: int | None = None,
    threshold: float | None = None,
) -> DenseCMD:
    """CMD of the window ``w`` (N, Tw) with the given samples, written from the paper's text
    (no scipy, no code shared with the pipeline; brute force, so for small K only).

    Pearson correlation of the samples (centred float64); complete linkage on the distance
    1 - |corr| (rounded to 12 decimals, the documented tie rule), cut at ``threshold`` or at
    the smallest height that leaves at most ``modes`` clusters; modes numbered by size
    (ties: lowest sample position first); the reference of a mode is the member with the
    largest summed |corr| to the other members (scores within a relative 1e-12 of the best
    tie; the lowest row index wins). Then for every row: correlation with every reference,
    mode = argmax |corr| (ties: lowest id), least-squares a and b, residual |w - a r - b|^2
    from the raw values. Constant rows: a = 0, b = value; reference rows: a = 1, b = 0; rows
    with NaN/Inf: a = 0, b = NaN, residual 0.
    """
    x = np.asarray(w, dtype=np.float64)
    n = x.shape[0]
    sample_index = np.asarray(sample_index, dtype=np.int64)
    assert np.all(np.diff(sample_index) > 0), "samples are sorted by row index"
    prof = x[sample_index]
    c = _pearson_dense(prof)
    k = len(sample_index)
    d = np.round(np.clip(1.0 - np.abs(c), 0.0, 1.0), 12)
    np.fill_diagonal(d, 0.0)
    part = _flat_clusters(k, d, modes, threshold)
    part.sort(key=lambda members: (-len(members), members[0]))
    n_modes = len(part)
    labels = np.empty(k, dtype=np.int64)
    for m, members in enumerate(part):
        labels[members] = m
    ref_pos = np.empty(n_modes, dtype=np.int64)
    absc = np.abs(c)
    for m, members in enumerate(part):
        score = [sum(absc[i, j] for j in members if j != i) for i in members]
        best = max(score)
        ref_pos[m] = min(
            i for i, s_i in zip(members, score, strict=True) if s_i >= best - 1e-12 * abs(best)
        )
    ref_index = sample_index[ref_pos]
    refs = x[ref_index]

    finite = np.isfinite(x).all(axis=1)
    xf = np.where(finite[:, None], x, 0.0)
    mean = xf.mean(axis=1)
    xc = xf - mean[:, None]
    ssx = (xc * xc).sum(axis=1)
    rmean = refs.mean(axis=1)
    rc = refs - rmean[:, None]
    ssr = (rc * rc).sum(axis=1)
    cov = xc @ rc.T
    with np.errstate(invalid="ignore", divide="ignore"):
        corr_all = np.where(ssx[:, None] > 0, cov / np.sqrt(np.outer(ssx, ssr)), 0.0)
    mode = np.argmax(np.abs(corr_all), axis=1)
    rows = np.arange(n)
    a = cov[rows, mode] / ssr[mode]
    b = mean - a * rmean[mode]
    corr = corr_all[rows, mode]
    constant = finite & (ssx == 0)
    flags = np.zeros(n, dtype=np.uint8)
    flags[constant] |= F_CONSTANT
    flags[~finite] |= F_NONFINITE
    flags[sample_index] |= F_SAMPLED
    a[constant | ~finite] = 0.0
    b[constant] = mean[constant]
    b[~finite] = np.nan
    corr[constant | ~finite] = 0.0
    mode[ref_index] = np.arange(n_modes)
    a[ref_index] = 1.0
    b[ref_index] = 0.0
    corr[ref_index] = 1.0
    flags[ref_index] |= F_REFERENCE
    recon = a[:, None] * refs[mode] + b[:, None]
    with np.errstate(invalid="ignore"):
        residual = np.where(finite, ((x - recon) ** 2).sum(axis=1), 0.0)
    return DenseCMD(
        sample_index, c, labels, ref_index, refs, corr_all, mode, a, b, corr, residual, flags,
        recon,
    )


def read_analysis(store: Path | str, name: str) -> dict[str, Any]:
    """Every array of ``analyses/<name>`` as numpy (``attrs`` holds the analysis attribute)."""
    import zarr

    g = zarr.open_group(str(store), mode="r", use_consolidated=False)[f"analyses/{name}"]
    out: dict[str, Any] = {k: np.asarray(g[k][...]) for k in g.array_keys()}
    out["attrs"] = dict(g.attrs)["cmd_pipeline_analysis"]
    return out


def window_of(store: Path | str, name: str) -> np.ndarray:
    """The stored trajectory (float32) at the analysis's window's columns."""
    st = pipeline.open_store(str(store))
    w = read_trajectory(store)
    epochs = read_analysis(store, name)["epochs"]
    return w[:, [st.meta.column_of(int(e)) for e in epochs]]  # type: ignore[union-attr]


def assert_matches_dense(got: Mapping[str, Any], dense: DenseCMD, w: np.ndarray) -> None:
    """The pipeline's results equal the dense float64 reference to float32 rounding.

    Integers (modes, indices, flags) must be equal (a mode may differ only where the two best
    |corr| tie to 1e-9); ``refs`` are the stored rows bit for bit. The stored model, rounded
    to float32, is within 1 float32 ulp of the reference's ``a r + b`` rounded to float32 at
    every value of every row whose fitted values keep one sign over the window, and within 3
    where they cross zero (the bound of the anchored float32 form). ``a`` is the float32
    rounding of the reference's a, or one float32 step from it (to 1e-9 of its natural
    scale); in a version-1 study ``a``
    and ``b`` (float64) agree to 1e-9 of their natural scale. When stored (diagnostics),
    ``corr`` (float32) agrees to two float32 ulps of 1, ``residual`` (float32) to 1e-6
    relative, plus 1e-12 of |w - mean w|^2: ALGORITHM.md's closed form
    |w - mean w|^2 (1 - corr^2) is exact to rounding of |w - mean w|^2 only, which matters
    for rows fitted to 1e-6 or better.
    """
    x = np.asarray(w, dtype=np.float64)
    assert np.array_equal(got["sample_index"], dense.sample_index)
    assert got["ref_index"].dtype == np.int64 and got["sample_index"].dtype == np.int64
    assert np.array_equal(got["ref_index"], dense.ref_index), (got["ref_index"], dense.ref_index)
    assert np.array_equal(got["sample_mode"], dense.labels)
    assert got["refs"].dtype == np.float64
    assert np.array_equal(got["refs"], dense.refs)
    mode = got["mode"].astype(np.int64)
    bad = np.flatnonzero(mode != dense.mode)
    if bad.size:
        top = np.sort(np.abs(dense.corr_all[bad]), axis=1)
        assert np.all(top[:, -1] - top[:, -2] < 1e-9), f"{bad.size} modes differ, e.g. row {bad[0]}"
    assert np.array_equal(got["flags"], dense.flags), np.flatnonzero(got["flags"] != dense.flags)
    finite = (dense.flags & F_NONFINITE) == 0
    xf = np.where(finite[:, None], x, 0.0)
    mean = xf.mean(axis=1)
    ssx = ((xf - mean[:, None]) ** 2).sum(axis=1)
    rr = dense.refs[dense.mode]
    rc = rr - rr.mean(axis=1, keepdims=True)
    ssr = (rc * rc).sum(axis=1)
    scale_a = np.sqrt(ssx / ssr)
    scale_b = np.abs(mean) + scale_a * np.abs(rr.mean(axis=1))
    ok = mode == dense.mode
    fb = ok & finite
    if "level" in got:  # version 2: the anchored float32 model
        assert got["a"].dtype == np.float32 and got["level"].dtype == np.float32
        a32 = np.abs(got["a"].astype(np.float64) - dense.a)
        # the nearest float32, or one step from it (stored_coefficients' choice): 1.5 ulps
        assert np.all(a32[ok] <= 2.0**-22 * np.abs(dense.a[ok]) + 1e-9 * scale_a[ok])
        assert np.array_equal(np.isnan(got["level"]), np.isnan(dense.b))
        model = stored_model(got).astype(np.float32)
        want = dense.recon.astype(np.float32)
        crossing = (np.min(dense.recon, axis=1) < 0) & (np.max(dense.recon, axis=1) > 0)
        far = ulp_distance(model, want).max(axis=1)
        assert np.all(far[fb & ~crossing] <= 1), np.flatnonzero(fb & ~crossing & (far > 1))
        assert np.all(far[fb & crossing] <= 3), np.flatnonzero(fb & crossing & (far > 3))
    else:  # version 1: float64 a and b
        assert np.all(np.abs(got["a"] - dense.a)[ok] <= 1e-9 * scale_a[ok] + 1e-12 * np.abs(dense.a[ok]))
        assert np.array_equal(np.isnan(got["b"]), np.isnan(dense.b))
        assert np.all(np.abs(got["b"] - dense.b)[fb] <= 1e-9 * scale_b[fb])
    if "corr" not in got:
        assert "residual" not in got
        return
    assert got["corr"].dtype == np.float32 and got["residual"].dtype == np.float32
    assert np.all(np.abs(got["corr"].astype(np.float64) - dense.corr)[ok] <= 2 * 2.0**-23)
    res = got["residual"].astype(np.float64)
    tol = 1e-6 * dense.residual + 1e-12 * ssx
    assert np.all(np.abs(res - dense.residual)[ok] <= tol[ok])


def dense_summary(
    w: np.ndarray, dense: DenseCMD, layers: Sequence[tuple[str, int, int]]
) -> dict[str, Any]:
    """Relative Frobenius errors over the finite rows: ``relative_error`` = ||W - What|| / ||W||
    and ``dynamics_error`` = ||W - What|| / ||W - mean_t W|| (each row centred over the
    window), overall, per mode, per layer (``(name, first row, stop row)``) and per epoch,
    and mean |corr| per mode."""
    x = np.asarray(w, dtype=np.float64)
    finite = (dense.flags & F_NONFINITE) == 0
    valid = finite & ((dense.flags & F_CONSTANT) == 0)
    xf = np.where(finite[:, None], x, 0.0)
    err = np.where(finite[:, None], x - dense.recon, 0.0) ** 2
    en = xf**2
    spread = (xf - xf.mean(axis=1, keepdims=True)) ** 2

    def rel(rows: np.ndarray, den_of: np.ndarray = en) -> float | None:
        den = den_of[rows].sum()
        return float(np.sqrt(err[rows].sum() / den)) if den > 0 else None

    def mac(rows: np.ndarray) -> float | None:
        v = rows & valid
        return float(np.abs(dense.corr[v]).mean()) if v.any() else None

    def both(rows: np.ndarray) -> dict[str, float | None]:
        return {"relative_error": rel(rows), "dynamics_error": rel(rows, spread)}

    every = np.ones(x.shape[0], dtype=bool)
    per_mode = []
    for m in range(dense.n_modes):
        rows = dense.mode == m
        per_mode.append({"count": int(rows.sum()), **both(rows), "mean_abs_corr": mac(rows)})
    per_layer = []
    for name, lo, hi in layers:
        rows = np.zeros(x.shape[0], dtype=bool)
        rows[lo:hi] = True
        per_layer.append({"name": name, "count": hi - lo, **both(rows), "mean_abs_corr": mac(rows)})
    with np.errstate(invalid="ignore", divide="ignore"):
        per_epoch = np.sqrt(err.sum(axis=0) / en.sum(axis=0))
        per_epoch_dyn = np.sqrt(err.sum(axis=0) / spread.sum(axis=0))
    n_finite = int(finite.sum())
    return {
        **both(every),
        "mse": float(err.sum() / (n_finite * x.shape[1])) if n_finite else None,
        "epoch_mse": (err.sum(axis=0) / n_finite).tolist() if n_finite else None,
        "modes": per_mode,
        "layers": per_layer,
        "epochs": per_epoch.tolist(),
        "epochs_dynamics": per_epoch_dyn.tolist(),
        "constant": int(((dense.flags & F_CONSTANT) != 0).sum()),
        "nonfinite": int((~finite).sum()),
    }


def store_layers(store: Path | str) -> list[tuple[str, int, int]]:
    """``(tensor name, first row, stop row)`` of every stored tensor, in row order."""
    meta = pipeline.open_store(str(store)).meta
    assert meta is not None
    return [(t.name, t.offset, t.offset + t.size) for t in meta.stored_tensors()]


# --------------------------------------------------------------------------- CMD: trajectories
def mode_profiles(t_steps: int, kinds: Sequence[str] = ("exp", "sigmoid", "sin", "cos")) -> np.ndarray:
    """(M, T) smooth, clearly distinct time profiles (pairwise |corr| < 0.85 for the default four)."""
    t = np.linspace(0.0, 1.0, t_steps)
    table = {
        "exp": np.exp(-8 * t),
        "sigmoid": 1 / (1 + np.exp(-(t - 0.6) * 25)),
        "sin": np.sin(2 * np.pi * t),
        "cos": np.cos(3 * np.pi * t),
        "linear": t,
    }
    return np.stack([table[k] for k in kinds])


@dataclass
class Planted:
    """A planted CMD model: per row its mode, a, b; ``clean`` = a * P[mode] + b (float64)."""

    profiles: np.ndarray  # (M, T)
    mode: np.ndarray  # (N,)
    a: np.ndarray
    b: np.ndarray
    clean: np.ndarray  # (N, T)
    noisy: np.ndarray  # (N, T) float64, before casting to the tensor's dtype


def planted_rows(
    n: int,
    profiles: np.ndarray,
    rng: np.random.Generator,
    *,
    noise: float = 1e-4,
    a_range: tuple[float, float] = (0.2, 2.0),
    b_scale: float = 1.0,
    modes: np.ndarray | None = None,
) -> Planted:
    """``n`` rows following ``a * P[mode](t) + b`` (a of both signs) plus Gaussian noise of
    ``noise`` times |a| (per value)."""
    m = rng.integers(profiles.shape[0], size=n) if modes is None else np.asarray(modes)
    a = rng.uniform(*a_range, size=n) * rng.choice([-1.0, 1.0], size=n)
    b = b_scale * rng.standard_normal(n)
    clean = a[:, None] * profiles[m] + b[:, None]
    noisy = clean + noise * np.abs(a)[:, None] * rng.standard_normal(clean.shape)
    return Planted(profiles, m, a, b, clean, noisy)


def rows_to_state_dicts(
    tensors: Mapping[str, tuple[tuple[int, ...], torch.dtype, np.ndarray]],
    extra: Mapping[str, torch.Tensor] | None = None,
) -> list[OrderedDict[str, torch.Tensor]]:
    """State dicts per epoch from ``name -> (shape, dtype, rows (numel, T) float64)``;
    ``extra`` tensors (e.g. an int64 buffer) are added unchanged to every epoch."""
    t_steps = next(iter(tensors.values()))[2].shape[1]
    out = []
    for e in range(t_steps):
        sd: OrderedDict[str, torch.Tensor] = OrderedDict()
        for name, (shape, dtype, rows) in tensors.items():
            sd[name] = torch.from_numpy(np.ascontiguousarray(rows[:, e])).to(dtype).reshape(shape)
        for name, t in (extra or {}).items():
            sd[name] = t.clone()
        out.append(sd)
    return out


def modal_state_dicts(
    t_steps: int, *, seed: int = 0, noise: float = 0.05
) -> list[OrderedDict[str, torch.Tensor]]:
    """A small model (about 3,400 rows) whose weights follow 4 modes with visible noise, in
    float32, bfloat16, float16 and float64, plus LayerNorm-like weights near 1.0 moving by
    1e-4, a frozen (constant) tensor and an int64 buffer."""
    rng = np.random.default_rng(seed)
    p = mode_profiles(t_steps)

    def rows(n: int, scale: float = 1.0) -> np.ndarray:
        return planted_rows(n, p, rng, noise=noise, b_scale=scale).noisy

    near_one = 1.0 + 1e-4 * planted_rows(64, p, rng, noise=0.02, b_scale=0.3).noisy
    frozen = np.repeat(rng.standard_normal((16, 1)), t_steps, axis=1)
    spec = {
        "enc.weight": ((40, 50), torch.float32, rows(2000)),
        "enc.bias": ((50,), torch.bfloat16, rows(50)),
        "dec.weight": ((30, 40), torch.float16, rows(1200)),
        "norm.weight": ((64,), torch.float32, near_one),
        "frozen.weight": ((4, 4), torch.float32, frozen),
        "head.bias": ((10,), torch.float64, rows(10, 0.1)),
    }
    return rows_to_state_dicts(spec, {"steps.num_batches_tracked": torch.tensor(7)})


def write_safetensors_run(root: Path, sds: Sequence[Mapping[str, torch.Tensor]]) -> list[Path]:
    """``sds`` as ``root/epoch_<e>.safetensors`` for e = 0, 1, ..."""
    return write_run(root, sds, "safetensors")


def load_script(path: Path) -> types.ModuleType:
    """A script that is not part of the package (``benchmarks/*.py``), loaded as a module."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
