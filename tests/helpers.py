"""Factories shared by the tests: tiny training runs written as checkpoints in every format,
reference trajectories computed independently of the pipeline, and store snapshots.

Everything is generated at test time under ``tmp_path``; nothing is committed.
"""

from __future__ import annotations

import json
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
    """The committed trajectory of a store, read through the public API."""
    return np.asarray(pipeline.trajectory_dask(pipeline.open_store(str(store))).compute())


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

    root = zarr.open_group(str(store), mode="a")
    group = root.require_group("analyses").require_group(name)
    data = np.arange(12, dtype=np.float64).reshape(3, 4)
    arr = group.create_array("modes", shape=data.shape, dtype=data.dtype, chunks=(2, 2))
    arr[:] = data
    group.attrs["note"] = "written by a test"
    return data


def study_files(store: Path) -> dict[str, bytes]:
    return {k: v for k, v in snapshot(store).items() if k.startswith("analyses")}
