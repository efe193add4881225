"""Task function and graph builder of ``reconstruct``: one task per row block of a study.

A task reads the block's model (``mode``, ``a``, ``level``, ``anchor``; ``mode``, ``a``, ``b``
in a version-1 study: :class:`pipeline.store.analysis.StudyLayout`), computes
:func:`pipeline.kernels.reconstruct.reconstruct_block` in float64 and writes the block's rows of
``reconstructed`` as float32 (whole chunks). The builder only creates tasks; the caller
computes them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from dask import delayed
from dask.delayed import Delayed

from pipeline.kernels.reconstruct import reconstruct_block
from pipeline.store.analysis import StudyLayout, read_model_rows, write_result_rows

__all__ = ["RECONSTRUCTED", "build_reconstruct_tasks", "reconstruct_task"]

#: the result array the tasks write: ``analyses/<name>/reconstructed`` (N, Tw) float32
RECONSTRUCTED = "reconstructed"


def reconstruct_task(
    url: str, name: str, r0: int, r1: int, refs: np.ndarray, layout: StudyLayout
) -> None:
    """Reconstruct rows ``r0:r1`` of study ``name`` (whose arrays are laid out as ``layout``)
    and write them (runs on a worker)."""
    mode, a, b, *anchor = read_model_rows(url, name, layout, r0, r1)
    rec = reconstruct_block(mode, a, b, refs, slice(None), *anchor).astype(np.float32)
    write_result_rows(url, name, RECONSTRUCTED, r0, rec)


def build_reconstruct_tasks(
    url: str,
    name: str,
    row_blocks: Sequence[tuple[int, int]],
    refs: np.ndarray,
    layout: StudyLayout,
) -> tuple[list[Delayed], list[str]]:
    """One task per ``(r0, r1)`` of ``row_blocks`` (the references are shared by all, sent
    once) and a progress label per task; nothing is computed."""
    refs_d = delayed(refs, traverse=False)
    tasks = [
        delayed(reconstruct_task, pure=False)(
            url, name, r0, r1, refs_d, layout, dask_key_name=f"reconstruct-{name}-{r0}"
        )
        for r0, r1 in row_blocks
    ]
    labels = [f"{RECONSTRUCTED} rows {r0}-{r1}" for r0, r1 in row_blocks]
    return tasks, labels
