"""Schema 2's metadata arrays: the tensor table and the per-epoch entries of a store, written
and read beside the trajectory (layout in :mod:`pipeline.store.trajectory`), the consolidated
metadata, and the migration of schema 1 stores (:func:`upgrade_meta`).

Client side only; tasks never touch these arrays.
"""

from __future__ import annotations

import bisect
import json
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import zarr
import zarr.codecs
from zarr.core.sync import sync

from pipeline.errors import StoreError
from pipeline.store.schema import ATTR_KEY, InlineTensor, StoreMeta

__all__ = [
    "BUFFERS",
    "EPOCH",
    "META",
    "TENSOR",
    "TENSOR_ID",
    "consolidate",
    "open_root",
    "read_tables",
    "resize",
    "write_tables",
]

EPOCH = "epoch"
TENSOR = "tensor"
TENSOR_ID = "tensor_id"
META = "meta"
BUFFERS = "buffers"
#: the tensor table's columns (besides ``tensor``, the names)
TENSOR_COLUMNS = ("tensor_offset", "tensor_size", "tensor_shape", "tensor_dtype", "tensor_kind")
#: rows of a per-epoch array per chunk
EPOCH_CHUNK = 256
#: rows of ``tensor_id`` written per zarr call (16 MB of int32)
_ID_BATCH_ROWS = 1 << 22


def open_root(url: str, mode: Literal["r", "r+", "a"]) -> Any:
    """The root group, never through the consolidated metadata (which may be stale while an
    operation runs: it is rewritten at the end of each). Every store is Zarr v3 (schema 1
    too): no Zarr v2 documents are looked for (on object storage each is a request)."""
    return zarr.open_group(url, mode=mode, use_consolidated=False, zarr_format=3)


def consolidate(url: str) -> None:
    """Rewrite the consolidated metadata of a schema 2 store (what xarray opens from).

    Schema 1 stores are left unconsolidated: their root attributes hold every epoch.
    """
    root = open_root(url, "r+")
    raw = root.attrs.get(ATTR_KEY)
    if not isinstance(raw, dict) or raw.get("version") != 2:
        return
    with warnings.catch_warnings():
        # "Consolidated metadata is currently not part in the Zarr format 3 specification":
        # known, and what xarray reads
        warnings.simplefilter("ignore", UserWarning)
        zarr.consolidate_metadata(root.store)


def resize(array: Any, shape: tuple[int, ...]) -> None:
    """Set ``array``'s shape without deleting chunks outside it (pending columns live there)."""
    if tuple(array.shape) != tuple(shape):
        sync(array._async_array.resize(shape, delete_outside_chunks=False))


def _create(
    g: Any,
    name: str,
    shape: tuple[int, ...],
    chunks: tuple[int, ...],
    dtype: Any,
    dims: Sequence[str],
    fill_value: Any = None,
    compressed: bool = False,
) -> Any:
    kw: dict[str, Any] = {"overwrite": True}  # an array of that name goes, chunks and all
    if compressed:
        kw["compressors"] = zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")
    return g.create_array(
        name,
        shape=shape,
        chunks=tuple(max(1, c) for c in chunks),
        dtype=dtype,
        fill_value=fill_value,
        dimension_names=tuple(dims),
        **kw,
    )


def _strings(values: Sequence[str]) -> np.ndarray:
    return np.array(list(values), dtype=object) if values else np.array([], dtype=object)


# ---------------------------------------------------------------------- writing
def write_tables(root: Any, meta: StoreMeta, old: StoreMeta | None, chunk_rows: int) -> None:
    """Write the tensor table (when it changed) and the committed epochs' entries.

    Entries ``old`` already holds (a common prefix) are not rewritten; the arrays are then
    resized to the committed epochs, so a client never sees a pending one.
    """
    tables_ok = (
        old is not None
        and old.version == 2
        and old.tensors == meta.tensors
        and old.n_rows == meta.n_rows
        and TENSOR in root.array_keys()
    )
    if not tables_ok:
        _write_tensor_table(root, meta, chunk_rows)
        keep = 0
    else:
        assert old is not None
        keep = 0
        for a, b in zip(old.epochs, meta.epochs, strict=False):
            if a != b:
                break
            keep += 1
    _write_epochs(root, meta, keep, fresh=not tables_ok)


def _write_tensor_table(root: Any, meta: StoreMeta, chunk_rows: int) -> None:
    ts = meta.tensors
    n = len(ts)
    tab = {
        TENSOR: (_strings([t.name for t in ts]), str),
        "tensor_offset": (np.array([t.offset for t in ts], dtype=np.int64), "int64"),
        "tensor_size": (np.array([t.size for t in ts], dtype=np.int64), "int64"),
        "tensor_shape": (_strings([json.dumps(list(t.shape)) for t in ts]), str),
        "tensor_dtype": (_strings([t.dtype for t in ts]), str),
        "tensor_kind": (_strings([t.kind for t in ts]), str),
    }
    for name, (values, dtype) in tab.items():
        a = _create(
            root, name, (n,), (max(n, 1),), dtype, (TENSOR,), fill_value="" if dtype is str else 0
        )
        if n:
            a[:] = values
    rows = max(1, min(chunk_rows, meta.n_rows or 1))
    ids = _create(
        root,
        TENSOR_ID,
        (meta.n_rows,),
        (rows,),
        "int32",
        ("param",),
        fill_value=-1,
        compressed=True,
    )
    ids.attrs["description"] = "the index into `tensor` of each trajectory row"
    # a full chunk inside one tensor holds one value: its stored bytes are those of the first
    # such chunk of that tensor, shared (a hard link on a local store) instead of filled and
    # compressed again (16 MB each); the other chunks are written whole, a few at a time (one zarr call
    # per run of consecutive chunks up to a batch, not one per tensor: a model has thousands
    # of tensors, and each call waits on zarr's event loop)
    spans = sorted(
        (t.offset, t.offset + t.size, k) for k, t in enumerate(ts) if t.stored and t.size
    )
    starts = [lo for lo, _hi, _k in spans]
    first_of: dict[int, int] = {}  # tensor -> its first chunk of only its rows
    written: list[int] = []
    copies: list[tuple[int, int]] = []  # (chunk holding the bytes, chunk to store them as)
    for c, k in enumerate(_chunk_values(spans, meta.n_rows, rows)):
        if k == _NO_ROWS:
            continue  # only rows of no stored tensor: the fill value, not stored
        if k >= 0 and k in first_of:
            copies.append((first_of[k], c))
            continue
        if k >= 0:
            first_of[k] = c
        written.append(c)
    per_call = max(1, _ID_BATCH_ROWS // rows)
    buf = np.empty(min(per_call * rows, meta.n_rows), dtype=np.int32)  # one for every call
    for lo_c, hi_c in _runs(written, per_call):
        r0, r1 = lo_c * rows, min(hi_c * rows, meta.n_rows)
        part = buf[: r1 - r0]
        part.fill(-1)
        for s in range(max(0, bisect.bisect_right(starts, r0) - 1), len(spans)):
            lo, hi, k = spans[s]
            if lo >= r1:
                break
            if hi > r0:
                part[max(lo, r0) - r0 : min(hi, r1) - r0] = k
        ids[r0:r1] = part
    _copy_chunks(ids, copies)


#: :func:`_chunk_values`: a chunk holding no row of a stored tensor
_NO_ROWS = -2
#: :func:`_chunk_values`: a chunk holding several values (tensors, or a tensor and the fill)
_MIXED = -1


def _chunk_values(spans: Sequence[tuple[int, int, int]], n_rows: int, rows: int) -> list[int]:
    """Per chunk of ``rows`` rows (the last one may be shorter): the tensor whose rows fill it
    whole (a full-size chunk), :data:`_NO_ROWS` or :data:`_MIXED`. ``spans``: sorted,
    disjoint ``(first row, end row, tensor)``.

    >>> _chunk_values([(0, 10, 0), (10, 12, 1), (16, 30, 2)], 32, 4)
    [0, 0, -1, -2, 2, 2, 2, -1]
    """
    out: list[int] = []
    i = 0
    for c0 in range(0, n_rows, rows):
        c1 = min(c0 + rows, n_rows)
        while i < len(spans) and spans[i][1] <= c0:
            i += 1
        if i == len(spans) or spans[i][0] >= c1:
            out.append(_NO_ROWS)
        elif c1 - c0 == rows and spans[i][0] <= c0 and spans[i][1] >= c1:
            out.append(spans[i][2])
        else:
            out.append(_MIXED)
    return out


def _runs(chunks: Sequence[int], most: int) -> list[tuple[int, int]]:
    """Sorted chunk indices as ``[lo, hi)`` runs of consecutive ones, at most ``most`` each.

    >>> _runs([0, 1, 2, 5, 7, 8], 2)
    [(0, 2), (2, 3), (5, 6), (7, 9)]
    """
    out: list[tuple[int, int]] = []
    for c in chunks:
        if out and out[-1][1] == c and c - out[-1][0] < most:
            out[-1] = (out[-1][0], c + 1)
        else:
            out.append((c, c + 1))
    return out


def _copy_chunks(array: Any, pairs: Sequence[tuple[int, int]]) -> None:
    """Store the stored bytes of chunk ``src`` of the 1-D ``array`` as chunk ``dst`` too, for
    each ``(src, dst)`` (chunks of equal values: equal encoded bytes;
    :func:`pipeline.store.keys.copy_values`: hard links on a local store)."""
    from pipeline.store import keys

    sp = array.store_path

    def key(c: int) -> str:
        return f"{sp.path}/{array.metadata.encode_chunk_key((c,))}"

    keys.copy_values(sp.store, [(key(s), key(d)) for s, d in pairs])


def _inline_names(meta: StoreMeta) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, dtype, shape) of the inline buffers, the same for every epoch."""
    if not meta.epochs:
        return []
    first = [(t.name, t.dtype, t.shape) for t in meta.epochs[0].inline]
    for e in meta.epochs[1:]:
        if [(t.name, t.dtype, t.shape) for t in e.inline] != first:
            raise StoreError(f"epoch {e.epoch}: its integer buffers differ from epoch 0's")
    return first


def _write_epochs(root: Any, meta: StoreMeta, keep: int, *, fresh: bool) -> None:
    from pipeline.checkpoints.readers import RAW_NUMPY

    n_t = len(meta.tensors)
    t = len(meta.epochs)
    index = {x.name: k for k, x in enumerate(meta.tensors)}
    stored = [k for k, x in enumerate(meta.tensors) if x.stored]
    inline = _inline_names(meta)
    mg = root.require_group(META)
    if fresh or EPOCH not in root.array_keys():
        _create(root, EPOCH, (0,), (EPOCH_CHUNK,), "int64", (EPOCH,), fill_value=0)
        _create(mg, "sources", (0,), (EPOCH_CHUNK,), str, (EPOCH,), fill_value="")
        _create(mg, "nonfinite", (0, n_t), (EPOCH_CHUNK, n_t), "int64", (EPOCH, TENSOR), 0)
        _create(mg, "digest", (0, n_t), (EPOCH_CHUNK, n_t), str, (EPOCH, TENSOR), fill_value="")
        if BUFFERS in root.group_keys():
            from pipeline.store import keys

            keys.delete_dir(root.store, BUFFERS)
    bg = root.require_group(BUFFERS)
    present = set(bg.array_keys())
    for name, dtype, shape in inline:
        key = f"t{index[name]}"
        if key in present:
            continue
        if keep:
            raise StoreError(f"the integer buffer {name!r} is missing from the stored epochs")
        a = _create(
            bg,
            key,
            (0, *shape),
            (EPOCH_CHUNK, *shape),
            RAW_NUMPY[dtype],
            (EPOCH, *(f"{key}_{d}" for d in range(len(shape)))),
            fill_value=0,
        )
        a.attrs["tensor"] = name
    arrays = [root[EPOCH], mg["sources"], mg["nonfinite"], mg["digest"]]
    buf = {name: root[f"{BUFFERS}/t{index[name]}"] for name, _d, _s in inline}
    new = meta.epochs[keep:]
    for a in (*arrays, *buf.values()):
        resize(a, (t, *a.shape[1:]))
    if not new:
        return
    root[EPOCH][keep:] = np.array([e.epoch for e in new], dtype=np.int64)
    mg["sources"][keep:] = _strings([json.dumps([f.to_dict() for f in e.files]) for e in new])
    counts = np.zeros((len(new), n_t), dtype=np.int64)
    digests = np.full((len(new), n_t), "", dtype=object)
    for i, e in enumerate(new):
        for name, c in e.nonfinite_by_tensor:
            if name not in index:
                raise StoreError(f"epoch {e.epoch}: NaN/Inf count for unknown tensor {name!r}")
            counts[i, index[name]] = c
        if e.nonfinite != sum(c for _n, c in e.nonfinite_by_tensor):
            raise StoreError(f"epoch {e.epoch}: its NaN/Inf count is not the sum of its tensors'")
        for k, d in zip(stored, e.digests, strict=False):
            digests[i, k] = d
    if n_t:
        mg["nonfinite"][keep:] = counts
        mg["digest"][keep:] = digests
    for name, _dtype, shape in inline:
        values = np.stack(
            [
                np.frombuffer(x.to_bytes(), dtype=RAW_NUMPY[x.dtype].newbyteorder("<")).reshape(
                    shape
                )
                for e in new
                for x in e.inline
                if x.name == name
            ]
        )
        buf[name][keep:] = values


# ---------------------------------------------------------------------- reading
def read_tables(root: Any, attrs: dict[str, Any]) -> dict[str, Any]:
    """The full metadata dict (:meth:`StoreMeta.from_dict`) of a schema 2 store; a missing or
    malformed metadata array raises :class:`StoreError` (the dict's own fields are checked by
    ``from_dict``)."""
    try:
        return _read_tables(root, attrs)
    except StoreError:
        raise
    except (KeyError, ValueError, IndexError, TypeError, AttributeError) as e:
        what = "missing or bad" if isinstance(e, KeyError) else "malformed"
        raise StoreError(f"invalid store metadata: a metadata array is {what} ({e})") from e


def _read_tables(root: Any, attrs: dict[str, Any]) -> dict[str, Any]:
    from pipeline.checkpoints.readers import RAW_NUMPY

    n_e = attrs["n_epochs"]
    if not isinstance(n_e, int) or isinstance(n_e, bool) or n_e < 0:
        raise StoreError(f"invalid store metadata: n_epochs {n_e!r}")
    names = [str(x) for x in np.asarray(root[TENSOR][:])]
    cols = {c: np.asarray(root[c][:]) for c in TENSOR_COLUMNS}
    tensors = [
        {
            "name": names[k],
            "shape": json.loads(str(cols["tensor_shape"][k])),
            "dtype": str(cols["tensor_dtype"][k]),
            "kind": str(cols["tensor_kind"][k]),
            "offset": int(cols["tensor_offset"][k]),
        }
        for k in range(len(names))
    ]
    stored = [k for k, t in enumerate(tensors) if t["offset"] >= 0]
    epochs_arr = np.asarray(root[EPOCH][:n_e])
    mg = root[META]
    sources = np.asarray(mg["sources"][:n_e])
    counts = np.asarray(mg["nonfinite"][:n_e])
    digests = np.asarray(mg["digest"][:n_e])
    if len(epochs_arr) != n_e or len(sources) != n_e or len(counts) != n_e:
        raise StoreError(f"invalid store metadata: the epoch arrays hold fewer than {n_e} epochs")
    inline: list[tuple[str, str, np.ndarray]] = []
    if BUFFERS in root.group_keys():
        bg = root[BUFFERS]
        for key in sorted(bg.array_keys(), key=lambda s: int(s[1:])):
            k = int(key[1:])
            values = np.asarray(bg[key][:n_e])
            if len(values) != n_e:
                raise StoreError(f"invalid store metadata: buffers/{key} holds too few epochs")
            inline.append((names[k], tensors[k]["dtype"], values))
    epochs = []
    for i in range(n_e):
        nbt = {names[k]: int(c) for k, c in enumerate(counts[i]) if c}
        d = [str(digests[i, k]) for k in stored]
        epochs.append(
            {
                "epoch": int(epochs_arr[i]),
                "files": json.loads(str(sources[i])),
                "nonfinite": int(sum(nbt.values())),
                "nonfinite_by_tensor": dict(sorted(nbt.items())),
                "inline": [
                    InlineTensor.from_array(
                        name, dtype, values[i].astype(RAW_NUMPY[dtype])
                    ).to_dict()
                    for name, dtype, values in inline
                ],
                "digests": d if d and all(d) else [],
            }
        )
    return {**attrs, "tensors": tensors, "epochs": epochs}
