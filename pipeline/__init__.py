"""cmd-pipeline: out-of-core Correlation Mode Decomposition of training trajectories.

Importing the package is cheap: it imports neither torch nor cupy.

>>> import pipeline
>>> sorted(pipeline.__all__)[:3]
['ConfigMismatchError', 'FitResult', 'IngestResult']
"""

from pipeline._version import __version__
from pipeline.errors import (
    ConfigMismatchError,
    InputError,
    PipelineError,
    SchemaVersionError,
    StoreError,
)
from pipeline.ops.export import export
from pipeline.ops.fit import FitResult, fit
from pipeline.ops.info import info
from pipeline.ops.ingest import IngestResult, ingest
from pipeline.ops.reconstruct import ReconstructResult, reconstruct
from pipeline.runtime import RuntimeOptions
from pipeline.store import TrajectoryStore, trajectory_dask

__all__ = [
    "ConfigMismatchError",
    "FitResult",
    "IngestResult",
    "InputError",
    "PipelineError",
    "ReconstructResult",
    "RuntimeOptions",
    "SchemaVersionError",
    "StoreError",
    "TrajectoryStore",
    "__version__",
    "export",
    "fit",
    "info",
    "ingest",
    "open_store",
    "reconstruct",
    "trajectory_dask",
]


def open_store(url: str) -> TrajectoryStore:
    """Open an existing store read-only; ``trajectory_dask(store)`` gives its (N, T) array."""
    return TrajectoryStore.open(url)
