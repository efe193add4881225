"""Plans: every decision an operation makes before it touches data, as frozen values.

An ``ops`` function reads: open the store, make the plan, build the graph from it, run it,
commit. Plans are pure values (no I/O, no dask) that round-trip through ``to_dict`` /
``from_dict``, so they can be logged, compared and tested on their own.

- :mod:`pipeline.plan.layout`: where rows and epochs sit (row layout, blocks, chunk sizes,
  epoch specs and windows).
- :mod:`pipeline.plan.fit`: :class:`FitPlan`, :class:`BlockPlan`, :class:`StatsLayout`.
- :mod:`pipeline.plan.ingest`: :class:`IngestPlan` (settings, new and stored epochs, resume or
  rebuild) and :class:`EpochInspection`.
"""

from pipeline.plan.fit import BlockPlan, FitPlan, StatsLayout, fit_block_rows, plan_fit
from pipeline.plan.ingest import EpochInspection, IngestPlan, plan_ingest
from pipeline.plan.layout import (
    RowLayout,
    Segment,
    blocks,
    default_chunk_rows,
    parse_epoch_spec,
    parse_window,
)

__all__ = [
    "BlockPlan",
    "EpochInspection",
    "FitPlan",
    "IngestPlan",
    "RowLayout",
    "Segment",
    "StatsLayout",
    "blocks",
    "default_chunk_rows",
    "fit_block_rows",
    "parse_epoch_spec",
    "parse_window",
    "plan_fit",
    "plan_ingest",
]
