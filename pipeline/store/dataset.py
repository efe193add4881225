"""A store as a lazy, labelled :class:`xarray.Dataset` (:func:`open_dataset`).

xarray reads the store directly too (``xr.open_zarr(store)``, ``xr.open_datatree(store)``):
every array has Zarr v3 ``dimension_names`` and the root holds the coordinates. This function
adds what a plain open cannot: each row's tensor name, the study's window as a coordinate, the
schema check, and bfloat16 registered before anything is read.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from pipeline.errors import StoreError
from pipeline.store.analysis import complete_study
from pipeline.store.schema import SCHEMA_VERSION
from pipeline.store.trajectory import ANALYSES, TrajectoryStore

__all__ = ["open_dataset"]

#: study arrays that are bookkeeping, not results (left out of the dataset)
_INTERNAL = ("block_stats",)


def open_dataset(store: str | os.PathLike[str], analysis: str | None = None) -> Any:
    """The trajectory (and a study's results) as a lazy, dask-backed :class:`xarray.Dataset`.

    Parameters
    ----------
    store
        Path or URL of the store.
    analysis
        A complete study's name: its results (``mode``, ``a``, ``level``, ``anchor``,
        ``flags``, ``refs``, ...; ``corr`` and ``residual`` when fitted with diagnostics; ``b``
        instead of ``level`` and ``anchor`` in a version-1 study; ``reconstructed`` when
        written) join the dataset, with the
        window's epochs as the ``window`` coordinate and the study's attributes under
        ``attrs["analysis"]``.

    Returns
    -------
    xarray.Dataset
        ``trajectory`` (param, epoch) with coordinates ``epoch`` (epoch numbers), ``tensor_id``
        and ``tensor_name`` (per row), and the tensor table along ``tensor``. Nothing is read
        until computed; the dask chunks are the store's chunks. Only committed epochs appear.
    """
    import xarray as xr

    st = TrajectoryStore.open(store)
    meta = st.require_meta()
    if meta.version != SCHEMA_VERSION:
        raise StoreError(
            f"{st.url} has store schema version {meta.version}: run "
            f"`cmd-pipeline upgrade --store {st.url}` to open it with xarray"
        )
    opts: dict[str, Any] = {"consolidated": False, "chunks": {}, "zarr_format": 3}
    ds = xr.open_zarr(st.url, **opts)
    names = np.asarray(ds["tensor"].values, dtype=object)
    ids = ds["tensor_id"].data
    tensor_name = ids.map_blocks(lambda b: names[b], dtype=object)
    ds = ds.set_coords([v for v in ds.data_vars if v != "trajectory"])
    ds = ds.assign_coords(tensor_name=("param", tensor_name))
    if analysis is None:
        return ds
    _ag, attrs = complete_study(st, analysis)
    study = xr.open_zarr(st.url, group=f"{ANALYSES}/{analysis}", **opts)
    study = study.drop_vars([v for v in _INTERNAL if v in study.variables])
    if "epochs" in study.variables:
        study = study.assign_coords(window=study["epochs"].values).drop_vars("epochs")
    study.attrs = {}
    out = ds.merge(study, compat="override", join="exact")
    out.attrs["analysis"] = {"name": analysis, **attrs}
    return out
