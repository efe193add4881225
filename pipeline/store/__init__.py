"""The trajectory store: schema (values) and Zarr I/O."""

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
