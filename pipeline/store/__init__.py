"""The store: the only package that imports zarr.

- :mod:`.schema`: the store's metadata as frozen, validated values (no I/O);
- :mod:`.trajectory`: the trajectory array, its chunks, and the ingest transaction
  (``begin_append`` / ``commit`` / ``rollback``);
- :mod:`.analysis`: a study's result arrays and report files (``analyses/<name>/``);
- :mod:`.study`: a study's lifecycle (create, resume, unchanged or refuse);
- :mod:`.online`: the versioned running sums of store-backed Online CMD (``online/``);
- :mod:`.keys`: key-level listing, deletion and partial-file cleanup.
"""

from pipeline.store.schema import EpochEntry, IngestSettings, StoreMeta, TensorEntry
from pipeline.store.trajectory import TrajectoryStore, trajectory_dask

__all__ = [
    "EpochEntry",
    "IngestSettings",
    "StoreMeta",
    "TensorEntry",
    "TrajectoryStore",
    "trajectory_dask",
]
