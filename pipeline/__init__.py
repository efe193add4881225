"""cmd-pipeline: out-of-core Correlation Mode Decomposition of training trajectories.

Importing the package is cheap: it imports neither torch nor cupy.

>>> import pipeline
>>> pipeline.fit.__module__, pipeline.ingest.__module__
('pipeline.ops.fit', 'pipeline.ops.ingest')
"""

from pipeline._version import __version__
from pipeline.errors import (
    ConfigMismatchError,
    InputError,
    PipelineError,
    PipelineWarning,
    SchemaVersionError,
    StoreError,
)
from pipeline.ops.evaluate import EvaluationResult, evaluate
from pipeline.ops.export import export, state_dict
from pipeline.ops.export_like import export_hf
from pipeline.ops.fit import FitResult, fit
from pipeline.ops.info import info
from pipeline.ops.ingest import IngestResult, ingest
from pipeline.ops.reconstruct import ReconstructResult, reconstruct
from pipeline.ops.report import ReportResult, load_study_data, report
from pipeline.runtime import Runner, RuntimeOptions, runner
from pipeline.store import TrajectoryStore, trajectory_dask
from pipeline.store.dataset import open_dataset
from pipeline.store.trajectory import upgrade

__all__ = [
    "ConfigMismatchError",
    "EvaluationResult",
    "FitResult",
    "IngestResult",
    "InputError",
    "PipelineError",
    "PipelineWarning",
    "ReconstructResult",
    "ReportResult",
    "Runner",
    "RuntimeOptions",
    "SchemaVersionError",
    "StoreError",
    "TrajectoryStore",
    "__version__",
    "evaluate",
    "export",
    "export_hf",
    "fit",
    "info",
    "ingest",
    "load_study_data",
    "open_dataset",
    "open_store",
    "reconstruct",
    "report",
    "runner",
    "state_dict",
    "trajectory_dask",
    "upgrade",
]


def open_store(url: str, *, storage_options: dict[str, object] | None = None) -> TrajectoryStore:
    """Open an existing store read-only; ``trajectory_dask(store)`` gives its (N, T) array.

    ``storage_options``: fsspec options for a store on object storage (the arrays opened here
    keep using them)."""
    from pipeline.store.remote import storage_options as _options

    with _options(storage_options, [url]):
        return TrajectoryStore.open(url)
